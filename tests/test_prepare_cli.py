"""Batch rules, exit codes, privacy and the patient-level split of ``fedimaging prepare dicom``."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.conftest import CASES, require

SERIES = CASES / "01-slice-order" / "a_reversed_instance"
IDENTIFIERS = ["DOE^JANE", "MRN-4711-0815", "ACC-99887766", "19580317", "St Example Hospital"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedimaging", *args], capture_output=True, text=True, timeout=300, check=False
    )


def write_series(folder: Path, patient_id: str, patient_name: str = "DOE^JANE") -> None:
    """Copy the six-slice case series into ``folder`` as a new series of another patient."""
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    for path in sorted(require(SERIES).iterdir()):
        dataset = pydicom.dcmread(path)
        dataset.PatientID = patient_id
        dataset.PatientName = patient_name
        dataset.AccessionNumber = "ACC-99887766"
        dataset.PatientBirthDate = "19580317"
        dataset.InstitutionName = "St Example Hospital"
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = generate_uid()
        dataset.save_as(folder / path.name)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_batch_survives_bad_files_and_source_untouched(tmp_path):
    source = tmp_path / "DOE^JANE MRN-4711-0815"
    write_series(source / "ct", "MRN-4711-0815")
    (source / "notes.txt").write_text("not an image")
    truncated = (CASES / "08-unreadable-pixels" / "b_truncated_series" / "ct_002.dcm").read_bytes()
    (source / "broken").mkdir()
    (source / "broken" / "cut.dcm").write_bytes(truncated)
    before = tree_digest(source)

    result = run_cli("prepare", "dicom", str(source), "--out", str(tmp_path / "out"),
                     "--key-file", str(tmp_path / "site.key"), "--site", "site-1")
    assert result.returncode == 0, result.stderr
    assert "wrote 1 volume(s)" in result.stdout
    assert "truncated_pixel_data: 1" in result.stdout
    assert "not_dicom: 1" in result.stdout
    assert tree_digest(source) == before

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["site"] == "site-1"
    assert manifest["site_local"] is True
    assert [entry["path"] for entry in manifest["rejected"]] == ["broken/cut.dcm"]


def test_exit_codes(tmp_path):
    missing = run_cli("prepare", "dicom", str(tmp_path / "absent"), "--out", str(tmp_path / "o1"))
    assert missing.returncode == 2
    assert "not found" in missing.stderr

    source = tmp_path / "src"
    source.mkdir()
    (source / "readme.txt").write_text("nothing to prepare")
    nothing = run_cli("prepare", "dicom", str(source), "--out", str(tmp_path / "o2"), "--key-file", str(tmp_path / "k"))
    assert nothing.returncode == 1
    assert "no usable image" in nothing.stderr

    inside = run_cli("prepare", "dicom", str(source), "--out", str(source / "out"), "--key-file", str(tmp_path / "k"))
    assert inside.returncode == 2
    assert "SOURCE is never written to" in inside.stderr

    key_in_out = run_cli("prepare", "dicom", str(SERIES), "--out", str(tmp_path / "o3"),
                         "--key-file", str(tmp_path / "o3" / "site.key"))
    assert key_in_out.returncode == 2
    assert "outside" in key_in_out.stderr

    binary_key = tmp_path / "binary.key"
    binary_key.write_bytes(bytes(range(200, 232)))  # raw bytes, not the hex line fedimaging writes
    wrong_key = run_cli("prepare", "dicom", str(SERIES), "--out", str(tmp_path / "o4"), "--key-file", str(binary_key))
    assert wrong_key.returncode == 2
    assert f"key file {binary_key} does not contain a hex key" in wrong_key.stderr
    assert "Traceback" not in wrong_key.stderr
    assert binary_key.read_bytes() == bytes(range(200, 232))


def test_no_identifier_leaves_in_outputs(tmp_path, prepare):
    source = tmp_path / "DOE^JANE"
    write_series(source / "MRN-4711-0815", "MRN-4711-0815")
    manifest, out = prepare(source)
    (case,) = manifest["cases"]
    assert case["case_id"].startswith("case-")

    shared_files = [out / "datalist.json"] + [p for p in out.rglob("*.nii.gz")]
    for path in shared_files:
        content = path.read_bytes()
        if path.suffix == ".gz":
            import gzip

            content = gzip.decompress(content)
        for identifier in IDENTIFIERS + [str(pydicom.dcmread(next((source / "MRN-4711-0815").iterdir())).SeriesInstanceUID)]:
            assert identifier.encode() not in content, f"{identifier} found in {path.name}"
    datalist = (out / "datalist.json").read_text()
    assert "DOE" not in datalist and "MRN" not in datalist


def test_case_ids_keyed_and_stable(tmp_path):
    from preprocessing.prepare_dicom import PrepareOptions, prepare_dicom

    def case_ids(out: str, key: str) -> list[str]:
        manifest = prepare_dicom(PrepareOptions(source=SERIES, out=tmp_path / out, key_file=tmp_path / key))
        return [c["case_id"] for c in manifest["cases"]]

    first = case_ids("a", "key1")
    assert case_ids("b", "key1") == first
    assert case_ids("c", "key2") != first
    mode = stat.S_IMODE(os.stat(tmp_path / "key1").st_mode)
    assert mode == 0o600


def test_split_keeps_patients_together(tmp_path, prepare):
    source = tmp_path / "archive"
    for patient in range(6):
        for series in range(2):
            write_series(source / f"p{patient}" / f"s{series}", f"PATIENT-{patient}")
    manifest, out = prepare(source, seed=3, val_fraction=0.34)
    assert len(manifest["cases"]) == 12
    sides_by_patient: dict[str, set] = {}
    for case in manifest["cases"]:
        sides_by_patient.setdefault(case["patient_id"], set()).add(case["split"])
    assert all(len(sides) == 1 for sides in sides_by_patient.values())
    datalist = json.loads((out / "datalist.json").read_text())
    assert len(datalist["validation"]) == 4  # 2 of 6 patients, 2 series each
    assert all(not Path(item["image"]).is_absolute() for item in datalist["training"])

    again, _ = prepare(source, seed=3, val_fraction=0.34)
    assert [c["split"] for c in again["cases"]] == [c["split"] for c in manifest["cases"]]
    other, _ = prepare(source, seed=4, val_fraction=0.34)
    assert {c["case_id"] for c in other["cases"]} == {c["case_id"] for c in manifest["cases"]}


def test_prepared_volume_loads_in_monai(prepare):
    from monai.transforms import LoadImaged

    manifest, out = prepare(SERIES)
    datalist = json.loads((out / "datalist.json").read_text())
    item = (datalist["training"] + datalist["validation"])[0]
    loaded = LoadImaged(keys="image", image_only=True)({"image": str(out / item["image"])})
    assert tuple(loaded["image"].shape) == (16, 16, 6)


def test_invalid_fraction_rejected(tmp_path):
    result = run_cli("prepare", "dicom", str(SERIES), "--out", str(tmp_path / "o"), "--val-fraction", "1.5",
                     "--key-file", str(tmp_path / "k"))
    assert result.returncode == 2
    assert "--val-fraction 1.5" in result.stderr


def test_rejections_printed_then_counted(capsys):
    from fedimaging.cli import SHOWN_REJECTIONS, _print_rejections

    rejected = [{"reason": "unreadable_file", "message": f"scan-{n}.dcm: not a DICOM file; remove it"} for n in range(12)]
    _print_rejections({"rejected": rejected})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == SHOWN_REJECTIONS + 1
    assert lines[0] == "  rejected (unreadable_file): scan-0.dcm: not a DICOM file; remove it"
    assert lines[-1] == "  ... and 2 more rejections, all listed in the manifest"
