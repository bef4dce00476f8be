"""TensorFlow's start-up lines on a CPU-only machine, filtered.

The TensorFlow wheel is built with CUDA support. On a machine without an NVIDIA driver its import and first op
print lines such as `E0000 ... failed call to cuInit: ... UNKNOWN ERROR (303)`, `Could not find cuda drivers on
your machine` and the oneDNN / CPU-feature notices. They are written by C++ logging before
`absl::InitializeLog()`, so `TF_CPP_MIN_LOG_LEVEL` does not silence all of them. `import_tensorflow_quietly()`
imports TensorFlow and initialises its devices with file descriptor 2 redirected to a temporary file, then
writes back every line except those notices. Nothing else is hidden: any other line, and any exception, comes
through unchanged.

The filter applies only when no NVIDIA device node exists (on a GPU machine the CUDA lines matter), and not
when `TF_CPP_MIN_LOG_LEVEL=0` is set (the user asked for every log line).
"""

import os
import re
import sys
import tempfile

# The start-up notices of a CUDA-enabled TensorFlow wheel on a CPU-only machine (TF 2.21).
_NOISE = re.compile(
    r"failed call to cuInit|Could not find cuda drivers|cudart_stub\.cc|oneDNN custom operations are on"
    r"|cpu_feature_guard\.cc|All log messages before absl::InitializeLog\(\) is called"
    r"|^To enable the following instructions: .*rebuild TensorFlow"
)


def is_noise(line):
    """True for a start-up notice that `import_tensorflow_quietly` drops."""
    return bool(_NOISE.search(line))


def _wanted():
    if "tensorflow" in sys.modules:  # too late: it has already printed
        return False
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return False
    return not (os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia"))


def import_tensorflow_quietly():
    """Imports TensorFlow and lists its devices, dropping the CPU-only start-up notices (see module doc)."""
    if not _wanted():
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr descriptor: import as is
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # initialises the platforms: the cuInit line comes here
        finally:
            try:
                sys.stderr.flush()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode("utf-8", "replace").splitlines(True) if not is_noise(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _RetracingWarningFilter:
    """Drops TensorFlow's "N out of the last M calls to <function> triggered tf.function retracing" warning."""

    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


_RETRACING_FILTER = _RetracingWarningFilter()


def hide_retracing_warnings():
    """For entry points that build many models in one process (the reports train dozens of runs).

    TF's retracing detector counts traces per source location, not per function object: every run's model gets
    its own evaluation function, traced once by design, and after a few runs the detector warns about "excessive
    retracing" that is not there. Only that warning is dropped (idempotent)."""
    import logging

    logger = logging.getLogger("tensorflow")
    if _RETRACING_FILTER not in logger.filters:
        logger.addFilter(_RETRACING_FILTER)
