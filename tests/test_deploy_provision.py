"""Provisioning with site_configs/project.yml: kits, roles in certificates and site policies."""

from __future__ import annotations

import json

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from fedimaging.deploy.builders import DP_MARKER, PHI_GUARD_MARKER, site_privacy_policy
from fedimaging.deploy.provision import DEFAULT_POLICIES, DEFAULT_PROJECT, customize_project, load_project, provision

ROLES = {
    "admin@consortium.example.org": "project_admin",
    "researcher@consortium.example.org": "lead",
    "it@hospital-1.example.org": "org_admin",
    "it@hospital-2.example.org": "org_admin",
    "it@hospital-3.example.org": "org_admin",
}
SITES = ["site-1", "site-2", "site-3"]


def certificate(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory):
    return provision(tmp_path_factory.mktemp("provision"), server_name="localhost", fed_learn_port=18102,
                     admin_port=18103)


def test_project_file_participants():
    project = load_project(DEFAULT_PROJECT)
    by_type = {}
    for participant in project["participants"]:
        by_type.setdefault(participant["type"], []).append(participant)
    assert len(by_type["server"]) == 1
    assert [p["name"] for p in by_type["client"]] == SITES
    assert {p["name"]: p["role"] for p in by_type["admin"]} == ROLES
    paths = [b["path"] for b in project["builders"]]
    assert paths.index("fedimaging.deploy.builders.SitePolicyBuilder") < paths.index(
        "nvflare.lighter.impl.signature.SignatureBuilder")


def test_provision_writes_every_kit(provisioned):
    assert set(provisioned.kits) == {"localhost", *SITES, *ROLES}
    assert provisioned.roles == ROLES
    server_startup = provisioned.kit("localhost") / "startup"
    for part in ("fed_server.json", "server.crt", "server.key", "rootCA.pem"):
        assert (server_startup / part).is_file(), part
    root = certificate(server_startup / "rootCA.pem")
    for site in SITES:
        startup = provisioned.kit(site) / "startup"
        client = json.loads((startup / "fed_client.json").read_text())
        assert client["servers"][0]["service"]["target"] == "localhost:18102"
        assert client["client"]["connection_security"] == "mtls"
        cert = certificate(startup / "client.crt")
        assert cert.issuer == root.subject
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == site


def test_admin_certificates_carry_roles(provisioned):
    for user, role in ROLES.items():
        startup = provisioned.kit(user) / "startup"
        admin = json.loads((startup / "fed_admin.json").read_text())["admin"]
        assert admin["username"] == user
        assert admin["port"] == 18103
        cert = certificate(startup / "client.crt")
        roles = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.UNSTRUCTURED_NAME)]
        assert roles == [role], user


def test_authorization_policy_roles(provisioned):
    expected = json.loads((DEFAULT_POLICIES / "authorization.json").read_text())
    for name in ("localhost", *SITES):
        policy = json.loads((provisioned.kit(name) / "local" / "authorization.json").read_text())
        assert policy == expected, name
    permissions = expected["permissions"]
    assert permissions["lead"]["submit_job"] == "any"
    assert permissions["lead"]["byoc"] == "any"
    assert permissions["lead"]["shell_commands"] == "none"
    assert permissions["org_admin"]["submit_job"] == "none"
    assert permissions["org_admin"]["download_job"] == "none"
    assert permissions["org_admin"]["shell_commands"] == "o:site"
    assert permissions["org_admin"]["view"] == "any"
    assert permissions["member"] == {"view": "any"}


def test_installed_code_policy_refuses_custom_code():
    policy = json.loads((DEFAULT_POLICIES / "authorization-installed-code.json").read_text())
    assert all(rights.get("byoc", "none") == "none" for role, rights in policy["permissions"].items()
               if isinstance(rights, dict))
    assert policy["permissions"]["lead"]["submit_job"] == "any"


def test_privacy_policy_names_fedimaging_filters_by_default(provisioned):
    for site in SITES:
        text = (provisioned.kit(site) / "local" / "privacy.json").read_text()
        assert "@" not in text.replace("@consortium", ""), f"{site}: a marker was written into the kit"
        policy = json.loads(text)
        assert policy["default_scope"] == "fedimaging"
        scopes = {scope["name"]: scope for scope in policy["scopes"]}
        assert [f["path"] for f in scopes["fedimaging"]["task_result_filters"]] == ["fedimaging_app.phi_guard.PHIGuardFilter"]
        assert [f["path"] for f in scopes["fedimaging-dp"]["task_result_filters"]] == [
            "fedimaging_app.phi_guard.PHIGuardFilter", "fedimaging_app.privacy.SiteDPFilter"]
        assert [f["path"] for f in scopes["fedimaging-dp"]["task_data_filters"]] == ["fedimaging_app.privacy.SiteDPFilter"]
    assert provisioned.missing_filters == {}


def test_filters_left_out_on_request_are_reported(tmp_path):
    result = provision(tmp_path / "ws", server_name="localhost", phi_guard_filter="", dp_filter="")
    assert result.missing_filters == {site: sorted([DP_MARKER, PHI_GUARD_MARKER]) for site in SITES}
    policy = json.loads((result.kit(SITES[0]) / "local" / "privacy.json").read_text())
    assert all(not scope["task_result_filters"] for scope in policy["scopes"])


def test_privacy_policy_filter_substitution():
    template = json.loads((DEFAULT_POLICIES / "privacy.json").read_text())
    policy, unresolved = site_privacy_policy(template, require_dp=False,
                                             filter_paths={PHI_GUARD_MARKER: "pkg.Guard", DP_MARKER: "pkg.Noise"})
    assert unresolved == []
    scopes = {scope["name"]: [f["path"] for f in scope["task_result_filters"]] for scope in policy["scopes"]}
    assert scopes == {"fedimaging": ["pkg.Guard"], "fedimaging-dp": ["pkg.Guard", "pkg.Noise"]}


def test_site_requiring_dp_keeps_only_dp_scope(tmp_path):
    project = load_project(DEFAULT_PROJECT)
    for participant in project["participants"]:
        if participant["name"] == "site-3":
            participant["fedimaging_require_dp"] = True
            participant["fedimaging_code_policy"] = "installed-code"
    project_file = tmp_path / "project.yml"
    project_file.write_text(yaml.safe_dump(project))
    result = provision(tmp_path / "ws", project_file, server_name="localhost", phi_guard_filter="pkg.Guard",
                       dp_filter="pkg.Noise")
    dp_site = json.loads((result.kit("site-3") / "local" / "privacy.json").read_text())
    assert dp_site["default_scope"] == "fedimaging-dp"
    assert [scope["name"] for scope in dp_site["scopes"]] == ["fedimaging-dp"]
    assert [f["path"] for f in dp_site["scopes"][0]["task_result_filters"]] == ["pkg.Guard", "pkg.Noise"]
    other = json.loads((result.kit("site-1") / "local" / "privacy.json").read_text())
    assert other["default_scope"] == "fedimaging"
    assert result.missing_filters == {}
    authorization = json.loads((result.kit("site-3") / "local" / "authorization.json").read_text())
    assert authorization["permissions"]["lead"]["byoc"] == "none"


def test_second_provisioning_has_another_root(provisioned, tmp_path):
    other = provision(tmp_path / "other", server_name="localhost")
    first = certificate(provisioned.kit("site-1") / "startup" / "rootCA.pem")
    second = certificate(other.kit("site-1") / "startup" / "rootCA.pem")
    assert first.public_key().public_numbers() != second.public_key().public_numbers()


def test_he_option_adds_builder_before_cert():
    project = customize_project(load_project(DEFAULT_PROJECT), he=True)
    paths = [b["path"] for b in project["builders"]]
    assert paths.index("nvflare.lighter.impl.he.HEBuilder") < paths.index("nvflare.lighter.impl.cert.CertBuilder") + 2
    assert paths.index("nvflare.lighter.impl.he.HEBuilder") < paths.index("nvflare.lighter.impl.signature.SignatureBuilder")
    plain = customize_project(load_project(DEFAULT_PROJECT))
    assert "nvflare.lighter.impl.he.HEBuilder" not in [b["path"] for b in plain["builders"]]


def test_provision_command_lists_kits(tmp_path, capsys):
    from fedimaging.cli import main

    status = main(["provision", "--workspace", str(tmp_path), "--server-name", "localhost", "--port", "18202",
                   "--admin-port", "18203"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "researcher@consortium.example.org (lead)" in captured.out
    assert "does not enforce it" not in captured.err
    status = main(["provision", "--workspace", str(tmp_path / "second"), "--server-name", "localhost",
                   "--phi-guard-filter", ""])
    captured = capsys.readouterr()
    assert status == 0 and "@PHI_GUARD_FILTER@ filter" in captured.err and "does not enforce it" in captured.err


def test_provision_command_rejects_missing_project(tmp_path, capsys):
    from fedimaging.cli import main

    status = main(["provision", "--workspace", str(tmp_path), "--project", str(tmp_path / "absent.yml")])
    assert status == 1
    assert "absent.yml" in capsys.readouterr().err
