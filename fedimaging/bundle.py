"""``fedimaging bundle``: export the best global model of a run as a MONAI bundle.

The bundle holds ``configs/metadata.json``, ``configs/inference.json`` (runnable with
``python -m monai.bundle run --config_file configs/inference.json``), ``models/model.pt`` (the network's
state dict, loadable into plain MONAI networks, so the bundle needs no fedimaging code) and
``docs/README.md``, a model card.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from fedimaging.report.assemble import build_report
from fedimaging.report.load import ReportInputError, find_inputs

MODEL_FILES = {"SRV_FL_global_model.pt": "FL_global_model.pt", "SRV_best_FL_global_model.pt": "best_FL_global_model.pt"}
NOT_FOR_CLINICAL_USE = "Research use only. Not for clinical use: not validated for diagnosis or treatment decisions."


class BundleError(RuntimeError):
    """The run contains no exportable model; the message names what is missing."""


def _find_one(root: Path, pattern: str) -> Path:
    matches = sorted(root.glob(f"**/{pattern}"))
    if not matches:
        raise BundleError(f"no {pattern} below {root}; pass the simulator workspace or the unpacked job result")
    return matches[0]


def _network_def(job: dict) -> dict:
    model = job["model"]
    n_classes = len(job["classes"])
    if job["task"] == "segmentation":
        if model["name"] == "unet":
            channels = model.get("channels", [8, 16, 32, 64])
            return {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": n_classes + 1,
                    "channels": channels, "strides": [2] * (len(channels) - 1), "num_res_units": 1}
        return {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1, "out_channels": n_classes + 1,
                "init_filters": model.get("channels", [8])[0]}
    if model["name"] == "densenet121":
        return {"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 3, "out_channels": n_classes}
    return {"_target_": f"monai.networks.nets.{model['name']}", "spatial_dims": 2, "n_input_channels": 3,
            "num_classes": n_classes}


def _segmentation_inference(job: dict) -> dict:
    low, high = job["intensity_window"]
    preprocessing = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
    ]
    if job.get("spacing_mm"):
        preprocessing.append({"_target_": "Spacingd", "keys": "image", "pixdim": job["spacing_mm"], "mode": "bilinear"})
    preprocessing += [
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": low, "a_max": high, "b_min": 0.0, "b_max": 1.0,
         "clip": True},
        {"_target_": "EnsureTyped", "keys": "image"},
    ]
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/input'",
        "datalist": "$list(sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*'))))",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": _network_def(job),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": job["patch_size"], "sw_batch_size": 1,
                    "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False},
        ]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}, "map_location": "@device"}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "run": ["$@evaluator.run()"],
    }


def _classification_inference(job: dict) -> dict:
    size = job["model"].get("image_size") or 224
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/input'",
        "datalist": "$list(sorted(glob.glob(os.path.join(@dataset_dir, '*.png'))))",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": _network_def(job),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "image_only": True, "reader": "PILReader"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Resized", "keys": "image", "spatial_size": [size, size]},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0, "a_max": 255, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
            {"_target_": "NormalizeIntensityd", "keys": "image", "subtrahend": [0.485, 0.456, 0.406],
             "divisor": [0.229, 0.224, 0.225], "channel_wise": True},
            {"_target_": "EnsureTyped", "keys": "image"},
        ]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True}]},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
             "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "ClassificationSaver", "output_dir": "@output_dir", "batch_transform": "$lambda x: x['image'].meta",
             "output_transform": "$monai.handlers.from_engine(['pred'])", "save_rank": 0},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "run": ["$@evaluator.run()"],
    }


def _metadata(job: dict, report, model_name: str) -> dict:
    import monai
    import numpy
    import torch

    from fedimaging import __version__

    classes = list(job["classes"])
    if job["task"] == "segmentation":
        channel_def = {"0": "background", **{str(i + 1): name for i, name in enumerate(classes)}}
        inputs = {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                            "spatial_shape": job["patch_size"], "dtype": "float32",
                            "value_range": job["intensity_window"], "is_patch_data": True,
                            "channel_def": {"0": "image"}}}
        outputs = {"pred": {"type": "image", "format": "segmentation", "num_channels": len(classes) + 1,
                            "spatial_shape": job["patch_size"], "dtype": "float32", "value_range": [0, 1],
                            "is_patch_data": True, "channel_def": channel_def}}
    else:
        size = job["model"].get("image_size") or 224
        inputs = {"image": {"type": "image", "format": "magnitude", "modality": "histopathology", "num_channels": 3,
                            "spatial_shape": [size, size], "dtype": "float32", "value_range": [0, 255],
                            "is_patch_data": True, "channel_def": {"0": "R", "1": "G", "2": "B"}}}
        outputs = {"pred": {"type": "probabilities", "format": "classes", "num_channels": len(classes),
                            "spatial_shape": [len(classes)], "dtype": "float32", "value_range": [0, 1],
                            "is_patch_data": False, "channel_def": {str(i): n for i, n in enumerate(classes)}}}
    return {
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by fedimaging {__version__} from {model_name}"},
        "monai_version": str(monai.__version__),
        "pytorch_version": str(torch.__version__).split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"nibabel": __import__("nibabel").__version__},
        "name": f"fedimaging {report.run.job_name or 'federated'} {job['task']} model",
        "task": f"{job['task']} of {', '.join(classes)}",
        "description": f"{job['task'].capitalize()} model trained with federated averaging in NVFlare. "
                       + NOT_FOR_CLINICAL_USE,
        "authors": "fedimaging federation",
        "copyright": "Copyright the federation's members",
        "intended_use": NOT_FOR_CLINICAL_USE,
        "network_data_format": {"inputs": inputs, "outputs": outputs},
    }


def _model_card(job: dict, report, model_name: str) -> str:
    best = report.best_global_model
    lines = [
        f"# Model card: {report.run.job_name or 'federated'} {job['task']} model", "",
        f"**{NOT_FOR_CLINICAL_USE}**", "",
        "## Training federation", "",
        f"- Model: `{model_name}` ({best.rule})" if best.model == model_name else f"- Model: `{model_name}`",
        f"- Rounds: {report.run.rounds if report.run.rounds is not None else 'as configured in the job'}; "
        f"seed {report.run.seed}",
        f"- Classes: {', '.join(job['classes'])} (0 = background for segmentation)",
        f"- Network: {job['model']['name']}",
        "", "## Cross-site validation of this model", "",
        "| site | metric | value | n | 95 % interval | status |", "|---|---|---|---|---|---|",
    ]
    for cell in report.cells:
        if cell.model != model_name:
            continue
        value = "" if cell.value is None else f"{cell.value:.3f}"
        interval = "" if not cell.interval else f"{cell.interval[0]:.3f}-{cell.interval[1]:.3f}"
        lines.append(f"| {cell.site} | {cell.metric} | {value} | {cell.n if cell.n is not None else ''} | "
                     f"{interval} | {cell.status} |")
    lines += ["", "Intervals are 95 % bootstrap intervals over patients, computed at each site; cells with fewer "
              "than 5 cases have none.", "", "## Use", "",
              "```bash", "python -m monai.bundle run --config_file configs/inference.json --bundle_root . "
              "--dataset_dir /path/to/images --output_dir /path/to/output", "```", ""]
    return "\n".join(lines)


def export_bundle(result: Path, out: Path, model_name: str | None = None) -> Path:
    """Write the bundle of ``model_name`` (default: the report's best global model) into ``out``."""
    import torch

    try:
        inputs = find_inputs(result)
    except ReportInputError as exc:
        raise BundleError(str(exc)) from exc
    report = build_report(inputs, datetime.now(timezone.utc))
    model_name = model_name or report.best_global_model.model
    if model_name not in MODEL_FILES:
        raise BundleError(f"no usable global model in {result} (best: {model_name}); check the report's failed cells")
    job_path = _find_one(result, "app_server/custom/fedimaging_job.json")
    job = json.loads(job_path.read_text())
    checkpoint_path = _find_one(result, f"app_server/{MODEL_FILES[model_name]}")
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    state = checkpoint.get("model", checkpoint)
    # The jobs wrap MONAI networks as ``net``; the bundle loads the MONAI network directly.
    state = {key.removeprefix("net."): value for key, value in state.items()}

    for folder in ("configs", "models", "docs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    torch.save(state, out / "models" / "model.pt")
    inference = _segmentation_inference(job) if job["task"] == "segmentation" else _classification_inference(job)
    (out / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    (out / "configs" / "metadata.json").write_text(json.dumps(_metadata(job, report, model_name), indent=2))
    (out / "docs" / "README.md").write_text(_model_card(job, report, model_name))
    return out
