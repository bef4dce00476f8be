"""MultiWorkerMirroredStrategy: 2 worker processes on 127.0.0.1 train SCL in lock-step (queues identical).

~15 s on 2 cores (so not `large`); bounded by a 300 s deadline, every process reaped."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from tests.scl.tiny_data import write_tiny_text_pairs


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_two_workers_hold_identical_queues(repo_root, tmp_path):
    data_dir = str(tmp_path / "data")
    write_tiny_text_pairs(data_dir)
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    try:
        for i in range(2):
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo_root,
                       TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.scl.multi_worker_script", str(tmp_path), data_dir], cwd=repo_root,
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True))
        deadline = time.time() + 300
        outputs = []
        for p in procs:
            outputs.append(p.communicate(timeout=max(1, deadline - time.time()))[0])
    finally:
        for p in procs:  # every worker is reaped, whatever happened
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    w0, w1 = (json.load(open(tmp_path / f"worker{i}.json")) for i in range(2))
    assert w0["replicas"] == 2
    assert w0 == w1  # queue, pointer, encoder and key-encoder weights, metrics: identical on both workers
    assert w0["pointer"] == 24 % 13 and -1 not in w0["queue_ids"]
    assert os.path.exists(tmp_path / "model" / "ckpt")
