"""Sampling text from a trained byte-level ``gpt``."""
from __future__ import annotations

import numpy as np

from hvdtrain.errors import UsageError


def sample(model, prompt: bytes, max_tokens: int, temperature: float = 0.8, top_k: int = 40,
           seed: int = 0) -> bytes:
    """Sample ``max_tokens`` bytes after ``prompt``.

    The model reads a fixed window; the last ``context_length`` bytes are placed at its start and the logits at
    the last real position are used (right padding does not change them: the model is causal). ``temperature=0``
    is greedy decoding. The same seed gives the same bytes.
    """
    import tensorflow as tf

    shape = model.input_shape
    if len(shape) != 2 or model.inputs[0].dtype not in (tf.int32, tf.int64):
        raise UsageError(f"the model takes inputs of shape {shape[1:]}, not byte tokens; generate needs a gpt model")
    if max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    if temperature < 0:
        raise UsageError("--temperature must be 0 (greedy) or positive")
    context, vocab = shape[1], model.output_shape[-1]
    forward = tf.function(lambda x: model(x, training=False))
    rng = np.random.default_rng(seed)
    tokens = list(prompt) or [ord("\n")]
    start = len(tokens) if prompt else 1
    window = np.zeros((1, context), np.int32)
    for _ in range(max_tokens):
        ctx = tokens[-context:]
        window[:] = 0
        window[0, : len(ctx)] = ctx
        logits = forward(window)[0, len(ctx) - 1].numpy().astype(np.float64)
        if temperature == 0:
            nxt = int(np.argmax(logits))
        else:
            logits = logits / temperature
            if 0 < top_k < vocab:
                cutoff = np.partition(logits, -top_k)[-top_k]
                logits = np.where(logits >= cutoff, logits, -np.inf)
            probs = np.exp(logits - logits.max())
            nxt = int(rng.choice(vocab, p=probs / probs.sum()))
        tokens.append(nxt)
    return bytes(tokens[start:])
