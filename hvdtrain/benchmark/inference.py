"""Generation speed side by side: the full window recomputed per byte, the key-value cache, and speculative
decoding with a draft, for each batch size, interleaved and repeated, in one process.

``hvdtrain benchmark --inference --model RUN [--draft STUDENT] --batch 1,8 --max-tokens 256``: every repeat runs
each (method, batch) once, in an order that rotates between repeats, after one untimed warm-up run of each (graph
tracing). Reported: bytes generated per second (over all rows), the median over repeats and its ratio to the full
window; for speculative decoding also the acceptance rate and bytes per large-model call.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

from hvdtrain import artifacts, console
from hvdtrain.benchmark import machine, progress
from hvdtrain.errors import UsageError

PROMPT = b"The for statement is used to iterate over the elements of a sequence"


def run(model_path: str, draft_path: str | None, batches: list[int], max_tokens: int, repeats: int,
        temperature: float, draft_tokens: int, methods: list[str]) -> dict[str, Any]:
    """Time each method at each batch size; returns the report."""
    from hvdtrain import formats
    from hvdtrain.serving import decoding, generate, speculative

    model = formats.load_model(model_path)
    draft = formats.load_model(draft_path) if draft_path else None
    if "speculative" in methods and draft is None:
        raise UsageError("speculative decoding needs --draft STUDENT (e.g. a student from compress --method distill)")
    context, _ = decoding.check_model(model)
    prompt = PROMPT[: max(1, context // 4)]
    settings = [(m, b) for m in methods for b in batches]
    decoders = (decoding.CachedDecoder(model), decoding.CachedDecoder(draft) if draft is not None else None)

    def once(method: str, batch: int, tokens: int) -> tuple[float, dict]:
        prompts = [prompt] * batch
        stats = decoding.Stats(rows=batch)
        start = time.perf_counter()
        if method == "speculative":
            speculative.sample_speculative(model, draft, prompts, tokens, temperature, 40, 0, draft_tokens, stats,
                                        decoders)
        elif method == "cached":
            decoding.sample_cached(model, prompts, tokens, temperature, 40, 0, decoders[0], stats)
        else:
            for p in prompts:  # the full window takes one prompt at a time
                generate.sample(model, p, tokens, temperature, 40, 0)
            stats.model_calls, stats.generated = tokens * batch, tokens * batch
        return time.perf_counter() - start, stats.as_dict()

    for method, batch in settings:  # warm-up: tracing and first calls
        once(method, batch, 4)
    samples: dict[tuple[str, int], list[float]] = {s: [] for s in settings}
    details: dict[tuple[str, int], dict] = {}
    for repeat in range(repeats):
        order = settings[repeat % len(settings):] + settings[: repeat % len(settings)]
        for method, batch in order:
            progress(f"repeat {repeat + 1}/{repeats}: {method}, batch {batch} ...")
            seconds, stats = once(method, batch, max_tokens)
            samples[(method, batch)].append(batch * max_tokens / seconds)
            details[(method, batch)] = stats
    rows = []
    for method, batch in settings:
        full = samples.get(("full", batch))
        value = statistics.median(samples[(method, batch)])
        rows.append({"method": method, "batch": batch, "bytes_per_sec": value,
                     "bytes_per_sec_all": samples[(method, batch)],
                     "vs_full": value / statistics.median(full) if full else None, **details[(method, batch)]})
    return {"kind": "inference", "model": model_path, "draft": draft_path, "context_length": context,
            "max_tokens": max_tokens, "temperature": temperature, "draft_tokens": draft_tokens,
            "prompt_bytes": len(prompt), "machine": machine(), "results": rows,
            "method": f"bytes generated per second over all rows, median of {repeats} interleaved repeats after one "
                      "warm-up run of each setting; one process on the CPU"}


def print_report(report: dict[str, Any]) -> None:
    """A table for people."""
    cols = ["method", "batch", "bytes_per_sec", "vs_full", "acceptance_rate", "tokens_per_model_call"]
    console.say(artifacts.format_table(report["results"], cols))


def plot(report: dict[str, Any], run_dir) -> list[str]:
    """``benchmark.png``: bytes per second of each method, per batch size."""
    plt = artifacts.pyplot()
    methods = list(dict.fromkeys(r["method"] for r in report["results"]))
    batches = sorted({r["batch"] for r in report["results"]})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        values = [next((r["bytes_per_sec"] for r in report["results"] if r["method"] == m and r["batch"] == b), 0)
                  for b in batches]
        ax.bar([x + i * width for x in range(len(batches))], values, width, label=m)
    ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(batches))])
    ax.set_xticklabels([f"batch {b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("bytes / s (log)")
    ax.set_title(f"{report['max_tokens']} bytes at context {report['context_length']}")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    run_dir.save_figure(fig, "benchmark.png")
    return ["benchmark.png"]
