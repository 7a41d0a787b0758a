"""How a model is laid out over the ranks, and how each layout trains, checkpoints and restores.

- :class:`DataParallel` (the default): every rank holds the whole Keras model; Horovod's ``DistributedOptimizer``
  averages gradients over all ranks; the chief writes checkpoints.
- :class:`Parallel` (``parallel.tensor``, ``parallel.pipeline``, ``parallel.shard_optimizer``,
  ``parallel.recompute``): each rank holds only its part: its tensor-parallel slices of its pipeline stage's
  weights, made one variable at a time from the family's plan (:mod:`hvdtrain.distributed.sharded`), and its slice
  of the optimizer state (:mod:`hvdtrain.distributed.zero`). :class:`ParallelTrainer` is the Keras model that
  ``fit`` trains. Every rank that holds state no other rank holds writes it to the checkpoint itself.

Both offer the run the same interface, so a run is the same run whatever the layout: the model to fit, where this
rank's data comes from, the variables that must stay identical and across which ranks (for the divergence guard),
what this rank writes to a checkpoint and how it reads one back (at any layout: :mod:`hvdtrain.formats.checkpoint`), and
the bytes it holds.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from hvdtrain import distributed
from hvdtrain.formats.checkpoint import (CheckpointError, Piece, Reader, build_optimizer, inner_optimizer, is_sharded,
                                 read_legacy)
from hvdtrain.distributed.mesh import Group, Mesh
from hvdtrain.distributed.sharded import Entry, KerasModule, ShardedModule, bytes_of, keras_name
from hvdtrain.errors import ConfigError

COMPUTE_DTYPES = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16, "mixed_float16": tf.float16}


def slot_kind(slot, variable) -> str:
    """The name of the slot kind (``m``, ``v``, ``momentum``) of ``slot``, the optimizer's state for ``variable``.

    Keras names a slot ``[scope/]KIND/VARIABLE``: an optimizer that built its state inside its first step has its
    own name scope there (``Adam/m/dense/kernel``), one built beforehand (a resume) has none (``m/dense/kernel``).
    """
    name, ref = slot.name.split(":")[0], variable.name.split(":")[0]
    if name.endswith("/" + ref):
        name = name[: -len(ref) - 1]
    return name.split("/")[-1]


def slots_of(optimizer, variables) -> tuple[list[str], list[list[tf.Variable]]]:
    """The optimizer's state per slot kind, each a list aligned with ``variables`` (Keras keeps, after the step
    count, every variable's slots one after the other: ``m0, v0, m1, v1, ...``), and the kinds' names."""
    opt = inner_optimizer(optimizer)
    slots = [v for v in opt.variables if v is not opt.iterations]
    if not variables or not slots:
        return [], []
    kinds = len(slots) // len(variables)
    return ([slot_kind(slots[k], variables[0]) for k in range(kinds)],
            [[slots[i * kinds + k] for i in range(len(variables))] for k in range(kinds)])


def _meta(entries: list[Entry]) -> dict[str, dict]:
    return {e.name: {"shape": list(e.shape), "axis": e.axis, "parts": e.parts, "trainable": e.trainable}
            for e in entries if not e.frozen}


def _check_fits(reader: Reader, entries: list[Entry]) -> None:
    """One-line errors when a checkpoint is of another model."""
    for e in [e for e in entries if not e.frozen]:
        if e.name not in reader.variables:
            raise CheckpointError(f"{reader.uri} is of another model: it has no variable {e.name}")
        if tuple(reader.variables[e.name]["shape"]) != tuple(e.shape):
            raise CheckpointError(f"{reader.uri} is of another model: {e.name} has shape "
                                  f"{tuple(reader.variables[e.name]['shape'])} there, {tuple(e.shape)} here")


class DataParallel:
    """Every rank holds the whole model; gradients are averaged over all ranks by Horovod's optimizer."""

    collective_checkpoint = False  # the chief writes and reads, then broadcasts
    spec = None  # the model a checkpoint holds (set by make_layout)

    def __init__(self, model, mesh: Mesh, plan=None):
        from models.plan import is_clock

        self.model, self.mesh, self.plan = model, mesh, plan
        self.training_model = model
        if plan is not None:
            from models.plan import keras_variables

            by_id = {id(v): n for n, v in keras_variables(model, plan).items()}
        else:
            by_id = {}
        # what a checkpoint holds: every variable but the dropout step counters (set from the step on a resume)
        self.variables = [v for v in model.variables if not is_clock(v)]
        self.names = [by_id.get(id(v)) or keras_name(i, v) for i, v in enumerate(self.variables)]

    @property
    def data_rank(self) -> int:
        """This rank's data shard (its rank: in elastic runs the world changes)."""
        return distributed.rank()

    @property
    def data_size(self) -> int:
        """Number of data shards: every rank."""
        return distributed.size()

    counted = True  # every rank's evaluation counts

    def build_optimizer(self) -> None:
        """Create the optimizer state now (it exists only after a first step otherwise)."""
        build_optimizer(self.model.optimizer, self.model.trainable_variables)

    def _state_variables(self) -> dict[str, tf.Variable]:
        """The optimizer's scalars a checkpoint keeps: its step, the loss scale, the elastic schedule's state."""
        opt = self.model.optimizer
        inner = inner_optimizer(opt)
        out = {"iterations": inner.iterations}
        if isinstance(opt, tf.keras.mixed_precision.LossScaleOptimizer) and opt.dynamic:
            out["loss_scale"] = opt._loss_scale._current_loss_scale
            out["loss_scale_good_steps"] = opt.dynamic_counter
        schedule = getattr(inner, "_learning_rate", None)
        for key in ("scale", "ratio", "start", "offset"):
            if isinstance(getattr(schedule, key, None), tf.Variable):
                out[f"schedule_{key}"] = getattr(schedule, key)
        return out

    # ---- checkpoints

    def _entries(self) -> list[Entry]:
        return [Entry(n, tuple(v.shape), None, 0, 1, trainable=v.trainable)
                for n, v in zip(self.names, self.variables)]

    def checkpoint_pieces(self) -> list[Piece]:
        """The whole model and optimizer state (the chief writes them)."""
        pieces = [Piece(n, "param", 0, 0, int(np.prod(v.shape)), v) for n, v in zip(self.names, self.variables)]
        trainable = self.model.trainable_variables
        names = {id(v): n for n, v in zip(self.names, self.variables)}
        kinds, slots = slots_of(self.model.optimizer, trainable)
        for kind, per_var in zip(kinds, slots):
            pieces += [Piece(names[id(v)], kind, 0, 0, int(np.prod(v.shape)), s) for v, s in zip(trainable, per_var)]
        return pieces

    def variables_meta(self) -> dict[str, dict]:
        return _meta(self._entries())

    def scalars(self) -> dict[str, float]:
        return {k: float(v.numpy()) for k, v in self._state_variables().items()}

    def describe_layout(self) -> dict[str, Any]:
        return {"world": distributed.size(), "data": distributed.size(), "tensor": 1, "pipeline": 1,
                "shard_optimizer": False}

    def load_checkpoint(self, uri: str) -> None:
        """Read a checkpoint (of any layout) into the model and its optimizer (on the chief)."""
        if not is_sharded(uri):
            read_legacy(uri, self.model, self.model.optimizer)
            return
        reader = Reader(uri)
        _check_fits(reader, self._entries())
        for name, var in zip(self.names, self.variables):
            var.assign(reader.read(name).astype(var.dtype.as_numpy_dtype))
        _assign_slots(reader, self.model.optimizer, self.model.trainable_variables,
                      {id(v): n for n, v in zip(self.names, self.variables)})
        _assign_scalars(reader, self._state_variables())
        from models.plan import set_clocks

        set_clocks(self.model, int(self._state_variables()["iterations"].numpy()))

    def distribute_restored(self) -> None:
        """Give every rank the state the chief restored (a collective)."""
        if distributed.size() > 1:
            state = list(self._state_variables().values())
            distributed.broadcast_variables(self.model.variables + list(self.model.optimizer.variables) + state)

    # ---- what the run asks of every layout

    def consistency_groups(self) -> list[tuple[list, Group | None]]:
        """Variables that must be identical, and over which ranks (None: all of them)."""
        return [(self.model.trainable_variables, None)]

    def broadcast_callback(self):
        """The callback that gives every rank rank 0's initial state."""
        return distributed.broadcast_callback(0)

    def memory(self) -> dict[str, int]:
        """Bytes of parameters and optimizer state on this rank."""
        opt = inner_optimizer(self.model.optimizer)
        params = bytes_of(self.model.trainable_variables)
        return {"param_bytes_full": params, "param_bytes_per_rank": bytes_of(self.model.variables),
                "sharded_param_bytes_per_rank": 0,
                "optimizer_bytes_per_rank": bytes_of([v for v in opt.variables if v is not opt.iterations])}


def _assign_slots(reader: Reader, optimizer, variables, names: dict[int, str], boxes=None) -> None:
    kinds, slots = slots_of(optimizer, variables)
    for kind, per_var in zip(kinds, slots):
        for i, (var, slot) in enumerate(zip(variables, per_var)):
            name = names[id(var)]
            if kind not in reader.kinds(name):
                raise CheckpointError(f"{reader.uri} holds no optimizer state '{kind}' for {name} (it holds "
                                      f"{', '.join(k for k in reader.kinds(name) if k != 'param') or 'none'}): "
                                      "was it written with another train.optimizer?")
            slot.assign(reader.read(name, kind, boxes[i] if boxes else None))


def _assign_scalars(reader: Reader, variables: dict[str, tf.Variable]) -> None:
    for key, var in variables.items():
        if key in reader.scalars:
            var.assign(tf.cast(reader.scalars[key], var.dtype))


class Parallel:
    """The model split over the mesh: tensor-parallel slices, pipeline stages, sharded optimizer state.

    Args:
        cfg: the run's config (``parallel``, ``train`` and ``model`` sections are read).
        mesh: the rank grid.
        plan: the family's parallel plan (None: a model without one, for ``shard_optimizer`` alone).
        keras_model: builds the whole Keras model (only called when there is no plan).
        initial: ``initial(weight, box)``: a weight's initial slice (a pretrained checkpoint's), or None for its
            initializer's (:class:`~hvdtrain.distributed.sharded.ShardedModule`).
    """

    collective_checkpoint = True  # every rank writes its part and reads what it needs
    spec = None  # the model a checkpoint holds (set by make_layout)

    def __init__(self, cfg, mesh: Mesh, plan=None, keras_model=None, initial=None):
        from hvdtrain.distributed import pipeline

        self.cfg, self.mesh, self.plan = cfg, mesh, plan
        p = cfg.parallel
        self.compute_dtype = COMPUTE_DTYPES[cfg.train.precision]
        self.param_dtype = self.compute_dtype if p.shard_optimizer else tf.float32
        self.fsdp = p.shard_params  # the weights' own slices over the data group: the optimizer's with them
        # hybrid sharding: slices over the shard group, the same slices on every member of the replicate group
        self.replicas = mesh.replicate_group if self.fsdp else None
        self.pipeline = self.split = None
        if plan is None:
            model = keras_model()
            if mesh.data > 1:  # every replica starts from replica 0's weights
                mesh.data_group.broadcast_variables(model.variables)
            self.module = KerasModule(model)
            self.full_bytes = bytes_of(model.trainable_variables)
        else:
            for what, value in plan.divisors.items():
                if value % mesh.tensor:
                    raise ConfigError(f"parallel.tensor={mesh.tensor} must divide {what}={value}")
            units = plan.units
            if mesh.pipeline > 1:
                self.split = pipeline.split_stages(plan, mesh.pipeline)
                self.split_description = pipeline.describe_split(self.split)
                units = self.split[mesh.stage]
            self.module = ShardedModule(plan, units, mesh.tensor_group, cfg.train.seed, p.recompute,
                                        self.compute_dtype, self.param_dtype, sequence=p.sequence, initial=initial,
                                        shard=mesh.shard_group if self.fsdp else None, prefetch=p.prefetch,
                                        buckets_per_unit=p.buckets_per_unit)
            self.full_bytes = 4 * plan.parameters
            if mesh.pipeline > 1:
                positions, width = plan.activation
                if self.module.sequence:  # the stages pass on this member's positions
                    positions //= mesh.tensor
                self.pipeline = pipeline.Pipeline(self.module, mesh, p.schedule, p.microbatches, (positions, width),
                                                  self.compute_dtype)
        self.entries = self.module.entries
        self.entry = {e.name: e for e in self.entries}
        self.variables = self.module.trainable
        self.zero = None
        self.training_model = ParallelTrainer(self)

    data_rank = property(lambda self: self.mesh.data_rank)
    data_size = property(lambda self: self.mesh.data)

    @property
    def counted(self) -> bool:
        """Whether this rank's evaluation counts: one rank of each replica (the sums are the same on all)."""
        return self.mesh.tensor_rank == 0 and self.mesh.stage == 0

    @property
    def tied(self) -> list[int]:
        """Indices of this rank's variables that are copies of one weight on two pipeline stages."""
        if self.mesh.tie_group is None or self.plan is None:
            return []
        shared = {n for u in self.plan.units for n in u.shared}
        if self.fsdp:  # a tied weight is a bucket of its own, of the same geometry on both stages
            return [i for i, b in enumerate(self.module.buckets) if b.key in shared]
        return [i for i, e in enumerate(self.entries[: len(self.variables)]) if e.name in shared]

    # ---- sharded parameters: what a rank's bucket slices hold

    def bucket_ranges(self, select) -> list[list[tuple[int, int]]]:
        """Per bucket, ``(start, stop)`` within this rank's slice of the weights whose entry ``select`` accepts."""
        return [[(at, at + b - a) for i, a, b, at in bucket.flat.overlaps() if select(self.entry[bucket.names[i]])]
                for bucket in self.module.buckets]

    def attach_optimizer(self, optimizer) -> None:
        """Build the optimizer's state for this rank's variables (a slice of them with ``shard_optimizer``)."""
        if self.cfg.parallel.shard_optimizer and not self.fsdp:
            from hvdtrain.distributed.zero import ShardedOptimizer

            self.zero = ShardedOptimizer(optimizer, self.variables, self.mesh.data_group,
                                         [e.counted for e in self.entries[: len(self.variables)]])
        else:
            optimizer.build(self.variables)

    def build_optimizer(self) -> None:
        """The optimizer state exists from :meth:`attach_optimizer` on."""

    # ---- checkpoints: each rank writes its part, reads what its part needs

    @property
    def _writes(self) -> bool:
        return self.mesh.data_rank == 0

    def checkpoint_pieces(self) -> list[Piece]:
        """This rank's unique state: its counted slices (first replica), or its ZeRO slice (every rank)."""
        pieces = []
        if self.fsdp:
            if self.replicas.size > 1 and self.replicas.rank > 0:  # hybrid sharding: the first replica writes
                return []
            kinds, slots = slots_of(self.training_model.optimizer, self.variables)
            for j, bucket in enumerate(self.module.buckets):
                arrays = [("param", bucket.variable)] + [(k, per[j]) for k, per in zip(kinds, slots)]
                for i, a, b, at in bucket.flat.overlaps():
                    e = self.entry[bucket.names[i]]
                    if e.counted:  # each range read when the bundle writes it
                        pieces += [Piece(e.name, kind, e.part, a, b, _reader(values, at, at + b - a))
                                   for kind, values in arrays]
            return pieces
        if self.zero is not None:
            for i, kind, a, b, values in self.zero.pieces():
                e = self.entries[i]
                if e.counted:
                    pieces.append(Piece(e.name, kind, e.part, a, b, values))
            extra = [(e, v) for e, v in zip(self.entries, self.module.all_variables())
                     if not e.trainable and not e.frozen]
            if self._writes:
                pieces += [Piece(e.name, "param", e.part, 0, int(np.prod(v.shape)), v.numpy()) for e, v in extra]
            return pieces
        if not self._writes:
            return []
        kinds, slots = slots_of(self.training_model.optimizer, self.variables)
        trainable = len(self.variables)
        for i, (e, var) in enumerate(zip(self.entries, self.module.all_variables())):
            if not e.counted or e.frozen:
                continue
            size = int(np.prod(var.shape))
            pieces.append(Piece(e.name, "param", e.part, 0, size, var))
            if i < trainable:
                pieces += [Piece(e.name, kind, e.part, 0, size, per_var[i]) for kind, per_var in zip(kinds, slots)]
        return pieces

    def variables_meta(self) -> dict[str, dict]:
        return _meta(self.entries)

    def _state_variables(self) -> dict[str, tf.Variable]:
        opt = self.zero.optimizer if self.zero is not None else inner_optimizer(self.training_model.optimizer)
        out = {"iterations": opt.iterations}
        if self.training_model.loss_scale is not None:
            out["loss_scale"] = self.training_model.loss_scale
            out["loss_scale_good_steps"] = self.training_model.good_steps
        return out

    def scalars(self) -> dict[str, float]:
        return {k: float(v.numpy()) for k, v in self._state_variables().items()}

    def describe_layout(self) -> dict[str, Any]:
        return {"world": self.mesh.world, "data": self.mesh.data, "tensor": self.mesh.tensor,
                "pipeline": self.mesh.pipeline, "shard_optimizer": self.cfg.parallel.shard_optimizer,
                "shard_params": self.fsdp, **({"shard_degree": self.mesh.shard_group.size}
                                              if self.fsdp and self.replicas.size > 1 else {})}

    def load_checkpoint(self, uri: str, optimizer: bool = True) -> None:
        """Read this rank's slices of a checkpoint written at any layout (every rank reads its own); without
        ``optimizer``, the weights alone (evaluation)."""
        if not is_sharded(uri):
            raise CheckpointError(f"{uri} is a one-process checkpoint of the earlier format; resume it with "
                                  "parallel.tensor=1, pipeline=1 and shard_optimizer=false")
        reader = Reader(uri)
        _check_fits(reader, self.entries)
        if self.fsdp:
            self._load_buckets(reader, optimizer)
            return
        variables = self.module.all_variables()
        boxes = [e.box() for e in self.entries]
        for e, var, box in zip(self.entries, variables, boxes):
            if not e.frozen:  # frozen weights stay as the pretrained checkpoint gave them
                var.assign(tf.cast(reader.read(e.name, "param", box), var.dtype))
        if not optimizer:
            return
        if self.zero is not None:
            self.zero.load(lambda i, kind: reader.read(self.entries[i].name, kind, boxes[i]).ravel())
        else:
            _assign_slots(reader, self.training_model.optimizer, self.variables,
                          {id(v): e.name for v, e in zip(variables, self.entries)}, boxes)
        _assign_scalars(reader, self._state_variables())
        self.module.set_step(int(self._state_variables()["iterations"].numpy()))  # dropout continues from there

    def _load_buckets(self, reader: Reader, optimizer: bool) -> None:
        """Fill this rank's slice of every bucket (and with ``optimizer`` the optimizer's state of it) from a
        checkpoint of any layout; no collective."""
        def fill(bucket, kind) -> np.ndarray:
            out = np.zeros(bucket.flat.slice_size, np.float32)
            for i, a, b, at in bucket.flat.overlaps():
                e = self.entry[bucket.names[i]]
                if kind not in reader.kinds(e.name):
                    raise CheckpointError(f"{reader.uri} holds no optimizer state '{kind}' for {e.name}: was it "
                                          "written with another train.optimizer?")
                out[at: at + b - a] = reader.read(e.name, kind, e.box()).ravel()[a:b]
            return out

        for bucket in self.module.buckets:
            bucket.variable.assign(fill(bucket, "param"))
        if not optimizer:
            return
        kinds, slots = slots_of(self.training_model.optimizer, self.variables)
        for kind, per_var in zip(kinds, slots):
            for bucket, slot in zip(self.module.buckets, per_var):
                slot.assign(fill(bucket, kind))
        _assign_scalars(reader, self._state_variables())
        self.module.set_step(int(self._state_variables()["iterations"].numpy()))

    def distribute_restored(self) -> None:
        """Every rank read its own part: nothing to send."""

    # ---- what the run asks of every layout

    def consistency_groups(self) -> list[tuple[list, Group]]:
        """Replicated variables must be identical over the stage; slices over their replicas; tied copies over the
        first and last stage; with sharded parameters, the replicated weights' parts of the slices over the tensor
        group and tied buckets over the first and last stage."""
        if self.fsdp:
            parts = [_Parts(bucket.variable, ranges) for bucket, ranges in
                     zip(self.module.buckets, self.bucket_ranges(lambda e: e.axis is None)) if ranges]
            groups = [(parts, self.mesh.tensor_group)]
            if self.replicas.size > 1:
                groups.append((list(self.variables), self.replicas))
            if self.tied:
                groups.append(([self.variables[i] for i in self.tied], self.mesh.tie_group))
            return groups
        replicated = [v for v, e in zip(self.variables, self.entries) if e.axis is None]
        sharded = [v for v, e in zip(self.variables, self.entries) if e.axis is not None]
        groups = [(replicated, self.mesh.stage_group)]
        if sharded:
            groups.append((sharded, self.mesh.data_group))
        if self.tied:
            groups.append(([self.variables[i] for i in self.tied], self.mesh.tie_group))
        return groups

    def broadcast_callback(self):
        """None: every rank makes its variables from the same per-variable seeds."""
        return None

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds: its variables, its optimizer state (with ZeRO's float32 master slice)."""
        if self.fsdp:
            opt_vars = [v for kind in slots_of(self.training_model.optimizer, self.variables)[1] for v in kind]
            held = self.variables + list(self.module.by_name.values())
            return {"param_bytes_full": self.full_bytes, "param_bytes_per_rank": bytes_of(held),
                    "sharded_param_bytes_per_rank": bytes_of(self.variables),
                    "optimizer_bytes_per_rank": bytes_of(opt_vars)}
        if self.zero is not None:
            opt_vars = self.zero.slot_variables() + [self.zero.master]
        else:
            opt_vars = [v for kind in slots_of(self.training_model.optimizer, self.variables)[1] for v in kind]
        variables = self.module.all_variables()
        return {
            "param_bytes_full": self.full_bytes,
            "param_bytes_per_rank": bytes_of(variables),
            "sharded_param_bytes_per_rank": bytes_of([v for v, e in zip(variables, self.entries)
                                                      if e.axis is not None]),
            "optimizer_bytes_per_rank": bytes_of(opt_vars),
        }


def _reader(variable, start: int, stop: int):
    """A callable that reads ``variable[start:stop]`` (a checkpoint piece, made when it is written)."""
    return lambda: variable[start:stop]


class _Parts:
    """Parts of a variable, as the divergence guard reads a variable (``name``, ``numpy()``)."""

    def __init__(self, variable, ranges):
        self.variable, self.ranges, self.name = variable, ranges, variable.name

    def numpy(self) -> np.ndarray:
        values = self.variable.numpy()
        return np.concatenate([values[a:b] for a, b in self.ranges])


class ParallelTrainer(tf.keras.Model):
    """The Keras model that ``fit`` trains for a :class:`Parallel` layout.

    One step: forward and backward through this rank's part (the tensor-parallel collectives run inside the
    family's math; a pipeline runs its schedule), the loss vocabulary-parallel at tensor > 1, tied copies' gradients
    summed, the gradients averaged over the data-parallel group (or reduce-scattered to the optimizer slices),
    clipped by the whole model's norm, one optimizer step (skipped on every rank alike when float16 gradients
    overflow). Loss and accuracy are the replica's, weighted by positions, the same on every rank of the replica.
    """

    GROWTH_STEPS = 2000  # float16 loss scaling as Keras' LossScaleOptimizer: doubled after 2000 finite steps

    def __init__(self, layout: Parallel):
        super().__init__(name="parallel_trainer")
        self.layout, self.module = layout, layout.module
        self.module_variables = list(layout.variables)  # tracked: model.weights (early stopping) sees them
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")
        self.accuracy_tracker = tf.keras.metrics.Mean(name="accuracy")
        self.clip_norm = layout.cfg.train.clip_norm
        self.loss_scale = self.good_steps = None
        if layout.cfg.train.precision == "mixed_float16":
            self.loss_scale = tf.Variable(2.0 ** 15, trainable=False, name="loss_scale")
            self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="loss_scale_good_steps")

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def compile(self, optimizer, **kwargs):
        super().compile(optimizer=optimizer, **kwargs)
        self.layout.attach_optimizer(optimizer)

    def call(self, x, training=False):
        """This rank's output: logits (its vocabulary slice at tensor > 1) on the last stage."""
        return self.module(x, training=training)

    def terms(self, labels, logits):
        """Per position: cross-entropy and hit (vocabulary-parallel over the tensor group)."""
        from hvdtrain.distributed.tensor import TensorContext, cross_entropy

        return cross_entropy(logits, labels, TensorContext(self.layout.mesh.tensor_group, tf.float32, False))

    def _over_pipeline(self, sums):
        """The last stage's sums on every stage (the others contribute zeros), after the pipeline's transfers
        (see :meth:`hvdtrain.distributed.pipeline.Pipeline.fence`)."""
        if self.layout.pipeline is None:
            return sums
        return self.layout.mesh.pipeline_group.allreduce(sums + self.layout.pipeline.fence(), "sum", name="pp_sums")

    def metric_sums(self, x, y):
        """``[sum of cross-entropy, hits, positions]`` of a batch, forward only, on every rank of the replica."""
        if self.layout.pipeline is not None:
            return self._over_pipeline(self.layout.pipeline.forward_sums(x, y, self.terms))
        ce, hit = self.terms(y, self.module(x, training=False))
        return tf.stack([tf.reduce_sum(ce), tf.reduce_sum(hit), tf.cast(tf.size(ce), tf.float32)])

    def _track(self, sums):
        self.loss_tracker.update_state(sums[0] / sums[2], sample_weight=sums[2])
        self.accuracy_tracker.update_state(sums[1] / sums[2], sample_weight=sums[2])
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        x, y = data
        variables = self.layout.variables
        if self.layout.pipeline is not None:
            sums, grads = self.layout.pipeline.train(x, y, self.terms, variables, self.loss_scale)
            sums = self._over_pipeline(sums)
            # the gradients' collectives after the pipeline's, on every rank (a data dependency: see fence())
            after = tf.minimum(tf.abs(sums[0]), 0.0)
            grads = [g + tf.cast(after, g.dtype) for g in grads]
        else:
            with tf.GradientTape() as tape:
                first = self.layout.mesh.data_rank * tf.shape(x)[0]  # this replica's first example (dropout)
                ce, hit = self.terms(y, self.module(x, training=True, offset=first))
                loss = tf.reduce_mean(ce)
                if self.loss_scale is not None:
                    loss = loss * self.loss_scale
            grads = tape.gradient(loss, variables)
            sums = tf.stack([tf.reduce_sum(ce), tf.reduce_sum(hit), tf.cast(tf.size(ce), tf.float32)])
        self._apply(grads)
        return self._track(sums)

    def test_step(self, data):
        x, y = data
        return self._track(self.metric_sums(x, y))

    # ---- one optimizer step from this rank's gradients

    def _apply(self, grads) -> None:
        layout = self.layout
        mesh = layout.mesh
        # dense: an embedding's gradient comes as IndexedSlices, whose rows repeat for repeated tokens (squaring
        # them row by row would count a token's rows apart in the norm)
        grads = [tf.zeros_like(v, tf.float32) if g is None else tf.cast(tf.convert_to_tensor(g), tf.float32)
                 for g, v in zip(grads, layout.variables)]
        if layout.fsdp and layout.replicas.size > 1:  # hybrid sharding: each slice's gradient averaged over replicas
            grads = layout.replicas.grouped_allreduce(grads, "average", name="replicate_gradients")
        if layout.tied:  # the two copies of a tied weight take the sum of both stages' gradients
            summed = mesh.tie_group.grouped_allreduce([grads[i] for i in layout.tied], "sum", name="tied_gradients")
            for i, g in zip(layout.tied, summed):
                grads[i] = g
        partial = self.module.partial
        if partial and layout.fsdp:
            grads = self._sum_partial_slices(grads)
        elif partial:  # sequence parallelism: each member's gradient of these weights covers its positions only
            summed = mesh.tensor_group.grouped_allreduce([grads[i] for i in partial], "sum",
                                                         name="sequence_gradients")
            for i, g in zip(partial, summed):
                grads[i] = g
        if self.loss_scale is None:
            self._step(grads)
            return
        grads = [g / self.loss_scale for g in grads]
        local = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads]) if grads else tf.constant(True)
        # every rank takes the same decision: finite only if every rank's gradients are
        finite = distributed.allreduce_tensor(tf.cast(local, tf.float32), "min", name="loss_scale_finite") > 0.5

        def apply():
            self._step(grads)
            grown = self.good_steps + 1 >= self.GROWTH_STEPS
            self.loss_scale.assign(tf.where(grown, self.loss_scale * 2.0, self.loss_scale))
            self.good_steps.assign(tf.where(grown, tf.constant(0, tf.int64), self.good_steps + 1))
            return tf.constant(True)

        def skip():
            self.loss_scale.assign(tf.maximum(self.loss_scale / 2.0, 1.0))
            self.good_steps.assign(0)
            return tf.constant(False)

        tf.cond(finite, apply, skip)

    def _sum_partial_slices(self, grads):
        """With sharded parameters: the partial weights' parts of each slice's gradient summed over the tensor
        group (every member's slices have the same geometry)."""
        names = {self.layout.entries[i].name for i in self.module.partial}
        ranges = self.layout.bucket_ranges(lambda e: e.name in names)
        pieces = [grads[j][a:b] for j, rs in enumerate(ranges) for a, b in rs]
        if not pieces:
            return grads
        summed = iter(self.layout.mesh.tensor_group.grouped_allreduce(pieces, "sum", name="sequence_gradients"))
        out = []
        for g, rs in zip(grads, ranges):
            parts, at = [], 0
            for a, b in rs:
                parts += [g[at:a], next(summed)]
                at = b
            out.append(tf.concat(parts + [g[at:]], 0) if rs else g)
        return out

    def _clip_factor(self, sum_of_squares, group: Group | None):
        """``clip / max(norm, clip)`` from this rank's share of the squared norm (as ``tf.clip_by_global_norm``)."""
        total = distributed.allreduce_tensor(sum_of_squares, "sum", name="clip_norm") if group is None else \
            group.allreduce(sum_of_squares, "sum", name="clip_norm")
        norm = tf.sqrt(total)
        return self.clip_norm / tf.maximum(norm, self.clip_norm)

    def _step(self, grads) -> None:
        layout = self.layout
        if layout.fsdp:  # each slice's gradient is already the average over the data group
            if self.clip_norm > 0:  # the slices of every rank cover the model once (counted parts only) per replica
                squares = [tf.reduce_sum(tf.square(g[a:b])) for g, rs in
                           zip(grads, layout.bucket_ranges(lambda e: e.counted)) for a, b in rs]
                mine = (tf.add_n(squares) if squares else tf.constant(0.0)) / layout.replicas.size
                factor = self._clip_factor(mine, None)
                grads = [g * factor for g in grads]
            self.optimizer.apply_gradients(zip(grads, layout.variables))
            return
        if layout.zero is not None:
            mine = layout.zero.reduce(grads)
            if self.clip_norm > 0:  # the slices of every replica's every rank cover the model once
                mine = mine * self._clip_factor(layout.zero.sum_of_squares(mine), None)
            layout.zero.step(mine)
            return
        grads = layout.mesh.data_group.grouped_allreduce(grads, "average")
        if self.clip_norm > 0:  # every replica holds the same averaged gradients: the replica's norm is the norm
            counted = [tf.reduce_sum(tf.square(g)) for g, e in zip(grads, layout.entries) if e.counted]
            squares = tf.add_n(counted) if counted else tf.constant(0.0)
            factor = self._clip_factor(squares, layout.mesh.replica_group)
            grads = [g * factor for g in grads]
        self.optimizer.apply_gradients(zip(grads, layout.variables))
