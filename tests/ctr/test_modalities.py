"""Several modalities in one model: spec, vector tables, layers, training record, export and resume checks."""

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from mm_ads.config import CTRModelConfig
from mm_ads.ctr.model import build_ctr_model, make_layer_names, model_input_names
from mm_ads.ctr.task import CTRTask
from mm_ads.data import pipeline
from mm_ads.data.dataset import Manifest
from mm_ads.data.spec import Feature, FeatureSpec, missing_flag_name
from mm_ads.data.vectors import write_vector_table
from mm_ads.export.saved_model import read_vector_record
from mm_ads.train import InputError, run
from mm_ads.training import vector_record
from tests.ctr.conftest import attribute_vectors
from tests.ctr.test_train import _config

SMALL = dict(embedding_dim=4, attention_units=(8,), mlp_units=(8,), make_units=(8, 4), make_attention_units=(8,),
             num_tiers=5)
BASE = FeatureSpec.default(seq_len=4, vector_dim=0, num_items=20, num_categories=3, num_brands=3, num_users=5)
SPEC = BASE.with_modalities({"image": 6, "text": 3})


@pytest.fixture
def world(tiny_world, tmp_path):
    """The tiny world with a second vector table, `text` (dim 8, its own encoder), next to `attributes` (dim 16)."""
    out = str(tmp_path / "world")
    shutil.copytree(tiny_world, out)
    items = pq.read_table(os.path.join(out, "items.parquet")).to_pydict()
    write_vector_table(os.path.join(out, "vectors", "text.parquet"), np.asarray(items["item_id"]),
                       attribute_vectors(items, dim=8, seed=3), encoder_version="test-text")
    path = os.path.join(out, "manifest.json")
    manifest = json.load(open(path))
    manifest["extra"]["vector_tables"]["text"] = "vectors/text.parquet"
    json.dump(manifest, open(path, "w"))
    return out


def test_spec_holds_named_modalities_with_their_own_dims():
    assert [(m.name, m.item, m.history, m.dim) for m in SPEC.modalities()] == [
        ("image", "item_vector_image", "hist_item_vector_image", 6),
        ("text", "item_vector_text", "hist_item_vector_text", 3)]
    assert SPEC["hist_item_vector_text"].shape == (4, 3) and SPEC.vector_dim == 0
    assert FeatureSpec.from_json(json.loads(json.dumps(SPEC.to_json()))) == SPEC
    # the single unnamed modality is the spec of before: its JSON has no modality field
    single = BASE.with_modalities({"": 8})
    assert single == BASE.with_vectors(8) and "modality" not in json.dumps(single.to_json())
    assert [(m.name, m.dim) for m in single.modalities()] == [("", 8)]
    assert SPEC.user_side_inputs(["item_vector_image", "hist_item_vector_text",
                                  missing_flag_name("hist_item_vector_image")]) == [
        "hist_item_vector_text", "hist_item_vector_image_missing"]


@pytest.mark.parametrize("make, error", [
    (lambda: BASE.with_modalities({"Image": 4}), "not a valid modality name"),
    (lambda: BASE.with_modalities({"": 4, "text": 4}), "cannot be combined"),
    (lambda: FeatureSpec(list(SPEC)[:-1] + [Feature("hist_item_vector_text", "vector", "float32", (4, 5),
                                                    source="hist_item_id", modality="text")], 4, 0),
     r"expected \(4, 3\) \(modality 'text' has dim 3\)"),
    (lambda: FeatureSpec(list(BASE.with_vectors(4)) + [Feature("item_vector_text", "vector", "float32", (3,),
                                                               source="item_id", modality="text")], 4, 4),
     "either all belong to the single unnamed modality"),
    (lambda: Feature("item_id", "item", table="item", num_buckets=3, modality="text"), "modality is for vector"),
])
def test_bad_modalities_are_refused(make, error):
    with pytest.raises(ValueError, match=error):
        make()


def test_vector_table_lists_name_one_modality_per_table(world):
    manifest = Manifest.load(world)
    table = {name: os.path.join(world, "vectors", f"{name}.parquet") for name in ("attributes", "text")}
    assert pipeline.resolve_modality_tables(manifest, "attributes") == [("", table["attributes"], "attributes")]
    assert pipeline.resolve_modality_tables(manifest, "attributes,text") == [
        ("attributes", table["attributes"], "attributes"), ("text", table["text"], "text")]
    assert pipeline.resolve_modality_tables(manifest, f"image=attributes,title={table['text']}") == [
        ("image", table["attributes"], "attributes"), ("title", table["text"], "text")]
    for value, error in (("attributes,attributes", "given twice"), ("attributes,,text", "empty entry"),
                         ("Image=attributes,text", "not a valid modality name"),
                         ("attributes,nope", "neither a vector table")):
        with pytest.raises(ValueError, match=error):
            pipeline.resolve_modality_tables(manifest, value, option="--vector_table")


def _inputs(spec, variant, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name in model_input_names(spec, variant):
        f = spec[name] if name in spec else None
        if f is None:  # a missing flag
            shape = spec[name[: -len("_missing")]].shape[:-1]
            out[name] = np.zeros((batch, *shape), np.float32)
        elif f.role == "vector":
            v = rng.normal(size=(batch, *f.shape)).astype(np.float32)
            out[name] = v / np.linalg.norm(v, axis=-1, keepdims=True)
        else:
            out[name] = rng.integers(1, f.num_buckets, size=(batch, *f.shape)).astype(np.int64)
    return out


@pytest.mark.parametrize("variant", ["vector", "simscore", "simtier", "make", "simtier_make"])
def test_every_modality_enters_the_model(variant):
    model = build_ctr_model(SPEC, CTRModelConfig(variant=variant, make_epochs=0, **SMALL))
    rng = np.random.default_rng(0)
    for w in model.weights:  # id embeddings start at zero: give DIN's keys something to attend with
        if "emb_" in w.path:
            w.assign(rng.normal(size=w.shape).astype(w.dtype))
    x = _inputs(SPEC, variant)
    base = model(x)["ctr"].numpy()
    for modality in ("image", "text"):  # new vectors of one modality only: the scores move
        other = dict(x, **{k: v for k, v in _inputs(SPEC, variant, seed=1).items() if k.endswith(modality)
                           and "missing" not in k})
        assert np.abs(model(other)["ctr"].numpy() - base).max() > 1e-6, modality
    names = {layer.name for layer in model.layers}
    own = {"vector": "vector_projection", "simscore": "sim_score", "simtier": "sim_tier"}.get(variant)
    if own:
        assert {f"{own}_image", f"{own}_text"} <= names and own not in names
    if variant in ("make", "simtier_make"):
        assert make_layer_names(model) == ["make"]


def test_simtier_per_modality_is_the_histogram_of_that_modality_alone():
    import keras

    model = build_ctr_model(SPEC, CTRModelConfig(variant="simtier", **SMALL))
    x = _inputs(SPEC, "simtier")
    for modality in ("image", "text"):
        layer = model.get_layer(f"sim_tier_{modality}")
        alone = layer(tf.constant(x[f"item_vector_{modality}"]), tf.constant(x[f"hist_item_vector_{modality}"]),
                      mask=tf.ones((3, 4), bool)).numpy()
        tiers = keras.Model(model.inputs, layer.output)(x).numpy()
        np.testing.assert_allclose(tiers, alone, rtol=1e-6)
        assert tiers.sum(axis=1).tolist() == [4.0] * 3  # every history item counted once


def test_make_fusion_concat_is_one_module_over_both_and_separate_one_per_modality():
    concat = build_ctr_model(SPEC, CTRModelConfig(variant="make", make_epochs=0, **SMALL))
    separate = build_ctr_model(SPEC, CTRModelConfig(variant="make", make_epochs=0, make_fusion="separate", **SMALL))
    assert make_layer_names(separate) == ["make_image", "make_text"]
    # MAKE's MLP reads v_MAKE (target and interest) and the target's missing flag: 2 × (6 + 3) + 1 inputs when the
    # modalities are concatenated, 2 × 6 + 1 and 2 × 3 + 1 when separate
    def mlp_inputs(model, layer):
        return next(w.shape[0] for w in model.get_layer(layer).weights if w.path == f"{layer}/mlp/dense_0/kernel")

    assert mlp_inputs(concat, "make") == 19
    assert (mlp_inputs(separate, "make_image"), mlp_inputs(separate, "make_text")) == (13, 7)
    only = build_ctr_model(SPEC, CTRModelConfig(variant="make_only", make_epochs=0, make_fusion="separate", **SMALL))
    x = _inputs(SPEC, "make_only")
    # make_only with separate modules: its logit is the sum of the modules' logits
    logits = [only.get_layer(f"make_{m}")(x[f"item_vector_{m}"], x[f"hist_item_vector_{m}"], mask=np.ones((3, 4), bool),
                                          target_missing=x[f"item_vector_{m}_missing"])["logit"].numpy()[:, 0]
              for m in ("image", "text")]
    np.testing.assert_allclose(only(x)["logit"].numpy(), sum(logits), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fusion", ["concat", "separate"])
def test_a_run_on_two_tables_records_both_and_exports_a_model_that_serves_the_same(world, tmp_path, fusion):
    cfg = _config(world, tmp_path / "m", "simtier_make", max_steps=4)
    cfg.data.vector_table = "attributes,text"
    cfg.model.make_epochs, cfg.model.make_fusion = 1, fusion
    metrics = run(cfg)
    record = json.load(open(tmp_path / "m" / vector_record.RECORD_FILE))["tables"]
    assert {m: (e["encoder_version"], e["dim"]) for m, e in record.items()} == {
        "attributes": ("test-attributes", 16), "text": ("test-text", 8)}
    assert set(metrics["vector_join"]) == {"attributes", "text"}
    assert metrics["vector_join"]["text"]["missing"] == 0 and metrics["vector_join"]["text"]["lookups"] > 0
    exported = read_vector_record(metrics["export_path"])["inputs"]
    assert {n: (e["modality"], e["encoder_version"], e["dim"]) for n, e in exported.items()} == {
        "item_vector_attributes": ("attributes", "test-attributes", 16),
        "hist_item_vector_attributes": ("attributes", "test-attributes", 16),
        "item_vector_text": ("text", "test-text", 8), "hist_item_vector_text": ("text", "test-text", 8)}
    # the SavedModel takes every modality's vectors by name and scores as the trained Keras model does
    task = CTRTask(cfg)
    model = task.build_model()
    from mm_ads.training.checkpoint import restore_model
    from mm_ads.training.model_dir import latest_checkpoint

    restore_model(model, latest_checkpoint(str(tmp_path / "m")))
    features, _ = next(iter(task.build_inputs("eval", 64, training=False)))
    inputs = task.model_inputs(features)
    assert {"item_vector_text", "hist_item_vector_attributes_missing"} <= set(inputs)
    loaded = tf.saved_model.load(metrics["export_path"])
    served = loaded.signatures["serving_default"](**inputs)["ctr"].numpy()
    np.testing.assert_allclose(served, model(inputs, training=False)["ctr"].numpy(), rtol=1e-5, atol=1e-6)
    assert make_layer_names(model) == (["make"] if fusion == "concat" else ["make_attributes", "make_text"])

    # resuming with one modality fewer is a change of vector tables: refused, naming it
    cfg.data.vector_table = "attributes"
    with pytest.raises(InputError, match="modality 'text' dropped"):
        run(cfg)


def test_quantile_tiers_with_two_modalities_are_refused_before_training(world, tmp_path):
    cfg = _config(world, tmp_path / "m", "simtier", max_steps=1)
    cfg.data.vector_table = "attributes,text"
    cfg.model.tier_calibration = "quantile"
    with pytest.raises(InputError, match="calibrates the tiers of one modality"):
        run(cfg)
    assert not os.path.exists(tmp_path / "m")
