"""Unseen and rare ids in the CTR model: config wiring, the default row through export, older model dirs."""

import json

import numpy as np
import pytest
import tensorflow as tf

from mm_ads.config import CTRModelConfig, ExperimentConfig, config_from_values
from mm_ads.ctr.model import build_ctr_model
from mm_ads.data.readers.taobao_mm import make_spec
from mm_ads.data.spec import Feature, FeatureSpec
from mm_ads.layers.sparse_embedding import SparseEmbedding
from tests.ctr.helpers import default_layout_inputs

SPEC = FeatureSpec.default(seq_len=4, vector_dim=0, num_items=100, num_categories=5, num_brands=7, num_users=10)
CFG = dict(embedding_dim=4, mlp_units=(8, 4), attention_units=(6,), activation="relu")


def _tables(model):
    return {layer.name: layer for layer in model.layers if isinstance(layer, SparseEmbedding)}


def test_auto_mapping_follows_the_feature_spec_and_flags_override_it():
    dense = _tables(build_ctr_model(SPEC, CTRModelConfig(**CFG)))
    assert {t.id_mapping for t in dense.values()} == {"dense"}
    assert {(t.admit_after, t.unseen_row) for t in dense.values()} == {(1, "zeros")}
    hashed = _tables(build_ctr_model(make_spec(seq_len=4, num_buckets=64), CTRModelConfig(**CFG)))
    assert {t.id_mapping for t in hashed.values()} == {"hash"} and len(hashed) == 10
    forced = _tables(build_ctr_model(SPEC, CTRModelConfig(id_mapping="hash", admit_after=3, unseen_row="learned",
                                                          **CFG)))
    assert {(t.id_mapping, t.admit_after, t.unseen_row) for t in forced.values()} == {("hash", 3, "learned")}
    c = config_from_values({"data_dir": "d", "model_dir": "m", "id_mapping": "dense", "admit_after": "5",
                            "unseen_row": "learned"})
    assert (c.model.id_mapping, c.model.admit_after, c.model.unseen_row) == ("dense", 5, "learned")
    for values, match in [({"id_mapping": "mod"}, "model.id_mapping"), ({"admit_after": "-1"}, "model.admit_after"),
                          ({"unseen_row": "random"}, "model.unseen_row")]:
        with pytest.raises(ValueError, match=match):
            config_from_values({"data_dir": "d", "model_dir": "m", **values})


def test_feature_spec_declares_the_mapping_per_table():
    spec = make_spec(seq_len=4, num_buckets=64)
    assert set(spec.id_mappings().values()) == {"hash"}
    assert FeatureSpec.from_json(spec.to_json()) == spec
    assert spec.to_json()["features"][0]["id_mapping"] == "hash"
    assert "id_mapping" not in SPEC.to_json()["features"][0]  # dense, the default: manifests read as before
    assert set(SPEC.id_mappings().values()) == {"dense"}
    with pytest.raises(ValueError, match="id_mapping must be one of"):
        Feature("x", "item", table="t", num_buckets=3, id_mapping="modulo")
    feats = [Feature("item_id", "item", table="item", num_buckets=9, id_mapping="hash"),
             Feature("hist_item_id", "history", shape=(4,), table="item", num_buckets=9),
             Feature("label", "label", dtype="float32")]
    with pytest.raises(ValueError, match="disagree on id_mapping"):
        FeatureSpec(feats, 4, 0)


def test_a_config_json_from_before_the_options_describes_the_older_model():
    old = ExperimentConfig(model_dir="m").to_json()
    for key in ("id_mapping", "admit_after", "unseen_row"):
        del old["model"][key]
    config = ExperimentConfig.from_json(json.loads(json.dumps(old)))
    assert (config.model.id_mapping, config.model.admit_after, config.model.unseen_row) == ("modulo", 0, "zeros")
    tables = _tables(build_ctr_model(SPEC, config.model))
    assert all(not t.non_trainable_weights and len(t.weights) == 1 for t in tables.values())  # no counts
    again = ExperimentConfig.from_json(ExperimentConfig(model_dir="m").to_json())
    assert (again.model.id_mapping, again.model.admit_after) == ("auto", 1)


def test_unseen_items_score_with_the_default_row_also_in_the_saved_model(tmp_path):
    from mm_ads.export.saved_model import export_saved_model

    model = build_ctr_model(SPEC, CTRModelConfig(unseen_row="learned", admit_after=2, **CFG))
    tables = _tables(model)
    for i, t in enumerate(tables.values()):  # distinct, non-zero default rows
        t.unseen_embedding.assign(np.linspace(-1, 1, 4) * (i + 1))
    train = default_layout_inputs([4, 4, 5, 6], [1, 1, 2, 3])
    model(train, training=True)
    model(train, training=True)  # 4 seen 4 times, 5 and 6 twice: admitted (k=2); 1, 2, 3 from the history too
    item = tables["emb_item"]
    counts = item.counts.numpy().copy()
    assert counts[[1, 2, 3, 4, 5, 6, 50]].tolist() == [8, 8, 8, 4, 2, 2, 0]
    # candidates: 50 and 77 never seen, 500 outside the table, 7 seen never, 4 and 5 admitted
    x = default_layout_inputs([50, 77, 500, 7, 4, 5], [1] * 6)
    np.testing.assert_array_equal(item(x["item_id"]).numpy()[:4], np.tile(item.unseen_embedding.numpy(), (4, 1)))
    expected = model(x, training=False)["ctr"].numpy()
    assert expected[0] == expected[1] == expected[2] == expected[3]
    assert len({expected[0], expected[4], expected[5]}) == 3

    loaded = tf.saved_model.load(export_saved_model(model, str(tmp_path), version=1, spec=SPEC))
    served = loaded.signatures["serving_default"](**x)["ctr"].numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-6, atol=1e-7)
    assert served[0] == served[1] == served[2] == served[3]
    exported = [v for v in loaded.variables if v.name == "emb_item/counts:0"]
    assert len(exported) == 1 and np.array_equal(exported[0].numpy(), counts)  # serving: the training counts
    np.testing.assert_array_equal(item.counts.numpy(), counts)  # serving counted nothing
