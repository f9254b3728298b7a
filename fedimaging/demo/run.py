"""``fedimaging demo``: generate a small federation, then run the real site and server steps on it.

Every step is the product's own: ``prepare dicom`` and ``prepare wsi`` at each site, the segmentation
and classification jobs in the NVFlare simulator with cross-site validation, and the report.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SEG_JOB, CLS_JOB = "demo_seg", "cls_fedavg"


@dataclass(frozen=True)
class DemoSize:
    """Size of the generated federation and length of the jobs' training."""

    cases_per_site: int
    slides_per_site: int
    slide_size: tuple[int, int]
    seg_rounds: int
    cls_rounds: int


DEFAULT = DemoSize(cases_per_site=4, slides_per_site=2, slide_size=(4096, 3072), seg_rounds=4, cls_rounds=3)
FAST = DemoSize(cases_per_site=2, slides_per_site=1, slide_size=(2048, 1536), seg_rounds=2, cls_rounds=2)


class DemoError(RuntimeError):
    """A demo step failed; the message names the step and where its output is."""


def _write_site(path: Path, name: str, data_dir: Path, mapping: dict) -> Path:
    lines = [f"site_name: {name}", f"data_dir: {data_dir}", "label_mapping:"]
    lines += [f"  {cls}: {json.dumps(source)}" for cls, source in mapping.items()]
    lines += ["device: auto", "torch_threads: 1"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _step(name: str, started: float) -> None:
    logger.info("%s done after %.0f s", name, time.monotonic() - started)
    print(f"[{time.monotonic() - started:6.0f} s] {name}", flush=True)


def _jobs_folder(workspace: Path) -> Path:
    """Return the demo's job folders: the committed ones when present, else built from the specs."""
    committed = REPO / "jobs"
    if (committed / SEG_JOB / "meta.json").is_file() and (committed / CLS_JOB / "meta.json").is_file():
        return committed
    from jobs.build import export_job

    target = workspace / "jobs"
    for name in (SEG_JOB, CLS_JOB):
        export_job(name, target)
    return target


def run_demo(workspace: Path, n_sites: int = 3, fast: bool = False, seed: int = 0) -> dict:
    """Run the whole demo in ``workspace``; return the paths of the reports."""
    from fedimaging.demo.pathology import generate_pathology_site
    from fedimaging.demo.radiology import LABELS, generate_radiology_site
    from fedimaging.report.writer import write_report
    from fedimaging.simulate import SimulationError, simulate
    from preprocessing.prepare_dicom import PrepareOptions, prepare_dicom
    from preprocessing.prepare_wsi import WsiOptions, prepare_wsi

    size = FAST if fast else DEFAULT
    workspace = workspace.resolve()
    if workspace.exists() and any(workspace.iterdir()):
        raise DemoError(f"--workspace {workspace} is not empty; choose a new folder")
    started = time.monotonic()
    keys = workspace / "site_keys"  # in place of each hospital's own key location
    seg_sites, cls_sites = [], []
    for index in range(n_sites):
        site = f"site-{index + 1}"
        raw = workspace / "hospitals" / site
        generate_radiology_site(raw / "radiology", site_index=index, n_cases=size.cases_per_site, seed=seed + index)
        generate_pathology_site(raw / "pathology", site_index=index, n_slides=size.slides_per_site, seed=seed + index,
                                size=size.slide_size)
        prepared = workspace / "prepared" / site
        manifest = prepare_dicom(PrepareOptions(source=raw / "radiology" / "dicom", labels=raw / "radiology" / "labels",
                                                out=prepared / "radiology", site=site, key_file=keys / f"{site}.key",
                                                seed=seed))
        if not manifest["cases"] or manifest["rejected"]:
            raise DemoError(f"{site}: prepare dicom rejected generated data; see {prepared / 'radiology' / 'manifest.json'}")
        wsi = prepare_wsi(WsiOptions(source=raw / "pathology" / "slides", annotations=raw / "pathology" / "annotations",
                                     out=prepared / "pathology", site=site, key_file=keys / f"{site}.key", seed=seed))
        if not wsi["summary"]["tiles"]:
            raise DemoError(f"{site}: prepare wsi kept no tile; see {prepared / 'pathology' / 'manifest.json'}")
        seg_sites.append(_write_site(workspace / "site_configs" / f"{site}-seg.yaml", site, prepared / "radiology",
                                     {name: {"label_value": value} for name, value in LABELS.items()}))
        cls_sites.append(_write_site(workspace / "site_configs" / f"{site}-cls.yaml", site, prepared / "pathology",
                                     {"tumour": {"local_classes": ["Tumour"]}, "other": {"local_classes": ["Stroma"]}}))
        _step(f"{site}: generated and prepared {len(manifest['cases'])} CT series and {wsi['summary']['tiles']} tiles",
              started)

    jobs = _jobs_folder(workspace)
    reports = {}
    for task, job, sites, rounds in (("segmentation", SEG_JOB, seg_sites, size.seg_rounds),
                                     ("classification", CLS_JOB, cls_sites, size.cls_rounds)):
        run_dir = workspace / "runs" / task
        try:
            simulate(jobs / job, sites, run_dir, rounds=rounds, log_name="simulator.log")
        except SimulationError as exc:
            raise DemoError(f"{task} federation failed: {exc}") from exc
        report_dir = workspace / "reports" / task
        write_report(run_dir, report_dir)
        reports[task] = report_dir / "report.html"
        _step(f"{task} federation: {rounds} rounds, {n_sites} sites, report written", started)
    return reports
