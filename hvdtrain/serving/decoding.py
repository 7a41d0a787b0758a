"""Fast generation from a trained language model (``gpt``, ``llama``): a key-value cache, and speculative decoding.

**Cached decoding.** :class:`CachedDecoder` reads the model's weights and runs one compiled function, ``extend``:
new tokens at given positions go through every block, their keys and values are written into a cache of shape
``(layers, 2, batch, key-value heads, context, head_dim)``, and each new token attends to the cached keys up to its own
position. A prompt is one ``extend`` (prefill); each new byte is one ``extend`` of one token, so a step costs one
position instead of the whole window. Rows of a batch may have prompts of different lengths: each row has its
own position; a padded slot is overwritten before any query can see it.

The model has learned positions up to its context length. Up to it, cached decoding computes what the full
window computes, so greedy decoding gives the same text and sampling with the same seed the same text as
:func:`~hvdtrain.serving.generate.sample` (tested). When a row's cache is full it *slides*: the last half of the
context is encoded again at positions 0.. (one prefill) and decoding goes on; the full-window path instead
re-reads the last ``context`` tokens at every step, so past the context length the two differ (both are valid
continuations).

Speculative decoding over these decoders: :mod:`hvdtrain.serving.speculative`; the sampling rules every path shares:
:mod:`hvdtrain.serving.sampling`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hvdtrain.errors import UsageError
from hvdtrain.serving.sampling import check_args, choose, distribution


def check_model(model, name: str = "the model") -> tuple[int, int]:
    """``(context_length, vocabulary)`` of a language model; a clear error naming ``name`` for any other model."""
    import tensorflow as tf

    shape = model.input_shape
    if len(shape) != 2 or model.inputs[0].dtype not in (tf.int32, tf.int64):
        raise UsageError(f"{name} takes inputs of shape {shape[1:]}, not tokens; generate and export need a "
                         "language model (gpt, llama)")
    return int(shape[1]), int(model.output_shape[-1])


@dataclass
class Stats:
    """What a generation run did (for the speculative report and the benchmark)."""

    rows: int = 1  # prompts decoded together
    model_calls: int = 0  # calls of the large model (one per step for the whole batch)
    draft_calls: int = 0
    proposed: int = 0
    accepted: int = 0
    generated: int = 0
    slides: int = 0

    def as_dict(self) -> dict:
        out = {"rows": self.rows, "model_calls": self.model_calls, "draft_calls": self.draft_calls,
               "generated": self.generated, "slides": self.slides}
        if self.proposed:
            out.update(proposed=self.proposed, accepted=self.accepted,
                       acceptance_rate=self.accepted / self.proposed,
                       tokens_per_model_call=self.generated / max(1, self.model_calls * self.rows))
        return out


class CachedDecoder:
    """A language model's forward pass over new positions, with a key-value cache.

    The model's family decodes with its own block function through its plan (``plan.decode``); this class gives
    it an attention that writes the new keys and values into the cache and attends over it (grouped-query
    attention included: a cached key-value head serves its group of query heads), and keeps the cache.

    Args:
        model: a language model built by :func:`models.build` (or loaded from its ``.keras`` file): a family with a
            decoding plan (``gpt``, ``llama``).
    """

    def __init__(self, model):
        import tensorflow as tf

        import models
        from models.plan import keras_variables

        self.context, self.vocab = check_model(model)
        plan = models.plan_of(model)
        if plan is None or plan.decode is None:
            raise UsageError(f"the model '{model.name}' is not a language model of a registered family "
                             f"({', '.join(models.language_models())}): generate and export need one")
        self.params = keras_variables(model, plan)
        self.plan = plan
        self.layers, self.kv_heads, self.head_dim = plan.cache
        cache_spec = tf.TensorSpec([self.layers, 2, None, self.kv_heads, self.context, self.head_dim], tf.float32)
        self.extend = tf.function(self._extend, input_signature=[
            tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32), cache_spec])
        self.propose = tf.function(self._propose, input_signature=[
            tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32), cache_spec,
            tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.float32),
            tf.TensorSpec([], tf.int32), tf.TensorSpec([2], tf.int64)])

    def empty_cache(self, batch: int):
        """A cache for ``batch`` rows."""
        import tensorflow as tf

        return tf.zeros([self.layers, 2, batch, self.kv_heads, self.context, self.head_dim])

    def _extend(self, tokens, start, cache):
        """Run ``tokens`` (batch, n) at positions ``start[b] + 0..n-1``; returns ``(logits (batch, n, vocab),
        cache)``. Right-padding may run past the context: such slots write nothing (a one-hot beyond the context
        is all zeros) and their outputs are never read."""
        import tensorflow as tf

        n = tf.shape(tokens)[1]
        positions = start[:, None] + tf.range(n)[None, :]  # (batch, n)
        slots = tf.one_hot(positions, self.context)  # (batch, n, context): where each new key goes
        written = tf.reduce_max(slots, axis=1)[:, None, :, None]  # (batch, 1, context, 1)
        visible = tf.range(self.context)[None, None, :] <= positions[:, :, None]  # (batch, n, context)
        scale = 1.0 / math.sqrt(float(self.head_dim))
        caches = []

        def cached(i, q, k, v):
            keys = cache[i, 0] * (1.0 - written) + tf.einsum("btc,bthd->bhcd", slots, tf.cast(k, tf.float32))
            values = cache[i, 1] * (1.0 - written) + tf.einsum("btc,bthd->bhcd", slots, tf.cast(v, tf.float32))
            caches.append(tf.stack([keys, values]))
            # query heads in groups of num_heads // kv_heads, each group reading its one cached head
            groups = q.shape[2] // self.kv_heads
            qg = tf.reshape(tf.cast(q, tf.float32) * scale, [tf.shape(q)[0], tf.shape(q)[1], self.kv_heads, groups,
                                                             self.head_dim])
            scores = tf.where(visible[:, None, None], tf.einsum("btkgd,bkcd->bkgtc", qg, keys), -1e9)
            out = tf.einsum("bkgtc,bkcd->btkgd", tf.nn.softmax(scores, axis=-1), values)
            return tf.cast(tf.reshape(out, tf.shape(q)), q.dtype)

        logits = self.plan.decode(self.params, tokens, positions, cached)
        return tf.cast(logits, tf.float32), tf.stack(caches)

    def _propose(self, tokens, start, cache, lengths, k, temperature, top_k, seed):
        """The draft's side of speculative decoding in one call: encode ``tokens`` (right-padded; row b has
        ``lengths[b]``), then draw ``k`` bytes one by one (greedy at temperature 0, else sampled with stateless
        random ops from ``seed``). Returns ``(proposals (batch, k), their distributions (batch, k, vocabulary),
        cache)``; the last proposal is not encoded."""
        import tensorflow as tf

        logits, cache = self._extend(tokens, start, cache)
        last = tf.gather(logits, lengths - 1, batch_dims=1)
        batch = tf.shape(tokens)[0]
        chosen = tf.TensorArray(tf.int32, size=k)
        dists = tf.TensorArray(tf.float32, size=k)

        def body(i, last, cache, chosen, dists):
            probs = tf.cond(temperature > 0, lambda: distribution(last, temperature, top_k, self.vocab),
                            lambda: tf.one_hot(tf.argmax(last, -1), self.vocab))
            token = tf.cond(
                temperature > 0,
                lambda: tf.cast(tf.random.stateless_categorical(tf.math.log(probs + 1e-30), 1,
                                                               seed=seed + tf.cast(tf.stack([0, i]), tf.int64))[:, 0],
                                tf.int32),
                lambda: tf.argmax(last, -1, output_type=tf.int32))
            chosen, dists = chosen.write(i, token), dists.write(i, probs)
            nxt, cache = self._extend(token[:, None], start + lengths + i, cache)
            return i + 1, nxt[:, 0], cache, chosen, dists

        _, _, cache, chosen, dists = tf.while_loop(lambda i, *_: i < k, body, [tf.constant(0), last, cache, chosen,
                                                                               dists])
        proposals = tf.transpose(tf.reshape(chosen.stack(), [k, batch]))
        return proposals, tf.transpose(dists.stack(), [1, 0, 2]), cache


class Session:
    """Rows being decoded with a :class:`CachedDecoder`: their tokens and what the cache holds of them.

    Row ``b``'s tokens ``tokens[b][offset[b] : offset[b] + done[b]]`` have their keys in the cache at positions
    ``0 .. done[b] - 1``.
    """

    def __init__(self, decoder: CachedDecoder, prompts: list[list[int]]):
        self.decoder = decoder
        self.tokens = [list(p) for p in prompts]
        self.cache = decoder.empty_cache(len(prompts))
        self.done = [0] * len(prompts)
        self.offset = [0] * len(prompts)
        self.slides = 0

    def advance(self, extra: list[list[int]] | None = None) -> list[np.ndarray]:
        """Encode every row's tokens not yet in the cache, then ``extra[b]`` (proposals: in the cache after its
        tokens, but not added to them); returns each row's logits for those positions (the last row of each
        predicts what follows)."""
        import tensorflow as tf

        extra = extra or [[] for _ in self.tokens]
        c = self.decoder.context
        for b, row in enumerate(self.tokens):
            if len(row) - self.offset[b] <= self.done[b] and not extra[b]:
                self.done[b] = len(row) - self.offset[b] - 1  # nothing new: the last token again, for its logits
            pending = len(row) - self.offset[b] - self.done[b] + len(extra[b])
            if self.done[b] + pending > c:
                # slide: a first prompt longer than the context keeps its last `context` bytes (as the full window
                # does); a full cache keeps the last half of the context, encoded again from position 0
                keep = c if self.done[b] == 0 else max(len(extra[b]) + 1, c // 2)
                self.offset[b] = len(row) - (keep - len(extra[b]))
                self.slides += self.done[b] > 0
                self.done[b] = 0
        news = [row[self.offset[b] + self.done[b]:] + extra[b] for b, row in enumerate(self.tokens)]
        width = max(len(n) for n in news)
        padded = np.zeros((len(news), width), np.int32)
        for b, n in enumerate(news):
            padded[b, : len(n)] = n
        logits, self.cache = self.decoder.extend(tf.constant(padded), tf.constant(self.done, tf.int32), self.cache)
        logits = logits.numpy()
        for b, n in enumerate(news):
            self.done[b] += len(n) - len(extra[b])
        return [logits[b, : len(n)] for b, n in enumerate(news)]

    def propose(self, k: int, temperature: float, top_k: int, rng: np.random.Generator):
        """Encode every row's new tokens and draw ``k`` proposals per row in one call of the decoder; returns
        ``(proposals (batch, k), distributions (batch, k, vocabulary))``. The proposals join the rows' tokens; all
        but the last are in the cache."""
        import tensorflow as tf

        c = self.decoder.context
        for b, row in enumerate(self.tokens):
            if len(row) - self.offset[b] <= self.done[b]:
                self.done[b] = len(row) - self.offset[b] - 1
            if len(row) - self.offset[b] + k - 1 > c:  # slide, keeping room for the proposals
                self.offset[b] = len(row) - max(1, c // 2 - k)
                self.slides += self.done[b] > 0
                self.done[b] = 0
        news = [row[self.offset[b] + self.done[b]:] for b, row in enumerate(self.tokens)]
        padded = np.zeros((len(news), max(len(n) for n in news)), np.int32)
        for b, n in enumerate(news):
            padded[b, : len(n)] = n
        seed = rng.integers(0, 2**31 - 1, size=2)
        proposals, dists, self.cache = self.decoder.propose(
            tf.constant(padded), tf.constant(self.done, tf.int32), self.cache,
            tf.constant([len(n) for n in news], tf.int32), tf.constant(k, tf.int32),
            tf.constant(float(temperature), tf.float32), tf.constant(int(top_k), tf.int32), tf.constant(seed, tf.int64))
        proposals = proposals.numpy()
        for b, n in enumerate(news):
            self.done[b] += len(n) + k - 1
            self.tokens[b].extend(int(t) for t in proposals[b])
        return proposals, dists.numpy().astype(np.float64)

    def keep(self, b: int, kept: int) -> None:
        """Row ``b`` keeps only its first ``kept`` tokens; the cache keeps what it has of them."""
        self.tokens[b] = self.tokens[b][:kept]
        self.done[b] = min(self.done[b], max(0, kept - self.offset[b]))


def sample_cached(model, prompts: list, max_tokens: int, temperature: float = 0.8, top_k: int = 40,
                  seed: int = 0, decoder: CachedDecoder | None = None, stats: Stats | None = None) -> list[list[int]]:
    """``max_tokens`` tokens after each prompt (a sequence of token ids; ``bytes`` for a byte-level model), decoded
    with the key-value cache.

    The rules are :func:`hvdtrain.serving.generate.sample`'s (an empty prompt starts from a newline; temperature 0 is
    greedy); each row has its own generator seeded with ``seed``, so a row's text does not depend on the others.
    """
    check_args(max_tokens, temperature)
    decoder = decoder or CachedDecoder(model)
    rngs = [np.random.default_rng(seed) for _ in prompts]
    session = Session(decoder, [list(p) or [ord("\n")] for p in prompts])
    starts = [len(p) if p else 1 for p in prompts]
    for _ in range(max_tokens):
        for b, row in enumerate(session.advance()):
            session.tokens[b].append(choose(row[-1], temperature, top_k, rngs[b]))
    if stats is not None:
        stats.rows = len(prompts)
        stats.model_calls += max_tokens
        stats.generated += max_tokens * len(prompts)
        stats.slides += session.slides
    return [list(row[s:]) for row, s in zip(session.tokens, starts)]
