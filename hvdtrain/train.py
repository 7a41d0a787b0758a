"""One training run, start to end: config -> Horovod -> plan -> data -> model -> fit -> artifacts.

::

    run(cfg, output)
      start()        Horovod, checks, data, plan, the model made ready by runtime.prepare(), the run directory
      resume()       the newest good checkpoint, restored on the chief and shared with every rank
      fit()          model.fit with the default callbacks (fit_elastic(): the same under Horovod's elastic mode)
      finish()       exact test metrics, summary.json, model.keras, curves.png
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from hvdtrain import console, distributed, rundir, runtime
from hvdtrain.formats import checkpoint
from hvdtrain.config import Config, to_yaml
from hvdtrain.batch_plan import BatchPlan, plan_for
from hvdtrain.rundir import RunDir

SUMMARY_KEYS = [
    "model", "world_size", "global_batch_size", "epochs", "total_steps", "test_accuracy", "test_loss",
    "test_bits_per_byte", "test_perplexity", "examples_per_sec", "tokens_per_sec", "mfu", "wall_seconds",
]


def log(msg: str) -> None:
    """Print on the chief only."""
    if distributed.is_chief():
        console.say(f"[hvdtrain] {msg}")


@dataclass
class Run:
    """What one training run holds from start to finish."""

    cfg: Config
    source: Any  # hvdtrain.data.Source
    plan: BatchPlan
    layout: Any  # hvdtrain.parallel.DataParallel or Parallel: how the model sits on the ranks
    model: Any  # what fit trains (the model, or the parallel layout's trainer)
    chief_dir: RunDir | None  # the output directory, on the process that was the chief at start
    output: str | None  # the output directory as given (every rank knows whether there is one)
    output_error: str | None  # the chief's verdict on the output directory, agreed on by every rank
    started: float
    callbacks: tuple = ()  # the caller's, after the default ones
    progress: str | None = None
    scratch: list = field(default_factory=list)  # local temporary folders, removed at the end
    utilization: dict | None = None  # a language model's FLOPs per token and the job's peak (utilization())
    fit_started: float = 0.0  # when training began (perf_counter)

    @property
    def run_dir(self) -> RunDir | None:
        """The output directory on the chief, None elsewhere. Elastic runs can change the chief (when rank 0
        dies, another process becomes rank 0): the new one writes to the same directory."""
        if self.output is None or not distributed.is_chief() or self.output_error:
            return None
        if self.chief_dir is None:
            self.chief_dir = RunDir(self.output)
        return self.chief_dir


def start(cfg: Config, output: str | None, callbacks=(), progress: str | None = None) -> Run:
    """Everything before the first step; whatever can fail on bad input fails here, on every rank alike, before
    the first file is written."""
    started = time.perf_counter()
    scratch = []
    autotune_log = ""
    if cfg.distributed.autotune and cfg.distributed.autotune_log:
        # Horovod opens this file in hvd.init(), before the output directory exists: a local staging file, copied
        # into the output directory at the end.
        scratch.append(tempfile.mkdtemp(prefix="hvdtrain-autotune-"))
        autotune_log = os.path.join(scratch[-1], "autotune.csv")
    mesh = runtime.begin(cfg, autotune_log)
    for note in cfg.notes:
        log(f"note: {note}")
    from hvdtrain import data

    source = data.load(cfg.data, seed=cfg.train.seed, model_name=cfg.model.name)
    note = source.missing_split_note("test")
    if note:
        log(f"note: {note}")
    plan = plan_for(cfg, source.num_train, mesh.data)
    if mesh.tensor > 1 or mesh.pipeline > 1:
        sequence = f"; sequence-parallel: each tensor member holds 1/{mesh.tensor} of the positions between split " \
                   "regions"
        log(mesh.describe() + (sequence if cfg.parallel.sequence else ""))
    log(plan.describe())
    layout = runtime.make_layout(cfg, source, mesh)
    if cfg.model.pretrained:
        log(f"model: {cfg.model.name} {layout.spec['params']} from {cfg.model.pretrained} (each rank reads its "
            "slices of the checkpoint)")
    if layout.spec.get("lora"):
        log(describe_lora(layout))
    if mesh.pipeline > 1:
        log(f"pipeline ({cfg.parallel.schedule}, {cfg.parallel.microbatches} micro-batches): "
            f"{layout.split_description}")
    if cfg.parallel.shard_params:
        buckets = layout.module.buckets
        shard, replicas = mesh.shard_group.size, mesh.replicate_group.size
        over = (f"the data group: each of the {mesh.data} data ranks holds" if replicas == 1 else
                f"groups of {shard} data ranks, {replicas} groups replicating each other (hybrid): each rank holds")
        log(f"parameters sharded over {over} 1/{shard} of {len(buckets)} buckets "
            f"({sum(b.flat.total for b in buckets):,} parameters of this rank's part), gathered per unit"
            + (", again in the backward pass (recompute)" if cfg.parallel.recompute else ""))
    model = runtime.prepare(layout.training_model, cfg, runtime.learning_rate_schedule(cfg.train, plan),
                            elastic=cfg.train.elastic, layout=layout)

    run_dir, error = rundir.prepare(output, to_yaml(cfg), distributed.is_chief())
    if not cfg.train.elastic:  # elastic runs agree inside Horovod's elastic loop, which a late joiner enters first
        distributed.agree(error)
        if output is not None and layout.collective_checkpoint and distributed.size() > 1:
            check_shared(output)
    if run_dir is not None and error is None:
        for uri in run_dir.clean_incomplete_checkpoints():
            checkpoint.warn(f"removed {uri}: an incomplete checkpoint (the run was stopped while writing it)")
        if autotune_log:
            run_dir.adopt(autotune_log, cfg.distributed.autotune_log)
        if source.tokenizer is not None:
            from hvdtrain.data import tokenizer

            tokenizer.save(source.tokenizer, run_dir, cfg.model.pretrained)
    if cfg.distributed.timeline and error is None:
        distributed.start_timeline(str(run_dir.local(cfg.distributed.timeline)) if run_dir else os.devnull)
    return Run(cfg, source, plan, layout, model, run_dir, output, error, started, tuple(callbacks), progress, scratch,
               utilization(cfg, source))


def describe_lora(layout) -> str:
    """One line: the adapters a LoRA run trains and their share of the model's parameters."""
    lora = layout.spec["lora"]
    plan = layout.plan
    trained = sum(w.size for w in plan.weights if w.trainable)
    total = sum(w.size for w in plan.weights)
    return (f"LoRA: rank {lora['rank']}, alpha {lora['alpha']:g} on {', '.join(lora['targets'])}: {trained:,} "
            f"trainable parameters of {total:,} ({trained / total:.2%}); the rest frozen in "
            f"{layout.compute_dtype.name}")


def pretrained_row(run: Run) -> dict[str, Any]:
    """The metrics row of epoch 0: the pretrained model on the validation split before any step (every rank
    evaluates its part)."""
    from hvdtrain.exact_metrics import evaluate

    found = evaluate(run.model, run.source, "val", run.plan.batch_size_per_rank,
                     shard=(run.layout.data_rank, run.layout.data_size), counted=run.layout.counted)
    row = {"epoch": 0, "step": 0, **{f"val_{k}": v for k, v in found.items() if k != "count"}}
    log("pretrained model before training: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith("val")))
    return row


def utilization(cfg: Config, source) -> dict[str, Any] | None:
    """For a language model of a family with a plan: its model (and hardware) FLOPs per token and the job's peak
    FLOP/s per rank (:func:`hvdtrain.runtime.job_peak_flops`), from which every epoch's and the summary's model
    FLOPs utilization is computed; None for other models."""
    model_plan = runtime.model_plan(cfg.model, source)
    if model_plan is None or not source.is_language_model:
        return None
    peak, peak_source = runtime.job_peak_flops(cfg.train.precision, collective=not cfg.train.elastic)
    return {"tokens_per_example": int(source.input_shape[0]), "model_flops_per_token": model_plan.flops_per_token(),
            "hardware_flops_per_token": model_plan.flops_per_token(recompute=cfg.parallel.recompute),
            "peak_flops_per_rank": peak / distributed.size(), "peak_source": peak_source}


def check_shared(output: str) -> None:
    """Every rank must see the output directory the chief made: layouts that split the model write their
    checkpoints from every rank (a collective: one line on every rank when some rank cannot)."""
    import socket

    from hvdtrain import storage

    seen = storage.exists(storage.join(output, "config.yaml"))
    blind = [where for ok, where in distributed.allgather_object((seen, f"rank {distributed.rank()} on "
                                                                        f"{socket.gethostname()}")) if not ok]
    if blind:
        from hvdtrain.errors import HvdtrainError

        raise HvdtrainError(f"--output {output} is not visible to {', '.join(blind)}: layouts that split the model "
                            "write checkpoints from every rank; use a shared filesystem or object storage (s3://)")


def resume(run: Run) -> tuple[int, list[dict]]:
    """Continue an interrupted run: restore the newest good checkpoint (every rank reads its own part, or the
    chief reads and shares it) and return ``(intervals_done, metrics_rows)`` (epochs, or intervals of a run
    counted in steps; the rows from the checkpoint itself). ``(0, [])`` for a new run."""
    unit = run.plan.unit
    found = bool(run.run_dir is not None and run.cfg.train.resume and run.run_dir.checkpoints(unit))
    if not (distributed.broadcast_object(found) if distributed.size() > 1 else found):
        return 0, []
    run.layout.build_optimizer()
    number, rows = 0, []
    if run.run_dir is not None or run.layout.collective_checkpoint:
        number, state, warnings = checkpoint.restore_latest(run.output, run.run_dir, run.layout, unit)
        for w in warnings:
            checkpoint.warn(w)
        rows = state.get("metrics", [])
        if run.run_dir is not None:
            # metrics.jsonl may hold lines of epochs after this checkpoint (a crash between the two writes): they
            # will be trained again, so the file goes back to the checkpoint's lines now.
            run.run_dir.write_metrics(rows)
    if distributed.size() > 1:
        number = distributed.broadcast_object(number)
    run.layout.distribute_restored()
    done = run.plan.intervals_done(number)
    if number:
        where = (f"step {number}" if unit == "step" else
                 f"epoch {number} (step {number * run.plan.steps_per_epoch})")
        log(f"resuming after {where} from {run.run_dir or 'rank 0'}")
    return done, rows


def fit(run: Run, plan: BatchPlan, initial_epoch: int, previous_rows: list[dict], skip_batches: int,
        extra=()) -> list[dict]:
    """One ``model.fit`` from ``initial_epoch`` at the current world size; returns the metrics rows."""
    from hvdtrain import callbacks as cb

    from hvdtrain.exact_metrics import evaluate

    cfg = run.cfg
    rank, size = run.layout.data_rank, run.layout.data_size
    if initial_epoch == 0 and not previous_rows and cfg.model.pretrained and run.source.num_examples("val"):
        previous_rows = [pretrained_row(run)]  # where fine-tuning starts: the pretrained model's own loss

    def validation():
        return evaluate(run.model, run.source, "val", plan.batch_size_per_rank, shard=(rank, size),
                        counted=run.layout.counted, limit=cfg.train.eval_batches * plan.global_batch_size)

    callbacks = [*cb.default_callbacks(
        steps_per_epoch=plan.steps_per_epoch, output_dir=run.run_dir or run.output, previous_rows=previous_rows,
        examples_per_epoch=plan.interval_steps * plan.global_batch_size, epochs=plan.epochs,
        checkpoint_every_epochs=cfg.train.checkpoint_every_epochs, keep_checkpoints=cfg.train.keep_checkpoints,
        early_stopping_patience=cfg.train.early_stopping_patience, language_model=run.source.is_language_model and {
            "": run.source.bytes_of_token("train"), "val_": run.source.bytes_of_token("val")},
        divergence_check_epochs=cfg.distributed.divergence_check_epochs,
        divergence_tolerance=cfg.distributed.divergence_tolerance, progress=run.progress, layout=run.layout,
        output_uri=run.output, validation=validation if run.source.num_examples("val") else None,
        utilization=run.utilization, plan=plan,
        tokens_per_example=run.source.input_shape[0] if run.source.is_language_model else 0,
    ), *extra, *run.callbacks]
    # from where the checkpoint left the data (the order is deterministic for a seed)
    train_ds = run.source.train_dataset(rank, size, plan.batch_size_per_rank, cfg.train.seed, cfg.data.shuffle_buffer,
                                        start=skip_batches)
    run.model.fit(train_ds, epochs=plan.intervals, initial_epoch=initial_epoch, steps_per_epoch=plan.interval_steps,
                  callbacks=callbacks, verbose=0)
    return next(c for c in callbacks if isinstance(c, cb.MetricsLogger)).rows


def fit_elastic(run: Run) -> tuple[list[dict], BatchPlan]:
    """Train under Horovod's elastic mode: on every (re)start the plan, the shards and the learning-rate scale
    follow the current world size, and training goes on from the last committed epoch and batch.

    Horovod commits the model, optimizer, epoch and batch every ``train.commit_every_batches`` batches and at each
    epoch's end; when a worker dies, the others roll back to the last commit and continue without it; when a host
    is added, its new worker receives rank 0's committed state and joins at the next commit.

    The collectives of start-up (agreeing on the output directory, resuming from a checkpoint) run once, inside
    the elastic loop, while ``state.prepared`` is false: a worker that joins later receives ``prepared=True``
    with rank 0's state and skips them, where it would otherwise wait in a collective that no other rank calls.
    Returns the metrics rows and the plan of the last world size.
    """
    first = run.plan
    opt = checkpoint.inner_optimizer(run.model.optimizer)
    schedule = opt._learning_rate  # an ElasticSchedule (runtime.prepare(..., elastic=True))

    def train(state):
        if not state.prepared:
            distributed.agree(run.output_error)
            state.epoch, _ = resume(run)
            state.batch, state.prepared = 0, True
            state.commit()
        size = distributed.size()
        plan = plan_for(run.cfg, run.source.num_train, size)
        if state.steps_per_epoch and state.steps_per_epoch != plan.steps_per_epoch:
            # the committed batch counts steps of the old world size: the same share of the epoch in new steps
            state.batch = state.batch * state.steps_per_epoch // plan.steps_per_epoch
        state.steps_per_epoch = plan.steps_per_epoch
        schedule.rescale(int(run.model.optimizer.iterations.numpy()), state.epoch + state.batch / plan.steps_per_epoch,
                         first.steps_per_epoch, plan.steps_per_epoch, plan.learning_rate / first.learning_rate)
        log(f"elastic: {size} rank(s), from epoch {state.epoch + 1} batch {state.batch}; {plan.describe()}")
        extra = distributed.elastic_callbacks(state, run.cfg.train.commit_every_batches)
        previous = [r for r in run.run_dir.read_metrics() if r["epoch"] <= state.epoch] if run.run_dir else []
        rows = fit(run, plan, state.epoch, previous, state.epoch * plan.steps_per_epoch + state.batch, extra)
        return rows, plan

    return distributed.run_elastic(run.model, train)


def throughput(rows: list[dict[str, Any]]) -> float | None:
    """Median examples/s over epochs, leaving out the first (graph building and warm-up) when there are more."""
    values = [r["examples_per_sec"] for r in rows if r.get("examples_per_sec")]
    if len(values) > 1:
        values = values[1:]
    return statistics.median(values) if values else None


def final_checkpoint(run: Run, plan: BatchPlan, rows: list[dict]) -> str | None:
    """The checkpoint of the trained model: the newest one when it is of the last epoch (or step), else one written
    now (every rank of a layout that writes from every rank takes part). Returns its URI on the chief."""
    last = rows[-1] if rows else {}
    steps = last.get("step", last.get("epoch", 0) * plan.steps_per_epoch)  # (rows written before steps were logged)
    number = plan.checkpoint_number(steps // plan.interval_steps)
    found = run.run_dir.checkpoints(plan.unit) if run.run_dir is not None else []
    newest = found[-1] if found else None
    current = newest is not None and newest.number == number and not run.cfg.train.early_stopping_patience
    if run.layout.collective_checkpoint and distributed.size() > 1:
        current = distributed.broadcast_object(current)
    if current:
        return newest.uri if newest else None
    if run.run_dir is None and not (run.layout.collective_checkpoint and run.output is not None):
        return None
    state = {"steps_per_epoch": plan.interval_steps, "step": steps,
             "logs": {k: v for k, v in last.items() if isinstance(v, (int, float))}, "metrics": rows}
    return checkpoint.save(run.output, run.run_dir, number, run.layout, state, distributed.rank(), plan.unit)


def finish(run: Run, plan: BatchPlan, rows: list[dict], fit_seconds: float) -> dict[str, Any]:
    """Test metrics on every rank, then the summary, model and curves on the chief; returns the summary.

    ``model.keras``: data-parallel ranks hold the whole model and the chief saves it; a layout that splits the
    model writes it from the final checkpoint, one variable at a time (nothing is gathered on one rank), unless
    ``train.save_model`` is false (then the checkpoint is the model: generate, evaluate, compress and export
    read it).
    """
    import shutil

    from hvdtrain import artifacts, memory
    from hvdtrain.formats import keras_file
    from hvdtrain.exact_metrics import evaluate

    cfg, source, layout = run.cfg, run.source, run.layout
    test = evaluate(run.model, source, "test", plan.batch_size_per_rank, shard=(layout.data_rank, layout.data_size),
                    counted=layout.counted)
    whole = getattr(layout, "model", None) or getattr(layout.module, "model", None)  # a whole Keras model
    streamed = whole is None and run.output is not None and cfg.train.save_model
    final = final_checkpoint(run, plan, rows) if (streamed or not cfg.train.save_model) else None
    if run.run_dir is not None and cfg.train.save_model:
        if whole is not None and getattr(layout, "plan", None) is not None:  # one weight at a time, no clone
            from hvdtrain.formats.checkpoint import inner_optimizer

            step = int(inner_optimizer(whole.optimizer).iterations.numpy())
            keras_file.save_planned(whole, layout.plan, layout.spec, step, run.run_dir.path("model.keras"))
        elif whole is not None:
            keras_file.save(whole, run.run_dir.path("model.keras"))
        elif final is not None:
            keras_file.write_from_checkpoint(final, run.run_dir.path("model.keras"))
    figures = layout.memory()
    figures["peak_memory_bytes"] = memory.peak_bytes()
    per_rank = distributed.allgather_object(figures) if distributed.size() > 1 else [figures]
    summary: dict[str, Any] = {
        "model": cfg.model.name,
        "task": source.task,
        "world_size": distributed.size(),
        **plan.as_dict(),
        "train_examples": source.num_train,
        "test_examples": source.num_examples("test"),
        "test_loss": test.get("loss"),
        "test_accuracy": test.get("accuracy"),
        "examples_per_sec": throughput(rows),
        "fit_seconds": fit_seconds,
        # from the start of the run to its first step: Horovod, the data's first read, the model, a resume
        "startup_seconds": run.fit_started - run.started if run.fit_started else None,
        "precision": cfg.train.precision,
        "controller": distributed.controller(),
        "parallel": {"data": layout.mesh.data, "tensor": layout.mesh.tensor, "pipeline": layout.mesh.pipeline,
                     "shard_optimizer": cfg.parallel.shard_optimizer,
                     "shard_params": cfg.parallel.shard_params, "recompute": cfg.parallel.recompute},
        # the largest footprint over the ranks is what has to fit one device
        **{key: max(r[key] for r in per_rank) for key in figures},
        "peak_memory_bytes_per_rank": [r["peak_memory_bytes"] for r in per_rank],
        "memory_measured": memory.what_is_measured(),
    }
    if source.tokenizer is not None:
        from hvdtrain.data import tokenizer

        summary.update(tokenizer.summary(source.tokenizer))
    if source.is_language_model and test:
        summary["test_bits_per_byte"] = test["bits_per_byte"]
        summary["test_perplexity"] = test["perplexity"]
        summary["tokens_per_sec"] = (summary["examples_per_sec"] or 0) * source.input_shape[0] or None
    if run.utilization is not None:
        from hvdtrain import flops

        u = run.utilization
        peak = u["peak_flops_per_rank"] * distributed.size()
        summary.update(model_flops_per_token=u["model_flops_per_token"], peak_flops=peak,
                       peak_source=u["peak_source"],
                       mfu=flops.utilization(summary.get("tokens_per_sec"), u["model_flops_per_token"], peak))
        if cfg.parallel.recompute:
            summary["hfu"] = flops.utilization(summary.get("tokens_per_sec"), u["hardware_flops_per_token"], peak)
    summary["wall_seconds"] = time.perf_counter() - run.started
    if cfg.distributed.timeline:
        distributed.stop_timeline()
    if run.run_dir is not None:
        if rows:
            run.run_dir.plot_curves(rows, title=f"{cfg.model.name}, {distributed.size()} rank(s)")
        run.run_dir.write_json("summary.json", summary)
        run.run_dir.publish()
        console.say("\n" + artifacts.format_summary(summary, SUMMARY_KEYS))
        console.say(f"\nartifacts in {run.run_dir.uri}/")
    for folder in run.scratch:
        shutil.rmtree(folder, ignore_errors=True)
    return summary


def run(cfg: Config, output: str | None = None, *, callbacks=(), progress: str | None = None) -> dict[str, Any]:
    """Train ``cfg`` on every rank of the job; returns the summary.

    Args:
        cfg: the validated config.
        output: the output directory (a path or a storage URI) where the chief writes; None writes nothing.
        callbacks: Keras callbacks of the caller's, run after the default ones on every rank.
        progress: ``"bar"``, ``"lines"`` or ``"off"``; None chooses by the output (see
            :class:`hvdtrain.callbacks.ProgressLogger`).
    """
    r = start(cfg, output, callbacks, progress)
    fit_started = r.fit_started = time.perf_counter()
    if cfg.train.elastic:
        rows, plan = fit_elastic(r)
    else:
        initial_epoch, previous_rows = resume(r)
        rows, plan = fit(r, r.plan, initial_epoch, previous_rows, initial_epoch * r.plan.interval_steps), r.plan
    return finish(r, plan, rows, time.perf_counter() - fit_started)


def run_config_dict(raw: dict[str, Any], output: str | None) -> dict[str, Any]:
    """:func:`run` from a config as plain data (what a Ray worker receives: ``hvdtrain train --ray``)."""
    from hvdtrain import config

    return run(config.from_dict(raw), output)
