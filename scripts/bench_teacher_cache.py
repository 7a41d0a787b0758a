"""The CPU time of distilling digits-cnn's default student (20 epochs, one process) with the teacher's outputs cached
once per training example (hvdtrain.compression.distill.with_teacher_outputs) against running the teacher in every
step, in fresh processes, interleaved and repeated; prints each pair and the medians (docs/compression.md).

Usage: python scripts/bench_teacher_cache.py [PAIRS]   (default 3)
"""
import os
import statistics
import subprocess
import sys

WORKER = """
import sys, time
import hvdtrain
import models
from hvdtrain import config, data
from hvdtrain.compression import distill
cfg = config.load("digits-cnn")
hvdtrain.init()
source = data.load(cfg.data)
teacher = models.build("cnn", input_shape=source.input_shape, num_classes=source.num_classes, **cfg.model.params)
if sys.argv[1] == "live":
    distill.with_teacher_outputs = lambda distiller, source, *args, **kwargs: source
began = time.process_time()
distill.distill(teacher, source, cfg)
print(time.process_time() - began)
"""


def cpu_seconds(which: str) -> float:
    out = subprocess.run([sys.executable, "-c", WORKER, which], capture_output=True, text=True, check=True,
                         env={"TF_CPP_MIN_LOG_LEVEL": "2", **os.environ}).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    times = {"live": [], "cached": []}
    for i in range(pairs):
        for which in (["live", "cached"] if i % 2 == 0 else ["cached", "live"]):
            times[which].append(cpu_seconds(which))
        print(f"pair {i + 1}: teacher in every step {times['live'][-1]:.1f} s, cached {times['cached'][-1]:.1f} s "
              "of CPU")
    live, cached = statistics.median(times["live"]), statistics.median(times["cached"])
    print(f"medians: teacher in every step {live:.1f} s, cached {cached:.1f} s ({cached / live:.2f}x)")


if __name__ == "__main__":
    main()
