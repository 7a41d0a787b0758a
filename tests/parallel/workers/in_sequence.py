"""Run several worker scripts one after another in the same ranks of one launch (TensorFlow and Horovod start
once): each with its own output folder, and Keras' global state (the precision policy, the session) reset between.

Usage: in_sequence.py OUTDIR SCRIPT[:ARG] SCRIPT_OUTDIR [SCRIPT[:ARG] SCRIPT_OUTDIR ...]   (ARG: the script's own)
Each rank writes OUTDIR/rank{r}.json: {"ran": [scripts]} when all of them are done.
"""
import runpy
import sys
from pathlib import Path

import common
import tensorflow as tf

import hvdtrain

here = Path(__file__).resolve().parent
outdir, pairs = sys.argv[1], sys.argv[2:]
ran = []
for given, script_outdir in zip(pairs[0::2], pairs[1::2]):
    script, *arg = given.split(":", 1)
    Path(script_outdir).mkdir(parents=True, exist_ok=True)
    sys.argv = [str(here / script), script_outdir, *arg]
    runpy.run_path(str(here / script), run_name="__main__")
    tf.keras.mixed_precision.set_global_policy("float32")
    tf.keras.backend.clear_session()
    ran.append(script)
common.report(outdir, hvdtrain.rank(), ran=ran)
