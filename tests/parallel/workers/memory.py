"""Peak memory per rank through every phase where a whole copy of the model could appear: construction, training,
a checkpoint written, the checkpoint read back (a resume), model.keras streamed by the chief.

Usage: memory.py OUTDIR [LAYOUT]   (LAYOUT: parallel.* overrides, e.g. "parallel.tensor=2,parallel.pipeline=2")
A small gpt first, then a larger one in the same process: the peak resident set is a high-water mark, so the
larger model's growth over the small one's is what its size costs (TensorFlow's own start-up is in both).
Each rank writes rank{r}.json: {"small": bytes, "large": bytes, "large_parameters": n}.
"""
import sys
from pathlib import Path

import common
import tensorflow as tf

from hvdtrain import config, data, distributed, memory, runtime
from hvdtrain.formats import checkpoint, keras_file
from hvdtrain.rundir import RunDir

outdir = Path(sys.argv[1])
layout_sets = [s for s in (sys.argv[2] if len(sys.argv) > 2 else "").split(",") if s]
SIZES = {"small": "{num_layers: 2, width: 64, num_heads: 8, dropout: 0.0}",
         "large": "{num_layers: 2, width: 1024, num_heads: 8, dropout: 0.0}"}
peaks, params = {}, 0
for size, model in SIZES.items():
    cfg = config.load("gpt-tiny", overrides=[f"model.params={model}", "data.context_length=64",
                                             "data.batch_size_per_rank=4", f"data.path={outdir / 'corpus.txt'}",
                                             "train.optimizer=adam", *layout_sets])
    runtime.init(cfg, dynamic_process_sets=True)
    mesh = runtime.make_mesh(cfg)
    source = data.load(cfg.data, seed=0, model_name="gpt")
    layout = runtime.make_layout(cfg, source, mesh)
    trainer = runtime.prepare(layout.training_model, cfg, 1e-4, layout=layout)
    trainer.fit(source.train_dataset(mesh.data_rank, mesh.data, 4, 0, 0), steps_per_epoch=2, epochs=1, verbose=0,
                callbacks=[c for c in [layout.broadcast_callback()] if c is not None])
    run = outdir / size
    if distributed.rank() == 0:
        run.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    chief = RunDir(run) if distributed.rank() == 0 else None
    if layout.collective_checkpoint or chief is not None:
        checkpoint.save(str(run), chief, 1, layout, {"metrics": []}, distributed.rank())
        uri = checkpoint.latest(str(run)) if chief is not None else None
        uri = distributed.broadcast_object(uri) if layout.collective_checkpoint and distributed.size() > 1 else uri
        layout.load_checkpoint(uri)  # what a resume reads
        if chief is not None:
            keras_file.write_from_checkpoint(uri, str(run / "model.keras"))
    distributed.barrier()
    peaks[size] = memory.peak_bytes()
    params = runtime.model_plan(cfg.model, source).parameters
    del layout, trainer
    tf.keras.backend.clear_session()
common.report(outdir, distributed.rank(), **peaks, large_parameters=params)
