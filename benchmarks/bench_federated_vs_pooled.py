"""Compare pooled, site-alone, FedAvg, FedProx, Ditto and FedBN training on one generated non-IID federation.

Usage: python benchmarks/bench_federated_vs_pooled.py [--rounds R] [--steps-per-round S] [--arms LIST]
       [--lr-schedule constant|cosine] [--json PATH]

The script generates each site with ``generate_radiology_site`` (its own ``site_index``) and prepares
it with the real ``prepare_dicom``, which holds out ``--val-fraction`` of each site's patients for
validation. By default the generator's ``variation="strong"`` gives every site its own contrast phase
(liver, lesion and aorta HU), kernel blur, spacing, noise, patient size and larger lesions, on top of
the demo's DICOM quirks; ``--variation demo`` uses the demo's milder sites. Every arm then trains the
model of ``jobs/specs/demo_seg.json`` (on the ``--spacing-mm`` grid with ``--patch-size`` patches) with
``SegmentationEngine.train`` and the same total number of local optimisation steps,
``rounds x steps_per_round x sites``:

- pooled: one model on all sites' training cases, ``rounds`` calls of ``steps_per_round x sites`` steps,
  validated after each quarter of the rounds to show whether it has converged;
- site alone: one model per site on its own cases, ``rounds x steps_per_round`` steps each;
- FedAvg: every round, each site loads the global weights, trains ``steps_per_round`` steps, and the
  new global model is the mean of the sites' weights weighted by their training cases;
- FedProx: FedAvg with the proximal term ``fedprox_mu / 2 * ||w - w_global||^2`` in the local loss;
- Ditto: each site trains the global model for ``steps_per_round / 2`` steps (aggregated as in
  FedAvg) and its own personal model for ``steps_per_round / 2`` steps with the proximal term
  ``ditto_lambda / 2 * ||v - w_global||^2``, so the step budget is the same as the other arms;
- FedBN: the UNet with batch norm instead of instance norm, trained as FedAvg except that each site
  keeps the parameters and running statistics of its norm layers (what a job does with an
  ``exclude_vars`` privacy filter on those layers).

``--arms`` trains only the listed arms (for example ``pooled,fedavg``); targets that need a missing
arm are not judged. ``--lr-schedule cosine`` lowers every arm's learning rate per round along a
cosine from the job's rate towards 0. FedAvg and FedProx are validated after each quarter of the
rounds, like pooled training, so the convergence of both is printed.

Every model is validated with ``SegmentationEngine.validate`` on every site's held-out cases
(``dice_mean`` over liver, aorta and lesion, with its patient-level bootstrap 95 % interval); Ditto's
personal models and FedBN's site models only at their own site. The deterministic part of the
engine's transforms (load, resample, window) is computed once per case and reused by every arm
(``PreprocessCache``), which changes wall time but not training. FedAvg also runs once through
``fedimaging simulate`` (the NVFlare simulator) with a job exported from the same spec and the same
rounds and steps, to measure the simulator's wall-time overhead. All files are written to a temporary
folder, deleted at the end unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "app_custom"))

import fedimaging_app.seg_engine as seg_engine  # noqa: E402
from monai.data import Dataset as MonaiDataset  # noqa: E402
from monai.transforms import Randomizable, apply_transform  # noqa: E402

from fedimaging.demo.radiology import LABELS, generate_radiology_site  # noqa: E402
from fedimaging_app.client_loop import seed_everything  # noqa: E402
from fedimaging_app.config import JobConfig, load_site_config  # noqa: E402
from fedimaging_app.models import build_model  # noqa: E402
from fedimaging_app.seg_data import training_transform  # noqa: E402
from fedimaging_app.seg_engine import SegmentationEngine  # noqa: E402
from fedimaging_app.site_data import load_prepared  # noqa: E402

SPEC_PATH = REPO / "jobs" / "specs" / "demo_seg.json"
CLASSES = list(LABELS)
# Targets stated for this benchmark.
FEDAVG_TARGET_RATIO = 0.97
PERSONALISATION_TARGET_SHARE = 0.5
HETEROGENEITY_TARGET_LOSS = 0.05
# Pooled training must beat the untrained model by this much Dice before FedAvg and personalisation
# are judged against it. Below that, the budget is too small for the comparison to mean anything.
MIN_POOLED_GAIN = 0.1
DEVICE = torch.device("cpu")
ARMS = ("pooled", "alone", "fedavg", "fedprox", "ditto", "fedbn")
# BatchNorm layers of MONAI's UNet sit in its ADN blocks under the name "N".
NORM_LAYER_TYPES = (torch.nn.modules.batchnorm._BatchNorm,)


class PreprocessCache:
    """Memo of the deterministic first part of the engine's transforms (load, labels, resampling, window, pad).

    Every arm reads the same prepared cases through the same transforms, so the result of the transforms
    before the first random one is computed once per case and reused. The random crops and flips still
    run on every step with the engine's own random state, so training is the same as without the memo;
    only the wall time differs. ``seconds`` is the preprocessing time spent filling the memo, and
    ``per_case_s`` the mean time of one case, used to estimate training time without the memo.
    """

    def __init__(self):
        self.entries: dict[tuple, dict] = {}
        self.seconds = 0.0

    @property
    def per_case_s(self) -> float:
        return self.seconds / len(self.entries) if self.entries else 0.0

    def deterministic(self, transforms, item: dict) -> dict:
        key = (item["image"], item.get("label_map"), tuple(type(t).__name__ for t in transforms))
        if key not in self.entries:
            started = time.process_time()
            data = dict(item)
            for transform in transforms:
                data = apply_transform(transform, data)
            self.seconds += time.process_time() - started
            self.entries[key] = data
        return dict(self.entries[key])


CACHE = PreprocessCache()


class CachedDataset(MonaiDataset):
    """``monai.data.Dataset`` whose deterministic transforms come from ``CACHE``; drop-in for the engine's."""

    def _transform(self, index: int):
        transforms = list(self.transform.transforms)
        split = next((i for i, t in enumerate(transforms) if isinstance(t, Randomizable)), len(transforms))
        data = CACHE.deterministic(transforms[:split], self.data[index])
        for transform in transforms[split:]:
            data = apply_transform(transform, data, map_items=True)
        return data


class CachedValidationTransform:
    """The engine's validation transform (deterministic throughout), with results from ``CACHE``."""

    def __init__(self, compose):
        self.compose = compose

    def __call__(self, item: dict) -> dict:
        return CACHE.deterministic(list(self.compose.transforms), item)


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import monai
    import nvflare
    import pydicom

    import fedimaging

    return {
        "cpu_model": cpu,
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torch_threads_in_process": torch.get_num_threads(),
        "monai": str(monai.__version__),
        "nvflare": str(nvflare.__version__),
        "pydicom": str(pydicom.__version__),
        "fedimaging": getattr(fedimaging, "__version__", "unknown"),
        "cuda_used": False,
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
    }


def write_site_config(path: Path, name: str, data_dir: Path) -> Path:
    lines = [f"site_name: {name}", f"data_dir: {data_dir}", "label_mapping:"]
    lines += [f"  {cls}: {{\"label_value\": {value}}}" for cls, value in LABELS.items()]
    # The simulator runs one process per site, so one math thread each on a small machine.
    lines += ["device: cpu", "torch_threads: 1"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def build_federation(root: Path, args: argparse.Namespace) -> list[dict]:
    """Generate and prepare every site, and return the site names, configuration files and case counts."""
    from preprocessing.prepare_dicom import PrepareOptions, prepare_dicom

    sites = []
    for index in range(args.sites):
        name = f"site-{index + 1}"
        raw = root / "hospitals" / name
        summary = generate_radiology_site(raw, site_index=index, n_cases=args.cases, seed=args.seed + index,
                                          image_size=args.image_size, n_slices=args.n_slices,
                                          variation=args.variation)
        prepared = root / "prepared" / name
        manifest = prepare_dicom(PrepareOptions(source=raw / "dicom", labels=raw / "labels", out=prepared, site=name,
                                                key_file=root / "keys" / f"{name}.key", seed=args.seed,
                                                val_fraction=args.val_fraction))
        if len(manifest["cases"]) != args.cases or manifest["rejected"]:
            raise SystemExit(f"{name}: prepare_dicom kept {len(manifest['cases'])} of {args.cases} cases and "
                             f"rejected {manifest['rejected']}; see {prepared / 'manifest.json'}")
        datalist = json.loads((prepared / "datalist.json").read_text())
        sites.append({
            "name": name,
            "config": write_site_config(root / "site_configs" / f"{name}.yaml", name, prepared),
            "n_training": len(datalist["training"]),
            "n_validation": len(datalist["validation"]),
            "spacing_mm": summary["spacing_mm"],
            "hu_shift": summary["profile"]["hu_shift"],
            "noise_sigma_hu": summary["noise_sigma_hu"],
            "appearance": summary["appearance"],
            "expected_hu": summary["expected_hu"],
        })
    return sites


class Federation:
    """The sites' configurations and prepared data, and engines built from them."""

    def __init__(self, sites: list[dict]):
        self.sites = sites
        self.configs = [load_site_config(site["config"]) for site in sites]
        self.data = [load_prepared(config.data_dir) for config in self.configs]

    def engine(self, index: int, job: JobConfig) -> SegmentationEngine:
        # A new engine per arm, because an engine keeps its Adam state for the first model it trains.
        engine = SegmentationEngine(job, self.configs[index], self.data[index], DEVICE)
        engine.val_transform = CachedValidationTransform(engine.val_transform)
        return engine

    def pooled_engine(self, job: JobConfig) -> SegmentationEngine:
        """Build an engine whose training items are every site's training cases (its validation is not used)."""
        engines = [self.engine(index, job) for index in range(len(self.sites))]
        pooled = engines[0]
        pooled.train_items = [item for engine in engines for item in engine.train_items]
        pooled.train_transform = training_transform(job, pooled.train_items)
        return pooled

    def validate(self, model: torch.nn.Module, job: JobConfig, indices: list[int] | None = None) -> dict:
        """Validate ``model`` on the held-out cases of each site in ``indices`` (default all)."""
        results = {}
        for index in indices if indices is not None else range(len(self.sites)):
            metrics = self.engine(index, job).validate(model)["metrics"]
            results[self.sites[index]["name"]] = {key: metrics[key] for key in ["dice_mean", *[f"dice_{c}" for c in CLASSES]]}
        return results


def job_with(base: dict, **changes) -> JobConfig:
    return JobConfig.model_validate({**base, **changes})


def average_states(states: list[dict], weights: list[int]) -> dict:
    """Average state dicts weighted by ``weights`` (FedAvg). Integer buffers are copied from the first site."""
    total = float(sum(weights))
    averaged = {}
    for key, first in states[0].items():
        if torch.is_floating_point(first):
            averaged[key] = sum(state[key] * (weight / total) for state, weight in zip(states, weights))
        else:
            averaged[key] = first.clone()
    return averaged


def round_learning_rate(base: float, round_number: int, rounds: int, schedule: str) -> float:
    """Return the learning rate of a round: constant, or cosine decay from ``base`` towards 0 over the rounds."""
    if schedule == "constant":
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * (round_number - 1) / rounds))


def train_round(engine: SegmentationEngine, model, global_model, round_number: int, args: argparse.Namespace) -> None:
    """Run one round of ``engine.train`` at the round's learning rate (``--lr-schedule``)."""
    rate = round_learning_rate(engine.job.learning_rate, round_number, args.rounds, args.lr_schedule)
    if engine._optimizer is not None:  # the engine makes its Adam optimizer at the job's rate in round 1
        for group in engine._optimizer.param_groups:
            group["lr"] = rate
    engine.train(model, global_model, None, round_number)


def train_pooled(federation: Federation, spec: dict, args: argparse.Namespace) -> dict:
    """Train the pooled model, validating it after each quarter of the rounds to show whether it has converged."""
    job = job_with(spec, steps_per_round=args.steps_per_round * len(federation.sites))
    seed_everything(job.seed)
    model = build_model(job)
    engine = federation.pooled_engine(job)
    checkpoints = sorted({max(1, round(args.rounds * quarter / 4)) for quarter in (1, 2, 3)})
    curve = []
    train_s = 0.0
    for round_number in range(1, args.rounds + 1):
        started = time.monotonic()
        train_round(engine, model, None, round_number, args)
        train_s += time.monotonic() - started
        if round_number in checkpoints:
            dice = federation.validate(model, job_with(spec))
            curve.append({"steps": round_number * job.steps_per_round, "site_mean": mean_value(dice),
                          "per_class": class_means(dice)})
            print(f"    pooled after {curve[-1]['steps']} steps: site mean dice_mean {curve[-1]['site_mean']:.3f}",
                  flush=True)
    return {"models": {"pooled": model}, "train_s": train_s, "steps": args.rounds * job.steps_per_round,
            "curve": curve}


def train_site_alone(federation: Federation, spec: dict, args: argparse.Namespace) -> dict:
    job = job_with(spec, steps_per_round=args.steps_per_round)
    models, started = {}, time.monotonic()
    for index, site in enumerate(federation.sites):
        seed_everything(job.seed)
        model = build_model(job)
        engine = federation.engine(index, job)
        for round_number in range(1, args.rounds + 1):
            train_round(engine, model, None, round_number, args)
        models[f"{site['name']} alone"] = model
    train_s = time.monotonic() - started
    return {"models": models, "train_s": train_s,
            "steps": args.rounds * args.steps_per_round * len(federation.sites)}


def train_federated(federation: Federation, spec: dict, args: argparse.Namespace, fedprox_mu: float) -> dict:
    """Train FedAvg (``fedprox_mu`` 0) or FedProx in process, with the sites trained one after another."""
    job = job_with(spec, steps_per_round=args.steps_per_round, fedprox_mu=fedprox_mu)
    seed_everything(job.seed)
    global_state = copy.deepcopy(build_model(job).state_dict())
    engines = [federation.engine(index, job) for index in range(len(federation.sites))]
    models = [build_model(job) for _ in engines]
    weights = [engine.n_training_cases for engine in engines]
    checkpoints = sorted({max(1, round(args.rounds * quarter / 4)) for quarter in (1, 2, 3)})
    curve = []
    train_s = 0.0
    for round_number in range(1, args.rounds + 1):
        started = time.monotonic()
        states = []
        for engine, model in zip(engines, models):
            model.load_state_dict(global_state)
            global_copy = copy.deepcopy(model).eval() if fedprox_mu > 0 else None
            train_round(engine, model, global_copy, round_number, args)
            states.append({key: value.detach().clone() for key, value in model.state_dict().items()})
        global_state = average_states(states, weights)
        train_s += time.monotonic() - started
        if round_number in checkpoints:
            probe = build_model(job)
            probe.load_state_dict(global_state)
            dice = federation.validate(probe, job_with(spec))
            curve.append({"steps": round_number * args.steps_per_round * len(engines), "site_mean": mean_value(dice),
                          "per_class": class_means(dice)})
            print(f"    {'FedAvg' if fedprox_mu == 0 else 'FedProx'} after {curve[-1]['steps']} steps: site mean "
                  f"dice_mean {curve[-1]['site_mean']:.3f}", flush=True)
    model = build_model(job)
    model.load_state_dict(global_state)
    name = "FedAvg" if fedprox_mu == 0 else f"FedProx (mu {fedprox_mu:g})"
    return {"models": {name: model}, "train_s": train_s, "curve": curve,
            "steps": args.rounds * args.steps_per_round * len(engines)}


def norm_state_keys(model: torch.nn.Module) -> set[str]:
    """Names of the parameters and buffers of the model's batch-norm layers (the layers FedBN keeps local)."""
    keys = set()
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_LAYER_TYPES):
            keys.update(f"{module_name}.{name}" for name, _ in module.named_parameters(recurse=False))
            keys.update(f"{module_name}.{name}" for name, _ in module.named_buffers(recurse=False))
    return keys


def train_fedbn(federation: Federation, spec: dict, args: argparse.Namespace) -> dict:
    """Train FedBN: the UNet with batch norm, where every site keeps its norm layers and FedAvg averages the rest.

    A real job does the same with an ``exclude_vars`` privacy filter that names the norm layers, so they
    never leave the site. Each site's model (shared weights plus its own norm layers) is validated at
    that site only.
    """
    job = job_with({**spec, "model": {**spec["model"], "norm": "batch"}}, steps_per_round=args.steps_per_round)
    seed_everything(job.seed)
    initial = build_model(job)
    local_keys = norm_state_keys(initial)
    if not local_keys:
        raise RuntimeError("the batch-norm UNet has no batch-norm layers; FedBN would equal FedAvg")
    shared_state = {key: value.clone() for key, value in initial.state_dict().items() if key not in local_keys}
    engines = [federation.engine(index, job) for index in range(len(federation.sites))]
    models = [copy.deepcopy(initial) for _ in engines]
    weights = [engine.n_training_cases for engine in engines]
    started = time.monotonic()
    for round_number in range(1, args.rounds + 1):
        states = []
        for engine, model in zip(engines, models):
            model.load_state_dict(shared_state, strict=False)
            train_round(engine, model, None, round_number, args)
            states.append({key: value.detach().clone() for key, value in model.state_dict().items()
                           if key not in local_keys})
        shared_state = average_states(states, weights)
    for model in models:
        model.load_state_dict(shared_state, strict=False)
    train_s = time.monotonic() - started
    return {"personal_models": models, "models": {}, "train_s": train_s, "local_keys": sorted(local_keys),
            "steps": args.rounds * args.steps_per_round * len(engines)}


def train_ditto(federation: Federation, spec: dict, args: argparse.Namespace) -> dict:
    """Train Ditto, where half of each round's steps update the shared model and half the site's personal model."""
    half = args.steps_per_round // 2
    global_job = job_with(spec, steps_per_round=half)
    personal_job = job_with(spec, steps_per_round=args.steps_per_round - half, fedprox_mu=args.ditto_lambda)

    seed_everything(global_job.seed)
    initial = build_model(global_job)
    global_state = copy.deepcopy(initial.state_dict())
    n_sites = len(federation.sites)
    global_engines = [federation.engine(index, global_job) for index in range(n_sites)]
    personal_engines = [federation.engine(index, personal_job) for index in range(n_sites)]
    shared_models = [build_model(global_job) for _ in range(n_sites)]
    personal_models = [copy.deepcopy(initial) for _ in range(n_sites)]
    weights = [engine.n_training_cases for engine in global_engines]

    started = time.monotonic()
    for round_number in range(1, args.rounds + 1):
        states = []
        for index in range(n_sites):
            received = build_model(global_job)
            received.load_state_dict(global_state)
            received.eval()
            train_round(personal_engines[index], personal_models[index], received, round_number, args)
            shared_models[index].load_state_dict(global_state)
            train_round(global_engines[index], shared_models[index], None, round_number, args)
            states.append({key: value.detach().clone() for key, value in shared_models[index].state_dict().items()})
        global_state = average_states(states, weights)
    train_s = time.monotonic() - started

    shared = build_model(global_job)
    shared.load_state_dict(global_state)
    return {"personal_models": personal_models, "models": {"Ditto shared model": shared}, "train_s": train_s,
            "steps": args.rounds * args.steps_per_round * n_sites}


def run_simulator(root: Path, federation: Federation, spec: dict, args: argparse.Namespace) -> dict:
    """Run FedAvg through ``fedimaging simulate``, and return its wall time and the final global model's Dice."""
    from fedimaging.simulate import simulate
    from jobs.build import export_job

    job_spec = {**spec, "steps_per_round": args.steps_per_round, "fedprox_mu": 0.0}
    job_dir = export_job("demo_seg", root / "jobs", num_rounds=args.rounds, min_clients=len(federation.sites),
                         spec=job_spec)
    started = time.monotonic()
    # NOTE: rounds stays None because the job already has num_rounds from export_job. NVFlare's exporter
    # omits num_rounds when it equals FedAvg's default (5), and simulate(rounds=5) then raises SimulationError.
    result = simulate(job_dir, [site["config"] for site in federation.sites], root / "simulation",
                      rounds=None, threads=len(federation.sites), log_name="simulator.log")
    wall_s = time.monotonic() - started
    results = json.loads(result.cross_site_results.read_text())
    dice = {}
    for site in federation.sites:
        entry = results.get(site["name"], {}).get("SRV_FL_global_model.pt", {})
        metrics = entry.get("metrics", entry) if isinstance(entry, dict) else {}
        if "fedimaging_metrics" not in metrics and isinstance(metrics.get("metrics"), dict):
            metrics = metrics["metrics"]
        inner = metrics.get("metrics", metrics)
        dice[site["name"]] = {key: inner.get(key) for key in ["dice_mean", *[f"dice_{c}" for c in CLASSES]]}
    return {"wall_s": wall_s, "dice": dice, "workspace": str(root / "simulation")}


def class_means(per_site: dict) -> dict:
    """Mean over sites of each class's Dice."""
    means = {}
    for cls in CLASSES:
        values = [cell[f"dice_{cls}"]["value"] for cell in per_site.values()
                  if cell.get(f"dice_{cls}") and cell[f"dice_{cls}"]["value"] is not None]
        means[cls] = float(np.mean(values)) if values else None
    return means


def mean_value(per_site: dict, names: list[str] | None = None) -> float | None:
    values = [cell["dice_mean"]["value"] for name, cell in per_site.items()
              if (names is None or name in names) and cell.get("dice_mean") and cell["dice_mean"]["value"] is not None]
    return float(np.mean(values)) if values else None


def format_cell(metric: dict | None) -> str:
    if not metric or metric.get("value") is None:
        return "n/a"
    text = f"{metric['value']:.3f}"
    if metric.get("ci95"):
        text += f" [{metric['ci95'][0]:.2f}, {metric['ci95'][1]:.2f}]"
    return text


def print_table(rows: list[dict], site_names: list[str]) -> None:
    header = f"{'arm / model':<26}" + "".join(f"{name + ' dice_mean [95% CI]':>26}" for name in site_names)
    header += f"{'site mean':>11}{'steps':>7}{'train s':>9}{'val s':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        line = f"{row['name']:<26}" + "".join(f"{format_cell(row['dice'].get(name, {}).get('dice_mean')):>26}"
                                              for name in site_names)
        mean = row.get("mean")
        line += f"{('%.3f' % mean) if mean is not None else 'n/a':>11}"
        line += f"{row.get('steps', ''):>7}" + f"{('%.0f' % row['train_s']) if row.get('train_s') is not None else '':>9}"
        line += f"{('%.0f' % row['val_s']) if row.get('val_s') is not None else '':>7}"
        print(line)


def per_class_table(rows: list[dict], site_names: list[str]) -> None:
    print("\nPer-class Dice (liver / aorta / lesion) at each site:")
    for row in rows:
        cells = []
        for name in site_names:
            cell = row["dice"].get(name)
            if not cell:
                cells.append(f"{'':>20}")
                continue
            values = [cell.get(f"dice_{c}", {}) or {} for c in CLASSES]
            cells.append(f"{' / '.join('%.2f' % v['value'] if v.get('value') is not None else 'n/a' for v in values):>20}")
        print(f"  {row['name']:<24}" + "".join(cells))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    parser.add_argument("--cases", type=int, default=20, help="generated cases per site (default 20)")
    parser.add_argument("--val-fraction", type=float, default=0.25,
                        help="fraction of each site's patients held out for validation (default 0.25)")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds (default 5)")
    parser.add_argument("--steps-per-round", type=int, default=8,
                        help="local optimisation steps per site per round, an even number (default 8)")
    parser.add_argument("--fedprox-mu", type=float, default=0.01, help="FedProx proximal weight mu (default 0.01)")
    parser.add_argument("--ditto-lambda", type=float, default=0.1,
                        help="Ditto proximal weight lambda for the personal models (default 0.1)")
    parser.add_argument("--image-size", type=int, default=96,
                        help="generator image_size, pixels at 1 mm spacing (default 96)")
    parser.add_argument("--n-slices", type=int, default=48, help="generator n_slices at 2.5 mm (default 48)")
    parser.add_argument("--variation", choices=["strong", "demo"], default="strong",
                        help="site differences of the generator: 'strong' adds contrast phase, kernel blur, patient "
                             "size and larger lesions to the demo's archive quirks (default strong)")
    parser.add_argument("--spacing-mm", type=float, nargs=3, default=[2.0, 2.0, 3.0],
                        help="training and validation grid in mm, replacing the demo_seg spec's 1.5 1.5 2.5 so that a "
                             "step costs about a third (default 2 2 3)")
    parser.add_argument("--patch-size", type=int, nargs=3, default=[32, 32, 24],
                        help="training patch in voxels, replacing the spec's 48 48 32 (default 32 32 24)")
    parser.add_argument("--seed", type=int, default=0, help="seed for generation, splits and training (default 0)")
    parser.add_argument("--skip-simulator", action="store_true", help="do not run FedAvg in the NVFlare simulator")
    parser.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                        help="learning rate per round in every arm: constant, or cosine decay towards 0 over the "
                             "rounds (default constant)")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"comma-separated arms to train (default all: {','.join(ARMS)}); targets that need a "
                             "missing arm are not judged")
    parser.add_argument("--keep", type=Path, help="write the generated data and runs to this new folder and keep it")
    parser.add_argument("--json", type=Path, help="also write the machine, settings and results as JSON")
    args = parser.parse_args()
    if args.steps_per_round < 2 or args.steps_per_round % 2:
        parser.error(f"--steps-per-round {args.steps_per_round} is invalid: Ditto splits it in half, so give an even "
                     "number of at least 2")
    if args.sites < 2:
        parser.error("--sites must be at least 2 to compare sites")

    torch.set_num_threads(2)
    run_started = time.monotonic()
    facts = machine()
    print("Machine:")
    for key, value in facts.items():
        print(f"  {key}: {value}")

    spec = json.loads(SPEC_PATH.read_text())
    spec = {**spec, "seed": args.seed, "spacing_mm": list(args.spacing_mm), "patch_size": list(args.patch_size)}
    # The engine's training Dataset reads deterministic preprocessing from the memo (see PreprocessCache).
    seg_engine.Dataset = CachedDataset
    budget = args.rounds * args.steps_per_round * args.sites
    print(f"\nSettings: {args.sites} sites x {args.cases} cases, val_fraction {args.val_fraction}, {args.rounds} rounds "
          f"x {args.steps_per_round} steps per site per round = {budget} local optimisation steps per arm "
          f"(batch size {spec['batch_size']} volume, {spec['samples_per_volume']} patches of "
          f"{'x'.join(map(str, spec['patch_size']))} per step), learning rate {spec['learning_rate']}, "
          f"FedProx mu {args.fedprox_mu}, Ditto lambda {args.ditto_lambda}, grid {spec['spacing_mm']} mm, generator "
          f"variation '{args.variation}'", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_fed_") as scratch:
        root = args.keep.resolve() if args.keep else Path(scratch)
        if args.keep and args.keep.exists() and any(args.keep.iterdir()):
            parser.error(f"--keep {args.keep} is not empty; give a new folder")
        started = time.monotonic()
        sites = build_federation(root, args)
        prepare_s = time.monotonic() - started
        print(f"\nGenerated and prepared {len(sites)} sites in {prepare_s:.0f} s:")
        for site in sites:
            print(f"  {site['name']}: {site['n_training']} training, {site['n_validation']} validation cases, spacing "
                  f"{site['spacing_mm']} mm, HU shift {site['hu_shift']:+g}, noise sigma {site['noise_sigma_hu']:g} HU")
            if site["appearance"]:
                look = site["appearance"]
                hu = {tissue: round(value) for tissue, value in site["expected_hu"].items()}
                print(f"    {look['phase']} phase, HU {hu}, kernel blur sigma {look['blur_sigma_mm']} mm, "
                      f"patient size x{look['anatomy_scale']:g}")
        federation = Federation(sites)
        site_names = [site["name"] for site in sites]
        base_job = job_with(spec)

        rows: list[dict] = []

        def add_rows(arm: str, outcome: dict) -> None:
            for name, model in outcome["models"].items():
                started_val = time.monotonic()
                dice = federation.validate(model, base_job)
                rows.append({"arm": arm, "name": name, "dice": dice, "mean": mean_value(dice),
                             "steps": outcome["steps"], "train_s": outcome["train_s"],
                             "val_s": time.monotonic() - started_val})
                trained = "" if outcome["train_s"] is None else f", trained in {outcome['train_s']:.0f} s"
                print(f"  {name}: site mean dice_mean {rows[-1]['mean']:.3f}{trained}", flush=True)

        print("\nTraining:", flush=True)
        seed_everything(args.seed)
        untrained = build_model(base_job)
        add_rows("untrained", {"models": {"untrained": untrained}, "steps": 0, "train_s": None})
        arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
        unknown = sorted(set(arms) - set(ARMS))
        if unknown:
            parser.error(f"--arms: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
        curves = {}
        if "pooled" in arms:
            pooled = train_pooled(federation, spec, args)
            curves["pooled"] = pooled["curve"]
            add_rows("pooled", pooled)
        if "alone" in arms:
            add_rows("site alone", train_site_alone(federation, spec, args))
        if "fedavg" in arms:
            fedavg = train_federated(federation, spec, args, 0.0)
            curves["FedAvg"] = fedavg["curve"]
            add_rows("FedAvg", fedavg)
        if "fedprox" in arms:
            fedprox = train_federated(federation, spec, args, args.fedprox_mu)
            curves["FedProx"] = fedprox["curve"]
            add_rows("FedProx", fedprox)
        def add_personal_rows(arm: str, name: str, outcome: dict, detail: str = "") -> None:
            """Validate each site's personal model at its own site only, as one row."""
            started_val = time.monotonic()
            dice = {}
            for index, model in enumerate(outcome["personal_models"]):
                dice.update(federation.validate(model, base_job, [index]))
            rows.append({"arm": arm, "name": name, "dice": dice, "mean": mean_value(dice), "steps": outcome["steps"],
                         "train_s": outcome["train_s"], "val_s": time.monotonic() - started_val})
            print(f"  {name}: site mean dice_mean {rows[-1]['mean']:.3f}, trained in {outcome['train_s']:.0f} s"
                  f"{detail}", flush=True)

        if "ditto" in arms:
            ditto = train_ditto(federation, spec, args)
            add_personal_rows("Ditto", f"Ditto personal (lambda {args.ditto_lambda:g})", ditto)
            add_rows("Ditto", ditto)
        if "fedbn" in arms:
            fedbn = train_fedbn(federation, spec, args)
            add_personal_rows("FedBN", "FedBN site models", fedbn,
                              f" ({len(fedbn['local_keys'])} norm-layer tensors kept local)")

        simulator = None
        if not args.skip_simulator and "fedavg" in arms:
            print("  FedAvg in the NVFlare simulator ...", flush=True)
            simulator = run_simulator(root, federation, spec, args)
            dice = {name: {key: ({"value": value["value"], "ci95": value.get("ci95")} if isinstance(value, dict)
                                 else None) for key, value in cells.items()}
                    for name, cells in simulator["dice"].items()}
            rows.append({"arm": "FedAvg (simulator)", "name": "FedAvg, NVFlare simulator", "dice": dice,
                         "mean": mean_value(dice), "steps": budget, "train_s": simulator["wall_s"], "val_s": None})
            print(f"  FedAvg (simulator): site mean dice_mean {rows[-1]['mean']}, wall {simulator['wall_s']:.0f} s",
                  flush=True)

    print("\nResults: dice_mean (mean over liver, aorta, lesion per case, then over cases) on each site's held-out "
          "cases, with the patient-level bootstrap 95 % interval. 'train s' is the training wall time of the arm "
          "(for the simulator row: the whole simulator run, see below); 'val s' is the time to validate the row's "
          "model(s).\n")
    print_table(rows, site_names)
    per_class_table(rows, site_names)

    by_name = {row["name"]: row for row in rows}
    verdicts = {
        "curves": curves,
        "preprocess_cache": {"cases": len(CACHE.entries), "cpu_s": CACHE.seconds, "per_case_cpu_s": CACHE.per_case_s},
        "untrained_mean": by_name["untrained"]["mean"],
    }
    print("\nTargets:")
    transfer = []
    if "alone" in arms:
        # Transfer loss: at each target site, the Dice of the model trained there minus the Dice of a model
        # trained at another site alone, so differences in difficulty between sites cancel.
        for target in site_names:
            local = by_name[f"{target} alone"]["dice"][target]["dice_mean"]["value"]
            for source in site_names:
                if source != target:
                    foreign = by_name[f"{source} alone"]["dice"][target]["dice_mean"]["value"]
                    transfer.append({"trained_at": source, "validated_at": target, "local_dice": local,
                                     "foreign_dice": foreign, "loss": local - foreign})
        print("  Dice lost when a site-alone model is used at another site (local model's Dice minus it):")
        for item in transfer:
            print(f"    trained at {item['trained_at']}, validated at {item['validated_at']}: "
                  f"{item['local_dice']:.3f} - {item['foreign_dice']:.3f} = {item['loss']:+.3f}")
        mean_loss = float(np.mean([item["loss"] for item in transfer]))
        verdicts["heterogeneity"] = {"mean_transfer_loss": mean_loss, "target": HETEROGENEITY_TARGET_LOSS,
                                     "met": mean_loss >= HETEROGENEITY_TARGET_LOSS}
        verdicts["site_alone_own_site_mean"] = float(np.mean(
            [by_name[f"{s} alone"]["dice"][s]["dice_mean"]["value"] for s in site_names]))
        print(f"  heterogeneity: mean Dice loss of a site-alone model at the other sites {mean_loss:.3f} "
              f"(target at least {HETEROGENEITY_TARGET_LOSS}): {'met' if verdicts['heterogeneity']['met'] else 'NOT met'}")
    else:
        print("  heterogeneity: not judged, because the 'alone' arm did not run")
    pooled_gain = by_name["pooled"]["mean"] - verdicts["untrained_mean"] if "pooled" in arms else None
    if pooled_gain is not None and pooled_gain < MIN_POOLED_GAIN:
        verdicts["not_judged"] = (f"pooled training gained {pooled_gain:.3f} Dice over the untrained model, less than "
                                  f"{MIN_POOLED_GAIN}")
        print(f"  FedAvg and personalisation: not judged, because {verdicts['not_judged']}; give a larger budget "
              "(--rounds)")
    elif "pooled" in arms and "fedavg" in arms:
        pooled_mean, fedavg_mean = by_name["pooled"]["mean"], by_name["FedAvg"]["mean"]
        ratio = fedavg_mean / pooled_mean if pooled_mean else None
        verdicts["fedavg_vs_pooled"] = {"fedavg_mean": fedavg_mean, "pooled_mean": pooled_mean, "ratio": ratio,
                                        "target": FEDAVG_TARGET_RATIO,
                                        "met": ratio is not None and ratio >= FEDAVG_TARGET_RATIO}
        print(f"  FedAvg / pooled site-mean Dice: {fedavg_mean:.3f} / {pooled_mean:.3f} = {ratio:.3f} "
              f"(target at least {FEDAVG_TARGET_RATIO}): {'met' if verdicts['fedavg_vs_pooled']['met'] else 'NOT met'}")
        gap = pooled_mean - fedavg_mean
        personal_means = {}
        if "ditto" in arms:
            personal_means["Ditto personal"] = by_name[f"Ditto personal (lambda {args.ditto_lambda:g})"]["mean"]
        if "fedbn" in arms:
            personal_means["FedBN"] = by_name["FedBN site models"]["mean"]
        recovered = {name: ((value - fedavg_mean) / gap if gap > 0 else None) for name, value in personal_means.items()}
        if personal_means:
            verdicts["personalisation"] = {
                "site_means": personal_means, "gap_pooled_minus_fedavg": gap, "share_recovered": recovered,
                "target": PERSONALISATION_TARGET_SHARE,
                "met": {name: None if share is None else share >= PERSONALISATION_TARGET_SHARE
                        for name, share in recovered.items()}}
        for name, value in personal_means.items():
            share = recovered[name]
            if share is None:
                print(f"  personalisation: FedAvg is not below pooled (gap {gap:+.3f}), so there is no gap to recover; "
                      f"{name} site mean {value:.3f}")
            else:
                print(f"  personalisation: {name} {value:.3f} recovers {share:.2f} of the gap {gap:.3f} between FedAvg "
                      f"and pooled (target at least {PERSONALISATION_TARGET_SHARE}): "
                      f"{'met' if share >= PERSONALISATION_TARGET_SHARE else 'NOT met'}")
    for name, curve in curves.items():
        final = by_name["pooled" if name == "pooled" else next(r["name"] for r in rows if r["arm"] == name)]
        points = [(point["steps"], point["site_mean"]) for point in curve if point["steps"] != final["steps"]]
        points.append((final["steps"], final["mean"]))
        print(f"  {name} convergence (site mean dice_mean after n steps): "
              + ", ".join(f"{steps}: {mean:.3f}" for steps, mean in points))

    if simulator is not None:
        fedavg_row = by_name["FedAvg"]
        sim_mean = by_name["FedAvg, NVFlare simulator"]["mean"]
        # The simulator also validates the received global model at every site before each round's training.
        # At the end, cross-site evaluation validates the global model and every site's local model at every site.
        n_sites = len(site_names)
        validations = args.rounds * n_sites + (1 + n_sites) * n_sites
        # The median over rows, because single validation times vary several-fold with other load on the machine.
        # In process, preprocessed cases come from the memo. The simulator preprocesses every case it reads,
        # so the comparison adds that time: one case per training step, and each validation's cases.
        n_validation = int(np.mean([site["n_validation"] for site in sites]))
        per_site_validation_s = float(np.median([row["val_s"] / len(row["dice"]) for row in rows
                                                 if row.get("val_s") is not None and row["dice"]]))
        per_site_validation_s += n_validation * CACHE.per_case_s
        uncached_train_s = fedavg_row["train_s"] + budget * CACHE.per_case_s
        verdicts["simulator"] = {
            "wall_s": simulator["wall_s"], "in_process_train_s": fedavg_row["train_s"],
            "in_process_train_s_without_memo_estimate": uncached_train_s,
            "overhead_s": simulator["wall_s"] - uncached_train_s,
            "validations_in_simulator": validations,
            "estimated_validation_s_in_process": validations * per_site_validation_s,
            "site_mean_dice": sim_mean, "in_process_site_mean_dice": fedavg_row["mean"],
        }
        print(f"  simulator: FedAvg took {simulator['wall_s']:.0f} s in the NVFlare simulator against "
              f"{fedavg_row['train_s']:.0f} s of in-process training with preprocessed cases from the memo, or about "
              f"{uncached_train_s:.0f} s with {budget} x {CACHE.per_case_s:.2f} s of preprocessing added "
              f"({simulator['wall_s'] / uncached_train_s:.2f}x). The simulator also ran {validations} site validations, which take about "
              f"{validations * per_site_validation_s:.0f} s in process at {per_site_validation_s:.1f} s each (median). "
              f"Final site-mean Dice {sim_mean if sim_mean is None else round(sim_mean, 3)} against "
              f"{fedavg_row['mean']:.3f} in process.")

    total_s = time.monotonic() - run_started
    print(f"\nTotal run time {total_s:.0f} s (generation and preparation {prepare_s:.0f} s); 1-minute load average at "
          f"the end {os.getloadavg()[0]:.2f}")
    if args.json:
        payload = {
            "machine": facts,
            "settings": {**vars(args), "json": str(args.json), "keep": str(args.keep) if args.keep else None,
                         "steps_per_arm": budget, "spec": spec},
            "sites": [{key: (str(value) if isinstance(value, Path) else value) for key, value in site.items()}
                      for site in sites],
            "rows": rows,
            "transfer": transfer,
            "verdicts": verdicts,
            "prepare_s": prepare_s,
            "total_s": total_s,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
