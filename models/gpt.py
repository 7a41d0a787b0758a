"""A GPT-style decoder-only Transformer language model (Radford et al., 2019), byte-level by default.

Pre-norm blocks of causal multi-head self-attention and a GELU MLP, learned position embeddings, a final layer
norm and float32 logits over the vocabulary. The input has a fixed length (``context_length``), which keeps the
model convertible to TFLite; shorter prompts are right-padded, which causality makes harmless.
"""
from __future__ import annotations

import tensorflow as tf

from models.registry import register

layers = tf.keras.layers


@tf.keras.utils.register_keras_serializable(package="hvdtrain")
class TokenAndPositionEmbedding(layers.Layer):
    """Token embedding plus a learned embedding of each position."""

    def __init__(self, vocab_size: int, context_length: int, width: int, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.context_length, self.width = vocab_size, context_length, width
        self.tokens = layers.Embedding(vocab_size, width, name="tokens")
        self.positions = layers.Embedding(context_length, width, name="positions")

    def call(self, inputs):
        positions = tf.range(tf.shape(inputs)[-1])
        return self.tokens(inputs) + self.positions(positions)

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "context_length": self.context_length,
                "width": self.width}


@tf.keras.utils.register_keras_serializable(package="hvdtrain")
class TransformerBlock(layers.Layer):
    """Pre-norm block: ``x + attn(ln(x))`` with a causal mask, then ``x + mlp(ln(x))``."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: int = 4, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.width, self.num_heads, self.mlp_ratio, self.dropout = width, num_heads, mlp_ratio, dropout
        self.ln1 = layers.LayerNormalization(epsilon=1e-5, name="ln1")
        self.attn = layers.MultiHeadAttention(num_heads, width // num_heads, dropout=dropout, name="attn")
        self.ln2 = layers.LayerNormalization(epsilon=1e-5, name="ln2")
        self.fc = layers.Dense(mlp_ratio * width, activation="gelu", name="fc")
        self.proj = layers.Dense(width, name="proj")
        self.drop = layers.Dropout(dropout)

    def call(self, x, training=None):
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, use_causal_mask=True, training=training), training=training)
        return x + self.drop(self.proj(self.fc(self.ln2(x))), training=training)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio, "dropout": self.dropout}


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
) -> tf.keras.Model:
    """A decoder-only Transformer over ``num_classes`` tokens (256 for bytes).

    Args:
        input_shape: ``(context_length,)``: tokens per example.
        num_classes: vocabulary size (the number of output logits per position).
        num_layers: Transformer blocks.
        num_heads: attention heads per block; must divide ``width``.
        width: model width (embedding size).
        mlp_ratio: MLP hidden width as a multiple of ``width``.
        dropout: dropout on attention weights and residual branches.

    Returns:
        An uncompiled ``keras.Model`` mapping int tokens ``(batch, context_length)`` to float32 logits
        ``(batch, context_length, num_classes)``: position t predicts token t + 1.
    """
    if width % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide width={width}")
    (context_length,) = input_shape
    tokens = tf.keras.Input(shape=(context_length,), dtype="int32", name="tokens")
    x = TokenAndPositionEmbedding(num_classes, context_length, width, name="embed")(tokens)
    x = layers.Dropout(dropout, name="embed_dropout")(x)
    for i in range(num_layers):
        x = TransformerBlock(width, num_heads, mlp_ratio, dropout, name=f"block_{i}")(x)
    x = layers.LayerNormalization(epsilon=1e-5, name="ln_final")(x)
    logits = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return tf.keras.Model(tokens, logits, name="gpt")
