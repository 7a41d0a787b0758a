"""Where one process's training memory goes: the resident set after each phase of a train step, and each phase's
own peak, for a gpt whose weights dominate (issue 40, item 3).

    python scripts/memory_breakdown.py --width 1024 --layers 2 --output docs/data/memory-breakdown.json
    python scripts/memory_breakdown.py --width 1024 --optimizer sgd   # no slots: what Adam's state costs

Phases, in one process as `hvdtrain train` runs them (runtime.begin, make_layout, prepare, fit): TensorFlow and
Horovod loaded; the model built (its weights); compiled with the optimizer built (its slots); the first step (the
train function traced, then run: gradients, the update); three more steps. Each phase's own peak is the kernel's
high-water mark (VmHWM) reset at its start (``hvdtrain.memory.reset_peak``). Counted beside it: the bytes of the
weights and of the optimizer's variables. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--output", default="")
    args = parser.parse_args()

    import dataclasses

    from hvdtrain import config, data, memory, runtime

    cfg = config.load("gpt-tiny", overrides=[
        f"model.params={{num_layers: {args.layers}, width: {args.width}, num_heads: 4, dropout: 0.0}}",
        f"data.context_length={args.context}", f"data.batch_size_per_rank={args.batch}",
        f"train.optimizer={args.optimizer}"])
    rows = []
    mark = {"rss": memory.resident_bytes()}

    def phase(name: str, counted: int = 0) -> None:
        now, peak = memory.resident_bytes(), memory.peak_since_reset()
        rows.append({"phase": name, "resident_mb": now / 2**20, "grew_mb": (now - mark["rss"]) / 2**20,
                     "phase_peak_over_start_mb": (peak - mark["rss"]) / 2**20, "counted_mb": counted / 2**20})
        mark["rss"] = memory.reset_peak() or memory.resident_bytes()

    import tensorflow as tf

    mesh = runtime.begin(cfg)
    memory.reset_peak()
    mark["rss"] = memory.resident_bytes()
    phase("TensorFlow and Horovod loaded")
    synthetic = dataclasses.replace(cfg.data, source="synthetic", num_examples=2 * args.batch + 2)
    source = data.load(synthetic, seed=0, model_name=cfg.model.name)
    dataset = data.without_autotune(
        tf.data.Dataset.from_tensors((source.x_train[:args.batch], source.y_train[:args.batch])).repeat())
    phase("synthetic batch")
    layout = runtime.make_layout(cfg, source, mesh)
    weights = sum(int(v.shape.num_elements()) * v.dtype.size for v in layout.training_model.trainable_variables)
    phase("model built (weights)", weights)
    model = runtime.prepare(layout.training_model, cfg, cfg.train.learning_rate, layout=layout, metrics=[])
    inner = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    slots = sum(int(v.shape.num_elements()) * v.dtype.size for v in inner.variables)
    phase("compiled, optimizer built (slots)", slots)
    model.fit(dataset, steps_per_epoch=1, epochs=1, verbose=0)
    phase("first step (traced, run)", weights)  # the gradients, one per weight
    model.fit(dataset, steps_per_epoch=3, epochs=1, verbose=0)
    phase("3 more steps")
    parameters = weights // 4
    total = sum(r["grew_mb"] for r in rows[1:]) * 2**20
    peak = max(r["phase_peak_over_start_mb"] + sum(x["grew_mb"] for x in rows[1:i])
               for i, r in enumerate(rows) if i) * 2**20
    report = {"parameters": parameters, "width": args.width, "layers": args.layers, "batch": args.batch,
              "context": args.context, "optimizer": args.optimizer, "phases": rows,
              "growth_bytes_per_parameter": total / parameters, "peak_growth_bytes_per_parameter": peak / parameters,
              "env": {k: os.environ.get(k, "") for k in ("MALLOC_ARENA_MAX", "TF_ENABLE_ONEDNN_OPTS",
                                                         "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")}}
    from hvdtrain import artifacts

    print(artifacts.format_table(rows))
    print(f"{parameters:,} parameters; growth {report['growth_bytes_per_parameter']:.1f} bytes/parameter, "
          f"peak growth {report['peak_growth_bytes_per_parameter']:.1f}")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
