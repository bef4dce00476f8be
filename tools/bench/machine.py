"""What every benchmark prints about the machine it ran on (the numbers only mean something next to it)."""

import os
import platform
import sys


def _cpuinfo():
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def cpu_flag(name):
    """Whether /proc/cpuinfo lists the CPU flag `name` (e.g. "avx512f")."""
    return any(line.startswith("flags") and f" {name}" in line for line in _cpuinfo())


def machine_info(**extra):
    """CPU count and model, load average (1/5/15 min), nice value, Python and — when the benchmark imported
    it — TensorFlow version, plus `extra`."""
    model = next((ln.split(":", 1)[1].strip() for ln in _cpuinfo() if ln.startswith("model name")), "unknown")
    info = {"cpus": os.cpu_count(), "cpu_model": model, "load": os.getloadavg(), "nice": os.nice(0),
            "python": platform.python_version()}
    if "tensorflow" in sys.modules:
        info["tensorflow"] = sys.modules["tensorflow"].__version__
    info.update(extra)
    return info
