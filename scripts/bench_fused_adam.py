"""The CPU time of a gpt-tiny train step's first call (its trace and one step) with Keras' Adam against hvdtrain's
(``runtime.make_optimizer``: TensorFlow's fused ``ResourceApplyAdam`` per variable), in fresh processes, interleaved
and repeated; prints each pair and the medians (docs/performance.md, "Start-up").

Usage: python scripts/bench_fused_adam.py [PAIRS]   (default 3)
"""
import os
import statistics
import subprocess
import sys

WORKER = """
import dataclasses, sys, time
import hvdtrain  # noqa: F401 - TF_USE_LEGACY_KERAS on TensorFlow 2.16+
import tensorflow as tf
import models
from hvdtrain import config, runtime
from hvdtrain.formats import checkpoint
cfg = config.load("gpt-tiny")
model = models.build("gpt", input_shape=(64,), num_classes=256, num_layers=2, width=128, num_heads=4)
optimizer = (runtime.make_optimizer(dataclasses.replace(cfg.train, optimizer="adam"), 1e-3) if sys.argv[1] == "fused"
             else tf.keras.optimizers.Adam(1e-3))
model.compile(optimizer, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
checkpoint.build_optimizer(optimizer, model.trainable_variables)  # slots first: one trace
x = tf.random.stateless_uniform((32, 64), (1, 2), 0, 256, tf.int32)
began = time.process_time()
model.fit(x, x, batch_size=32, epochs=1, verbose=0)
assert model.train_function.experimental_get_tracing_count() == 1
print(time.process_time() - began)
"""


def first_step(which: str) -> float:
    out = subprocess.run([sys.executable, "-c", WORKER, which], capture_output=True, text=True, check=True,
                         env={"TF_CPP_MIN_LOG_LEVEL": "2", **os.environ}).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    times = {"keras": [], "fused": []}
    for i in range(pairs):
        order = ["keras", "fused"] if i % 2 == 0 else ["fused", "keras"]
        for which in order:
            times[which].append(first_step(which))
        print(f"pair {i + 1}: Keras' Adam {times['keras'][-1]:.2f} s, fused {times['fused'][-1]:.2f} s of CPU")
    keras, fused = statistics.median(times["keras"]), statistics.median(times["fused"])
    print(f"medians: Keras' Adam {keras:.2f} s, fused {fused:.2f} s ({fused / keras:.2f}x)")


if __name__ == "__main__":
    main()
