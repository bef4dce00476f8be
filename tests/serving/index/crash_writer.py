"""Subprocess of the crash tests: writes numbered batches until killed, printing each acknowledged batch.

index <uri> <batch> <dim>: put_many of ids [b·batch + 1, (b+1)·batch] with every value = b + id / 1e6.
events <uri> <batch>: append of `batch` records {"b": b, "k": k, "pad": ...} per call.

`run_and_kill(*args, min_acked=, delay_s=)` runs it from a test and SIGKILLs it mid-write.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from mm_ads.serving.index.events import open_stream
from mm_ads.serving.index.index_table import open_index_table


def batch_vectors(b, ids, dim):
    return np.repeat((b + ids / 1e6).astype(np.float32)[:, None], dim, axis=1)


def run_and_kill(*args, min_acked, delay_s):
    """Starts this script with `args`, waits for batch `min_acked` to be acknowledged, sleeps `delay_s` (to
    land inside the next write), SIGKILLs it and returns the last acknowledged batch number."""
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(here)))
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *map(str, args)], stdout=subprocess.PIPE,
                            cwd=repo, env={**os.environ, "PYTHONPATH": repo})
    try:
        acked = -1
        while acked < min_acked:
            line = proc.stdout.readline()
            assert line, "the writer exited early"
            acked = int(line)
        time.sleep(delay_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return acked


def main(kind, uri, batch):
    b = 0
    if kind == "index":
        dim = int(sys.argv[4])
        table = open_index_table(uri, dim=dim, encoder_version="crash-v1", create=True)
        while True:
            ids = np.arange(b * batch + 1, (b + 1) * batch + 1, dtype=np.int64)
            table.put_many(ids, batch_vectors(b, ids, dim), "crash-v1")
            print(b, flush=True)
            b += 1
    stream = open_stream(uri)
    pad = "x" * 200
    while True:
        stream.append([{"b": b, "k": k, "pad": pad} for k in range(batch)])
        print(b, flush=True)
        b += 1


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
