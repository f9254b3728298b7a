"""Helpers the end-to-end tests share: run the ``fedimaging`` command and write a site configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def fedimaging(*args, check: bool = True, env: dict | None = None, timeout: int = 1500) -> subprocess.CompletedProcess:
    """Run ``python -m fedimaging ARGS`` as a user would; with ``check``, fail the test on a non-zero exit."""
    result = subprocess.run([sys.executable, "-m", "fedimaging", *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, check=False, env=env)
    if check:
        assert result.returncode == 0, (f"fedimaging {' '.join(map(str, args))} failed:\n"
                                        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def write_site_config(path: Path, name: str, data_dir: Path, mapping: dict, extra: dict | None = None) -> Path:
    """Write a site YAML file with one torch thread, the given label mapping and any ``extra`` top-level keys."""
    lines = [f"site_name: {name}", f"data_dir: {data_dir}", "label_mapping:"]
    lines += [f"  {cls}: {json.dumps(source)}" for cls, source in mapping.items()]
    lines += [f"{key}: {json.dumps(value)}" for key, value in {"torch_threads": 1, **(extra or {})}.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
