"""``fedimaging site check``: each readiness check passing and failing on kits and data made here."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from fedimaging.deploy.provision import provision
from fedimaging.deploy.site_check import check_data, check_device, check_server, check_startup_kit, run_checks
from jobs.build import REPO

DEMO_JOB = REPO / "jobs" / "demo_seg"
MAPPING = "label_mapping: {liver: {label_value: 1}, aorta: {label_value: 2}, lesion: {label_value: 3}}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Kits of two separate provisionings and one site's prepared demo data."""
    from fedimaging.demo.radiology import generate_radiology_site
    from preprocessing.prepare_dicom import PrepareOptions, prepare_dicom

    root = tmp_path_factory.mktemp("site_check")
    port = free_port()
    kits = provision(root / "provision", server_name="localhost", fed_learn_port=port, admin_port=free_port())
    other = provision(root / "other", server_name="localhost", fed_learn_port=port)
    generate_radiology_site(root / "raw", site_index=0, n_cases=1, seed=0, image_size=48, n_slices=16)
    prepare_dicom(PrepareOptions(source=root / "raw" / "dicom", labels=root / "raw" / "labels", out=root / "prepared",
                                 site="site-1", key_file=root / "site.key"))
    return {"root": root, "port": port, "kits": kits, "other": other, "data": root / "prepared"}


def write_config(path: Path, data: Path, kit: Path | None, site: str = "site-1", device: str = "cpu",
                 mapping: str = MAPPING) -> Path:
    lines = [f"site_name: {site}", f"data_dir: {data}", mapping, f"device: {device}"]
    if kit is not None:
        lines.append(f"startup_kit: {kit}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def listening(federation):
    """A TCP listener on the port the kits name, standing in for the server."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", federation["port"]))
    server.listen(4)
    try:
        yield server
    finally:
        server.close()


def by_name(results):
    return {result.name: result for result in results}


def test_all_checks_pass(federation, listening, tmp_path):
    config = write_config(tmp_path / "site-1.yaml", federation["data"], federation["kits"].kit("site-1"))
    results = by_name(run_checks(config, job=DEMO_JOB))
    failed = {name: r.message for name, r in results.items() if not r.ok}
    assert failed == {}
    assert set(results) == {"site configuration", "prepared data", "PHI identifier list", "job configuration",
                            "label mapping", "device", "startup kit", "server"}


def test_command_exit_status(federation, listening, tmp_path, capsys):
    from fedimaging.cli import main

    config = write_config(tmp_path / "site-1.yaml", federation["data"], federation["kits"].kit("site-1"))
    assert main(["site", "check", "--config", str(config), "--job", str(DEMO_JOB)]) == 0
    assert "all 8 checks passed" in capsys.readouterr().out
    broken = write_config(tmp_path / "broken.yaml", tmp_path / "absent", federation["kits"].kit("site-1"))
    assert main(["site", "check", "--config", str(broken)]) == 1
    output = capsys.readouterr().out
    assert "FAIL prepared data" in output
    assert "what to do: run 'fedimaging prepare" in output


def test_invalid_site_configuration(tmp_path):
    config = tmp_path / "site.yaml"
    config.write_text("site_name: site-1\n")
    (result,) = run_checks(config)
    assert not result.ok
    assert "data_dir" in result.message


def test_data_missing_file(federation, tmp_path):
    data = tmp_path / "prepared"
    shutil.copytree(federation["data"], data)
    assert check_data(data).ok
    image = next((data / "images").iterdir())
    image.unlink()
    result = check_data(data)
    assert not result.ok
    assert image.name in result.message
    assert "prepare" in result.fix


def test_data_case_not_in_manifest(federation, tmp_path):
    data = tmp_path / "prepared"
    shutil.copytree(federation["data"], data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["cases"] = []
    (data / "manifest.json").write_text(json.dumps(manifest))
    result = check_data(data)
    assert not result.ok
    assert "not in the manifest" in result.message


def test_label_mapping_missing_class(federation, tmp_path):
    config = write_config(tmp_path / "site.yaml", federation["data"], None,
                          mapping="label_mapping: {aorta: {label_value: 2}}")
    result = by_name(run_checks(config, job=DEMO_JOB))["label mapping"]
    assert not result.ok
    assert "liver" in result.message
    assert "label_mapping" in result.fix


def test_label_mapping_value_absent_from_data(federation, tmp_path):
    mapping = "label_mapping: {liver: {label_value: 1}, aorta: {label_value: 52}}"
    config = write_config(tmp_path / "site.yaml", federation["data"], None, mapping=mapping)
    result = by_name(run_checks(config, job=DEMO_JOB))["label mapping"]
    assert not result.ok
    assert "aorta" in result.message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_device_cuda_unavailable():
    result = check_device("cuda")
    assert not result.ok
    assert "CUDA" in result.fix
    assert check_device("auto").ok
    assert check_device("cpu").ok


def test_kit_not_configured():
    result = check_startup_kit(None, "site-1")
    assert not result.ok
    assert "startup_kit" in result.message


def test_kit_missing_key(federation, tmp_path):
    kit = tmp_path / "kit"
    shutil.copytree(federation["kits"].kit("site-1"), kit)
    (kit / "startup" / "client.key").unlink()
    result = check_startup_kit(kit, "site-1")
    assert not result.ok
    assert "client.key" in result.message


def test_kit_of_another_provisioning(federation, tmp_path):
    kit = tmp_path / "kit"
    shutil.copytree(federation["kits"].kit("site-1"), kit)
    foreign = federation["other"].kit("site-1") / "startup"
    shutil.copy(foreign / "client.crt", kit / "startup" / "client.crt")
    shutil.copy(foreign / "client.key", kit / "startup" / "client.key")
    result = check_startup_kit(kit, "site-1")
    assert not result.ok
    assert "was not issued by" in result.message


def test_kit_of_another_site(federation):
    result = check_startup_kit(federation["kits"].kit("site-2"), "site-1")
    assert not result.ok
    assert "site-2" in result.message


def _self_signed_kit(kit: Path, not_before: dt.datetime, not_after: dt.datetime) -> None:
    """Write a kit whose root CA issued client.crt for site-1 with the given validity dates."""
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-root")])
    now = dt.datetime.now(dt.timezone.utc)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - dt.timedelta(days=400)).not_valid_after(now + dt.timedelta(days=400))
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(not_before).not_valid_after(not_after).sign(ca_key, hashes.SHA256()))
    startup = kit / "startup"
    startup.mkdir(parents=True)
    (startup / "rootCA.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (startup / "client.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (startup / "client.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                                           serialization.NoEncryption()))
    (startup / "fed_client.json").write_text(json.dumps({"servers": [{"service": {"target": "localhost:1"}}]}))


def test_kit_expired_certificate(tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    _self_signed_kit(tmp_path / "valid", now - dt.timedelta(days=10), now + dt.timedelta(days=10))
    assert check_startup_kit(tmp_path / "valid", "site-1").ok
    _self_signed_kit(tmp_path / "expired", now - dt.timedelta(days=30), now - dt.timedelta(days=1))
    result = check_startup_kit(tmp_path / "expired", "site-1")
    assert not result.ok
    assert "expired" in result.message
    assert "new kit" in result.fix


def test_kit_certificate_not_yet_valid(tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    _self_signed_kit(tmp_path / "future", now + dt.timedelta(days=1), now + dt.timedelta(days=30))
    result = check_startup_kit(tmp_path / "future", "site-1")
    assert not result.ok
    assert "not valid before" in result.message


def test_server_unreachable(federation):
    # No listener on the kit's port in this test, so 127.0.0.1 refuses the connection.
    result = check_server(federation["kits"].kit("site-1"), timeout_s=1.0)
    assert not result.ok
    assert f"localhost:{federation['port']}" in result.message
    assert "firewall" in result.fix


def test_server_reachable(federation, listening):
    result = check_server(federation["kits"].kit("site-1"), timeout_s=1.0)
    assert result.ok, result.message
    assert "127.0.0.1" in result.message


def test_label_mapping_names_unannotated_optional_class(federation, tmp_path):
    config = write_config(tmp_path / "site.yaml", federation["data"], None,
                          mapping="label_mapping: {aorta: {label_value: 2}}")
    result = by_name(run_checks(config, job=REPO / "jobs" / "seg_fedavg"))["label mapping"]
    assert result.ok, result.message
    assert "aorta" in result.message
    assert "optional classes not annotated at this site: liver" in result.message


def test_phi_list_missing(federation, tmp_path):
    data = tmp_path / "prepared"
    shutil.copytree(federation["data"], data)
    (data / "phi_identifiers.json").unlink()
    config = write_config(tmp_path / "site-1.yaml", data, federation["kits"].kit("site-1"))
    result = by_name(run_checks(config, job=DEMO_JOB))["PHI identifier list"]
    assert not result.ok
    assert "phi_identifiers.json is missing" in result.message


def test_invalid_job_configuration(federation, tmp_path):
    job = tmp_path / "job"
    shutil.copytree(DEMO_JOB, job)
    job_file = job / "app" / "custom" / "fedimaging_job.json"
    spec = json.loads(job_file.read_text())
    spec["secure_aggregation"] = {}
    spec["aggregation"] = {"method": "median"}
    job_file.write_text(json.dumps(spec))
    config = write_config(tmp_path / "site-1.yaml", federation["data"], federation["kits"].kit("site-1"))
    results = by_name(run_checks(config, job=job))
    assert not results["job configuration"].ok
    assert "cannot be combined with secure_aggregation" in results["job configuration"].message
    assert not results["label mapping"].ok
    assert "job configuration is missing or invalid" in results["label mapping"].message
