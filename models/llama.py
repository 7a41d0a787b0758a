"""A Llama-style decoder-only Transformer (Touvron et al., 2023): the second language-model family.

Pre-norm blocks with RMSNorm, rotary position embeddings (RoPE) on the queries and keys, grouped-query attention
(``kv_heads`` key-value heads shared by ``num_heads // kv_heads`` query heads each), a SwiGLU MLP
(``down(silu(gate(x)) * up(x))``) and no biases anywhere; no learned positions, so the only embedding is the
tokens'. Float32 logits over the vocabulary (optionally tied to the token embedding).

As in :mod:`models.gpt`, the math is written once (:func:`embed`, :func:`block`, :func:`head`, :func:`decode`)
over a dict of weights and a :class:`models.plan.Context`; the Keras layers call it in one process, the parallel
engines on each rank's slices (:func:`plan`: query heads, key-value heads and the MLP's hidden units split across a
tensor-parallel group, the vocabulary too), the cached decoder with an attention over its cache.
"""
from __future__ import annotations

import tensorflow as tf

from models.gpt import EMBEDDING_INIT, SITES, block_index, causal_attention, project, vocabulary_lookup
from models.plan import DropoutClock, LocalContext, Plan, Unit, Weight
from models.plan import keras_weight as _weight
from models.registry import register, register_plan

layers = tf.keras.layers


# ---------------------------------------------------------------------------------------------------------------
# The math, once


def rms_norm(x, scale, epsilon: float = 1e-6):
    """Root-mean-square normalization over the last axis (no centring, no bias), computed in float32."""
    x32 = tf.cast(x, tf.float32)
    y = x32 * tf.math.rsqrt(tf.reduce_mean(tf.square(x32), axis=-1, keepdims=True) + epsilon)
    return tf.cast(y * tf.cast(scale, tf.float32), x.dtype)


def rope(x, positions, theta: float):
    """Rotary position embedding of ``x`` ``(batch, t, heads, head_dim)`` at ``positions`` (``(t,)`` or
    ``(batch, t)``): each pair of features (i, i + head_dim / 2) is rotated by ``position / theta^(2i/head_dim)``
    (the "rotate half" form of GPT-NeoX and Hugging Face's Llama)."""
    half = x.shape[-1] // 2
    inv = 1.0 / (theta ** (tf.range(half, dtype=tf.float32) * 2.0 / float(2 * half)))  # (half,)
    angles = tf.cast(positions, tf.float32)[..., None] * inv  # (t, half) or (batch, t, half)
    if angles.shape.rank == 2:
        angles = angles[None]
    cos, sin = tf.cos(angles)[:, :, None, :], tf.sin(angles)[:, :, None, :]  # (1|batch, t, 1, half)
    x32 = tf.cast(x, tf.float32)
    a, b = x32[..., :half], x32[..., half:]
    return tf.cast(tf.concat([a * cos - b * sin, b * cos + a * sin], axis=-1), x.dtype)


def embed(p, tokens, ctx, dropout: float = 0.0, site: int = 0):
    """The token embedding (vocabulary-parallel with tensor parallelism), in the compute dtype, then dropout."""
    x = vocabulary_lookup(p["embed/tokens/embeddings"], tokens, ctx)
    return ctx.dropout(tf.cast(x, ctx.dtype), dropout, site)


def block(p, prefix: str, x, ctx, theta: float = 10000.0, dropout: float = 0.0, site: int = 0, attention=None,
          positions=None):
    """One pre-norm block: ``x + attention(rms1(x))``, then ``x + swiglu(rms2(x))``.

    ``positions`` (default ``0..t-1``) place the rotary embedding; ``attention(q, k, v)`` (keys and values with
    their ``kv_heads`` heads) replaces the causal self-attention (the cached decoder attends over its cache).
    With tensor parallelism each member holds its share of the query heads and of the key-value heads (the heads
    of one group stay on one member), and the same slice of the MLP's hidden units as gpt's blocks.
    """
    def w(name):
        return tf.cast(p[f"{prefix}/{name}"], ctx.dtype)

    h = ctx.enter(rms_norm(x, p[f"{prefix}/attn_norm/scale"]))
    if positions is None:  # of the attention's input (with sequence parallelism x holds a member's share of them)
        positions = tf.range(tf.shape(h)[1])
    q = rope(project(h, w("attn/query/kernel")), positions, theta)
    k = rope(project(h, w("attn/key/kernel")), positions, theta)
    v = project(h, w("attn/value/kernel"))
    if attention is None:
        groups = q.shape[2] // k.shape[2]
        context = causal_attention(q, tf.repeat(k, groups, axis=2), tf.repeat(v, groups, axis=2), ctx, dropout, site)
    else:
        context = attention(q, k, v)
    attn = ctx.exit(project(context, w("attn/output/kernel"), 2))
    x = x + ctx.dropout(attn, dropout, site + 1)
    h = ctx.enter(rms_norm(x, p[f"{prefix}/mlp_norm/scale"]))
    hidden = tf.nn.silu(project(h, w("mlp/gate/kernel"))) * project(h, w("mlp/up/kernel"))
    out = ctx.exit(project(hidden, w("mlp/down/kernel")))
    return x + ctx.dropout(out, dropout, site + 2)


def head(p, x, ctx, tied: bool = False):
    """The final RMSNorm and the float32 logits (this member's slice of the vocabulary with tensor parallelism)."""
    h = tf.cast(ctx.enter(rms_norm(x, p["norm/scale"])), tf.float32)
    table = "embed/tokens/embeddings" if tied else "logits/kernel"
    return tf.einsum("btw,vw->btv" if tied else "btw,wv->btv", h, tf.cast(p[table], tf.float32))


# ---------------------------------------------------------------------------------------------------------------
# The Keras layers of the one-process model


@tf.keras.utils.register_keras_serializable(package="hvdtrain")
class TokenEmbedding(layers.Layer):
    """The token embedding, then dropout; with ``reverse=True`` the tied logits."""

    def __init__(self, vocab_size: int, width: int, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.width, self.dropout = vocab_size, width, dropout

    def build(self, input_shape):
        self.tokens = _weight(self, "tokens/embeddings", (self.vocab_size, self.width), EMBEDDING_INIT)
        self.clock = DropoutClock(self)
        super().build(input_shape)

    def call(self, inputs, reverse: bool = False, training=None):
        if reverse:
            return tf.einsum("btw,vw->btv", tf.cast(inputs, tf.float32), self.tokens)
        ctx = LocalContext(self.compute_dtype, training, self.clock.key(training and self.dropout > 0))
        return embed({"embed/tokens/embeddings": self.tokens}, inputs, ctx, self.dropout, 0)

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "width": self.width, "dropout": self.dropout}


@tf.keras.utils.register_keras_serializable(package="hvdtrain")
class LlamaBlock(layers.Layer):
    """RMSNorm, rotary grouped-query attention, RMSNorm, SwiGLU MLP (:func:`block`)."""

    def __init__(self, width: int, num_heads: int, kv_heads: int, mlp_hidden: int, rope_theta: float = 10000.0,
                 dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.width, self.num_heads, self.kv_heads, self.mlp_hidden = width, num_heads, kv_heads, mlp_hidden
        self.rope_theta, self.dropout = rope_theta, dropout

    def build(self, input_shape):
        self.keys = []
        for weight in block_weights("", self.width, self.num_heads, self.kv_heads, self.mlp_hidden):
            _weight(self, weight.name[1:], weight.shape, weight.initializer)
            self.keys.append(self.name + weight.name)
        self.clock = DropoutClock(self)
        super().build(input_shape)

    def call(self, x, training=None):
        params = dict(zip(self.keys, self.weights))  # its own weights first, then its dropout clock
        ctx = LocalContext(self.compute_dtype, training, self.clock.key(training and self.dropout > 0))
        return block(params, self.name, x, ctx, self.rope_theta, self.dropout, SITES * block_index(self.name))

    def get_config(self):
        return {**super().get_config(), "width": self.width, "num_heads": self.num_heads, "kv_heads": self.kv_heads,
                "mlp_hidden": self.mlp_hidden, "rope_theta": self.rope_theta, "dropout": self.dropout}


@tf.keras.utils.register_keras_serializable(package="hvdtrain")
class RMSNorm(layers.Layer):
    """RMSNorm over the last axis with a learned scale."""

    def __init__(self, width: int, **kwargs):
        super().__init__(**kwargs)
        self.width = width

    def build(self, input_shape):
        self.scale = _weight(self, "scale", (self.width,), "ones")
        super().build(input_shape)

    def call(self, x):
        return rms_norm(x, self.scale)

    def get_config(self):
        return {**super().get_config(), "width": self.width}


@tf.keras.utils.register_keras_serializable(package="hvdtrain")
class Logits(layers.Layer):
    """Float32 logits without a bias."""

    def __init__(self, width: int, vocab_size: int, **kwargs):
        super().__init__(**kwargs)
        self.width, self.vocab_size = width, vocab_size

    def build(self, input_shape):
        self.kernel = _weight(self, "kernel", (self.width, self.vocab_size), "glorot_uniform")
        super().build(input_shape)

    def call(self, x):
        return tf.einsum("btw,wv->btv", tf.cast(x, tf.float32), self.kernel)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "vocab_size": self.vocab_size}


# ---------------------------------------------------------------------------------------------------------------
# The builder and the plan


def hidden_units(width: int, mlp_hidden: int) -> int:
    """The MLP's hidden width: ``mlp_hidden``, or Llama's rule (2/3 of 4 x width, rounded up to a multiple of 32)."""
    if mlp_hidden:
        return int(mlp_hidden)
    return 32 * -(-(8 * width // 3) // 32)


@register("llama")
def llama(
    *,
    input_shape: tuple[int, ...],
    num_classes: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    kv_heads: int = 2,
    width: int = 128,
    mlp_hidden: int = 0,
    rope_theta: float = 10000.0,
    dropout: float = 0.0,
    tie_embeddings: bool = False,
) -> tf.keras.Model:
    """A Llama-style decoder over ``num_classes`` tokens.

    Args:
        input_shape: ``(context_length,)``: tokens per example.
        num_classes: vocabulary size.
        num_layers: Transformer blocks.
        num_heads: query heads per block; must divide ``width`` into an even head size (rotary pairs).
        kv_heads: key-value heads (grouped-query attention); must divide ``num_heads`` (``num_heads``: multi-head,
            1: multi-query).
        width: model width.
        mlp_hidden: the SwiGLU MLP's hidden units; 0: 2/3 of 4 x width rounded up to a multiple of 32.
        rope_theta: the rotary embedding's base.
        dropout: dropout on the embeddings, attention weights and residual branches.
        tie_embeddings: compute the logits with the token embedding.

    Returns:
        An uncompiled ``keras.Model`` mapping int tokens ``(batch, context_length)`` to float32 logits.
    """
    check(width, num_heads, kv_heads)
    (context_length,) = input_shape
    f = hidden_units(width, mlp_hidden)
    tokens = tf.keras.Input(shape=(context_length,), dtype="int32", name="tokens")
    embedding = TokenEmbedding(num_classes, width, dropout, name="embed")
    x = embedding(tokens)
    for i in range(num_layers):
        x = LlamaBlock(width, num_heads, kv_heads, f, rope_theta, dropout, name=f"block_{i}")(x)
    x = RMSNorm(width, name="norm")(x)
    logits = embedding(x, reverse=True) if tie_embeddings else Logits(width, num_classes, name="logits")(x)
    return tf.keras.Model(tokens, logits, name="llama")


def check(width: int, num_heads: int, kv_heads: int) -> None:
    """Raise ValueError for head counts the architecture cannot take."""
    if width % num_heads or (width // num_heads) % 2:
        raise ValueError(f"num_heads={num_heads} must divide width={width} into an even head size (rotary pairs)")
    if kv_heads < 1 or num_heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide num_heads={num_heads}")


def block_weights(prefix: str, width: int, num_heads: int, kv_heads: int, mlp_hidden: int) -> list[Weight]:
    """A block's weights in the order of its Keras layer, with the axes tensor parallelism splits."""
    d, g = width // num_heads, "glorot_uniform"
    return [Weight(f"{prefix}/attn_norm/scale", (width,), "ones"),
            Weight(f"{prefix}/attn/query/kernel", (width, num_heads, d), g, split=1),
            Weight(f"{prefix}/attn/key/kernel", (width, kv_heads, d), g, split=1),
            Weight(f"{prefix}/attn/value/kernel", (width, kv_heads, d), g, split=1),
            Weight(f"{prefix}/attn/output/kernel", (num_heads, d, width), g, split=0),
            Weight(f"{prefix}/mlp_norm/scale", (width,), "ones"),
            Weight(f"{prefix}/mlp/gate/kernel", (width, mlp_hidden), g, split=1),
            Weight(f"{prefix}/mlp/up/kernel", (width, mlp_hidden), g, split=1),
            Weight(f"{prefix}/mlp/down/kernel", (mlp_hidden, width), g, split=0)]


def params_of_model(model) -> dict:
    """The builder parameters of a built ``llama`` (for :func:`models.plan_of`)."""
    embed_cfg = model.get_layer("embed").get_config()
    blocks = [layer for layer in model.layers if isinstance(layer, LlamaBlock)]
    b = blocks[0].get_config()
    return {"num_layers": len(blocks), "num_heads": b["num_heads"], "kv_heads": b["kv_heads"],
            "width": embed_cfg["width"], "mlp_hidden": b["mlp_hidden"], "rope_theta": b["rope_theta"],
            "dropout": b["dropout"], "tie_embeddings": "logits" not in [layer.name for layer in model.layers]}


@register_plan("llama", from_model=params_of_model)
def plan(*, input_shape, num_classes=256, num_layers=2, num_heads=4, kv_heads=2, width=128, mlp_hidden=0,
         rope_theta=10000.0, dropout=0.0, tie_embeddings=False) -> Plan:
    """The llama's parallel plan: query and key-value heads and the MLP's hidden units split across tensor-parallel
    ranks, the vocabulary of the embedding and logits too; a pipeline cuts between blocks."""
    check(width, num_heads, kv_heads)
    (context,) = input_shape
    f = hidden_units(width, mlp_hidden)
    units = [Unit("embed", "embed", (Weight("embed/tokens/embeddings", (num_classes, width), EMBEDDING_INIT,
                                            split=0, lookup=True),), ("embed",), pin="first")]
    for i in range(num_layers):
        units.append(Unit(f"block_{i}", "block", tuple(block_weights(f"block_{i}", width, num_heads, kv_heads, f)),
                          (f"block_{i}",), recompute=True, index=i + 1,
                          attention=width))
    last = num_layers + 1
    norm = (Weight("norm/scale", (width,), "ones"),)
    if tie_embeddings:
        units.append(Unit("head", "head", norm, ("norm",), shared=("embed/tokens/embeddings",), pin="last",
                          index=last))
    else:
        units.append(Unit("head", "head", norm + (Weight("logits/kernel", (width, num_classes), "glorot_uniform", 1),),
                          ("norm", "logits"), pin="last", index=last))

    def apply(unit: Unit, params, x, ctx):
        site = SITES * unit.index
        if unit.kind == "embed":
            return embed(params, x, ctx, dropout, site)
        if unit.kind == "block":
            return block(params, unit.name, x, ctx, rope_theta, dropout, site)
        return head(params, x, ctx, tied=tie_embeddings)

    def decode(params, tokens, positions, attention):
        """One process, new tokens at ``positions`` ``(batch, n)``; ``attention(i, q, k, v)`` for block i."""
        ctx = LocalContext()
        x = embed(params, tokens, ctx)
        for i in range(num_layers):
            x = block(params, f"block_{i}", x, ctx, rope_theta, positions=positions,
                      attention=lambda q, k, v, i=i: attention(i, q, k, v))
        return head(params, x, ctx, tied=tie_embeddings)

    return Plan("llama", tuple(units), apply, (context, width), num_classes,
                divisors={"model.params.num_heads": num_heads, "model.params.kv_heads": kv_heads,
                          "the MLP's hidden units": f, "the vocabulary (data's num_classes)": num_classes},
                twin={"params": {"width": 2 * num_heads, "mlp_hidden": 1},
                      "restore": {"width": width, "mlp_hidden": f}},
                decode=decode, cache=(num_layers, kv_heads, width // num_heads))
