"""Round time and bytes per site with and without secure aggregation, in the NVFlare simulator.

Usage: python benchmarks/bench_secure_aggregation.py [--params 5e6 3e7] [--sites 3 8] [--rounds 4]
       [--train-seconds 0 30] [--json PATH]

For every model size and number of sites, the script runs the same federation twice, side by side in
one session: plaintext (NVFlare's FedAvg controller with fedimaging's checked aggregator, as in
``jobs/cls_fedavg``) and masked (fedimaging's ``SecureFedAvg`` workflow, as in ``jobs/seg_secagg``).
Sites stand in for training with one small random step (``benchmarks/secagg/bench_client.py``), so
the round time is the cost of the protocol and of moving the model, the part masking can change.
``--train-seconds`` adds a wait at each site for local training, as a site with its own hardware
spends it (a wait, not CPU work, because simulated sites share this machine's cores and real ones do
not). Masking runs through the product's own site code.

Round time: from the server's round start to the end of its aggregation, averaged over rounds 1 and
later (round 0 includes start-up); with ``--repeats``, the median over runs that alternate plain and
masked, so that changing load on a shared machine falls on both. Bytes: the serialized size of every message in round 0, to and
from each site, counted on the server (``bench_probe.ByteCounter``); later rounds are not counted so
the count does not slow the timed rounds. Cross-site evaluation and the PHI guard are left out of
both runs (the guard costs the same in both). Everything is written to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "app_custom"))
HERE = Path(__file__).resolve().parent / "secagg"
TASKS = {"plain": ["train"], "masked": ["train", "secagg_keys", "secagg_shares", "secagg_unmask"]}


def build_job(root: Path, mode: str, n_params: int, n_sites: int, rounds: int) -> tuple[Path, Path, Path]:
    from jobs.build import SPECS, export_job

    spec = json.loads((SPECS / "cls_fedavg.json").read_text())
    if mode == "masked":
        spec["secure_aggregation"] = {"phase_timeout_s": 600}
    job = export_job(f"bench_{mode}", root / "jobs", num_rounds=rounds, min_clients=n_sites, spec=spec)
    custom = job / "app" / "custom"
    for name in ("bench_model.py", "bench_client.py", "bench_probe.py"):
        shutil.copy(HERE / name, custom / name)
    timer_file, bytes_file = root / f"{mode}_rounds.json", root / f"{mode}_bytes.tsv"
    server_path = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_path.read_text())
    server["workflows"] = [w for w in server["workflows"] if not w["path"].endswith("CrossSiteModelEval")]
    for workflow in server["workflows"]:
        workflow["args"]["num_clients"] = n_sites
        workflow["args"]["num_rounds"] = rounds
    for component in server["components"]:
        if component.get("path", "").endswith("PTFileModelPersistor"):
            component["args"]["model"] = {"path": "bench_model.FlatNet", "args": {"n_params": n_params}}
    server["components"].append({"id": "round_timer", "path": "bench_probe.RoundTimer", "args": {"path": str(timer_file)}})
    server["task_data_filters"] = [{"tasks": TASKS[mode], "filters": [
        {"path": "bench_probe.ByteCounter", "args": {"path": str(bytes_file), "direction": "to_site"}}]}]
    server["task_result_filters"] = [{"tasks": TASKS[mode], "filters": [
        {"path": "bench_probe.ByteCounter", "args": {"path": str(bytes_file), "direction": "from_site"}}]}]
    server_path.write_text(json.dumps(server, indent=2))
    client_path = job / "app" / "config" / "config_fed_client.json"
    client = json.loads(client_path.read_text())
    client["executors"][0]["executor"]["args"]["task_script_path"] = "bench_client.py"
    client["task_result_filters"] = []
    client_path.write_text(json.dumps(client, indent=2))
    meta_path = job / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["min_clients"] = n_sites
    meta_path.write_text(json.dumps(meta, indent=2))
    return job, timer_file, bytes_file


def run_once(root: Path, mode: str, n_params: int, n_sites: int, rounds: int, train_seconds: float) -> dict:
    job, timer_file, bytes_file = build_job(root, mode, n_params, n_sites, rounds)
    workspace = root / "ws"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "BENCH_TRAIN_SECONDS": str(train_seconds)}
    started = time.monotonic()
    with open(root / "simulator.log", "w") as log:
        result = subprocess.run([sys.executable, "-m", "nvflare.cli", "simulator", str(job), "-w", str(workspace),
                                 "-n", str(n_sites), "-t", str(n_sites)], stdout=log, stderr=subprocess.STDOUT,
                                env=env, timeout=3600, check=False)
    wall = time.monotonic() - started
    if result.returncode != 0 or not timer_file.exists():
        raise RuntimeError(f"{mode} run failed; see {root / 'simulator.log'}")
    marks = json.loads(timer_file.read_text())
    starts = [m for m in marks if m > 0]
    ends = [-m for m in marks if m < 0]
    durations = [end - start for start, end in zip(starts, ends)]
    if len(durations) < rounds:
        raise RuntimeError(f"{mode} run completed {len(durations)} of {rounds} rounds; see {root / 'simulator.log'}")
    per_site_up, per_site_down = {}, {}
    for line in bytes_file.read_text().splitlines():
        direction, task, site, size = line.split("\t")
        target = per_site_up if direction == "from_site" else per_site_down
        target.setdefault(site, {}).setdefault(task, []).append(int(size))
    # Round 0 only: the first message of each task per site.
    up = statistics.mean(sum(v[0] for v in tasks.values()) for tasks in per_site_up.values())
    down = statistics.mean(sum(v[0] for v in tasks.values()) for tasks in per_site_down.values())
    return {"round_seconds": statistics.mean(durations[1:]), "round_seconds_each": durations, "wall_seconds": wall,
            "bytes_from_site": up, "bytes_to_site": down}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, nargs="+", default=[5e6, 3e7], help="model sizes (values)")
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 8], help="numbers of simulated sites")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each mode, alternating plain and masked; the median round time is kept")
    parser.add_argument("--train-seconds", type=float, nargs="+", default=[0.0],
                        help="local training time each site waits per round (default 0)")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON")
    args = parser.parse_args(argv)
    import torch

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    try:
        import nvflare

        machine["nvflare"] = nvflare.__version__
    except ImportError:
        pass
    print(f"machine: {machine}")
    rows = []
    for train_seconds in args.train_seconds:
        for n_params in [int(p) for p in args.params]:
            for n_sites in args.sites:
                runs = {"plain": [], "masked": []}
                for _ in range(args.repeats):
                    for mode in ("plain", "masked"):
                        with tempfile.TemporaryDirectory(prefix=f"secagg_{mode}_") as scratch:
                            runs[mode].append(run_once(Path(scratch), mode, n_params, n_sites, args.rounds,
                                                       train_seconds))
                figures = {}
                for mode, results in runs.items():
                    figures[mode] = dict(results[0])
                    figures[mode]["round_seconds"] = statistics.median(r["round_seconds"] for r in results)
                    figures[mode]["round_seconds_runs"] = [r["round_seconds"] for r in results]
                row = {"train_seconds": train_seconds, "params": n_params, "sites": n_sites,
                       **{f"{m}_{k}": v for m in figures for k, v in figures[m].items()}}
                row["time_ratio"] = figures["masked"]["round_seconds"] / figures["plain"]["round_seconds"]
                row["bytes_ratio"] = figures["masked"]["bytes_from_site"] / figures["plain"]["bytes_from_site"]
                rows.append(row)
                print(f"train {train_seconds:g} s, {n_params / 1e6:>5.1f}M params, {n_sites} sites: round {figures['plain']['round_seconds']:.2f} s plain, "
                      f"{figures['masked']['round_seconds']:.2f} s masked (x{row['time_ratio']:.2f}); "
                      f"upload per site {figures['plain']['bytes_from_site'] / 1e6:.2f} MB plain, "
                      f"{figures['masked']['bytes_from_site'] / 1e6:.2f} MB masked (x{row['bytes_ratio']:.3f}); "
                      f"download per site {figures['plain']['bytes_to_site'] / 1e6:.2f} MB plain, "
                      f"{figures['masked']['bytes_to_site'] / 1e6:.2f} MB masked", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
