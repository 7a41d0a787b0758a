"""One training run, start to end: config -> Horovod -> plan -> data -> model -> fit -> artifacts."""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from hvdtrain import artifacts, distributed
from hvdtrain.config import Config, TrainConfig, to_yaml
from hvdtrain.evaluation import evaluate
from hvdtrain.errors import ConfigError, HvdtrainError
from hvdtrain.plan import Plan, make_plan

SUMMARY_KEYS = [
    "model", "world_size", "global_batch_size", "epochs", "test_accuracy", "test_loss",
    "test_bits_per_byte", "test_perplexity", "examples_per_sec", "wall_seconds",
]


def log(msg: str) -> None:
    """Print on the chief only."""
    if distributed.is_chief():
        print(f"[hvdtrain] {msg}", flush=True)


def knobs_for(cfg: Config, output_dir: str | None = None) -> distributed.HorovodKnobs:
    """Horovod knobs from the ``distributed`` section (and XLA from ``train``).

    Relative paths of the timeline and the autotune log are taken inside the output directory.
    """
    d = cfg.distributed

    def place(path: str) -> str:
        if not path or os.path.isabs(path) or output_dir is None:
            return path
        return str(Path(output_dir) / path)

    autotune_log = place(d.autotune_log)
    if autotune_log:
        # Horovod opens this file in hvd.init(), before the output directory is otherwise created.
        Path(autotune_log).parent.mkdir(parents=True, exist_ok=True)
    # The timeline is started after the output directory exists (see run()), not through HOROVOD_TIMELINE.
    return distributed.HorovodKnobs(
        fusion_threshold_mb=d.fusion_threshold_mb, cycle_time_ms=d.cycle_time_ms, autotune=d.autotune,
        autotune_log=autotune_log, hierarchical_allreduce=d.hierarchical_allreduce,
        timeline="DYNAMIC" if d.timeline else "", enable_xla_ops=cfg.train.jit_compile,
    )


def check_options(cfg: Config) -> None:
    """Reject option combinations that this machine or Horovod cannot run, before anything is written."""
    import tensorflow as tf

    if cfg.train.jit_compile and not tf.config.list_physical_devices("GPU"):
        raise ConfigError(
            "train.jit_compile=true needs a GPU: Horovod's allreduce has XLA kernels for GPUs only "
            "(HOROVOD_ENABLE_XLA_OPS, set by hvdtrain); set train.jit_compile=false on CPUs"
        )
    if cfg.distributed.reduce_op == "adasum":
        raise ConfigError("distributed.reduce_op=adasum is not supported with Keras optimizers by Horovod 0.28; "
                          "use average or sum")
    if cfg.train.precision == "mixed_float16" and cfg.distributed.backward_passes_per_step > 1:
        raise ConfigError("train.precision=mixed_float16 with distributed.backward_passes_per_step > 1 lets ranks' "
                          "loss scales disagree; use mixed_bfloat16, or backward_passes_per_step=1")


def make_optimizer(cfg: TrainConfig, learning_rate):
    """The (not yet distributed) Keras optimizer named by ``train.optimizer``; the rate may be a schedule."""
    import tensorflow as tf

    opts = tf.keras.optimizers
    if cfg.optimizer == "sgd":
        return opts.SGD(learning_rate)
    if cfg.optimizer == "momentum":
        return opts.SGD(learning_rate, momentum=cfg.momentum, nesterov=True)
    if cfg.optimizer == "adam":
        return opts.Adam(learning_rate)
    return opts.AdamW(learning_rate, weight_decay=cfg.weight_decay)


def build_model(cfg: Config, input_shape, num_classes):
    """Build the configured model; a bad parameter becomes a config error."""
    import models

    try:
        return models.build(cfg.model.name, input_shape=input_shape, num_classes=num_classes, **cfg.model.params)
    except models.ModelParamError as exc:
        raise ConfigError(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model '{cfg.model.name}' cannot be built with {cfg.model.params}: {exc}") from None


def loss_and_metrics():
    """Cross-entropy on float32 logits, and accuracy (per next byte for language models).

    For a language model the loss is the mean over every position, in nats per byte; bits per byte and perplexity
    are derived from it after averaging across ranks (:class:`hvdtrain.callbacks.LanguageModelMetrics`).
    """
    import tensorflow as tf

    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return loss, [tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")]


def prepare_output(output_dir: str | None, cfg: Config) -> tuple[Path | None, str | None]:
    """Create the output directory and save the resolved config (chief); returns ``(out, error)``.

    Every rank must then :func:`agree` on the error, so that no rank goes on alone into a collective that the
    failed rank never joins.
    """
    if output_dir is None:
        return None, None
    out = Path(output_dir)
    error = None
    if distributed.is_chief():
        try:
            out.mkdir(parents=True, exist_ok=True)
            artifacts.write_text(out / "config.yaml", to_yaml(cfg))
        except OSError as exc:
            error = f"cannot write to output directory '{out}': {exc.strerror or exc}; choose another --output"
    return out, error


def agree(error: str | None) -> None:
    """Every rank raises the chief's error, or none does (a collective: every rank must call it)."""
    error = distributed.broadcast_object(error) if distributed.size() > 1 else error
    if error:
        raise HvdtrainError(error)


def save_model(model, path: Path) -> None:
    """Save the trained model without its optimizer, atomically.

    The Horovod optimizer is a class made at run time that a plain process cannot load; a clone with the same
    weights saves as a standard ``.keras`` file that loads anywhere (checkpoints keep the optimizer state).
    """
    import tensorflow as tf

    clone = tf.keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    with artifacts.atomic_path(path) as tmp:
        clone.save(tmp)


def resume(model, out: Path | None, cfg: Config, steps_per_epoch: int) -> tuple[int, list[dict]]:
    """Continue an interrupted run in ``out``: restore the last good checkpoint on the chief, share it with every
    rank, and return ``(epochs_done, metrics_rows_so_far)``. Returns ``(0, [])`` for a new run.
    """
    from hvdtrain import callbacks as cb

    found = bool(out is not None and cfg.train.resume and cb.list_checkpoints(out / "checkpoints"))
    if not (distributed.broadcast_object(found) if distributed.size() > 1 else found):
        return 0, []
    # Optimizer slots exist only after a first step; build them now so the checkpoint has somewhere to go.
    opt = model.optimizer
    getattr(opt, "inner_optimizer", opt).build(model.trainable_variables)
    epoch, rows = 0, []
    if distributed.is_chief():
        epoch, warnings = cb.restore_latest(model, out / "checkpoints")
        for w in warnings:
            print(f"[hvdtrain] warning: {w}", file=sys.stderr, flush=True)
        rows = metrics_rows(out, epoch)
    if distributed.size() > 1:
        epoch = distributed.broadcast_object(epoch)
        distributed.broadcast_variables(model.variables + list(getattr(opt, "variables", [])))
    if epoch:
        log(f"resuming after epoch {epoch} (step {epoch * steps_per_epoch}) from {out / 'checkpoints'}")
    return epoch, rows


def plan_for(cfg: Config, num_train_examples: int, world_size: int) -> Plan:
    """The plan of ``cfg`` at ``world_size`` ranks."""
    return make_plan(
        num_train_examples=num_train_examples, world_size=world_size,
        batch_size_per_rank=cfg.data.batch_size_per_rank, epochs=cfg.train.epochs,
        learning_rate=cfg.train.learning_rate, lr_scaling=cfg.train.lr_scaling, warmup_epochs=cfg.train.warmup_epochs,
        backward_passes_per_step=cfg.distributed.backward_passes_per_step,
    )


def metrics_rows(out: Path | None, up_to_epoch: int) -> list[dict]:
    """The ``metrics.jsonl`` lines of epochs 1..``up_to_epoch`` already written (chief only)."""
    import json

    if out is None or not distributed.is_chief() or not (out / "metrics.jsonl").is_file():
        return []
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("epoch", 0) <= up_to_epoch]


def fit_elastic(cfg: Config, model, out: Path | None, output_error: str | None, num_train: int, first_plan: Plan,
                schedule, fit):
    """Train under Horovod's elastic mode: on every (re)start the plan, the shards and the learning-rate scale
    follow the current world size, and training goes on from the last committed epoch and batch.

    Horovod commits the model, optimizer, epoch and batch every ``train.commit_every_batches`` batches and at each
    epoch's end; when a worker dies, the others roll back to the last commit and continue without it; when a host
    is added, its new worker receives rank 0's committed state and joins at the next commit.

    The collectives of start-up (agreeing on the output directory, resuming from a checkpoint) run once, inside
    the elastic loop, while ``state.prepared`` is false: a worker that joins later receives ``prepared=True``
    with rank 0's state and skips them, where it would otherwise wait in a collective that no other rank calls.
    """
    result = {}

    def train(state):
        if not state.prepared:
            agree(output_error)
            state.epoch, _ = resume(model, out, cfg, first_plan.steps_per_epoch)
            state.batch, state.prepared = 0, True
            state.commit()
        size = distributed.size()
        plan = plan_for(cfg, num_train, size)
        if state.steps_per_epoch and state.steps_per_epoch != plan.steps_per_epoch:
            # the committed batch counts steps of the old world size: the same share of the epoch in new steps
            state.batch = state.batch * state.steps_per_epoch // plan.steps_per_epoch
        state.steps_per_epoch = plan.steps_per_epoch
        schedule.rescale(int(model.optimizer.iterations.numpy()), state.epoch + state.batch / plan.steps_per_epoch,
                         first_plan.steps_per_epoch, plan.steps_per_epoch, plan.learning_rate / first_plan.learning_rate)
        log(f"elastic: {size} rank(s), from epoch {state.epoch + 1} batch {state.batch}; {plan.describe()}")
        extra = distributed.elastic_callbacks(state, cfg.train.commit_every_batches)
        result["callbacks"] = fit(plan, state.epoch, metrics_rows(out, state.epoch),
                                  state.epoch * plan.steps_per_epoch + state.batch, extra)
        result["plan"] = plan

    distributed.run_elastic(model, train)
    return result["callbacks"], result["plan"]


def throughput(rows: list[dict[str, Any]]) -> float | None:
    """Median examples/s over epochs, leaving out the first (graph building and warm-up) when there are more."""
    values = [r["examples_per_sec"] for r in rows if r.get("examples_per_sec")]
    if len(values) > 1:
        values = values[1:]
    return statistics.median(values) if values else None


def run(cfg: Config, output_dir: str | None = None, *, verbose: int | None = None) -> dict[str, Any]:
    """Train ``cfg`` data-parallel on every rank of the job; returns the summary (the same on every rank).

    Args:
        cfg: the validated config.
        output_dir: where the chief writes artifacts (None writes nothing).
        verbose: Keras verbosity on the chief (default: a progress bar on a terminal, one line per epoch otherwise).
    """
    distributed.init(knobs_for(cfg, output_dir), threads_per_rank=cfg.distributed.threads_per_rank)
    import tensorflow as tf

    from hvdtrain import callbacks as cb
    from hvdtrain import data
    from hvdtrain.schedule import ElasticSchedule, WarmupSchedule

    size = distributed.size()
    started = time.perf_counter()
    check_options(cfg)

    # Everything that can fail on bad input runs before the first file is written (and the same on every rank).
    tf.keras.utils.set_random_seed(cfg.train.seed)
    tf.keras.mixed_precision.set_global_policy(cfg.train.precision)
    splits = data.load(cfg.data, seed=cfg.train.seed, model_name=cfg.model.name)
    plan = plan_for(cfg, splits.num_train, size)
    log(plan.describe())

    model = build_model(cfg, splits.input_shape, splits.num_classes)
    out, output_error = prepare_output(output_dir, cfg)
    if not cfg.train.elastic:  # elastic runs agree inside Horovod's elastic loop, which a late joiner enters first
        agree(output_error)
    if cfg.distributed.timeline and output_error is None:
        timeline = Path(cfg.distributed.timeline)
        distributed.start_timeline(str(timeline if timeline.is_absolute() or out is None else out / timeline))
    schedule = WarmupSchedule(
        base_lr=plan.base_learning_rate if plan.warmup_steps else plan.learning_rate,
        peak_lr=plan.learning_rate, warmup_steps=plan.warmup_steps, total_steps=plan.total_steps,
        kind=cfg.train.schedule, step_every=max(1, int(cfg.train.step_decay_epochs * plan.steps_per_epoch)),
        step_factor=cfg.train.step_decay_factor,
    )
    optimizer = distributed.wrap_optimizer(
        make_optimizer(cfg.train, schedule),
        grad_compression=cfg.distributed.grad_compression,
        backward_passes_per_step=cfg.distributed.backward_passes_per_step,
        reduce_op=cfg.distributed.reduce_op,
        precision=cfg.train.precision,
    )
    # Elastic runs follow the world size; set after wrapping because Horovod rebuilds the optimizer from its config,
    # which would lose the schedule's variables.
    elastic_schedule = None
    if cfg.train.elastic:
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        inner.learning_rate = elastic_schedule = ElasticSchedule(inner._learning_rate)
    loss, metrics = loss_and_metrics()
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics,
                  steps_per_execution=cfg.train.steps_per_execution, jit_compile=cfg.train.jit_compile)
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2

    def fit(plan: Plan, initial_epoch: int, previous_rows: list[dict], skip_batches: int, extra=()):
        """One ``model.fit`` from ``initial_epoch`` at the current world size; returns its callbacks."""
        rank, size = distributed.rank(), distributed.size()
        callbacks = [*cb.default_callbacks(
            steps_per_epoch=plan.steps_per_epoch, output_dir=out, previous_rows=previous_rows,
            examples_per_epoch=plan.steps_per_epoch * plan.global_batch_size,
            checkpoint_every_epochs=cfg.train.checkpoint_every_epochs, keep_checkpoints=cfg.train.keep_checkpoints,
            early_stopping_patience=cfg.train.early_stopping_patience,
            language_model=splits.task == "language_model",
        ), *extra]
        train_ds = splits.train_dataset(rank, size, plan.batch_size_per_rank, cfg.train.seed,
                                        cfg.data.shuffle_buffer)
        # Continue the data order where the checkpoint left it (the pipeline is deterministic for a seed).
        train_ds = train_ds.skip(skip_batches) if skip_batches else train_ds
        val_ds = splits.eval_dataset("val", rank, size, plan.batch_size_per_rank, equal=True)
        model.fit(train_ds, epochs=plan.epochs, initial_epoch=initial_epoch, steps_per_epoch=plan.steps_per_epoch,
                  validation_data=val_ds, callbacks=callbacks, verbose=verbose if distributed.is_chief() else 0)
        return callbacks

    fit_started = time.perf_counter()
    if cfg.train.elastic:
        callbacks, plan = fit_elastic(cfg, model, out, output_error, splits.num_train, plan, elastic_schedule, fit)
    else:
        initial_epoch, previous_rows = resume(model, out, cfg, plan.steps_per_epoch)
        callbacks = fit(plan, initial_epoch, previous_rows, initial_epoch * plan.steps_per_epoch)
    fit_seconds = time.perf_counter() - fit_started

    test = evaluate(model, splits, "test", plan.batch_size_per_rank)
    logger = next((c for c in callbacks if isinstance(c, cb.MetricsLogger)), None)
    rows = logger.rows if logger else []
    summary: dict[str, Any] = {
        "model": cfg.model.name,
        "task": splits.task,
        **plan.as_dict(),
        "train_examples": splits.num_train,
        "test_examples": splits.num_examples("test"),
        "test_loss": test.get("loss"),
        "test_accuracy": test.get("accuracy"),
        "examples_per_sec": throughput(rows),
        "fit_seconds": fit_seconds,
        "precision": cfg.train.precision,
        "controller": distributed.controller(),
    }
    if splits.task == "language_model" and test:
        summary["test_bits_per_byte"] = test["bits_per_byte"]
        summary["test_perplexity"] = test["perplexity"]
        summary["tokens_per_sec"] = (summary["examples_per_sec"] or 0) * splits.input_shape[0] or None
    summary["wall_seconds"] = time.perf_counter() - started

    if out is not None and distributed.is_chief():
        save_model(model, out / "model.keras")
        if rows:
            artifacts.plot_curves(rows, out / "curves.png", title=f"{cfg.model.name}, {size} rank(s)")
        artifacts.write_json(out / "summary.json", summary)
        print("\n" + artifacts.format_summary(summary, SUMMARY_KEYS), flush=True)
        print(f"\nartifacts in {out}/", flush=True)
    return summary
