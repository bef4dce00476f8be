"""String ids, tags and numeric features end to end: prepare → train → export → serving_default."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_ads.config import CTRModelConfig, DataConfig, ExperimentConfig, TrainConfig
from mm_ads.ctr.model import build_ctr_model, model_input_names
from mm_ads.ctr.task import CTRTask
from mm_ads.data.dataset import DatasetWriter, Manifest, read_ctr_columns
from mm_ads.data.spec import Feature, FeatureSpec
from mm_ads.train import run

S, ITEMS, USERS = 4, 40, 30
OCCUPATIONS = ["artist", "doctor", "engineer", "lawyer", "student"]
GENRES = ["Action", "Comedy", "Drama", "Horror", "Sci-Fi"]


def feature_spec():
    base = FeatureSpec.default(seq_len=S, vector_dim=0, num_items=ITEMS, num_categories=4, num_brands=3,
                               num_users=USERS, with_history_side=False)
    extra = [
        Feature("age", "user", "float32", kind="numeric", mean=35.0, std=12.0),
        Feature("income", "user", "float32", kind="numeric", boundaries=[20.0, 50.0], nan_value=-1.0),
        Feature("occupation", "user", "string", table="occupation", num_buckets=32),
        Feature("genres", "item", "string", (3,), table="genre", num_buckets=16, kind="tags"),
        Feature("hist_query", "history", "string", (S,), table="query", num_buckets=16),
    ]
    return FeatureSpec(list(base) + extra, S, 0)


def columns(n, seed):
    """Rows whose label depends on the string, tags and numeric features (so a model can learn them)."""
    rng = np.random.default_rng(seed)
    user = rng.integers(1, USERS + 1, n)
    item = rng.integers(1, ITEMS + 1, n)
    occupation = np.array(OCCUPATIONS)[user % len(OCCUPATIONS)]
    genres = [list(np.array(GENRES)[[i % 5, (i * 3) % 5]][: 1 + i % 2]) for i in item]
    age = (18 + user * 1.5).astype(np.float32)
    income = rng.uniform(0, 80, n).astype(np.float32)
    income[::97] = np.nan  # the declared fallback: -1, counted
    score = (occupation == "doctor") * 1.5 + np.array(["Comedy" in g for g in genres]) * 1.5 + (age > 40) - 1.0
    label = (rng.random(n) < 1 / (1 + np.exp(-score))).astype(np.float32)
    hist = rng.integers(0, ITEMS + 1, (n, S))
    return {
        "user_id": user, "age": age, "income": income, "occupation": occupation,
        "item_id": item, "category_id": item % 4 + 1, "brand_id": item % 3 + 1, "genres": genres,
        "hist_item_id": hist, "hist_query": np.where(hist > 0, np.char.add("q", (hist % 7).astype(str)), ""),
        "timestamp": np.arange(n), "item_created_at": np.zeros(n, np.int64), "label": label,
    }


@pytest.fixture(scope="module")
def kinds_world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("kinds") / "world")
    with DatasetWriter(out, name="kinds", format="test", spec=feature_spec(), seed=0) as w:
        w.write_ctr("train", columns(3000, 0), num_shards=2)
        w.write_ctr("test", columns(600, 1))
        w.write_item_stats(np.arange(1, ITEMS + 1))
    return out


def test_records_hold_the_declared_values(kinds_world):
    manifest = Manifest.load(kinds_world)
    assert manifest.spec == feature_spec()
    # NaN incomes replaced by nan_value and counted per split write
    nan_rows = len(range(0, 3000, 97)) + len(range(0, 600, 97))
    assert manifest.extra["feature_fallbacks"] == {"income": {"nan_filled": nan_rows}}
    got = read_ctr_columns(kinds_world, "test", ["occupation", "genres", "income", "age"])
    want = columns(600, 1)
    assert got["occupation"].tolist() == [s.encode() for s in want["occupation"]]
    assert got["genres"][0].tolist() == [g.encode() for g in want["genres"][0]] + [b""] * (3 - len(want["genres"][0]))
    np.testing.assert_array_equal(got["income"][::97], -1.0)
    np.testing.assert_allclose(got["age"], want["age"])


def _config(data_dir, model_dir):
    return ExperimentConfig(
        model_dir=str(model_dir),
        data=DataConfig(data_dir=data_dir, batch_size=64, eval_batch_size=256, shuffle_buffer=500),
        model=CTRModelConfig(variant="id", embedding_dim=4, attention_units=(8,), mlp_units=(16,), activation="relu"),
        train=TrainConfig(epochs=1, checkpoint_every=1000, log_every=1000, seed=0, dense_learning_rate=0.01),
    ).validate()


def test_train_export_serve_string_and_numeric_features(kinds_world, tmp_path):
    cfg = _config(kinds_world, tmp_path / "m")
    metrics = run(cfg)
    assert metrics["auc"] > 0.6  # the string, tags and numeric features carry the signal
    fn = tf.saved_model.load(metrics["export_path"]).signatures["serving_default"]
    inputs = fn.structured_input_signature[1]
    task = CTRTask(cfg)
    assert set(inputs) == set(model_input_names(task.spec, "id"))
    assert inputs["occupation"].dtype == tf.string and inputs["genres"].dtype == tf.string
    assert inputs["genres"].shape.as_list() == [None, 3] and inputs["age"].dtype == tf.float32
    assert inputs["income"].dtype == tf.float32 and inputs["user_id"].dtype == tf.int64
    from tests.ctr.helpers import restored_predictions

    x, expected = restored_predictions(task, cfg)
    assert x["occupation"].dtype == tf.string
    np.testing.assert_allclose(fn(**x)["ctr"].numpy(), expected, rtol=1e-5, atol=1e-6)
    # a hand-written request: what a serving client sends
    request = {
        "user_id": tf.constant([3, 3], tf.int64), "age": tf.constant([50.0, 50.0]),
        "income": tf.constant([60.0, 60.0]), "occupation": tf.constant(["doctor", "doctor"]),
        "item_id": tf.constant([5, 6], tf.int64), "category_id": tf.constant([2, 3], tf.int64),
        "brand_id": tf.constant([3, 1], tf.int64), "genres": tf.constant([["Comedy", "", ""], ["Drama", "Horror", ""]]),
        "hist_item_id": tf.constant([[0, 0, 4, 9]] * 2, tf.int64),
        "hist_query": tf.constant([["", "", "q4", "q2"]] * 2),
    }
    model = task.build_model()
    model.set_weights(_restored_model(task, cfg).get_weights())
    scores = fn(**request)["ctr"].numpy()
    np.testing.assert_allclose(scores, model(request, training=False)["ctr"].numpy(), rtol=1e-5, atol=1e-6)
    # user_candidates: the user side (user/context features, the sequences) once, batch 1
    loaded = tf.saved_model.load(metrics["export_path"]).signatures["user_candidates"]
    user_side = set(task.spec.user_side_inputs(list(request)))
    assert {"age", "income", "occupation", "hist_query"} <= user_side and "genres" not in user_side
    once = {k: v[:1] if k in user_side else v for k, v in request.items()}
    np.testing.assert_allclose(loaded(**once)["ctr"].numpy(), scores, rtol=1e-5, atol=1e-6)


def _restored_model(task, cfg):
    from mm_ads.training.trainer import Trainer

    trainer = Trainer(task, cfg.train, cfg.data.batch_size, cfg.model_dir)
    trainer.restore()
    return trainer.model


def test_model_reads_every_kind_and_padding_is_ignored():
    spec = feature_spec()
    # admit_after=0: every id reads its own (initial) row in this untrained model
    model = build_ctr_model(spec, CTRModelConfig(variant="id", embedding_dim=4, attention_units=(8,), mlp_units=(8,),
                                                 admit_after=0))
    names = {t.name: t.dtype for t in model.inputs}
    assert names["occupation"] == "string" and names["genres"] == "string" and names["age"] == "float32"
    layers = {layer.name for layer in model.layers}
    assert {"hash_occupation", "hash_genre", "hash_query", "pool_genres", "pool_hist_query", "numeric_age",
            "bucketize_income", "emb_income"} <= layers
    assert model.get_layer("emb_income").num_buckets == 3
    x = {"user_id": [1, 2], "age": [20.0, 60.0], "income": [10.0, 70.0], "occupation": ["doctor", "artist"],
         "item_id": [1, 2], "category_id": [1, 2], "brand_id": [1, 2],
         "genres": [["Comedy", "", ""], ["Drama", "", ""]],
         "hist_item_id": [[0, 0, 1, 2], [0, 3, 1, 2]], "hist_query": [["", "", "q1", "q2"], ["", "q3", "q1", "q2"]]}
    x = {k: tf.constant(v) for k, v in x.items()}
    base = model(x)["logit"].numpy()
    # a tags list in another padded order with one tag: the same mean-pooled embedding
    same = dict(x, genres=tf.constant([["", "Comedy", ""], ["", "", "Drama"]]))
    np.testing.assert_allclose(model(same)["logit"].numpy(), base, rtol=1e-6)
    changed = dict(x, occupation=tf.constant(["lawyer", "artist"]))
    out = model(changed)["logit"].numpy()
    assert out[0] != base[0] and out[1] == base[1]
    assert json.loads(json.dumps(spec.to_json())) == spec.to_json()


def test_int64_tags_share_a_table_with_an_id_and_sum_pool():
    base = FeatureSpec.default(seq_len=2, vector_dim=0, num_items=5, num_categories=4, num_brands=2, num_users=3,
                               with_history_side=False)
    spec = FeatureSpec(list(base) + [Feature("all_categories", "item", shape=(3,), table="category", num_buckets=5,
                                             kind="tags", combiner="sum")], 2, 0)
    model = build_ctr_model(spec, CTRModelConfig(variant="id", embedding_dim=4, attention_units=(8,), mlp_units=(8,),
                                                 admit_after=0))
    table = model.get_layer("emb_category")
    x = {"user_id": [1], "item_id": [2], "category_id": [1], "brand_id": [1], "hist_item_id": [[0, 3]],
         "all_categories": [[2, 3, 0]]}
    x = {k: tf.constant(v, tf.int64) for k, v in x.items()}
    pool = keras.Model(model.inputs, model.get_layer("pool_all_categories").output)
    rows = keras.ops.convert_to_numpy(table(tf.constant([2, 3], tf.int64)))
    np.testing.assert_allclose(pool(x).numpy()[0], rows.sum(0), rtol=1e-6)  # padding 0 adds nothing
    same = dict(x, all_categories=tf.constant([[0, 3, 2]], tf.int64))
    np.testing.assert_allclose(model(same)["logit"].numpy(), model(x)["logit"].numpy(), rtol=1e-6)


def test_dynamic_tables_hold_the_int64_ids_and_the_other_kinds_keep_fixed_tables():
    from mm_ads.layers.dynamic_embedding import DynamicEmbedding
    from mm_ads.layers.sparse_embedding import SparseEmbedding

    spec = feature_spec()
    model = build_ctr_model(spec, CTRModelConfig(variant="id", embedding_dim=4, attention_units=(8,), mlp_units=(8,),
                                                 id_mapping="dynamic", table_capacity=20))
    kinds = {layer.name: type(layer) for layer in model.layers
             if isinstance(layer, (DynamicEmbedding, SparseEmbedding))}
    assert {n for n, k in kinds.items() if k is DynamicEmbedding} == {"emb_user", "emb_item", "emb_category",
                                                                      "emb_brand"}
    # hashed strings, tags, a pooled sequence and numeric buckets: fixed-size rows of their own tables
    assert {n for n, k in kinds.items() if k is SparseEmbedding} == {"emb_occupation", "emb_genre", "emb_query",
                                                                     "emb_income"}
    assert model.get_layer("emb_item").calls_per_step == 2 and model.get_layer("emb_user").calls_per_step == 1
