"""Real NVFlare deployments on this machine: provisioned kits, mutual TLS, admin API, separate processes.

A server and three clients run as separate processes from startup kits made by `fedimaging provision`.
The lead researcher submits a one-round variant of the demo segmentation job through the FLARE API,
waits, downloads the result and builds the report. Every process is stopped in teardown, and all
traffic stays on loopback or on network namespaces that the test creates and deletes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedimaging.deploy.kits import LocalDeployment, wait_for_port
from fedimaging.deploy.provision import provision
from fedimaging.deploy.results import write_run_file
from jobs.build import REPO

pytestmark = pytest.mark.slow

SITES = ["site-1", "site-2", "site-3"]
LEAD = "researcher@consortium.example.org"
SITE_IT = "it@hospital-1.example.org"
MAPPING = {"liver": {"label_value": 1}, "aorta": {"label_value": 2}, "lesion": {"label_value": 3}}
JOB_TIMEOUT_S = 240
# Cross-site evaluation timeouts for the test job; the committed jobs wait up to 1800 s for a silent site.
CROSS_SITE_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def small_job(destination: Path) -> Path:
    """Copy jobs/demo_seg with one round, two training steps and small patches."""
    job = destination / "demo_seg"
    shutil.copytree(REPO / "jobs" / "demo_seg", job)
    config_path = job / "app" / "custom" / "fedimaging_job.json"
    config = json.loads(config_path.read_text())
    config.update(steps_per_round=2, patch_size=[32, 32, 16], samples_per_volume=1, bootstrap_samples=100)
    config_path.write_text(json.dumps(config, indent=2))
    server_path = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_path.read_text())
    for workflow in server["workflows"]:
        if workflow["path"].endswith(".FedAvg"):
            workflow["args"].update(num_rounds=1, num_clients=len(SITES))
        if workflow["path"].endswith("CrossSiteModelEval"):
            workflow["args"].update(validation_timeout=CROSS_SITE_TIMEOUT_S, submit_model_timeout=CROSS_SITE_TIMEOUT_S)
    server_path.write_text(json.dumps(server, indent=2))
    return job


@pytest.fixture(scope="module")
def prepared_sites(tmp_path_factory) -> dict[str, dict]:
    """Demo CT data for three sites, prepared with each site's own pseudonym key."""
    from fedimaging.demo.radiology import generate_radiology_site
    from preprocessing.prepare_dicom import PrepareOptions, prepare_dicom

    root = tmp_path_factory.mktemp("deploy_data")
    sites = {}
    for index, site in enumerate(SITES):
        raw = root / site / "raw"
        generate_radiology_site(raw, site_index=index, n_cases=1, seed=index, image_size=48, n_slices=16)
        key = root / f"{site}.key"
        prepare_dicom(PrepareOptions(source=raw / "dicom", labels=raw / "labels", out=root / site / "prepared",
                                     site=site, key_file=key))
        sites[site] = {"data": root / site / "prepared", "key": key}
    return sites


def install_site_config(kit: Path, site: str, data: Path) -> None:
    """Put the site configuration where a deployed client finds it: local/fedimaging_site.yaml in its kit."""
    lines = [f"site_name: {site}", f"data_dir: {data}", "label_mapping:"]
    lines += [f"  {name}: {json.dumps(source)}" for name, source in MAPPING.items()]
    lines += ["device: cpu", "torch_threads: 1"]
    (kit / "local" / "fedimaging_site.yaml").write_text("\n".join(lines) + "\n")


def open_session(user: str, kit: Path):
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    return new_secure_session(user, str(kit), timeout=60)


def wait_for_clients(session, expected: set[str], timeout_s: float) -> set[str]:
    deadline = time.monotonic() + timeout_s
    connected: set[str] = set()
    while time.monotonic() < deadline:
        connected = {client.name for client in session.get_system_info().client_info}
        if connected >= expected:
            break
        time.sleep(1)
    return connected


def run_job_as_lead(kits, job: Path, workdir: Path) -> tuple[dict, Path]:
    """Submit a copy of ``job`` as the lead researcher, wait for it and download its result."""
    from nvflare.fuel.flare_api.flare_api import MonitorReturnCode

    session = open_session(LEAD, kits.kit(LEAD))
    try:
        # Submission writes signature files into the folder, so a copy is submitted.
        submitted = workdir / "submit" / job.name
        shutil.copytree(job, submitted)
        job_id = session.submit_job(str(submitted))
        code, meta = session.monitor_job_and_return_job_meta(job_id, timeout=JOB_TIMEOUT_S, poll_interval=2)
        assert code == MonitorReturnCode.JOB_FINISHED, f"job {job_id} did not finish within {JOB_TIMEOUT_S} s: {code}"
        download = Path(session.download_job_result(job_id))
    finally:
        session.close()
    return meta, download


def report_for(download: Path, out: Path) -> dict:
    write_run_file(download, "demo_seg", SITES, rounds=1)
    result = subprocess.run([sys.executable, "-m", "fedimaging", "report", str(download), "--out", str(out)],
                            capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads((out / "report.json").read_text())


def kit_environment(root: Path) -> dict[str, str]:
    home, scratch = root / "home", root / "tmp"
    home.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    return {"HOME": str(home), "TMPDIR": str(scratch)}


def test_loopback_deployment(tmp_path, prepared_sites):
    port, admin_port = free_port(), free_port()
    kits = provision(tmp_path / "provision", server_name="localhost", fed_learn_port=port, admin_port=admin_port)
    foreign = provision(tmp_path / "foreign", server_name="localhost", fed_learn_port=port, admin_port=admin_port)
    for site in SITES:
        install_site_config(kits.kit(site), site, prepared_sites[site]["data"])
    job = small_job(tmp_path / "jobs")

    with LocalDeployment(log_dir=tmp_path / "logs", environment=kit_environment(tmp_path)) as deployment:
        deployment.start_server(kits.kit("localhost"))
        assert wait_for_port("127.0.0.1", port, 60), deployment.log_tail("localhost")
        admin = open_session(LEAD, kits.kit(LEAD))
        try:
            # A client whose certificate comes from another provisioning is refused by mutual TLS.
            deployment.start_client(foreign.kit("site-1"), name="foreign-site-1")
            time.sleep(8)
            assert wait_for_clients(admin, set(SITES), 1) == set()
            deployment.stop("foreign-site-1")

            for site in SITES:
                deployment.start_client(kits.kit(site),
                                        environment={"FEDIMAGING_KEY_FILE": str(prepared_sites[site]["key"])})
            assert wait_for_clients(admin, set(SITES), 60) == set(SITES)
        finally:
            admin.close()

        # Site IT (org_admin) may see status but not submit jobs.
        site_it = open_session(SITE_IT, kits.kit(SITE_IT))
        try:
            assert {c.name for c in site_it.get_system_info().client_info} == set(SITES)
            refused = tmp_path / "refused" / job.name
            shutil.copytree(job, refused)
            with pytest.raises(Exception, match="(?i)not authorized|authoriz"):
                site_it.submit_job(str(refused))
            assert site_it.list_jobs() == []
        finally:
            site_it.close()

        meta, download = run_job_as_lead(kits, job, tmp_path)

    assert meta["status"] == "FINISHED:COMPLETED", meta
    assert meta["submitter_name"] == LEAD
    report = report_for(download, tmp_path / "report")
    assert [site["site"] for site in report["sites"]] == SITES
    assert all(site["status"] == "ok" for site in report["sites"]), report["sites"]
    assert any(cell["value"] is not None for cell in report["cells"])
    assert not deployment.tagged_processes(), "processes left running after the deployment stopped"


SUBNET = "10.231.0"
SERVER_ADDRESS = f"{SUBNET}.1"
HOST_ADDRESS = f"{SUBNET}.254"


def ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", "netns", "exec", netns, "ip", *args] if netns else ["ip", *args]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def namespaces():
    """A server namespace with a bridge, one namespace per site, and a veth from this host for the admin.

    Names carry this process id so that parallel runs do not collide; everything is deleted afterwards.
    """
    suffix = str(os.getpid())
    probe = subprocess.run(["ip", "netns", "add", f"fedt{suffix}p"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"network namespaces are not available here (ip netns add: {probe.stderr.strip()})")
    created = [f"fedt{suffix}p"]
    host_link = f"fh{suffix}"[:15]
    try:
        server_ns = f"fedt{suffix}s"
        ip("netns", "add", server_ns)
        created.append(server_ns)
        ip("link", "add", "fbr0", "type", "bridge", netns=server_ns)
        ip("addr", "add", f"{SERVER_ADDRESS}/24", "dev", "fbr0", netns=server_ns)
        ip("link", "set", "fbr0", "up", netns=server_ns)
        ip("link", "set", "lo", "up", netns=server_ns)
        site_ns = {}
        for index, site in enumerate(SITES, start=1):
            namespace = f"fedt{suffix}c{index}"
            ip("netns", "add", namespace)
            created.append(namespace)
            outer, inner = f"fv{suffix}{index}s"[:15], f"fv{suffix}{index}c"[:15]
            ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            ip("link", "set", outer, "netns", server_ns)
            ip("link", "set", inner, "netns", namespace)
            ip("link", "set", outer, "master", "fbr0", "up", netns=server_ns)
            ip("addr", "add", f"{SUBNET}.{10 + index}/24", "dev", inner, netns=namespace)
            ip("link", "set", inner, "up", netns=namespace)
            ip("link", "set", "lo", "up", netns=namespace)
            site_ns[site] = namespace
        ip("link", "add", host_link, "type", "veth", "peer", "name", "fhs0")
        ip("link", "set", "fhs0", "netns", server_ns)
        ip("link", "set", "fhs0", "master", "fbr0", "up", netns=server_ns)
        ip("addr", "add", f"{HOST_ADDRESS}/24", "dev", host_link)
        ip("link", "set", host_link, "up")
        yield {"server": server_ns, "sites": site_ns}
    finally:
        subprocess.run(["ip", "link", "del", host_link], capture_output=True, check=False)
        for namespace in created:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)


def test_namespaced_deployment(tmp_path, prepared_sites, namespaces):
    kits = provision(tmp_path / "provision", server_name=SERVER_ADDRESS, fed_learn_port=8002, admin_port=8003)
    for site in SITES:
        install_site_config(kits.kit(site), site, prepared_sites[site]["data"])
    job = small_job(tmp_path / "jobs")

    with LocalDeployment(log_dir=tmp_path / "logs", environment=kit_environment(tmp_path)) as deployment:
        deployment.start_server(kits.kit(SERVER_ADDRESS), netns=namespaces["server"])
        assert wait_for_port(SERVER_ADDRESS, 8002, 60), deployment.log_tail(SERVER_ADDRESS)
        # Nothing listens on this host's loopback: the server is only in its own namespace.
        assert not wait_for_port("127.0.0.1", 8002, 1)
        for site in SITES:
            deployment.start_client(kits.kit(site), netns=namespaces["sites"][site],
                                    environment={"FEDIMAGING_KEY_FILE": str(prepared_sites[site]["key"])})
        admin = open_session(LEAD, kits.kit(LEAD))
        try:
            connected = wait_for_clients(admin, set(SITES), 60)
        finally:
            admin.close()
        assert connected == set(SITES), deployment.log_tail("site-1")
        meta, download = run_job_as_lead(kits, job, tmp_path)

    assert meta["status"] == "FINISHED:COMPLETED", meta
    report = report_for(download, tmp_path / "report")
    assert all(site["status"] == "ok" for site in report["sites"]), report["sites"]
    assert not deployment.tagged_processes(), "processes left running after the deployment stopped"
