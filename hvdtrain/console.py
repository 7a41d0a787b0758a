"""What hvdtrain prints for people: whole lines, each in one write.

Launchers forward each rank's output and prefix its lines (horovodrun: ``[1,0]<stdout>:``). horovodrun also runs
Python unbuffered, so ``print(text)`` becomes two writes (the text, then the newline), and the two can be
forwarded, and prefixed, separately: ``text[1,0]<stdout>:`` and a lone newline (seen here). Writing each line with
its newline in one call keeps every forwarded line whole.
"""
from __future__ import annotations

import os
import re
import sys
import threading


def say(text: str = "", stream=None) -> None:
    """Write ``text`` (one or more lines) and a newline in one write, then flush."""
    stream = stream or sys.stdout
    stream.write(text + "\n")
    stream.flush()


def warn(text: str) -> None:
    """A warning line on stderr."""
    say(f"[hvdtrain] warning: {text}", sys.stderr)


def error(text: str) -> None:
    """An error line on stderr."""
    say(f"hvdtrain: error: {text}", sys.stderr)


# TensorFlow >= 2.16 logs "oneDNN custom operations are on" while its libraries load, through absl before absl's
# logging is set up: each time with "WARNING: All log messages before absl::InitializeLog() is called are written to
# STDERR", ignoring TF_CPP_MIN_LOG_LEVEL (only TF_ENABLE_ONEDNN_OPTS=0, which turns oneDNN off, stops it). Four
# lines on every start would bury a one-line error, so the CLI drops exactly these lines while TensorFlow loads.
_LOAD_NOISE = re.compile(rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
                         rb"|I\d{4} [\d:.]+ +\d+ port\.cc:\d+\] oneDNN custom operations are on\..*)$")


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its load-time absl lines (above) dropped from stderr; every other line passes."""
    if "tensorflow" in sys.modules:
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to keep clean
        import tensorflow  # noqa: F401
        return
    read_end, write_end = os.pipe()
    kept: list[bytes] = []
    reader = threading.Thread(target=lambda: kept.append(_drain(read_end)), daemon=True)
    reader.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        import tensorflow  # noqa: F401
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer is gone: the reader sees its end
        os.close(saved)
        reader.join()
        os.close(read_end)
        lines = b"".join(kept).splitlines(keepends=True)
        rest = b"".join(line for line in lines if not _LOAD_NOISE.match(line.rstrip(b"\r\n")))
        if rest:
            os.write(2, rest)


class _QuietOnImport:
    """A finder that makes the process's first ``import tensorflow``, wherever it happens, go through
    :func:`import_tensorflow_quietly`: commands that stop before they need TensorFlow (a usage error, a listing)
    do not pay its 4-5 s start-up at all."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        import_tensorflow_quietly()
        import importlib.util

        self.spec = sys.modules["tensorflow"].__spec__
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        return sys.modules["tensorflow"]  # already imported, quietly: the import system keeps this module

    def exec_module(self, module):
        module.__spec__ = self.spec  # the import system set ours; TensorFlow's own describes where it lives


def quiet_tensorflow_on_import() -> None:
    """Have the first import of TensorFlow drop its load-time lines (:func:`import_tensorflow_quietly`)."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietOnImport())


def _drain(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)
