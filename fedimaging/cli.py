"""The fedimaging command line: prepare site data, run and report federations, deploy."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fedimaging import __version__

logger = logging.getLogger("fedimaging")


def _key_file(option: Path | None) -> Path:
    from preprocessing.pseudonym import default_key_file

    return (option or default_key_file()).expanduser()


def _announce_new_key(key_file: Path, existed: bool) -> None:
    if not existed and key_file.exists():
        print(f"created the site's pseudonym key {key_file}; back it up and keep it at the site: "
              "without it, later runs give every case and patient a new ID")


def _add_prepare_dicom(subparsers) -> None:
    parser = subparsers.add_parser(
        "dicom",
        help="convert DICOM series and NIfTI/NRRD/MHA volumes into NIfTI volumes with a MONAI datalist",
        description="Convert an archive export (a folder, one file, or a CSV of image,label paths) into "
        "NIfTI volumes in patient space, label maps, datalist.json and a site-local manifest.json. "
        "SOURCE is only read.",
    )
    parser.add_argument("source", type=Path, metavar="SOURCE", help="folder, single file, or CSV with image,label columns")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT", help="output folder (new, empty, or a previous output)")
    parser.add_argument("--labels", type=Path, metavar="LABELS",
                        help="label file, DICOM SEG, folder of label files matched by name, or CSV with image,label")
    parser.add_argument("--site", metavar="NAME", help="site name recorded in the manifest (the NVFlare client name)")
    parser.add_argument("--key-file", type=Path, metavar="FILE",
                        help="site-local pseudonym key, created on first use "
                             "(default: $FEDIMAGING_KEY_FILE or ~/.config/fedimaging/pseudonym.key); keep it outside OUT")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient-level train/validation split (default 0)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="fraction of patients in the validation list (default 0.2)")
    parser.add_argument("--include-localizers", action="store_true", help="prepare localizer (scout) images too")
    parser.add_argument("--include-derived", action="store_true",
                        help="prepare derived and secondary images (ImageType DERIVED or SECONDARY) too")
    parser.add_argument("--split-orientations", action="store_true",
                        help="prepare each orientation of a series that changes orientation as its own volume")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes that decode compressed series of 8 or more files, this one included (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="never draw progress bars")
    parser.set_defaults(handler=_run_prepare_dicom)


# Rejections printed one per line after a prepare run; the manifest lists all of them.
SHOWN_REJECTIONS = 10


def _print_rejections(manifest: dict) -> None:
    """Print the first rejections with the message that names the file and the fix."""
    rejected = manifest.get("rejected", [])
    for entry in rejected[:SHOWN_REJECTIONS]:
        print(f"  rejected ({entry['reason']}): {entry['message']}")
    if len(rejected) > SHOWN_REJECTIONS:
        print(f"  ... and {len(rejected) - SHOWN_REJECTIONS} more rejections, all listed in the manifest")


def _run_prepare_dicom(args) -> int:
    from preprocessing.inputs import InputError
    from preprocessing.prepare_dicom import PrepareOptions, prepare_dicom, summary_line
    from preprocessing.pseudonym import KeyFileError

    options = PrepareOptions(
        source=args.source, out=args.out, labels=args.labels, site=args.site, key_file=args.key_file,
        seed=args.seed, val_fraction=args.val_fraction, include_localizers=args.include_localizers,
        include_derived=args.include_derived, split_orientations=args.split_orientations, workers=args.workers,
        show_progress=sys.stderr.isatty() and not args.no_progress,
    )
    key_file = _key_file(args.key_file)
    key_existed = key_file.exists()
    try:
        manifest = prepare_dicom(options)
    except (InputError, KeyFileError) as exc:
        print(f"fedimaging prepare dicom: error: {exc}", file=sys.stderr)
        return 2
    _announce_new_key(key_file, key_existed)
    print(summary_line(manifest))
    _print_rejections(manifest)
    print(f"datalist: {args.out / 'datalist.json'}; site-local manifest: {args.out / 'manifest.json'}")
    if not manifest["cases"]:
        print("fedimaging prepare dicom: error: no usable image was produced; see the rejected and excluded lists in the manifest",
              file=sys.stderr)
        return 1
    return 0


def _add_prepare_wsi(subparsers) -> None:
    parser = subparsers.add_parser(
        "wsi",
        help="tile whole-slide images (or folders of labelled tiles) at one resolution, on tissue only",
        description="Find tissue tiles in every slide OpenSlide reads, at one physical resolution, and write tile "
        "coordinates, a MONAI-style datalist, thumbnails with the kept tiles outlined, and a site-local "
        "manifest. A SOURCE whose sub-folders hold image files (one per class) is read as already-cut tiles. "
        "SOURCE is only read.",
    )
    parser.add_argument("source", type=Path, metavar="SOURCE", help="slide file, folder of slides, or folder of class sub-folders of tiles")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT", help="output folder (new, empty, or a previous output)")
    parser.add_argument("--mpp", type=float, default=0.5, help="target resolution in µm per pixel (default 0.5)")
    parser.add_argument("--tile-size", type=int, default=224, help="tile width and height in pixels at --mpp (default 224)")
    parser.add_argument("--labels", type=Path, metavar="CSV", help="slide-level labels: CSV with slide,label[,patient] columns")
    parser.add_argument("--annotations", type=Path, metavar="DIR",
                        help="folder of GeoJSON region annotations (QuPath export), one <slide name>.geojson per slide")
    parser.add_argument("--background-class", metavar="NAME",
                        help="class for tissue tiles outside every annotated region (default: drop them)")
    parser.add_argument("--assume-mpp", type=float, metavar="MPP",
                        help="level-0 resolution in µm per pixel for slides or tiles without a usable one; "
                             "a slide or tile with its own resolution keeps it")
    parser.add_argument("--tissue-threshold", type=float, default=0.5,
                        help="minimum fraction of a tile covered by tissue to keep it (default 0.5)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes for tiling slides (default 1)")
    parser.add_argument("--export-tiles", action="store_true", help="also write every kept tile as a PNG file")
    parser.add_argument("--site", metavar="NAME", help="site name recorded in the manifest (the NVFlare client name)")
    parser.add_argument("--key-file", type=Path, metavar="FILE",
                        help="site-local pseudonym key (default: $FEDIMAGING_KEY_FILE or ~/.config/fedimaging/pseudonym.key)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the slide- or patient-level split (default 0)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="fraction of slides (or patients) for validation")
    parser.add_argument("--no-progress", action="store_true", help="never draw progress bars")
    parser.set_defaults(handler=_run_prepare_wsi)


def _run_prepare_wsi(args) -> int:
    from preprocessing.inputs import InputError
    from preprocessing.prepare_wsi import WsiOptions, prepare_wsi, summary_line
    from preprocessing.pseudonym import KeyFileError

    options = WsiOptions(
        source=args.source, out=args.out, mpp=args.mpp, tile_size=args.tile_size, labels=args.labels,
        annotations=args.annotations, background_class=args.background_class, assume_mpp=args.assume_mpp,
        tissue_threshold=args.tissue_threshold, site=args.site, key_file=args.key_file, seed=args.seed,
        val_fraction=args.val_fraction, workers=args.workers, export_tiles=args.export_tiles,
        show_progress=sys.stderr.isatty() and not args.no_progress,
    )
    key_file = _key_file(args.key_file)
    key_existed = key_file.exists()
    try:
        manifest = prepare_wsi(options)
    except (InputError, KeyFileError) as exc:
        print(f"fedimaging prepare wsi: error: {exc}", file=sys.stderr)
        return 2
    _announce_new_key(key_file, key_existed)
    print(summary_line(manifest))
    _print_rejections(manifest)
    print(f"datalist: {args.out / 'datalist.json'}; site-local manifest: {args.out / 'manifest.json'}")
    if manifest["summary"]["tiles"] == 0:
        print("fedimaging prepare wsi: error: no tile was produced; see the rejected list in the manifest", file=sys.stderr)
        return 1
    return 0


def _add_report(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write the cross-site validation report (report.json, heatmap.png, report.html) of a finished run",
        description="Find cross_site_val/cross_val_results.json below RESULT (an NVFlare simulator workspace or the "
        "unpacked result of a downloaded job) and write report.json, heatmap.png and a self-contained report.html "
        "into OUT. Exit status: 0 on success, 1 when no cell holds a usable value (the report still explains why), "
        "2 when RESULT or its results are missing. RESULT is only read.",
    )
    parser.add_argument("result", type=Path, metavar="RESULT", help="simulator workspace or unpacked job result folder")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT",
                        help="output folder for report.json, heatmap.png and report.html (created if needed)")
    parser.set_defaults(handler=_run_report)


def _run_report(args) -> int:
    from fedimaging.report import run_report_command

    return run_report_command(args.result, args.out)


def _add_simulate(subparsers) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="run a job in the NVFlare simulator, each simulated site on its own prepared data",
        description="Run an exported job folder (from jobs/) in the NVFlare simulator with one client per site "
        "configuration, then check that the job completed (final global model and cross-site results).",
    )
    parser.add_argument("job", type=Path, metavar="JOB", help="job folder, e.g. jobs/seg_fedavg")
    parser.add_argument("--sites", type=Path, nargs="+", required=True, metavar="SITE_CONFIG",
                        help="site configuration files (YAML), one per simulated site")
    parser.add_argument("--workspace", type=Path, required=True, metavar="WS", help="new folder for the run's results")
    parser.add_argument("--rounds", type=int, help="number of FedAvg rounds (default: the job's)")
    parser.add_argument("--threads", type=int, help="sites run at the same time (default: all)")
    parser.set_defaults(handler=_run_simulate)


def _run_simulate(args) -> int:
    from fedimaging.simulate import SimulationError, simulate

    if args.rounds is not None and args.rounds < 1:
        print(f"fedimaging simulate: error: --rounds {args.rounds}: must be at least 1", file=sys.stderr)
        return 2
    log_name = None if args.verbose else "simulator.log"
    if log_name:
        print(f"running the NVFlare simulator; its output goes to {args.workspace / log_name} "
              "(pass -v before 'simulate' to see it here)", flush=True)
    try:
        result = simulate(args.job, args.sites, args.workspace, rounds=args.rounds, threads=args.threads,
                          log_name=log_name)
    except SimulationError as exc:
        print(f"fedimaging simulate: error: {exc}", file=sys.stderr)
        return 1
    summary_path = result.server_dir / "metrics" / "metrics_summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        for entry in summary.get("final_aggregated_metrics") or []:
            print(f"final round {summary.get('final_round')}: {entry['name']} of the global model at the sites "
                  f"(before their local training, case-weighted) {entry['value']:.4f}")
    print(f"job completed; global model: {result.global_model}")
    print(f"cross-site results: {result.cross_site_results}")
    print(f"next: fedimaging report {result.workspace} --out <report folder>")
    return 0


def _add_bundle(subparsers) -> None:
    parser = subparsers.add_parser(
        "bundle",
        help="export the best global model of a run as a MONAI bundle",
        description="Write a MONAI bundle (configs/metadata.json, configs/inference.json, models/model.pt and a "
        "model card in docs/README.md) of the best global model by the report's rule, or of --model.",
    )
    parser.add_argument("result", type=Path, metavar="RESULT", help="simulator workspace or unpacked job result")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="bundle folder to write")
    parser.add_argument("--model", choices=["SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt"],
                        help="export this global model instead of the best one")
    parser.set_defaults(handler=_run_bundle)


def _run_bundle(args) -> int:
    from fedimaging.bundle import BundleError, export_bundle

    try:
        path = export_bundle(args.result, args.out, args.model)
    except BundleError as exc:
        print(f"fedimaging bundle: error: {exc}", file=sys.stderr)
        return 1
    print(f"bundle: {path}")
    print(f"run it: python -m monai.bundle run --config_file {path / 'configs' / 'inference.json'} "
          f"--bundle_root {path} --dataset_dir <images> --output_dir <predictions>")
    return 0


def _add_he_decrypt(subparsers) -> None:
    parser = subparsers.add_parser(
        "he-decrypt",
        help="at a site: decrypt the global model of a homomorphic-encryption job and write its evaluation job",
        description="Decrypt the final global model of a downloaded HE job result with this site's TenSEAL context "
        "(KIT/startup/client_context.tenseal). Writes OUT/FL_global_model.pt and OUT/<job>_eval/, a plaintext job "
        "that runs cross-site evaluation of that model at every site; submit it, download its result, then run "
        "fedimaging report and fedimaging bundle on that result. Run it from the repository root.",
    )
    parser.add_argument("result", type=Path, metavar="RESULT", help="unpacked result of the HE job")
    parser.add_argument("--kit", type=Path, required=True, metavar="SITE_KIT", help="this site's startup kit folder")
    parser.add_argument("--out", type=Path, required=True, metavar="MODEL_DIR", help="folder to write into")
    parser.add_argument("--sites", type=int, metavar="N", help="number of sites the evaluation job waits for "
                        "(default: the job's own, 3)")
    parser.add_argument("--no-eval-job", action="store_true", help="write only the decrypted model")
    parser.set_defaults(handler=_run_he_decrypt)


def _run_he_decrypt(args) -> int:
    try:
        from fedimaging.he_decrypt import HEDecryptError, decrypt_global_model
    except ImportError as exc:  # tenseal is an optional extra
        print(f"fedimaging he-decrypt: error: {exc}; install the extra: pip install -e '.[he]'", file=sys.stderr)
        return 2
    try:
        decrypted = decrypt_global_model(args.result, args.kit, args.out, eval_job=not args.no_eval_job,
                                         n_sites=args.sites)
    except (HEDecryptError, ImportError) as exc:
        print(f"fedimaging he-decrypt: error: {exc}", file=sys.stderr)
        return 1
    print(f"decrypted {decrypted.n_encrypted} of {decrypted.n_tensors} tensors: {decrypted.model_file}")
    if decrypted.eval_job is not None:
        print(f"evaluation job: {decrypted.eval_job} (submit it as the lead researcher, download its result, then "
              "fedimaging report RESULT and fedimaging bundle RESULT)")
    return 0


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="generate a small federation and run the whole product on it (no data of your own needed)",
        description="Generate CT series and whole-slide images for each site, prepare them with the real site "
        "steps, run the segmentation and classification jobs in the NVFlare simulator with cross-site "
        "validation, and write the reports.",
    )
    parser.add_argument("--workspace", type=Path, default=Path("fedimaging-demo"), metavar="WS",
                        help="new folder for everything the demo writes (default ./fedimaging-demo)")
    parser.add_argument("--sites", type=int, default=3, help="number of simulated hospitals (default 3)")
    parser.add_argument("--fast", action="store_true", help="a smaller federation and fewer rounds (for CI)")
    parser.set_defaults(handler=_run_demo)


def _run_demo(args) -> int:
    from fedimaging.demo.run import DemoError, run_demo

    if args.sites < 2:
        print(f"fedimaging demo: error: --sites {args.sites}: a federation needs at least 2 sites", file=sys.stderr)
        return 2
    try:
        reports = run_demo(args.workspace, n_sites=args.sites, fast=args.fast)
    except DemoError as exc:
        print(f"fedimaging demo: error: {exc}", file=sys.stderr)
        return 1
    for task, path in reports.items():
        print(f"{task} report: {path}")
    return 0


def _add_deploy_commands(commands) -> None:
    from fedimaging.deploy.commands import add_provision, add_site

    add_provision(commands)
    add_site(commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedimaging", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fedimaging {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="verbose output: log every rejected file and series, and show the NVFlare simulator's output")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="site-side data preparation")
    prepare_kinds = prepare.add_subparsers(dest="kind", required=True)
    _add_prepare_dicom(prepare_kinds)
    _add_prepare_wsi(prepare_kinds)
    _add_simulate(commands)
    _add_report(commands)
    _add_bundle(commands)
    _add_he_decrypt(commands)
    _add_demo(commands)
    _add_deploy_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    return args.handler(args)
