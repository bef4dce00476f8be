"""ParameterServerStrategy with collision-free dynamic tables (`--id_mapping=dynamic`): a chief + 2 workers + 2 ps
on 127.0.0.1, pools of 120 rows (fewer than the tiny world's 300 items and 200 users, so they fill and evict).

Each table's id → row map, its bookkeeping and its admission lock live on one ps task; its pool is split across
both. Both workers admit and evict ids in that one map at the same time; the admission lock makes each call's
lookup → free-row allocation → insert one exclusive sequence. Asserted on the chief's last checkpoint, restored
into a single-process model: every table's map is bounded by its pool and collision-free (no two ids share a
row, the map and the rows' ids agree, free + held rows = the pool), and the clock counted the calls of every
step of both workers. The export serves the checkpoint's map (same predictions as the restored model), and the
test logloss is far below the untrained model's (log 2), the bound tests/distributed/test_parameter_server_ctr.py
sets for fixed tables (0.175 in one run).

~40-70 s on 2 busy cores; bounded by `helpers.DEADLINE`, every process reaped.
"""

import json
import math
import re

import numpy as np
import pytest
import tensorflow as tf

from tests.distributed import helpers
from tests.distributed.test_parameter_server_ctr import FLAGS

CAPACITY = 120


def _consistent(table):
    """`{id: row}` of a `DynamicEmbedding` after checking that its map and bookkeeping agree and are bounded."""
    from mm_ads.layers.dynamic_embedding import DELETED_KEY, EMPTY_KEY

    keys, rows = (t.numpy() for t in table.id_to_row.export())
    live = (keys != EMPTY_KEY) & (keys != DELETED_KEY)
    keys, rows = keys[live], rows[live]
    assert len(rows) == table.size().numpy() <= table.capacity, table.name
    assert len(set(rows.tolist())) == len(rows), f"{table.name}: two ids share a row"
    assert ((rows >= 0) & (rows < table.capacity)).all(), table.name
    row_ids = table.row_ids.numpy()
    occupied = np.flatnonzero(row_ids != EMPTY_KEY)
    assert sorted(rows.tolist()) == occupied.tolist(), f"{table.name}: the map and the rows' ids disagree"
    np.testing.assert_array_equal(table.map_keys(tf.constant(row_ids[rows])).numpy(), keys)
    free = table.free_rows.numpy()[:table.num_free.numpy()]
    assert len(free) + len(occupied) == table.capacity, table.name
    assert not set(free.tolist()) & set(occupied.tolist()) and len(set(free.tolist())) == len(free), table.name
    return dict(zip(row_ids[rows].tolist(), rows.tolist()))


@pytest.mark.large
def test_dynamic_tables_train_under_parameter_server_and_stay_collision_free(tiny_world, repo_root, tmp_path):
    from mm_ads.ctr.task import CTRTask
    from mm_ads.layers.dynamic_embedding import DynamicEmbedding
    from mm_ads.training import model_dir as run_dir
    from tests.ctr.helpers import restored_predictions

    ps_dir = tmp_path / "ps"
    cmd = helpers.train_cmd(tiny_world, ps_dir, *FLAGS, "--strategy=parameter_server", "--embedding_shards=2",
                            "--id_mapping=dynamic", f"--table_capacity={CAPACITY}")
    status, out = helpers.run_cluster(repo_root, cmd, num_workers=2, num_ps=2, chief=True)
    assert status == 0, out["chief:0"][-4000:]
    chief = out["chief:0"]

    # every map sits on one ps task; the pools are split across both
    maps = dict(re.findall(r"placement: (\S+) \(lookup table\) on (\S+)", chief))
    assert {"emb_item.id_to_row", "emb_user.id_to_row"} <= set(maps), maps
    assert all(re.fullmatch(r"/job:ps/replica:0/task:[01]/device:CPU:0", d) for d in maps.values()), maps
    pools = dict(re.findall(r"placement: (emb_item/embeddings_part_\d) \[\d+, \d+\] on (\S+)", chief))
    assert {d.split("/device")[0] for d in pools.values()} == {"/job:ps/replica:0/task:0", "/job:ps/replica:0/task:1"}

    # the chief's checkpoint, restored into one process: bounded, collision-free maps of every table
    config, _ = run_dir.load_ctr_run(str(ps_dir))
    task = CTRTask(config)
    x, expected = restored_predictions(task, config)
    from mm_ads.training.trainer import Trainer

    trainer = Trainer(task, config.train, config.data.batch_size, config.model_dir)
    trainer.restore()
    tables = {t.name: t for t in trainer.model._flatten_layers() if isinstance(t, DynamicEmbedding)}
    assert sorted(maps) == sorted(f"{t}.id_to_row" for t in tables)
    steps = json.load(open(ps_dir / "metrics.json"))["steps"]
    assert steps == 3447 // 64
    for name, table in tables.items():
        mapped = _consistent(table)
        assert table.capacity == CAPACITY
        assert len(mapped) > (CAPACITY // 2 if name in ("emb_item", "emb_user") else 0), name
        # one clock for both workers: every call of every step counted once
        assert table.calls.numpy() == table.calls_per_step * steps, name
    # 300 items through a 120-row pool: the pool filled up and rows were handed over
    assert tables["emb_item"].num_free.numpy() < (CAPACITY + 99) // 100 + 1
    # the model reads its rows: the export serves the same id → row map as the checkpoint
    loaded = tf.saved_model.load(str(ps_dir / "export" / "1"))
    served = loaded.signatures["serving_default"](**x)["ctr"].numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
    item_ids = x["item_id"].numpy().reshape(-1)
    rows = tables["emb_item"].rows_of(tf.constant(item_ids)).numpy()
    assert (rows >= 0).any() and (rows < 0).any()  # held and evicted (or never admitted) items both scored

    metrics = json.load(open(ps_dir / "metrics.json"))
    assert metrics["logloss"] < 0.5 * math.log(2), metrics
    assert metrics["auc"] > 0.5, metrics
