"""2 replicas (MirroredStrategy over 2 logical CPUs, in a subprocess) == 1 replica on the whole batch."""

import json
import os
import subprocess
import sys

import pytest


def _run(repo_root, tmp_path, *extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo_root)
    proc = subprocess.run([sys.executable, "-m", "tests.scl.replicas_script", str(tmp_path), *extra], cwd=repo_root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _check(out, tag, trained):
    # the same per-example losses, global loss and gradients (MoCo: keys without gradient; in-batch: gradients
    # flow back through the all-gathered keys)
    assert out[f"{tag}_per_example_diff"] < 1e-5
    a, b = out[f"{tag}_loss"]
    assert abs(a - b) < 1e-5 * max(1.0, abs(a))
    assert out[f"{tag}_grad_scale"] > 1e-3  # the comparison is not between two zero gradients
    assert out[f"{tag}_grad_diff"] < 1e-4 * out[f"{tag}_grad_scale"]
    if trained:
        # after 3 trainer steps every variable (encoder, key encoder, queue, τ) is identical on both replicas
        assert out[f"{tag}_replica_spread"] == 0.0
        # ... and equal to the single-replica run on the same global batches
        assert out[f"{tag}_train_vs_single"] < 1e-4
        assert out[f"{tag}_acc1"][0] == pytest.approx(out[f"{tag}_acc1"][1])


# large (~22 s): two replicas vs one process (make test-large; CTR's data-parallel equality stays in the default suite)
@pytest.mark.large
def test_two_replicas_equal_one(repo_root, tmp_path):
    out = _run(repo_root, tmp_path)
    _check(out, "moco", trained=True)
    _check(out, "inbatch", trained=False)
    single, double = out["queue_ids"]
    assert single == double
    # 3 steps × 8 keys into a 13-slot queue (13 ∤ 8): wrapped once, pointer at 24 mod 13
    assert out["queue_pointer_count"] == [24 % 13, 13]


@pytest.mark.large
def test_two_replicas_equal_one_without_queue_training(repo_root, tmp_path):
    out = _run(repo_root, tmp_path, "--full")
    _check(out, "inbatch", trained=True)
