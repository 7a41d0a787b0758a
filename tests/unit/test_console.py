"""The CLI's quiet import of TensorFlow: only when something imports it, its load-time absl lines dropped."""
import subprocess
import sys

from tests.helpers import env

SCRIPT = """
import sys
from hvdtrain import console
console.quiet_tensorflow_on_import()
import hvdtrain.config  # a command's first steps: no TensorFlow yet
assert "tensorflow" not in sys.modules
import tensorflow as tf
from tensorflow.python.ops import math_ops  # noqa: F401 - submodules import as usual
assert int(tf.constant(2) * 3) == 6 and tf.__spec__.origin.endswith("tensorflow/__init__.py")
assert not [f for f in sys.meta_path if type(f).__name__ == "_QuietOnImport"]  # the finder removed itself
print("ok")
"""


def test_tensorflow_is_imported_quietly_only_when_needed():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**env(), "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    # TensorFlow >= 2.16 prints these before absl's logging starts, whatever TF_CPP_MIN_LOG_LEVEL says
    assert "absl::InitializeLog" not in proc.stderr and "oneDNN custom operations" not in proc.stderr
