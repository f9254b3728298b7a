"""PHI guard: the identifier list and its matching rule, the outgoing-message check, the log guard, and
canary federations in the NVFlare simulator."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedimaging_app.phi_guard import PHILeakError, check_outgoing, find_identifier, install_log_guard
from fedimaging_app.phi_tokens import IDENTIFIER_FILE_NAME, IdentifierList, dates, tokens
from jobs.build import CLIENT_TASKS, SPECS, export_job
from tests.conftest import DATA, require
from tests.support.cli import fedimaging
from tests.support.cli import write_site_config as site_yaml

KEY = bytes(range(32))
TOTALSEG = DATA / "radiology" / "totalseg"
KATHER = DATA / "pathology" / "tiles" / "kather2016"
CMU = DATA / "pathology" / "slides" / "cmu_small_region.svs"
SUPPORT = Path(__file__).parent / "support"

# Made-up identifiers injected into copies of real files.
CANARY = {"PatientName": "CANARYLAST^CANARYFIRST", "PatientID": "CNRY-773311", "AccessionNumber": "ACC99887766",
          "PatientBirthDate": "19710203", "InstitutionName": "Canary Valley Infirmary"}
CANARY_SCAN = [b"canarylast", b"canaryfirst", b"cnry-773311", b"cnry773311", b"acc99887766", b"99887766",
               b"19710203", b"1971-02-03", b"canary valley", b"canaryvalley"]


def listed(*pairs) -> IdentifierList:
    identifiers = IdentifierList(KEY)
    for kind, value in pairs:
        identifiers.add(value, kind)
    return identifiers


# ------------------------------------------------------------------------------------ matching rule
def test_name_forms_match_after_normalisation():
    identifiers = listed(("patient_name", "DOE^JANE^^^"))
    for text in ["DOE^JANE", "Jane Doe", "doe_jane.svs", "patient: JANE", "Jäne", "/archive/DOE JANE/1.dcm", "doejane"]:
        assert identifiers.find(text) == "patient_name", text
    # "DOE" alone has three letters: too short to identify anyone on its own.
    for text in ["doe", "John Doe", "janet", "0.5 dice", "jan"]:
        assert identifiers.find(text) is None, text


def test_ids_match_whole_and_by_long_parts():
    identifiers = listed(("patient_id", "MRN-0042-77"), ("accession_number", "A12"))
    assert identifiers.find("id MRN004277") == "patient_id"
    assert identifiers.find("mrn 0042 77") == "patient_id"
    assert identifiers.find("case 0042") == "patient_id"  # a 4-digit part of an ID is matched
    assert identifiers.find("mrn 77") is None
    assert identifiers.find("A12") is None  # shorter than 4 characters: not recorded


def test_birth_dates_match_in_any_common_format():
    identifiers = listed(("birth_date", "19800115"))
    for text in ["19800115", "born 1980-01-15", "1980/1/15", "15.01.1980", "01/15/1980", "15/01/1980"]:
        assert identifiers.find(text) == "birth_date", text
    assert identifiers.find("1980-01-16") is None
    assert dates("31/12/1999") == {"19991231"}


def test_institutions_and_file_names_match_only_whole():
    identifiers = listed(("institution", "Mercy General Hospital"), ("file_name", "CMU-1-Small-Region"))
    assert identifiers.find("scanned at MERCY GENERAL HOSPITAL") == "institution"
    assert identifiers.find("cmu_1_small_region.svs") == "file_name"
    for text in ["general", "hospital", "mercy", "small region", "a small_sample note"]:
        assert identifiers.find(text) is None, text


def test_placeholders_are_not_identifiers():
    identifiers = listed(("patient_name", "Anonymous"), ("patient_id", "UNKNOWN"), ("institution", "Hospital"))
    assert len(identifiers) == 0


def test_tokens_split_on_dicom_separators():
    assert tokens("Müller^Hans-Peter Dr.") == ["muller", "hans", "peter", "dr"]


def test_list_file_holds_no_clear_text_and_checks_the_key(tmp_path):
    identifiers = listed(("patient_name", "CANARYLAST^CANARYFIRST"), ("patient_id", "CNRY-773311"))
    path = identifiers.save(tmp_path, tmp_path / "key")
    text = path.read_text().lower()
    assert "canary" not in text and "773311" not in text
    assert IdentifierList.load(tmp_path, KEY).find("canaryfirst") == "patient_name"
    with pytest.raises(ValueError, match="another pseudonym key"):
        IdentifierList.load(tmp_path, bytes(32))
    with pytest.raises(ValueError, match="prepare this site's data again"):
        IdentifierList.load(tmp_path / "nowhere", KEY)


# ------------------------------------------------------------------------------------ outgoing checks
def test_outgoing_check_names_the_location_not_the_value():
    identifiers = listed(("patient_name", "CANARYLAST^CANARYFIRST"))
    message = {"DXO": {"data": {"conv.weight": np.zeros(3)}, "meta": {"note": "case of canaryfirst"}}}
    with pytest.raises(PHILeakError) as error:
        check_outgoing(message, identifiers, {"note": "x"})
    assert "message.DXO.meta.note" in str(error.value) and "patient_name" in str(error.value)
    assert "canary" not in str(error.value).lower()
    # Keys are checked too, and string arrays; numeric arrays are not text.
    assert find_identifier({"canaryfirst_dice": 0.5}, identifiers) is not None
    assert find_identifier({"x": np.array(["ok", "Canaryfirst"])}, identifiers) is not None
    check_outgoing({"weights": np.frombuffer(b"canaryfirst!", dtype=np.uint8)}, identifiers, {})


def test_unknown_metadata_keys_are_blocked():
    with pytest.raises(PHILeakError, match="allow-list"):
        check_outgoing({}, listed(), {"NUM_STEPS_CURRENT_ROUND": 3, "patient_list": []})
    check_outgoing({}, listed(), {"NUM_STEPS_CURRENT_ROUND": 3, "__internal__": 1})


def test_log_guard_withholds_lines_with_identifiers(caplog):
    install_log_guard(listed(("patient_id", "CNRY-773311")))
    logger = logging.getLogger("fedimaging.test.phi")
    with caplog.at_level(logging.INFO, logger="fedimaging.test.phi"):
        logger.info("reading /archive/%s/1.dcm", "CNRY-773311")
        logger.info("round %d done", 3)
    install_log_guard(listed())  # later tests in this process see an empty list
    assert "773311" not in caplog.text
    assert "withheld by the PHI guard" in caplog.text and "round 3 done" in caplog.text


# ------------------------------------------------------------------------------------ canary federations


def canary_series(root: Path) -> Path:
    """A copy of a real CT series with made-up identifiers in headers, folder and file names."""
    folder = root / "CANARYLAST_CANARYFIRST_CNRY-773311"
    folder.mkdir(parents=True)
    for index, path in enumerate(sorted(require(TOTALSEG / "example_ct_dicom").iterdir())):
        ds = pydicom.dcmread(path)
        for keyword, value in CANARY.items():
            setattr(ds, keyword, value)
        ds.save_as(folder / f"CANARYLAST_{index:03d}.dcm")
    return folder


def canary_slide(root: Path) -> Path:
    """A copy of a real Aperio slide with made-up identifiers in its properties and its path."""
    import tifffile

    folder = root / "ACC99887766"
    folder.mkdir(parents=True)
    target = folder / "CANARYLAST_CNRY-773311.svs"
    shutil.copy(require(CMU), target)
    description = tifffile.tiffcomment(target)
    tifffile.tiffcomment(target, description.rstrip() + "|Patient = CANARYLAST^CANARYFIRST|PatientID = CNRY-773311"
                         "|Accession = ACC99887766|Institution = Canary Valley Infirmary")
    return target




def recording_job(base: str, tmp_path: Path, folder: Path, spec: dict | None = None) -> Path:
    job = export_job(base, tmp_path / "jobs", num_rounds=1, min_clients=3, spec=spec)
    shutil.copy(SUPPORT / "message_recorder.py", job / "app" / "custom" / "message_recorder.py")
    path = job / "app" / "config" / "config_fed_server.json"
    config = json.loads(path.read_text())
    config["task_result_filters"] = [{"tasks": CLIENT_TASKS, "filters": [
        {"path": "message_recorder.RecordingFilter", "args": {"folder": str(folder)}}]}]
    path.write_text(json.dumps(config, indent=2))
    return job


def hits(paths) -> list[str]:
    found = []
    for path in paths:
        data = path.read_bytes().lower()
        found += [f"{path}: {c.decode()}" for c in CANARY_SCAN if c in data]
    return found


def every_file(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.is_file()]


@pytest.fixture(scope="module")
def segmentation_sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("canary_seg")
    source = canary_series(root / "archive")
    assert hits(every_file(root / "archive")), "the canary is not in the input: the scan would prove nothing"
    keys = root / "keys"
    fedimaging("prepare", "dicom", source, "--labels", TOTALSEG / "example_seg_dicom.nii.gz", "--out", root / "p1",
               "--site", "site-1", "--key-file", keys / "1")
    fedimaging("prepare", "dicom", TOTALSEG / "example_ct.nii.gz", "--labels",
               TOTALSEG / "example_seg_fast_force_split.nii.gz", "--out", root / "p2", "--site", "site-2",
               "--key-file", keys / "2")
    models = TOTALSEG / "aorta_report" / "models"
    fedimaging("prepare", "dicom", models / "ct_cropped.nii.gz", "--labels", models, "--out", root / "p3",
               "--site", "site-3", "--key-file", keys / "3")
    recorded = json.loads((root / "p1" / IDENTIFIER_FILE_NAME).read_text())["digests"]
    assert {"patient_name", "patient_id", "accession_number", "birth_date", "institution"} <= set(recorded.values())
    mapping = {"aorta": {"label_value": 52}, "liver": {"label_value": 5}}
    return root, [site_yaml(root / "site-1.yaml", "site-1", root / "p1", mapping),
                  site_yaml(root / "site-2.yaml", "site-2", root / "p2", mapping),
                  site_yaml(root / "site-3.yaml", "site-3", root / "p3", {"aorta": {"mask": "aorta"}})]


@pytest.mark.slow
def test_canary_segmentation_federation_leaks_nothing(segmentation_sites, tmp_path):
    root, sites = segmentation_sites
    messages = tmp_path / "messages"
    job = recording_job("seg_fedavg", tmp_path, messages)
    workspace = tmp_path / "ws"
    fedimaging("simulate", job, "--sites", *sites, "--workspace", workspace, "--rounds", 1)
    fedimaging("report", workspace, "--out", tmp_path / "report")
    received = sorted(messages.glob("*.bin"))
    tasks = {p.name.split("_")[1] for p in received}
    assert {"train", "validate", "submit"} <= tasks, tasks
    assert any("site-1" in p.name for p in received)
    assert hits(received) == []
    assert hits(every_file(workspace, tmp_path / "report")) == []


@pytest.mark.slow
def test_canary_pathology_federation_leaks_nothing(tmp_path):
    slide = canary_slide(tmp_path / "archive")
    assert hits([slide])
    keys = tmp_path / "keys"
    prepared = []
    for index, name in enumerate(["site-a", "site-b"]):
        source = tmp_path / f"kather_{name}"
        for class_folder in sorted(require(KATHER).iterdir()):
            if class_folder.is_dir():
                for tile in sorted(class_folder.iterdir())[index::2]:
                    (source / class_folder.name).mkdir(parents=True, exist_ok=True)
                    shutil.copy(tile, source / class_folder.name / tile.name)
        fedimaging("prepare", "wsi", source, "--out", tmp_path / f"p_{name}", "--assume-mpp", "0.495",
                   "--key-file", keys / name)
        prepared.append(site_yaml(tmp_path / f"{name}.yaml", name, tmp_path / f"p_{name}",
                                  {"tumour": {"local_classes": ["TUMOR"]}, "other": {"all_other_classes": True}}))
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    region = [[400, 600], [1500, 600], [1500, 1800], [400, 1800], [400, 600]]
    (annotations / f"{slide.stem}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [region]},
         "properties": {"classification": {"name": "Tumor"}}}]}))
    fedimaging("prepare", "wsi", slide.parent, "--annotations", annotations, "--background-class", "Other",
               "--out", tmp_path / "p_site-c", "--key-file", keys / "c")
    recorded = set(json.loads((tmp_path / "p_site-c" / IDENTIFIER_FILE_NAME).read_text())["digests"].values())
    assert {"slide_property", "file_name"} <= recorded
    prepared.append(site_yaml(tmp_path / "site-c.yaml", "site-c", tmp_path / "p_site-c",
                              {"tumour": {"local_classes": ["Tumor"]}, "other": {"local_classes": ["Other"]}}))
    messages = tmp_path / "messages"
    job = recording_job("cls_fedavg", tmp_path, messages)
    workspace = tmp_path / "ws"
    fedimaging("simulate", job, "--sites", *prepared, "--workspace", workspace, "--rounds", 1)
    fedimaging("report", workspace, "--out", tmp_path / "report")
    received = sorted(messages.glob("*.bin"))
    assert any("site-c" in p.name for p in received)
    assert hits(received) == []
    assert hits(every_file(workspace, tmp_path / "report")) == []


LEAKY_CLIENT = '''
import nvflare.client as flare

flare.init()
while flare.is_running():
    incoming = flare.receive()
    note = "follow-up for CANARYFIRST CANARYLAST" if flare.get_site_name() == "site-1" else "all fine"
    flare.send(flare.FLModel(params=incoming.params, metrics={"dice_mean": 0.0, "note": note},
                             meta={"NUM_STEPS_CURRENT_ROUND": 1}))
'''


@pytest.mark.slow
def test_guard_blocks_a_job_that_sends_an_identifier(segmentation_sites, tmp_path):
    root, sites = segmentation_sites
    messages = tmp_path / "messages"
    spec = json.loads((SPECS / "seg_fedavg.json").read_text())
    job = recording_job("seg_fedavg", tmp_path, messages, spec=spec)
    (job / "app" / "custom" / "seg_client.py").write_text(LEAKY_CLIENT)
    workspace = tmp_path / "ws"
    run = fedimaging("simulate", job, "--sites", *sites, "--workspace", workspace, "--rounds", 1, check=False,
                     timeout=900)
    # simulate reports the block instead of a completed job.
    assert run.returncode != 0
    assert "PHI guard blocked results at site-1" in run.stderr
    site_logs = "\n".join(p.read_text(errors="replace") for p in (workspace / "sim" / "site-1").rglob("log.txt"))
    site_logs += (workspace / "simulator.log").read_text(errors="replace") if (workspace / "simulator.log").exists() else ""
    assert "PHI guard blocked the result of task 'train'" in site_logs
    assert "matches a recorded patient_name identifier" in site_logs
    # The server got an error code in place of site-1's result (the round may go on with the others).
    assert "TASK_RESULT_FILTER_ERROR" in site_logs
    received = sorted(messages.glob("*.bin"))
    assert received, "the server recorded no message at all"
    assert hits(received) == []
