"""Continuous batching: one loop decodes every running sequence, and sequences join and leave it between steps.

Iteration-level scheduling (Orca, Yu et al., OSDI 2022; vLLM and TGI schedule the same way): the loop owns a fixed
number of key-value cache slots (:class:`~hvdtrain.serving.decoding.SlotCache`). At each iteration it

1. drops the sequences whose client went away, freeing their slots at once;
2. admits waiting sequences into free slots: each prompt is prefilled in one call of its own, and its first token
   sampled (the prompt's tokens of one iteration are bounded, so a burst of arrivals does not stall the running
   sequences for long);
3. runs one decoding step for every sequence admitted before this iteration: their last tokens in one call, each
   at its own position in its own slot; with a draft model, a speculative step instead (the draft proposes
   ``k`` tokens per sequence in one call, the model scores them in one call, each sequence keeps what its own
   acceptance test keeps: :mod:`hvdtrain.serving.speculative`'s rule);
4. samples each sequence's token from its own row with its own parameters and its own generator, turns tokens into
   text (incremental detokenization; stop strings), and hands each sequence's new text to its client; a
   sequence that ends (its end-of-sequence token, a stop string, ``max_tokens``, the context) frees its slot.

A sequence's tokens do not depend on what runs beside it: its row of each call is computed from its own tokens and
cache, and every random draw comes from its generator (seeded by the request's ``seed``), so its greedy text is
``hvdtrain generate``'s and a seeded sample is the same whatever else is in the batch (tested).

Across a tensor group (:class:`Lockstep`): rank 0 runs the loop and sends each call to the other members first;
every member runs it on its slices (the logits come back whole on each), so the group decodes as one process does.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from hvdtrain.serving.sampling import choose, penalized, transform


@dataclass(frozen=True)
class Params:
    """A sequence's sampling parameters (the OpenAI API's names; ``top_k`` 0: every token)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False  # vLLM's extension, for benchmarks: generate max_tokens whatever comes


@dataclass
class Update:
    """What a sequence gives its client after a step: new text, the tokens it came from, and why it ended."""

    text: str
    tokens: int
    finish: str | None = None  # "stop", "length", or "cancelled"


class TextStream:
    """Token ids to text as they come (vLLM's incremental detokenization): a token's text is what decoding a short
    window ending with it adds to decoding the window without it, so tokenizers that strip a leading space or merge
    bytes into characters give the text decoding all ids at once gives; a token that ends inside a character waits
    for the next. Text that may be the start of a stop string is held back until it is known not to be."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.prefix = self.read = 0
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def add(self, token: int) -> bool:
        """Add a token; True when the text now holds a stop string (the text is cut before it)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], special=False)
        after = self.tokenizer.decode(self.ids[self.prefix:], special=False)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            start = max(0, len(self.text) - self.hold)
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            for s in self.stop:
                at = self.text.find(s, start)
                if at >= 0:
                    self.text = self.text[:at]
                    return True
        return False

    def flush(self, final: bool) -> str:
        """The text not yet given out; without ``final``, less what may begin a stop string."""
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent:end]
        self.sent = end
        return out


class Sequence:
    """One completion being generated: its prompt, parameters, generator, slot and output so far.

    ``deliver(update)`` is called from the engine's thread after every step that gave it tokens, and once at its
    end (``update.finish`` set)."""

    def __init__(self, prompt: list[int], params: Params, deliver: Callable[[Update], None], tokenizer,
                 seed_stream: int = 0):
        self.prompt, self.params, self.deliver = list(prompt), params, deliver
        seed = params.seed
        # choice 0 of a seeded request draws as `hvdtrain generate --seed` does; the others each their own stream
        self.rng = np.random.default_rng(None if seed is None else seed if seed_stream == 0 else (seed, seed_stream))
        self.tokens = list(prompt)  # the prompt, then the generated tokens
        self.counts: dict[int, int] = collections.Counter()
        self.stream = TextStream(tokenizer, params.stop)
        self.slot: int | None = None
        self.encoded = 0  # tokens of prompt + generated whose keys the model's cache holds
        self.draft_encoded = 0  # the same for the draft's cache
        self.finish: str | None = None
        self.cancelled = False
        self.arrival = time.perf_counter()
        self.first = self.last = 0.0

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def generated_count(self) -> int:
        return len(self.tokens) - len(self.prompt)


@dataclass
class Lockstep:
    """Rank 0's decoder calls, run by every member of a tensor group in the same order (each on its slices).

    ``calls``: name -> function of NumPy arrays. Rank 0 calls ``lockstep(name, *args)``: the call goes to the other
    members first (a broadcast over the group), then runs here; the others run :meth:`follow` until rank 0's
    :meth:`stop`. ``local``: calls rank 0 runs alone (a draft model, whole on rank 0)."""

    group: object | None
    calls: dict[str, Callable]
    local: dict[str, Callable] = field(default_factory=dict)

    def __call__(self, name: str, *args):
        if name in self.local:
            return self.local[name](*args)
        if self.group is not None and self.group.size > 1:
            self.group.broadcast_object((name, args))
        return self.calls[name](*args)

    def follow(self) -> None:
        while True:
            name, args = self.group.broadcast_object(None)
            if name is None:
                return
            self.calls[name](*args)

    def stop(self) -> None:
        if self.group is not None and self.group.size > 1:
            self.group.broadcast_object((None, ()))


class Full(Exception):
    """The queue of waiting sequences is full."""


@dataclass
class Stats:
    """What the loop has done, for its log lines."""

    steps: int = 0
    prefills: int = 0
    generated: int = 0
    prompt_tokens: int = 0
    proposed: int = 0
    accepted: int = 0
    finished: collections.Counter = field(default_factory=collections.Counter)


class Engine:
    """The continuous-batching loop (see the module doc), run by a thread of its own.

    Args:
        call: the decoder calls (:class:`Lockstep` over a :class:`~hvdtrain.serving.decoding.SlotCache`'s
            ``last``, ``score``, and the draft's ``draft_last``, ``draft_propose``).
        context: the model's window in tokens.
        slots: sequences decoded at once.
        eos: end-of-sequence ids.
        max_queue: sequences that may wait for a slot; more are refused (:class:`Full`).
        draft_tokens: with a draft (``call`` has ``draft_propose``), the tokens it proposes per step.
        prefill_tokens: prompt tokens prefilled per iteration at most (at least one prompt is).
        metrics: a :class:`hvdtrain.serving.metrics.Metrics` or None.
    """

    def __init__(self, call: Lockstep, context: int, slots: int, eos: tuple[int, ...], max_queue: int = 256,
                 draft_tokens: int = 0, prefill_tokens: int = 0, metrics=None):
        self.call, self.context, self.slots, self.eos = call, context, slots, set(eos)
        self.max_queue, self.draft_tokens = max_queue, draft_tokens
        self.prefill_tokens = prefill_tokens or context
        self.metrics = metrics
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.free = list(range(slots))[::-1]
        self.cond = threading.Condition()
        self.stopping = False
        self.error: BaseException | None = None
        self.stats = Stats()
        self.thread = threading.Thread(target=self._main, name="hvdtrain-engine", daemon=True)

    # -- the clients' side (any thread) ------------------------------------------------------------------------

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue ``sequences`` (all or none); :class:`Full` when the queue cannot take them."""
        with self.cond:
            if self.stopping or self.error is not None:
                raise Full("the server is shutting down")
            if len(self.waiting) + len(sequences) > self.max_queue + len(self.free):  # free slots: taken next
                raise Full(f"{len(self.waiting)} sequences are waiting for a slot (--max-queue {self.max_queue})")
            self.waiting.extend(sequences)
            self._gauges()
            self.cond.notify()

    def cancel(self, sequences) -> None:
        """Stop ``sequences`` (their client went away): their slots are freed before the next step."""
        with self.cond:
            for seq in sequences:
                if seq.finish is None:
                    seq.cancelled = True
            self.cond.notify()

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Let the sequences in flight finish (new ones are refused), then end the loop."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    # -- the loop (the engine's thread) ------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            while self._iteration():
                pass
        except BaseException as exc:  # noqa: BLE001 - every client is told; the server reports it
            self.error = exc
            with self.cond:
                for seq in list(self.waiting) + self.running:
                    self._end(seq, "error")
                self.waiting.clear()
                self.running.clear()
            raise

    def _iteration(self) -> bool:
        with self.cond:
            while not (self.waiting or self.running or self.stopping):
                self.cond.wait()
            if self.stopping and not self.waiting and not self.running:
                return False
            for seq in [s for s in self.running if s.cancelled]:
                self._end(seq, "cancelled")
                self._release(seq)
            for seq in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(seq)
                self._end(seq, "cancelled")
            stepping = list(self.running)
            admitted, budget = [], self.prefill_tokens
            while self.waiting and self.free and (not admitted or len(self.waiting[0].prompt) <= budget):
                seq = self.waiting.popleft()
                seq.slot = self.free.pop()
                budget -= len(seq.prompt)
                admitted.append(seq)
                self.running.append(seq)
            self._gauges()
        for seq in admitted:
            self._prefill(seq)
        if stepping:
            if self.draft_tokens:
                self._speculative_step(stepping)
            else:
                self._step(stepping)
        with self.cond:
            for seq in [s for s in self.running if s.finish is not None]:
                self._release(seq)
            self._gauges()
        return True

    def _prefill(self, seq: Sequence) -> None:
        prompt = np.array([seq.prompt], np.int32)
        args = (prompt, np.zeros(1, np.int32), np.array([seq.slot], np.int32), np.array([len(seq.prompt)], np.int32))
        logits = self.call("last", *args)
        if self.draft_tokens:
            self.call("draft_last", *args)
            seq.draft_encoded = len(seq.prompt)
        seq.encoded = len(seq.prompt)
        self.stats.prefills += 1
        self.stats.prompt_tokens += len(seq.prompt)
        self._accept(seq, [self._sample(seq, logits[0])])

    def _step(self, rows: list[Sequence]) -> None:
        """One token for every row: its last token (not yet in its cache) at its position."""
        tokens = np.array([[seq.tokens[-1]] for seq in rows], np.int32)
        start = np.array([len(seq.tokens) - 1 for seq in rows], np.int32)
        logits = self.call("last", tokens, start, np.array([seq.slot for seq in rows], np.int32),
                           np.ones(len(rows), np.int32))
        self.stats.steps += 1
        for seq, row in zip(rows, logits):
            seq.encoded = len(seq.tokens)
            self._accept(seq, [self._sample(seq, row)])

    def _speculative_step(self, rows: list[Sequence]) -> None:
        """The draft proposes ``k`` tokens per row in one call, the model scores them in one; each row keeps its
        accepted proposals and one token more (a correction, or one after them all), as many as it has room for."""
        k = self.draft_tokens
        slots = np.array([seq.slot for seq in rows], np.int32)
        # the draft: each row's tokens it has not encoded yet, then k proposals
        news = [seq.tokens[seq.draft_encoded:] for seq in rows]
        temperature = np.array([seq.params.temperature for seq in rows], np.float32)
        noise = np.stack([seq.rng.random(k) if seq.params.temperature > 0 else np.zeros(k) for seq in rows])
        proposals, q = self.call("draft_propose", _padded(news), np.array([s.draft_encoded for s in rows], np.int32),
                                 slots, np.array([len(n) for n in news], np.int32), k, temperature,
                                 np.array([seq.params.top_k for seq in rows], np.int32), noise.astype(np.float32))
        for seq, n in zip(rows, news):
            seq.draft_encoded += len(n) + k - 1
        # the model: each row's unencoded token(s), then the proposals, in one call
        scored = [seq.tokens[seq.encoded:] + [int(t) for t in p] for seq, p in zip(rows, proposals)]
        logits = self.call("score", _padded(scored), np.array([s.encoded for s in rows], np.int32), slots)
        self.stats.steps += 1
        for b, seq in enumerate(rows):
            base = len(seq.tokens)
            room = min(seq.params.max_tokens - seq.generated_count, self.context - base)
            steps = max(0, min(k, room - 1))  # proposals this row may keep, besides one token of the model's
            first = len(scored[b]) - k - 1  # the logits after the row's last token
            kept: list[int] = []
            counts = dict(seq.counts)
            for i in range(steps):
                token = int(proposals[b, i])
                row = penalized(logits[b, first + i], counts, seq.params.presence_penalty,
                                seq.params.frequency_penalty, dict(seq.params.logit_bias))
                if seq.params.temperature == 0:
                    best = int(np.argmax(row))
                    if best == token:
                        kept.append(token)
                        counts[token] = counts.get(token, 0) + 1
                        continue
                    kept.append(best)
                    break
                p = transform(row, seq.params.temperature, seq.params.top_k, seq.params.top_p)
                if seq.rng.random() < min(1.0, p[token] / q[b, i, token]):
                    kept.append(token)
                    counts[token] = counts.get(token, 0) + 1
                    continue
                residual = np.maximum(p - q[b, i], 0.0)
                total = residual.sum()
                kept.append(int(seq.rng.choice(len(p), p=residual / total)) if total > 0 else
                            choose(row, seq.params.temperature, seq.params.top_k, seq.rng, seq.params.top_p))
                break
            else:  # every proposal it may keep was accepted: one token more from the model
                kept.append(self._sample(seq, logits[b, first + steps], counts))
            accepted = len(kept) - 1
            self.stats.proposed += steps
            self.stats.accepted += accepted
            if self.metrics is not None:
                self.metrics.speculated(steps, accepted)
            seq.encoded = base + accepted  # the accepted proposals are in the model's cache, the last token not
            seq.draft_encoded = min(seq.draft_encoded, base + accepted)
            self._accept(seq, kept)

    def _sample(self, seq: Sequence, logits: np.ndarray, counts: dict | None = None) -> int:
        p = seq.params
        row = penalized(logits, seq.counts if counts is None else counts, p.presence_penalty, p.frequency_penalty,
                        dict(p.logit_bias))
        return choose(row, p.temperature, p.top_k, seq.rng, p.top_p)

    def _accept(self, seq: Sequence, tokens: list[int]) -> None:
        """Append ``tokens`` to ``seq`` up to its end, and give its client the new text."""
        now = time.perf_counter()
        finish = None
        added = 0
        for token in tokens:
            if token in self.eos and not seq.params.ignore_eos:
                finish = "stop"
                break
            seq.tokens.append(token)
            seq.counts[token] += 1
            added += 1
            if seq.stream.add(token):
                finish = "stop"
                break
            if seq.generated_count >= seq.params.max_tokens or len(seq.tokens) >= self.context:
                finish = "length"
                break
        self.stats.generated += added
        if self.metrics is not None:
            self.metrics.tokens(seq, added, now)
        seq.first = seq.first or now
        seq.last = now
        if finish is not None:
            self._end(seq, finish, added)
        elif added:
            text = seq.stream.flush(final=False)
            seq.deliver(Update(text, added))

    def _end(self, seq: Sequence, finish: str, added: int = 0) -> None:
        """``seq`` is done: its client gets the rest of its text and the reason (its slot is freed by the loop)."""
        if seq.finish is not None:
            return
        seq.finish = finish
        self.stats.finished[finish] += 1
        if self.metrics is not None:
            self.metrics.finished(seq, finish)
        seq.deliver(Update(seq.stream.flush(final=True) if finish in ("stop", "length") else "", added, finish))
        if seq.slot is not None and seq not in self.running:
            self.free.append(seq.slot)
            seq.slot = None

    def _release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if seq.slot is not None:
            self.free.append(seq.slot)
            seq.slot = None

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.load(len(self.waiting), len(self.running))


def _padded(rows: list[list[int]]) -> np.ndarray:
    out = np.zeros((len(rows), max(len(r) for r in rows)), np.int32)
    for b, row in enumerate(rows):
        out[b, : len(row)] = row
    return out
