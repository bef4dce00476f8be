"""Running `python -m mm_ads.train` as a single process or as a local cluster (`tools.cluster.LocalCluster`)."""

import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

from tools.cluster import LocalCluster

# One CTR epoch on the tiny world (3,447 training impressions in 2 files): learning rates of the flagfiles.
CTR_FLAGS = ["--flagfile=configs/ctr/smoke.flags", "--sparse_learning_rate=0.3", "--dense_learning_rate=0.01",
             "--log_every=10"]
DEADLINE = 240  # seconds: a cluster that has not finished by then is stopped and the test fails


def env(repo_root, tmp_dir=None):
    out = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo_root)
    if tmp_dir is not None:
        os.makedirs(tmp_dir, exist_ok=True)
        out["TMPDIR"] = str(tmp_dir)  # where non-chief workers put (and delete) their checkpoint copies
    return out


def train_cmd(data_dir, model_dir, *flags):
    return [sys.executable, "-m", "mm_ads.train", *CTR_FLAGS, f"--data_dir={data_dir}", f"--model_dir={model_dir}",
            *flags]


def run_single(repo_root, data_dir, model_dir, *flags):
    proc = subprocess.run(train_cmd(data_dir, model_dir, *flags), cwd=repo_root, env=env(repo_root),
                          capture_output=True, text=True, timeout=DEADLINE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def run_cluster(repo_root, command, num_workers, num_ps=0, chief=False, tmp_dir=None, timeout=DEADLINE):
    """Runs `command` as a local cluster; returns `(status, {task name: output})`. Every process is reaped."""
    with LocalCluster(command, num_workers, num_ps, chief, env=env(repo_root, tmp_dir), cwd=repo_root,
                      stream=None) as cluster:
        status = cluster.wait(timeout=timeout)
    return status, {t.name: t.output for t in cluster.tasks}


def checkpoint_values(path):
    """`{key: array}` of a checkpoint's model variables (optimizer slots and bookkeeping left out)."""
    reader = tf.train.load_checkpoint(path)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.startswith("model/") and not k.endswith("_CHECKPOINTABLE_OBJECT_GRAPH")}


# The attention MLP's output bias adds the same constant to every score of a softmax: its exact gradient is 0,
# so its float gradient is round-off, which Adam normalises into steps of up to ±lr. Two runs that sum the
# same gradients in another order therefore differ there by up to ~lr·steps, without any effect on the model.
SHIFT_INVARIANT = ("din..attention_mlp..output..bias",)


def assert_same_weights(a, b, atol):
    """Every model variable of checkpoints `a` and `b` within `atol` (the shift-invariant bias within 1e-3)."""
    assert a.keys() == b.keys() and len(a) >= 10
    worst = 0.0
    for k in a:
        if not a[k].size:
            continue
        diff = float(np.max(np.abs(a[k] - b[k])))
        bound = 1e-3 if any(name in k for name in SHIFT_INVARIANT) else atol
        assert diff <= bound, f"{k}: largest difference {diff} > {bound}"
        worst = max(worst, diff) if bound == atol else worst
    return worst
