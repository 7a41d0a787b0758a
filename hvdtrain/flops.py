"""Model FLOPs utilization (MFU): how much of the machine's arithmetic a run turns into its model's math.

``MFU = tokens/s x model FLOPs per token / peak FLOP/s`` (the PaLM paper's definition). The model FLOPs per token
come from the family's plan (:meth:`models.plan.Plan.flops_per_token`: ``6 N + 12 L H Q T``, attention counted
whole). The peak is, on a GPU, the device's published dense peak for the run's precision (a table below; an
unknown device falls back to the probe), and on the CPU a **measured** one: every rank multiplies float32
matrices at once with its own threads (ranks on one host share its cores, as during training), and the job's peak
is the sum over ranks. The peak is the **host's**, not the run's: how a run splits the cores into ranks and threads
is the software's choice, and MFU compares runs against one hardware figure (on 2 cores, sustained: one rank of
two threads 130-149 GFLOP/s, two ranks of one thread 125-153, four 145-162; every layout's MFU uses the best). A shared
machine's load also moves one probe by 2x. So every run probes for half a second, sums its ranks' probes per host,
and keeps the best sum any run on this processor and core count has given in ``~/.cache/hvdtrain/peak-flops.json``
(delete it to start over); a job's peak is that host peak times its hosts. With recomputation the
hardware runs more than the model needs: the hardware FLOPs utilization (HFU) counts the recomputed forward passes
too.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

# Published dense peaks (FLOP/s, no sparsity) per device: (16-bit tensor cores, float32 as TensorFlow runs it:
# TF32 on Ampere and later, where TensorFlow enables it by default).
GPU_PEAKS = {
    "H100": (989e12, 494e12), "A100": (312e12, 156e12), "A10": (125e12, 62.5e12), "L4": (121e12, 60e12),
    "V100": (125e12, 15.7e12), "T4": (65e12, 8.1e12),
}


def matmul_probe(size: int = 1024, seconds: float = 0.5) -> float:
    """Sustained FLOP/s of float32 ``size x size`` matrix products on this process's threads: the products
    finished in about ``seconds`` over the time they took (one warm-up first). Ranks of a host run it at once, so
    their sum is what the host's cores give together. (Not the best single product: over ranks that share
    cores, each rank's best comes when the others pause, and such sums kept during a test run reached 287 GFLOP/s
    on 2 cores whose arithmetic limit is 32 FLOP per cycle each, 224 GFLOP/s even at 3.5 GHz.)"""
    import tensorflow as tf

    a = tf.random.stateless_normal([size, size], seed=[1, 2])
    b = tf.random.stateless_normal([size, size], seed=[3, 4])
    product = tf.function(lambda a, b: tf.linalg.matmul(a, b))
    product(a, b).numpy()
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        product(a, b).numpy()
        done += 1
    return done * 2 * size**3 / (time.perf_counter() - began)


PROBE = ("measured: the best sustained float32 matmul probe (1024 x 1024) this host has given, its ranks' probes "
         "at once summed, times the hosts")


def published_peak(precision: str = "float32") -> tuple[float, str] | None:
    """This rank's GPU's published peak FLOP/s and its name, or None (no GPU, or one not in the table)."""
    import tensorflow as tf

    if not tf.config.list_logical_devices("GPU"):
        return None
    name = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0]).get(
        "device_name", "")
    half = precision != "float32"
    for key, (fast, full) in GPU_PEAKS.items():
        if key in name:
            return (fast if half else full), f"published: {name} {'16-bit' if half else 'float32/TF32'}"
    return None


def cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hvdtrain" / "peak-flops.json"


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    import platform

    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def host_key() -> str:
    """What a host's peak depends on: its processor and the cores this process may run on (and the probe)."""
    return f"{cpu_name()} | {len(os.sched_getaffinity(0))} cores | sustained"


def kept_peak(key: str) -> float | None:
    """The best host peak kept for ``key`` on this machine, if any."""
    try:
        return float(json.loads(cache_file().read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def keep_peak(key: str, value: float) -> None:
    """Keep ``value`` as the best host peak for ``key`` unless a better one is kept (written atomically; ranks of
    one host may write at once)."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            kept = json.loads(path.read_text())
        except (OSError, ValueError):
            kept = {}
        if not isinstance(kept, dict):
            kept = {}
        try:
            if float(kept.get(key) or 0.0) >= value:
                return
        except (TypeError, ValueError):
            pass
        kept[key] = value
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(kept, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: the next run probes again


def host_peaks(probes: list[tuple[str, float]], kept: dict[str, float | None]) -> dict[str, float]:
    """Each host's peak from every rank's ``(host, probe)``: the sum of its ranks' probes (run at once, sharing its
    cores), or the better peak ``kept`` for that host."""
    sums: dict[str, float] = {}
    for host, probe in probes:
        sums[host] = sums.get(host, 0.0) + probe
    return {host: max(value, kept.get(host) or 0.0) for host, value in sums.items()}


def utilization(tokens_per_sec: float | None, flops_per_token: float, peak: float) -> float | None:
    """Model (or hardware) FLOPs utilization; None without a throughput or a peak."""
    if not tokens_per_sec or not peak or not flops_per_token:
        return None
    return tokens_per_sec * flops_per_token / peak
