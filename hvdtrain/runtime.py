"""One way to make a model ready for training, used by every loop: training, fine-tuning and distillation in
compression, and the benchmark.

:func:`prepare` takes a built model and the run's config and compiles it with the configured optimizer, wrapped for
the distributed options (gradient compression, accumulation, reduce op, loss scaling) and the learning rate or
schedule it is given. A new option is added here once and every loop gets it.
"""
from __future__ import annotations

from typing import Any

from hvdtrain import distributed
from hvdtrain.config import Config, ModelConfig, TrainConfig, lora_setting
from hvdtrain.errors import ConfigError


def check_options(cfg: Config) -> None:
    """Reject options that this machine cannot run, before anything is written (the combinations Horovod cannot run
    are config errors: :func:`hvdtrain.config.validate`)."""
    import tensorflow as tf

    if cfg.train.jit_compile and not tf.config.list_physical_devices("GPU"):
        raise ConfigError(
            "train.jit_compile=true needs a GPU: Horovod's allreduce has XLA kernels for GPUs only "
            "(HOROVOD_ENABLE_XLA_OPS, set by hvdtrain); set train.jit_compile=false on CPUs"
        )


def build_model(cfg: ModelConfig, source):
    """Build the configured model for ``source``'s shapes; a bad parameter becomes a config error."""
    import models

    try:
        return models.build(cfg.name, input_shape=source.input_shape, num_classes=source.num_classes, **cfg.params)
    except models.ModelParamError as exc:
        raise ConfigError(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model '{cfg.name}' cannot be built with {cfg.params}: {exc}") from None


def model_plan(cfg: ModelConfig, source):
    """The parallel plan of the configured model for ``source``'s shapes (None for a family without one)."""
    import models

    if not models.has_plan(cfg.name):
        return None
    return models.parallel_plan(cfg.name, input_shape=source.input_shape, num_classes=source.num_classes, **cfg.params)


def pretrained_checkpoint(cfg: Config, source):
    """The Hugging Face checkpoint ``model.pretrained`` names, for a model of ``source``'s window (None without
    one)."""
    if not cfg.model.pretrained:
        return None
    from hvdtrain.formats import huggingface

    return huggingface.open_checkpoint(cfg.model.pretrained, int(source.input_shape[0]))


def loss_and_metrics():
    """Cross-entropy on float32 logits, and accuracy (per next byte for language models).

    For a language model the loss is the mean over every position, in nats per byte; bits per byte and perplexity
    are derived from it after averaging across ranks (:class:`hvdtrain.callbacks.LanguageModelMetrics`).
    """
    import tensorflow as tf

    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return loss, [tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")]


def make_optimizer(cfg: TrainConfig, learning_rate, clip: bool = True):
    """The (not yet distributed) Keras optimizer named by ``train.optimizer``; the rate may be a schedule.

    ``clip``: with ``train.clip_norm``, clip the gradients by their global norm in the optimizer (applied to the
    gradients Horovod averaged); parallel layouts clip themselves, by the same norm.
    """
    import tensorflow as tf

    opts = tf.keras.optimizers
    clipping = clip and cfg.clip_norm > 0
    kw = {"global_clipnorm": cfg.clip_norm} if clipping else {}

    def make(cls, *args, **extra):
        return (_dense_norm(cls) if clipping else cls)(learning_rate, *args, **extra, **kw)

    if cfg.optimizer == "sgd":
        return make(opts.SGD)
    if cfg.optimizer == "momentum":
        return make(opts.SGD, momentum=cfg.momentum, nesterov=True)
    if cfg.optimizer == "adam":
        return make(_fused(opts.Adam))
    return make(_fused(opts.AdamW), weight_decay=cfg.weight_decay)


def _fused(cls):
    """``cls`` (Keras' Adam or AdamW) updating each dense variable with one kernel, TensorFlow's
    ``ResourceApplyAdam``, in place of Keras' 30-odd ops per variable; the step's rate and the betas' powers are
    made once per traced step, not once per variable.

    The same update as Keras' (m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2); w -= a m / (sqrt(v) + eps), with
    a = lr sqrt(1 - b2^t) / (1 - b1^t)) and the same slot variables, so checkpoints do not change; what changes is
    the time to trace a train step (gpt-tiny: 1.5 s less per trace, measured; every layout traces one). Sparse
    gradients, AMSGrad and a gradient whose dtype is not the variable's take Keras' own update.
    """
    import tensorflow as tf

    class Fused(cls):
        def update_step(self, gradient, variable):
            if (isinstance(gradient, tf.IndexedSlices) or self.amsgrad or getattr(self, "adaptive_epsilon", False)
                    or gradient.dtype != variable.dtype):
                return super().update_step(gradient, variable)
            index = self._index_dict[self._var_key(variable)]
            return tf.raw_ops.ResourceApplyAdam(
                var=variable.handle, m=self._momentums[index].handle, v=self._velocities[index].handle,
                grad=gradient, **self._step_scalars(variable.dtype))

        def apply_gradients(self, *args, **kwargs):
            self.__dict__["_fused_scalars"] = {}  # made again by each call: the step changes between calls
            return super().apply_gradients(*args, **kwargs)

        def _step_scalars(self, dtype):
            """The kernel's scalars at this step (the rate, the betas and their powers), once per call, graph and
            dtype."""
            cache = self.__dict__.setdefault("_fused_scalars", {})
            key = (None if tf.executing_eagerly() else tf.compat.v1.get_default_graph(), dtype)
            if key not in cache:
                step = tf.cast(self.iterations + 1, dtype)
                beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
                cache[key] = {"lr": tf.cast(self.learning_rate, dtype), "beta1": beta_1, "beta2": beta_2,
                              "beta1_power": tf.pow(beta_1, step), "beta2_power": tf.pow(beta_2, step),
                              "epsilon": tf.cast(self.epsilon, dtype)}
            return cache[key]

    Fused.__name__ = Fused.__qualname__ = cls.__name__
    return Fused


def _dense_norm(cls):
    """``cls`` clipping by the norm of the gradient itself.

    Keras' ``global_clipnorm`` (``tf.clip_by_global_norm``) measures an embedding's gradient, which arrives as
    ``IndexedSlices``, row by row: a token that occurs several times in a batch has several rows, squared apart
    instead of summed first, so the norm is not the gradient's (measured on gpt-tiny: 3.74 for a gradient of norm
    4.25). Made dense first, the norm is the gradient's, as every parallel layout computes it.
    """
    import tensorflow as tf

    class DenseNorm(cls):
        def _clip_gradients(self, grads):
            grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
            return super()._clip_gradients(grads)

    DenseNorm.__name__ = DenseNorm.__qualname__ = cls.__name__
    return DenseNorm


def prepare(model, cfg: Config, learning_rate: Any, *, loss=None, metrics=None, elastic: bool = False, layout=None):
    """Compile ``model`` for training as ``cfg`` says; returns the model to ``fit``.

    Args:
        model: a built Keras model (a model with its own ``train_step``, such as a distiller, works too).
        cfg: the run's config: ``train`` (optimizer, precision, steps per execution, XLA) and ``distributed``
            (gradient compression, accumulation, reduce op).
        learning_rate: a number or a Keras learning-rate schedule (already scaled for the world size).
        loss, metrics: instead of cross-entropy and accuracy.
        elastic: follow the world size as it changes (:class:`hvdtrain.schedule.ElasticSchedule`).
        layout: a :class:`hvdtrain.parallel.Parallel` layout: its trainer is compiled with the plain optimizer
            (it averages or shards gradients itself) and returned instead of ``model``.
    """
    from hvdtrain.parallel import Parallel
    from hvdtrain.schedule import ElasticSchedule

    if isinstance(layout, Parallel):
        trainer = layout.training_model
        trainer.compile(make_optimizer(cfg.train, learning_rate, clip=False),
                        steps_per_execution=cfg.train.steps_per_execution)
        return trainer

    optimizer = distributed.wrap_optimizer(
        make_optimizer(cfg.train, learning_rate),
        grad_compression=cfg.distributed.grad_compression,
        backward_passes_per_step=cfg.distributed.backward_passes_per_step,
        reduce_op=cfg.distributed.reduce_op,
        precision=cfg.train.precision,
    )
    if elastic:
        # Set after wrapping: Horovod rebuilds the optimizer from its config, which would lose the schedule's
        # variables.
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        inner.learning_rate = ElasticSchedule(inner._learning_rate)
    default_loss, default_metrics = loss_and_metrics()
    model.compile(optimizer=optimizer, loss=loss or default_loss,
                  metrics=default_metrics if metrics is None else metrics,
                  steps_per_execution=cfg.train.steps_per_execution, jit_compile=cfg.train.jit_compile)
    if model.built:  # the optimizer's state before the first step: the train function is traced once, not twice
        from hvdtrain.formats.checkpoint import build_optimizer

        build_optimizer(optimizer, model.trainable_variables)
    return model


def learning_rate_schedule(cfg: TrainConfig, plan):
    """The run's :class:`~hvdtrain.schedule.WarmupSchedule` for ``plan`` (warmup, then constant/cosine/step)."""
    from hvdtrain.schedule import WarmupSchedule

    return WarmupSchedule(
        base_lr=plan.base_learning_rate if plan.warmup_steps else plan.learning_rate,
        peak_lr=plan.learning_rate, warmup_steps=plan.warmup_steps, total_steps=plan.total_steps,
        kind=cfg.schedule, step_every=max(1, int(cfg.step_decay_epochs * plan.steps_per_epoch)),
        step_factor=cfg.step_decay_factor,
    )


# Horovod's cycle time (ms) when tensor parallelism puts small collectives on the critical path (and no pipeline
# does), the controller is MPI and the config leaves it unset (distributed.cycle_time_ms=0; a HOROVOD_CYCLE_TIME in the
# environment wins over both). Measured (docs/performance.md, `hvdtrain benchmark --collectives`): a dependent 1 KB
# allreduce under MPI costs 2.07 ms at Horovod's default of 1 ms and 0.125 ms at 0.001 ms (43x the MPI floor of
# 2.9 us). Pipelines keep the default: their receives are posted when the step starts and stay pending for most of
# it, so at 0.001 ms the background threads negotiate without pause and slowed both stages' compute (1F1B at M=8 on a
# 4-block gpt of width 512: 5 of 20 steps took 4.2-5.2 s; at 1 ms every step took 2.6-3.1 s; docs/performance.md).
# Under Gloo a dependent collective stays about 5 ms at any cycle time, so Gloo keeps the default too: the polling
# thread only costs CPU there.
MODEL_PARALLEL_CYCLE_TIME_MS = 0.001
# Horovod's fusion threshold (MB), when unset, for the layouts that average their own gradients (tensor, pipeline,
# sharded parameters). Horovod allocates a fusion buffer (64 MB by default) per process set the first time two of its
# tensors fuse, which depends on timing, and keeps it for the run: a layout's data, tensor, pipeline and tie groups
# can each get one. A bucket of sharded parameters is already one flat tensor, and a weight's gradient of a large
# model is above 1 MB: fusion only copies them. Below 1 MB small collectives (biases, norms, metrics) still fuse;
# above it a tensor goes alone. Measured (docs/performance.md, interleaved launches): a gpt of 16 blocks, width 64 ->
# 384, data=4 sharded: 22.1-22.5 against 18.4-20.0 bytes per parameter of a rank's quarter; tensor=2 x pipeline=2 with
# sequence parallelism at width 768: 19.7-24.1 against 18.2-19.3; a gpt of width 512 at data=2 x tensor=2 and data=2
# x pipeline=2: 45-50 MB less per rank at the same tokens/s (0.97x and 1.13x, 0.98x and 0.99x; Gloo and MPI).
LAYOUT_FUSION_THRESHOLD_MB = 1.0


def horovod_knobs(cfg: Config):
    """``cfg.distributed``, with what hvdtrain chooses when the config leaves it unset: under MPI the cycle time
    for a layout without a pipeline whose step waits on a chain of collectives (tensor parallelism: one per block;
    sharded parameters: a gather and a reduce-scatter per unit), and for a layout that averages its own gradients
    (tensor, pipeline, sharded parameters) a small fusion threshold."""
    import dataclasses

    knobs = cfg.distributed
    chained = (cfg.parallel.tensor > 1 or cfg.parallel.shard_params) and cfg.parallel.pipeline == 1
    if not knobs.cycle_time_ms and chained and not distributed.launched_with_gloo():
        knobs = dataclasses.replace(knobs, cycle_time_ms=MODEL_PARALLEL_CYCLE_TIME_MS)
    own_gradients = cfg.parallel.tensor > 1 or cfg.parallel.pipeline > 1 or cfg.parallel.shard_params
    if not knobs.fusion_threshold_mb and own_gradients:
        knobs = dataclasses.replace(knobs, fusion_threshold_mb=LAYOUT_FUSION_THRESHOLD_MB)
    return knobs


# A pipeline stage idles in the bubble and while it waits for its peer; with twice its share of the cores' threads
# a busy stage runs on the cores an idle one leaves, which pays when its operations are large and costs when they are
# small (threads then wait on each other across ranks). Measured on 2 cores, 2 ranks, interleaved (docs/performance.md):
# 1F1B, M=8, on a 4-block llama of width 512, 6.1 GFLOP per micro-batch and stage forward: 1,495 and 1,524 tokens/s
# at 2 threads per rank against 1,335 and 1,349 at 1; the gpt of width 512, 3.3 GFLOP: 983 and 991 against 862 and
# 947; gpt-tiny, M=4, 0.24 GFLOP: 13,708 and 17,484 against 16,025 and 21,157.
DOUBLE_THREADS_FLOPS = 1e9  # a stage's forward FLOPs per micro-batch from which a pipeline stage gets twice its share


def stage_forward_flops(cfg: Config) -> float:
    """A pipeline stage's model FLOPs in one micro-batch's forward pass (an even share of the model's); 0 without
    a pipeline or a planned model family."""
    import models

    p = cfg.parallel
    if p.pipeline == 1 or not models.has_plan(cfg.model.name):
        return 0.0
    plan = models.parallel_plan(cfg.model.name, input_shape=(cfg.data.context_length,),
                                num_classes=cfg.data.num_classes or 256, **cfg.model.params)
    tokens = cfg.data.batch_size_per_rank / p.microbatches * cfg.data.context_length
    return plan.flops_per_token() / 3 * tokens / (p.pipeline * p.tensor)


def init(cfg: Config, autotune_log: str = "", dynamic_process_sets: bool = False) -> None:
    """Horovod for ``cfg`` (knobs, threads per rank, XLA kernels, process sets for model parallelism, or for
    layouts made later with ``dynamic_process_sets``); a no-op when already initialised."""
    distributed.init(horovod_knobs(cfg), threads_per_rank=cfg.distributed.threads_per_rank,
                     enable_xla_ops=cfg.train.jit_compile, autotune_log=autotune_log,
                     dynamic_process_sets=dynamic_process_sets or cfg.parallel.tensor > 1 or cfg.parallel.pipeline > 1
                     or cfg.parallel.shard_degree > 0,
                     double_threads=stage_forward_flops(cfg) >= DOUBLE_THREADS_FLOPS)


def begin(cfg: Config, autotune_log: str = "", dynamic_process_sets: bool = False):
    """What every command that trains does first, in this order: Horovod (:func:`init`), the option checks that
    need the world size, the rank grid, the run's seed and the precision policy. Returns the mesh
    (:func:`make_mesh`); the caller then loads its data and makes its layout (:func:`make_layout`, :func:`prepare`).
    """
    import tensorflow as tf

    init(cfg, autotune_log, dynamic_process_sets)
    check_options(cfg)
    mesh = make_mesh(cfg)
    tf.keras.utils.set_random_seed(cfg.train.seed)
    tf.keras.mixed_precision.set_global_policy(cfg.train.precision)
    return mesh


def make_mesh(cfg: Config):
    """The rank grid of ``cfg.parallel`` at the current world size (a config error when it does not fit)."""
    from hvdtrain.distributed.mesh import make_mesh as mesh

    return mesh(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.shard_degree)


def make_layout(cfg: Config, source, mesh):
    """The layout ``cfg.parallel`` asks for (:mod:`hvdtrain.parallel`), of the model ``cfg.model`` for
    ``source``'s shapes.

    Tensor and pipeline layouts build only this rank's part, from the family's plan; data parallelism builds the
    whole Keras model (starting, for a family with a plan, from the plan's per-variable initial weights, so every
    layout starts from the same model). With ``model.pretrained`` the weights are the checkpoint's, each rank
    reading only its slices; with ``train.lora_rank`` the plan gains adapters and freezes the rest (a LoRA run is
    laid out by the plan's engine at every layout, data parallelism alone included).
    """
    import dataclasses

    from hvdtrain import parallel
    from hvdtrain.formats import huggingface

    p = cfg.parallel
    plan = model_plan(cfg.model, source)
    lora = lora_setting(cfg, plan) if plan is not None else None
    checkpoint = pretrained_checkpoint(cfg, source)
    initial = huggingface.initial_values(checkpoint, plan) if checkpoint is not None else None
    if p.tensor > 1 or p.pipeline > 1 or p.recompute or p.shard_optimizer or p.shard_params or lora:
        from models.lora import adapt

        layout = parallel.Parallel(cfg, mesh, adapt(plan, lora) if lora else plan,
                                   keras_model=lambda: build_model(cfg.model, source), initial=initial)
    else:
        model = build_model(cfg.model, source)
        if plan is not None:
            from models.plan import initialize

            # dropout: this replica's examples start at data_rank x batch in each global batch
            initialize(model, plan, cfg.train.seed, mesh.data_rank * cfg.data.batch_size_per_rank, initial)
        layout = parallel.DataParallel(model, mesh, plan)
    layout.spec = {"name": cfg.model.name, "params": dict(cfg.model.params), "input_shape": list(source.input_shape),
                   "num_classes": int(source.num_classes), "pretrained": cfg.model.pretrained or None,
                   "lora": dataclasses.asdict(lora) if lora else None}
    return layout


def job_peak_flops(precision: str, collective: bool = True) -> tuple[float, str]:
    """The job's peak FLOP/s and where it comes from (:mod:`hvdtrain.flops`): a GPU's published peak times the
    ranks, or on the CPU each host's peak (its ranks probe at once, sharing its cores as in training; the best sum
    this host has given to any run, whatever its split into ranks and threads) summed over the hosts.
    ``collective=False`` (elastic start-up, where a late joiner runs no collective): this host's peak times the
    hosts, counted as world size / ranks per host."""
    import socket

    from hvdtrain import flops

    published = flops.published_peak(precision)
    if published is not None:
        peak, source = published
        return peak * distributed.size(), source
    if collective and distributed.size() > 1:
        distributed.barrier()  # every rank of the host probes at once
    key, probe = flops.host_key(), flops.matmul_probe()
    host = f"{socket.gethostname()} | {key}"
    if not collective or distributed.size() == 1:
        peak = flops.host_peaks([(host, probe * distributed.local_size())], {host: flops.kept_peak(key)})[host]
        flops.keep_peak(key, peak)
        return peak * max(1, distributed.size() // distributed.local_size()), flops.PROBE
    peaks = flops.host_peaks(distributed.allgather_object((host, probe)), {host: flops.kept_peak(key)})
    flops.keep_peak(key, peaks[host])
    # every host's best, as each one kept it
    return sum(dict(distributed.allgather_object((host, peaks[host]))).values()), flops.PROBE
