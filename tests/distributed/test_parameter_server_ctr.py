"""ParameterServerStrategy for CTR: a chief (coordinator) + 2 workers + 2 ps on 127.0.0.1, tables split across
both ps tasks.

What is compared with a single process, and why not more: both train the `simtier` model (ID tables plus the
joined multimodal vectors) for the same 53 steps of 64 examples of the same split with the same learning
rates. After 10 synchronous warm-up steps the PS run is asynchronous — each worker computes its gradients on
whatever the ps tasks hold when its step starts (up to one step stale with 2 workers) and draws its own
shuffled order of its own part of the split — so its weights cannot equal the single process's; its quality
can. Asserted: the test logloss of both is far below that of the untrained model (log 2) and
within 0.03 of each other. Exact equality of the sharded table with the whole one (lookups, sparse updates,
checkpoints) is tested in a single process in tests/layers/test_sparse_embedding.py.

~30-60 s on 2 busy cores; bounded by `helpers.DEADLINE`, every process reaped.
"""

import glob
import json
import math
import os
import re
import subprocess
import sys

import pytest
import tensorflow as tf

from tests.distributed import helpers

# the simtier model: sharded ID tables and the multimodal vectors joined in the workers' input pipelines;
# 10 synchronous warm-up steps, then 43 asynchronous ones
FLAGS = ["--variant=simtier", "--vector_table=attributes", "--batch_size=64", "--epochs=1", "--checkpoint_every=20",
         "--ps_sync_steps=10"]


def test_tables_split_across_two_ps_train_like_one_process(tiny_world, repo_root, tmp_path):
    ps_dir, single = tmp_path / "ps", tmp_path / "single"
    cmd = helpers.train_cmd(tiny_world, ps_dir, *FLAGS, "--strategy=parameter_server", "--embedding_shards=2")
    status, out = helpers.run_cluster(repo_root, cmd, num_workers=2, num_ps=2, chief=True)
    assert status == 0, out["chief:0"][-4000:]
    chief = out["chief:0"]
    assert "Synchronous warm-up: steps 1..10 one at a time" in chief
    assert "each of 2 reads its own 1/2 of the split" in chief

    # every table is split in two, one shard per ps task, and each Adagrad accumulator sits with its shard
    placement = dict(re.findall(r"placement: (\S+) \[\d+, \d+\] on (\S+)", chief))
    item = {p: d for p, d in placement.items() if p.startswith("emb_item/")}
    assert sorted(item) == ["emb_item/embeddings_part_0", "emb_item/embeddings_part_1"]
    assert {d.split("/device")[0] for d in item.values()} == {"/job:ps/replica:0/task:0", "/job:ps/replica:0/task:1"}
    slots = {p: d for p, d in placement.items() if p.startswith("sparse_adagrad/")}
    assert len(slots) == len([p for p in placement if p.startswith("emb_")]) > 2
    for path, device in slots.items():
        table = re.match(r"sparse_adagrad/(emb_\w+?)_embeddings_part_(\d)_accumulator", path)
        assert table, path
        assert device == placement[f"{table.group(1)}/embeddings_part_{table.group(2)}"], path
    shapes = {p: int(n) for p, n in re.findall(r"placement: (emb_item/\S+) \[(\d+), \d+\]", chief)}
    num_items = sum(shapes.values())

    # the checkpoint holds whole tables (restorable with any number of shards; the export rebuilt one shard)
    variables = dict(tf.train.list_variables(str(ps_dir / "ckpt")))
    assert variables["model/emb_item..embeddings/.ATTRIBUTES/VARIABLE_VALUE"] == [num_items, 4]
    assert (ps_dir / "export" / "1" / "saved_model.pb").exists()

    helpers.run_single(repo_root, tiny_world, single, *FLAGS, "--noexport")
    ps, one = json.load(open(ps_dir / "metrics.json")), json.load(open(single / "metrics.json"))
    assert ps["steps"] == one["steps"] == 3447 // 64
    assert ps["logloss"] < 0.5 * math.log(2) and one["logloss"] < 0.5 * math.log(2)
    assert abs(ps["logloss"] - one["logloss"]) < 0.03, (ps["logloss"], one["logloss"])
    assert ps["auc"] > 0.5


def _shuffle_seed(seed_context):
    """The seed constant of the shuffle in a traced dataset function (0 with no global seed: the seeds are
    then drawn when the iterator is created)."""
    fn = tf.function(lambda: tf.data.Dataset.range(10).shuffle(10))
    with seed_context:
        graph = fn.get_concrete_function().graph
    op = next(o for o in graph.get_operations() if o.type.startswith("ShuffleDataset"))
    return int(tf.get_static_value(op.inputs[2]))  # inputs: dataset, buffer_size, seed, seed2, generator


def test_parameter_server_workers_shuffle_in_their_own_orders():
    """The coordinator traces one dataset function for every worker: with the trainer's global seed its
    shuffle would get fixed seeds and every worker would read the same order; `_unseeded` leaves them 0, so
    each worker's shuffle draws its own seed when its iterator is created."""
    import contextlib

    from tensorflow.python.framework import config as tf_config  # op determinism has no public getter

    from mm_ads.training.trainer import _unseeded

    deterministic = tf_config.is_op_determinism_enabled()  # set by other tests of this process
    tf_config.disable_op_determinism()  # (it refuses unseeded random ops; --deterministic is refused with PS)
    try:
        tf.random.set_seed(7)
        assert _shuffle_seed(contextlib.nullcontext()) == 7
        assert _shuffle_seed(_unseeded(7)) == 0
        assert _shuffle_seed(contextlib.nullcontext()) == 7  # the global seed is back
    finally:
        if deterministic:
            tf_config.enable_op_determinism()


def test_parameter_server_refuses_deterministic():
    from mm_ads.config import TrainConfig

    with pytest.raises(ValueError, match="deterministic cannot hold with strategy=parameter_server"):
        TrainConfig(strategy="parameter_server", deterministic=True).validate()


def _record_keys(path):
    """`[(user_id, item_id, timestamp)]` of every record of a CTR TFRecord file."""
    keys = []
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        feature = tf.train.Example.FromString(record).features.feature
        keys.append(tuple(feature[name].int64_list.value[0] for name in ("user_id", "item_id", "timestamp")))
    return keys


def test_each_worker_reads_its_own_part_of_the_split(tiny_world, repo_root, tmp_path):
    """Without the split, every worker read the whole split in its own order: within one epoch's steps some
    examples were trained on twice and others never (worse AUC on the demo world, BUILD.md)."""
    out = tmp_path / "keys.json"
    proc = subprocess.run([sys.executable, "-m", "tests.distributed.ps_input_probe", str(tiny_world), str(out)],
                          cwd=repo_root, env=helpers.env(repo_root), capture_output=True, text=True,
                          timeout=helpers.DEADLINE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    by_worker = {int(w): [tuple(k) for k in keys] for w, keys in json.load(open(out)).items()}
    assert sorted(by_worker) == [0, 1], "both workers must have run steps"

    files = sorted(glob.glob(os.path.join(tiny_world, "ctr", "train-*.tfrecord")))
    assert len(files) == 2
    file_of = {}
    for i, path in enumerate(files):
        for key in _record_keys(path):
            assert key not in file_of, f"record key {key} is not unique: the test cannot tell the parts apart"
            file_of[key] = i
    # worker w reads whole files of its own (2 files, 2 workers: one each), never a record of the other's
    parts = {w: {file_of[k] for k in keys} for w, keys in by_worker.items()}
    assert all(len(p) == 1 for p in parts.values()), parts
    assert parts[0] != parts[1], parts
    # within one pass of its part, a worker sees no record twice
    for keys in by_worker.values():
        assert len(keys) <= sum(1 for f in file_of.values() if f == file_of[keys[0]])
        assert len(set(keys)) == len(keys)
