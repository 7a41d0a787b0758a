"""Layouts of a ``gpt`` side by side at the same global batch: data, tensor and pipeline parallelism, sharded
optimizer states, under Horovod's Gloo and MPI controllers.

``hvdtrain benchmark --layouts "dp=1;dp=2;tp=2;dp=2,zero;pp=2,m=4"`` launches ``horovodrun`` once per layout and
controller, interleaved (the order rotates each repeat), and every launch trains on synthetic tokens: warm-up
steps, then timed windows. Reported per layout: tokens per second (median), milliseconds per step, bytes each rank
holds (parameters, of which sharded, optimizer state) and its measured peak memory (the growth of the resident set
from before the model was made; beside the one-rank figure and the ideal 1 / (tensor x pipeline [x data with
ZeRO])), the collectives each rank ran per step (counted in the graph
by :class:`hvdtrain.distributed.mesh.Traffic`; for pure data parallelism the gradient tensors Horovod's optimizer
reduces), and for pipelines the measured idle fraction of each stage in one step against GPipe's
``(p - 1) / (M + p - 1)``, with a timeline picture of that step.

A layout is written ``dp=2,tp=2,pp=2,m=4,gpipe,zero,fsdp,recompute,seq`` (defaults 1, 1, 1, 1, 1f1b, off, off, off,
off; ``fsdp``: the weights sharded over the data group, ZeRO-3; ``seq``: sequence parallelism in the tensor group).
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

from hvdtrain import artifacts, config, console, flops
from hvdtrain.benchmark import launch, machine, progress
from hvdtrain.errors import UsageError

DEFAULT = "dp=1;dp=2;tp=2;dp=2,zero;pp=2,m=4,gpipe;pp=2,m=4,1f1b;dp=2,tp=2;dp=2,pp=2,m=2;tp=2,pp=2,m=2"
CONTROLLER_ARGS = {"gloo": ["--gloo"],
                   # oversubscribed MPI ranks spin while waiting: yielding took a small allreduce from ~90 to ~2 ms
                   "mpi": ["--mpi", "--mpi-args=--mca mpi_yield_when_idle 1"]}


FLAGS = {"zero": "shard_optimizer", "fsdp": "shard_params", "recompute": "recompute", "seq": "sequence"}
SETTINGS = ("tensor", "pipeline", "microbatches", "schedule", "shard_optimizer", "shard_params", "prefetch",
            "buckets_per_unit", "shard_degree", "recompute", "sequence")


def parse(text: str) -> dict[str, Any]:
    """``dp=2,tp=2,pp=2,m=4,gpipe,zero,fsdp,b=2,s=2,recompute,seq`` as a dict of the parallel settings and
    ``ranks`` (``s``: the shard degree, hybrid sharding)."""
    out = {"data": 1, "tensor": 1, "pipeline": 1, "microbatches": 1, "schedule": "1f1b", "shard_optimizer": False,
           "shard_params": False, "prefetch": True, "buckets_per_unit": 0, "shard_degree": 0, "recompute": False,
           "sequence": False}
    keys = {"dp": "data", "tp": "tensor", "pp": "pipeline", "m": "microbatches", "b": "buckets_per_unit",
            "s": "shard_degree"}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if "=" in part:
            key, value = part.split("=", 1)
            if key not in keys or not value.isdigit() or int(value) < 1:
                raise UsageError(f"layout '{text}': '{part}' is not one of dp=N, tp=N, pp=N, m=N, b=N, s=N")
            out[keys[key]] = int(value)
        elif part in ("gpipe", "1f1b"):
            out["schedule"] = part
        elif part in FLAGS:
            out[FLAGS[part]] = True
        elif part == "noprefetch":  # sharded parameters: each unit gathers when it starts
            out["prefetch"] = False
        else:
            raise UsageError(f"layout '{text}': unknown part '{part}' (use dp=N, tp=N, pp=N, m=N, b=N, s=N, gpipe, "
                             "1f1b, zero, fsdp, noprefetch, recompute, seq)")
    out["ranks"] = out["data"] * out["tensor"] * out["pipeline"]
    return out


def label(layout: dict[str, Any]) -> str:
    """A short name: ``dp2 x tp2``, ``pp2 (1f1b, M=4)``, ``+zero``."""
    parts = [f"{k}{layout[v]}" for k, v in (("dp", "data"), ("tp", "tensor"), ("pp", "pipeline")) if layout[v] > 1]
    name = " x ".join(parts) or "1 rank"
    if layout["pipeline"] > 1:
        name += f" ({layout['schedule']}, M={layout['microbatches']})"
    return name + "".join(f"+{flag}" for flag, key in FLAGS.items() if layout.get(key)) + (
        "+noprefetch" if layout.get("prefetch") is False else "") + (
        f"+b{layout['buckets_per_unit']}" if layout.get("buckets_per_unit", 0) > 0 else "") + (  # 0: by size
        f"+s{layout['shard_degree']}" if layout.get("shard_degree", 0) > 0 else "")


# ---------------------------------------------------------------------------------------------------------------
# The worker: runs on every rank of one launch


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Time ``spec``'s layout on this job; the chief returns the result."""
    import numpy as np
    import tensorflow as tf

    from hvdtrain import data, distributed, memory, parallel, runtime
    from hvdtrain.distributed import pipeline
    from hvdtrain.distributed.mesh import Traffic
    from hvdtrain.distributed.sharded import bytes_of

    cfg = config.from_dict(spec["config"])
    mesh = runtime.begin(cfg)
    peak, peak_source = runtime.job_peak_flops(cfg.train.precision)  # every rank at once, before any model
    start_bytes = memory.resident_bytes()  # TensorFlow and Horovod loaded, no model yet
    per_replica = spec["global_batch_size"] // mesh.data
    synthetic = dataclasses.replace(cfg.data, source="synthetic", num_examples=2 * per_replica + 2)  # 10% held out
    source = data.load(synthetic, seed=mesh.data_rank, model_name=cfg.model.name)
    dataset = data.without_autotune(
        tf.data.Dataset.from_tensors((source.x_train[:per_replica], source.y_train[:per_replica])).repeat())
    layout = runtime.make_layout(cfg, source, mesh)
    model = runtime.prepare(layout.training_model, cfg, cfg.train.learning_rate, layout=layout, metrics=[])
    model.fit(dataset, steps_per_epoch=spec["warmup_steps"], epochs=1, verbose=0,
              callbacks=[c for c in [layout.broadcast_callback()] if c is not None])
    pipe = layout.pipeline if isinstance(layout, parallel.Parallel) else None
    before = Traffic.snapshot()
    moved = (int(pipe.sent.numpy()), int(pipe.received.numpy())) if pipe else (0, 0)
    clock = pipe.clock.numpy() if pipe else None
    times, steps_seconds = [], []

    class StepClock(tf.keras.callbacks.Callback):
        """Each timed step's length on this rank (the windows' times also hold what ``fit`` does around them)."""

        def on_train_batch_begin(self, batch, logs=None):
            self.began = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            steps_seconds.append(time.perf_counter() - self.began)

    for _ in range(spec["windows"]):
        distributed.barrier()
        start = time.perf_counter()
        model.fit(dataset, steps_per_epoch=spec["steps"], epochs=1, verbose=0, callbacks=[StepClock()])
        times.append(time.perf_counter() - start)
    steps = spec["steps"] * spec["windows"]
    after = Traffic.snapshot()
    traffic = {k: {"calls": (v["calls"] - before.get(k, {}).get("calls", 0)) / steps,
                   "bytes": (v["bytes"] - before.get(k, {}).get("bytes", 0)) / steps} for k, v in after.items()}
    if isinstance(layout, parallel.DataParallel) and mesh.data > 1:  # Horovod's optimizer: one tensor per weight
        variables = layout.model.trainable_variables
        traffic["data_allreduce (tensors, fused by Horovod)"] = {
            "calls": len(variables), "bytes": bytes_of(variables)}
    if pipe:
        traffic["edge_received"] = {"calls": None, "bytes": (int(pipe.received.numpy()) - moved[1]) * 4 / steps}
    # every rank's view, to the chief: the slowest rank sets the pace of a synchronous job
    held = {**layout.memory(), "peak_memory_bytes": memory.peak_bytes(), "start_memory_bytes": start_bytes}
    held["peak_growth_bytes"] = held["peak_memory_bytes"] - start_bytes
    report = {"rank": mesh.rank, "stage": mesh.stage, "times": times, "steps": steps_seconds, "memory": held,
              "traffic": traffic,
              "timings": pipe.timings.numpy().tolist() if pipe else None,
              "clock": (pipe.clock.numpy() - clock).tolist() if pipe else None}
    ranks = distributed.allgather_object(report)
    if not distributed.is_chief():
        return {}
    tokens = spec["global_batch_size"] * source.input_shape[0]
    slowest = [max(r["times"][i] for r in ranks) for i in range(spec["windows"])]
    result = {
        "layout": spec["layout"], "label": label(spec["layout"]), "controller": distributed.controller(),
        "ranks": mesh.world, "global_batch_size": spec["global_batch_size"], "steps_per_window": spec["steps"],
        "window_seconds": slowest, "step_ms": 1e3 * statistics.median(slowest) / spec["steps"],
        # each timed step, the slowest rank's (a step's length, not counting fit's work between windows)
        "steps_ms": [1e3 * max(r["steps"][i] for r in ranks) for i in range(len(ranks[0]["steps"]))],
        "tokens_per_sec": tokens * spec["steps"] / statistics.median(slowest),
        "memory": {k: max(r["memory"][k] for r in ranks) for k in ranks[0]["memory"]},
        "peak_growth_bytes_per_rank": [r["memory"]["peak_growth_bytes"] for r in ranks],
        "traffic_per_rank_per_step": {k: {f: max((r["traffic"].get(k, {}).get(f) or 0) for r in ranks)
                                          for f in ("calls", "bytes")} for k in ranks[0]["traffic"]},
    }
    plan = runtime.model_plan(cfg.model, source)
    result.update(model_flops_per_token=plan.flops_per_token(), peak_flops=peak, peak_source=peak_source,
                  hardware_flops_per_token=plan.flops_per_token(cfg.parallel.recompute),
                  hosts=max(1, mesh.world // distributed.local_size()))
    if pipe:
        p, m = mesh.pipeline, cfg.parallel.microbatches
        table = pipeline.timetable(cfg.parallel.schedule, p, m)
        stages = {}
        for r in ranks:  # one rank per stage is enough: the stage's replicas and shards run in step
            stages.setdefault(r["stage"], np.array(r["timings"]))
        t0 = min(t[:, 0].min() for t in stages.values())
        span = max(t[:, 1].max() for t in stages.values()) - t0
        busy = {s: float((t[:, 1] - t[:, 0]).sum()) for s, t in stages.items()}
        # over every timed step: each stage's busy time against the steps' length (the longest stage's: the stages
        # start each step together, after the previous step's collectives)
        longest = max(r["clock"][1] for r in ranks)
        idle = [float(np.mean([1 - r["clock"][0] / longest for r in ranks if r["stage"] == q])) for q in range(p)]
        result["pipeline"] = {
            "stages": p, "microbatches": m, "schedule": cfg.parallel.schedule, "step_seconds": span,
            "busy_seconds": [busy[s] for s in range(p)],
            "idle_fraction_measured": 1 - sum(busy.values()) / (p * span),
            "idle_fraction_all_steps": sum(idle) / p, "idle_fraction_all_steps_per_stage": idle,
            "timed_steps": int(ranks[0]["clock"][2]),
            "idle_fraction_gpipe_theory": (p - 1) / (m + p - 1),
            "idle_fraction_timetable": pipeline.bubble_fraction(table),
            "peak_activations_per_stage": [pipeline.peak_activations(table, s) for s in range(p)],
            "ops": {str(s): [[float(a - t0), float(b - t0)] for a, b in stages[s]] for s in range(p)},
            "op_names": {str(s): [repr(o) for o in pipeline.stage_ops(cfg.parallel.schedule, s, p, m)]
                         for s in range(p)},
        }
    return result


# ---------------------------------------------------------------------------------------------------------------
# The driver


def run(cfg: config.Config, layouts: list[str], controllers: list[str], repeats: int, steps: int, warmup_steps: int,
        windows: int, global_batch_size: int, timeout: float) -> dict[str, Any]:
    """Every layout under every controller, ``repeats`` launches each, interleaved; medians per setting."""
    import models

    if not models.has_plan(cfg.model.name):
        raise UsageError(f"--layouts compares layouts of a model family with a parallel plan, not "
                         f"'{cfg.model.name}'; give --recipe gpt-tiny (or a config of such a family)")
    bad = [c for c in controllers if c not in CONTROLLER_ARGS]
    if bad:
        raise UsageError(f"--controllers takes gloo and/or mpi, not {', '.join(bad)}")
    specs = [parse(t) for t in layouts]
    for s in specs:
        if global_batch_size % (s["data"] * s["microbatches"]):
            raise UsageError(f"global batch {global_batch_size} does not split into {s['data']} replica(s) x "
                             f"{s['microbatches']} micro-batches ({label(s)}); change --global-batch")
    settings = [(s, c) for s in specs for c in controllers]
    results: dict[int, list[dict]] = {i: [] for i in range(len(settings))}
    with tempfile.TemporaryDirectory(prefix="hvdtrain-layouts-") as tmp:
        for repeat in range(repeats):
            order = list(range(len(settings)))
            order = order[repeat % len(order):] + order[: repeat % len(order)]  # rotate: no setting always first
            for i in order:
                layout, controller = settings[i]
                raw = config.apply_overrides(config.to_dict(cfg), [
                    f"parallel.{k}={json.dumps(layout[k])}" for k in SETTINGS])
                layout_cfg = config.from_dict(raw)  # validated: a bad layout stops here, with its reason
                spec = {"kind": "layout", "config": config.to_dict(layout_cfg), "layout": layout,
                        "global_batch_size": global_batch_size, "steps": steps, "warmup_steps": warmup_steps,
                        "windows": windows}
                spec_file, result_file = Path(tmp, f"{i}-{repeat}.json"), Path(tmp, f"{i}-{repeat}.out.json")
                spec_file.write_text(json.dumps(spec))
                progress(f"repeat {repeat + 1}/{repeats}: {label(layout)} with {controller} ...")
                launch(layout["ranks"], [sys.executable, "-m", "hvdtrain.benchmark", str(spec_file),
                                         str(result_file)], CONTROLLER_ARGS[controller], timeout)
                results[i].append(json.loads(result_file.read_text()))
    launches = [r for runs in results.values() for r in runs]
    if all(r["peak_source"] == flops.PROBE for r in launches):
        # measured on the CPU: one peak per host for every row (each launch uses every core of its hosts), the best
        # any launch measured (each keeps its best for the next, so later launches could see more than earlier)
        host_peak = max(r["peak_flops"] / r["hosts"] for r in launches)
        for r in launches:
            r["peak_flops"] = host_peak * r["hosts"]
    for r in launches:
        r["mfu"] = r["tokens_per_sec"] * r["model_flops_per_token"] / r["peak_flops"]
        r["hfu"] = r["tokens_per_sec"] * r["hardware_flops_per_token"] / r["peak_flops"]
    rows = []
    for i, (_, controller) in enumerate(settings):
        runs = results[i]
        base = runs[0]
        rows.append({**{k: base[k] for k in ("label", "layout", "ranks", "memory", "peak_growth_bytes_per_rank",
                                             "traffic_per_rank_per_step")},
                     "controller": controller, "repeats": len(runs),
                     "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in runs),
                     "tokens_per_sec_all": [r["tokens_per_sec"] for r in runs],
                     "step_ms": statistics.median(r["step_ms"] for r in runs),
                     # every launch's windows and steps, the slowest rank's: the spread behind the medians
                     "window_seconds_all": [r["window_seconds"] for r in runs],
                     "steps_ms_all": [r["steps_ms"] for r in runs],
                     "median_step_ms": statistics.median(ms for r in runs for ms in r["steps_ms"]),
                     **{k: statistics.median(r[k] for r in runs) for k in ("mfu", "hfu", "peak_flops")},
                     "model_flops_per_token": base["model_flops_per_token"], "peak_source": base["peak_source"],
                     **({"pipeline": min((r["pipeline"] for r in runs), key=lambda p: p["step_seconds"])}
                        if "pipeline" in base else {})})
    one = next((r for r in rows if r["ranks"] == 1), rows[0])
    for r in rows:
        r["speed_vs_one_rank"] = r["tokens_per_sec"] / one["tokens_per_sec"]
        # what splitting the model should leave per rank: 1 / (tensor x pipeline), and x data with ZeRO for the
        # optimizer state; against it the largest rank's counted bytes and its measured peak growth
        lay = r["layout"]
        split = lay["tensor"] * lay["pipeline"]
        zero = lay["data"] if lay["shard_optimizer"] or lay.get("shard_params") else 1
        weights = lay["data"] if lay.get("shard_params") else 1
        r["ideal_state_bytes_per_rank"] = (one["memory"]["param_bytes_per_rank"] / (split * weights)
                                           + one["memory"]["optimizer_bytes_per_rank"] / (split * zero))
        r["ideal_fraction"] = 1 / (split * zero)
        r["peak_growth_vs_one_rank"] = r["memory"]["peak_growth_bytes"] / max(1, one["memory"]["peak_growth_bytes"])
    return {"kind": "layouts", "model": cfg.model.name, "model_params": cfg.model.params,
            "context_length": cfg.data.context_length, "global_batch_size": global_batch_size, "machine": machine(),
            "results": rows,
            "method": f"median over {repeats} interleaved launches of the median of {windows} windows of {steps} "
                      f"steps after {warmup_steps} warm-up steps; synthetic tokens; the slowest rank's time"}


def print_report(report: dict[str, Any]) -> None:
    """Tables for people."""
    rows = []
    for r in report["results"]:
        m = r["memory"]
        comm = sum(v["bytes"] or 0 for v in r["traffic_per_rank_per_step"].values())
        calls = sum(v["calls"] or 0 for v in r["traffic_per_rank_per_step"].values())
        rows.append({"layout": r["label"], "controller": r["controller"], "ranks": r["ranks"],
                     "tokens/s": r["tokens_per_sec"], "ms/step": r["step_ms"],
                     "median step ms": r["median_step_ms"], "vs 1 rank": r["speed_vs_one_rank"],
                     "MFU": r["mfu"],
                     "param KB/rank": m["param_bytes_per_rank"] / 1024,
                     "optimizer KB/rank": m["optimizer_bytes_per_rank"] / 1024,
                     "peak growth MB/rank": m["peak_growth_bytes"] / 2**20,
                     "growth vs 1 rank": r["peak_growth_vs_one_rank"], "ideal": r["ideal_fraction"],
                     "collectives/step": calls, "comm KB/step": comm / 1024})
    console.say(artifacts.format_table(rows))
    pipes = [r for r in report["results"] if "pipeline" in r]
    if pipes:
        console.say("\npipelines: idle fraction of the stages, in the last step and over every timed step (measured), "
                    "against GPipe's (p-1)/(M+p-1); activations held at the peak (timetable) and the measured peak "
                    "memory growth of each rank")
        console.say(artifacts.format_table([{
            "layout": r["label"], "controller": r["controller"], "last step": r["pipeline"]["idle_fraction_measured"],
            "all steps": r["pipeline"]["idle_fraction_all_steps"],
            "theory": r["pipeline"]["idle_fraction_gpipe_theory"],
            "peak activations per stage": str(r["pipeline"]["peak_activations_per_stage"]),
            "peak growth MB per rank": " ".join(f"{b / 2**20:.0f}" for b in r["peak_growth_bytes_per_rank"])}
            for r in pipes]))


def plot(report: dict[str, Any], run_dir) -> list[str]:
    """``benchmark.png`` (throughput, memory, communication per layout) and, for pipelines,
    ``benchmark_timeline.png`` (each stage's forward and backward passes in one measured step)."""
    plt = artifacts.pyplot()
    rows = report["results"]
    names = [f"{r['label']}\n{r['controller']}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    y = range(len(rows))
    axes[0].barh(y, [r["tokens_per_sec"] for r in rows], color="tab:blue")
    axes[0].set_title("tokens / s (median)")
    params = [r["memory"]["param_bytes_per_rank"] / 1024 for r in rows]
    opt = [r["memory"]["optimizer_bytes_per_rank"] / 1024 for r in rows]
    axes[1].barh(y, params, color="tab:green", label="parameters")
    axes[1].barh(y, opt, left=params, color="tab:olive", label="optimizer state")
    axes[1].set_title("KB held by the largest rank")
    axes[1].legend()
    axes[2].barh(y, [sum(v["bytes"] or 0 for v in r["traffic_per_rank_per_step"].values()) / 1024 for r in rows],
                 color="tab:red")
    axes[2].set_title("KB communicated per rank per step")
    for ax in axes:
        ax.set_yticks(list(y))
        ax.set_yticklabels(names if ax is axes[0] else [""] * len(rows), fontsize=8)
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"gpt layouts at global batch {report['global_batch_size']}, context {report['context_length']}")
    fig.tight_layout()
    run_dir.save_figure(fig, "benchmark.png")
    written = ["benchmark.png"]
    pipes = [r for r in rows if "pipeline" in r]
    if pipes:
        fig, axes = plt.subplots(len(pipes), 1, figsize=(11, 1.4 + 0.9 * sum(r["pipeline"]["stages"] for r in pipes)),
                                 squeeze=False)
        for ax, r in zip(axes[:, 0], pipes):
            p = r["pipeline"]
            for s in range(p["stages"]):
                for (a, b), name in zip(p["ops"][str(s)], p["op_names"][str(s)]):
                    ax.barh(s, (b - a) * 1e3, left=a * 1e3, color="tab:blue" if name[0] == "F" else "tab:orange",
                            edgecolor="black", linewidth=0.5)
                    ax.text((a + b) / 2 * 1e3, s, name, ha="center", va="center", fontsize=7)
            ax.set_yticks(range(p["stages"]))
            ax.set_yticklabels([f"stage {s}" for s in range(p["stages"])])
            ax.invert_yaxis()
            ax.set_xlabel("ms (blue: forward, orange: backward, white: idle)")
            ax.set_title(f"{r['label']} with {r['controller']}: idle {p['idle_fraction_measured']:.0%} measured, "
                         f"{p['idle_fraction_gpipe_theory']:.0%} GPipe theory", fontsize=9)
        fig.tight_layout()
        run_dir.save_figure(fig, "benchmark_timeline.png")
        written.append("benchmark_timeline.png")
    return written


# ---------------------------------------------------------------------------------------------------------------
# The largest model each layout trains within a memory budget per rank


def largest(cfg: config.Config, layouts: list[str], budget_bytes: int, widths: list[int], global_batch_size: int,
            timeout: float) -> dict[str, Any]:
    """For each layout, the widest ``cfg``'s model (at its depth) whose every rank's measured peak memory growth
    (the resident set's growth from before the model was made, through 3 training steps) stays within
    ``budget_bytes``: the widths are tried in increasing order, one launch each, until one exceeds it."""
    import models

    specs = [parse(t) for t in layouts]
    rows, best = [], {}
    with tempfile.TemporaryDirectory(prefix="hvdtrain-largest-") as tmp:
        for layout in specs:
            for width in sorted(widths):
                params = {**cfg.model.params, "width": width}
                raw = config.apply_overrides(config.to_dict(cfg), [
                    f"parallel.{k}={json.dumps(layout[k])}" for k in SETTINGS])
                raw["model"]["params"] = params
                layout_cfg = config.from_dict(raw)
                spec = {"kind": "layout", "config": config.to_dict(layout_cfg), "layout": layout,
                        "global_batch_size": global_batch_size, "steps": 2, "warmup_steps": 1, "windows": 1}
                spec_file, result_file = Path(tmp, "spec.json"), Path(tmp, "out.json")
                spec_file.write_text(json.dumps(spec))
                progress(f"{label(layout)} at width {width} ...")
                launch(layout["ranks"], [sys.executable, "-m", "hvdtrain.benchmark", str(spec_file),
                                         str(result_file)], CONTROLLER_ARGS["gloo"], timeout)
                result = json.loads(result_file.read_text())
                plan = models.parallel_plan(cfg.model.name, input_shape=(cfg.data.context_length,),
                                            num_classes=cfg.data.num_classes or 256, **params)
                growth = max(result["peak_growth_bytes_per_rank"])
                row = {"label": label(layout), "ranks": layout["ranks"], "width": width,
                       "parameters": plan.parameters, "peak_growth_bytes_max": growth,
                       "peak_growth_bytes_per_rank": result["peak_growth_bytes_per_rank"],
                       "state_bytes_per_rank": result["memory"]["param_bytes_per_rank"]
                       + result["memory"]["optimizer_bytes_per_rank"], "fits": growth <= budget_bytes}
                rows.append(row)
                if not row["fits"]:
                    break
                best[row["label"]] = row
    return {"kind": "largest", "model": cfg.model.name, "model_params": cfg.model.params,
            "context_length": cfg.data.context_length, "global_batch_size": global_batch_size,
            "budget_bytes": budget_bytes, "machine": machine(), "tried": rows,
            "largest": [best.get(label(s)) or {"label": label(s), "width": None, "parameters": 0} for s in specs],
            "method": "one launch per layout and width, widths in increasing order until one exceeds the budget; "
                      "3 steps (1 warm-up, 2 timed) on synthetic tokens; the growth of each rank's peak resident "
                      "set from before the model was made (TensorFlow and Horovod loaded)"}


def print_largest(report: dict[str, Any]) -> None:
    """Tables for people."""
    console.say(f"largest {report['model']} within {report['budget_bytes'] / 2**20:.0f} MB of measured peak growth "
                "per rank:")
    console.say(artifacts.format_table([{"layout": r["label"], "width": r["width"],
                                         "parameters (M)": r["parameters"] / 1e6} for r in report["largest"]]))
    console.say("\nevery launch:")
    console.say(artifacts.format_table([{"layout": r["label"], "width": r["width"],
                                         "parameters (M)": r["parameters"] / 1e6,
                                         "state MB/rank (counted)": r["state_bytes_per_rank"] / 2**20,
                                         "peak growth MB/rank (max)": r["peak_growth_bytes_max"] / 2**20,
                                         "fits": r["fits"]} for r in report["tried"]]))


def plot_largest(report: dict[str, Any], run_dir) -> list[str]:
    """``benchmark.png``: the largest model per layout, and each launch's peak growth against the budget."""
    plt = artifacts.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    largest_rows = report["largest"]
    axes[0].barh(range(len(largest_rows)), [r["parameters"] / 1e6 for r in largest_rows], color="tab:green")
    axes[0].set_yticks(range(len(largest_rows)))
    axes[0].set_yticklabels([r["label"] for r in largest_rows])
    axes[0].invert_yaxis()
    axes[0].set_xlabel("parameters (millions)")
    axes[0].set_title(f"largest {report['model']} within {report['budget_bytes'] / 2**20:.0f} MB per rank")
    for name in dict.fromkeys(r["label"] for r in report["tried"]):
        pts = [r for r in report["tried"] if r["label"] == name]
        axes[1].plot([r["parameters"] / 1e6 for r in pts], [r["peak_growth_bytes_max"] / 2**20 for r in pts],
                     marker="o", label=name)
    axes[1].axhline(report["budget_bytes"] / 2**20, color="black", linestyle="--", label="budget")
    axes[1].set_xlabel("parameters (millions)")
    axes[1].set_ylabel("peak growth, largest rank (MB)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    run_dir.save_figure(fig, "benchmark.png")
    return ["benchmark.png"]
