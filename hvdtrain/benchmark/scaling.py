"""Throughput, scaling and allreduce, and the side-by-side comparison with plain Horovod + Keras.

``hvdtrain benchmark`` launches ``horovodrun`` itself for each rank count (``--np 1,2``) and each scaling mode:
*weak* keeps the batch per rank fixed, *strong* keeps the global batch fixed. Each launch trains the model on one
synthetic batch repeated (no input-pipeline cost), excludes warm-up steps, times several windows of steps and
reports the median; at more than one rank it also times allreduce for message sizes from 1 KB to 64 MB and
reports the bus bandwidth (``2 (n - 1) / n x bytes / time``, the convention of nccl-tests).

``hvdtrain benchmark --compare-baseline`` trains the same recipe with ``hvdtrain train`` and with the canonical
pattern of Horovod's own Keras examples (``scripts/baseline_horovod_keras.py``), interleaved (the order alternates
each repeat) and repeated, and reports each side's median and the ratio per repeat.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hvdtrain import artifacts, config, console
from hvdtrain.benchmark import ROOT, launch, machine, progress
from hvdtrain.errors import UsageError

ALLREDUCE_SIZES = [1024 * 4**i for i in range(9)]  # 1 KB .. 64 MB


# ---------------------------------------------------------------------------------------------------------------
# The worker: runs on every rank under horovodrun


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Time training steps (and allreduce) at the current world size; the chief returns the result."""
    from hvdtrain import distributed, runtime

    cfg = config.from_dict(spec["config"])
    runtime.begin(cfg)
    import numpy as np
    import tensorflow as tf

    from hvdtrain import data

    size = distributed.size()
    per_rank = spec["batch_size_per_rank"] if spec["mode"] == "weak" else spec["global_batch_size"] // size
    if per_rank < 1:
        raise UsageError(f"a global batch of {spec['global_batch_size']} cannot be split over {size} ranks")
    synthetic = dataclasses.replace(cfg.data, source="synthetic", num_examples=2 * per_rank + 2)  # 10% held out
    source = data.load(synthetic, seed=distributed.rank(), model_name=cfg.model.name)
    x, y = source.x_train[:per_rank], source.y_train[:per_rank]
    dataset = data.without_autotune(tf.data.Dataset.from_tensors((x, y)).repeat())
    plan = runtime.model_plan(cfg.model, source) if source.is_language_model else None
    # a language model's MFU: the peak probed by every rank at once, before any model is made
    peak = runtime.job_peak_flops(cfg.train.precision) if plan is not None else None

    model = runtime.prepare(runtime.build_model(cfg.model, source), cfg, cfg.train.learning_rate, metrics=[])
    spe = cfg.train.steps_per_execution
    steps = max(spe, spec["steps"] // spe * spe)
    warmup = max(spe, spec["warmup_steps"] // spe * spe)
    model.fit(dataset, steps_per_epoch=warmup, epochs=1, verbose=0,
              callbacks=[distributed.broadcast_callback(0)])
    times = []
    for _ in range(spec["repeats"]):
        distributed.barrier()
        start = time.perf_counter()
        model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
        times.append(time.perf_counter() - start)
    # The slowest rank sets the pace of a synchronous job: each repeat's time is the ranks' maximum.
    times = [float(t) for t in distributed.allreduce(times, op="max")] if size > 1 else times
    per_item = int(np.prod(source.input_shape)) if source.is_language_model else 1
    result = {
        "np": size, "mode": spec["mode"], "batch_size_per_rank": per_rank, "global_batch_size": per_rank * size,
        "steps": steps, "seconds": times, "task": source.task,
        "throughput": per_rank * size * steps * per_item / statistics.median(times),
        "unit": "tokens/s" if source.is_language_model else "examples/s",
    }
    if peak is not None:
        result.update(model_flops_per_token=plan.flops_per_token(), peak_flops=peak[0], peak_source=peak[1],
                      mfu=result["throughput"] * plan.flops_per_token() / peak[0])
    if size > 1 and spec.get("allreduce"):
        from hvdtrain.distributed import timing

        result["allreduce"] = []
        for nbytes in ALLREDUCE_SIZES:
            reps = 20 if nbytes <= 1 << 20 else 5
            t = statistics.median(timing.time_allreduce(nbytes, reps))
            result["allreduce"].append({"bytes": nbytes, "seconds": t, "algbw_gbps": nbytes / t / 1e9,
                                        "busbw_gbps": nbytes / t / 1e9 * 2 * (size - 1) / size})
    return result if distributed.is_chief() else {}


def scaling(cfg: config.Config, nps: list[int], modes: list[str], batch_size_per_rank: int, steps: int,
            warmup_steps: int, repeats: int, launcher_args: list[str], timeout: float) -> dict[str, Any]:
    """Throughput per rank count and mode, and allreduce bandwidth; efficiency against the smallest rank count."""
    results, allreduce = [], {}
    base_np = min(nps)
    with tempfile.TemporaryDirectory(prefix="hvdtrain-bench-") as tmp:
        for mode in modes:
            for np_ in nps:
                spec = {"config": config.to_dict(cfg), "mode": mode, "batch_size_per_rank": batch_size_per_rank,
                        "global_batch_size": batch_size_per_rank * max(nps), "steps": steps,
                        "warmup_steps": warmup_steps, "repeats": repeats, "allreduce": mode == modes[0]}
                spec_file, result_file = Path(tmp, f"{mode}-{np_}.json"), Path(tmp, f"{mode}-{np_}.out.json")
                spec_file.write_text(json.dumps(spec))
                progress(f"{mode} scaling, {np_} rank(s) ...")
                launch(np_, [sys.executable, "-m", "hvdtrain.benchmark", str(spec_file), str(result_file)],
                       launcher_args, timeout)
                result = json.loads(result_file.read_text())
                if "allreduce" in result:
                    allreduce[str(np_)] = result.pop("allreduce")
                results.append(result)
    for r in results:
        base = next(b for b in results if b["mode"] == r["mode"] and b["np"] == base_np)
        r["speedup"] = r["throughput"] / base["throughput"]
        r["efficiency"] = r["speedup"] / (r["np"] / base_np)
    return {"kind": "scaling", "model": cfg.model.name, "machine": machine(), "results": results,
            "allreduce": allreduce, "method": f"median of {repeats} windows of {steps} steps after {warmup_steps} "
                                              "warm-up steps, synthetic data, one launch per rank count and mode"}


def compare_baseline(recipe: str | None, overrides: list[str], np_: int, repeats: int, launcher_args: list[str],
                     timeout: float) -> dict[str, Any]:
    """hvdtrain's training loop against the canonical Horovod + Keras loop, interleaved and repeated."""
    cfg = config.load(recipe, None, ["data.validation_fraction=0.0", *overrides])
    if cfg.data.source != "digits" or cfg.model.name not in ("cnn", "mlp") or cfg.train.optimizer != "adam":
        raise UsageError("--compare-baseline runs a digits recipe with the cnn or mlp model and adam "
                         "(the baseline script mirrors exactly that); e.g. --recipe digits-cnn")
    baseline = ROOT / "scripts" / "baseline_horovod_keras.py"
    if not baseline.is_file():
        raise UsageError(f"{baseline} is missing; run the comparison from a checkout of hvdtrain")
    rows = []
    with tempfile.TemporaryDirectory(prefix="hvdtrain-compare-") as tmp:
        cfg_file = Path(tmp, "config.yaml")
        cfg_file.write_text(config.to_yaml(cfg))
        for i in range(repeats):
            order = ["hvdtrain", "baseline"] if i % 2 == 0 else ["baseline", "hvdtrain"]
            row = {"repeat": i + 1, "first": order[0]}
            for side in order:
                progress(f"repeat {i + 1}/{repeats}: {side} at {np_} rank(s) ...")
                if side == "hvdtrain":
                    out = Path(tmp, f"hvdtrain-{i}")
                    launch(np_, [sys.executable, "-m", "hvdtrain.cli", "train", "--config", str(cfg_file),
                                 "--output", str(out)], launcher_args, timeout)
                    row["hvdtrain"] = json.loads((out / "summary.json").read_text())["examples_per_sec"]
                else:
                    out_file = Path(tmp, f"baseline-{i}.json")
                    launch(np_, [sys.executable, str(baseline), "--model", cfg.model.name,
                                 "--epochs", str(cfg.train.epochs),
                                 "--batch-size-per-rank", str(cfg.data.batch_size_per_rank),
                                 "--learning-rate", str(cfg.train.learning_rate), "--result", str(out_file),
                                 "--checkpoint-dir", tmp],
                           launcher_args, timeout)
                    row["baseline"] = json.loads(out_file.read_text())["examples_per_sec"]
            row["ratio"] = row["hvdtrain"] / row["baseline"]
            rows.append(row)
    ratios = [r["ratio"] for r in rows]
    return {
        "kind": "compare-baseline", "model": cfg.model.name, "np": np_, "machine": machine(),
        "config": config.to_dict(cfg), "repeats": rows,
        "hvdtrain_median": statistics.median(r["hvdtrain"] for r in rows),
        "baseline_median": statistics.median(r["baseline"] for r in rows),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "method": "examples/s = median over epochs after the first; launches interleaved, order alternating",
    }


def plot(report: dict[str, Any], run_dir) -> list[str]:
    """``benchmark.png`` of a scaling report under ``run_dir``; returns the file names written."""
    plot_scaling(report, run_dir.path("benchmark.png"))
    return ["benchmark.png"]


def plot_scaling(report: dict[str, Any], path: str) -> None:
    """Throughput against ranks (with ideal scaling) and allreduce bus bandwidth against message size."""
    plt = artifacts.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    for mode in sorted({r["mode"] for r in report["results"]}):
        rows = sorted((r for r in report["results"] if r["mode"] == mode), key=lambda r: r["np"])
        nps = [r["np"] for r in rows]
        ax.plot(nps, [r["throughput"] for r in rows], marker="o", label=f"{mode} scaling")
        ax.plot(nps, [rows[0]["throughput"] * n / nps[0] for n in nps], ls="--", color="grey", lw=1)
    ax.set_xlabel("ranks")
    ax.set_xticks(sorted({r["np"] for r in report["results"]}))
    ax.set_ylabel(report["results"][0]["unit"])
    ax.set_title(f"{report['model']} throughput (dashed: ideal)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    for np_, rows in report["allreduce"].items():
        ax.plot([r["bytes"] for r in rows], [r["busbw_gbps"] for r in rows], marker="o", label=f"{np_} ranks")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title("allreduce")
    ax.grid(alpha=0.3)
    if report["allreduce"]:
        ax.legend()
    fig.tight_layout()
    artifacts.save_figure(fig, path)


def print_report(report: dict[str, Any]) -> None:
    """Tables for people."""
    if report["kind"] == "scaling":
        cols = ["mode", "np", "batch_size_per_rank", "global_batch_size", "throughput", "speedup", "efficiency"]
        cols += ["mfu"] if all("mfu" in r for r in report["results"]) else []
        console.say(artifacts.format_table(report["results"], cols))
        for np_, rows in report["allreduce"].items():
            console.say(f"\nallreduce at {np_} ranks")
            table = [{"bytes": r["bytes"], "ms": r["seconds"] * 1e3, "busbw_GB/s": r["busbw_gbps"]} for r in rows]
            console.say(artifacts.format_table(table))
    else:
        console.say(artifacts.format_table(report["repeats"], ["repeat", "first", "hvdtrain", "baseline", "ratio"]))
        console.say(f"\nmedian examples/s: hvdtrain {report['hvdtrain_median']:.0f}, baseline "
              f"{report['baseline_median']:.0f}; ratio median {report['ratio_median']:.2f} "
              f"(min {report['ratio_min']:.2f}, max {report['ratio_max']:.2f})")


