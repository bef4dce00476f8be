import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_ads.config import CTRModelConfig
from mm_ads.ctr.model import build_ctr_model, model_input_names
from mm_ads.data.spec import FeatureSpec
from mm_ads.layers.sparse_embedding import SparseEmbedding
from tests.ctr.helpers import random_inputs

SPEC = FeatureSpec.default(seq_len=5, vector_dim=8, num_items=100, num_categories=5, num_brands=7, num_users=10,
                           profile_buckets=(3,))
CFG = dict(embedding_dim=4, mlp_units=(8, 4), attention_units=(6,), activation="relu")


@pytest.mark.parametrize("variant", ["id", "vector", "simscore", "simtier"])
def test_variants_build_predict_and_round_trip(variant, tmp_path):
    model = build_ctr_model(SPEC, CTRModelConfig(variant=variant, **CFG))
    assert sorted(t.name for t in model.inputs) == sorted(model_input_names(SPEC, variant))
    x = random_inputs(model)
    out = model(x)
    assert out["ctr"].shape == (3,) and np.all((out["ctr"].numpy() > 0) & (out["ctr"].numpy() < 1))
    np.testing.assert_allclose(out["ctr"], tf.sigmoid(out["logit"]), rtol=1e-6)
    path = str(tmp_path / "m.keras")
    model.save(path)
    again = keras.models.load_model(path)
    np.testing.assert_allclose(again(x)["ctr"], out["ctr"], rtol=1e-6)


def test_item_table_is_shared_and_sparse():
    model = build_ctr_model(SPEC, CTRModelConfig(variant="id", **CFG))
    tables = [layer for layer in model.layers if isinstance(layer, SparseEmbedding)]
    assert sorted(t.name for t in tables) == ["emb_brand", "emb_category", "emb_item", "emb_user",
                                              "emb_user_profile_0"]
    x = random_inputs(model)
    item = [t for t in tables if t.name == "emb_item"][0]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x)["logit"])
    g = tape.gradient(loss, item.embeddings.value)
    assert isinstance(g, tf.IndexedSlices)
    touched = set(np.unique(np.concatenate([x["item_id"].numpy().ravel(), x["hist_item_id"].numpy().ravel()])))
    rows = set(np.flatnonzero(np.abs(tf.convert_to_tensor(g).numpy()).sum(1) > 0))
    assert rows <= touched - {0}


def test_simtier_output_depends_on_vectors_and_ignores_padding():
    model = build_ctr_model(SPEC, CTRModelConfig(variant="simtier", **CFG))
    x = random_inputs(model, batch=2)
    hist = x["hist_item_id"].numpy()
    hist[:, :2] = 0  # padding at the left
    x["hist_item_id"] = tf.constant(hist)
    base = model(x)["ctr"].numpy()
    noisy = dict(x)
    v = x["hist_item_vector"].numpy()
    v[:, :2] = 1000.0  # garbage under padding
    noisy["hist_item_vector"] = tf.constant(v)
    np.testing.assert_allclose(model(noisy)["ctr"].numpy(), base, rtol=1e-6)
    moved = dict(x)
    moved["item_vector"] = -x["item_vector"]
    assert not np.allclose(model(moved)["ctr"].numpy(), base)


def test_multimodal_variant_needs_vectors():
    spec = FeatureSpec.default(seq_len=5, vector_dim=0, num_items=100, num_categories=5, num_brands=7, num_users=10)
    with pytest.raises(ValueError, match="vector table"):
        build_ctr_model(spec, CTRModelConfig(variant="simtier", **CFG))
