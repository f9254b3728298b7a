"""Time ``fedimaging demo`` (default and ``--fast``) end to end, as a user runs it.

Usage: python benchmarks/bench_demo.py [--skip-default] [--json PATH]
Prints the machine, each run's wall time and the steps' own timings from the demo's output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import monai
    import nvflare
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory_gb, 1), "python": platform.python_version(),
            "torch": str(torch.__version__), "monai": str(monai.__version__), "nvflare": nvflare.__version__,
            "cuda_available": torch.cuda.is_available()}


def run_demo(fast: bool) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "fedimaging", "demo", "--workspace", str(Path(scratch) / "demo")]
        if fast:
            command.append("--fast")
        started = time.monotonic()
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        elapsed = time.monotonic() - started
    if completed.returncode != 0:
        raise SystemExit(f"demo failed ({'fast' if fast else 'default'}):\n{completed.stdout}\n{completed.stderr}")
    steps = [line for line in completed.stdout.splitlines() if line.startswith("[")]
    return {"mode": "fast" if fast else "default", "wall_s": round(elapsed, 1), "steps": steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-default", action="store_true", help="time only --fast")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    results = {"machine": machine(), "runs": []}
    print("machine:", json.dumps(results["machine"]))
    for fast in ([True] if args.skip_default else [True, False]):
        run = run_demo(fast)
        results["runs"].append(run)
        print(f"fedimaging demo {'--fast' if fast else '(default)'}: {run['wall_s']:.0f} s")
        for step in run["steps"]:
            print("   ", step)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
