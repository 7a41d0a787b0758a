"""The rank grid of a 3D-parallel job: data x tensor x pipeline, as Horovod process sets.

Ranks are laid out with the tensor-parallel dimension innermost, then data, then pipeline (Megatron-LM's and
torchtitan's order): ``rank = (stage * data + replica) * tensor + shard``. A tensor-parallel group, which
communicates on every layer, is a run of consecutive ranks and so sits on one host when hosts hold whole groups.
For 8 ranks at tensor=2, pipeline=2 (data=2)::

    stage 0:  replica 0 -> ranks 0 1    replica 1 -> ranks 2 3
    stage 1:  replica 0 -> ranks 4 5    replica 1 -> ranks 6 7

    tensor groups {0,1} {2,3} {4,5} {6,7}; data groups {0,2} {1,3} {4,6} {5,7}; pipelines {0,4} {1,5} {2,6} {3,7};
    replicas (every rank of one copy of the model) {0,1,4,5} {2,3,6,7}

Hybrid sharding (``shard`` ranks per shard group, fewer than data): a data group's consecutive runs of ``shard``
members shard the parameters among themselves ("shard" groups) and the members at the same place in each run
replicate each other ("replicate" groups). At data=4, shard=2 (tensor=pipeline=1): shard groups {0,1} {2,3},
replicate groups {0,2} {1,3}.

Every rank registers every group's process set, in the same order (Horovod requires it); a group of one rank has
no process set and its collectives are the identity; the group of all ranks is Horovod's global set.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hvdtrain.distributed import core
from hvdtrain.errors import ConfigError


def _hvd():
    core._hvd()
    import horovod.tensorflow as hvd_tf

    return hvd_tf


_OPS = {"sum": "Sum", "average": "Average", "max": "Max", "min": "Min"}


def _carried(tensor, reduce: bool):
    """Horovod 0.28 has no bfloat16 in any collective: data movement carries its bits as uint16 (exact, half the
    bytes of float32), reductions run in float32. Returns ``(tensor to send, function to undo it)``."""
    import tensorflow as tf

    if tensor.dtype != tf.bfloat16:
        return tensor, lambda t: t
    if reduce:
        return tf.cast(tensor, tf.float32), lambda t: tf.cast(t, tf.bfloat16)
    return tf.bitcast(tensor, tf.uint16), lambda t: tf.bitcast(t, tf.bfloat16)


class Traffic:
    """Calls and bytes of the tensor collectives each kind of group ran (counted inside the graph, per process)."""

    counters: dict[str, tuple] = {}

    KINDS = ("allreduce", "allgather", "reducescatter", "alltoall")

    @classmethod
    def create(cls, group: str) -> None:
        """The counters of ``group``'s collectives, made when the group is (eagerly): a variable first made while a
        train function is traced makes TensorFlow trace it again."""
        import tensorflow as tf

        for kind in (f"{group}_{k}" for k in cls.KINDS):
            if kind not in cls.counters:
                with tf.init_scope():
                    cls.counters[kind] = (tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{kind}_calls"),
                                          tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{kind}_bytes"))

    @classmethod
    def count(cls, kind: str, tensors) -> None:
        import tensorflow as tf

        calls, nbytes = cls.counters[kind]
        calls.assign_add(1)
        nbytes.assign_add(tf.add_n([tf.cast(tf.size(t), tf.int64) * t.dtype.size for t in tensors]))

    @classmethod
    def snapshot(cls) -> dict[str, dict[str, int]]:
        """``{kind: {"calls": n, "bytes": b}}`` so far (the kinds that ran)."""
        return {k: {"calls": int(c.numpy()), "bytes": int(b.numpy())} for k, (c, b) in cls.counters.items()
                if int(c.numpy())}


@dataclass(frozen=True)
class Group:
    """A set of ranks that communicate together, and the collectives on it (TensorFlow ops, usable in graphs)."""

    name: str
    ranks: tuple[int, ...]
    process_set: Any = field(default=None, compare=False, repr=False)  # None for a group of one

    def __post_init__(self):
        if len(self.ranks) > 1:
            Traffic.create(self.name)

    @property
    def size(self) -> int:
        """Ranks in the group."""
        return len(self.ranks)

    @property
    def rank(self) -> int:
        """This process's index in the group."""
        return self.ranks.index(core.rank())

    @property
    def root(self) -> int:
        """The global rank of the group's first member."""
        return self.ranks[0]

    def _kw(self, name: str | None = None) -> dict[str, Any]:
        return {"process_set": self.process_set, **({"name": name} if name else {})}

    def allreduce(self, tensor, op: str = "sum", name: str | None = None):
        """Reduce ``tensor`` over the group (``sum``, ``average``, ``max``, ``min``)."""
        if self.size == 1:
            return tensor
        hvd = _hvd()
        Traffic.count(f"{self.name}_allreduce", [tensor])
        sent, back = _carried(tensor, reduce=True)
        return back(hvd.allreduce(sent, op=getattr(hvd, _OPS[op]), **self._kw(name)))

    def grouped_allreduce(self, tensors, op: str = "average", name: str | None = None):
        """Reduce a list of tensors over the group in one fused call.

        ``name``: required when the members run different graphs (pipeline stages): in a graph Horovod matches a
        collective by its name, which otherwise comes from the op's place in each member's own graph.
        """
        if self.size == 1 or not tensors:
            return list(tensors)
        hvd = _hvd()
        Traffic.count(f"{self.name}_allreduce", tensors)
        sent, backs = zip(*[_carried(t, reduce=True) for t in tensors])
        out = hvd.grouped_allreduce(list(sent), op=getattr(hvd, _OPS[op]), process_set=self.process_set,
                                    **({"name": name} if name else {}))
        return [back(t) for back, t in zip(backs, out)]

    def allgather(self, tensor, name: str | None = None):
        """Concatenate every member's ``tensor`` along the first axis, in group order."""
        if self.size == 1:
            return tensor
        Traffic.count(f"{self.name}_allgather", [tensor])
        sent, back = _carried(tensor, reduce=False)
        return back(_hvd().allgather(sent, **self._kw(name)))

    def reducescatter(self, tensor, op: str = "average", name: str | None = None):
        """Reduce ``tensor`` over the group and keep this member's 1/size of the first axis."""
        if self.size == 1:
            return tensor
        hvd = _hvd()
        Traffic.count(f"{self.name}_reducescatter", [tensor])
        sent, back = _carried(tensor, reduce=True)
        return back(hvd.reducescatter(sent, op=getattr(hvd, _OPS[op]), **self._kw(name)))

    def alltoall(self, tensor, splits, name: str | None = None):
        """Send ``splits[i]`` rows of ``tensor`` to member i; returns what the members sent here."""
        Traffic.count(f"{self.name}_alltoall", [tensor])
        sent, back = _carried(tensor, reduce=False)
        got, received = _hvd().alltoall(sent, splits=splits, **self._kw(name))
        return back(got), received

    def broadcast_object(self, obj: Any, root: int | None = None) -> Any:
        """A picklable object from the global rank ``root`` (default: the group's first) to every member."""
        if self.size == 1:
            return obj
        return _hvd().broadcast_object(obj, root_rank=self.root if root is None else root,
                                       process_set=self.process_set)

    def allgather_object(self, obj: Any) -> list[Any]:
        """Every member's object, in group order."""
        if self.size == 1:
            return [obj]
        return _hvd().allgather_object(obj, process_set=self.process_set)

    def broadcast_variables(self, variables, root: int | None = None) -> None:
        """Overwrite ``variables`` with their values on the global rank ``root`` (default: the first member)."""
        if self.size > 1 and variables:
            _hvd().broadcast_variables(variables, root_rank=self.root if root is None else root,
                                       process_set=self.process_set)

    def extremes(self, values) -> tuple[np.ndarray, np.ndarray]:
        """``(min, max)`` over the group of each entry of ``values`` (one collective)."""
        import tensorflow as tf

        values = np.asarray(values, dtype=np.float64)
        if self.size == 1:
            return values, values
        both = self.allreduce(tf.constant(np.concatenate([values, -values])), op="max",
                              name=f"hvdtrain_extremes_{self.name}").numpy()
        n = len(values)
        return -both[n:], both[:n]


@dataclass(frozen=True)
class Mesh:
    """This rank's place in the data x tensor x pipeline grid, and its groups."""

    world: int
    data: int
    tensor: int
    pipeline: int
    rank: int
    tensor_group: Group  # the ranks holding the other shards of this rank's layers
    data_group: Group  # the replicas of this rank's shard (gradients are averaged over it)
    stage_group: Group  # every rank of this rank's pipeline stage (its replicated weights are identical)
    pipeline_group: Group  # the stages of this rank's pipeline (same replica and shard)
    replica_group: Group  # every rank of this rank's copy of the model (tensor x pipeline)
    shard_group: Group  # the data ranks sharded parameters are split over (the data group unless hybrid)
    replicate_group: Group  # the ranks holding the same slices (one rank unless hybrid sharding)
    prev_edge: Group | None  # [previous stage, this stage] for transfers
    next_edge: Group | None  # [this stage, next stage]
    tie_group: Group | None  # [first stage, last stage] of this pipeline, on those two stages (tied weights)

    @property
    def tensor_rank(self) -> int:
        """This rank's shard index within its tensor group."""
        return self.rank % self.tensor

    @property
    def data_rank(self) -> int:
        """This rank's replica index (its data shard)."""
        return (self.rank // self.tensor) % self.data

    @property
    def stage(self) -> int:
        """This rank's pipeline stage."""
        return self.rank // (self.tensor * self.data)

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pipeline - 1

    def describe(self) -> str:
        """One line for the log."""
        return (f"{self.world} rank(s) = data {self.data} x tensor {self.tensor} x pipeline {self.pipeline} "
                "(tensor groups are consecutive ranks)")


def rank_of(stage: int, replica: int, shard: int, data: int, tensor: int) -> int:
    """The global rank at a grid position."""
    return (stage * data + replica) * tensor + shard


def layout(world: int, tensor: int, pipeline: int) -> int:
    """The data-parallel degree of a layout; a layout that does not fit the world is a config error."""
    if tensor < 1 or pipeline < 1:
        raise ConfigError("parallel.tensor and parallel.pipeline must be at least 1")
    if world % (tensor * pipeline):
        raise ConfigError(f"{world} rank(s) cannot be laid out as tensor={tensor} x pipeline={pipeline}: "
                          f"the world size must be a multiple of {tensor * pipeline}; launch with -np "
                          f"{tensor * pipeline * max(1, world // (tensor * pipeline))} or change "
                          "parallel.tensor/pipeline")
    return world // (tensor * pipeline)


def shard_degree(data: int, shard: int) -> int:
    """The ranks sharded parameters are split over: ``shard`` (0: all ``data``), which must divide ``data``."""
    if shard and data % shard:
        raise ConfigError(f"parallel.shard_degree={shard} must divide the data-parallel degree {data}: use one of "
                          f"{', '.join(str(d) for d in range(1, data + 1) if data % d == 0)}")
    return shard or data


def all_groups(world: int, tensor: int, pipeline: int, shard: int = 0) -> dict[str, list[tuple[int, ...]]]:
    """Every group of the grid by kind, in the order every rank registers them."""
    data = layout(world, tensor, pipeline)
    shard = shard_degree(data, shard)
    at = lambda s, d, t: rank_of(s, d, t, data, tensor)  # noqa: E731
    groups: dict[str, list[tuple[int, ...]]] = {
        "tensor": [tuple(at(s, d, t) for t in range(tensor)) for s in range(pipeline) for d in range(data)],
        "data": [tuple(at(s, d, t) for d in range(data)) for s in range(pipeline) for t in range(tensor)],
        "stage": [tuple(at(s, d, t) for d in range(data) for t in range(tensor)) for s in range(pipeline)],
        "pipeline": [tuple(at(s, d, t) for s in range(pipeline)) for d in range(data) for t in range(tensor)],
        "replica": [tuple(at(s, d, t) for s in range(pipeline) for t in range(tensor)) for d in range(data)],
        "edge": [(at(s, d, t), at(s + 1, d, t)) for s in range(pipeline - 1) for d in range(data)
                 for t in range(tensor)],
        "tie": [(at(0, d, t), at(pipeline - 1, d, t)) for d in range(data) for t in range(tensor)] if pipeline > 1
        else [],
        "shard": [tuple(at(s, d, t) for d in range(k, k + shard)) for s in range(pipeline) for t in range(tensor)
                  for k in range(0, data, shard)],
        "replicate": [tuple(at(s, d, t) for d in range(j, data, shard)) for s in range(pipeline)
                      for t in range(tensor) for j in range(shard)],
    }
    return groups


_SETS: dict[tuple[int, ...], Any] = {}  # the process sets this process registered, by their ranks


def make_mesh(tensor: int = 1, pipeline: int = 1, shard: int = 0) -> Mesh:
    """The mesh of this job (call on every rank, after :func:`hvdtrain.distributed.init`).

    Registers a Horovod process set for every group of two or more ranks that is not the whole world (this needs
    ``init(dynamic_process_sets=True)`` whenever such a group exists); a set registered by an earlier mesh of this
    process is used again (Horovod refuses the same ranks twice).
    """
    world, me = core.size(), core.rank()
    groups = all_groups(world, tensor, pipeline, shard)
    sets = _SETS
    needed = [g for kind in groups.values() for g in kind if 1 < len(g) < world]
    if needed:
        hvd = _hvd()
        for ranks in needed:
            key = tuple(sorted(ranks))
            if key not in sets:
                sets[key] = hvd.add_process_set(list(key))

    def group(name: str, ranks: tuple[int, ...]) -> Group:
        if len(ranks) == 1:
            return Group(name, ranks, None)
        if len(ranks) == world:
            return Group(name, ranks, _hvd().global_process_set)
        return Group(name, ranks, sets[tuple(sorted(ranks))])

    def mine(kind: str) -> tuple[int, ...]:
        return next(g for g in groups[kind] if me in g)

    data = world // (tensor * pipeline)
    edges = {g[0]: g for g in groups["edge"]}
    prev = next((g for g in groups["edge"] if g[1] == me), None)
    tie = next((g for g in groups["tie"] if me in g), None)
    return Mesh(
        world=world, data=data, tensor=tensor, pipeline=pipeline, rank=me,
        tensor_group=group("tensor", mine("tensor")), data_group=group("data", mine("data")),
        stage_group=group("stage", mine("stage")), pipeline_group=group("pipeline", mine("pipeline")),
        replica_group=group("replica", mine("replica")),
        shard_group=group("shard", mine("shard")) if len(mine("shard")) < data else group("data", mine("data")),
        replicate_group=group("replicate", mine("replicate")),
        prev_edge=group("edge", prev) if prev else None,
        next_edge=group("edge", edges[me]) if me in edges else None,
        tie_group=group("tie", tie) if tie else None,
    )
