"""``python -m hvdtrain.benchmark SPEC RESULT``: the worker every rank of a benchmark launch runs."""
import sys

from hvdtrain.benchmark import worker_main

sys.exit(worker_main(sys.argv[1:]))
