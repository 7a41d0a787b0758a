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
        shard: instead of ``model``, a tensor-parallel member's part of one: ``(plan, params, group)``, its slices
            of the plan's weights by name and its tensor group (:func:`shard_of`). The member caches its own
            key-value heads; the logits it returns are the whole vocabulary's (gathered over the group), so every
            member runs the same calls in the same order.
    """

    def __init__(self, model=None, shard=None):
        import tensorflow as tf

        import models
        from models.plan import keras_variables

        self.group, self.ctx = None, None
        if shard is None:
            self.context, self.vocab = check_model(model)
            plan = models.plan_of(model)
            if plan is None or plan.decode is None:
                raise UsageError(f"the model '{model.name}' is not a language model of a registered family "
                                 f"({', '.join(models.language_models())}): generate and export need one")
            self.params = keras_variables(model, plan)
        else:
            from hvdtrain.distributed.tensor import TensorContext

            plan, self.params, self.group = shard
            if plan.decode is None:
                raise UsageError(f"the model '{plan.family}' has no cached decoder at this layout (a LoRA run: merge "
                                 "its adapters first, hvdtrain export --format huggingface --merge)")
            self.context, self.vocab = plan.activation[0], plan.vocabulary
            self.ctx = TensorContext(self.group, tf.float32, False)
        self.plan = plan
        self.layers, kv_heads, self.head_dim = plan.cache
        self.kv_heads = kv_heads // (self.group.size if self.group is not None else 1)
        cache_spec = tf.TensorSpec([self.layers, 2, None, self.kv_heads, self.context, self.head_dim], tf.float32)
        self.extend = tf.function(self._extend, input_signature=[
            tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32), cache_spec])
        self.propose = tf.function(self._propose, input_signature=[
            tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32), cache_spec,
            tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32), tf.TensorSpec([None], tf.float32),
            tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, None], tf.float32)])

    def whole(self, logits):
        """The whole vocabulary's logits from this member's slice (the logits themselves in one process)."""
        if self.group is None:
            return logits
        import tensorflow as tf

        from hvdtrain.distributed.tensor import gather_vocabulary

        shape = tf.shape(logits)
        flat = gather_vocabulary(tf.reshape(logits, [-1, shape[-1]]), self.group)
        return tf.reshape(flat, tf.concat([shape[:-1], [self.vocab]], 0))

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

        logits = self.plan.decode(self.params, tokens, positions, cached, self.ctx)
        return self.whole(tf.cast(logits, tf.float32)), tf.stack(caches)

    def _propose(self, tokens, start, cache, lengths, k, temperature, top_k, noise):
        """The draft's side of speculative decoding in one call: encode ``tokens`` (right-padded; row b has
        ``lengths[b]``), then draw ``k`` tokens one by one, row b greedy at ``temperature[b] == 0``, else sampled
        under its temperature and ``top_k[b]`` by inverting the distribution's cumulative sum at ``noise[b, i]``
        (uniform draws of the row's own generator, so a row's proposals do not depend on the other rows). Returns
        ``(proposals (batch, k), their distributions (batch, k, vocabulary), cache)``; the last proposal is not
        encoded."""
        import tensorflow as tf

        logits, cache = self._extend(tokens, start, cache)
        last = tf.gather(logits, lengths - 1, batch_dims=1)
        batch = tf.shape(tokens)[0]
        chosen = tf.TensorArray(tf.int32, size=k)
        dists = tf.TensorArray(tf.float32, size=k)
        sampled = temperature > 0

        def body(i, last, cache, chosen, dists):
            greedy = tf.argmax(last, -1, output_type=tf.int32)
            probs = tf.where(sampled[:, None], distribution(last, tf.where(sampled, temperature, 1.0), top_k,
                                                            self.vocab),
                             tf.one_hot(greedy, self.vocab))
            below = tf.reduce_sum(tf.cast(tf.cumsum(probs, axis=-1) < noise[:, i, None], tf.int32), axis=-1)
            token = tf.where(sampled, tf.minimum(below, self.vocab - 1), greedy)
            chosen, dists = chosen.write(i, token), dists.write(i, probs)
            nxt, cache = self._extend(token[:, None], start + lengths + i, cache)
            return i + 1, nxt[:, 0], cache, chosen, dists

        _, _, cache, chosen, dists = tf.while_loop(lambda i, *_: i < k, body, [tf.constant(0), last, cache, chosen,
                                                                               dists])
        proposals = tf.transpose(tf.reshape(chosen.stack(), [k, batch]))
        return proposals, tf.transpose(dists.stack(), [1, 0, 2]), cache


class SlotCache:
    """The key-value caches of a fixed number of sequences (*slots*) for continuous batching: each call runs some
    slots' new tokens at their positions and writes their keys and values into those slots alone, so sequences
    join and leave between calls. One variable holds every slot (``(slots, layers, 2, key-value heads, context,
    head size)``); a call gathers its slots' rows, extends them and scatters them back.

    The calls take and return NumPy arrays (rows right-padded; ``lengths`` the real tokens of each):
    ``last(tokens, start, slots, lengths)`` the logits after each row's last token, ``(rows, vocabulary)``;
    ``score(tokens, start, slots)`` the logits at every position, ``(rows, n, vocabulary)``;
    ``propose(tokens, start, slots, lengths, k, temperature, top_k, noise)`` a draft's ``k`` proposals per row
    (:meth:`CachedDecoder._propose`).
    """

    def __init__(self, decoder: CachedDecoder, slots: int):
        import tensorflow as tf

        self.decoder, self.slots = decoder, slots
        d = decoder
        self.pool = tf.Variable(tf.zeros([slots, d.layers, 2, d.kv_heads, d.context, d.head_dim]), trainable=False,
                                name="kv_slots")
        ints = [tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32)]
        self._last = tf.function(self._run_last, input_signature=ints + [tf.TensorSpec([None], tf.int32)])
        self._score = tf.function(self._run_score, input_signature=ints)
        self._propose = tf.function(self._run_propose, input_signature=ints + [
            tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32), tf.TensorSpec([None], tf.float32),
            tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, None], tf.float32)])

    def _rows(self, slots):
        import tensorflow as tf

        return tf.transpose(tf.gather(self.pool, slots), [1, 2, 0, 3, 4, 5])  # the decoder's cache layout

    def _keep(self, slots, rows) -> None:
        import tensorflow as tf

        self.pool.scatter_nd_update(slots[:, None], tf.transpose(rows, [2, 0, 1, 3, 4, 5]))

    def _run_last(self, tokens, start, slots, lengths):
        import tensorflow as tf

        logits, rows = self.decoder._extend(tokens, start, self._rows(slots))
        self._keep(slots, rows)
        return tf.gather(logits, lengths - 1, batch_dims=1)

    def _run_score(self, tokens, start, slots):
        logits, rows = self.decoder._extend(tokens, start, self._rows(slots))
        self._keep(slots, rows)
        return logits

    def _run_propose(self, tokens, start, slots, lengths, k, temperature, top_k, noise):
        proposals, dists, rows = self.decoder._propose(tokens, start, self._rows(slots), lengths, k, temperature,
                                                       top_k, noise)
        self._keep(slots, rows)
        return proposals, dists

    def last(self, tokens, start, slots, lengths) -> np.ndarray:
        return self._last(tokens, start, slots, lengths).numpy()

    def score(self, tokens, start, slots) -> np.ndarray:
        return self._score(tokens, start, slots).numpy()

    def propose(self, tokens, start, slots, lengths, k, temperature, top_k, noise) -> tuple[np.ndarray, np.ndarray]:
        proposals, dists = self._propose(tokens, start, slots, lengths, np.int32(k), temperature, top_k, noise)
        return proposals.numpy(), dists.numpy().astype(np.float64)


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
        rows = len(news)
        proposals, dists, self.cache = self.decoder.propose(
            tf.constant(padded), tf.constant(self.done, tf.int32), self.cache,
            tf.constant([len(n) for n in news], tf.int32), tf.constant(k, tf.int32),
            tf.fill([rows], float(temperature)), tf.fill([rows], int(top_k)),
            tf.constant(rng.random((rows, k)), tf.float32))
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
