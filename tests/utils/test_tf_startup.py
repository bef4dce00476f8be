import os
import subprocess
import sys

import pytest

from mm_ads.utils import tf_startup

CPU_ONLY = not (os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia"))


def test_noise_patterns():
    assert tf_startup.is_noise("E0000 00:00:1796540684.377608 8264 cuda_platform.cc:52] failed call to cuInit: "
                               "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n")
    assert tf_startup.is_noise("I0000 00:00:1.2 8264 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
                               "GPU will not be used.\n")
    assert tf_startup.is_noise("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR")
    # anything else is kept, including other errors
    assert not tf_startup.is_noise("E0000 00:00:1.2 1 op_kernel.cc:1] OP_REQUIRES failed: INVALID_ARGUMENT\n")
    assert not tf_startup.is_noise("Traceback (most recent call last):\n")


def _run(code, **env):
    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.mark.skipif(not CPU_ONLY, reason="the CUDA notices are only dropped on a machine without an NVIDIA driver")
def test_entry_point_output_has_no_cuda_noise_but_keeps_other_lines():
    code = ("import os, sys, mm_ads, tensorflow as tf; print(int(tf.constant(2) * 3)); "
            "print(os.environ['TF_CPP_MIN_LOG_LEVEL']); sys.stderr.write('a real warning\\n')")
    result = _run(code)
    assert result.returncode == 0, result.stderr
    # TF's C++ INFO/WARNING lines are hidden by default (level 2: errors still shown)
    assert result.stdout.split() == ["6", "2"]
    assert "cuInit" not in result.stderr and "cuda drivers" not in result.stderr, result.stderr
    assert "a real warning" in result.stderr
    # TF_CPP_MIN_LOG_LEVEL=0 asks for every line: nothing is filtered
    loud = _run("import os, mm_ads, tensorflow as tf; tf.constant(1); print(os.environ['TF_CPP_MIN_LOG_LEVEL'])",
                TF_CPP_MIN_LOG_LEVEL="0")
    assert loud.returncode == 0 and "cuda" in loud.stderr.lower(), loud.stderr
    assert loud.stdout.strip() == "0"


def test_hide_retracing_warnings_drops_only_that_warning():
    import logging

    logger = logging.getLogger("tensorflow")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        tf_startup.hide_retracing_warnings()
        tf_startup.hide_retracing_warnings()  # idempotent: one filter
        assert logger.filters.count(tf_startup._RETRACING_FILTER) == 1
        logger.warning("5 out of the last 7 calls to <function f> triggered tf.function retracing. Tracing is ...")
        logger.warning("something else")
        assert seen == ["something else"]
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(tf_startup._RETRACING_FILTER)
