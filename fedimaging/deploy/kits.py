"""Start and stop provisioned NVFlare startup kits as local processes (tests and single-machine trials).

Each kit runs the same NVFlare module and arguments as its ``startup/sub_start.sh``, without that
script's restart loop, so a stopped process stays stopped. NVFlare starts every job in a new
session (``setsid``), so killing one process group would leave job processes behind. Every process
started here therefore carries an environment tag, and ``stop`` kills each process with that tag.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.x509.oid import NameOID

logger = logging.getLogger(__name__)

TAG_ENV = "FEDIMAGING_KIT_TAG"
SERVER_MODULE = "nvflare.private.fed.app.server.server_train"
CLIENT_MODULE = "nvflare.private.fed.app.client.client_train"


class KitError(RuntimeError):
    """A kit folder is invalid or its process is already running; the message names the kit."""


def certificate_org(kit: Path) -> str:
    """Return the organisation (O) of the kit's own certificate, as the kit's start script passes it."""
    startup = Path(kit) / "startup"
    cert_path = next((startup / name for name in ("server.crt", "client.crt") if (startup / name).is_file()), None)
    if cert_path is None:
        raise KitError(f"{startup}: no server.crt or client.crt; is {kit} a provisioned startup kit?")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(orgs[0].value) if orgs else ""


def server_address(kit: Path) -> tuple[str, int]:
    """Return the host and port that a client kit connects to, from ``startup/fed_client.json``."""
    path = Path(kit) / "startup" / "fed_client.json"
    config = json.loads(path.read_text())
    target = config["servers"][0]["service"]["target"]
    host, _, port = target.rpartition(":")
    return host, int(port)


def wait_for_port(host: str, port: int, timeout_s: float, netns: str | None = None) -> bool:
    """Return True once a TCP connection to ``host:port`` succeeds within ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if netns is None:
            try:
                with socket.create_connection((host, port), timeout=1.0):
                    return True
            except OSError:
                pass
        else:
            probe = ["ip", "netns", "exec", netns, sys.executable, "-c",
                     f"import socket; socket.create_connection(({host!r}, {port}), timeout=1.0)"]
            if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
                return True
        time.sleep(0.5)
    return False


def use_kit_storage(kit: Path) -> Path:
    """Point the server's job and snapshot storage into its kit folder; return ``local/resources.json``.

    NVFlare's default server resources keep jobs and snapshots under ``/tmp/nvflare``, which every
    server on the machine shares and a reboot may clear. An existing ``local/resources.json`` is kept.
    """
    local = Path(kit) / "local"
    target = local / "resources.json"
    if target.is_file():
        return target
    resources = json.loads((local / "resources.json.default").read_text())
    storage = Path(kit).resolve() / "storage"
    resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] = str(storage / "snapshots")
    for component in resources.get("components", []):
        if component.get("id") == "job_manager":
            component["args"]["uri_root"] = str(storage / "jobs")
    target.write_text(json.dumps(resources, indent=4) + "\n")
    return target


@dataclass
class KitProcess:
    """One running kit: its name, folder, process and log file."""

    name: str
    kit: Path
    process: subprocess.Popen
    log_path: Path


@dataclass
class LocalDeployment:
    """Kit processes started on this machine, optionally each in a network namespace.

    Use it as a context manager: leaving the block stops every process it started, also on errors.
    """

    log_dir: Path
    environment: dict[str, str] = field(default_factory=dict)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    processes: dict[str, KitProcess] = field(default_factory=dict)

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop_all()

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.environment)
        # Kit scripts and NVFlare's job launcher run plain `python3`; it must be this interpreter.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("OMP_NUM_THREADS", "1")
        env[TAG_ENV] = self.tag
        return env

    def _start(self, name: str, kit: Path, command: list[str], netns: str | None,
               extra_env: dict[str, str] | None) -> KitProcess:
        if name in self.processes and self.processes[name].process.poll() is None:
            raise KitError(f"{name} is already running (process {self.processes[name].process.pid})")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        env = self._env()
        env.update(extra_env or {})
        if netns:
            command = ["ip", "netns", "exec", netns, *command]
        with open(log_path, "ab") as log:
            process = subprocess.Popen(command, cwd=kit, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        logger.info("started %s (process %d); log %s", name, process.pid, log_path)
        started = KitProcess(name=name, kit=Path(kit), process=process, log_path=log_path)
        self.processes[name] = started
        return started

    def start_server(self, kit: Path, netns: str | None = None,
                     environment: dict[str, str] | None = None) -> KitProcess:
        """Start a server kit; ``environment`` adds variables for the server only (NVFlare reads
        ``NVFLARE_<SETTING>`` variables, for example ``NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT``).

        Starting a kit whose earlier process was stopped restarts it with the same storage and log file.
        """
        kit = Path(kit).resolve()
        use_kit_storage(kit)
        command = [sys.executable, "-u", "-m", SERVER_MODULE, "-m", str(kit), "-s", "fed_server.json",
                   "--set", "secure_train=true", f"org={certificate_org(kit)}", "config_folder=config"]
        return self._start(kit.name, kit, command, netns, environment)

    def start_client(self, kit: Path, site_config: Path | None = None, netns: str | None = None,
                     name: str | None = None, environment: dict[str, str] | None = None) -> KitProcess:
        """Start a client kit; ``site_config`` is passed as ``$FEDIMAGING_SITE_CONFIG`` when given.

        ``environment`` adds variables for this site only (for example ``FEDIMAGING_KEY_FILE``).
        """
        kit = Path(kit).resolve()
        name = name or kit.name
        command = [sys.executable, "-u", "-m", CLIENT_MODULE, "-m", str(kit), "-s", "fed_client.json",
                   "--set", "secure_train=true", f"uid={kit.name}", f"org={certificate_org(kit)}",
                   "config_folder=config"]
        extra = dict(environment or {})
        if site_config:
            extra["FEDIMAGING_SITE_CONFIG"] = str(Path(site_config).resolve())
        return self._start(name, kit, command, netns, extra)

    def tagged_processes(self, name: str | None = None) -> list[psutil.Process]:
        """Return the live processes started here (all, or those of kit ``name`` and its jobs)."""
        roots = [self.processes[name].process.pid] if name else [p.process.pid for p in self.processes.values()]
        found: dict[int, psutil.Process] = {}
        for pid in roots:
            try:
                root = psutil.Process(pid)
                found[pid] = root
                found.update({child.pid: child for child in root.children(recursive=True)})
            except psutil.NoSuchProcess:
                continue
        if name is None:
            # Orphans whose parent already exited are found by the tag in their environment.
            for process in psutil.process_iter():
                try:
                    if process.environ().get(TAG_ENV) == self.tag:
                        found[process.pid] = process
                except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                    continue
        return list(found.values())

    def job_processes(self, name: str) -> list[psutil.Process]:
        """Return the live NVFlare job processes of kit ``name``: every process below its parent process."""
        kit_process = self.processes[name].process
        return [process for process in self.tagged_processes(name) if process.pid != kit_process.pid]

    def kill(self, name: str) -> None:
        """Kill kit ``name`` and its job processes at once (SIGKILL), as a crash would."""
        self._signal_and_wait(self.tagged_processes(name), grace_s=0.0)
        self.processes[name].process.wait(timeout=10)

    def stop(self, name: str, grace_s: float = 5.0) -> None:
        """Stop kit ``name`` and its job processes: SIGTERM, then SIGKILL after ``grace_s`` seconds."""
        self._signal_and_wait(self.tagged_processes(name), grace_s=grace_s)
        self.processes[name].process.wait(timeout=10)

    def stop_all(self, grace_s: float = 5.0) -> None:
        """Stop every process started here, including job processes that outlived their kit."""
        self._signal_and_wait(self.tagged_processes(), grace_s=grace_s)
        for kit_process in self.processes.values():
            try:
                kit_process.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                logger.error("%s (process %d) did not exit after SIGKILL", kit_process.name, kit_process.process.pid)

    @staticmethod
    def _signal_and_wait(processes: list[psutil.Process], grace_s: float) -> None:
        if grace_s > 0:
            for process in processes:
                try:
                    process.send_signal(signal.SIGTERM)
                except psutil.NoSuchProcess:
                    pass
            _, processes = psutil.wait_procs(processes, timeout=grace_s)
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=5)

    def log_tail(self, name: str, characters: int = 3000) -> str:
        path = self.processes[name].log_path
        return path.read_text(errors="replace")[-characters:] if path.is_file() else f"(no log at {path})"
