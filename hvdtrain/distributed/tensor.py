"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) over a Horovod process set.

The two communication operators, each with its forward and backward side by side (Megatron-LM's ``mappings.py``):

- ``copy_to_group`` (Megatron's *f*): identity forward, sum of the gradients over the group backward. It enters a
  tensor-parallel region whose input is replicated on every member.
- ``reduce_from_group`` (Megatron's *g*): sum over the group forward, identity backward. It leaves the region:
  each member holds a partial sum of the output.

Both are written with ``tf.custom_gradient``: Horovod's own registered gradients do not fit (measured here: the
gradient of ``allreduce(op=Sum)`` is itself a sum over the group, so a plain allreduce used as *g* doubles the
gradients at tensor=2).

:class:`ParallelTransformerBlock` is the ``gpt`` block with its attention heads split across the group (the query,
key and value projections by heads, the output projection by its input rows) and its MLP's first layer split by
columns and the second by rows, so one block costs 2 allreduces forward and 2 backward. Layer norms and the biases
of the row-parallel layers are replicated, added once after *g*. :func:`parallelize_gpt` builds the parallel
model from a plain ``gpt`` built by :mod:`models` (which knows nothing of this), slicing its weights, so a parallel
run starts from exactly the weights of the one-process run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import tensorflow as tf

from hvdtrain.distributed.mesh import Group

layers = tf.keras.layers


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


@dataclass(frozen=True)
class Shard:
    """How a variable of a parallel model relates to the one-process model's variable of the same name."""

    name: str  # the full model's variable name, e.g. "block_0/attn/query/kernel:0"
    axis: int | None  # the axis split across the tensor group; None: replicated


def stateless_dropout(x, rate: float, seed):
    """Dropout drawn from ``seed`` (a shape-[2] int tensor): the same seed gives the same mask, so a recomputed
    forward pass and every member of a tensor group draw identical masks where they must."""
    if rate <= 0:
        return x
    keep = tf.random.stateless_uniform(tf.shape(x), seed=seed) >= rate
    return tf.where(keep, x / (1.0 - rate), tf.zeros_like(x))


class ParallelTransformerBlock(layers.Layer):
    """``models.gpt.TransformerBlock`` split over a tensor-parallel group (pre-norm, causal attention, GELU MLP).

    Args:
        width, num_heads, mlp_ratio, dropout: as the block of :func:`models.gpt.gpt`.
        group: the tensor-parallel group; its size must divide ``num_heads`` and ``mlp_ratio * width``.
        recompute: keep only the block's input for the backward pass and recompute the rest
            (``tf.recompute_grad``); the dropout masks are drawn from a per-step seed, so they are the same when
            recomputed.
        seed: this block's dropout seed (the same on every member of the group).
    """

    def __init__(self, width: int, num_heads: int, mlp_ratio: int, dropout: float, group: Group,
                 recompute: bool = False, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        tp = group.size
        self.width, self.num_heads, self.mlp_ratio, self.dropout = width, num_heads, mlp_ratio, dropout
        self.group, self.recompute, self.seed = group, recompute, seed
        self.head_dim = width // num_heads
        self.local_heads = num_heads // tp
        self.local_hidden = mlp_ratio * width // tp
        self.ln1 = layers.LayerNormalization(epsilon=1e-5, name="ln1")
        self.ln2 = layers.LayerNormalization(epsilon=1e-5, name="ln2")

    def build(self, input_shape):
        w, h, d, f = self.width, self.local_heads, self.head_dim, self.local_hidden
        self.ln1.build(input_shape)
        self.ln2.build(input_shape)

        def weight(name, shape, zeros=False):
            return self.add_weight(name=name, shape=shape, trainable=True,
                                   initializer="zeros" if zeros else "glorot_uniform")

        self.query_kernel, self.query_bias = weight("query_kernel", (w, h, d)), weight("query_bias", (h, d), True)
        self.key_kernel, self.key_bias = weight("key_kernel", (w, h, d)), weight("key_bias", (h, d), True)
        self.value_kernel, self.value_bias = weight("value_kernel", (w, h, d)), weight("value_bias", (h, d), True)
        self.out_kernel, self.out_bias = weight("out_kernel", (h, d, w)), weight("out_bias", (w,), True)
        self.fc_kernel, self.fc_bias = weight("fc_kernel", (w, f)), weight("fc_bias", (f,), True)
        self.proj_kernel, self.proj_bias = weight("proj_kernel", (f, w)), weight("proj_bias", (w,), True)
        if self.dropout > 0:
            self.draws = self.add_weight(name="dropout_draws", shape=(), dtype=tf.int64, trainable=False,
                                         initializer="zeros")
        super().build(input_shape)

    def shards(self) -> list[tuple[tf.Variable, Shard]]:
        """Each trainable variable with the full variable it is (a slice of)."""
        p = self.name + "/"
        return [
            (self.ln1.gamma, Shard(p + "ln1/gamma:0", None)), (self.ln1.beta, Shard(p + "ln1/beta:0", None)),
            (self.query_kernel, Shard(p + "attn/query/kernel:0", 1)), (self.query_bias, Shard(p + "attn/query/bias:0", 0)),
            (self.key_kernel, Shard(p + "attn/key/kernel:0", 1)), (self.key_bias, Shard(p + "attn/key/bias:0", 0)),
            (self.value_kernel, Shard(p + "attn/value/kernel:0", 1)), (self.value_bias, Shard(p + "attn/value/bias:0", 0)),
            (self.out_kernel, Shard(p + "attn/attention_output/kernel:0", 0)),
            (self.out_bias, Shard(p + "attn/attention_output/bias:0", None)),
            (self.ln2.gamma, Shard(p + "ln2/gamma:0", None)), (self.ln2.beta, Shard(p + "ln2/beta:0", None)),
            (self.fc_kernel, Shard(p + "fc/kernel:0", 1)), (self.fc_bias, Shard(p + "fc/bias:0", 0)),
            (self.proj_kernel, Shard(p + "proj/kernel:0", 0)), (self.proj_bias, Shard(p + "proj/bias:0", None)),
        ]

    def _forward(self, x, seed, training: bool):
        rate = self.dropout if training else 0.0
        tp_rank = self.group.rank if self.group.size > 1 else 0
        # attention, heads split: f -> local Q, K, V -> local heads' output rows -> g -> + bias
        h = copy_to_group(self.ln1(x), self.group)
        q = tf.einsum("btw,whd->bthd", h, self.query_kernel) + self.query_bias
        k = tf.einsum("btw,whd->bthd", h, self.key_kernel) + self.key_bias
        v = tf.einsum("btw,whd->bthd", h, self.value_kernel) + self.value_bias
        q = q * (1.0 / math.sqrt(float(self.head_dim)))
        scores = tf.einsum("bshd,bthd->bhts", k, q)  # (batch, heads, query t, key s), as Keras' attention
        steps = tf.shape(x)[1]
        causal = tf.linalg.band_part(tf.ones((steps, steps), tf.bool), -1, 0)
        scores = tf.where(causal, scores, tf.cast(-1e9, scores.dtype))
        probs = stateless_dropout(tf.nn.softmax(scores, axis=-1), rate, seed + [0, 1 + tp_rank])
        context = tf.einsum("bhts,bshd->bthd", probs, v)
        attn = tf.einsum("bthd,hdw->btw", context, self.out_kernel)
        attn = reduce_from_group(attn, self.group) + self.out_bias
        x = x + stateless_dropout(attn, rate, seed + [1, 0])  # replicated: the same mask on every member
        # MLP: f -> column-parallel fc -> row-parallel proj -> g -> + bias
        h = copy_to_group(self.ln2(x), self.group)
        hidden = tf.keras.activations.gelu(tf.matmul(h, self.fc_kernel) + self.fc_bias)
        out = reduce_from_group(tf.einsum("btf,fw->btw", hidden, self.proj_kernel), self.group) + self.proj_bias
        return x + stateless_dropout(out, rate, seed + [2, 0])

    def call(self, x, training=None):
        training = bool(training)
        seed = tf.constant([self.seed, 0], tf.int64)
        if training and self.dropout > 0:
            # one draw per step, taken outside the recomputed region so that recomputation reuses it
            seed = tf.stack([tf.constant(self.seed, tf.int64), self.draws.assign_add(1) * 4])
        if self.recompute and training:
            return tf.recompute_grad(lambda inputs: self._forward(inputs, seed, True))(x)
        return self._forward(x, seed, training)

    def get_config(self):
        raise NotImplementedError("a parallel block is never saved: hvdtrain saves the full gpt it was cut from")


class SeededDropout(layers.Layer):
    """Dropout whose masks come from a seed and a per-step counter: identical on every member of a tensor group
    (the layer's output is replicated there), where Keras' own dropout draws independently on each rank."""

    def __init__(self, rate: float, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.seed = rate, seed

    def build(self, input_shape):
        self.draws = self.add_weight(name="dropout_draws", shape=(), dtype=tf.int64, trainable=False,
                                     initializer="zeros")
        super().build(input_shape)

    def call(self, x, training=None):
        if not training or self.rate <= 0:
            return x
        return stateless_dropout(x, self.rate, tf.stack([tf.constant(self.seed, tf.int64), self.draws.assign_add(1)]))


def split(value, parts: int, index: int, axis: int | None):
    """The ``index``-th of ``parts`` equal slices of ``value`` along ``axis`` (``value`` itself when None)."""
    if axis is None or parts == 1:
        return value
    return tf.split(value, parts, axis=axis)[index].numpy()


def parallelize_gpt(full: tf.keras.Model, group: Group, recompute: bool = False, layer_names=None):
    """The ``gpt`` model ``full`` with its blocks split over ``group``, starting from ``full``'s weights.

    Args:
        full: a ``gpt`` built by :func:`models.build` (pure, one process).
        group: the tensor-parallel group (a group of one gives a model equal to ``full``).
        recompute: recompute each block's activations in the backward pass.
        layer_names: keep only these layers, in order (a pipeline stage); default: all.

    Returns:
        ``(model, shards)``: a Keras model (tokens in; logits out, or the stage's activations) and, for each of
        its trainable variables in order, the :class:`Shard` that says which full variable it is.
    """
    cfg = {blk.name: blk for blk in full.layers if type(blk).__name__ == "TransformerBlock"}
    names = layer_names or [lyr.name for lyr in full.layers if lyr.name != "tokens" and
                            not isinstance(lyr, tf.keras.layers.InputLayer)]
    first = full.get_layer(names[0])
    if isinstance(first, tf.keras.layers.InputLayer) or names[0] == "embed":
        inputs = tf.keras.Input(shape=full.input_shape[1:], dtype="int32", name="tokens")
    else:
        inputs = tf.keras.Input(shape=first.input_shape[1:], name="activations")
    x, shards = inputs, {}
    for i, name in enumerate(names):
        src = full.get_layer(name)
        if name in cfg:
            blk = ParallelTransformerBlock(src.width, src.num_heads, src.mlp_ratio, src.dropout, group,
                                           recompute=recompute, seed=1000 + i, name=name)
            x = blk(x)
            for var, shard in blk.shards():
                full_value = _variable(full, shard.name).numpy()
                var.assign(split(full_value, group.size, group.rank if group.size > 1 else 0, shard.axis))
                shards[id(var)] = shard
        elif isinstance(src, tf.keras.layers.Dropout):
            x = SeededDropout(src.rate, seed=2000 + i, name=name)(x)
        else:
            clone = src.__class__.from_config(src.get_config())
            x = clone(x)
            clone.set_weights(src.get_weights())
            for var in clone.trainable_variables:
                shards[id(var)] = Shard(_full_name(full, src, clone, var), None)
    model = tf.keras.Model(inputs, x, name=full.name)
    return model, [shards[id(v)] for v in model.trainable_variables]


def _variable(model, name: str):
    for v in model.variables:
        if v.name == name:
            return v
    raise KeyError(f"the model has no variable {name}")


def _full_name(full, src, clone, var) -> str:
    """The full model's name of a replicated layer's variable (by position within its layer)."""
    position = next(i for i, v in enumerate(clone.trainable_variables) if v is var)
    return src.trainable_variables[position].name
