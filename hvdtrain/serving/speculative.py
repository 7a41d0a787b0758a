"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023). A small draft model proposes ``k`` tokens one
by one; the large model scores all of them in one ``extend``; each proposal is accepted with probability
``min(1, p(x) / q(x))`` and the first rejected one is replaced by a sample of ``max(0, p - q)`` renormalised; when
all are accepted one more token is sampled from ``p``. The tokens then follow exactly the large model's distribution
(greedy: exactly its greedy text), and each large-model call yields between 1 and ``k + 1`` tokens.
"""
from __future__ import annotations

import numpy as np

from hvdtrain.serving.decoding import CachedDecoder, Session, Stats
from hvdtrain.errors import UsageError
from hvdtrain.serving.sampling import check_args, choose, transform


def sample_speculative(model, draft, prompts: list, max_tokens: int, temperature: float = 0.8,
                       top_k: int = 40, seed: int = 0, k: int = 4, stats: Stats | None = None,
                       decoders: tuple[CachedDecoder, CachedDecoder] | None = None) -> list[list[int]]:
    """``max_tokens`` tokens after each prompt from ``model``, with ``draft`` proposing ``k`` tokens at a time
    (the draft must share the model's tokenizer).

    The output follows ``model``'s distribution exactly (the acceptance rule of the module doc); at temperature 0
    it is ``model``'s greedy text (the same as :func:`hvdtrain.serving.decoding.sample_cached`'s at any length).
    """
    check_args(max_tokens, temperature)
    if k < 1:
        raise UsageError("--draft-tokens must be at least 1")
    target_dec, draft_dec = decoders or (CachedDecoder(model), CachedDecoder(draft))
    if draft_dec.vocab != target_dec.vocab:
        raise UsageError(f"the draft model has {draft_dec.vocab} outputs, the model {target_dec.vocab}; they must "
                         "share the vocabulary (distill the draft from this model)")
    stats = stats if stats is not None else Stats()
    stats.rows = len(prompts)
    rng = np.random.default_rng(seed)
    rows = [list(p) or [ord("\n")] for p in prompts]
    starts = [len(p) if p else 1 for p in prompts]
    target, proposer = Session(target_dec, rows), Session(draft_dec, rows)
    goal = [s + max_tokens for s in starts]
    context = target_dec.context
    while any(len(row) < g for row, g in zip(target.tokens, goal)):
        base = [len(row) for row in target.tokens]
        # proposals must fit the model's window beside every row's bytes: near its end, propose fewer; with no
        # room, take one plain step, which slides the window exactly as plain cached decoding does (so greedy
        # text is the same as plain decoding's at any length)
        room = min(context - (len(row) - off) for row, off, g in zip(target.tokens, target.offset, goal)
                   if len(row) < g)
        steps = min(k, room - 1)
        if steps < 1:
            scored = target.advance()
            stats.model_calls += 1
            for b, row in enumerate(scored):
                if base[b] < goal[b]:
                    token = choose(row[-1], temperature, top_k, rng)
                    target.tokens[b].append(token)
                    proposer.tokens[b].append(token)
                    stats.generated += 1
            continue
        # the draft proposes `steps` bytes per row, all in one call; the model scores every proposal and one more
        # position, in one call
        drafted, q = proposer.propose(steps, temperature, top_k, rng)
        proposals = [[int(t) for t in row] for row in drafted]
        stats.draft_calls += 1
        scored = target.advance(proposals)
        stats.model_calls += 1
        for b in range(len(rows)):
            accepted, kept = 0, []
            if base[b] < goal[b]:
                logits = scored[b][-(steps + 1):]  # predicting proposal 1..steps, then the byte after them
                for i, token in enumerate(proposals[b]):
                    stats.proposed += 1
                    if temperature == 0:
                        best = int(np.argmax(logits[i]))
                        ok = best == token
                    else:
                        p = transform(logits[i], temperature, top_k)
                        ok = rng.random() < min(1.0, p[token] / q[b, i, token])
                    if ok:
                        kept.append(token)
                        accepted += 1
                        continue
                    if temperature == 0:
                        kept.append(best)
                    else:
                        residual = np.maximum(p - q[b, i], 0.0)
                        total = residual.sum()  # zero only if p == q, where rejection cannot happen
                        kept.append(int(rng.choice(len(p), p=residual / total)) if total > 0 else
                                    choose(logits[i], temperature, top_k, rng))
                    break
                else:  # every proposal accepted: one more byte from the model
                    kept.append(choose(logits[steps], temperature, top_k, rng))
                stats.accepted += accepted
                kept = kept[: goal[b] - base[b]]
                stats.generated += len(kept)
            # both caches hold the prefix and the accepted proposals; what follows is overwritten later
            proposer.keep(b, base[b] + accepted)
            proposer.tokens[b][base[b]:] = kept
            target.tokens[b][base[b]:] = kept
            target.done[b] = min(base[b] + accepted, len(target.tokens[b])) - target.offset[b]
    stats.slides += target.slides + proposer.slides
    return [list(row[s: s + max_tokens]) for row, s in zip(target.tokens, starts)]
