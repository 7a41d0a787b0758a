"""Measured memory: the peak a process has used so far (a leaf module).

On a GPU, TensorFlow's peak device memory of this rank's GPU (``tf.config.experimental.get_memory_info``); on
the CPU, the process's peak resident set: on Linux the kernel's high-water mark of this process's own memory
(``VmHWM``), elsewhere ``getrusage``'s ``ru_maxrss``. Not ``ru_maxrss`` on Linux: the kernel carries it over an
``exec`` from the process that forked, so a command started by a large process (a test runner holding TensorFlow:
550 MB seen for a prepare that held 200 MB) reports that process's peak as its own. Counted bytes (variables and
optimizer slots) say what a layout should hold; these say what it did hold, with TensorFlow's own buffers,
activations and gradients.
"""
from __future__ import annotations

import resource
import sys


def _gpu() -> str | None:
    if "tensorflow" not in sys.modules:  # a process that never loaded TensorFlow holds nothing on a GPU
        return None
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else None


def peak_bytes() -> int:
    """The peak memory this rank has used so far (see the module doc)."""
    gpu = _gpu()
    if gpu is not None:
        import tensorflow as tf

        return int(tf.config.experimental.get_memory_info(gpu)["peak"])
    own = _vm_hwm()
    if own is not None:
        return max(own, _before_reset)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # kilobytes on Linux, bytes on macOS


_before_reset = 0  # the peak before the last reset_peak() (peak_bytes() stays the process's whole peak)


def _vm_hwm() -> int | None:
    """``VmHWM`` (Linux), or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> int:
    """Start measuring a phase: the kernel's peak resident set of this process (``VmHWM``) is set back to the
    resident set now (Linux: ``/proc/self/clear_refs``), which is returned; :func:`peak_since_reset` then gives the
    phase's peak. Returns 0 where the peak cannot be reset (then :func:`peak_since_reset` is the process's peak)."""
    global _before_reset
    _before_reset = max(_before_reset, _vm_hwm() or 0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return 0
    return resident_bytes()


def peak_since_reset() -> int:
    """The peak resident set since :func:`reset_peak` (Linux: ``VmHWM``; elsewhere the process's peak)."""
    own = _vm_hwm()
    return own if own is not None else peak_bytes()


def resident_bytes() -> int:
    """The resident set of this process now (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def what_is_measured() -> str:
    """``gpu_peak`` or ``cpu_peak_rss``: which figure :func:`peak_bytes` gives here."""
    return "gpu_peak" if _gpu() is not None else "cpu_peak_rss"
