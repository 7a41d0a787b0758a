"""Shared by the worker scripts that tests/parallel runs under horovodrun: each rank reports to rank{r}.json."""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def report(outdir, rank: int, **values) -> None:
    """Write this rank's findings for the test to read."""
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(values))
