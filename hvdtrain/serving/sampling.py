"""The sampling rules every generation path shares (full window, cached, speculative, the exported graph): the
distribution of the next token under a temperature and top-k, the choice of one token, and the checks of the
options."""
from __future__ import annotations

import numpy as np

from hvdtrain.errors import UsageError


def transform(logits: np.ndarray, temperature: float, top_k: int, top_p: float = 1.0) -> np.ndarray:
    """The sampling distribution of ``logits`` (float64, last axis) under ``temperature``, ``top_k`` (0: every
    token) and ``top_p`` (nucleus sampling, Holtzman et al. 2019: the most likely tokens whose probabilities sum to
    at least ``top_p``, after the temperature and top-k; 1: every token)."""
    logits = np.asarray(logits, np.float64) / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        cutoff = np.partition(logits, -top_k, axis=-1)[..., -top_k, None]
        logits = np.where(logits >= cutoff, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1.0:
        ranked = np.sort(probs, axis=-1)[..., ::-1]
        # the smallest probability still inside the nucleus: the first whose cumulative sum reaches top_p
        inside = np.minimum((np.cumsum(ranked, axis=-1) < top_p).sum(-1, keepdims=True), vocab - 1)
        probs = np.where(probs >= np.take_along_axis(ranked, inside, axis=-1), probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    return probs


def choose(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator,
           top_p: float = 1.0) -> int:
    """The next token from one row of logits: greedy at temperature 0, else sampled (the same rule in every path)."""
    if temperature == 0:
        return int(np.argmax(logits))
    probs = transform(logits, temperature, top_k, top_p)
    return int(rng.choice(len(probs), p=probs))


def penalized(logits: np.ndarray, counts: dict[int, int], presence: float = 0.0, frequency: float = 0.0,
              bias: dict[int, float] | None = None) -> np.ndarray:
    """OpenAI's adjustments of one row of logits before sampling: minus ``presence`` for every token generated so
    far, minus ``frequency`` times its count (``counts``: token -> times generated), plus ``bias[token]``."""
    if not (presence or frequency or bias):
        return logits
    logits = np.array(logits, np.float64)
    for token, count in counts.items():
        logits[token] -= presence + frequency * count
    for token, value in (bias or {}).items():
        logits[token] += value
    return logits


def distribution(logits, temperature, top_k, vocab: int):
    """In the graph: the sampling distribution of ``logits`` (batch, vocabulary) as :func:`transform` makes it
    (without top-p), under a ``temperature`` and ``top_k`` for all rows or one per row."""
    import tensorflow as tf

    batch = tf.shape(logits)[0]
    temperature = tf.broadcast_to(tf.cast(temperature, logits.dtype), [batch])
    top_k = tf.broadcast_to(tf.cast(top_k, tf.int32), [batch])
    scaled = logits / temperature[:, None]
    k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)
    cutoff = tf.gather(tf.sort(scaled, axis=-1, direction="DESCENDING"), k - 1, batch_dims=1)[:, None]
    return tf.nn.softmax(tf.where(scaled >= cutoff, scaled, -1e30), axis=-1)


def check_args(max_tokens: int, temperature: float) -> None:
    """One-line errors for bad generation arguments."""
    if max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    if temperature < 0:
        raise UsageError("--temperature must be 0 (greedy) or positive")
