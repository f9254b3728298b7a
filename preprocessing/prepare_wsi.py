"""``fedimaging prepare wsi``: tile whole-slide images at one physical resolution, on tissue only.

Tiles are described by coordinates (level-0 top-left corner, level, region size in level pixels) and
read lazily during training; image files are written only with ``export_tiles``. SOURCE is only read.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from preprocessing import __version__
from preprocessing.inputs import InputError, check_source_and_out, walk_files
from preprocessing.output import DATALIST_NAME, MANIFEST_NAME, split_by_patient, write_json
from preprocessing.progress import progress_iter
from preprocessing.pseudonym import Pseudonymizer, default_key_file, load_or_create_key
from fedimaging_app.phi_tokens import IdentifierList
from preprocessing.reasons import Reason, Rejection
from preprocessing.wsi.annotations import LabelFileError, find_annotation, read_slide_labels
from preprocessing.wsi.slide_prep import SlideJob, SlideResult, process_slide
from preprocessing.wsi.tiles_folder import find_tile_folders, load_tile

logger = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")
TILE_CSV_COLUMNS = ["x0", "y0", "level", "width", "height", "tile_size", "mpp_x", "mpp_y", "class_name", "tissue_fraction"]
MANIFEST_NOTICE = (
    "Site-local file: it names slide files, which may contain accession numbers. Never send it to the "
    "server or to other sites; datalist.json and the tile files use slide IDs only."
)


@dataclass
class WsiOptions:
    """Arguments of ``fedimaging prepare wsi``."""

    source: Path
    out: Path
    mpp: float = 0.5
    tile_size: int = 224
    labels: Path | None = None
    annotations: Path | None = None
    background_class: str | None = None
    assume_mpp: float | None = None
    tissue_threshold: float = 0.5
    site: str | None = None
    key_file: Path | None = None
    seed: int = 0
    val_fraction: float = 0.2
    workers: int = 1
    export_tiles: bool = False
    show_progress: bool = False


def _check(options: WsiOptions) -> None:
    check_source_and_out(options.source, options.out, options.val_fraction, MANIFEST_NAME)
    if not options.mpp > 0:
        raise InputError(f"--mpp {options.mpp}: must be a positive resolution in µm per pixel")
    if options.assume_mpp is not None and not options.assume_mpp > 0:
        raise InputError(f"--assume-mpp {options.assume_mpp}: must be a positive resolution in µm per pixel")
    if options.tile_size < 8:
        raise InputError(f"--tile-size {options.tile_size}: must be at least 8 pixels")
    if not 0.0 <= options.tissue_threshold <= 1.0:
        raise InputError(f"--tissue-threshold {options.tissue_threshold}: must be between 0 and 1")
    if options.workers < 1:
        raise InputError(f"--workers {options.workers}: must be at least 1")
    if options.annotations is not None and not options.annotations.is_dir():
        raise InputError(f"--annotations {options.annotations}: not a folder of GeoJSON files")
    if options.labels is not None and options.annotations is not None:
        raise InputError("--labels and --annotations cannot be combined; give slide-level labels or regions")


def _slide_identity(path: Path) -> str:
    """Return a content identity: OpenSlide's quickhash plus all properties, else a SHA-256 of the file.

    The quickhash covers pixel data only, so two files that differ only in metadata such as the
    resolution would otherwise share an identity.
    """
    import openslide

    try:
        with openslide.OpenSlide(str(path)) as slide:
            quickhash = slide.properties.get("openslide.quickhash-1")
            if quickhash:
                properties = "\n".join(f"{k}={v}" for k, v in sorted(slide.properties.items()))
                return f"quickhash:{quickhash}:{hashlib.sha256(properties.encode()).hexdigest()}"
    except (openslide.OpenSlideError, OSError):
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


# Suffixes used only by slide formats; ".tif" and ".dcm" are shared with ordinary images.
SLIDE_ONLY_SUFFIXES = (".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")


# Slide property names (after the vendor prefix, lower case) whose values identify a patient, a case or
# an institution; a birth date property is recorded as a date.
IDENTIFYING_PROPERTIES = frozenset({
    "filename", "user", "operator", "title", "label", "slidelabel", "barcode", "reference", "patient",
    "patientname", "patientid", "patient_id", "otherpatientids", "accession", "accessionnumber", "caseid",
    "case_id", "specimen", "specimenid", "institution", "institutionname", "artist", "documentname",
    "birthdate", "patientbirthdate", "dob",
})


def slide_identifiers(path: Path) -> list[tuple[str, str]]:
    """(kind, value) of the slide's identifying properties and of its file name, for the PHI guard."""
    found = [("file_name", path.stem)]
    try:
        import openslide

        with openslide.OpenSlide(str(path)) as slide:
            properties = dict(slide.properties)
    except Exception:  # unreadable slides are reported by the tiling step; the file name is still recorded
        return found
    for name, value in properties.items():
        short = name.rsplit(".", 1)[-1].lower()
        if short in IDENTIFYING_PROPERTIES and value:
            kind = "birth_date" if "birth" in short or short == "dob" else "slide_property"
            found.append((kind, str(value)))
    return found


def _is_detected_slide(path: Path) -> bool:
    """Return whether OpenSlide recognises the file, or its suffix belongs only to slide formats."""
    import openslide

    if path.suffix.lower() in SLIDE_ONLY_SUFFIXES:
        return True
    try:
        return openslide.OpenSlide.detect_format(str(path)) is not None
    except (openslide.OpenSlideError, OSError):
        return False


def _is_slide_candidate(path: Path) -> bool:
    import openslide

    if path.suffix.lower() in SLIDE_SUFFIXES:
        return True
    try:
        return openslide.OpenSlide.detect_format(str(path)) is not None
    except (openslide.OpenSlideError, OSError):
        return False


def _link_slide(out: Path, slide_id: str, source: Path) -> str:
    """Expose the slide under its ID in OUT/slides as a symbolic link; return the path relative to OUT."""
    # NOTE: MIRAX (.mrxs) keeps its data in a sibling folder that this link does not expose.
    link = out / "slides" / f"{slide_id}{source.suffix.lower()}"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(source.resolve(), link)
    return link.relative_to(out).as_posix()


def _write_tile_csv(path: Path, tiles: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=TILE_CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(tiles)


def _single_threaded_worker() -> None:
    """Start a slide worker with one torch thread, as torch's DataLoader workers do.

    The tile reader resizes with torch. A forked worker that entered the OpenMP thread pool its
    parent had already started would hang; with one thread torch never enters it. Parallelism comes
    from the worker processes instead.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _run_jobs(jobs: list[SlideJob], workers: int, show_progress: bool) -> list[SlideResult]:
    if workers == 1 or len(jobs) <= 1:
        return [process_slide(job) for job in progress_iter(jobs, "Tiling slides", show_progress)]
    with ProcessPoolExecutor(max_workers=workers, initializer=_single_threaded_worker) as pool:
        return list(progress_iter(list(pool.map(process_slide, jobs)), "Tiling slides", show_progress))


def _prepare_slides(options: WsiOptions, pseudonyms: Pseudonymizer, out: Path, report: dict,
                    identifiers: IdentifierList) -> tuple[list, dict]:
    source = options.source.resolve()
    base = source if source.is_dir() else source.parent
    slide_labels = {}
    if options.labels is not None:
        try:
            slide_labels = read_slide_labels(options.labels)
        except LabelFileError as exc:
            raise InputError(str(exc)) from exc

    jobs: list[SlideJob] = []
    patients: dict[str, str] = {}
    seen: dict[str, str] = {}
    used_labels: set[str] = set()
    for path in walk_files(source):
        rel = path.relative_to(base).as_posix()
        if not _is_slide_candidate(path):
            report["skipped"].append({"path": rel, "reason": Reason.NOT_A_SLIDE.value,
                                      "message": f"{path.name}: not a whole-slide image; skipped"})
            continue
        slide_id = "slide-" + pseudonyms.digest("slide", _slide_identity(path))[:16]
        for kind, value in slide_identifiers(path):
            identifiers.add(value, kind)
        if slide_id in seen:
            report["skipped"].append({"path": rel, "reason": Reason.DUPLICATE_INSTANCE.value,
                                      "message": f"{path.name}: same slide content as {seen[slide_id]}; ignored"})
            continue
        seen[slide_id] = rel
        slide_class, annotation, missing_label = None, None, None
        if options.labels is not None:
            label = slide_labels.get(path.name) or slide_labels.get(path.stem)
            if label is None:
                missing_label = f"{path.name}: no row in {options.labels.name}; add a 'slide,label' row for it"
            else:
                used_labels.add(label.slide)
                slide_class = label.class_name
                if label.patient:
                    patients[slide_id] = pseudonyms.patient_id(label.patient)
        if options.annotations is not None:
            annotation = find_annotation(options.annotations, path)
            if annotation is None and options.background_class is None:
                missing_label = (f"{path.name}: no {path.stem}.geojson in {options.annotations}; export its "
                                 "annotations from QuPath, or pass --background-class to label all its tissue")
            slide_class = None if annotation else options.background_class
        jobs.append(SlideJob(
            path=path, rel_path=rel, slide_id=slide_id, target_mpp=options.mpp, tile_size=options.tile_size,
            tissue_threshold=options.tissue_threshold, assume_mpp=options.assume_mpp, slide_class=slide_class,
            annotation_path=annotation, background_class=options.background_class,
            thumbnail_path=out / "thumbnails" / f"{slide_id}.png",
            export_dir=out / "tile_images" / slide_id if options.export_tiles else None,
            missing_label=missing_label,
        ))

    unmatched = sorted({entry.slide for entry in slide_labels.values()} - used_labels)
    for slide in unmatched:
        report["rejected"].append({"path": options.labels.name, "reason": Reason.LABEL_UNMATCHED.value, "message":
            f"{options.labels.name}: the row for '{slide}' matches no slide file in SOURCE; correct the file "
            "name in the row (with or without its extension) or add the slide to SOURCE"})

    items_by_group: dict[str, list[dict]] = {}
    for result in _run_jobs(jobs, options.workers, options.show_progress):
        job = result.job
        if result.reason is not None:
            report["rejected"].append({"path": job.rel_path, "reason": result.reason, "message": result.message})
            logger.warning("rejected %s: %s", job.slide_id, result.message)
            continue
        slide_path = _link_slide(out, job.slide_id, job.path)
        _write_tile_csv(out / "tiles" / f"{job.slide_id}.csv", result.tiles)
        report["slides"].append({"slide_id": job.slide_id, "source": job.rel_path, "image": slide_path,
                                 "thumbnail": f"thumbnails/{job.slide_id}.png", "tiles": f"tiles/{job.slide_id}.csv",
                                 "patient_id": patients.get(job.slide_id), "slide_class": job.slide_class,
                                 "annotation": job.annotation_path.name if job.annotation_path else None, **result.info})
        items = []
        for tile in result.tiles:
            item = {"image": slide_path, "slide_id": job.slide_id, "location": [tile["x0"], tile["y0"]],
                    "level": tile["level"], "size": [tile["width"], tile["height"]], "tile_size": tile["tile_size"],
                    "mpp": [tile["mpp_x"], tile["mpp_y"]], "class_name": tile["class_name"]}
            if "tile_image" in tile:
                item["tile_image"] = f"tile_images/{job.slide_id}/{tile['tile_image']}"
            items.append(item)
        items_by_group[job.slide_id] = items
    groups = {slide_id: patients.get(slide_id, slide_id) for slide_id in items_by_group}
    return [items_by_group, groups], {"split_unit": "patient" if patients else "slide"}


def _prepare_tiles(options: WsiOptions, classes: dict[str, list[Path]], pseudonyms: Pseudonymizer, out: Path,
                   report: dict, identifiers: IdentifierList) -> tuple[list, dict]:
    from PIL import Image

    base = options.source.resolve()
    items_by_group: dict[str, list[dict]] = {}
    all_files = [(class_name, path) for class_name, paths in classes.items() for path in paths]
    for class_name, path in progress_iter(all_files, "Reading tiles", options.show_progress):
        rel = path.resolve().relative_to(base).as_posix()
        identifiers.add(path.stem, "file_name")
        try:
            tile = load_tile(path, options.mpp, options.assume_mpp)
        except Rejection as rejection:
            report["rejected"].append({"path": rel, "reason": rejection.reason.value, "message": rejection.message})
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        tile_id = "tile-" + pseudonyms.digest("tile", digest)[:16]
        if tile_id in items_by_group:
            report["skipped"].append({"path": rel, "reason": Reason.DUPLICATE_INSTANCE.value,
                                      "message": f"{path.name}: same content as another tile; ignored"})
            continue
        image_path = f"tile_images/{tile_id}.png"
        (out / "tile_images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(tile.pixels).save(out / image_path)
        items_by_group[tile_id] = [{"image": image_path, "tile_id": tile_id, "mpp": [tile.mpp, tile.mpp],
                                    "tile_size": int(tile.pixels.shape[1]), "class_name": class_name}]
        report["tiles"].append({"tile_id": tile_id, "source": rel, "class_name": class_name, "mpp": tile.mpp,
                                "mpp_source": tile.mpp_source, "resampled": tile.resampled,
                                "shape": list(tile.pixels.shape)})
    groups = {tile_id: tile_id for tile_id in items_by_group}
    return [items_by_group, groups], {"split_unit": "tile (no patient information in a tile folder)"}


# Folders in OUT that the WSI step writes and fills again on every run.
GENERATED_FOLDERS = ("slides", "tiles", "thumbnails", "tile_images")


def _clear_previous_run(out: Path) -> None:
    """Remove the generated folders of an earlier WSI run in ``out``, so none of its files outlive it.

    Only a folder whose manifest is a fedimaging WSI manifest is touched, and only the folders listed
    in ``GENERATED_FOLDERS``: links, CSV files, thumbnails and exported tiles that the new run
    recreates from SOURCE. The PHI identifier list is kept and extended.
    """
    try:
        previous = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return
    if not isinstance(previous, dict) or "coordinates" not in previous or previous.get("mode") not in ("slides", "tiles"):
        return
    for name in GENERATED_FOLDERS:
        folder = out / name
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
    logger.info("replaced the outputs of an earlier run in %s", out)


def prepare_wsi(options: WsiOptions) -> dict:
    """Run the whole WSI step; return the manifest (also written to ``OUT/manifest.json``).

    Raises ``InputError`` for wrong arguments; problems with single slides or tiles go into the manifest.
    """
    _check(options)
    key = load_or_create_key(options.key_file or default_key_file(), options.out)
    pseudonyms = Pseudonymizer(key)
    out = options.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous_run(out)
    report: dict = {"slides": [], "tiles": [], "rejected": [], "skipped": []}
    identifiers = IdentifierList.load_or_new(out, key)

    tile_classes = find_tile_folders(options.source.resolve())
    slide_files = [p for p in walk_files(options.source.resolve()) if _is_detected_slide(p)]
    if tile_classes and not slide_files:
        (items_by_group, groups), split_info = _prepare_tiles(options, tile_classes, pseudonyms, out, report, identifiers)
        mode = "tiles"
    else:
        (items_by_group, groups), split_info = _prepare_slides(options, pseudonyms, out, report, identifiers)
        mode = "slides"

    split = split_by_patient(groups, options.val_fraction, options.seed)
    class_names = sorted({item["class_name"] for items in items_by_group.values() for item in items
                          if item["class_name"] is not None})
    datalist: dict = {"classes": class_names, "training": [], "validation": []}
    for group_id in sorted(items_by_group):
        for item in items_by_group[group_id]:
            if item["class_name"] is not None:
                item["label"] = class_names.index(item["class_name"])
            datalist[split[group_id]].append(item)
    write_json(out / DATALIST_NAME, datalist)
    identifiers.save(out, (options.key_file or default_key_file()).expanduser().resolve())

    tile_counts = Counter(item["class_name"] for items in items_by_group.values() for item in items)
    manifest = {
        "format_version": 1,
        "site_local": True,
        "notice": MANIFEST_NOTICE,
        "site": options.site,
        "fedimaging_version": __version__,
        "mode": mode,
        "options": {"mpp": options.mpp, "tile_size": options.tile_size, "tissue_threshold": options.tissue_threshold,
                    "assume_mpp": options.assume_mpp, "background_class": options.background_class,
                    "seed": options.seed, "val_fraction": options.val_fraction, "workers": options.workers,
                    "export_tiles": options.export_tiles, **split_info},
        "coordinates": "x0, y0: level-0 pixels of the tile's top-left corner; width, height: region read at "
                       "'level' in level pixels, resized to tile_size when they differ; outside the slide is white",
        "summary": {
            "slides": len(report["slides"]),
            "tiles": sum(len(items) for items in items_by_group.values()),
            # Tiles without a class (no --labels or --annotations) are counted as "unlabelled".
            "tiles_by_class": {("unlabelled" if k is None else str(k)): v
                               for k, v in sorted(tile_counts.items(), key=lambda kv: str(kv[0]))},
            "rejected_by_reason": dict(Counter(e["reason"] for e in report["rejected"])),
            "skipped_by_reason": dict(Counter(e["reason"] for e in report["skipped"])),
        },
        "slides": report["slides"],
        "tiles": report["tiles"],
        "rejected": report["rejected"],
        "skipped": report["skipped"],
    }
    for slide in report["slides"]:
        slide["split"] = split[slide["slide_id"]]
    write_json(out / MANIFEST_NAME, manifest)
    return manifest


def summary_line(manifest: dict) -> str:
    summary = manifest["summary"]
    by_reason = ", ".join(f"{r}: {n}" for r, n in sorted(summary["rejected_by_reason"].items())) or "none"
    skipped = ", ".join(f"{r}: {n}" for r, n in sorted(summary["skipped_by_reason"].items())) or "none"
    return (f"prepared {summary['slides']} slide(s), {summary['tiles']} tile(s) "
            f"({', '.join(f'{k}: {v}' for k, v in summary['tiles_by_class'].items()) or 'none'}); "
            f"rejected {sum(summary['rejected_by_reason'].values())} ({by_reason}); "
            f"skipped {sum(summary['skipped_by_reason'].values())} ({skipped})")
