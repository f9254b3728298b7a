"""Benchmark ``fedimaging prepare dicom`` against SimpleITK and MONAI on the same DICOM series.

Two inputs are measured in one run:

* ``totalseg``: a real 20-slice 512x512 CT series compressed with JPEG 2000 lossless
  (``--real-series``; skipped with a message when the folder is missing).
* ``synthetic``: a 512x512 CT series of ``--slices`` slices that this script writes with pydicom
  (Explicit VR Little Endian, int16 stored values, RescaleIntercept -1024) into a temporary folder
  and deletes afterwards.

For each input the script prints the median wall time, slices/s and MB/s (MB = 10**6 bytes of the
DICOM files on disk) of:

* fedimaging's whole ``prepare_dicom`` call into a fresh OUT folder, its read-and-build part
  without any file output (with the default single process and with ``--workers 2``), and its
  NIfTI writer alone on the built volume;
* SimpleITK's ImageSeriesReader, read only and read plus ``sitk.WriteImage`` to ``.nii.gz``. Its
  time includes listing and sorting the series with ``GetGDCMSeriesFileNames``, the step that a
  SimpleITK user needs before reading, as fedimaging's includes its header scan and grouping;
* MONAI's ``LoadImage`` with ``PydicomReader``. When PydicomReader fails on an input, ITKReader
  is measured instead and the output prints the error.

The files are read repeatedly, so after the warm-up round they come from the page cache: the
numbers measure decoding and conversion, not disk speed.

Run from the repository root::

    python benchmarks/bench_prepare_dicom.py [--repeats 3] [--json results.json] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import logging
import os
import platform
import pstats
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from preprocessing.prepare_dicom import PrepareOptions, prepare_dicom

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REAL_SERIES = REPO_ROOT.parent / "shared" / "data" / "radiology" / "totalseg" / "example_ct_dicom"
MEGABYTE = 1_000_000

# Labels of the measured methods, in the order they are printed.
FEDIMAGING_FULL = "fedimaging prepare_dicom (full step, writes .nii.gz)"
FEDIMAGING_NO_WRITE = "fedimaging read + build (no file output)"
FEDIMAGING_NO_WRITE_WORKERS = "fedimaging read + build, --workers 2"
FEDIMAGING_WRITE_ONLY = "fedimaging write_nifti only (.nii.gz, nibabel)"
SITK_READ = "SimpleITK ImageSeriesReader (read)"
SITK_READ_WRITE = "SimpleITK read + WriteImage (.nii.gz)"
SITK_WRITE_ONLY = "SimpleITK WriteImage only (.nii.gz)"
MONAI_PYDICOM = "MONAI LoadImage (PydicomReader)"
MONAI_ITK = "MONAI LoadImage (ITKReader; PydicomReader failed)"


@dataclass
class SeriesInput:
    """One DICOM series folder to benchmark."""

    name: str
    description: str
    folder: Path
    files: list[Path]

    @property
    def n_slices(self) -> int:
        return len(self.files)

    @property
    def n_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)


@dataclass
class Measurement:
    """Times of one method on one input; ``error`` is set when the method could not run.

    ``seconds`` contains wall times. ``user_seconds`` and ``system_seconds`` contain the CPU time
    of the whole process (all threads) and of the worker processes that ended, in user and kernel
    mode during the same runs.
    """

    method: str
    seconds: list[float] = field(default_factory=list)
    user_seconds: list[float] = field(default_factory=list)
    system_seconds: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


# ---------------------------------------------------------------------------------------------
# Machine description


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 2**30
    except (OSError, ValueError):
        pass
    return None


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def describe_machine() -> dict:
    """Collect the CPU, memory and library versions that the numbers depend on."""
    import monai

    memory = _memory_gib()
    return {
        "cpu_model": _cpu_model(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(memory, 1) if memory is not None else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pydicom": pydicom.__version__,
        "pylibjpeg-openjpeg": _package_version("pylibjpeg-openjpeg"),
        "nibabel": _package_version("nibabel"),
        "SimpleITK": sitk.Version_VersionString(),
        "simpleitk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
        "monai": monai.__version__,
        "fedimaging": _package_version("fedimaging"),
        # Other processes compete for the cores, so a 1-minute load average well above 0 at the
        # start means that the timings are likely inflated.
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
    }


# ---------------------------------------------------------------------------------------------
# Synthetic CT series


def _phantom_slice(z_fraction: float, rows: int, columns: int, spacing_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Return one axial slice of a body phantom in HU: air, soft tissue, two lungs, a spine, noise.

    ``z_fraction`` runs from 0 (feet end) to 1 (head end) and changes the body outline and whether
    the lungs are present, so slices differ as in a real scan.
    """
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
    x_mm = (x - columns / 2) * spacing_mm
    y_mm = (y - rows / 2) * spacing_mm
    half_width = 170 + 30 * np.sin(np.pi * z_fraction)
    half_depth = 110 + 20 * np.sin(np.pi * z_fraction)
    body = (x_mm / half_width) ** 2 + (y_mm / half_depth) ** 2 <= 1.0

    hu = np.full((rows, columns), -1000.0, dtype=np.float32)
    hu[body] = 40.0
    if 0.45 < z_fraction < 0.95:
        for side in (-1, 1):
            lung = ((x_mm - side * 75) / 55) ** 2 + ((y_mm + 5) / 75) ** 2 <= 1.0
            hu[lung] = -850.0
    spine = (x_mm / 18) ** 2 + ((y_mm - 70) / 18) ** 2 <= 1.0
    hu[spine] = 700.0
    hu += rng.normal(0.0, 15.0, size=hu.shape).astype(np.float32)
    return hu


def write_synthetic_series(folder: Path, n_slices: int, rows: int = 512, columns: int = 512) -> list[Path]:
    """Write a CT series of ``n_slices`` single-frame files and return their paths.

    Headers follow a typical axial CT: LPS positions 1 mm apart along +z, identity orientation,
    0.9765625 mm pixels, int16 stored values with RescaleSlope 1 and RescaleIntercept -1024.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240601)
    spacing_mm = 0.9765625
    thickness_mm = 1.0
    study_uid, series_uid, frame_of_reference_uid = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for index in range(n_slices):
        hu = _phantom_slice(index / max(1, n_slices - 1), rows, columns, spacing_mm, rng)
        stored = np.clip(np.round(hu + 1024.0), -32768, 32767).astype(np.int16)
        sop_instance_uid = generate_uid()

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_instance_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian

        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_instance_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240601"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber = "BENCH0001"
        ds.Modality = "CT"
        ds.Manufacturer = "fedimaging benchmark"
        ds.StudyDescription = "Synthetic CT for benchmarking"
        ds.SeriesDescription = "Body phantom 1.0 mm"
        ds.PatientName = "Benchmark^Phantom"
        ds.PatientID = "BENCH-PHANTOM-1"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = f"{thickness_mm:.1f}"
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [f"{-columns / 2 * spacing_mm:.4f}", f"{-rows / 2 * spacing_mm:.4f}",
                                   f"{-n_slices / 2 * thickness_mm + index * thickness_mm:.2f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = ds.ImagePositionPatient[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.PixelSpacing = [f"{spacing_mm}", f"{spacing_mm}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = stored.tobytes()

        path = folder / f"CT{index + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Methods under test. Each callable runs once on a series and returns what it built, so that the
# result can be checked and so that lazy work cannot be skipped.


class Scratch:
    """Fresh output folders under one temporary root, so that no run reuses another run's output."""

    def __init__(self, root: Path):
        self.root = root
        self._counter = 0

    def new_folder(self, stem: str) -> Path:
        self._counter += 1
        folder = self.root / f"{stem}-{self._counter}"
        folder.mkdir(parents=True)
        return folder


def run_fedimaging_full(series: SeriesInput, scratch: Scratch, key_file: Path) -> dict:
    out = scratch.new_folder("fedimaging-out")
    manifest = prepare_dicom(PrepareOptions(source=series.folder, out=out, key_file=key_file, show_progress=False))
    if manifest["summary"]["volumes"] != 1:
        raise RuntimeError(f"expected 1 volume from {series.name}, the manifest summary is {manifest['summary']}")
    shutil.rmtree(out)
    return manifest


def run_fedimaging_no_write(series: SeriesInput, workers: int = 1):
    """Run the header scan, grouping, decoding and stacking of ``prepare_dicom`` without writing.

    NOTE: this calls the private helpers ``_scan`` and ``_build_dicom`` of
    preprocessing.prepare_dicom with their signatures at the time of writing. When they change,
    this row prints the error and the other rows are still measured.
    """
    from preprocessing.dicom.grouping import deduplicate, group_files
    from preprocessing.prepare_dicom import Report, _build_dicom, _scan

    options = PrepareOptions(source=series.folder, out=series.folder.parent / "unused", show_progress=False,
                             workers=workers)
    report = Report()
    dicom_files, _, _ = _scan([series.folder], series.folder, report, False)
    dicom_files, _ = deduplicate(dicom_files)
    candidates = _build_dicom(group_files(dicom_files), options, series.folder, report)
    if len(candidates) != 1:
        raise RuntimeError(f"expected 1 volume from {series.name}, got {len(candidates)}; rejected: {report.rejected}")
    return candidates[0].image


def run_fedimaging_write_only(image, scratch: Scratch) -> int:
    """Write the built volume with fedimaging's NIfTI writer and return the file size in bytes."""
    from preprocessing.output import write_nifti

    out = scratch.new_folder("fedimaging-write")
    write_nifti(out / "image.nii.gz", image.array, image.affine_lps)
    size = (out / "image.nii.gz").stat().st_size
    shutil.rmtree(out)
    return size


def read_with_sitk(series: SeriesInput) -> sitk.Image:
    file_names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series.folder))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(file_names)
    image = reader.Execute()
    # A view, not a copy: the baseline pays nothing for handing the voxels over as a NumPy array.
    sitk.GetArrayViewFromImage(image)
    return image


def write_with_sitk(image: sitk.Image, scratch: Scratch) -> int:
    """Write ``image`` with SimpleITK's default settings and return the file size in bytes."""
    out = scratch.new_folder("sitk-write")
    sitk.WriteImage(image, str(out / "image.nii.gz"))
    size = (out / "image.nii.gz").stat().st_size
    shutil.rmtree(out)
    return size


def run_sitk_read_write(series: SeriesInput, scratch: Scratch) -> None:
    write_with_sitk(read_with_sitk(series), scratch)


def read_with_monai(series: SeriesInput, reader: str):
    from monai.transforms import LoadImage

    return LoadImage(reader=reader, image_only=True)(str(series.folder))


# ---------------------------------------------------------------------------------------------
# Timing


def time_call(function: Callable[[], object], measurement: Measurement) -> object:
    """Run ``function`` once, append its wall and CPU times to ``measurement`` and return its result."""
    gc.collect()
    usage_before = _cpu_usage()
    start = time.perf_counter()
    result = function()
    measurement.seconds.append(time.perf_counter() - start)
    usage_after = _cpu_usage()
    measurement.user_seconds.append(usage_after[0] - usage_before[0])
    measurement.system_seconds.append(usage_after[1] - usage_before[1])
    return result


def _cpu_usage() -> tuple[float, float]:
    """User and system CPU seconds of this process and of its ended child processes (decode workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + children.ru_utime, own.ru_stime + children.ru_stime


def check_agreement(fedimaging_image, sitk_image: sitk.Image) -> str:
    """Compare fedimaging's volume with SimpleITK's voxel by voxel and describe the result."""
    expected = sitk.GetArrayViewFromImage(sitk_image).transpose(2, 1, 0)  # (x, y, z) like fedimaging
    actual = fedimaging_image.array
    if actual.shape != expected.shape:
        return f"shapes differ: fedimaging {actual.shape}, SimpleITK {expected.shape} (x, y, z)"
    if np.array_equal(actual, expected):
        return f"identical voxel values, shape {actual.shape} (x, y, z)"
    if np.array_equal(actual[:, :, ::-1], expected):
        return f"same voxel values in reversed slice order, shape {actual.shape}"
    difference = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    return f"voxel values differ: max |difference| {difference.max():g}, {np.count_nonzero(difference)} voxels"


def benchmark_series(series: SeriesInput, repeats: int, scratch: Scratch) -> tuple[list[Measurement], list[str]]:
    """Warm up every method once, then time ``repeats`` rounds in which the methods take turns."""
    key_file = scratch.root / f"{series.name}-pseudonym.key"
    notes: list[str] = []
    measurements = {label: Measurement(label) for label in (
        FEDIMAGING_FULL, FEDIMAGING_NO_WRITE, FEDIMAGING_NO_WRITE_WORKERS, FEDIMAGING_WRITE_ONLY,
        SITK_READ, SITK_READ_WRITE, SITK_WRITE_ONLY, MONAI_PYDICOM,
    )}

    def warm_up(label: str, function: Callable[[], object]) -> object:
        """Run ``function`` once untimed. On failure, mark the row as not measured and return None."""
        try:
            return function()
        except Exception as exc:  # a product or library error must not hide the other rows
            measurements[label].error = f"{exc.__class__.__name__}: {exc}"
            return None

    # The warm-up round fills the page cache and imports everything, and its results feed the
    # write-only rows and the agreement check.
    built_image = warm_up(FEDIMAGING_NO_WRITE, lambda: run_fedimaging_no_write(series))
    warm_up(FEDIMAGING_FULL, lambda: run_fedimaging_full(series, scratch, key_file))
    warm_up(FEDIMAGING_NO_WRITE_WORKERS, lambda: run_fedimaging_no_write(series, workers=2))
    sitk_image = warm_up(SITK_READ, lambda: read_with_sitk(series))
    if sitk_image is not None:
        sitk_size = warm_up(SITK_WRITE_ONLY, lambda: write_with_sitk(sitk_image, scratch))
        notes.append(f"SimpleITK volume: {sitk_image.GetPixelIDTypeAsString()}, .nii.gz {(sitk_size or 0) / MEGABYTE:.1f} MB")
    else:
        measurements[SITK_READ_WRITE].error = measurements[SITK_WRITE_ONLY].error = "SimpleITK read failed"
    if built_image is not None:
        fedimaging_size = warm_up(FEDIMAGING_WRITE_ONLY, lambda: run_fedimaging_write_only(built_image, scratch))
        notes.append(f"fedimaging volume: {built_image.array.dtype}, .nii.gz {(fedimaging_size or 0) / MEGABYTE:.1f} MB")
        if sitk_image is not None:
            notes.append(f"fedimaging vs SimpleITK voxels: {check_agreement(built_image, sitk_image)}")
    else:
        measurements[FEDIMAGING_WRITE_ONLY].error = "needs the read + build step, which failed"

    monai_reader = "PydicomReader"
    monai_volume = warm_up(MONAI_PYDICOM, lambda: read_with_monai(series, monai_reader))
    if monai_volume is None:
        notes.append(f"MONAI PydicomReader failed ({measurements[MONAI_PYDICOM].error}); measured ITKReader instead")
        monai_reader = "ITKReader"
        measurements[MONAI_ITK] = measurements.pop(MONAI_PYDICOM)
        measurements[MONAI_ITK].method = MONAI_ITK
        measurements[MONAI_ITK].error = None
        monai_volume = warm_up(MONAI_ITK, lambda: read_with_monai(series, monai_reader))
    if monai_volume is not None:
        notes.append(f"MONAI {monai_reader} returned shape {tuple(monai_volume.shape)}, dtype {monai_volume.dtype}")
    del monai_volume
    monai_label = MONAI_PYDICOM if monai_reader == "PydicomReader" else MONAI_ITK

    runs: list[tuple[str, Callable[[], object]]] = [
        (FEDIMAGING_FULL, lambda: run_fedimaging_full(series, scratch, key_file)),
        (FEDIMAGING_NO_WRITE, lambda: run_fedimaging_no_write(series)),
        (FEDIMAGING_NO_WRITE_WORKERS, lambda: run_fedimaging_no_write(series, workers=2)),
        (FEDIMAGING_WRITE_ONLY, lambda: run_fedimaging_write_only(built_image, scratch)),
        (SITK_READ, lambda: read_with_sitk(series)),
        (SITK_READ_WRITE, lambda: run_sitk_read_write(series, scratch)),
        (SITK_WRITE_ONLY, lambda: write_with_sitk(sitk_image, scratch)),
        (monai_label, lambda: read_with_monai(series, monai_reader)),
    ]
    for round_index in range(repeats):
        for label, function in runs:
            measurement = measurements[label]
            if measurement.error is not None:
                continue
            try:
                result = time_call(function, measurement)
            except Exception as exc:  # keep the runs measured so far and skip this method from now on
                measurement.error = f"{exc.__class__.__name__}: {exc}"
                continue
            del result
        print(f"  {series.name}: round {round_index + 1}/{repeats} done", file=sys.stderr, flush=True)
    return list(measurements.values()), notes


def profile_fedimaging(series: SeriesInput, scratch: Scratch, top: int = 15) -> str:
    """Profile one whole ``prepare_dicom`` call and return two listings.

    The first lists fedimaging's own functions by cumulative time, which shows the phases: header
    scan, decoding, conversion and writing. The second lists all functions by own time.
    """
    key_file = scratch.root / f"{series.name}-pseudonym.key"
    profiler = cProfile.Profile()
    profiler.enable()
    run_fedimaging_full(series, scratch, key_file)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(r"preprocessing[/\\]", top)
    stats.sort_stats("tottime").print_stats(top)
    return text.getvalue()


# ---------------------------------------------------------------------------------------------
# Report


# Comparisons printed as speed ratios. The target is met on an input when both like-for-like
# comparisons (the ones marked True) reach at least 1.0.
COMPARISONS = [
    ("full step vs SimpleITK read + WriteImage (both write .nii.gz)", FEDIMAGING_FULL, SITK_READ_WRITE, True),
    ("read + build vs SimpleITK read (both stop at an in-memory volume)", FEDIMAGING_NO_WRITE, SITK_READ, True),
    ("read + build with --workers 2 vs SimpleITK read", FEDIMAGING_NO_WRITE_WORKERS, SITK_READ, False),
    ("full step vs SimpleITK read only (strictest)", FEDIMAGING_FULL, SITK_READ, False),
    ("read + build vs SimpleITK read, by CPU time (user + sys)", FEDIMAGING_NO_WRITE, SITK_READ, False),
    ("NIfTI writer: write_nifti vs SimpleITK WriteImage", FEDIMAGING_WRITE_ONLY, SITK_WRITE_ONLY, False),
]


def _median_cpu(measurement: Measurement) -> float | None:
    if not measurement.user_seconds:
        return None
    return statistics.median(u + s for u, s in zip(measurement.user_seconds, measurement.system_seconds))


def comparisons(measurements: list[Measurement]) -> list[dict]:
    """Compute SimpleITK's median time over fedimaging's, so that above 1.0 fedimaging is faster.

    Comparisons named "by CPU time" use the process's user plus system time, which other jobs on
    the machine affect less than wall time; the others use wall time.
    """
    by_label = {m.method: m.median for m in measurements}
    cpu_by_label = {m.method: _median_cpu(m) for m in measurements}
    result = []
    for description, fedimaging_label, sitk_label, decides_target in COMPARISONS:
        times = cpu_by_label if "by CPU time" in description else by_label
        fedimaging_seconds, sitk_seconds = times.get(fedimaging_label), times.get(sitk_label)
        if fedimaging_seconds is None or sitk_seconds is None:
            continue
        result.append({
            "comparison": description, "ratio": sitk_seconds / fedimaging_seconds, "decides_target": decides_target,
        })
    return result


def target_verdict(ratios: list[dict]) -> str:
    deciding = [r for r in ratios if r["decides_target"]]
    if len(deciding) < sum(1 for c in COMPARISONS if c[3]):
        return "not decided: a like-for-like comparison could not be measured"
    return "met" if all(r["ratio"] >= 1.0 for r in deciding) else "not met"


def format_table(series: SeriesInput, measurements: list[Measurement]) -> str:
    """Format one row per method. Every column except min and max is computed from a median."""
    header = (f"{'method':<54} {'median s':>9} {'min s':>8} {'max s':>8} {'slices/s':>9} {'MB/s':>7} "
              f"{'user s':>7} {'sys s':>7}")
    lines = [header, "-" * len(header)]
    megabytes = series.n_bytes / MEGABYTE
    for measurement in measurements:
        median = measurement.median
        if median is None:
            lines.append(f"{measurement.method:<54} not measured: {measurement.error}")
            continue
        if measurement.error is not None:
            lines.append(f"{'':<54} a later run failed: {measurement.error}")
        lines.append(
            f"{measurement.method:<54} {median:>9.3f} {min(measurement.seconds):>8.3f} "
            f"{max(measurement.seconds):>8.3f} {series.n_slices / median:>9.1f} {megabytes / median:>7.1f} "
            f"{statistics.median(measurement.user_seconds):>7.2f} {statistics.median(measurement.system_seconds):>7.2f}"
        )
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per method and input after one warm-up run; the median is reported (default 3)")
    parser.add_argument("--slices", type=int, default=300, help="number of slices of the synthetic series (default 300)")
    parser.add_argument("--real-series", type=Path, default=DEFAULT_REAL_SERIES,
                        help=f"folder with one real DICOM series (default {DEFAULT_REAL_SERIES})")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write machine, inputs and timings as JSON to PATH")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one whole prepare_dicom call per input with cProfile and print the top functions")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be at least 1")
    if args.slices < 2:
        parser.error(f"--slices {args.slices}: must be at least 2 to form a volume")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    machine = describe_machine()
    print("Machine:")
    for key, value in machine.items():
        print(f"  {key}: {value}")

    report: dict = {"machine": machine, "repeats": args.repeats, "megabyte_bytes": MEGABYTE, "inputs": []}
    with tempfile.TemporaryDirectory(prefix="bench_prepare_dicom_") as temporary:
        scratch = Scratch(Path(temporary) / "scratch")
        inputs: list[SeriesInput] = []
        if args.real_series.is_dir():
            files = sorted(p for p in args.real_series.iterdir() if p.is_file() and not p.name.startswith("."))
            inputs.append(SeriesInput("totalseg", "real CT, JPEG 2000 lossless", args.real_series, files))
        else:
            print(f"\nReal series {args.real_series} not found; pass --real-series FOLDER. Measuring the synthetic series only.")
        print(f"\nWriting the synthetic {args.slices}-slice series ...", file=sys.stderr, flush=True)
        synthetic_folder = Path(temporary) / "synthetic_ct"
        start = time.perf_counter()
        synthetic_files = write_synthetic_series(synthetic_folder, args.slices)
        print(f"  written in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        inputs.append(SeriesInput("synthetic", "generated CT, Explicit VR Little Endian", synthetic_folder, synthetic_files))

        for series in inputs:
            transfer_syntax = pydicom.dcmread(series.files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
            print(f"\nMeasuring {series.name} ...", file=sys.stderr, flush=True)
            measurements, notes = benchmark_series(series, args.repeats, scratch)
            ratios = comparisons(measurements)
            print(f"\n== {series.name}: {series.description}; {series.n_slices} slices of "
                  f"{transfer_syntax.name}, {series.n_bytes / MEGABYTE:.1f} MB on disk; "
                  f"median of {args.repeats} runs after 1 warm-up ==")
            print(format_table(series, measurements))
            for note in notes:
                print(f"  {note}")
            print("  Speed ratio SimpleITK time / fedimaging time (at least 1.0 meets the target):")
            for ratio in ratios:
                print(f"    {ratio['comparison']}: {ratio['ratio']:.2f}")
            verdict = target_verdict(ratios)
            print(f"  Target (fedimaging at least as fast as SimpleITK in both like-for-like comparisons): {verdict}")
            full_step_ran = any(m.method == FEDIMAGING_FULL and m.error is None for m in measurements)
            profile_text = profile_fedimaging(series, scratch) if args.profile and full_step_ran else None
            if profile_text:
                print(f"\n  cProfile of one prepare_dicom call on {series.name}: fedimaging functions by "
                      "cumulative time, then all functions by own time")
                print(profile_text)
            report["inputs"].append({
                "name": series.name,
                "description": series.description,
                "transfer_syntax": str(transfer_syntax.name),
                "slices": series.n_slices,
                "bytes_on_disk": series.n_bytes,
                "results": [
                    {"method": m.method, "seconds": m.seconds, "median_s": m.median, "error": m.error,
                     "user_seconds": m.user_seconds, "system_seconds": m.system_seconds,
                     "slices_per_s": series.n_slices / m.median if m.median else None,
                     "mb_per_s": series.n_bytes / MEGABYTE / m.median if m.median else None}
                    for m in measurements
                ],
                "notes": notes,
                "speed_ratios": ratios,
                "target": verdict,
            })

    report["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(f"\nLoad average (1 min) at the end, including this benchmark: {report['load_average_1min_at_end']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
