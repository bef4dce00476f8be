"""`id_mapping="dynamic"` in the CTR model: config wiring, the default row through export, a training run."""

import json

import numpy as np
import pytest
import tensorflow as tf

from mm_ads.config import CTRModelConfig, DataConfig, ExperimentConfig, TrainConfig, config_from_values
from mm_ads.ctr.model import build_ctr_model
from mm_ads.data.spec import FeatureSpec
from mm_ads.export.saved_model import export_saved_model
from mm_ads.layers.dynamic_embedding import EMPTY_KEY, DynamicEmbedding
from tests.ctr.helpers import default_layout_inputs

SPEC = FeatureSpec.default(seq_len=4, vector_dim=0, num_items=100, num_categories=5, num_brands=7, num_users=10)
CFG = dict(embedding_dim=4, mlp_units=(8, 4), attention_units=(6,), activation="relu")


def _tables(model):
    return {layer.name: layer for layer in model.layers if isinstance(layer, DynamicEmbedding)}


def test_flags_select_dynamic_tables_and_bad_combinations_are_errors():
    c = config_from_values({"data_dir": "d", "model_dir": "m", "id_mapping": "dynamic", "table_capacity": "50",
                            "evict_after_steps": "7", "embedding_dim": "4"})
    assert (c.model.id_mapping, c.model.table_capacity, c.model.evict_after_steps) == ("dynamic", 50, 7)
    tables = _tables(build_ctr_model(SPEC, c.model))
    assert sorted(tables) == ["emb_brand", "emb_category", "emb_item", "emb_user"]
    assert {t.capacity for t in tables.values()} == {50}
    assert {t.evict_after_steps for t in tables.values()} == {7}
    # target item + behaviour history read the item table twice per step, the user table once
    assert tables["emb_item"].calls_per_step == 2 and tables["emb_user"].calls_per_step == 1
    spec_rows = _tables(build_ctr_model(SPEC, CTRModelConfig(id_mapping="dynamic", **CFG)))
    assert spec_rows["emb_item"].capacity == 101  # 0 = the FeatureSpec's rows
    for values, match in [({"id_mapping": "dynamic", "admit_after": "3"}, "admit_after=3"),
                          ({"table_capacity": "-1"}, "model.table_capacity"),
                          ({"evict_after_steps": "-2"}, "model.evict_after_steps")]:
        with pytest.raises(ValueError, match=match):
            config_from_values({"data_dir": "d", "model_dir": "m", **values})


def test_unseen_items_score_with_the_default_row_also_in_the_saved_model(tmp_path):
    model = build_ctr_model(SPEC, CTRModelConfig(id_mapping="dynamic", table_capacity=6, unseen_row="learned",
                                                 **CFG))
    tables = _tables(model)
    for i, t in enumerate(tables.values()):  # distinct, non-zero default rows
        t.unseen_embedding.assign(np.linspace(-1, 1, 4) * (i + 1))
    model(default_layout_inputs([4, 5], [1, 3]), training=True)  # items 4, 5 and the history's 1, 2, 3 take 5 of 6 rows
    item = tables["emb_item"]
    rows = item.rows_of(tf.constant([1, 2, 3, 4, 5, 50], tf.int64)).numpy()
    assert sorted(rows[:5].tolist()) == [0, 1, 2, 3, 4] and rows[5] == -1
    # 50, 77 and 10**15 never trained (ids of any size are welcome), 4 and 5 have rows
    x = default_layout_inputs([50, 77, 10 ** 15, 4, 5], [1] * 5)
    np.testing.assert_array_equal(item(x["item_id"]).numpy()[:3], np.tile(item.unseen_embedding.numpy(), (3, 1)))
    expected = model(x, training=False)["ctr"].numpy()
    assert expected[0] == expected[1] == expected[2]
    assert len({expected[0], expected[3], expected[4]}) == 3

    path = export_saved_model(model, str(tmp_path), version=1, spec=SPEC)
    loaded = tf.saved_model.load(path)
    served = loaded.signatures["serving_default"](**x)["ctr"].numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-6, atol=1e-7)
    assert served[0] == served[1] == served[2]
    np.testing.assert_array_equal(item.rows_of(tf.constant([1, 2, 3, 4, 5, 50], tf.int64)).numpy(), rows)
    # the served graph finds rows with the stock hash-table op, its table holds training's map
    ops = {n.op for f in loaded.signatures["serving_default"].graph.as_graph_def().library.function
           for n in f.node_def}
    assert "LookupTableFindV2" in ops
    saved = tf.saved_model.load(path)  # a second load: the map comes from the files, not this process
    np.testing.assert_allclose(saved.signatures["serving_default"](**x)["ctr"].numpy(), expected, rtol=1e-6)


def test_training_run_with_a_small_pool_stays_bounded_and_exports(tiny_world, tmp_path):
    from mm_ads.ctr.task import CTRTask
    from mm_ads.train import run
    from tests.ctr.helpers import restored_predictions

    cfg = ExperimentConfig(
        model_dir=str(tmp_path / "m"),
        data=DataConfig(data_dir=tiny_world, batch_size=128, eval_batch_size=512, shuffle_buffer=1000),
        model=CTRModelConfig(id_mapping="dynamic", table_capacity=120, evict_after_steps=2, **CFG),
        train=TrainConfig(max_steps=6, checkpoint_every=10, log_every=10, seed=0, sparse_optimizer="adam"),
    ).validate()
    metrics = run(cfg)
    assert json.load(open(tmp_path / "m" / "config.json"))["model"]["id_mapping"] == "dynamic"
    task = CTRTask(cfg)
    x, expected = restored_predictions(task, cfg)
    loaded = tf.saved_model.load(metrics["export_path"])
    np.testing.assert_allclose(loaded.signatures["serving_default"](**x)["ctr"].numpy(), expected, rtol=1e-5,
                               atol=1e-6)
    from mm_ads.training.trainer import Trainer

    trainer = Trainer(task, cfg.train, cfg.data.batch_size, cfg.model_dir)
    trainer.restore()
    item = _tables(trainer.model)["emb_item"]
    assert item._optimizer.value is trainer.sparse_opt  # the trainer hands its sparse optimizer to the tables
    assert item.calls.numpy() == 12  # 6 steps, 2 lookups each
    occupied = item.row_ids.numpy() != EMPTY_KEY
    held = item.row_ids.numpy()[occupied]
    assert item.last_seen.numpy()[occupied].min() >= 2  # the pass of step 4 freed the rows not read since step 1
    assert 0 < len(held) == item.size().numpy() <= 120 and item.num_free.numpy() == 120 - len(held)
    np.testing.assert_array_equal(item.rows_of(tf.constant(held)).numpy(), np.flatnonzero(occupied))
