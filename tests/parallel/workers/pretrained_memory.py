"""Peak memory per rank of loading a Hugging Face checkpoint into a layout (each rank reads its slices).

Usage: pretrained_memory.py OUTDIR CHECKPOINT[,LAYOUT]   (LAYOUT: parallel.* overrides, e.g.
"parallel.tensor=2,parallel.pipeline=2"; none for one process). The phase is measured alone: the kernel's peak
resident set is reset before the layout is made (hvdtrain.memory.reset_peak), so what the process did before does
not count. Each rank writes rank{r}.json: {"growth": bytes, "parameters": n, "held": bytes it holds}.
"""
import sys
from pathlib import Path

import common

from hvdtrain import config, data, distributed, memory, runtime
from hvdtrain.distributed.sharded import bytes_of

outdir = Path(sys.argv[1])
checkpoint, *layout_sets = sys.argv[2].split(",")
(outdir / "corpus.txt").write_text("The pretrained model reads its share of the checkpoint. " * 200)
cfg = config.load("llama-tiny", overrides=[f"model.pretrained={checkpoint}", f"data.path={outdir / 'corpus.txt'}",
                                           "data.context_length=64", "data.batch_size_per_rank=2", *layout_sets])
runtime.init(cfg, dynamic_process_sets=True)
mesh = runtime.make_mesh(cfg)
source = data.load(cfg.data, seed=0, model_name=cfg.model.name)
distributed.barrier()
before = memory.reset_peak()
layout = runtime.make_layout(cfg, source, mesh)
growth = memory.peak_since_reset() - before
held = bytes_of(layout.model.variables if hasattr(layout, "model") else layout.module.all_variables())
distributed.barrier()
common.report(outdir, distributed.rank(), growth=growth, parameters=runtime.model_plan(cfg.model, source).parameters,
              held=held)
