"""A GPT-style decoder-only Transformer language model (Radford et al., 2019), byte-level by default.

Pre-norm blocks of causal multi-head self-attention and a GELU MLP, learned position embeddings, a final layer
norm and float32 logits over the vocabulary (optionally tied to the token embedding). The input has a fixed length
(``context_length``), which keeps the model convertible to TFLite; shorter prompts are right-padded, which
causality makes harmless.

The family's math is written once, as the pure functions :func:`embed`, :func:`block` and :func:`head` over a dict
of weights and a :class:`models.plan.Context`. The Keras layers below call them in one process; the parallel
engines call them on each rank's slices of the weights (:func:`plan`: which weight splits on which axis).
"""
from __future__ import annotations

import math

import tensorflow as tf

from models.lora import Adapted, cast
from models.plan import DropoutClock, LocalContext, Plan, Unit, Weight
from models.plan import keras_weight as _weight
from models.registry import register, register_plan

layers = tf.keras.layers
SITES = 8  # dropout sites per unit: unit i draws sites 8 i .. 8 i + 7, so no two units share a mask
EMBEDDING_INIT = {"class_name": "RandomUniform", "config": {"minval": -0.05, "maxval": 0.05}}


# ---------------------------------------------------------------------------------------------------------------
# The math, once


def layer_norm(x, gamma, beta, epsilon: float = 1e-5):
    """Layer normalization over the last axis, computed in float32 (as Keras' own under mixed precision)."""
    x32 = tf.cast(x, tf.float32)
    mean, variance = tf.nn.moments(x32, axes=[-1], keepdims=True)
    y = tf.nn.batch_normalization(x32, mean, variance, tf.cast(beta, tf.float32), tf.cast(gamma, tf.float32),
                                  epsilon)
    return tf.cast(y, x.dtype)


def vocabulary_lookup(table, tokens, ctx):
    """Rows of ``table`` for ``tokens``; with tensor parallelism each member holds ``vocabulary / size`` rows and
    looks up the tokens in its range, and the members' rows are summed (*g*)."""
    if ctx.size == 1:
        return tf.gather(table, tokens)
    rows = tf.shape(table)[0]
    local = tokens - ctx.rank * rows
    inside = (local >= 0) & (local < rows)
    found = tf.gather(table, tf.where(inside, local, tf.zeros_like(local)))
    return ctx.exit(found * tf.cast(inside, found.dtype)[..., None])


def embed(p, tokens, ctx, dropout: float = 0.0, site: int = 0):
    """Token plus position embeddings, in the compute dtype, then dropout (the first positions of the table: it may
    hold more than the window, as a checkpoint's does)."""
    steps = tf.shape(tokens)[-1]
    x = vocabulary_lookup(p["embed/tokens/embeddings"], tokens, ctx) + p["embed/positions/embeddings"][:steps]
    return ctx.dropout(tf.cast(x, ctx.dtype), dropout, site)


def project(x, kernel, axes: int = 1):
    """``x``'s last ``axes`` axes times ``kernel``'s first ``axes``, as one 2-D matmul (``tf.tensordot``).

    Not ``tf.einsum`` nor ``tf.matmul`` on a 3-D ``x``: on the CPU an einsum in bfloat16 rounds as it accumulates
    (a (2048 x 512) x (512 x 2048) product off by 4.8% at worst against 0.41-0.43% for a matmul, which rounds its
    float32 sum once), and ``tf.matmul`` broadcasts a 2-D kernel over the batch, forming its gradient one example
    at a time (2.8x slower on 2 cores in float32). docs/performance.md, "One process".

    A LoRA-adapted kernel (:class:`models.lora.Adapted`) adds its low-rank path."""
    if isinstance(kernel, Adapted):
        return kernel.apply(x, axes)
    return tf.tensordot(x, kernel, axes)


def causal_attention(q, k, v, ctx, dropout: float = 0.0, site: int = 0):
    """Each position attends to itself and the positions before it; ``(batch, t, heads, head_dim)`` in and out.
    The products are batched matmuls over (batch, heads), not einsums (:func:`project`)."""
    q = q * tf.cast(1.0 / math.sqrt(float(q.shape[-1])), q.dtype)
    heads_first = [0, 2, 1, 3]
    q, k, v = (tf.transpose(a, heads_first) for a in (q, k, v))
    scores = tf.matmul(q, k, transpose_b=True)  # (batch, heads, query t, key s)
    steps = tf.shape(q)[2]
    causal = tf.linalg.band_part(tf.ones((steps, steps), tf.bool), -1, 0)
    scores = tf.where(causal, tf.cast(scores, tf.float32), -1e9)
    probs = ctx.dropout(tf.cast(tf.nn.softmax(scores, axis=-1), q.dtype), dropout, site, split_axis=1)
    return tf.transpose(tf.matmul(probs, v), heads_first)


def block(p, prefix: str, x, ctx, dropout: float = 0.0, site: int = 0, attention=None, epsilon: float = 1e-5,
          tanh_gelu: bool = False):
    """One pre-norm block: ``x + attention(ln1(x))``, then ``x + mlp(ln2(x))`` (GELU, or its tanh approximation,
    GPT-2's ``gelu_new``, with ``tanh_gelu``).

    ``attention(q, k, v)`` replaces the causal self-attention over ``x``'s own positions (the cached decoder
    attends over its key-value cache this way).

    With tensor parallelism (Megatron-LM): the query, key and value projections hold this member's heads, the
    output projection the same heads' rows, the MLP's first layer a slice of its columns and the second the same
    rows; *f* enters each split region and *g* leaves it, so a block costs 2 allreduces forward and 2 backward.
    The biases of the row-parallel layers are added once, after *g*.
    """
    def w(name):
        return cast(p[f"{prefix}/{name}"], ctx.dtype)

    # attention: f -> this member's heads -> their rows of the output projection -> g
    h = ctx.enter(layer_norm(x, p[f"{prefix}/ln1/gamma"], p[f"{prefix}/ln1/beta"], epsilon))
    q = project(h, w("attn/query/kernel")) + w("attn/query/bias")
    k = project(h, w("attn/key/kernel")) + w("attn/key/bias")
    v = project(h, w("attn/value/kernel")) + w("attn/value/bias")
    context = causal_attention(q, k, v, ctx, dropout, site) if attention is None else attention(q, k, v)
    attn = ctx.exit(project(context, w("attn/output/kernel"), 2)) + w("attn/output/bias")
    x = x + ctx.dropout(attn, dropout, site + 1)
    # MLP: f -> column-parallel fc -> row-parallel proj -> g
    h = ctx.enter(layer_norm(x, p[f"{prefix}/ln2/gamma"], p[f"{prefix}/ln2/beta"], epsilon))
    hidden = tf.nn.gelu(project(h, w("mlp/fc/kernel")) + w("mlp/fc/bias"), approximate=tanh_gelu)
    out = ctx.exit(project(hidden, w("mlp/proj/kernel"))) + w("mlp/proj/bias")
    return x + ctx.dropout(out, dropout, site + 2)


def head(p, x, ctx, tied: bool = False, epsilon: float = 1e-5):
    """The final layer norm and the float32 logits: with tensor parallelism, this member's slice of the
    vocabulary (the loss is then vocabulary-parallel: no member forms the whole logits)."""
    h = tf.cast(ctx.enter(layer_norm(x, p["ln_final/gamma"], p["ln_final/beta"], epsilon)), tf.float32)
    if tied:
        return tf.einsum("btw,vw->btv", h, tf.cast(p["embed/tokens/embeddings"], tf.float32))
    return tf.einsum("btw,wv->btv", h, tf.cast(p["logits/kernel"], tf.float32)) + tf.cast(p["logits/bias"],
                                                                                           tf.float32)


# ---------------------------------------------------------------------------------------------------------------
# The Keras layers of the one-process model (they own their weights and call the math above)


def block_index(name: str) -> int:
    """The unit index of the block layer ``block_{i}`` (the embedding is unit 0)."""
    return int(name.rsplit("_", 1)[1]) + 1


@tf.keras.utils.register_keras_serializable(package="hvdtrain")
class TokenAndPositionEmbedding(layers.Layer):
    """Token embedding plus a learned embedding of each position, then dropout. Called with ``reverse=True`` it
    maps hidden states to logits with the token embedding (tied embeddings)."""

    def __init__(self, vocab_size: int, context_length: int, width: int, dropout: float = 0.0, positions: int = 0,
                 **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.context_length, self.width, self.dropout = vocab_size, context_length, width, dropout
        self.table_positions = positions or context_length  # rows of the position table

    def build(self, input_shape):
        self.tokens = _weight(self, "tokens/embeddings", (self.vocab_size, self.width), EMBEDDING_INIT)
        self.positions = _weight(self, "positions/embeddings", (self.table_positions, self.width), EMBEDDING_INIT)
        self.clock = DropoutClock(self)
        super().build(input_shape)

    def _params(self):
        return {"embed/tokens/embeddings": self.tokens, "embed/positions/embeddings": self.positions}

    def call(self, inputs, reverse: bool = False, training=None):
        if reverse:
            return tf.einsum("btw,vw->btv", tf.cast(inputs, tf.float32), self.tokens)
        ctx = LocalContext(self.compute_dtype, training, self.clock.key(training, self.dropout > 0))
        return embed(self._params(), inputs, ctx, self.dropout, 0)

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "context_length": self.context_length,
                "width": self.width, "dropout": self.dropout, "positions": self.table_positions}


@tf.keras.utils.register_keras_serializable(package="hvdtrain")
class TransformerBlock(layers.Layer):
    """Pre-norm block: ``x + attn(ln(x))`` with a causal mask, then ``x + mlp(ln(x))`` (:func:`block`)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: int = 4, dropout: float = 0.0, epsilon: float = 1e-5,
                 activation: str = "gelu", **kwargs):
        super().__init__(**kwargs)
        self.width, self.num_heads, self.mlp_ratio, self.dropout = width, num_heads, mlp_ratio, dropout
        self.epsilon, self.activation = epsilon, activation

    def build(self, input_shape):
        self.keys = []
        for weight in block_weights("", self.width, self.num_heads, self.mlp_ratio):
            _weight(self, weight.name[1:], weight.shape, weight.initializer)
            self.keys.append(self.name + weight.name)
        self.clock = DropoutClock(self)
        super().build(input_shape)

    def call(self, x, training=None):
        params = dict(zip(self.keys, self.weights))  # its own weights first, then its dropout clock
        ctx = LocalContext(self.compute_dtype, training, self.clock.key(training, self.dropout > 0))
        return block(params, self.name, x, ctx, self.dropout, SITES * block_index(self.name), epsilon=self.epsilon,
                     tanh_gelu=self.activation == "gelu_tanh")

    def get_config(self):
        return {**super().get_config(), "width": self.width, "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio, "dropout": self.dropout, "epsilon": self.epsilon,
                "activation": self.activation}


# ---------------------------------------------------------------------------------------------------------------
# The builder and the plan


@register("gpt")
def gpt(
    *,
    input_shape: tuple[int, ...],
    num_classes: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    width: int = 128,
    mlp_ratio: int = 4,
    dropout: float = 0.1,
    tie_embeddings: bool = False,
    positions: int = 0,
    activation: str = "gelu",
    norm_epsilon: float = 1e-5,
) -> tf.keras.Model:
    """A decoder-only Transformer over ``num_classes`` tokens (256 for bytes).

    Args:
        input_shape: ``(context_length,)``: tokens per example.
        num_classes: vocabulary size (the number of output logits per position).
        num_layers: Transformer blocks.
        num_heads: attention heads per block; must divide ``width``.
        width: model width (embedding size).
        mlp_ratio: MLP hidden width as a multiple of ``width``.
        dropout: dropout on the embeddings, attention weights and residual branches.
        tie_embeddings: compute the logits with the token embedding (no separate output layer).
        positions: rows of the learned position table (0: the context length); a checkpoint's table may be longer
            than the window a run trains on.
        activation: the MLP's ``gelu`` (exact) or ``gelu_tanh`` (its tanh approximation: GPT-2's ``gelu_new``).
        norm_epsilon: the layer norms' epsilon.

    Returns:
        An uncompiled ``keras.Model`` mapping int tokens ``(batch, context_length)`` to float32 logits
        ``(batch, context_length, num_classes)``: position t predicts token t + 1.
    """
    check(num_heads, width, activation)
    (context_length,) = input_shape
    if positions and positions < context_length:
        raise ValueError(f"positions={positions} is shorter than the context length {context_length}")
    tokens = tf.keras.Input(shape=(context_length,), dtype="int32", name="tokens")
    embedding = TokenAndPositionEmbedding(num_classes, context_length, width, dropout, positions, name="embed")
    x = embedding(tokens)
    for i in range(num_layers):
        x = TransformerBlock(width, num_heads, mlp_ratio, dropout, norm_epsilon, activation, name=f"block_{i}")(x)
    x = layers.LayerNormalization(epsilon=norm_epsilon, name="ln_final")(x)
    if tie_embeddings:
        logits = embedding(x, reverse=True)
    else:
        logits = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return tf.keras.Model(tokens, logits, name="gpt")


ACTIVATIONS = ("gelu", "gelu_tanh")


def check(num_heads: int, width: int, activation: str) -> None:
    """Raise ValueError for settings the architecture cannot take."""
    if width % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide width={width}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation '{activation}' is not one of {', '.join(ACTIVATIONS)}")


def block_weights(prefix: str, width: int, num_heads: int, mlp_ratio: int) -> list[Weight]:
    """A block's weights in the order of its Keras layer; heads and the MLP's hidden units split across a
    tensor-parallel group (column-parallel: the output axis; row-parallel: the input axis)."""
    d, f = width // num_heads, mlp_ratio * width
    g, z = "glorot_uniform", "zeros"
    out = [Weight(f"{prefix}/ln1/gamma", (width,), "ones"), Weight(f"{prefix}/ln1/beta", (width,), z)]
    for name in ("query", "key", "value"):
        out += [Weight(f"{prefix}/attn/{name}/kernel", (width, num_heads, d), g, split=1, inputs=1),
                Weight(f"{prefix}/attn/{name}/bias", (num_heads, d), z, split=0)]
    out += [Weight(f"{prefix}/attn/output/kernel", (num_heads, d, width), g, split=0, inputs=2),
            Weight(f"{prefix}/attn/output/bias", (width,), z),
            Weight(f"{prefix}/ln2/gamma", (width,), "ones"), Weight(f"{prefix}/ln2/beta", (width,), z),
            Weight(f"{prefix}/mlp/fc/kernel", (width, f), g, split=1, inputs=1),
            Weight(f"{prefix}/mlp/fc/bias", (f,), z, split=0),
            Weight(f"{prefix}/mlp/proj/kernel", (f, width), g, split=0, inputs=1),
            Weight(f"{prefix}/mlp/proj/bias", (width,), z)]
    return out


def params_of_model(model) -> dict:
    """The builder parameters of a built ``gpt`` (for :func:`models.plan_of`)."""
    blocks = [layer for layer in model.layers if isinstance(layer, TransformerBlock)]
    b = blocks[0].get_config()
    embedding = model.get_layer("embed")
    positions = embedding.table_positions
    return {"num_layers": len(blocks), "num_heads": b["num_heads"], "width": b["width"],
            "mlp_ratio": b["mlp_ratio"], "dropout": b["dropout"],
            "tie_embeddings": "logits" not in [layer.name for layer in model.layers],
            "positions": 0 if positions == embedding.context_length else positions,
            "activation": b.get("activation", "gelu"), "norm_epsilon": b.get("epsilon", 1e-5)}


@register_plan("gpt", from_model=params_of_model)
def plan(*, input_shape, num_classes=256, num_layers=2, num_heads=4, width=128, mlp_ratio=4, dropout=0.1,
         tie_embeddings=False, positions=0, activation="gelu", norm_epsilon=1e-5) -> Plan:
    """The gpt's parallel plan: heads and MLP columns split across tensor-parallel ranks (Megatron-LM), the
    vocabulary of the embedding and logits too; a pipeline cuts between blocks."""
    check(num_heads, width, activation)
    (context,) = input_shape
    rows = positions or context
    tanh_gelu = activation == "gelu_tanh"
    units = [Unit("embed", "embed", (
        Weight("embed/tokens/embeddings", (num_classes, width), EMBEDDING_INIT, split=0, lookup=True),
        Weight("embed/positions/embeddings", (rows, width), EMBEDDING_INIT, lookup=True)), ("embed",), pin="first")]
    for i in range(num_layers):
        units.append(Unit(f"block_{i}", "block", tuple(block_weights(f"block_{i}", width, num_heads, mlp_ratio)),
                          (f"block_{i}",), recompute=True, index=i + 1,
                          attention=width))
    last = num_layers + 1
    norm = (Weight("ln_final/gamma", (width,), "ones"), Weight("ln_final/beta", (width,), "zeros"))
    if tie_embeddings:
        units.append(Unit("head", "head", norm, ("ln_final",), shared=("embed/tokens/embeddings",), pin="last",
                          index=last))
    else:
        units.append(Unit("head", "head", norm + (Weight("logits/kernel", (width, num_classes), "glorot_uniform", 1,
                                                         inputs=1),
                                                  Weight("logits/bias", (num_classes,), "zeros", 0)),
                          ("ln_final", "logits"), pin="last", index=last))

    def apply(unit: Unit, params, x, ctx):
        site = SITES * unit.index  # dropout sites never repeat across units (nor, so, across pipeline stages)
        if unit.kind == "embed":
            return embed(params, x, ctx, dropout, site)
        if unit.kind == "block":
            return block(params, unit.name, x, ctx, dropout, site, epsilon=norm_epsilon, tanh_gelu=tanh_gelu)
        return head(params, x, ctx, tied=tie_embeddings, epsilon=norm_epsilon)

    def decode(params, tokens, at, attention, ctx=None):
        """New tokens at positions ``at`` ``(batch, n)``; ``attention(i, q, k, v)`` for block i; ``ctx``: one process
        (the default) or a tensor-parallel member (its heads, and its slice of the vocabulary's logits)."""
        ctx = ctx or LocalContext()
        x = vocabulary_lookup(params["embed/tokens/embeddings"], tokens, ctx) + tf.gather(
            params["embed/positions/embeddings"], tf.minimum(at, context - 1))
        for i in range(num_layers):
            x = block(params, f"block_{i}", x, ctx, attention=lambda q, k, v, i=i: attention(i, q, k, v),
                      epsilon=norm_epsilon, tanh_gelu=tanh_gelu)
        return head(params, x, ctx, tied=tie_embeddings, epsilon=norm_epsilon)

    return Plan("gpt", tuple(units), apply, (context, width), num_classes,
                divisors={"model.params.num_heads": num_heads, "model.params.mlp_ratio x width": mlp_ratio * width,
                          "the vocabulary (data's num_classes)": num_classes},
                twin={"params": {"width": num_heads, "mlp_ratio": 1},
                      "restore": {"width": width, "mlp_ratio": mlp_ratio}},
                decode=decode, cache=(num_layers, num_heads, width // num_heads))


# ---------------------------------------------------------------------------------------------------------------
# The Hugging Face adapter: GPT2LMHeadModel (its Conv1D weights are [in, out]; c_attn holds query | key | value)

ACTIVATION_OF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def read_hf_config(config: dict):
    """A ``GPT2LMHeadModel`` config.json in this family's terms."""
    from models.hub import Pretrained, PretrainedError

    act = config.get("activation_function", "gelu_new")
    if act not in ACTIVATION_OF:
        raise PretrainedError(f"activation_function '{act}' is not supported (supported: {', '.join(ACTIVATION_OF)})")
    if not config.get("tie_word_embeddings", True):
        raise PretrainedError("GPT-2 with untied embeddings is not supported (tie_word_embeddings: false)")
    if config.get("scale_attn_by_inverse_layer_idx") or not config.get("scale_attn_weights", True):
        raise PretrainedError("scale_attn_by_inverse_layer_idx and scale_attn_weights=false are not supported")
    width = int(config.get("n_embd", 768))
    inner = int(config.get("n_inner") or 4 * width)
    if inner % width:
        raise PretrainedError(f"n_inner {inner} is not a multiple of n_embd {width}: not supported")
    positions = int(config.get("n_positions", 1024))
    params = {"num_layers": int(config.get("n_layer", 12)), "num_heads": int(config.get("n_head", 12)),
              "width": width, "mlp_ratio": inner // width, "tie_embeddings": True, "positions": positions,
              "activation": ACTIVATION_OF[act], "norm_epsilon": float(config.get("layer_norm_epsilon", 1e-5))}
    return Pretrained("gpt", params, int(config["vocab_size"]), positions,
                      {"dropout": float(config.get("resid_pdrop", 0.1))})


def write_hf_config(params: dict, vocabulary: int, context: int) -> dict:
    """A config.json for a gpt of these builder parameters (GPT-2 ties its logits to the token embedding and has
    no logits bias: an untied gpt has no Hugging Face equivalent)."""
    import inspect

    from models.hub import PretrainedError

    p = {**{k: v.default for k, v in inspect.signature(gpt).parameters.items() if v.default is not v.empty},
         **params}
    if not p["tie_embeddings"]:
        raise PretrainedError("a gpt with untied embeddings has a logits layer with a bias, which GPT2LMHeadModel "
                              "has not: train it with model.params.tie_embeddings=true to export it")
    names = {v: k for k, v in ACTIVATION_OF.items() if k != "gelu_pytorch_tanh"}
    width = p["width"]
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocabulary,
            "n_positions": p["positions"] or context, "n_embd": width, "n_layer": p["num_layers"],
            "n_head": p["num_heads"], "n_inner": p["mlp_ratio"] * width, "activation_function": names[p["activation"]],
            "resid_pdrop": p["dropout"], "embd_pdrop": p["dropout"], "attn_pdrop": p["dropout"],
            "layer_norm_epsilon": p["norm_epsilon"], "initializer_range": 0.02, "scale_attn_weights": True,
            "tie_word_embeddings": True, "use_cache": True}


def hf_tensors(plan: Plan, config: dict) -> dict:
    """Where each weight of a gpt's plan is in a GPT-2 checkpoint."""
    from models.hub import Tensor

    out = {}
    width = plan.activation[1]
    for w in plan.weights:
        parts = w.name.split("/")
        if parts[0] == "embed":
            name = "transformer.wte.weight" if parts[1] == "tokens" else "transformer.wpe.weight"
            out[w.name] = Tensor(name, ((0,), (1,)), w.shape)
        elif parts[0] == "ln_final":
            out[w.name] = Tensor(f"transformer.ln_f.{'weight' if parts[1] == 'gamma' else 'bias'}", ((0,),), w.shape)
        elif parts[0] == "logits":
            raise ValueError("GPT-2 has no logits layer of its own (tied embeddings)")
        else:
            layer = f"transformer.h.{int(parts[0].split('_')[1])}"
            what = "/".join(parts[1:])
            norms = {"ln1/gamma": "ln_1.weight", "ln1/beta": "ln_1.bias", "ln2/gamma": "ln_2.weight",
                     "ln2/beta": "ln_2.bias"}
            if what in norms:
                out[w.name] = Tensor(f"{layer}.{norms[what]}", ((0,),), w.shape)
            elif what.startswith("attn/output/"):
                kernel = what.endswith("kernel")
                out[w.name] = Tensor(f"{layer}.attn.c_proj.{'weight' if kernel else 'bias'}",
                                     ((0, 1), (2,)) if kernel else ((0,),), (width, width) if kernel else w.shape)
            elif what.startswith("attn/"):  # query | key | value, fused in c_attn
                at = ("query", "key", "value").index(parts[2]) * width
                if parts[3] == "kernel":
                    out[w.name] = Tensor(f"{layer}.attn.c_attn.weight", ((0,), (1, 2)), (width, 3 * width), (0, at))
                else:
                    out[w.name] = Tensor(f"{layer}.attn.c_attn.bias", ((0, 1),), (3 * width,), (at,))
            else:  # mlp/fc, mlp/proj: Conv1D, [in, out] as the plan stores them
                module = "c_fc" if parts[2] == "fc" else "c_proj"
                out[w.name] = Tensor(f"{layer}.mlp.{module}.{'weight' if parts[3] == 'kernel' else 'bias'}",
                                     tuple((a,) for a in range(len(w.shape))), w.shape)
    return out


def _register_adapter():
    from models.hub import Adapter, register_adapter

    register_adapter(Adapter(
        "gpt", ("GPT2LMHeadModel",), read_hf_config, write_hf_config, hf_tensors, base_prefix="transformer",
        modules={"attn/query/kernel": "c_attn", "attn/key/kernel": "c_attn", "attn/value/kernel": "c_attn",
                 "attn/output/kernel": "attn.c_proj", "mlp/fc/kernel": "c_fc", "mlp/proj/kernel": "mlp.c_proj"},
        default_targets=("attn/query/kernel", "attn/key/kernel", "attn/value/kernel")))


_register_adapter()
