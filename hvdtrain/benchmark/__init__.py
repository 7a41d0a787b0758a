"""``hvdtrain benchmark``: every benchmark launches ``horovodrun`` itself, once per setting, and each rank runs a
worker (``python -m hvdtrain.benchmark SPEC RESULT``) that times its part and reports to the chief.

- :mod:`~hvdtrain.benchmark.scaling`: throughput and scaling, allreduce bandwidth, hvdtrain against the canonical
  Horovod + Keras loop.
- :mod:`~hvdtrain.benchmark.layouts`: data, tensor and pipeline layouts of a language model at the same global
  batch, and the widest model each layout trains within a per-rank memory budget.
- :mod:`~hvdtrain.benchmark.inference`: generation speed (full window, cached, speculative).
- :mod:`~hvdtrain.benchmark.serving`: the OpenAI server under concurrent clients (it starts ``hvdtrain serve``).
- :mod:`~hvdtrain.benchmark.collectives`: the cost of one collective through Horovod against the MPI floor.

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

def command(args) -> None:
    """``hvdtrain benchmark`` with the parsed options ``args``: check them, run the benchmark they choose, write
    ``benchmark.json`` and its plots under ``args.output``, print the tables."""
    from hvdtrain import config, rundir
    from hvdtrain.benchmark import scaling
    from hvdtrain.errors import UsageError

    try:
        nps = sorted({int(n) for n in args.np.split(",") if n.strip()})
    except ValueError:
        raise UsageError(f"--np '{args.np}' must be rank counts separated by commas, e.g. 1,2") from None
    modes = [m.strip() for m in args.scaling.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("weak", "strong")]
    if bad or not modes or not nps or min(nps) < 1:
        raise UsageError("--scaling takes weak and/or strong; --np takes positive rank counts")
    launcher = args.launcher_args.split()
    if args.collectives is not None:
        from hvdtrain.benchmark import collectives

        settings = [s.strip() for s in (collectives.DEFAULT + ";mpi-floor" if args.collectives == "default"
                                        else args.collectives).split(";") if s.strip()]
        report = collectives.run(settings, max(nps), args.repeats, args.chain_length, args.windows, args.timeout)
        show = collectives.plot, collectives.print_report
    elif args.serving:
        from hvdtrain.benchmark import serving

        if not args.model:
            raise UsageError("--serving needs --model RUN (a trained language model)")
        try:
            levels = sorted({int(n) for n in args.concurrency.split(",") if n.strip()})
        except ValueError:
            raise UsageError(f"--concurrency '{args.concurrency}' must be client counts separated by commas, "
                             "e.g. 1,4,16") from None
        report = serving.run(args.model, args.draft, args.url, levels, args.requests, args.prompt_tokens,
                             args.max_tokens, args.repeats, args.slots)
        show = serving.plot, serving.print_report
    elif args.inference:
        from hvdtrain.benchmark import inference as bench

        if not args.model:
            raise UsageError("--inference needs --model RUN (a trained gpt)")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not args.draft:
            methods = [m for m in methods if m != "speculative"]
        try:
            batches = sorted({int(b) for b in args.batch.split(",") if b.strip()})
        except ValueError:
            raise UsageError(f"--batch '{args.batch}' must be batch sizes separated by commas, e.g. 1,8") from None
        report = bench.run(args.model, args.draft, batches, args.max_tokens, args.repeats, args.temperature, 4,
                           methods)
        show = bench.plot, bench.print_report
    elif args.layouts is not None:
        from hvdtrain.benchmark import layouts

        cfg = config.load(args.recipe or "gpt-tiny", args.config, args.overrides)
        names = layouts.DEFAULT if args.layouts == "default" else args.layouts
        chosen = [n for n in names.split(";") if n.strip()]
        if args.budget_mb:
            try:
                widths = [int(w) for w in args.widths.split(",") if w.strip()]
            except ValueError:
                raise UsageError(f"--widths '{args.widths}' must be widths separated by commas, e.g. 512,1024") \
                    from None
            report = layouts.largest(cfg, chosen, int(args.budget_mb * 2**20), widths, args.global_batch, args.timeout)
            show = layouts.plot_largest, layouts.print_largest
        else:
            report = layouts.run(cfg, chosen, [c.strip() for c in args.controllers.split(",") if c.strip()],
                                 args.repeats, args.steps, args.warmup_steps, args.windows, args.global_batch,
                                 args.timeout)
            show = layouts.plot, layouts.print_report
    elif args.compare_baseline:
        report = scaling.compare_baseline(args.recipe or "digits-cnn", args.overrides, max(nps), args.repeats,
                                          launcher, args.timeout)
        show = (lambda report, out: []), scaling.print_report
    else:
        cfg = config.load(args.recipe or "synthetic-resnet-small", args.config, args.overrides)
        report = scaling.scaling(cfg, nps, modes, cfg.data.batch_size_per_rank, args.steps, args.warmup_steps,
                                 args.repeats, launcher, args.timeout)
        show = scaling.plot, scaling.print_report
    out = rundir.for_command(args.output)
    out.write_json("benchmark.json", report)
    plot, print_report = show  # each benchmark's plots (under out; returns the file names) and tables
    written = plot(report, out)
    print_report(report)
    console.say("\nwritten: " + ", ".join(out.path(n) for n in ["benchmark.json", *written]))


# ---------------------------------------------------------------------------------------------------------------
# The driver: launches horovodrun


def horovodrun_path() -> str:
    """``horovodrun`` next to this Python, else on PATH."""
    here = Path(sys.executable).parent / "horovodrun"
    found = str(here) if here.exists() else shutil.which("horovodrun")
    if not found:
        raise HvdtrainError("horovodrun is not installed; run scripts/setup.sh (make setup)")
    return found


def launch(np_: int, command: list[str], launcher_args: list[str], timeout: float,
           env: dict[str, str] | None = None) -> None:
    """Run ``command`` on ``np_`` local ranks (with ``env`` added to this process's environment); fail with the
    tail of its output."""
    cmd = [horovodrun_path(), "-np", str(np_), "-H", f"localhost:{np_}", *launcher_args, *command]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).splitlines()
        errors = [ln for ln in lines if "Error" in ln or "error:" in ln and "horovod/runner" not in ln]
        raise HvdtrainError(f"benchmark launch at {np_} rank(s) failed: {(errors or lines or ['?'])[0].strip()}")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    from hvdtrain.flops import cpu_name

    return {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version()}


def progress(msg: str) -> None:
    """A line of progress on stderr."""
    console.say(f"[benchmark] {msg}", sys.stderr)



def worker_main(argv: list[str]) -> int:
    """Entry of ``python -m hvdtrain.benchmark SPEC RESULT`` on each rank."""
    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("kind") == "layout":
        from hvdtrain.benchmark.layouts import worker
    elif spec.get("kind") == "collectives":
        from hvdtrain.benchmark.collectives import worker
    else:
        from hvdtrain.benchmark.scaling import worker
    result = worker(spec)
    if result:
        artifacts.write_json(argv[1], result)
    return 0
