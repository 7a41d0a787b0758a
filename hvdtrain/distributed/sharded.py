"""A rank's part of a model, made one variable at a time: what tensor and pipeline layouts train.

:class:`ShardedModule` reads a family's plan (:mod:`models.plan`): for each weight of this rank's pipeline stage it
draws the weight's initial value from its own seed (the one-process model's value), keeps this rank's slice of the
tensor-parallel split and drops the rest, so the transient is one variable, never the model; or it is given each
slice (``initial``: a pretrained checkpoint's, read from its files by this rank alone). Its forward pass runs the
plan's unit functions on those slices with a :class:`~hvdtrain.distributed.tensor.TensorContext`. Weights the plan
freezes (LoRA's base) are kept in the compute dtype and outside the optimizer.

:class:`KerasModule` wraps a whole Keras model (any family) for layouts that split only the optimizer state.

Both describe each variable with an :class:`Entry`: its one-process name, global shape, and which slice this rank
holds, which is what checkpoints record (:mod:`hvdtrain.formats.checkpoint`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from hvdtrain.distributed import fsdp
from hvdtrain.distributed.fsdp import Bucket, Flat
from hvdtrain.distributed.mesh import Group
from hvdtrain.distributed.tensor import (SequenceContext, TensorContext, gather_to_replicated, scatter_to_sequence,
                                         split)


@dataclass(frozen=True)
class Entry:
    """A variable this rank holds and what it is of the one-process model's variable ``name``."""

    name: str
    shape: tuple[int, ...]  # the global shape
    axis: int | None  # the axis split across the tensor group (None: held whole)
    part: int  # this rank's slice along ``axis``
    parts: int  # slices along ``axis``
    trainable: bool = True
    # whether this rank's copy counts once among the copies of the model (in a norm, in a checkpoint): the
    # tensor group's first member for a replicated variable, every member for its own slice, and never a tied copy
    # of a weight that another pipeline stage owns
    counted: bool = True
    frozen: bool = False  # never trained, read from the checkpoint the run started from: not in its checkpoints

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.axis is None:
            return self.shape
        shape = list(self.shape)
        shape[self.axis] //= self.parts
        return tuple(shape)

    def box(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(start, size)`` of this rank's slice in the global variable."""
        start = [0] * len(self.shape)
        if self.axis is not None:
            start[self.axis] = self.part * self.local_shape[self.axis]
        return tuple(start), self.local_shape


class ShardedModule(tf.Module):
    """This rank's units of a plan, its slices of their weights, and their forward pass.

    Args:
        plan: the family's :class:`models.plan.Plan`.
        units: the units this rank's pipeline stage holds, in order.
        group: the tensor-parallel group.
        seed: the run's seed (each weight starts from its own seed derived from it).
        recompute: recompute each recomputable unit's activations in the backward pass.
        dtype: the compute dtype (``float32``, ``bfloat16``, ``float16``).
        param_dtype: the dtype the trained variables are kept in (``float32``; the compute dtype when a sharded
            optimizer keeps the float32 master weights); frozen ones are kept in the compute dtype.
        sequence: sequence parallelism (:mod:`hvdtrain.distributed.tensor`): the units that may sit on any stage
            run on this member's ``1/size`` of the positions, the pinned ones (the first and the last: the
            embedding, the head) on all of them; what flows between stages is split by position too.
        initial: ``initial(weight, box)``: the box ``(start, size)`` of a weight's initial value (a pretrained
            checkpoint's), or None for the weight's own initializer.
    """

    def __init__(self, plan, units, group: Group, seed: int, recompute: bool = False, dtype="float32",
                 param_dtype=tf.float32, sequence: bool = False, initial=None, shard: Group | None = None,
                 prefetch: bool = True, buckets_per_unit: int = 0):
        super().__init__(name="stage")
        from models.plan import initial_value

        self.plan, self.units, self.group = plan, list(units), group
        self.recompute, self.dtype = recompute, tf.as_dtype(dtype)
        self.shard, self.prefetch = shard, prefetch
        parts, part = group.size, (group.rank if group.size > 1 else 0)
        own = {w.name for u in self.units for w in u.weights}
        tied = {n for u in plan.units for n in u.shared}
        wanted = [(w, True, w.name if w.name in tied else u.name) for u in self.units for w in u.weights]
        wanted += [(plan.weight(n), False, n) for u in self.units for n in u.shared if n not in own]
        entries: list[Entry] = []
        for weight, owner, _ in wanted:
            sliced = weight.split is not None and parts > 1
            entries.append(Entry(weight.name, weight.shape, weight.split if sliced else None, part if sliced else 0,
                                 parts if sliced else 1, trainable=weight.trainable,
                                 counted=owner and (sliced or part == 0), frozen=not weight.trainable))
        # with ``shard`` (parameters sharded over the data group) the trained weights live in buckets, one per unit
        # and one per tied weight, each rank holding a float32 slice of each (hvdtrain.distributed.fsdp)
        self.buckets: list[Bucket] = []
        slices: dict[str, np.ndarray] = {}
        if shard is not None:
            keys: dict[str, list[Entry]] = {}
            for (weight, _, key), entry in zip(wanted, entries):
                if weight.trainable:
                    keys.setdefault(key, []).append(entry)
            keys = {k: part for key, members in keys.items()
                    for k, part in fsdp.cut(key, members, lambda e: int(np.prod(e.local_shape)), buckets_per_unit)}
            for key, members in keys.items():
                flat = Flat(tuple(int(np.prod(e.local_shape)) for e in members), shard.size,
                            shard.rank if shard.size > 1 else 0)
                self.buckets.append(Bucket(key, [e.name for e in members], [e.local_shape for e in members], flat))
                slices[key] = np.zeros(flat.slice_size, np.float32)
        self.bucket_of = {n: b for b in self.buckets for n in b.names}
        self.by_name: dict[str, tf.Variable] = {}
        for (weight, _, _), entry in zip(wanted, entries):
            value = initial(weight, entry.box()) if initial is not None else None
            if value is None:
                value = split(initial_value(weight, seed), parts, part, weight.split)  # one variable's transient
            bucket = self.bucket_of.get(weight.name)
            if bucket is not None:  # only this rank's slice of it is kept
                index = bucket.names.index(weight.name)
                values = np.asarray(value, np.float32).ravel()
                for i, a, b, at in bucket.flat.overlaps():
                    if i == index:
                        slices[bucket.key][at: at + b - a] = values[a:b]
                del values
            else:
                dtype_kept = param_dtype if weight.trainable else self.dtype
                self.by_name[weight.name] = tf.Variable(tf.cast(value, dtype_kept), name=weight.name,
                                                        trainable=weight.trainable)
            del value
        for bucket in self.buckets:
            bucket.variable = tf.Variable(slices.pop(bucket.key), name=f"shard/{bucket.key}")
        # the trained variables first (the optimizer's and the gradients' order), then the frozen ones
        self.entries = [e for e in entries if e.trainable] + [e for e in entries if not e.trainable]
        if shard is not None:
            self.trainable = [b.variable for b in self.buckets]
        else:
            self.trainable = [self.by_name[e.name] for e in self.entries if e.trainable]
        self.sequence = sequence and parts > 1
        # a trained weight whose gradient covers a part of the computation only, summed over the group by the
        # trainer: with sequence parallelism a replicated weight of a unit that runs on split positions (each
        # member's gradient covers its positions), and a weight the plan marks (a replicated factor beside a split
        # kernel covers the member's slice); indices in ``entries``
        replicated = {w.name for u in self.units if u.pin is None for w in u.weights if w.split is None}
        marked = {w.name for u in self.units for w in u.weights if w.partial_gradient}
        partial = (replicated if self.sequence else set()) | (marked if parts > 1 else set())
        self.partial = [i for i, e in enumerate(self.entries) if e.trainable and e.name in partial]
        with tf.init_scope():
            self.draws = tf.Variable(0, dtype=tf.int64, trainable=False, name="dropout_draws")
        self.seed = seed

    @property
    def input_is_tokens(self) -> bool:
        return self.units[0].pin == "first"

    def next_step(self):
        """The dropout step of a training step (call once per step, outside any recomputed region)."""
        return self.draws.assign_add(1) - 1

    def set_step(self, step: int) -> None:
        """Continue the dropout steps from ``step`` (a resume)."""
        self.draws.assign(step)

    def __call__(self, x, training: bool = False, offset=0, step=None):
        """The units' forward pass; ``offset``: the index of ``x``'s first example in the step's global batch,
        ``step``: the step's :meth:`next_step` (drawn here when None), both for the dropout masks."""
        from models.plan import DropoutKey

        key = None
        if training:
            key = DropoutKey(self.seed, self.next_step() if step is None else step, offset)
        whole = TensorContext(self.group, self.dtype, training, key)
        split_positions = SequenceContext(self.group, self.dtype, training, key) if self.sequence else None
        if not self.input_is_tokens:
            x = tf.cast(x, self.dtype)
        by_position = self.sequence and not self.input_is_tokens  # a later stage's input is split by position
        previous = None  # the input of the unit before: a unit's gather starts when the one before it starts
        scattered = []  # the gradients' reduce-scatters, as the backward pass makes them
        for unit in self.units:
            names = [w.name for w in unit.weights] + list(unit.shared)
            ctx = whole if split_positions is None or unit.pin is not None else split_positions
            if by_position and ctx is whole:
                x, by_position = gather_to_replicated(x, self.group), False
            recomputed = self.recompute and unit.recompute and training
            after = previous if self.prefetch else x
            kept = None if recomputed else self._params(names, after, scattered)
            calls = []

            def forward(h, unit=unit, ctx=ctx, names=names, kept=kept, after=after, calls=calls,
                        scattered=scattered):
                # recomputed: the forward pass's gather starts with the unit before; the backward pass's once this
                # unit's input is there again, which TensorFlow makes wait for the unit's output gradient (else
                # every unit's weights would be gathered at once when the backward pass starts)
                if kept is not None:
                    params = kept
                else:
                    params = self._params(names, after if not calls else h, scattered)
                    calls.append(1)
                return self.plan.apply(unit, params, h, ctx)

            previous = x
            x = tf.recompute_grad(forward)(x) if recomputed else forward(x)
            if self.buckets and training:
                x = fsdp.paced(x, scattered)
            if split_positions is not None and unit.pin == "first":
                x, by_position = scatter_to_sequence(x, self.group), True
        return x

    def _params(self, names, after=None, scattered=None) -> dict:
        """The weights ``names`` (a unit's): the variables, or with sharded parameters their buckets gathered once
        ``after`` exists, their gradients' reduce-scatters appended to ``scattered`` (see ``fsdp``)."""
        if not self.buckets:
            return {n: self.by_name[n] for n in names}
        out = {n: self.by_name[n] for n in names if n in self.by_name}  # frozen weights are kept whole
        for bucket in dict.fromkeys(self.bucket_of[n] for n in names if n not in out):
            with tf.control_dependencies([after] if after is not None else []):
                full = fsdp.gather(bucket.variable, self.shard, bucket.flat, self.dtype, scattered)
            out.update(bucket.split(full))
        return {n: out[n] for n in names}

    def all_variables(self) -> list[tf.Variable]:
        """Every variable, aligned with :attr:`entries` (a checkpoint holds those not frozen)."""
        return [self.by_name[e.name] for e in self.entries]


class KerasModule:
    """A whole Keras model as a rank's part (layouts that split only the optimizer state); variables are named
    by their place in the model, ``NNNN/name``, which is stable for a given builder and its parameters."""

    partial: list[int] = []  # no variable's gradient is partial (no sequence parallelism)

    def __init__(self, model):
        self.model = model
        self.trainable = list(model.trainable_variables)
        index = {id(v): i for i, v in enumerate(model.variables)}
        self._all = list(model.trainable_variables) + list(model.non_trainable_variables)
        self.entries = [Entry(keras_name(index[id(v)], v), tuple(v.shape), None, 0, 1, trainable=v.trainable)
                        for v in self._all]
        self.dtype = tf.as_dtype(model.compute_dtype)

    def __call__(self, x, training: bool = False, offset=0, step=None):
        return self.model(x, training=training)  # the model's own layers draw their dropout

    def next_step(self):
        return None

    def set_step(self, step: int) -> None:
        from models.plan import set_clocks

        set_clocks(self.model, step)

    def all_variables(self) -> list[tf.Variable]:
        return list(self._all)


def keras_name(position: int, variable) -> str:
    """The checkpoint name of a Keras model's variable that no plan names: its position and its name."""
    return f"{position:04d}/{variable.name.split(':')[0]}"


def bytes_of(variables) -> int:
    """Bytes held by ``variables``."""
    return int(sum(int(np.prod(v.shape)) * v.dtype.size for v in variables))
