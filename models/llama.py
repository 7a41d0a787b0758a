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

import math

import numpy as np
import tensorflow as tf

from models.gpt import EMBEDDING_INIT, SITES, block_index, causal_attention, project, vocabulary_lookup
from models.lora import cast
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


def frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """The rotary embedding's angle per position of each feature pair, ``theta^(-2i/head_dim)`` (float32, as
    Hugging Face's Llama computes them), with Llama 3.1's ``llama3`` scaling when given: wavelengths longer than
    ``original_max_position_embeddings / low_freq_factor`` are stretched by ``factor``, those shorter than
    ``original_max_position_embeddings / high_freq_factor`` kept, and those between interpolated."""
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                                        / np.float32(head_dim)))).astype(np.float32)
    if not scaling:
        return inv
    factor, low, high = (np.float32(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    old = np.float32(scaling["original_max_position_embeddings"])
    wavelength = np.float32(2 * math.pi) / inv
    stretched = np.where(wavelength > old / low, inv / factor, inv)
    smooth = (old / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * stretched / factor + smooth * stretched
    medium = ~(wavelength < old / high) & ~(wavelength > old / low)
    return np.where(medium, smoothed, stretched).astype(np.float32)


def rope(x, positions, theta: float, scaling: dict | None = None):
    """Rotary position embedding of ``x`` ``(batch, t, heads, head_dim)`` at ``positions`` (``(t,)`` or
    ``(batch, t)``): each pair of features (i, i + head_dim / 2) is rotated by ``position`` times its
    :func:`frequencies` (the "rotate half" form of GPT-NeoX and Hugging Face's Llama)."""
    half = x.shape[-1] // 2
    inv = tf.constant(frequencies(2 * half, theta, scaling))  # (half,)
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
          positions=None, epsilon: float = 1e-6, scaling: dict | None = None):
    """One pre-norm block: ``x + attention(rms1(x))``, then ``x + swiglu(rms2(x))``.

    ``positions`` (default ``0..t-1``) place the rotary embedding (of base ``theta``, with ``scaling``);
    ``attention(q, k, v)`` (keys and values with their ``kv_heads`` heads) replaces the causal self-attention (the
    cached decoder attends over its cache). Biases on the query, key and value projections (Qwen2's) are added
    where the weights hold them. With tensor parallelism each member holds its share of the query heads and of the
    key-value heads (the heads of one group stay on one member), and the same slice of the MLP's hidden units as
    gpt's blocks.
    """
    def w(name):
        return cast(p[f"{prefix}/{name}"], ctx.dtype)

    def projected(name):
        y = project(h, w(f"attn/{name}/kernel"))
        return y + w(f"attn/{name}/bias") if f"{prefix}/attn/{name}/bias" in p else y

    h = ctx.enter(rms_norm(x, p[f"{prefix}/attn_norm/scale"], epsilon))
    if positions is None:  # of the attention's input (with sequence parallelism x holds a member's share of them)
        positions = tf.range(tf.shape(h)[1])
    q = rope(projected("query"), positions, theta, scaling)
    k = rope(projected("key"), positions, theta, scaling)
    v = projected("value")
    if attention is None:
        groups = q.shape[2] // k.shape[2]
        context = causal_attention(q, tf.repeat(k, groups, axis=2), tf.repeat(v, groups, axis=2), ctx, dropout, site)
    else:
        context = attention(q, k, v)
    attn = ctx.exit(project(context, w("attn/output/kernel"), 2))
    x = x + ctx.dropout(attn, dropout, site + 1)
    h = ctx.enter(rms_norm(x, p[f"{prefix}/mlp_norm/scale"], epsilon))
    hidden = tf.nn.silu(project(h, w("mlp/gate/kernel"))) * project(h, w("mlp/up/kernel"))
    out = ctx.exit(project(hidden, w("mlp/down/kernel")))
    return x + ctx.dropout(out, dropout, site + 2)


def head(p, x, ctx, tied: bool = False, epsilon: float = 1e-6):
    """The final RMSNorm and the float32 logits (this member's slice of the vocabulary with tensor parallelism)."""
    h = tf.cast(ctx.enter(rms_norm(x, p["norm/scale"], epsilon)), tf.float32)
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
        ctx = LocalContext(self.compute_dtype, training, self.clock.key(training, self.dropout > 0))
        return embed({"embed/tokens/embeddings": self.tokens}, inputs, ctx, self.dropout, 0)

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "width": self.width, "dropout": self.dropout}


@tf.keras.utils.register_keras_serializable(package="hvdtrain")
class LlamaBlock(layers.Layer):
    """RMSNorm, rotary grouped-query attention, RMSNorm, SwiGLU MLP (:func:`block`)."""

    def __init__(self, width: int, num_heads: int, kv_heads: int, mlp_hidden: int, rope_theta: float = 10000.0,
                 dropout: float = 0.0, epsilon: float = 1e-6, rope_scaling: dict | None = None, qkv_bias: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.width, self.num_heads, self.kv_heads, self.mlp_hidden = width, num_heads, kv_heads, mlp_hidden
        self.rope_theta, self.dropout, self.epsilon = rope_theta, dropout, epsilon
        self.rope_scaling, self.qkv_bias = rope_scaling or None, qkv_bias

    def build(self, input_shape):
        self.keys = []
        for weight in block_weights("", self.width, self.num_heads, self.kv_heads, self.mlp_hidden, self.qkv_bias):
            _weight(self, weight.name[1:], weight.shape, weight.initializer)
            self.keys.append(self.name + weight.name)
        self.clock = DropoutClock(self)
        super().build(input_shape)

    def call(self, x, training=None):
        params = dict(zip(self.keys, self.weights))  # its own weights first, then its dropout clock
        ctx = LocalContext(self.compute_dtype, training, self.clock.key(training, self.dropout > 0))
        return block(params, self.name, x, ctx, self.rope_theta, self.dropout, SITES * block_index(self.name),
                     epsilon=self.epsilon, scaling=self.rope_scaling)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "num_heads": self.num_heads, "kv_heads": self.kv_heads,
                "mlp_hidden": self.mlp_hidden, "rope_theta": self.rope_theta, "dropout": self.dropout,
                "epsilon": self.epsilon, "rope_scaling": self.rope_scaling, "qkv_bias": self.qkv_bias}


@tf.keras.utils.register_keras_serializable(package="hvdtrain")
class RMSNorm(layers.Layer):
    """RMSNorm over the last axis with a learned scale."""

    def __init__(self, width: int, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.width, self.epsilon = width, epsilon

    def build(self, input_shape):
        self.scale = _weight(self, "scale", (self.width,), "ones")
        super().build(input_shape)

    def call(self, x):
        return rms_norm(x, self.scale, self.epsilon)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "epsilon": self.epsilon}


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
    norm_epsilon: float = 1e-6,
    rope_scaling: dict | None = None,
    qkv_bias: bool = False,
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
        norm_epsilon: the RMSNorms' epsilon.
        rope_scaling: Llama 3.1's ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"}``, or None.
        qkv_bias: biases on the query, key and value projections (Qwen2).

    Returns:
        An uncompiled ``keras.Model`` mapping int tokens ``(batch, context_length)`` to float32 logits.
    """
    check(width, num_heads, kv_heads, rope_scaling)
    (context_length,) = input_shape
    f = hidden_units(width, mlp_hidden)
    tokens = tf.keras.Input(shape=(context_length,), dtype="int32", name="tokens")
    embedding = TokenEmbedding(num_classes, width, dropout, name="embed")
    x = embedding(tokens)
    for i in range(num_layers):
        x = LlamaBlock(width, num_heads, kv_heads, f, rope_theta, dropout, norm_epsilon, rope_scaling, qkv_bias,
                       name=f"block_{i}")(x)
    x = RMSNorm(width, norm_epsilon, name="norm")(x)
    logits = embedding(x, reverse=True) if tie_embeddings else Logits(width, num_classes, name="logits")(x)
    return tf.keras.Model(tokens, logits, name="llama")


ROPE_SCALING = ("llama3",)  # the rope_scaling types implemented (None: no scaling)
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check(width: int, num_heads: int, kv_heads: int, rope_scaling: dict | None = None) -> None:
    """Raise ValueError for settings the architecture cannot take."""
    if width % num_heads or (width // num_heads) % 2:
        raise ValueError(f"num_heads={num_heads} must divide width={width} into an even head size (rotary pairs)")
    if kv_heads < 1 or num_heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide num_heads={num_heads}")
    scaling_of(rope_scaling)


def scaling_of(given: dict | None) -> dict | None:
    """A rope scaling setting (``rope_type`` or ``type``, and its keys) as the family keeps it, or None for none
    (``default``); ValueError for a type not implemented or a key missing."""
    kind = (given or {}).get("rope_type", (given or {}).get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind not in ROPE_SCALING:
        raise ValueError(f"rope scaling of type '{kind}' is not supported (supported: none, {', '.join(ROPE_SCALING)})")
    missing = [k for k in LLAMA3_KEYS if k not in given]
    if missing:
        raise ValueError(f"rope scaling of type {kind} needs {', '.join(missing)}")
    return {"rope_type": kind, **{k: given[k] for k in LLAMA3_KEYS}}


def block_weights(prefix: str, width: int, num_heads: int, kv_heads: int, mlp_hidden: int,
                  qkv_bias: bool = False) -> list[Weight]:
    """A block's weights in the order of its Keras layer, with the axes tensor parallelism splits."""
    d, g, z = width // num_heads, "glorot_uniform", "zeros"
    out = [Weight(f"{prefix}/attn_norm/scale", (width,), "ones")]
    for name, heads in (("query", num_heads), ("key", kv_heads), ("value", kv_heads)):
        out.append(Weight(f"{prefix}/attn/{name}/kernel", (width, heads, d), g, split=1, inputs=1))
        if qkv_bias:
            out.append(Weight(f"{prefix}/attn/{name}/bias", (heads, d), z, split=0))
    return out + [Weight(f"{prefix}/attn/output/kernel", (num_heads, d, width), g, split=0, inputs=2),
                  Weight(f"{prefix}/mlp_norm/scale", (width,), "ones"),
                  Weight(f"{prefix}/mlp/gate/kernel", (width, mlp_hidden), g, split=1, inputs=1),
                  Weight(f"{prefix}/mlp/up/kernel", (width, mlp_hidden), g, split=1, inputs=1),
                  Weight(f"{prefix}/mlp/down/kernel", (mlp_hidden, width), g, split=0, inputs=1)]


def params_of_model(model) -> dict:
    """The builder parameters of a built ``llama`` (for :func:`models.plan_of`)."""
    embed_cfg = model.get_layer("embed").get_config()
    blocks = [layer for layer in model.layers if isinstance(layer, LlamaBlock)]
    b = blocks[0].get_config()
    return {"num_layers": len(blocks), "num_heads": b["num_heads"], "kv_heads": b["kv_heads"],
            "width": embed_cfg["width"], "mlp_hidden": b["mlp_hidden"], "rope_theta": b["rope_theta"],
            "dropout": b["dropout"], "tie_embeddings": "logits" not in [layer.name for layer in model.layers],
            "norm_epsilon": b.get("epsilon", 1e-6), "rope_scaling": b.get("rope_scaling"),
            "qkv_bias": b.get("qkv_bias", False)}


@register_plan("llama", from_model=params_of_model)
def plan(*, input_shape, num_classes=256, num_layers=2, num_heads=4, kv_heads=2, width=128, mlp_hidden=0,
         rope_theta=10000.0, dropout=0.0, tie_embeddings=False, norm_epsilon=1e-6, rope_scaling=None,
         qkv_bias=False) -> Plan:
    """The llama's parallel plan: query and key-value heads and the MLP's hidden units split across tensor-parallel
    ranks, the vocabulary of the embedding and logits too; a pipeline cuts between blocks."""
    check(width, num_heads, kv_heads, rope_scaling)
    (context,) = input_shape
    f = hidden_units(width, mlp_hidden)
    units = [Unit("embed", "embed", (Weight("embed/tokens/embeddings", (num_classes, width), EMBEDDING_INIT,
                                            split=0, lookup=True),), ("embed",), pin="first")]
    for i in range(num_layers):
        units.append(Unit(f"block_{i}", "block", tuple(block_weights(f"block_{i}", width, num_heads, kv_heads, f,
                                                                      qkv_bias)),
                          (f"block_{i}",), recompute=True, index=i + 1,
                          attention=width))
    last = num_layers + 1
    norm = (Weight("norm/scale", (width,), "ones"),)
    if tie_embeddings:
        units.append(Unit("head", "head", norm, ("norm",), shared=("embed/tokens/embeddings",), pin="last",
                          index=last))
    else:
        units.append(Unit("head", "head", norm + (Weight("logits/kernel", (width, num_classes), "glorot_uniform", 1,
                                                         inputs=1),),
                          ("norm", "logits"), pin="last", index=last))

    def apply(unit: Unit, params, x, ctx):
        site = SITES * unit.index
        if unit.kind == "embed":
            return embed(params, x, ctx, dropout, site)
        if unit.kind == "block":
            return block(params, unit.name, x, ctx, rope_theta, dropout, site, epsilon=norm_epsilon,
                         scaling=rope_scaling)
        return head(params, x, ctx, tied=tie_embeddings, epsilon=norm_epsilon)

    def decode(params, tokens, positions, attention, ctx=None):
        """New tokens at ``positions`` ``(batch, n)``; ``attention(i, q, k, v)`` for block i; ``ctx``: one process
        (the default) or a tensor-parallel member (its heads, and its slice of the vocabulary's logits)."""
        ctx = ctx or LocalContext()
        x = embed(params, tokens, ctx)
        for i in range(num_layers):
            x = block(params, f"block_{i}", x, ctx, rope_theta, positions=positions,
                      attention=lambda q, k, v, i=i: attention(i, q, k, v), epsilon=norm_epsilon,
                      scaling=rope_scaling)
        return head(params, x, ctx, tied=tie_embeddings, epsilon=norm_epsilon)

    return Plan("llama", tuple(units), apply, (context, width), num_classes,
                divisors={"model.params.num_heads": num_heads, "model.params.kv_heads": kv_heads,
                          "the MLP's hidden units": f, "the vocabulary (data's num_classes)": num_classes},
                twin={"params": {"width": 2 * num_heads, "mlp_hidden": 1},
                      "restore": {"width": width, "mlp_hidden": f}},
                decode=decode, cache=(num_layers, kv_heads, width // num_heads))


# ---------------------------------------------------------------------------------------------------------------
# The Hugging Face adapter: LlamaForCausalLM (Llama 2, 3, 3.1; TinyLlama, SmolLM), MistralForCausalLM (within its
# sliding window), Qwen2ForCausalLM (biases on the query, key and value projections)

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def _rope_settings(config: dict) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` from a config.json of transformers 4 (``rope_theta``, ``rope_scaling``) or 5
    (``rope_parameters``)."""
    from models.hub import PretrainedError

    given = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = float(given.get("rope_theta", config.get("rope_theta", 10000.0)))
    try:
        return theta, scaling_of(given)
    except ValueError as exc:
        raise PretrainedError(str(exc)) from None


def read_hf_config(config: dict):
    """A ``LlamaForCausalLM``/``MistralForCausalLM``/``Qwen2ForCausalLM`` config.json in this family's terms."""
    from models.hub import Pretrained, PretrainedError

    kind = next(ARCHITECTURES[a] for a in config["architectures"] if a in ARCHITECTURES)
    width, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    if config.get("hidden_act", "silu") != "silu":
        raise PretrainedError(f"hidden_act '{config['hidden_act']}' is not supported (the llama family's MLP is "
                              "SwiGLU: silu)")
    if config.get("head_dim") and int(config["head_dim"]) != width // heads:
        raise PretrainedError(f"head_dim {config['head_dim']} differs from hidden_size / num_attention_heads "
                              f"({width // heads}): not supported")
    if kind == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
        raise PretrainedError("attention_bias and mlp_bias are not supported (biases on the query, key and value "
                              "projections only: Qwen2ForCausalLM)")
    if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise PretrainedError(f"partial_rotary_factor {config['partial_rotary_factor']} is not supported")
    theta, scaling = _rope_settings(config)
    longest = int(config.get("max_position_embeddings", 2048))
    window = config.get("sliding_window")
    if window and (kind == "mistral" or config.get("use_sliding_window")):
        longest = min(longest, int(window))  # exact up to the window; beyond it Mistral attends to the last window
    params = {"num_layers": int(config["num_hidden_layers"]), "num_heads": heads,
              "kv_heads": int(config.get("num_key_value_heads") or heads), "width": width,
              "mlp_hidden": int(config["intermediate_size"]), "rope_theta": theta, "rope_scaling": scaling,
              "norm_epsilon": float(config.get("rms_norm_eps", 1e-6)),
              "tie_embeddings": bool(config.get("tie_word_embeddings", False)), "qkv_bias": kind == "qwen2"}
    return Pretrained("llama", params, int(config["vocab_size"]), longest,
                      {"dropout": float(config.get("attention_dropout", 0.0))})


def write_hf_config(params: dict, vocabulary: int, context: int) -> dict:
    """A config.json for a llama of these builder parameters (Qwen2ForCausalLM with biases on q, k, v)."""
    import inspect

    p = {**{k: v.default for k, v in inspect.signature(llama).parameters.items() if v.default is not v.empty},
         **params}
    width = p["width"]
    qwen = bool(p["qkv_bias"])
    config = {"architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
              "model_type": "qwen2" if qwen else "llama", "vocab_size": vocabulary, "hidden_size": width,
              "intermediate_size": hidden_units(width, p["mlp_hidden"]), "num_hidden_layers": p["num_layers"],
              "num_attention_heads": p["num_heads"], "num_key_value_heads": p["kv_heads"],
              "head_dim": width // p["num_heads"], "hidden_act": "silu", "max_position_embeddings": context,
              "rms_norm_eps": p["norm_epsilon"], "rope_theta": p["rope_theta"], "rope_scaling": p["rope_scaling"],
              "tie_word_embeddings": bool(p["tie_embeddings"]), "attention_dropout": p["dropout"],
              "initializer_range": 0.02, "use_cache": True}
    if qwen:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=p["num_layers"])
    else:
        config.update(attention_bias=False, mlp_bias=False)
    return config


def hf_tensors(plan: Plan, config: dict) -> dict:
    """Where each weight of a llama's plan is in a Hugging Face checkpoint (``nn.Linear`` weights are
    ``[out, in]``; a head's rows are consecutive)."""
    from models.hub import Tensor

    out = {}
    for w in plan.weights:
        parts = w.name.split("/")
        if w.name == "embed/tokens/embeddings":
            out[w.name] = Tensor("model.embed_tokens.weight", ((0,), (1,)), w.shape)
        elif w.name == "norm/scale":
            out[w.name] = Tensor("model.norm.weight", ((0,),), w.shape)
        elif w.name == "logits/kernel":
            out[w.name] = Tensor("lm_head.weight", ((1,), (0,)), w.shape[::-1])
        else:
            layer = f"model.layers.{int(parts[0].split('_')[1])}"
            what = "/".join(parts[1:])
            names = {"attn_norm/scale": "input_layernorm.weight", "mlp_norm/scale": "post_attention_layernorm.weight",
                     "mlp/gate/kernel": "mlp.gate_proj.weight", "mlp/up/kernel": "mlp.up_proj.weight",
                     "mlp/down/kernel": "mlp.down_proj.weight", "attn/output/kernel": "self_attn.o_proj.weight"}
            projections = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}
            if what in ("attn_norm/scale", "mlp_norm/scale"):
                out[w.name] = Tensor(f"{layer}.{names[what]}", ((0,),), w.shape)
            elif what.startswith("mlp/"):
                out[w.name] = Tensor(f"{layer}.{names[what]}", ((1,), (0,)), w.shape[::-1])
            elif what == "attn/output/kernel":
                heads, d, width = w.shape
                out[w.name] = Tensor(f"{layer}.{names[what]}", ((2,), (0, 1)), (width, heads * d))
            elif what.endswith("/kernel"):
                width, heads, d = w.shape
                out[w.name] = Tensor(f"{layer}.self_attn.{projections[parts[2]]}.weight", ((1, 2), (0,)),
                                     (heads * d, width))
            else:  # a bias of q, k or v
                heads, d = w.shape
                out[w.name] = Tensor(f"{layer}.self_attn.{projections[parts[2]]}.bias", ((0, 1),), (heads * d,))
    return out


def _register_adapter():
    from models.hub import Adapter, register_adapter

    register_adapter(Adapter(
        "llama", tuple(ARCHITECTURES), read_hf_config, write_hf_config, hf_tensors, base_prefix="model",
        modules={"attn/query/kernel": "q_proj", "attn/key/kernel": "k_proj", "attn/value/kernel": "v_proj",
                 "attn/output/kernel": "o_proj", "mlp/gate/kernel": "gate_proj", "mlp/up/kernel": "up_proj",
                 "mlp/down/kernel": "down_proj"},
        default_targets=("attn/query/kernel", "attn/value/kernel")))


_register_adapter()
