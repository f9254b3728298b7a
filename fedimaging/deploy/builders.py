"""NVFlare provisioning builder that writes fedimaging's site policies into every startup kit."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nvflare.lighter.spec import Builder, Project, ProvisionContext

from fedimaging.deploy.policy_names import DP_MARKER, MARKERS, PHI_GUARD_MARKER


AUTHORIZATION_FILE = "authorization.json"
INSTALLED_CODE_AUTHORIZATION_FILE = "authorization-installed-code.json"
PRIVACY_FILE = "privacy.json"
DEFAULT_SCOPE = "fedimaging"
DP_SCOPE = "fedimaging-dp"

# Participant properties read from project.yml.
REQUIRE_DP_PROP = "fedimaging_require_dp"
CODE_POLICY_PROP = "fedimaging_code_policy"
CODE_POLICIES = ("job-code", "installed-code")


def site_privacy_policy(template: dict, *, require_dp: bool, filter_paths: dict[str, str | None]) -> tuple[dict, list[str]]:
    """Return a site's privacy policy built from ``template`` and the markers that stayed unresolved.

    ``filter_paths`` maps each marker to a class path, or to None when that filter does not exist
    yet. A site that requires differential privacy keeps only the DP scope, so no job can select a
    scope without it.
    """
    policy = json.loads(json.dumps(template))
    unresolved: set[str] = set()
    for scope in policy.get("scopes", []):
        for chain in ("task_result_filters", "task_data_filters"):
            kept = []
            for entry in scope.get(chain, []):
                path = entry.get("path")
                if path in MARKERS:
                    replacement = filter_paths.get(path)
                    if replacement is None:
                        unresolved.add(path)
                        continue
                    entry = {**entry, "path": replacement}
                kept.append(entry)
            scope[chain] = kept
    if require_dp:
        policy["scopes"] = [scope for scope in policy["scopes"] if scope["name"] == DP_SCOPE]
        policy["default_scope"] = DP_SCOPE
    return policy, sorted(unresolved)


class SitePolicyBuilder(Builder):
    """Write ``local/authorization.json`` and ``local/privacy.json`` into each server and client kit.

    The server gets ``authorization.json``. A client gets ``authorization.json`` or, when its
    ``fedimaging_code_policy`` property is ``installed-code``, ``authorization-installed-code.json``
    (jobs that carry custom code are refused). Each client also gets the privacy policy; with
    ``fedimaging_require_dp: true`` only the DP scope. Must run before the SignatureBuilder, which
    signs ``local/`` in HE kits.
    """

    def __init__(self, policies_dir: str, phi_guard_filter: str | None = None, dp_filter: str | None = None):
        self.policies_dir = Path(policies_dir)
        self.filter_paths = {PHI_GUARD_MARKER: phi_guard_filter or None, DP_MARKER: dp_filter or None}
        self.unresolved: dict[str, list[str]] = {}

    def _read(self, name: str) -> dict:
        path = self.policies_dir / name
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RuntimeError(f"cannot read policy file {path}: {exc}; see site_configs/README.md") from exc

    def build(self, project: Project, ctx: ProvisionContext):
        authorization = self._read(AUTHORIZATION_FILE)
        installed_code = self._read(INSTALLED_CODE_AUTHORIZATION_FILE)
        privacy_template = self._read(PRIVACY_FILE)

        server = project.get_server()
        if server is not None:
            _write_json(Path(ctx.get_local_dir(server)) / AUTHORIZATION_FILE, authorization)

        for client in project.get_clients():
            code_policy = client.get_prop(CODE_POLICY_PROP, "job-code")
            if code_policy not in CODE_POLICIES:
                raise ValueError(f"client {client.name}: {CODE_POLICY_PROP} '{code_policy}' is invalid; "
                                 f"use one of {', '.join(CODE_POLICIES)}")
            chosen = installed_code if code_policy == "installed-code" else authorization
            require_dp = bool(client.get_prop(REQUIRE_DP_PROP, False))
            privacy, unresolved = site_privacy_policy(privacy_template, require_dp=require_dp,
                                                      filter_paths=self.filter_paths)
            local = Path(ctx.get_local_dir(client))
            _write_json(local / AUTHORIZATION_FILE, chosen)
            _write_json(local / PRIVACY_FILE, privacy)
            if unresolved:
                self.unresolved[client.name] = unresolved
                ctx.warning(f"client {client.name}: privacy policy written without {', '.join(unresolved)} "
                            "(no filter class configured)")


def _write_json(path: Path, data: dict) -> None:
    os.makedirs(path.parent, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")

