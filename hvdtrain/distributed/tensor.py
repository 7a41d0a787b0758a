"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) over a Horovod process set: the communication operators,
the context a model family's math runs in, and the vocabulary-parallel cross-entropy.

The two operators, each with its forward and backward side by side (Megatron-LM's ``mappings.py``):

- ``copy_to_group`` (Megatron's *f*): identity forward, sum of the gradients over the group backward. It enters a
  tensor-parallel region whose input is replicated on every member.
- ``reduce_from_group`` (Megatron's *g*): sum over the group forward, identity backward. It leaves the region:
  each member holds a partial sum of the output.

Both are written with ``tf.custom_gradient``: Horovod's own registered gradients do not fit (measured here: the
gradient of ``allreduce(op=Sum)`` is itself a sum over the group, so a plain allreduce used as *g* doubles the
gradients at tensor=2).

Sequence parallelism (Korthikanti et al. 2022, Megatron-LM's ``sequence_parallel``) replaces *f* and *g* inside
the units between the first and the last: the activations between split regions (the residual stream, what the
norms and the dropout after *g* see) are split by position, each member holding ``1/size`` of them, and

- ``gather_from_sequence`` enters a split region: all-gather of the positions forward, reduce-scatter backward;
- ``reduce_scatter_to_sequence`` leaves it: the members' partial outputs summed and scattered by position forward,
  all-gather backward;
- ``scatter_to_sequence`` (this member's positions of a replicated activation; all-gather backward) and
  ``gather_to_replicated`` (all-gather; backward, this member's positions of a replicated gradient) join the units
  that run on whole positions (the embedding, the head).

The bytes moved are an allreduce's (a ring allreduce is a reduce-scatter and an all-gather), in twice as many calls;
what it buys is memory: the norms, the dropout masks and the residual stream of every block are ``1/size`` per member.

A family's plan (:mod:`models.plan`) says which weights split on which axis; its math calls the operators through
:class:`TensorContext` (or :class:`SequenceContext`). Nothing here names a layer of any model.
"""
from __future__ import annotations

import tensorflow as tf

from hvdtrain.distributed.mesh import Group


def copy_to_group(x, group: Group):
    """Megatron's *f*: identity forward; backward, the gradients of the group's members summed."""
    if group.size == 1:
        return x

    @tf.custom_gradient
    def f(x):
        def grad(dy):
            return group.allreduce(dy, "sum")

        return tf.identity(x), grad

    return f(x)


def reduce_from_group(x, group: Group):
    """Megatron's *g*: forward, the members' partial outputs summed; backward, identity."""
    if group.size == 1:
        return x

    @tf.custom_gradient
    def g(x):
        def grad(dy):
            return tf.identity(dy)

        return group.allreduce(x, "sum"), grad

    return g(x)


def _positions_first(x):
    """``(batch, positions, ...)`` <-> ``(positions, batch, ...)``: Horovod gathers and scatters the first axis."""
    return tf.transpose(x, [1, 0, *range(2, x.shape.rank)])


def _all_positions(x, group: Group):
    return _positions_first(group.allgather(_positions_first(x)))


def _summed_own_positions(x, group: Group):
    return _positions_first(group.reducescatter(_positions_first(x), "sum"))


def _own_positions(x, group: Group):
    size = tf.shape(x)[1] // group.size
    return x[:, group.rank * size:(group.rank + 1) * size]


def gather_from_sequence(x, group: Group):
    """Enter a split region from positions split over the group: all-gather forward; backward, the members'
    partial gradients summed and scattered by position (each member's region saw every position)."""
    @tf.custom_gradient
    def f(x):
        return _all_positions(x, group), lambda dy: _summed_own_positions(dy, group)

    return f(x)


def reduce_scatter_to_sequence(x, group: Group):
    """Leave a split region: the members' partial outputs summed, each member keeping its positions; backward, the
    gradient of every position gathered."""
    @tf.custom_gradient
    def g(x):
        return _summed_own_positions(x, group), lambda dy: _all_positions(dy, group)

    return g(x)


def scatter_to_sequence(x, group: Group):
    """This member's positions of an activation every member holds whole; backward, every position's gradient."""
    @tf.custom_gradient
    def s(x):
        return _own_positions(x, group), lambda dy: _all_positions(dy, group)

    return s(x)


def gather_to_replicated(x, group: Group):
    """Every position, for a unit that runs on whole positions on every member; backward, this member's positions
    of the gradient (every member computes the same whole gradient there)."""
    @tf.custom_gradient
    def r(x):
        return _all_positions(x, group), lambda dy: _own_positions(dy, group)

    return r(x)


class TensorContext:
    """What a family's math asks of a member of a tensor-parallel group (:class:`models.plan.Context`).

    Args:
        group: the tensor-parallel group (a group of one is one process).
        dtype: the compute dtype.
        training: whether dropout is on.
        key: the forward pass's :class:`models.plan.DropoutKey` (the step and the first example's index in the
            global batch), made outside any recomputed region so that a recomputed forward draws the same masks.
    """

    def __init__(self, group: Group, dtype, training: bool, key=None):
        self.group, self.dtype, self.training, self.key = group, dtype, bool(training), key
        self.size = group.size
        self.rank = group.rank if group.size > 1 else 0

    def enter(self, x):
        return copy_to_group(x, self.group)

    def exit(self, x):
        return reduce_from_group(x, self.group)

    def max(self, x):
        return tf.stop_gradient(self.group.allreduce(tf.stop_gradient(x), "max")) if self.size > 1 else x

    def min(self, x):
        return tf.stop_gradient(self.group.allreduce(tf.stop_gradient(x), "min")) if self.size > 1 else x

    def dropout(self, x, rate: float, site: int, split_axis: int | None = None):
        """This member's part of the one-process mask of ``site`` (:func:`models.plan.dropout`)."""
        from models.plan import dropout

        if not self.training or rate <= 0 or self.key is None:
            return x
        return dropout(x, rate, self.key, site, split_axis, self.rank, self.size)


class SequenceContext(TensorContext):
    """A member's context with sequence parallelism (see the module doc): a unit's input and output hold this
    member's ``1/size`` of the positions; *f* and *g* become an all-gather and a reduce-scatter of the positions.
    Dropout outside a split region draws this member's positions of the mask; inside one, as :class:`TensorContext`.
    """

    def __init__(self, group: Group, dtype, training: bool, key=None):
        super().__init__(group, dtype, training, key)
        self.inside = False  # between enter() and exit(): the positions are whole

    def enter(self, x):
        self.inside = True
        return gather_from_sequence(x, self.group)

    def exit(self, x):
        self.inside = False
        return reduce_scatter_to_sequence(x, self.group)

    def dropout(self, x, rate: float, site: int, split_axis: int | None = None):
        if split_axis is None and not self.inside:
            split_axis = 1  # the positions axis of (batch, positions, width)
        return super().dropout(x, rate, site, split_axis)


def cross_entropy(logits, labels, ctx) -> tuple:
    """Per position: ``(cross-entropy, 1.0 where the argmax is the label)`` from float32 ``logits``.

    With a tensor-parallel group the logits are this member's slice of the vocabulary (``vocabulary / size``
    columns, in member order) and no member forms the whole: the softmax's maximum and normalizer and the label's
    logit are reduced over the group (the normalizer and the label's logit stacked through one *g*, so each member's
    gradient is ``softmax - one_hot`` on its own columns), and the argmax is the smallest index holding the group's
    maximum.
    """
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.int32)
    if ctx.size == 1:
        ce = tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        hit = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
        return ce, hit
    columns = tf.shape(logits)[-1]
    start = ctx.rank * columns
    local_max = tf.reduce_max(logits, axis=-1)
    top = ctx.max(local_max)
    local = labels - start
    inside = (local >= 0) & (local < columns)
    picked = tf.gather(logits, tf.where(inside, local, tf.zeros_like(local)), batch_dims=len(labels.shape))
    # the normalizer and the label's logit do not depend on each other: one allreduce carries both
    normalizer, label_logit = tf.unstack(ctx.exit(tf.stack(
        [tf.reduce_sum(tf.exp(logits - top[..., None]), axis=-1), picked * tf.cast(inside, tf.float32)])))
    ce = tf.math.log(normalizer) + top - label_logit
    candidate = tf.where(tf.equal(local_max, top), tf.argmax(logits, -1, output_type=tf.int32) + start,
                         tf.int32.max)
    hit = tf.cast(tf.equal(ctx.min(candidate), labels), tf.float32)
    return ce, hit


def gather_vocabulary(logits, group: Group):
    """The whole vocabulary's logits ``(batch, vocabulary)`` from each member's slice ``(batch, vocabulary / size)``
    (serving: every member samples from, or rank 0 reads, the same whole row; no gradient)."""
    if group.size == 1:
        return logits
    return tf.transpose(group.allgather(tf.transpose(logits)))


def split(value, parts: int, index: int, axis: int | None):
    """The ``index``-th of ``parts`` equal slices of ``value`` along ``axis`` (``value`` itself when None)."""
    if axis is None or parts == 1:
        return value
    size = value.shape[axis] // parts
    return tf.gather(value, tf.range(index * size, (index + 1) * size), axis=axis)
