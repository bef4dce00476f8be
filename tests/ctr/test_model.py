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


@pytest.mark.parametrize("variant", ["id", "vector", "simscore", "simtier", "make", "simtier_make", "make_only"])
def test_user_candidates_signature_equals_serving_default(variant, tmp_path):
    """The exported `user_candidates` signature (user side once, batch 1) scores like `serving_default` on the
    user side repeated per candidate; the user-side inputs are exactly the user, context and history ones."""
    from mm_ads.export.saved_model import USER_SIGNATURE, export_saved_model

    keras.utils.set_random_seed(0)
    model = build_ctr_model(SPEC, CTRModelConfig(variant=variant, activation="dice" if variant == "simscore" else
                                                 "relu", **{k: v for k, v in CFG.items() if k != "activation"}))
    names = [t.name for t in model.inputs]
    user = SPEC.user_side_inputs(names)
    expected_user = {"user_id", "user_profile_0", "hist_item_id", "hist_category_id", "hist_brand_id",
                     "hist_item_vector", "hist_item_vector_missing"} & set(names)
    assert set(user) == expected_user and expected_user
    rng = np.random.default_rng(1)
    one = random_inputs(model, batch=1, seed=2, min_id=1)
    cand = random_inputs(model, batch=9, seed=3, min_id=1)
    x_user = {k: (one[k] if k in user else cand[k]) for k in names}
    x_user["hist_item_id"] = tf.constant([[0, 0, 3, 4, 5]], tf.int64)  # left padding
    if "hist_item_vector_missing" in x_user:
        x_user["hist_item_vector_missing"] = tf.constant([[0, 0, 1, 0, 0]], tf.float32)
        x_user["item_vector_missing"] = tf.constant(rng.random(9) < 0.3, tf.float32)
    x_full = {k: tf.repeat(v, 9, axis=0) if k in user else v for k, v in x_user.items()}
    model(x_full, training=True)  # the ids occur in training: they are admitted to their own rows
    loaded = tf.saved_model.load(export_saved_model(model, str(tmp_path), version=1, spec=SPEC))
    full = loaded.signatures["serving_default"](**x_full)["ctr"].numpy()
    got = loaded.signatures[USER_SIGNATURE](**x_user)["ctr"].numpy()
    assert got.shape == (9,)
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full, model(x_full)["ctr"].numpy(), rtol=1e-5, atol=1e-6)
    assert np.std(full) > 0  # the candidates are told apart
    specs = loaded.signatures[USER_SIGNATURE].structured_input_signature[1]
    assert {k for k, s in specs.items() if s.shape[0] == 1} == set(user)  # the contract the server checks
    assert all(specs[k].shape[0] is None for k in names if k not in user)
