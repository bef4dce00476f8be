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


def _status_kb(field):
    """A `/proc/self/status` field in kB (0 when absent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_mb():
    """This process's resident set size (VmRSS), MB."""
    return _status_kb("VmRSS") / 1024.0


def hwm_mb():
    """This process's peak resident set size since start or the last `reset_hwm` (VmHWM), MB."""
    return _status_kb("VmHWM") / 1024.0


def reset_hwm():
    """Resets VmHWM to the current RSS (Linux >= 4.0); returns whether that worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
