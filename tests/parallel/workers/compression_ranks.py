"""Pruning and distillation at N ranks, on different data per rank: report what each rank ends with."""
import sys

import common
import numpy as np

import hvdtrain
from hvdtrain import config, data, formats
from hvdtrain.compression.distill import distill
from hvdtrain.compression.prune import prune

outdir, teacher_path = sys.argv[1], sys.argv[2]
cfg = config.load("digits-cnn", overrides=["compression.fine_tune_epochs=2", "compression.distill_epochs=2"])
hvdtrain.init()
source = data.load(cfg.data)
teacher = formats.load_model(teacher_path)
teacher_before = np.concatenate([w.ravel() for w in teacher.get_weights()])
pruned, notes = prune(teacher, source, cfg)
student = distill(teacher, source, cfg)
common.report(
    outdir, hvdtrain.rank(),
    pruned=np.concatenate([w.ravel() for w in pruned.get_weights()]).tolist(),
    sparsity=notes["pruned_layers"],
    student=np.concatenate([w.ravel() for w in student.get_weights()]).tolist(),
    teacher_changed=float(np.abs(np.concatenate([w.ravel() for w in teacher.get_weights()]) - teacher_before).max()),
)
