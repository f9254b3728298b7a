"""``fedimaging provision``: NVFlare startup kits with fedimaging's site policies.

Runs ``nvflare provision`` on a copy of ``site_configs/project.yml`` with the overrides given here
(server name and ports, HE builder, policy folder, filter classes), then lists the kits it wrote.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedimaging.deploy.policy_names import DEFAULT_DP_FILTER, DEFAULT_PHI_GUARD_FILTER
from fedimaging.deploy.builders import DP_MARKER, PHI_GUARD_MARKER, PRIVACY_FILE, REQUIRE_DP_PROP, site_privacy_policy

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PROJECT = REPO / "site_configs" / "project.yml"
DEFAULT_POLICIES = REPO / "site_configs" / "policies"
POLICY_BUILDER = "fedimaging.deploy.builders.SitePolicyBuilder"
SIGNATURE_BUILDER = "nvflare.lighter.impl.signature.SignatureBuilder"
CERT_BUILDER = "nvflare.lighter.impl.cert.CertBuilder"
HE_BUILDER = "nvflare.lighter.impl.he.HEBuilder"
PROVISION_TIMEOUT_S = 300


class ProvisionError(RuntimeError):
    """Provisioning failed; the message names the project file or the NVFlare output to read."""


@dataclass
class ProvisionResult:
    """Startup kits written by one provisioning run."""

    prod_dir: Path
    kits: dict[str, Path]
    roles: dict[str, str]
    # Client name -> privacy filters left out of its kit because no class was configured.
    missing_filters: dict[str, list[str]] = field(default_factory=dict)

    def kit(self, name: str) -> Path:
        if name not in self.kits:
            raise ProvisionError(f"no startup kit for '{name}' in {self.prod_dir}; kits: {sorted(self.kits)}")
        return self.kits[name]


def load_project(path: Path) -> dict:
    try:
        project = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ProvisionError(f"cannot read project file {path}: {exc}") from exc
    if not isinstance(project, dict) or not isinstance(project.get("participants"), list):
        raise ProvisionError(f"{path}: not an NVFlare project file (no participants list)")
    return project


def customize_project(project: dict, *, policies_dir: Path = DEFAULT_POLICIES, server_name: str | None = None,
                      fed_learn_port: int | None = None, admin_port: int | None = None, he: bool = False,
                      phi_guard_filter: str | None = None, dp_filter: str | None = None,
                      project_name: str | None = None) -> dict:
    """Return a copy of ``project`` with the overrides applied and the policy builder configured."""
    project = json.loads(json.dumps(project))
    if project_name:
        project["name"] = project_name
    servers = [p for p in project["participants"] if p.get("type") == "server"]
    if len(servers) != 1:
        raise ProvisionError(f"the project needs exactly one server participant, found {len(servers)}")
    server = servers[0]
    if server_name:
        server["name"] = server_name
    if fed_learn_port is not None:
        server["fed_learn_port"] = fed_learn_port
    if admin_port is not None:
        server["admin_port"] = admin_port

    builders = project.setdefault("builders", [])
    paths = [builder.get("path") for builder in builders]
    if POLICY_BUILDER not in paths:
        builders.insert(_index_before(paths, SIGNATURE_BUILDER), {"path": POLICY_BUILDER, "args": {}})
        paths = [builder.get("path") for builder in builders]
    policy = builders[paths.index(POLICY_BUILDER)]
    if SIGNATURE_BUILDER in paths and paths.index(POLICY_BUILDER) > paths.index(SIGNATURE_BUILDER):
        raise ProvisionError(f"{POLICY_BUILDER} must come before {SIGNATURE_BUILDER} in the builders list, "
                             "because the signature covers local/ in HE kits")
    policy["args"] = {"policies_dir": str(Path(policies_dir).resolve()),
                      "phi_guard_filter": DEFAULT_PHI_GUARD_FILTER if phi_guard_filter is None else phi_guard_filter,
                      "dp_filter": DEFAULT_DP_FILTER if dp_filter is None else dp_filter}
    if he and HE_BUILDER not in paths:
        builders.insert(_index_before(paths, CERT_BUILDER) + 1, {"path": HE_BUILDER, "args": {}})
    return project


def _index_before(paths: list[str], anchor: str) -> int:
    return paths.index(anchor) if anchor in paths else len(paths)


def missing_filters(project: dict, policies_dir: Path, phi_guard_filter: str | None,
                    dp_filter: str | None) -> dict[str, list[str]]:
    """Return, per client, the privacy filters its kit will lack because no class path is configured."""
    template = json.loads((Path(policies_dir) / PRIVACY_FILE).read_text())
    paths = {PHI_GUARD_MARKER: DEFAULT_PHI_GUARD_FILTER if phi_guard_filter is None else phi_guard_filter or None,
             DP_MARKER: DEFAULT_DP_FILTER if dp_filter is None else dp_filter or None}
    missing = {}
    for participant in project["participants"]:
        if participant.get("type") != "client":
            continue
        _, unresolved = site_privacy_policy(template, require_dp=bool(participant.get(REQUIRE_DP_PROP)),
                                            filter_paths=paths)
        if unresolved:
            missing[participant["name"]] = unresolved
    return missing


def _latest_prod_dir(workspace: Path, name: str) -> Path:
    candidates = [p for p in (workspace / name).glob("prod_*") if re.fullmatch(r"prod_\d+", p.name)]
    if not candidates:
        raise ProvisionError(f"nvflare provision wrote no {workspace / name}/prod_NN folder")
    return max(candidates, key=lambda p: int(p.name.split("_")[1]))


def provision(workspace: Path, project_file: Path = DEFAULT_PROJECT, *, policies_dir: Path = DEFAULT_POLICIES,
              **overrides) -> ProvisionResult:
    """Provision the project into ``workspace`` and return the kits of this run.

    ``overrides`` are the keyword arguments of ``customize_project``. NVFlare keeps the root CA in
    ``workspace`` and numbers each run (``prod_00``, ``prod_01``, ...), so provisioning again into the
    same workspace issues kits that trust each other; another workspace makes a separate federation.
    """
    workspace = Path(workspace).resolve()
    project = customize_project(load_project(project_file), policies_dir=policies_dir, **overrides)
    workspace.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        project_copy = Path(scratch) / "project.yml"
        project_copy.write_text(yaml.safe_dump(project, sort_keys=False))
        command = [sys.executable, "-m", "nvflare.cli", "provision", "-p", str(project_copy), "-w", str(workspace),
                   "--force"]
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=PROVISION_TIMEOUT_S,
                                       check=False, cwd=scratch)
        except subprocess.TimeoutExpired as exc:
            raise ProvisionError(f"nvflare provision did not finish within {PROVISION_TIMEOUT_S} s") from exc
    if completed.returncode != 0:
        output = (completed.stdout + completed.stderr)[-3000:]
        raise ProvisionError(f"nvflare provision failed for {project_file} (exit status {completed.returncode}):\n{output}")

    prod_dir = _latest_prod_dir(workspace, project["name"])
    names = {p["name"]: p for p in project["participants"]}
    kits = {name: prod_dir / name for name in names if (prod_dir / name / "startup").is_dir()}
    absent = sorted(set(names) - set(kits))
    if absent:
        raise ProvisionError(f"nvflare provision wrote no startup kit for {', '.join(absent)} in {prod_dir}")
    roles = {name: p["role"] for name, p in names.items() if p.get("type") == "admin"}
    filters = missing_filters(project, policies_dir, overrides.get("phi_guard_filter"), overrides.get("dp_filter"))
    return ProvisionResult(prod_dir=prod_dir, kits=kits, roles=roles, missing_filters=filters)
