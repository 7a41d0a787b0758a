"""The sampling rules every generation path shares (full window, cached, speculative, the exported graph): the
distribution of the next token under a temperature and top-k, the choice of one token, and the checks of the
options."""
from __future__ import annotations

import numpy as np

from hvdtrain.errors import UsageError


def transform(logits: np.ndarray, temperature: float, top_k: int) -> np.ndarray:
    """The sampling distribution of ``logits`` (float64, last axis) under ``temperature`` and ``top_k``."""
    logits = np.asarray(logits, np.float64) / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        cutoff = np.partition(logits, -top_k, axis=-1)[..., -top_k, None]
        logits = np.where(logits >= cutoff, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


def choose(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """The next token from one row of logits: greedy at temperature 0, else sampled (the same rule in every path)."""
    if temperature == 0:
        return int(np.argmax(logits))
    probs = transform(logits, temperature, top_k)
    return int(rng.choice(len(probs), p=probs))


def distribution(logits, temperature, top_k, vocab: int):
    """In the graph: the sampling distribution of ``logits`` (batch, vocabulary) as :func:`transform` makes it."""
    import tensorflow as tf

    scaled = logits / temperature
    k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)
    cutoff = tf.math.top_k(scaled, k).values[:, -1:]
    return tf.nn.softmax(tf.where(scaled >= cutoff, scaled, -1e30), axis=-1)


def check_args(max_tokens: int, temperature: float) -> None:
    """One-line errors for bad generation arguments."""
    if max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    if temperature < 0:
        raise UsageError("--temperature must be 0 (greedy) or positive")
