"""The side-by-side report of compressed models: size, sparsity, accuracy, latency; JSON, a table and a PNG."""
from __future__ import annotations

import gzip
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from hvdtrain import artifacts, console
from hvdtrain.compression.common import Artifact, count_params
from hvdtrain.serving.tflite import TFLiteModel
from hvdtrain.exact_metrics import metrics_from_sums

COLUMNS = ["artifact", "kind", "params", "nonzero", "size_kb", "gzip_kb", "metric", "value", "delta",
           "latency_us"]


def gzip_size(path: Path) -> int:
    """Bytes of ``path`` after gzip (level 9): what sparsity and quantization save in transfer and storage."""
    return len(gzip.compress(Path(path).read_bytes(), compresslevel=9))


def tflite_sums(model: TFLiteModel, x: np.ndarray, y: np.ndarray, batch: int = 64) -> np.ndarray:
    """``[sum of cross-entropy, correct, count]`` of a TFLite model, like :func:`hvdtrain.exact_metrics.local_sums`."""
    total = np.zeros(3)
    for i in range(0, len(x), batch):
        logits = model(x[i : i + batch]).astype(np.float64)
        target = y[i : i + batch]
        logits = logits - logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ce = -np.take_along_axis(logp, target[..., None].astype(np.int64), -1)[..., 0]
        total += [ce.sum(), (logits.argmax(-1) == target).sum(), ce.size]
    return total


def evaluate_artifact(art: Artifact, source) -> dict[str, float]:
    """Metrics of one artifact on the whole test split (in this process)."""
    from hvdtrain.exact_metrics import local_sums

    if art.kind == "tflite":
        x, y = source.arrays("test")
        return metrics_from_sums(tflite_sums(TFLiteModel(art.path), x, y), source.is_language_model,
                                source.bytes_of_token("test"))
    return metrics_from_sums(local_sums(art.model, source.eval_dataset("test", 0, 1, 64, equal=False)),
                             source.is_language_model, source.bytes_of_token("test"))


def latencies(arts: list[Artifact], example: np.ndarray, rounds: int, calls: int) -> dict[str, float]:
    """Median seconds per example at batch 1, every artifact timed in turn in each round (interleaved).

    Keras models run through one compiled ``tf.function`` (eager calls would time Python, not the model);
    TFLite models through the interpreter with one thread.
    """
    import tensorflow as tf

    runners = {}
    for art in arts:
        if art.kind == "tflite":
            m = TFLiteModel(art.path)
            runners[art.name] = lambda m=m: m(example)
        else:
            fn = tf.function(lambda x, m=art.model: m(x, training=False))
            tensor = tf.constant(example)
            runners[art.name] = lambda fn=fn, t=tensor: fn(t).numpy()
    for run in runners.values():  # warm-up: tracing, allocation
        for _ in range(3):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(calls):
                run()
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(v) for name, v in samples.items()}


def build_report(arts: list[Artifact], source, rounds: int, calls: int, reference: str) -> dict[str, Any]:
    """Evaluate, measure and compare every artifact against ``reference`` (the uncompressed Keras model)."""
    metric = "bits_per_byte" if source.is_language_model else "accuracy"
    x_test, _ = source.arrays("test")
    example = x_test[:1]
    lat = latencies(arts, example, rounds, calls)
    rows = []
    for art in arts:
        m = evaluate_artifact(art, source)
        row = {"artifact": art.name, "kind": art.kind, "method": art.method, "path": str(art.path),
               "size_kb": art.path.stat().st_size / 1024, "gzip_kb": gzip_size(art.path) / 1024,
               "metric": metric, "value": m.get(metric), "loss": m.get("loss"), "latency_us": lat[art.name] * 1e6,
               **({"params": None, "nonzero": None} if art.model is None else
                  dict(zip(("params", "nonzero"), count_params(art.model)))), "notes": art.notes}
        rows.append(row)
    ref = next(r for r in rows if r["artifact"] == reference)
    for r in rows:
        if r["params"] is None and r["kind"] == "tflite":
            keras_twin = next((o for o in rows if o["kind"] == "keras" and o["artifact"] == r["notes"].get("from")),
                              None)
            if keras_twin:
                r["params"], r["nonzero"] = keras_twin["params"], keras_twin["nonzero"]
        r["delta"] = None if r["value"] is None or ref["value"] is None else r["value"] - ref["value"]
        r["size_ratio"] = ref["size_kb"] / r["size_kb"]
        r["gzip_ratio"] = ref["gzip_kb"] / r["gzip_kb"]
    return {"reference": reference, "metric": metric, "test_examples": len(x_test),
            "latency": {"batch": 1, "rounds": rounds, "calls_per_round": calls, "statistic": "median"},
            "artifacts": rows}


def print_table(report: dict[str, Any]) -> None:
    """The report as a table for people."""
    console.say(artifacts.format_table(report["artifacts"], COLUMNS))


def plot(report: dict[str, Any], run_dir) -> None:
    """``compression_tradeoff.png``: size (gzip) against accuracy or bits per byte, one labelled point per artifact."""
    plt = artifacts.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in report["artifacts"]:
        if r["value"] is None:
            continue
        ax.scatter(r["gzip_kb"], r["value"], marker="o" if r["kind"] == "keras" else "s", s=50)
        # Keras models and their TFLite exports often coincide: label one above the point, the other below.
        above = r["kind"] == "tflite"
        ax.annotate(r["artifact"], (r["gzip_kb"], r["value"]), textcoords="offset points",
                    xytext=(5, 4 if above else -11), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("gzip size (KB, log scale)")
    ax.set_ylabel(report["metric"].replace("_", " ") + (" (lower is better)" if report["metric"] ==
                                                       "bits_per_byte" else ""))
    ax.set_title("compression trade-off (circles: Keras, squares: TFLite)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    run_dir.save_figure(fig, "compression_tradeoff.png")
