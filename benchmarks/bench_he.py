"""Round time and bytes per site for plaintext, masking and homomorphic encryption, in POC on loopback.

Usage: python benchmarks/bench_he.py [--channels 8,16,32,64 16,32,64,128] [--rounds 4] [--json PATH]

NVFlare's HE recipe rejects the simulator, so this benchmark runs a real deployment on this machine.
Kits come from ``fedimaging provision --he`` with the server named ``localhost``, so it listens on
loopback only. A server and three site processes run through ``fedimaging.deploy.kits.LocalDeployment``,
and the lead researcher submits the jobs through the FLARE API. For each model size the same federation runs three
jobs one after the other on the same processes:

- plain: the spec's FedAvg job (NVFlare's FedAvg controller with fedimaging's checked aggregator);
- masked: the same spec with ``secure_aggregation`` (fedimaging's ``SecureFedAvg``);
- he: the same spec with ``homomorphic_encryption`` (NVFlare's HE workflow, built by ``jobs/he.py``).

The spec is ``jobs/specs/demo_seg.json`` with the UNet channels given (``8,16,32,64`` is the demo
model, 152k parameters). Sites stand in for training with one small random step on the job's own
network (``benchmarks/he/bench_he_client.py``), so the round time is the cost of the protocol and of
moving the model. The jobs' PHI guard filter is removed (the sites' policy still runs it on every
result, the same in all three jobs); the HE job keeps its encryptor and decryptor filters.

Round time: the time between the starts of consecutive rounds on the server, averaged over rounds 1
and later (round 0 includes start-up). Bytes: the serialized size (FOBS) of the messages of the last
round, to and from each site, counted by a server filter (``benchmarks/he/bench_he_probe.py``); the
counting costs the same serialization in every job. Cross-site evaluation is left out. Everything is
written to a temporary folder, and every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "app_custom"))
HERE = Path(__file__).resolve().parent / "he"
SITES = ["site-1", "site-2", "site-3"]
LEAD = "researcher@consortium.example.org"
MODES = ("plain", "masked", "he")
TASKS = {"plain": ["train"], "masked": ["train", "secagg_keys", "secagg_shares", "secagg_unmask"], "he": ["train"]}
MAPPING = {"liver": {"label_value": 1}, "aorta": {"label_value": 2}, "lesion": {"label_value": 3}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build_job(root: Path, mode: str, channels: list[int], rounds: int) -> tuple[Path, Path, Path]:
    from jobs.build import SPECS, export_job

    spec = json.loads((SPECS / "demo_seg.json").read_text())
    spec["model"] = {"name": "unet", "channels": channels}
    if mode == "masked":
        spec["secure_aggregation"] = {"phase_timeout_s": 600}
    elif mode == "he":
        spec["homomorphic_encryption"] = {}
    job = export_job(f"bench_{mode}", root / "jobs", num_rounds=rounds, min_clients=len(SITES), spec=spec)
    custom = job / "app" / "custom"
    for name in ("bench_he_client.py", "bench_he_probe.py"):
        shutil.copy(HERE / name, custom / name)
    timer_file, bytes_file = root / f"{mode}_rounds.json", root / f"{mode}_bytes.tsv"
    server_path = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_path.read_text())
    server["workflows"] = [w for w in server["workflows"] if not w["path"].endswith("CrossSiteModelEval")]
    server["components"].append({"id": "round_timer", "path": "bench_he_probe.RoundTimer",
                                 "args": {"path": str(timer_file)}})
    server["task_data_filters"] = [{"tasks": TASKS[mode], "filters": [
        {"path": "bench_he_probe.ByteCounter", "args": {"path": str(bytes_file), "direction": "to_site"}}]}]
    server["task_result_filters"] = [{"tasks": TASKS[mode], "filters": [
        {"path": "bench_he_probe.ByteCounter", "args": {"path": str(bytes_file), "direction": "from_site"}}]}]
    server_path.write_text(json.dumps(server, indent=2))
    client_path = job / "app" / "config" / "config_fed_client.json"
    client = json.loads(client_path.read_text())
    client["executors"][0]["executor"]["args"]["task_script_path"] = "bench_he_client.py"
    for entry in client.get("task_result_filters", []):
        entry["filters"] = [f for f in entry["filters"] if not f["path"].endswith("PHIGuardFilter")]
    client["task_result_filters"] = [e for e in client.get("task_result_filters", []) if e["filters"]]
    client_path.write_text(json.dumps(client, indent=2))
    return job, timer_file, bytes_file


def figures(timer_file: Path, bytes_file: Path, rounds: int) -> dict:
    starts = json.loads(timer_file.read_text())
    if len(starts) < rounds:
        raise RuntimeError(f"{timer_file}: {len(starts)} of {rounds} rounds started")
    durations = [b - a for a, b in zip(starts, starts[1:])]
    per_site: dict[str, dict[str, dict[str, list[int]]]] = {"from_site": {}, "to_site": {}}
    for line in bytes_file.read_text().splitlines():
        direction, task, site, size = line.split("\t")
        per_site[direction].setdefault(site, {}).setdefault(task, []).append(int(size))

    def last_round(direction: str) -> float:
        return statistics.mean(sum(sizes[-1] for sizes in tasks.values()) for tasks in per_site[direction].values())

    return {"round_seconds": statistics.mean(durations[1:]), "round_seconds_each": durations,
            "bytes_from_site": last_round("from_site"), "bytes_to_site": last_round("to_site")}


def prepare_sites(root: Path) -> dict[str, dict]:
    from fedimaging.demo.radiology import generate_radiology_site
    from preprocessing.prepare_dicom import PrepareOptions, prepare_dicom

    sites = {}
    for index, site in enumerate(SITES):
        raw = root / site / "raw"
        generate_radiology_site(raw, site_index=index, n_cases=1, seed=index, image_size=48, n_slices=16)
        key = root / f"{site}.key"
        prepare_dicom(PrepareOptions(source=raw / "dicom", labels=raw / "labels", out=root / site / "prepared",
                                     site=site, key_file=key))
        sites[site] = {"data": root / site / "prepared", "key": key}
    return sites


def install_site_config(kit: Path, site: str, data: Path) -> None:
    lines = [f"site_name: {site}", f"data_dir: {data}", "label_mapping:"]
    lines += [f"  {name}: {json.dumps(source)}" for name, source in MAPPING.items()]
    lines += ["device: cpu", "torch_threads: 1"]
    (kit / "local" / "fedimaging_site.yaml").write_text("\n".join(lines) + "\n")


def run_job(kits, job: Path, root: Path, timeout_s: float) -> dict:
    from nvflare.fuel.flare_api.flare_api import MonitorReturnCode, new_secure_session

    session = new_secure_session(LEAD, str(kits.kit(LEAD)), timeout=60)
    try:
        submitted = root / "submit" / job.name
        shutil.copytree(job, submitted)  # submitting writes signatures into the folder
        job_id = session.submit_job(str(submitted))
        code, meta = session.monitor_job_and_return_job_meta(job_id, timeout=timeout_s, poll_interval=1)
    finally:
        session.close()
    if code != MonitorReturnCode.JOB_FINISHED or meta.get("status") != "FINISHED:COMPLETED":
        raise RuntimeError(f"{job.name}: {code}, {meta.get('status')}")
    return meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", nargs="+", default=["8,16,32,64", "16,32,64,128"],
                        help="UNet channels of each model size (comma-separated)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per job (the first is not timed)")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON")
    args = parser.parse_args(argv)
    import torch

    from fedimaging.deploy.kits import LocalDeployment, wait_for_port
    from fedimaging.deploy.provision import provision
    from fedimaging_app.config import JobConfig
    from fedimaging_app.models import build_model
    from jobs.build import SPECS

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    import nvflare
    import tenseal

    machine.update(nvflare=nvflare.__version__, tenseal=tenseal.__version__)
    print(f"machine: {machine}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_he_") as scratch:
        root = Path(scratch)
        port, admin_port = free_port(), free_port()
        kits = provision(root / "provision", server_name="localhost", fed_learn_port=port, admin_port=admin_port,
                         he=True)
        sites = prepare_sites(root / "data")
        for site in SITES:
            install_site_config(kits.kit(site), site, sites[site]["data"])
        home, tmp = root / "home", root / "tmp"
        home.mkdir()
        tmp.mkdir()
        with LocalDeployment(log_dir=root / "logs", environment={"HOME": str(home), "TMPDIR": str(tmp)}) as deployment:
            deployment.start_server(kits.kit("localhost"))
            if not wait_for_port("127.0.0.1", port, 60):
                raise RuntimeError(deployment.log_tail("localhost"))
            for site in SITES:
                deployment.start_client(kits.kit(site), environment={"FEDIMAGING_KEY_FILE": str(sites[site]["key"])})
            time.sleep(10)
            for text in args.channels:
                channels = [int(c) for c in text.split(",")]
                spec = dict(json.loads((SPECS / "demo_seg.json").read_text()),
                            model={"name": "unet", "channels": channels})
                net = build_model(JobConfig.model_validate(spec))
                n_params = sum(t.numel() for t in net.state_dict().values())
                n_tensors = len(net.state_dict())
                results = {}
                for mode in MODES:
                    job_root = root / f"{text.replace(',', '_')}_{mode}"
                    job, timer_file, bytes_file = build_job(job_root, mode, channels, args.rounds)
                    started = time.monotonic()
                    run_job(kits, job, job_root, timeout_s=1800)
                    results[mode] = figures(timer_file, bytes_file, args.rounds)
                    results[mode]["job_seconds"] = time.monotonic() - started
                row = {"channels": channels, "params": n_params, "tensors": n_tensors,
                       **{f"{m}_{k}": v for m in results for k, v in results[m].items()}}
                rows.append(row)
                plain = results["plain"]
                print(f"UNet {text} ({n_params} params, {n_tensors} tensors): round "
                      + ", ".join(f"{m} {results[m]['round_seconds']:.2f} s" for m in MODES)
                      + "; upload per site " + ", ".join(f"{m} {results[m]['bytes_from_site'] / 1e6:.3f} MB"
                                                        f" (x{results[m]['bytes_from_site'] / plain['bytes_from_site']:.1f})"
                                                        for m in MODES)
                      + "; download per site " + ", ".join(f"{m} {results[m]['bytes_to_site'] / 1e6:.3f} MB"
                                                          for m in MODES), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
