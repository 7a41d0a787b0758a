"""The core of the distributed package (the only part of hvdtrain that imports Horovod).

Everything data-parallel goes through here: the six steps of Horovod use (init, pin a device, scale the learning
rate — see :mod:`hvdtrain.batch_plan` —, wrap the optimizer, broadcast the initial state, checkpoint on rank 0 — see
:mod:`hvdtrain.callbacks`), the Horovod knobs that must be set before ``hvd.init()``, threads per rank, and the
collectives that the rest of hvdtrain needs (averaging numbers, broadcasting Python objects).

Run under ``horovodrun``/``mpirun`` it uses the launcher's ranks; run as a plain process it is a world of size 1,
so the same script works in both.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

_initialized = False


def horovod_environment(knobs: Any = None, autotune_log: str = "", enable_xla_ops: bool = False) -> dict[str, str]:
    """The ``HOROVOD_*`` variables for ``knobs`` (a :class:`hvdtrain.config.DistributedConfig`).

    Each knob is declared once, as a config field whose metadata names its variable (``horovod_env``) and the
    factor from the config's unit to Horovod's (``scale``); unset knobs leave Horovod's defaults.
    """
    env: dict[str, str] = {}
    if knobs is not None:
        for f in dataclasses.fields(knobs):
            name = f.metadata.get("horovod_env")
            value = getattr(knobs, f.name)
            if not name or not value:
                continue
            if isinstance(value, bool):
                env[name] = "1"
            elif f.metadata.get("scale", 1) != 1:
                env[name] = str(int(value * f.metadata["scale"]))
            else:
                env[name] = str(value)
        if autotune_log and getattr(knobs, "autotune", False):
            env["HOROVOD_AUTOTUNE_LOG"] = autotune_log
        if getattr(knobs, "timeline", ""):
            env["HOROVOD_TIMELINE"] = "DYNAMIC"  # started once the output directory exists (start_timeline)
    if enable_xla_ops:
        env["HOROVOD_ENABLE_XLA_OPS"] = "1"
    return env


def launched() -> bool:
    """True when a launcher (horovodrun with Gloo, mpirun, srun) started this process as one of several ranks."""
    keys = ("HOROVOD_RANK", "HOROVOD_GLOO_RENDEZVOUS_ADDR", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
    return any(k in os.environ for k in keys)


def launched_with_gloo() -> bool:
    """True when Horovod will run this process with Gloo (horovodrun --gloo or Ray set ``HOROVOD_CONTROLLER``, or a
    plain process); known before ``hvd.init()``, from the launcher's environment."""
    return os.environ.get("HOROVOD_CONTROLLER", "").lower() == "gloo" or not launched()


def default_threads(cores: int, local_ranks: int, double: bool = False) -> int:
    """TensorFlow intra-op threads for one rank: an equal share of the host's ``cores``, or with ``double`` twice
    that (at most ``cores``: hvdtrain.runtime doubles it for the stages of a pipeline with enough work per op)."""
    share = max(1, cores // max(1, local_ranks))
    return min(max(1, cores), 2 * share) if double else share


def init(knobs: Any = None, threads_per_rank: int = 0, pin_gpu: bool = True, *, enable_xla_ops: bool = False,
         autotune_log: str = "", dynamic_process_sets: bool = False, double_threads: bool = False) -> None:
    """Initialise Horovod once per process.

    Args:
        knobs: Horovod tuning (a :class:`hvdtrain.config.DistributedConfig`), set into the environment before
            ``hvd.init()``.
        threads_per_rank: TensorFlow intra-op threads for this rank; 0 gives each rank on a host an equal share
            of the cores this process may use, so ranks do not fight over them (:func:`default_threads`).
        pin_gpu: make only the GPU of this rank's local rank visible.
        enable_xla_ops: Horovod's XLA kernels (``train.jit_compile`` on GPUs).
        autotune_log: a local file for Horovod's autotuning log (written by rank 0).
        dynamic_process_sets: allow process sets to be added after init (the tensor and pipeline groups of
            :func:`hvdtrain.distributed.mesh.make_mesh`).
        double_threads: with ``threads_per_rank=0``, twice the rank's share of the cores (:func:`default_threads`).
    """
    global _initialized
    if _initialized:
        return
    for key, value in horovod_environment(knobs, autotune_log, enable_xla_ops).items():
        os.environ.setdefault(key, value)
    if not launched():
        # A plain process is a world of size 1. Gloo gives it without touching MPI, so a single process also
        # runs where OpenMPI is missing or misconfigured (an MPI singleton start works here too).
        os.environ.setdefault("HOROVOD_CONTROLLER", "gloo")
        os.environ.setdefault("HOROVOD_CPU_OPERATIONS", "gloo")
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    hvd.init(process_sets="dynamic") if dynamic_process_sets else hvd.init()
    _initialized = True

    threads = threads_per_rank or default_threads(len(os.sched_getaffinity(0)), hvd.local_size(), double_threads)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
    except RuntimeError:
        pass  # TensorFlow already started (a user's script ran ops first); its thread pools are fixed now.
    if pin_gpu:
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            gpu = gpus[hvd.local_rank() % len(gpus)]
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
                tf.config.set_visible_devices(gpu, "GPU")
            except RuntimeError:
                pass


def _hvd():
    if not _initialized:
        raise RuntimeError("call hvdtrain.init() before asking for ranks or collectives")
    import horovod.tensorflow.keras as hvd

    return hvd


def rank() -> int:
    """This process's rank among all ranks (0 is the chief)."""
    return _hvd().rank()


def size() -> int:
    """Number of ranks."""
    return _hvd().size()


def local_rank() -> int:
    """This process's rank on its host (selects its GPU)."""
    return _hvd().local_rank()


def local_size() -> int:
    """Number of ranks on this host."""
    return _hvd().local_size()


def is_chief() -> bool:
    """True on rank 0, the only rank that writes files and prints progress."""
    return rank() == 0


def controller() -> str:
    """``"gloo"`` or ``"mpi"``: the controller Horovod is running with."""
    import horovod.tensorflow as hvd_tf

    _hvd()
    return "gloo" if hvd_tf.gloo_enabled() else "mpi"


REDUCE_OPS = ("average", "sum", "adasum")


def _reduce_op(name: str):
    import horovod.tensorflow as hvd_tf

    _hvd()
    ops = {"average": hvd_tf.Average, "sum": hvd_tf.Sum, "adasum": hvd_tf.Adasum, "max": hvd_tf.Max,
           "min": hvd_tf.Min}
    if name not in ops:
        raise ValueError(f"reduce_op must be one of {', '.join(ops)}, got '{name}'")
    return ops[name]


def _grad_compression(name: str):
    hvd = _hvd()
    kinds = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}
    if name not in kinds:
        raise ValueError(f"grad_compression must be 'none' or 'fp16', got '{name}'")
    return kinds[name]


def wrap_optimizer(
    optimizer,
    *,
    grad_compression: str = "none",
    backward_passes_per_step: int = 1,
    reduce_op: str = "average",
    precision: str = "float32",
):
    """Return ``optimizer`` ready for ``model.compile``: gradients allreduced across ranks.

    Args:
        optimizer: a Keras optimizer.
        grad_compression: ``"fp16"`` sends gradients as float16 over the wire (halves allreduce bytes).
        backward_passes_per_step: accumulate gradients locally over this many batches before one allreduce.
        reduce_op: ``"average"`` (default), ``"sum"`` or ``"adasum"``.
        precision: ``"mixed_float16"`` adds dynamic loss scaling *outside* the Horovod optimizer, so every rank
            checks the averaged gradients for inf/NaN and all ranks skip the same steps.

    Returns:
        The wrapped optimizer.
    """
    import tensorflow as tf

    hvd = _hvd()
    if reduce_op == "adasum":
        # Horovod's Keras DistributedOptimizer raises "op currently only supports Average and Sum".
        raise ValueError("reduce_op=adasum is not supported with Keras optimizers by Horovod 0.28 (only average "
                         "and sum); use hvdtrain.distributed.gradient_tape(..., reduce_op='adasum') in a custom loop")
    op = _reduce_op(reduce_op)
    if precision == "mixed_float16" and backward_passes_per_step > 1:
        # Seen at 2 ranks: each rank's loss scaler checks its *local* gradients on the passes that only
        # accumulate, so an overflow on one rank changes that rank's loss scale alone and the ranks drift apart.
        raise ValueError("mixed_float16 loss scaling with backward_passes_per_step > 1 lets ranks disagree; "
                         "use backward_passes_per_step=1 or mixed_bfloat16")
    if isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer):
        raise ValueError("pass the plain optimizer; wrap_optimizer(precision='mixed_float16') adds loss scaling")
    dist = hvd.DistributedOptimizer(
        optimizer,
        compression=_grad_compression(grad_compression),
        backward_passes_per_step=backward_passes_per_step,
        average_aggregated_gradients=backward_passes_per_step > 1,
        op=op,
    )
    if precision == "mixed_float16":
        dist = tf.keras.mixed_precision.LossScaleOptimizer(dist)
    return dist


def gradient_tape(tape, grad_compression: str = "none", reduce_op: str = "average"):
    """Wrap a ``tf.GradientTape`` so ``tape.gradient`` returns gradients reduced across ranks.

    For custom train steps (distillation): ``optimizer.apply_gradients`` alone does not average. ``adasum`` is
    available here (Horovod's MPI controller), unlike with Keras optimizers.
    """
    import horovod.tensorflow as hvd_tf

    _hvd()
    if reduce_op == "adasum" and size() > 1 and controller() != "mpi":
        raise ValueError("reduce_op=adasum needs Horovod's MPI controller: launch with mpirun or horovodrun --mpi")
    return hvd_tf.DistributedGradientTape(tape, compression=_grad_compression(grad_compression),
                                          op=_reduce_op(reduce_op))


def broadcast_callback(root_rank: int = 0):
    """Keras callback: broadcast all model and optimizer variables from ``root_rank`` after the first batch."""
    callback = _hvd().callbacks.BroadcastGlobalVariablesCallback(root_rank)
    # It never reads the logs; without this flag Keras converts them to NumPy after every batch for it, a
    # device-to-host sync per step.
    callback._supports_tf_logs = True
    return callback


def metric_average_callback():
    """Keras callback: replace each epoch's logged metrics by their average over ranks."""
    return _hvd().callbacks.MetricAverageCallback()


def run_elastic(model, train_fn):
    """Run ``train_fn(state)`` under Horovod's elastic mode, with ``state`` holding the model, its optimizer, the
    epoch, the batch (counted in steps of ``steps_per_epoch``) and ``prepared`` (false until ``train_fn`` has done
    its once-per-job start-up); on a membership
    change Horovod restores the last commit (or, for an added host, keeps it) and calls ``train_fn`` again."""
    hvd = _hvd()
    opt = model.optimizer
    getattr(opt, "inner_optimizer", opt).build(model.trainable_variables)  # so the state includes the slots
    state = hvd.elastic.KerasState(model, batch=0, epoch=0, prepared=False, steps_per_epoch=0)
    return hvd.elastic.run(train_fn)(state)


def elastic_callbacks(state, batches_per_commit: int):
    """Keras callbacks that keep the elastic ``state``'s epoch and batch current and commit it periodically."""
    hvd = _hvd()
    return [hvd.elastic.UpdateBatchStateCallback(state), hvd.elastic.UpdateEpochStateCallback(state),
            hvd.elastic.CommitStateCallback(state, batches_per_commit=batches_per_commit)]


def broadcast_variables(variables, root_rank: int = 0) -> None:
    """Overwrite ``variables`` on every rank with their values on ``root_rank``."""
    import horovod.tensorflow as hvd_tf

    _hvd()
    if variables:
        hvd_tf.broadcast_variables(variables, root_rank=root_rank)


def allreduce(value, op: str = "average", name: str | None = None) -> np.ndarray:
    """Reduce a number or array over all ranks; returns a NumPy value on every rank."""
    import horovod.tensorflow as hvd_tf
    import tensorflow as tf

    _hvd()
    tensor = tf.convert_to_tensor(np.asarray(value, dtype=np.float64))
    return hvd_tf.allreduce(tensor, op=_reduce_op(op), name=name).numpy()


def allreduce_tensor(tensor, op: str = "sum", name: str | None = None):
    """Reduce a tensor over all ranks inside or outside a graph (``sum``, ``average``, ``max``, ``min``)."""
    import horovod.tensorflow as hvd_tf

    _hvd()
    if size() == 1:
        return tensor
    return hvd_tf.allreduce(tensor, op=_reduce_op(op), name=name)


def broadcast_object(obj: Any, root_rank: int = 0) -> Any:
    """Send a picklable Python object from ``root_rank`` to every rank."""
    import horovod.tensorflow as hvd_tf

    _hvd()
    return hvd_tf.broadcast_object(obj, root_rank=root_rank)


def allgather_object(obj: Any) -> list[Any]:
    """Every rank's picklable object, in rank order, on every rank."""
    import horovod.tensorflow as hvd_tf

    _hvd()
    return hvd_tf.allgather_object(obj) if size() > 1 else [obj]


def start_timeline(path: str) -> None:
    """Start Horovod's timeline (Chrome trace JSON, written by rank 0) once the file's folder exists."""
    _hvd().start_timeline(path, mark_cycles=False)


def shutdown() -> None:
    """Shut Horovod down (when it was started); the ranks then stop exchanging."""
    global _initialized
    if _initialized:
        import horovod.tensorflow as hvd_tf

        hvd_tf.shutdown()
        _initialized = False


def stop_timeline() -> None:
    """Stop Horovod's timeline and flush its file."""
    _hvd().stop_timeline()


def agree(error: str | None) -> None:
    """Every rank raises the chief's error, or none does (a collective: every rank must call it).

    For checks only the chief can make (can the output directory be written?): a rank that stopped alone would
    leave the others waiting in the next collective.
    """
    from hvdtrain.errors import HvdtrainError

    error = broadcast_object(error) if size() > 1 else error
    if error:
        raise HvdtrainError(error)


def extremes(values) -> tuple[np.ndarray, np.ndarray]:
    """``(min, max)`` over ranks of each entry of ``values``, the same on every rank (one collective)."""
    import horovod.tensorflow as hvd_tf
    import tensorflow as tf

    _hvd()
    values = np.asarray(values, dtype=np.float64)
    if size() == 1:
        return values, values
    both = tf.constant(np.concatenate([values, -values]))
    out = hvd_tf.allreduce(both, op=hvd_tf.Max, name="hvdtrain_extremes").numpy()
    n = len(values)
    return -out[n:], out[:n]


def barrier() -> None:
    """Wait until every rank reaches this point (a tiny allreduce: Horovod 0.28's TF API has no barrier)."""
    import horovod.tensorflow as hvd_tf
    import tensorflow as tf

    _hvd()
    hvd_tf.allreduce(tf.zeros([1]), op=hvd_tf.Sum, name="hvdtrain_barrier").numpy()


__all__ = [
    "REDUCE_OPS", "agree", "allgather_object", "allreduce", "allreduce_tensor", "barrier", "broadcast_callback",
    "broadcast_object", "broadcast_variables",
    "controller", "elastic_callbacks", "gradient_tape", "horovod_environment", "init", "is_chief", "launched",
    "launched_with_gloo", "local_rank",
    "local_size", "metric_average_callback", "rank", "run_elastic", "shutdown", "size", "extremes", "start_timeline",
    "stop_timeline",
    "wrap_optimizer",
]
