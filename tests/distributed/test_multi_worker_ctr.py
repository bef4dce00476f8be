"""MultiWorkerMirroredStrategy for CTR: 2 worker processes on 127.0.0.1 against one process.

The comparison is exact by construction: no shuffle; the training split has 2 files, so worker `i` reads file
`i` (the pipeline shards by files) with a per-replica batch of 32, while the single process interleaves
the two files record by record with a batch of 64. Every step therefore sees the same 64 examples in both
runs; the loss is averaged over the global batch, and the replicas' gradients (dense, and the embedding
tables' `IndexedSlices`, all-gathered then de-duplicated by the sparse optimizer) are summed. Same seed, same
initial weights (MWMS broadcasts worker 0's). Only the summation order differs: weights agree to ~1e-6.

Each cluster run takes ~15-30 s on 2 cores; bounded by `helpers.DEADLINE`, every process reaped.
"""

import json
import os
import re
import time

import pytest

from tests.distributed import helpers
from tools.cluster import LocalCluster

FLAGS = ["--batch_size=64", "--shuffle_buffer=0", "--epochs=1", "--checkpoint_every=10"]
STEPS = 3447 // 64  # 53


@pytest.fixture(scope="module")
def runs(tiny_world, repo_root, tmp_path_factory):
    """One uninterrupted 2-worker run and one single-process run of the same flags."""
    base = tmp_path_factory.mktemp("mw")
    mw, single, tmp = base / "mw", base / "single", base / "tmp"
    status, out = helpers.run_cluster(repo_root, helpers.train_cmd(tiny_world, mw, *FLAGS, "--strategy=multi_worker"),
                                      num_workers=2, tmp_dir=tmp)
    assert status == 0, out["worker:0"][-3000:] + out["worker:1"][-3000:]
    helpers.run_single(repo_root, tiny_world, single, *FLAGS)
    return {"mw": mw, "single": single, "tmp": tmp, "out": out}


def test_two_workers_equal_one_process_on_the_same_batches(runs):
    mw, single = runs["mw"], runs["single"]
    steps = STEPS
    a = helpers.checkpoint_values(str(mw / "ckpt" / f"ckpt-{steps}"))
    b = helpers.checkpoint_values(str(single / "ckpt" / f"ckpt-{steps}"))
    helpers.assert_same_weights(a, b, atol=1e-5)
    ma, mb = json.load(open(mw / "metrics.json")), json.load(open(single / "metrics.json"))
    assert ma["steps"] == mb["steps"] == steps
    # near-equal weights: a few of the 553 test pairs may swap rank
    assert ma["auc"] == pytest.approx(mb["auc"], abs=1e-3) and ma["logloss"] == pytest.approx(mb["logloss"], abs=1e-4)
    assert ma["auc"] > 0.55 and ma["logloss"] < 0.69  # it learned something (not two equal untrained models)


def test_only_the_chief_writes(runs):
    mw, out = runs["mw"], runs["out"]
    # chief: checkpoints, summaries, metrics, export; the other worker: nothing left anywhere
    assert sorted(os.listdir(mw)) == ["ckpt", "config.json", "eval_history.json", "export", "feature_spec.json",
                                      "metrics.json", "summaries"]
    assert os.listdir(runs["tmp"]) == []  # worker 1's checkpoint copies were deleted
    assert os.path.isdir(mw / "export" / "1") and len(os.listdir(mw / "summaries")) == 1
    assert "export: " in out["worker:0"] and "not the chief" in out["worker:1"]
    assert "Saved checkpoint" not in out["worker:1"]


# large: two clusters of two processes (~40 s); the single-process kill -9 resume test stays in the default suite
@pytest.mark.large
def test_killed_worker_then_restarted_cluster_resumes_to_the_same_model(runs, tiny_world, repo_root, tmp_path):
    killed = tmp_path / "killed"
    cmd = helpers.train_cmd(tiny_world, killed, *FLAGS, "--strategy=multi_worker")
    with LocalCluster(cmd, num_workers=2, env=helpers.env(repo_root), cwd=repo_root, stream=None) as cluster:
        start = time.time()
        while not (killed / "ckpt" / "ckpt-10.index").exists():
            assert cluster.poll() is None, "the cluster ended before a worker could be killed"
            assert time.time() - start < helpers.DEADLINE
            time.sleep(0.05)
        cluster.kill_task("worker", 1)  # SIGKILL: worker 0 loses its peer mid-training
        status = cluster.wait(timeout=60)
    assert status == 128 + 9 and cluster.failed.name == "worker:1"
    assert all(t.popen.poll() is not None for t in cluster.tasks)  # the launcher stopped worker 0 too
    assert not (killed / "metrics.json").exists()

    status, out = helpers.run_cluster(repo_root, cmd, num_workers=2)  # the same command again
    assert status == 0, out["worker:0"][-3000:]
    restored = {name: re.search(r"Restored \S+ \(step (\d+)\)", text) for name, text in out.items()}
    assert all(restored.values()), "every worker restores the chief's checkpoint"
    step = int(restored["worker:0"].group(1))
    assert 10 <= step < STEPS and int(restored["worker:1"].group(1)) == step
    a = helpers.checkpoint_values(str(runs["mw"] / "ckpt" / f"ckpt-{STEPS}"))
    b = helpers.checkpoint_values(str(killed / "ckpt" / f"ckpt-{STEPS}"))
    helpers.assert_same_weights(a, b, atol=1e-5)
