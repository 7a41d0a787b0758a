"""``hvdtrain benchmark``: every benchmark launches ``horovodrun`` itself, once per setting, and each rank runs a
worker (``python -m hvdtrain.benchmark SPEC RESULT``) that times its part and reports to the chief.

- :mod:`~hvdtrain.benchmark.scaling`: throughput and scaling, allreduce bandwidth, hvdtrain against the canonical
  Horovod + Keras loop.
- :mod:`~hvdtrain.benchmark.layouts`: data, tensor and pipeline layouts of a language model at the same global
  batch, and the widest model each layout trains within a per-rank memory budget.
- :mod:`~hvdtrain.benchmark.inference`: generation speed (full window, cached, speculative).

Figures on a shared machine are noisy: every comparison is interleaved (the order rotates each repeat) and repeated,
and reports medians and ratios.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from hvdtrain import artifacts, console
from hvdtrain.errors import HvdtrainError

ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------------------------
# The driver: launches horovodrun


def horovodrun_path() -> str:
    """``horovodrun`` next to this Python, else on PATH."""
    here = Path(sys.executable).parent / "horovodrun"
    found = str(here) if here.exists() else shutil.which("horovodrun")
    if not found:
        raise HvdtrainError("horovodrun is not installed; run scripts/setup.sh (make setup)")
    return found


def launch(np_: int, command: list[str], launcher_args: list[str], timeout: float) -> None:
    """Run ``command`` on ``np_`` local ranks; fail with the tail of its output."""
    cmd = [horovodrun_path(), "-np", str(np_), "-H", f"localhost:{np_}", *launcher_args, *command]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).splitlines()
        errors = [ln for ln in lines if "Error" in ln or "error:" in ln and "horovod/runner" not in ln]
        raise HvdtrainError(f"benchmark launch at {np_} rank(s) failed: {(errors or lines or ['?'])[0].strip()}")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version()}


def progress(msg: str) -> None:
    """A line of progress on stderr."""
    console.say(f"[benchmark] {msg}", sys.stderr)



def worker_main(argv: list[str]) -> int:
    """Entry of ``python -m hvdtrain.benchmark SPEC RESULT`` on each rank."""
    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("kind") == "layout":
        from hvdtrain.benchmark.layouts import worker
    else:
        from hvdtrain.benchmark.scaling import worker
    result = worker(spec)
    if result:
        artifacts.write_json(argv[1], result)
    return 0
