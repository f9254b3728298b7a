"""``fedimaging prepare dicom``: turn an archive export into training-ready volumes.

SOURCE is only read. Every file ends up in exactly one place of the site-local manifest: a case,
an excluded series (localizers, derived images), a rejected file or series, or a skipped file.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import Counter
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from preprocessing import __version__
from preprocessing.dicom.grouping import (
    SeriesGroup,
    deduplicate,
    group_files,
    is_volumetric,
    orientation_conflicts,
)
from preprocessing.dicom.headers import SEG_STORAGE, DicomFile, read_header
from preprocessing.dicom.seg import seg_onto_grid
from preprocessing.dicom.volume import MIN_FILES_FOR_WORKERS, BuiltImage, build_image2d, build_volume
from preprocessing.inputs import (
    InputError,
    check_source_and_out,
    LabelInputs,
    LabelSource,
    collect_labels,
    label_source_for,
    mask_files,
    match_by_name,
    read_csv_list,
    walk_files,
)
from preprocessing.output import DATALIST_NAME, MANIFEST_NAME, split_by_patient, write_json, write_nifti, write_png
from preprocessing.progress import progress_iter
from preprocessing.pseudonym import Pseudonymizer, load_or_create_key
from fedimaging_app.phi_tokens import IdentifierList
from preprocessing.reasons import Reason, Rejection
from preprocessing.research import is_research_volume, load_research_volume, research_stem
from preprocessing.resample import resample_label_nearest

logger = logging.getLogger(__name__)

SKIP_REASONS = {Reason.NOT_DICOM, Reason.DICOMDIR, Reason.DUPLICATE_INSTANCE}
MANIFEST_NOTICE = (
    "Site-local file: it names source folders and files, which may contain identifiers. "
    "Never send it to the server or to other sites; datalist.json and the images use case IDs only."
)


@dataclass
class PrepareOptions:
    """Arguments of ``fedimaging prepare dicom``."""

    source: Path
    out: Path
    labels: Path | None = None
    site: str | None = None
    key_file: Path | None = None
    seed: int = 0
    val_fraction: float = 0.2
    include_localizers: bool = False
    include_derived: bool = False
    split_orientations: bool = False
    show_progress: bool = False
    # Processes that decode large compressed series, this one included; 1 decodes everything here.
    workers: int = 1


@dataclass
class Candidate:
    """A built image waiting for labels and an ID."""

    image: BuiltImage
    key: str
    source_rel: str
    source_paths: set[Path]
    identity: str | None
    patient: str | None


@dataclass
class Report:
    """Outcome of every input, written as ``manifest.json``."""

    cases: list[dict] = field(default_factory=list)
    excluded: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def add_problem(self, rel_path: str, rejection: Rejection, n_files: int = 1) -> None:
        entry = {"path": rel_path, "files": n_files, "reason": rejection.reason.value, "message": rejection.message}
        if rejection.reason in SKIP_REASONS:
            self.skipped.append(entry)
        else:
            self.rejected.append(entry)
            logger.warning("rejected %s: %s", rel_path, rejection.message)


def _relative(path: Path, base: Path) -> str:
    try:
        return PurePosixPath(path.resolve().relative_to(base.resolve())).as_posix()
    except ValueError:
        return path.name


def _source_roots(options: PrepareOptions, labels: LabelInputs) -> tuple[list[Path], Path]:
    """Return the files or folders to scan and the base folder for relative paths."""
    source = options.source.resolve()
    if source.is_file() and source.suffix.lower() == ".csv":
        pairs = read_csv_list(source)
        for image, label in pairs:
            if label is not None:
                labels.by_image_path[image] = label_source_for(label)
        return [image for image, _ in pairs], source.parent
    return [source], (source if source.is_dir() else source.parent)


def _scan(roots: list[Path], base: Path, report: Report, show_progress: bool):
    files = [f for root in roots for f in walk_files(root)]
    dicom_files: list[DicomFile] = []
    segs: list[DicomFile] = []
    research: list[Path] = []
    for path in progress_iter(files, "Reading headers", show_progress):
        rel = _relative(path, base)
        if is_research_volume(path):
            research.append(path)
            continue
        try:
            dicom_file = read_header(path, rel)
        except Rejection as rejection:
            report.add_problem(rel, rejection)
            continue
        (segs if dicom_file.sop_class_uid == SEG_STORAGE else dicom_files).append(dicom_file)
    return dicom_files, segs, research


def _group_key(group: SeriesGroup, base_name: str) -> str:
    parent = PurePosixPath(group.first.rel_path).parent
    if len(group.files) == 1 and group.first.number_of_frames == 1 and parent.as_posix() == ".":
        return PurePosixPath(group.first.rel_path).name.split(".")[0]
    return parent.name if parent.as_posix() != "." else base_name


def _group_folder(group: SeriesGroup) -> str:
    """Return the group's place in SOURCE: its file when it has one, else its folder(s)."""
    if len(group.files) == 1:
        return group.first.rel_path
    folders = sorted({str(PurePosixPath(f.rel_path).parent) for f in group.files})
    return folders[0] if len(folders) == 1 else ", ".join(folders)


def _build_dicom(groups: list[SeriesGroup], options: PrepareOptions, base: Path, report: Report) -> list[Candidate]:
    if options.workers > 1 and any(len(group.files) >= MIN_FILES_FOR_WORKERS for group in groups):
        with _decode_pool(options.workers) as decode_pool:
            return _build_groups(groups, options, base, report, decode_pool)
    return _build_groups(groups, options, base, report, None)


def _decode_pool(workers: int) -> ProcessPoolExecutor:
    """Start ``workers - 1`` processes that decode compressed series next to this one, forked where possible.

    Forked workers start in milliseconds because pydicom and its decoders are already imported.
    """
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    return ProcessPoolExecutor(max_workers=workers - 1, mp_context=context)


def _build_groups(groups: list[SeriesGroup], options: PrepareOptions, base: Path, report: Report,
                  decode_pool: Executor | None) -> list[Candidate]:
    candidates = []
    conflicts = set() if options.split_orientations else orientation_conflicts(groups)
    for index, group in enumerate(progress_iter(groups, "Building volumes", options.show_progress)):
        folder = _group_folder(group)
        try:
            if group.first.is_mosaic:
                raise Rejection(
                    Reason.SIEMENS_MOSAIC,
                    f"{group.label}: Siemens MOSAIC images pack the slices of a volume into one frame, which is not "
                    "unpacked here; convert the series with dcm2niix and prepare the NIfTI output",
                )
            exclusion = group.exclusion(options.include_localizers, options.include_derived)
            if exclusion is not None:
                what = "localizer" if exclusion is Reason.LOCALIZER else "derived or secondary images"
                option = "--include-localizers" if exclusion is Reason.LOCALIZER else "--include-derived"
                image_type = "\\".join(group.first.image_type)
                report.excluded.append({
                    "path": folder, "files": len(group.files), "reason": exclusion.value,
                    "message": f"{group.label}: {what} (ImageType {image_type}) left out "
                               f"of training; pass {option} to prepare them",
                })
                continue
            if index in conflicts:
                raise Rejection(
                    Reason.INCONSISTENT_SLICES,
                    f"{group.label}: the series holds images of different ImageOrientationPatient, so it is not one "
                    "stack; export each stack as its own series or pass "
                    "--split-orientations to prepare each orientation separately",
                )
            if is_volumetric(group):
                built = [build_volume(group, decode_pool, options.workers)]
            elif group.n_frames > len(group.files):
                raise Rejection(
                    Reason.MULTIFRAME_CINE,
                    f"{group.label}: multi-frame image without per-frame positions (cine loop or 2D+time); "
                    "only single 2D frames and 3D volumes are prepared",
                )
            else:
                built = [build_image2d(f) for f in group.files]
        except Rejection as rejection:
            report.add_problem(folder, rejection, len(group.files))
            continue
        for image in built:
            first = image.files[0]
            candidates.append(Candidate(
                image=image,
                key=_group_key(group, base.name) if len(built) == 1 else PurePosixPath(first.rel_path).name.split(".")[0],
                source_rel=folder if len(built) == 1 else first.rel_path,
                source_paths={f.path.resolve() for f in image.files} | {f.path.resolve().parent for f in image.files},
                identity=f"uid:{first.series_uid}:{first.sop_instance_uid if image.kind == 'image2d' else ''}"
                if first.series_uid else None,
                patient=first.patient_id or first.study_uid,
            ))
    return candidates


def _build_research(paths: list[Path], base: Path, report: Report) -> list[Candidate]:
    candidates = []
    for path in paths:
        rel = _relative(path, base)
        try:
            array, affine = load_research_volume(path)
        except Rejection as rejection:
            report.add_problem(rel, rejection)
            continue
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        spacing = [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)]
        image = BuiltImage(
            kind="volume", array=array, affine_lps=affine, spacing_mm=spacing,
            spacing_source={"in_plane": "file header", "slice": "file header"},
            modality=None, files=[], intensity={"colour": False, "rescale": "as stored in the file"},
        )
        candidates.append(Candidate(image, research_stem(path), rel, {path.resolve()}, None, None))
    return candidates


def _label_dtype(values: np.ndarray) -> np.dtype:
    high, low = int(values.max(initial=0)), int(values.min(initial=0))
    if low >= 0 and high < 256:
        return np.dtype(np.uint8)
    if low >= 0 and high < 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _load_label(path: Path, image: BuiltImage) -> tuple[np.ndarray, float]:
    array, affine = load_research_volume(path, Reason.LABEL_UNREADABLE)
    if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
        raise Rejection(Reason.LABEL_UNREADABLE, f"{path.name}: label values are not integers; expected a label map")
    array = array.astype(_label_dtype(array))
    resampled, inside = resample_label_nearest(array, affine, image.array.shape, image.affine_lps)
    if inside == 0.0:
        raise Rejection(
            Reason.LABEL_OUTSIDE_IMAGE,
            f"{path.name}: label volume does not overlap the image in patient space; check that it belongs to this image",
        )
    return resampled, inside


def _attach_labels(candidate: Candidate, labels: LabelInputs, single_image: bool, segs: list[DicomFile],
                   used: set[str], report: Report) -> dict:
    """Find and load the labels of one candidate; return the manifest's label fields and arrays.

    ``used`` collects the SEG files (relative paths) and label files (resolved paths) consumed.
    """
    image = candidate.image
    result: dict = {"label_map": None, "masks": {}, "label_source": None, "segment_names": None}
    if image.kind != "volume":
        return result
    for seg in segs:
        if image.series_uid and image.series_uid in seg.referenced_series_uids:
            try:
                seg_labels = seg_onto_grid(seg, image.array.shape, image.affine_lps)
            except Rejection as rejection:
                report.add_problem(seg.rel_path, rejection)
                used.add(seg.rel_path)
                continue
            used.add(seg.rel_path)
            result["segment_names"] = {str(k): v for k, v in seg_labels.segment_names.items()}
            result["label_source"] = f"DICOM SEG {seg.rel_path}"
            if seg_labels.label_map is not None:
                result["label_map"] = seg_labels.label_map
            else:
                result["masks"] = seg_labels.masks
            return result

    source: LabelSource | None = None
    for path in candidate.source_paths:
        source = source or labels.by_image_path.get(path)
    named = match_by_name(candidate.key, labels)
    if source is None and named is not None and named.path.resolve() not in candidate.source_paths:
        source = named
    if source is None and single_image:
        source = labels.single
    if source is None:
        return result
    try:
        used.add(str(source.path.resolve()))
        if source.is_mask_folder:
            for mask_path in mask_files(source.path, candidate.source_paths):
                used.add(str(mask_path.resolve()))
                mask, _ = _load_label(mask_path, image)
                result["masks"][research_stem(mask_path)] = mask
            result["label_source"] = f"mask folder {source.path.name}"
        else:
            result["label_map"], _ = _load_label(source.path, image)
            result["label_source"] = f"label file {source.path.name}"
    except Rejection as rejection:
        report.add_problem(source.path.name, rejection)
    return result


def _write_case(case_id: str, candidate: Candidate, labels: dict, out: Path) -> dict:
    image = candidate.image
    entry: dict = {"case_id": case_id}
    if image.kind == "image2d" and image.array.ndim == 3 and image.array.dtype == np.uint8:
        entry["image"] = f"images/{case_id}.png"
        write_png(out / entry["image"], image.array)
    else:
        entry["image"] = f"images/{case_id}.nii.gz"
        array = image.array
        if image.kind == "image2d" and array.ndim == 3:
            # Colour above 8 bits: (x, y, 1, channel), the layout of colour volumes, never (x, y, 3),
            # which would read as a three-slice volume.
            array = array[:, :, np.newaxis, :]
        write_nifti(out / entry["image"], array, image.affine_lps)
    values: list[int] = []
    if labels["label_map"] is not None:
        entry["label"] = f"labels/{case_id}.nii.gz"
        write_nifti(out / entry["label"], labels["label_map"], image.affine_lps)
        values = [int(v) for v in np.unique(labels["label_map"])]
    if labels["masks"]:
        entry["masks"] = {}
        for name, mask in labels["masks"].items():
            entry["masks"][name] = f"labels/{case_id}/{name}.nii.gz"
            write_nifti(out / entry["masks"][name], mask, image.affine_lps)
    entry["label_values"] = values
    return entry


def prepare_dicom(options: PrepareOptions) -> dict:
    """Run the whole step and return the manifest (also written to ``OUT/manifest.json``).

    Raises ``InputError`` for wrong arguments; every per-file problem goes into the manifest.
    """
    check_source_and_out(options.source, options.out, options.val_fraction, MANIFEST_NAME)
    if options.workers < 1:
        raise InputError(f"--workers {options.workers}: must be at least 1")
    from preprocessing.pseudonym import default_key_file

    key = load_or_create_key(options.key_file or default_key_file(), options.out)
    pseudonyms = Pseudonymizer(key)
    labels = collect_labels(options.labels.resolve() if options.labels else None)
    roots, base = _source_roots(options, labels)
    report = Report()

    dicom_files, segs, research = _scan(roots, base, report, options.show_progress)
    label_segs = []
    for path in labels.seg_paths:
        try:
            seg = read_header(path, path.name)
        except Rejection as rejection:
            if rejection.reason is not Reason.NOT_DICOM:
                report.add_problem(path.name, rejection)
            continue
        if seg.sop_class_uid == SEG_STORAGE:
            label_segs.append(seg)
    segs = segs + label_segs
    identifiers = IdentifierList.load_or_new(options.out, key)
    for dicom_file in dicom_files + segs:
        for kind, value in dicom_file.identifiers:
            identifiers.add(value, kind)
    dicom_files, duplicates = deduplicate(dicom_files)
    for duplicate in duplicates:
        report.add_problem(duplicate.rel_path, Rejection(
            Reason.DUPLICATE_INSTANCE, f"{duplicate.rel_path}: second copy of an instance already read; ignored"))

    candidates = _build_dicom(group_files(dicom_files), options, base, report)
    candidates += _build_research(research, base, report)

    out = options.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    patient_of_case: dict[str, str] = {}
    entries: dict[str, dict] = {}
    for candidate in progress_iter(candidates, "Writing cases", options.show_progress):
        identity = candidate.identity or f"content:{candidate.image.content_digest()}"
        case_id = pseudonyms.case_id(identity)
        if case_id in entries:  # the same image reached twice, e.g. listed twice in a CSV
            continue
        attached = _attach_labels(candidate, labels, len(candidates) == 1, segs, used, report)
        entry = _write_case(case_id, candidate, attached, out)
        patient_of_case[case_id] = pseudonyms.patient_id(candidate.patient or identity)
        image = candidate.image
        entries[case_id] = entry
        report.cases.append({
            "case_id": case_id,
            "patient_id": patient_of_case[case_id],
            "kind": image.kind,
            "modality": image.modality,
            "shape": list(image.array.shape),
            "dtype": str(image.array.dtype),
            "spacing_mm": image.spacing_mm,
            "spacing_source": image.spacing_source,
            "intensity": image.intensity,
            "num_source_files": len(image.files) or 1,
            "source": candidate.source_rel,
            "image": entry["image"],
            "label": entry.get("label"),
            "masks": entry.get("masks"),
            "label_source": attached["label_source"],
            "label_values": entry["label_values"],
            "segment_names": attached["segment_names"],
            "notes": image.notes,
        })
    image_paths = {str(p) for candidate in candidates for p in candidate.source_paths}
    for source in list(labels.by_key.values()) + list(labels.by_image_path.values()):
        resolved = str(source.path.resolve())
        if resolved not in used and resolved not in image_paths and not source.is_mask_folder:
            report.add_problem(source.path.name, Rejection(
                Reason.LABEL_UNMATCHED,
                f"{source.path.name}: label file matches no prepared image; name it after the image's folder or "
                "file (for example <name>_seg.nii.gz) or list the pair in a CSV with image,label columns"))
    for seg in segs:
        if seg.rel_path not in used:
            report.add_problem(seg.rel_path, Rejection(
                Reason.SEG_UNRESOLVED,
                f"{seg.rel_path}: DICOM SEG references series that are not among the prepared images; "
                "put the referenced series in SOURCE"))

    split = split_by_patient(patient_of_case, options.val_fraction, options.seed)
    datalist: dict[str, list] = {"training": [], "validation": []}
    for case in report.cases:
        case["split"] = split[case["case_id"]]
        item = {"case_id": case["case_id"], "image": case["image"]}
        for field_name in ("label", "masks"):
            if case[field_name]:
                item[field_name] = case[field_name]
        datalist[case["split"]].append(item)
    write_json(out / DATALIST_NAME, datalist)
    identifiers.save(out, (options.key_file or default_key_file()).expanduser().resolve())

    manifest = {
        "format_version": 1,
        "site_local": True,
        "notice": MANIFEST_NOTICE,
        "site": options.site,
        "fedimaging_version": __version__,
        "options": {
            "seed": options.seed, "val_fraction": options.val_fraction,
            "include_localizers": options.include_localizers, "include_derived": options.include_derived,
            "split_orientations": options.split_orientations,
        },
        "summary": summarize(report),
        "phi_identifiers_recorded": len(identifiers),
        "cases": report.cases,
        "excluded": report.excluded,
        "rejected": report.rejected,
        "skipped": report.skipped,
    }
    write_json(out / MANIFEST_NAME, manifest)
    return manifest


def summarize(report: Report) -> dict:
    kinds = Counter(case["kind"] for case in report.cases)
    return {
        "volumes": kinds.get("volume", 0),
        "images_2d": kinds.get("image2d", 0),
        "excluded_by_reason": dict(Counter(e["reason"] for e in report.excluded)),
        "rejected_by_reason": dict(Counter(e["reason"] for e in report.rejected)),
        "skipped_by_reason": dict(Counter(e["reason"] for e in report.skipped)),
    }


def summary_line(manifest: dict) -> str:
    summary = manifest["summary"]
    def counts(by_reason: dict) -> str:
        return ", ".join(f"{reason}: {n}" for reason, n in sorted(by_reason.items())) or "none"
    return (
        f"wrote {summary['volumes']} volume(s) and {summary['images_2d']} 2D image(s); "
        f"rejected {sum(summary['rejected_by_reason'].values())} ({counts(summary['rejected_by_reason'])}); "
        f"excluded {sum(summary['excluded_by_reason'].values())} ({counts(summary['excluded_by_reason'])}); "
        f"skipped {sum(summary['skipped_by_reason'].values())} ({counts(summary['skipped_by_reason'])})"
    )
