"""MultiWorkerMirroredStrategy: 2 worker processes on 127.0.0.1 train SCL in lock-step (queues identical).

~15 s on 2 cores (so not `large`); run by `tools.cluster.LocalCluster` (free ports, 300 s deadline, every
process reaped)."""

import json
import os
import sys

from tests.scl.tiny_data import write_tiny_text_pairs
from tools.cluster import LocalCluster


def test_two_workers_hold_identical_queues(repo_root, tmp_path):
    data_dir = str(tmp_path / "data")
    write_tiny_text_pairs(data_dir)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo_root)
    cmd = [sys.executable, "-m", "tests.scl.multi_worker_script", str(tmp_path), data_dir]
    with LocalCluster(cmd, num_workers=2, env=env, cwd=repo_root, stream=None) as cluster:
        status = cluster.wait(timeout=300)
    assert status == 0, "".join(t.output[-4000:] for t in cluster.tasks)
    w0, w1 = (json.load(open(tmp_path / f"worker{i}.json")) for i in range(2))
    assert w0["replicas"] == 2
    assert w0.pop("chief") and not w1.pop("chief")
    assert 0.0 <= w0.pop("acc@1") <= 1.0 and w1.pop("acc@1") is None  # only the chief evaluates
    assert w0 == w1  # queue, pointer, encoder and key-encoder weights: identical on both workers
    assert w0["pointer"] == 24 % 13 and -1 not in w0["queue_ids"]
    assert os.path.exists(tmp_path / "model" / "ckpt")
