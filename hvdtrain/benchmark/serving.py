"""The server under load: N concurrent clients against one client at a time, through HTTP as users call it.

``hvdtrain benchmark --serving --model RUN [--draft STUDENT] --concurrency 1,4,16``: starts ``hvdtrain serve`` (and,
with ``--draft``, a second server with speculative decoding; or drives ``--url``), then for each repeat and each
concurrency N (the order rotating between repeats) runs a closed loop: N clients, each sending its next streamed
completion as soon as the last one ended, ``--requests`` in all, every prompt ``--prompt-tokens`` token ids of the
embedded corpus (each request its own), ``--max-tokens`` greedy tokens with the end of sequence ignored. Measured at
the client: output tokens per second over the loop (from the ``usage`` of each stream), time to first token, the gaps
between streamed chunks (inter-token latency), their p50 and p99; medians over repeats and ratios to N = 1.

Then a request arriving while the server is busy: with N - 1 long completions streaming, one more is sent and its
time to first token is compared with the running completions' inter-token gap at that moment (continuous batching
admits it at the next step; a server batching whole requests would make it wait for the batch to end).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from hvdtrain import artifacts, console
from hvdtrain.benchmark import machine, progress
from hvdtrain.errors import HvdtrainError, UsageError


def start_server(model: str, draft: str | None, slots: int, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """``hvdtrain serve`` on a free port of 127.0.0.1; returns the process and its base URL once it listens."""
    cmd = [sys.executable, "-m", "hvdtrain.cli", "serve", "--model", model, "--port", "0", "--slots", str(slots),
           "--max-queue", "4096"] + (["--draft", draft] if draft else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"at (http://\S+/v1)", line)
        if found:
            import threading

            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep the pipe drained
            return proc, found.group(1)
    proc.kill()
    raise HvdtrainError(f"hvdtrain serve did not start: {''.join(lines[-3:]).strip() or 'no output'}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


async def stream_one(client, url: str, name: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """One streamed completion: its time to first token, the gaps between its chunks, its tokens."""
    body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, tokens = [], 0
    async with client.stream("POST", f"{url}/completions", json=body) as response:
        if response.status_code != 200:
            raise HvdtrainError(f"the server answered {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    end = time.perf_counter()
    return {"ttft": times[0] - start if times else end - start, "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": tokens, "latency": end - start}


async def closed_loop(url: str, name: str, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    import httpx

    todo = list(prompts)
    results = []
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=concurrency + 1)) as client:
        async def worker():
            while todo:
                results.append(await stream_one(client, url, name, todo.pop(), max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - start
    gaps = sorted(g for r in results for g in r["gaps"])
    ttfts = sorted(r["ttft"] for r in results)
    return {"tokens_per_sec": sum(r["tokens"] for r in results) / wall, "requests": len(results),
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99),
            "latency_p50": percentile(sorted(r["latency"] for r in results), 50)}


async def late_arrival(url: str, name: str, prompts: list[list[int]], running: int, max_tokens: int) -> dict:
    """``running`` long completions streaming; then one more request: its time to first token, and the running
    ones' gap between chunks while it waited."""
    import httpx

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=running + 2)) as client:
        chunks: list[list[float]] = [[] for _ in range(running)]

        async def long(i):
            body = {"model": name, "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            async with client.stream("POST", f"{url}/completions", json=body) as response:
                if response.status_code != 200:
                    raise HvdtrainError(f"the server answered {response.status_code}: "
                                        f"{(await response.aread())[:200]!r}")
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        chunks[i].append(time.perf_counter())

        tasks = [asyncio.create_task(long(i)) for i in range(running)]
        while any(len(c) < 4 for c in chunks):  # every long one is decoding
            done = [t for t in tasks if t.done()]
            if done:
                await asyncio.gather(*done)  # a failure, said
                raise HvdtrainError("the long completions ended before the request arrived; raise --max-tokens")
            await asyncio.sleep(0.002)
        sent = time.perf_counter()
        probe = await stream_one(client, url, name, prompts[-1], 2)
        arrived = sent + probe["ttft"]
        gaps = sorted(b - a for c in chunks for a, b in zip(c, c[1:]) if sent - 1.0 <= a <= arrived)
        await asyncio.gather(*tasks)
    step = percentile(gaps, 50) if gaps else float("nan")
    return {"running": running, "ttft": probe["ttft"], "running_itl_p50": step, "ttft_in_steps": probe["ttft"] / step}


def speculation(url: str) -> tuple[float, float]:
    """The server's counts of draft proposals scored and kept so far (its ``/metrics``)."""
    import httpx

    text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    found = dict(re.findall(r"^hvdtrain_(draft|accepted)_tokens_total (\S+)$", text, re.M))
    return float(found.get("draft", 0)), float(found.get("accepted", 0))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, int(round(q / 100 * (len(values) - 1)))))
    return values[index]


def run(model: str, draft: str | None, url: str | None, levels: list[int], requests: int, prompt_tokens: int,
        max_tokens: int, repeats: int, slots: int) -> dict[str, Any]:
    """Every (server, concurrency) once per repeat, interleaved; returns the report."""
    from hvdtrain import formats
    from hvdtrain.data import text, tokenizer as tokenizers

    if min(levels) < 1 or requests < 1 or prompt_tokens < 1 or max_tokens < 1 or repeats < 1:
        raise UsageError("--concurrency, --requests, --prompt-tokens, --max-tokens and --repeats must be positive")
    formats.resolve(model)
    tok = tokenizers.load_beside(model)
    ids = tok.encode(text.embedded_corpus()[:400_000].decode("utf-8", "replace"))
    count = max(requests, max(levels) + 1)
    stride = max(1, (len(ids) - prompt_tokens) // count)
    prompts = [ids[i * stride: i * stride + prompt_tokens] for i in range(count)]
    servers: dict[str, tuple[subprocess.Popen | None, str]] = {}
    try:
        if url:
            servers["server"] = (None, url.rstrip("/"))
        else:
            progress("starting hvdtrain serve ...")
            servers["plain"] = start_server(model, None, slots)
            if draft:
                servers["speculative"] = start_server(model, draft, slots)
        import httpx

        cards = {key: httpx.get(f"{base}/models").json()["data"][0] for key, (_, base) in servers.items()}
        names = {key: card["id"] for key, card in cards.items()}
        context = min(card.get("max_model_len", 1 << 30) for card in cards.values())
        if prompt_tokens + max_tokens > context:
            raise UsageError(f"--prompt-tokens {prompt_tokens} + --max-tokens {max_tokens} exceed the model's context "
                             f"of {context} tokens")
        long_tokens = context - prompt_tokens
        settings = [(key, n) for key in servers for n in levels]
        for key, n in settings:  # warm-up: every server traces its calls at this batch size
            asyncio.run(closed_loop(servers[key][1], names[key], prompts[:n], n, 4))
        samples: dict[tuple[str, int], list[dict]] = {s: [] for s in settings}
        for repeat in range(repeats):
            order = settings[repeat % len(settings):] + settings[: repeat % len(settings)]
            for key, n in order:
                progress(f"repeat {repeat + 1}/{repeats}: {key}, {n} concurrent ...")
                wanted = max(requests, n)
                before = speculation(servers[key][1])
                sample = asyncio.run(closed_loop(servers[key][1], names[key], prompts[:wanted], n, max_tokens))
                (drafted, kept), (drafted0, kept0) = speculation(servers[key][1]), before
                if drafted > drafted0:  # the share of the draft's proposals the model kept
                    sample["acceptance_rate"] = (kept - kept0) / (drafted - drafted0)
                samples[(key, n)].append(sample)
        late = []
        if max(levels) > 1:
            for key, (_, base) in servers.items():
                progress(f"{key}: a request arriving while {max(levels) - 1} stream ...")
                late.append({"server": key, **asyncio.run(late_arrival(base, names[key], prompts, max(levels) - 1,
                                                                       long_tokens))})
    finally:
        for proc, _ in servers.values():
            if proc is not None:
                stop_server(proc)
    rows = []
    for key, n in settings:
        median = {k: statistics.median(s[k] for s in samples[(key, n)]) for k in samples[(key, n)][0]}
        one = samples.get((key, min(levels)))
        base = statistics.median(s["tokens_per_sec"] for s in one) if one else None
        plain = samples.get(("plain", n))
        rows.append({"server": key, "concurrency": n, **median,
                     "tokens_per_sec_all": [s["tokens_per_sec"] for s in samples[(key, n)]],
                     "vs_one_client": median["tokens_per_sec"] / base if base else None,
                     "vs_plain": (median["tokens_per_sec"] / statistics.median(s["tokens_per_sec"] for s in plain)
                                  if plain and key != "plain" else None)})
    return {"kind": "serving", "model": model, "draft": draft, "slots": slots, "requests": requests,
            "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "machine": machine(), "results": rows,
            "late_arrival": late,
            "method": f"closed loop of N streaming clients over HTTP (httpx), greedy, end of sequence ignored; "
                      f"medians of {repeats} interleaved repeats after a warm-up of each setting; percentiles over "
                      "every request (time to first token) and every gap between streamed chunks (inter-token)"}


def print_report(report: dict[str, Any]) -> None:
    cols = ["server", "concurrency", "tokens_per_sec", "vs_one_client", "vs_plain", "ttft_p50", "ttft_p99",
            "itl_p50", "itl_p99"] + (["acceptance_rate"] if report.get("draft") else [])
    console.say(artifacts.format_table(report["results"], cols))
    for late in report["late_arrival"]:
        console.say(f"{late['server']}: a request arriving while {late['running']} stream got its first token in "
                    f"{late['ttft'] * 1000:.1f} ms = {late['ttft_in_steps']:.1f} decoding steps of theirs "
                    f"({late['running_itl_p50'] * 1000:.1f} ms each)")


def plot(report: dict[str, Any], run_dir) -> list[str]:
    """``serving.png``: tokens per second, and time to first token and inter-token latency, against N."""
    plt = artifacts.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in dict.fromkeys(r["server"] for r in report["results"]):
        rows = [r for r in report["results"] if r["server"] == key]
        n = [r["concurrency"] for r in rows]
        left.plot(n, [r["tokens_per_sec"] for r in rows], marker="o", label=key)
        right.plot(n, [r["ttft_p50"] * 1000 for r in rows], marker="o", label=f"{key}: first token p50")
        right.plot(n, [r["itl_p50"] * 1000 for r in rows], marker="s", linestyle="--", label=f"{key}: inter-token p50")
    left.set_xlabel("concurrent clients")
    left.set_ylabel("output tokens / s")
    right.set_xlabel("concurrent clients")
    right.set_ylabel("ms")
    right.set_yscale("log")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['prompt_tokens']} prompt tokens, {report['max_tokens']} generated, {report['slots']} slots")
    fig.tight_layout()
    run_dir.save_figure(fig, "serving.png")
    return ["serving.png"]
