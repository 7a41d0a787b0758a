"""``hvdtrain generate``: text from a trained language model, three ways (token ids in and out; the CLI encodes and
decodes with the run's tokenizer).

- cached (the default, :func:`hvdtrain.serving.decoding.sample_cached`): one new position per byte;
- speculative (``--draft STUDENT``, :func:`~hvdtrain.serving.speculative.sample_speculative`): a small draft
  proposes tokens that the model checks in one call;
- full window (``--full-window``, :func:`sample` here): the whole window recomputed for every byte, the reference
  the others are tested against.
"""
from __future__ import annotations

import numpy as np

from hvdtrain.serving import decoding, sampling, speculative


def sample(model, prompt, max_tokens: int, temperature: float = 0.8, top_k: int = 40,
           seed: int = 0) -> list[int]:
    """Sample ``max_tokens`` tokens after ``prompt`` (token ids; ``bytes`` for a byte-level model), recomputing the
    whole window for each.

    The model reads a fixed window; the last ``context_length`` bytes are placed at its start and the logits at
    the last real position are used (right padding does not change them: the model is causal). ``temperature=0``
    is greedy decoding. The same seed gives the same bytes.
    """
    import tensorflow as tf

    context, _ = decoding.check_model(model)
    sampling.check_args(max_tokens, temperature)
    forward = tf.function(lambda x: model(x, training=False))
    rng = np.random.default_rng(seed)
    tokens = list(prompt) or [ord("\n")]
    start = len(tokens) if prompt else 1
    window = np.zeros((1, context), np.int32)
    for _ in range(max_tokens):
        ctx = tokens[-context:]
        window[:] = 0
        window[0, : len(ctx)] = ctx
        logits = forward(window)[0, len(ctx) - 1].numpy()
        tokens.append(sampling.choose(logits, temperature, top_k, rng))
    return tokens[start:]


def run(model, prompts: list, max_tokens: int, temperature: float, top_k: int, seed: int,
        method: str = "cached", draft=None, draft_tokens: int = 4) -> tuple[list[list[int]], decoding.Stats]:
    """Generate for every prompt with ``method`` (``cached``, ``speculative``, ``full``); returns the texts and
    what the run did."""
    stats = decoding.Stats(rows=len(prompts))
    if method == "speculative":
        texts = speculative.sample_speculative(model, draft, prompts, max_tokens, temperature, top_k, seed,
                                            draft_tokens, stats)
    elif method == "full":
        texts = [sample(model, p, max_tokens, temperature, top_k, seed) for p in prompts]
        stats.model_calls, stats.generated = max_tokens * len(prompts), max_tokens * len(prompts)
    else:
        texts = decoding.sample_cached(model, prompts, max_tokens, temperature, top_k, seed, stats=stats)
    return texts, stats


def command(model_path: str, prompts: list[str], max_tokens: int, temperature: float, top_k: int, seed: int,
            draft_path: str | None = None, full_window: bool = False, draft_tokens: int = 4,
            allow_unsafe: bool = False) -> tuple[list[str], decoding.Stats, str]:
    """``hvdtrain generate``: load the model (and draft), check them and the run's tokenizer, generate a text for
    every prompt; returns the texts (prompt included), what the run did and the method used.

    A prompt is encoded with the tokenizer's special tokens (a Llama's begin-of-text first), and each text ends at
    the model's first end-of-sequence token (its generation_config.json's), as transformers' ``generate`` does."""
    from hvdtrain import formats
    from hvdtrain.errors import UsageError

    if draft_path and full_window:
        raise UsageError("--draft and --full-window exclude each other: speculative decoding uses the cache")
    model = formats.load_model(model_path, allow_unsafe=allow_unsafe)  # a missing or wrong file: before TensorFlow
    from hvdtrain.data import tokenizer as tokenizers

    _, vocab = decoding.check_model(model, f"--model {model_path}")
    draft = formats.load_model(draft_path, allow_unsafe=allow_unsafe) if draft_path else None
    if draft is not None:
        decoding.check_model(draft, f"--draft {draft_path}")
    method = "speculative" if draft is not None else "full" if full_window else "cached"
    tok = tokenizers.load_beside(model_path)
    tokenizers.check_vocabulary(tok, vocab, f"--model {model_path}")
    prompts = prompts or [""]
    ids = [tok.encode(p, special=True) or tok.encode("\n") for p in prompts]
    texts, stats = run(model, ids, max_tokens, temperature, top_k, seed, method, draft, draft_tokens)
    return [p + tok.decode(until_eos(t, tok.eos), special=False) for p, t in zip(prompts, texts)], stats, method


def until_eos(tokens: list[int], eos) -> list[int]:
    """``tokens`` up to (without) the first end-of-sequence id."""
    for i, token in enumerate(tokens):
        if token in eos:
            return list(tokens[:i])
    return list(tokens)
