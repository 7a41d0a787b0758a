"""The cost of a collective through Horovod against the machine's floor (``hvdtrain benchmark --collectives``).

Tensor parallelism lives on small collectives on the critical path (each block's allreduce waits for the compute
after the previous one), data parallelism on a few large ones. Each setting (a controller and Horovod's cycle time)
is one ``horovodrun`` launch whose ranks time, inside one ``tf.function``:

- a **chain** of dependent allreduces of 1 KB and 64 KB (each one's input is the previous one's result): the
  tensor-parallel pattern, where Horovod's background cycle and its negotiation are paid on every link;
- **single** allreduces of 1 MB and 16 MB (the data-parallel pattern: bandwidth).

The **floor** is the same chain and sizes directly through MPI (``MPI_Allreduce`` in a C program,
``benchmark/mpi_floor.c``, built with ``mpicc`` once per machine) on the same number of ranks. Settings are
interleaved (the order rotates each repeat), and medians and ratios to the floor are reported.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hvdtrain import artifacts, console
from hvdtrain.benchmark import launch, machine, progress
from hvdtrain.errors import HvdtrainError, UsageError

CHAIN_BYTES = (1024, 65536)
SINGLE_BYTES = (1 << 20, 16 << 20)
# oversubscribed MPI ranks spin while they wait: yielding lets the other rank of a 2-core machine run
MPI_ARGS = ["--mpi", "--mpi-args=--mca mpi_yield_when_idle 1"]
DEFAULT = "gloo;gloo,cycle=0.1;mpi;mpi,cycle=0.1"


def parse(text: str) -> dict[str, Any]:
    """``gloo`` or ``mpi``, then optional ``cycle=MS`` (Horovod's cycle time) and ``fusion=MB``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or parts[0] not in ("gloo", "mpi"):
        raise UsageError(f"collectives setting '{text}' must start with gloo or mpi, e.g. gloo,cycle=0.1")
    out: dict[str, Any] = {"controller": parts[0], "env": {}, "label": text}
    for part in parts[1:]:
        key, _, value = part.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1
        if key not in ("cycle", "fusion") or number < 0:
            raise UsageError(f"collectives setting '{text}': '{part}' is not cycle=MS or fusion=MB")
        if key == "cycle":
            out["env"]["HOROVOD_CYCLE_TIME"] = value
        else:
            out["env"]["HOROVOD_FUSION_THRESHOLD"] = str(int(number * 1024 * 1024))
    return out


def worker(spec: dict[str, Any]) -> dict[str, Any] | None:
    """On every rank: time the chains and the single collectives; rank 0 returns the medians."""
    from hvdtrain import distributed
    from hvdtrain.distributed import timing

    distributed.init()
    out: dict[str, Any] = {"chain": {}, "single": {}}
    for nbytes in spec["chain_bytes"]:
        out["chain"][str(nbytes)] = statistics.median(timing.time_chain(nbytes, spec["length"], spec["windows"]))
    for nbytes in spec["single_bytes"]:
        out["single"][str(nbytes)] = statistics.median(timing.time_allreduce(nbytes, spec["windows"]))
    return out if distributed.rank() == 0 else None


def floor_program() -> Path:
    """The MPI floor program, built with ``mpicc`` into the cache once per source version."""
    source = Path(__file__).with_name("mpi_floor.c")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    binary = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hvdtrain" / f"mpi_floor-{digest}"
    if binary.exists():
        return binary
    mpicc = shutil.which("mpicc")
    if not mpicc:
        raise HvdtrainError("mpicc is not installed (OpenMPI's compiler wrapper): run scripts/setup.sh, or leave "
                            "mpi-floor out of --settings")
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(".tmp")
    proc = subprocess.run([mpicc, "-O2", "-o", str(tmp), str(source)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HvdtrainError(f"building the MPI floor program failed: {proc.stderr.strip().splitlines()[-1:]}")
    tmp.replace(binary)
    return binary


def run_floor(np_: int, length: int, windows: int, timeout: float) -> dict[str, Any]:
    """The chain and single allreduces directly through MPI, on ``np_`` local ranks (rank 0's medians)."""
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    out: dict[str, Any] = {"chain": {}, "single": {}}
    for kind, sizes, n in (("chain", CHAIN_BYTES, length), ("single", SINGLE_BYTES, 1)):
        cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "--mca", "mpi_yield_when_idle", "1", "-np",
               str(np_), str(floor_program()), str(n), str(windows), *map(str, sizes)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise HvdtrainError(f"the MPI floor program failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                out[kind][str(row["bytes"])] = statistics.median(row["seconds"])
    return out


def run(settings: list[str], np_: int = 2, repeats: int = 3, length: int = 200, windows: int = 5,
        timeout: float = 600) -> dict[str, Any]:
    """Every setting (and ``mpi-floor``) ``repeats`` times, interleaved; the report with medians and ratios."""
    chosen = [s for s in settings if s != "mpi-floor"]
    parsed = [parse(s) for s in chosen]
    floor = "mpi-floor" in settings
    if floor:
        floor_program()  # fail before any launch when it cannot be built
    names = [p["label"] for p in parsed] + (["mpi-floor"] if floor else [])
    samples: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="hvdtrain-collectives-") as tmp:
        for rep in range(repeats):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for name in order:
                progress(f"repeat {rep + 1}/{repeats}: {name}")
                if name == "mpi-floor":
                    samples[name].append(run_floor(np_, length, windows, timeout))
                    continue
                setting = parsed[[p["label"] for p in parsed].index(name)]
                spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
                spec = {"kind": "collectives", "chain_bytes": list(CHAIN_BYTES), "single_bytes": list(SINGLE_BYTES),
                        "length": length, "windows": windows}
                spec_path.write_text(json.dumps(spec))
                args = ["--gloo"] if setting["controller"] == "gloo" else MPI_ARGS
                launch(np_, [sys.executable, "-m", "hvdtrain.benchmark", str(spec_path), str(result_path)], args,
                       timeout, env=setting["env"])
                samples[name].append(json.loads(result_path.read_text()))
    rows = []
    for name in names:
        for kind, sizes in (("chain", CHAIN_BYTES), ("single", SINGLE_BYTES)):
            for nbytes in sizes:
                rows.append({"setting": name, "pattern": kind, "bytes": nbytes,
                             "seconds": statistics.median(s[kind][str(nbytes)] for s in samples[name])})
    if floor:
        base = {(r["pattern"], r["bytes"]): r["seconds"] for r in rows if r["setting"] == "mpi-floor"}
        for r in rows:
            r["x_floor"] = r["seconds"] / base[(r["pattern"], r["bytes"])]
    return {"kind": "collectives", "machine": machine(), "ranks": np_, "repeats": repeats, "chain_length": length,
            "windows": windows, "settings": names, "results": rows,
            "method": "per setting one horovodrun launch per repeat, settings interleaved (order rotates); each "
                      "launch times `windows` windows (a chain of `chain_length` dependent collectives, or one "
                      "single collective, per window); medians over windows, then over repeats"}


def size_label(nbytes: int) -> str:
    return f"{nbytes >> 20} MB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KB"


def print_report(report: dict[str, Any]) -> None:
    """A table: microseconds per collective for each setting and size, and the ratio to the floor."""
    cols = [(k, b) for k, sizes in (("chain", CHAIN_BYTES), ("single", SINGLE_BYTES)) for b in sizes]
    head = "".join(f"{k + ' ' + size_label(b):>22s}" for k, b in cols)
    console.say(f"\ncollectives at {report['ranks']} ranks (µs per collective, median; x = times the MPI floor)")
    console.say(f"{'setting':18s}{head}")
    by = {(r["setting"], r["pattern"], r["bytes"]): r for r in report["results"]}
    for name in report["settings"]:
        cells = []
        for k, b in cols:
            r = by[(name, k, b)]
            ratio = f" ({r['x_floor']:.0f}x)" if "x_floor" in r else ""
            cells.append(f"{r['seconds'] * 1e6:>14.1f}{ratio:>8s}")
        console.say(f"{name:18s}" + "".join(cells))


def plot(report: dict[str, Any], run_dir) -> list[str]:
    """``benchmark.png``: microseconds per collective per setting, one panel per pattern and size (log scale)."""
    plt = artifacts.pyplot()
    cols = [(k, b) for k, sizes in (("chain", CHAIN_BYTES), ("single", SINGLE_BYTES)) for b in sizes]
    by = {(r["setting"], r["pattern"], r["bytes"]): r for r in report["results"]}
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.8), sharey=True)
    names = report["settings"]
    for ax, (k, b) in zip(axes, cols):
        values = [by[(n, k, b)]["seconds"] * 1e6 for n in names]
        ax.barh(range(len(names)), values, color=["tab:gray" if n == "mpi-floor" else "tab:blue" for n in names])
        ax.set_xscale("log")
        ax.set_title(f"{k} of {size_label(b)}: µs each")
        ax.grid(alpha=0.3, axis="x")
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
    axes[0].set_yticks(range(len(names)))
    axes[0].set_yticklabels(names)
    axes[0].invert_yaxis()
    fig.suptitle(f"one allreduce at {report['ranks']} ranks: Horovod settings against the MPI floor")
    fig.tight_layout()
    run_dir.save_figure(fig, "benchmark.png")
    return ["benchmark.png"]
