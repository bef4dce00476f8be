"""New-item training (`cold_item_rate`): the drawn examples, the tables' forced default row, the model's cold path
(MAKE's outputs unused for items without an admitted row), its export, and the config rules."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_ads.config import CTRModelConfig, ExperimentConfig, config_from_values
from mm_ads.ctr import make as make_lib
from mm_ads.ctr.model import MAKE_LAYER, build_ctr_model
from mm_ads.data.spec import FeatureSpec
from mm_ads.layers import ColdItems, DynamicEmbedding, SparseEmbedding

SPEC = FeatureSpec.default(seq_len=4, vector_dim=8, num_items=100, num_categories=5, num_brands=7, num_users=10)
CFG = dict(embedding_dim=4, mlp_units=(8, 4), attention_units=(6,), activation="relu", num_tiers=5,
           make_units=(6, 4), make_attention_units=(6,), make_epochs=0)


def _inputs(items, seed=0):
    """Inputs of a model of SPEC for the target items given: the same user and history for every row."""
    rng = np.random.default_rng(seed)
    n = len(items)
    hist_vec = np.tile(rng.normal(size=(1, 4, 8)).astype(np.float32), (n, 1, 1))
    return {
        "user_id": tf.constant([3] * n, tf.int64),
        "item_id": tf.constant(items, tf.int64),
        "category_id": tf.constant([1] * n, tf.int64),
        "brand_id": tf.constant([2] * n, tf.int64),
        "hist_item_id": tf.constant([[0, 1, 2, 3]] * n, tf.int64),
        "hist_category_id": tf.constant([[0, 1, 1, 2]] * n, tf.int64),
        "hist_brand_id": tf.constant([[0, 1, 2, 2]] * n, tf.int64),
        "item_vector": tf.constant(rng.normal(size=(n, 8)).astype(np.float32)),
        "hist_item_vector": tf.constant(hist_vec),
        "item_vector_missing": tf.zeros([n]),
        "hist_item_vector_missing": tf.zeros([n, 4]),
    }


def test_cold_items_draws_the_rate_in_training_only_and_repeats_with_its_seed():
    ids = tf.range(20_000, dtype=tf.int64)
    a, b = ColdItems(0.2, seed=7), ColdItems(0.2, seed=7)
    drawn = a(ids, training=True).numpy()
    assert drawn.dtype == bool and abs(drawn.mean() - 0.2) < 0.01
    np.testing.assert_array_equal(drawn, b(ids, training=True).numpy())  # same seed, same draws
    assert (a(ids, training=True).numpy() != drawn).any()  # the next step draws again
    assert not ColdItems(0.2, seed=7)(ids, training=False).numpy().any()
    assert not ColdItems(0.0)(ids, training=True).numpy().any()
    assert ColdItems.from_config(a.get_config()).get_config() == a.get_config()
    for rate in (-0.1, 1.0):
        with pytest.raises(ValueError, match="rate must be in"):
            ColdItems(rate)


@pytest.mark.parametrize("unseen_row", ["zeros", "learned"])
def test_forced_positions_read_the_default_row_and_get_no_gradient(unseen_row):
    table = SparseEmbedding(10, 3, padding_id=0, admit_after=1, unseen_row=unseen_row)
    table.build((None,))
    if table.unseen_embedding is not None:
        table.unseen_embedding.assign([0.5, -1.0, 2.0])
    default = np.zeros(3) if unseen_row == "zeros" else np.array([0.5, -1.0, 2.0])
    ids = tf.constant([1, 2, 3, 0], tf.int64)
    force = tf.constant([False, True, False, False])
    with tf.GradientTape() as tape:
        out, admitted = table(ids, training=True, force_default=force, return_admitted=True)
        loss = tf.reduce_sum(out)
    np.testing.assert_array_equal(admitted.numpy(), [True, False, True, False])  # padding reads no row either
    np.testing.assert_allclose(out.numpy()[1], default)
    np.testing.assert_allclose(out.numpy()[[0, 2]], table.embeddings.numpy()[[1, 3]])
    grad = tape.gradient(loss, table.embeddings)
    assert sorted(grad.indices.numpy().tolist()) == [1, 3]  # the forced id's row is not touched
    assert table.counts.numpy()[[1, 2, 3]].tolist() == [1, 1, 1]  # it was still seen
    # serving: ids never trained are not admitted, whatever the forcing
    _, admitted = table(tf.constant([2, 7], tf.int64), return_admitted=True)
    np.testing.assert_array_equal(admitted.numpy(), [True, False])


def test_dynamic_tables_say_which_ids_hold_a_row():
    table = DynamicEmbedding(capacity=8, output_dim=3, padding_id=0)
    table(tf.constant([5, 6], tf.int64), training=True)
    out, admitted = table(tf.constant([5, 6, 9, 0], tf.int64), return_admitted=True)
    np.testing.assert_array_equal(admitted.numpy(), [True, True, False, False])
    _, admitted = table(tf.constant([5, 6], tf.int64), training=True, force_default=tf.constant([True, False]),
                        return_admitted=True)
    np.testing.assert_array_equal(admitted.numpy(), [False, True])


def test_new_items_take_the_cold_path_without_make_and_with_the_default_row(tmp_path):
    from mm_ads.export.saved_model import export_saved_model

    keras.utils.set_random_seed(0)
    model = build_ctr_model(SPEC, CTRModelConfig(variant="simtier_make", cold_item_rate=0.5, **CFG))
    assert model.get_layer("cold_items").rate == 0.5
    model(_inputs([1, 2, 3, 4, 5]), training=True)  # items 1-5 admitted; 60 and 70 never trained
    x = _inputs([60, 70, 4, 5])
    x["item_vector"] = tf.concat([x["item_vector"][:1], x["item_vector"][:1], x["item_vector"][2:]], 0)
    before = model(x, training=False)["ctr"].numpy()
    for v in model.get_layer(MAKE_LAYER).weights:  # another MAKE
        v.assign(v + 0.5)
    after = model(x, training=False)["ctr"].numpy()
    np.testing.assert_allclose(after[:2], before[:2], rtol=1e-6)  # new items: MAKE is not used
    assert not np.allclose(after[2:], before[2:], rtol=1e-3)  # admitted items: it is
    # a new item reads the default row (zeros): it scores like any other new item of the same features and vector
    np.testing.assert_allclose(after[0], after[1], rtol=1e-6)
    # without the option the same weights give MAKE's outputs to new items too
    plain = build_ctr_model(SPEC, CTRModelConfig(variant="simtier_make", **CFG))
    assert "cold_items" not in [layer.name for layer in plain.layers]
    loaded = tf.saved_model.load(export_saved_model(model, str(tmp_path), version=1, spec=SPEC))
    served = loaded.signatures["serving_default"](**x)["ctr"].numpy()
    np.testing.assert_allclose(served, after, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(served[0], served[1], rtol=1e-6)


def test_training_draws_cold_examples_that_read_the_default_row():
    keras.utils.set_random_seed(0)
    model = build_ctr_model(SPEC, CTRModelConfig(variant="id", cold_item_rate=0.5, **CFG))
    x = {t.name: v for t in model.inputs for k, v in _inputs([4] * 64).items() if k == t.name}
    model(x, training=True)
    trained = model(x, training=True)["logit"].numpy()
    # one admitted item in every row: in training about half of the rows read the default row (two values),
    # at evaluation none does (one value)
    assert len(np.unique(np.round(trained, 5))) == 2
    assert 10 < np.sum(np.isclose(trained, trained.min(), atol=1e-5)) < 54
    assert len(np.unique(np.round(model(x, training=False)["logit"].numpy(), 5))) == 1


def test_config_rules_and_make_pretraining_is_shared(tiny_world):
    c = config_from_values({"data_dir": "d", "model_dir": "m", "cold_item_rate": "0.1"})
    assert c.model.cold_item_rate == 0.1 and ExperimentConfig(model_dir="m").model.cold_item_rate == 0.0
    for values, match in [({"cold_item_rate": "1.0"}, "cold_item_rate must be in"),
                          ({"cold_item_rate": "0.1", "admit_after": "0"}, "needs the item table to know")]:
        with pytest.raises(ValueError, match=match):
            config_from_values({"data_dir": "d", "model_dir": "m", **values})
    assert config_from_values({"data_dir": "d", "model_dir": "m", "cold_item_rate": "0.1", "admit_after": "0",
                               "id_mapping": "dynamic"}).model.cold_item_rate == 0.1
    # MAKE alone has no id table: the rate does not change its pre-training
    base = dict(data_dir=tiny_world, model_dir="m", variant="simtier_make", vector_table="attributes")
    on = config_from_values({**base, "cold_item_rate": "0.2"})
    assert make_lib.pretrain_config(on).to_json() == make_lib.pretrain_config(config_from_values(base)).to_json()
