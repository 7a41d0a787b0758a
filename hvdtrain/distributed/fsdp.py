"""Parameters sharded over the data-parallel group: ZeRO stage 3 (Rajbhandari et al., 2020), PyTorch's FSDP.

The trained weights of a rank's part (its tensor-parallel slices of its pipeline stage's weights) are grouped
into buckets, one per unit (a Transformer block, the embedding, the head), and a weight tied across units (the
embedding and the logits) in a bucket of its own. A bucket is one flat vector, padded to a multiple of the data
group's size and cut into equal slices (ZeRO-1's geometry, :class:`Flat`); each data-parallel rank keeps only its
slice, in float32: the master weights, the only copy. The optimizer steps the slices, so its state is sharded too.

In a step a unit's weights exist whole only while it computes: :func:`gather` all-gathers the bucket in the
compute dtype before the unit runs, and its gradient reduce-scatters the bucket's gradient (averaged over the
group, in float32) back onto the slice. TensorFlow's autodiff keeps what a unit's backward pass needs, the gathered
weights among it; with ``parallel.recompute`` the gather sits inside the recomputed region and is done again in the
backward pass, so that at most two units' weights are whole at any moment (the unit computing and the next one,
whose gather is started when the current unit starts: :class:`~hvdtrain.distributed.sharded.ShardedModule`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf


@dataclass(frozen=True)
class Flat:
    """Variables of ``sizes`` elements seen as one vector, padded and cut into ``parts`` equal slices; ``part``'s
    is ``[start, start + slice_size)``."""

    sizes: tuple[int, ...]
    parts: int
    part: int

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)

    @property
    def total(self) -> int:
        return int(sum(self.sizes))

    @property
    def slice_size(self) -> int:
        return -(-self.total // self.parts)

    @property
    def padded(self) -> int:
        return self.slice_size * self.parts

    @property
    def start(self) -> int:
        return self.part * self.slice_size

    def overlaps(self) -> list[tuple[int, int, int, int]]:
        """``(variable index, start, stop within the variable's flat values, start within the slice)`` of every
        variable this slice covers."""
        end, offsets, out = self.start + self.slice_size, self.offsets, []
        for i, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
            a, b = max(lo, self.start), min(hi, end)
            if a < b:
                out.append((i, int(a - lo), int(b - lo), int(a - self.start)))
        return out


# ``parallel.buckets_per_unit: 0`` (the default): a unit is cut into buckets of at most this many float32 MB. A
# bucket's gradient is reduce-scattered while the rest of its unit's backward pass runs, so smaller buckets hold less
# at once; each costs a gather and a reduce-scatter of its own. Measured (docs/performance.md, interleaved, data=2
# sharded): a Transformer block of width 768 (27 MB) in two buckets ran at the same tokens/s as in one (Gloo 1.02x,
# MPI 1.00x), and at data=4 a 16-block model's ranks grew 19.2-19.6 bytes per parameter of their quarter from width 64
# to 768 with two buckets per unit against 19.8-20.2 with one (Gloo); a block of width 512 (12 MB) in two lost 7%
# under Gloo (0.93x): it stays one bucket.
BUCKET_MB = 16


def buckets_for(sizes: list[int], buckets_per_unit: int) -> int:
    """How many buckets a unit of weights of ``sizes`` elements is cut into: ``buckets_per_unit``, or with 0 as
    many as keep each within :data:`BUCKET_MB` of float32."""
    if buckets_per_unit:
        return buckets_per_unit
    return max(1, -(-4 * sum(sizes) // (BUCKET_MB * 2**20)))


def cut(key: str, members: list, size, parts: int) -> list[tuple[str, list]]:
    """``members`` (a unit's weights, in order) as up to ``parts`` consecutive groups of near-equal ``size``, each
    ``(key, its members)``: a cut goes at the weight boundary nearest to each multiple of ``total / parts`` (a unit
    of one weight stays whole); one group keeps ``key``, several are ``key/0``, ``key/1``, ... ``parts`` 0: by
    size (:func:`buckets_for`)."""
    sizes = [size(m) for m in members]
    parts = buckets_for(sizes, parts)
    if parts == 1 or len(members) == 1:
        return [(key, members)]
    before = np.cumsum(sizes)[:-1]  # the size before each weight but the first: where a cut can go
    cuts = sorted({int(np.argmin(np.abs(before - sum(sizes) * k / parts))) + 1 for k in range(1, parts)})
    return [(f"{key}/{i}", members[a:b]) for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(members)]))]


def gather(variable, group, flat: Flat, dtype, scattered: list | None = None):
    """The whole bucket (``flat.total`` values in ``dtype``) from every member's slice ``variable``; its gradient
    is the bucket's gradient averaged over ``group`` (in float32), this member's slice of it (appended to
    ``scattered`` when given, in the order the backward pass makes them: see :func:`paced`)."""

    @tf.custom_gradient
    def whole(mine):
        full = group.allgather(tf.cast(mine, dtype))
        if flat.padded != flat.total:
            full = full[: flat.total]

        def grad(upstream):
            upstream = tf.cast(upstream, tf.float32)
            if flat.padded != flat.total:
                upstream = tf.pad(upstream, [[0, flat.padded - flat.total]])
            mine = group.reducescatter(upstream, "average")
            if scattered is not None:
                scattered.append(mine)
            return mine

        return full, grad

    return whole(variable.read_value() if isinstance(variable, tf.Variable) else variable)


def paced(x, scattered: list):
    """``x`` (a unit's output); in the backward pass its gradient waits until the reduce-scatter made two before the
    latest one in ``scattered`` is done: the backward pass runs at most two buckets (units, with one bucket per unit)
    ahead of its reduce-scatters.

    Measured (8 blocks of width 512, 4 ranks under Gloo, recompute): the peak of the largest rank 947 MB without
    it, 923 MB with it (16 blocks of width 384: 951 MB either way); it bounds how many units' gradients wait in
    Horovod's queue when the backward pass outruns the collectives."""

    @tf.custom_gradient
    def identity(h):
        def grad(upstream):
            waits = scattered[-2:-1]
            if not waits:
                return upstream
            with tf.control_dependencies(waits):
                return tf.identity(upstream)

        return tf.identity(h), grad

    return identity(x)


@dataclass(eq=False)
class Bucket:
    """Weights gathered together: their names and shapes (this rank's tensor-parallel slices), the flat geometry
    over the data group, and this rank's slice (a float32 variable)."""

    key: str
    names: list[str]
    shapes: list[tuple[int, ...]]
    flat: Flat
    variable: tf.Variable | None = None

    def split(self, full) -> dict[str, tf.Tensor]:
        """The gathered vector as the bucket's weights."""
        parts = tf.split(full, list(self.flat.sizes)) if len(self.names) > 1 else [full]
        return {n: tf.reshape(p, s) for n, p, s in zip(self.names, parts, self.shapes)}
