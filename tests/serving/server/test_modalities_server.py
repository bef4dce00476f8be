"""Two modalities online: one index table per modality behind one interface, the near-line join, the version check
and ranking through the real server (an item with an image vector but no text vector is a counted fallback)."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from mm_ads.config import CTRModelConfig
from mm_ads.ctr.model import build_ctr_model
from mm_ads.data.spec import FeatureSpec
from mm_ads.export.saved_model import export_saved_model
from mm_ads.serving.index.index_table import IndexTableError, open_index_table
from mm_ads.serving.index.modalities import ModalityIndexTables, open_index_tables, parse_index_tables
from mm_ads.serving.nearline.impressions import IndexTableJoin
from mm_ads.serving.server.model_manager import vector_mismatch
from mm_ads.serving.server.prediction_server import PredictionServer, ServerConfig
from mm_ads.serving.server.ranking import Catalogue
from tests.serving.server import server_helpers as h

DIMS = {"image": 8, "text": 4}
WITH = {"image": 40, "text": 30}  # items 1..40 have an image vector, 1..30 a text vector
ENCODERS = {"image": "enc-image", "text": "enc-text"}


def _spec():
    base = FeatureSpec.default(seq_len=h.SEQ_LEN, vector_dim=0, num_items=h.NUM_ITEMS, num_categories=h.NUM_CATEGORIES,
                               num_brands=h.NUM_BRANDS, num_users=h.NUM_USERS, profile_buckets=(3,))
    return base.with_modalities(DIMS)


def _vectors(modality):
    rng = np.random.default_rng(len(modality))
    return rng.normal(size=(h.NUM_ITEMS + 1, DIMS[modality])).astype(np.float32)  # row i = item i


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("modalities_world")
    spec = _spec()
    keras.utils.set_random_seed(3)
    model = build_ctr_model(spec, CTRModelConfig(variant="simtier_make", make_epochs=0, **h.SMALL_MODEL))
    base = str(root / "export")
    records = {m: {"encoder_version": ENCODERS[m], "dim": d, "name": m} for m, d in DIMS.items()}
    export_saved_model(model, base, version=1, spec=spec, vectors=records)
    tables = {}
    for m in DIMS:
        t = open_index_table(str(root / f"{m}.db"), dim=DIMS[m], encoder_version=ENCODERS[m], create=True)
        ids = np.arange(1, WITH[m] + 1, dtype=np.int64)
        t.put_many(ids, _vectors(m)[ids], ENCODERS[m])
        tables[m] = t
    catalogue = Catalogue.load(h.write_catalogue(str(root / "items.parquet")), ["category_id", "brand_id"])
    reference = tf.saved_model.load(os.path.join(base, "1")).signatures["serving_default"]
    yield {"spec": spec, "base": base, "tables": ModalityIndexTables(tables), "catalogue": catalogue,
           "reference": reference, "root": root}
    for t in tables.values():
        t.close()


@pytest.fixture(scope="module")
def server(world):
    config = ServerConfig(model_base_path=world["base"], grpc_port=0, rest_port=0, max_candidates=64,
                          poll_interval_s=30, warmup_batch_sizes=(1, 4))
    srv = PredictionServer(config, world["tables"], world["catalogue"], world["spec"]).start()
    yield srv
    srv.stop()


def _manual_inputs(world, candidates, history, features):
    """The model inputs of a ranking call assembled by hand, every modality from its own table."""
    x = {k: v for k, v in h.manual_rank_inputs(h.tiny_spec(), candidates, history, features,
                                               world["tables"]["image"]).items() if "vector" not in k}
    n, s = len(candidates), h.SEQ_LEN
    hist = list(history)[-s:]
    pad = s - len(hist)
    for m, table in world["tables"].items():
        vec, found = table.get_many(np.array(candidates, np.int64))
        x[f"item_vector_{m}"], x[f"item_vector_{m}_missing"] = vec, (~found).astype(np.float32)
        hv, hm = np.zeros((s, DIMS[m]), np.float32), np.zeros(s, np.float32)
        v, f = table.get_many(np.array(hist, np.int64))
        hv[pad:], hm[pad:] = v, (~f).astype(np.float32)
        x[f"hist_item_vector_{m}"] = np.tile(hv[None], (n, 1, 1))
        x[f"hist_item_vector_{m}_missing"] = np.tile(hm[None], (n, 1))
    return x


def test_index_table_values_name_one_table_per_modality(tmp_path):
    assert parse_index_tables("runs/index.db") == [("", "runs/index.db")]
    assert parse_index_tables("redis://h:1/0?prefix=a") == [("", "redis://h:1/0?prefix=a")]
    assert parse_index_tables("image=a.db,text=redis://h:1/0?prefix=t") == [
        ("image", "a.db"), ("text", "redis://h:1/0?prefix=t")]
    for value, error in (("image=a.db,b.db", "is not '<modality>=<value>'"), ("image=a,image=b", "given twice"),
                         ("", "is empty")):
        with pytest.raises(IndexTableError, match=error):
            parse_index_tables(value)
    for m in DIMS:
        open_index_table(str(tmp_path / f"{m}.db"), dim=DIMS[m], encoder_version=ENCODERS[m], create=True).close()
    value = f"image={tmp_path / 'image.db'},text={tmp_path / 'text.db'}"
    with open_index_tables(value) as tables:
        assert tables.dims == DIMS and tables.encoder_versions == ENCODERS
        tables["text"].put_many([7], np.ones((1, 4), np.float32), "enc-text")
        got = tables.get_many([7, 8])
        assert got["text"][1].tolist() == [True, False] and got["image"][1].tolist() == [False, False]
        assert got["image"][0].shape == (2, 8)
    # a modality whose table is missing: the error names it
    with pytest.raises(IndexTableError, match="modality 'sound'"):
        open_index_tables(f"{value},sound={tmp_path / 'nope.db'}")


def test_rank_with_two_modalities_through_the_real_server(world, server, stub):
    candidates = [3, 35, 45, 999, 8]  # 35: image vector only; 45, 999: neither
    history = [5, 33, 41, 2, 12, 7]  # 33: image only; 41: neither
    features = {"user_id": 4, "user_profile_0": 2}
    x = _manual_inputs(world, candidates, history, features)
    expected = world["reference"](**{k: tf.constant(v) for k, v in x.items()})["ctr"].numpy()
    before = server.stats.snapshot()
    result = server.rank(candidates, history, features)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-6, atol=1e-7)
    assert result.found.tolist() == [True, False, False, False, True]  # found = every modality's vector
    after = server.stats.snapshot()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta["candidates_unknown"] == 3 and delta["candidates_unknown_text"] == 3
    assert delta["candidates_unknown_image"] == 2
    assert delta["history_unknown_text"] == 2 and delta["history_unknown_image"] == 1
    # the official gRPC client: Predict with signature_name="rank" and ids only
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "ctr", "rank"
    for k, v in {"item_id": np.array(candidates, np.int64), "hist_item_id": np.array(history, np.int64),
                 "user_id": np.array(4, np.int64), "user_profile_0": np.array([2], np.int64)}.items():
        request.inputs[k].CopyFrom(tf.make_tensor_proto(v))
    response = stub.Predict(request, timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["ctr"]), expected, rtol=1e-6, atol=1e-7)
    status, body = h.rest_call(server.rest_port, "POST", "/v1/models/ctr:rank",
                               {"candidates": candidates, "history": history, "user_id": 4,
                                "features": {"user_profile_0": 2}})
    assert status == 200, body
    np.testing.assert_allclose(body["scores"], expected, rtol=1e-6, atol=1e-7)
    # every modality's vector reaches the scores: without the text table's vectors they change
    no_text = dict(x, **{k: np.zeros_like(v) for k, v in x.items() if k.endswith("_text")})
    assert np.abs(world["reference"](**{k: tf.constant(v) for k, v in no_text.items()})["ctr"].numpy()
                  - expected).max() > 1e-6


def test_a_version_is_served_only_with_a_table_of_each_of_its_modalities(world, tmp_path):
    path = os.path.join(world["base"], "1")
    defs = {k: v for k, v in _signature_defs(path).items()}
    assert vector_mismatch(path, defs, world["tables"]) is None
    only_image = ModalityIndexTables({"image": world["tables"]["image"]})
    reason = vector_mismatch(path, defs, only_image)
    assert "input 'item_vector_text' reads the modality 'text', which has no index table here" in reason
    reason = vector_mismatch(path, defs, world["tables"]["image"])  # one unnamed table
    assert "which has no index table here (the server's: [''])" in reason
    other = open_index_table(str(tmp_path / "other.db"), dim=4, encoder_version="enc-other", create=True)
    reason = vector_mismatch(path, defs, ModalityIndexTables({"image": world["tables"]["image"], "text": other}))
    assert "input 'hist_item_vector_text' was trained on vectors of encoder 'enc-text'" in reason
    assert "of the modality 'text' holds dim 4, encoder 'enc-other'" in reason
    other.close()


def _signature_defs(path):
    from mm_ads.serving.server.model_manager import _read_signature_defs

    return _read_signature_defs(path)


def test_the_nearline_join_reads_every_modality_and_counts_misses_per_modality(world):
    spec = world["spec"]
    join = IndexTableJoin(world["tables"], spec)
    features = {"item_id": np.array([3, 35, 45], np.int64),
                "hist_item_id": np.array([[0, 0, 5, 33, 41, 2]] * 3, np.int64)}
    out = join(features)
    assert out["item_vector_text_missing"].tolist() == [0.0, 1.0, 1.0]
    assert out["item_vector_image_missing"].tolist() == [0.0, 0.0, 1.0]
    assert out["hist_item_vector_text_missing"][0].tolist() == [0, 0, 0, 1, 1, 0]  # padding is not a miss
    np.testing.assert_array_equal(out["item_vector_image"][1], _vectors("image")[35])
    np.testing.assert_array_equal(out["hist_item_vector_text"][0, 2], _vectors("text")[5])
    assert not out["item_vector_text"][1].any()  # a miss is the zero vector
    stats = join.stats()["features"]
    assert stats["item_vector_text"] == {"lookups": 3, "missing": 2}
    assert stats["hist_item_vector_image"] == {"lookups": 12, "missing": 3}
    with pytest.raises(ValueError, match="reads the modality 'text'"):
        IndexTableJoin(ModalityIndexTables({"image": world["tables"]["image"]}), spec)
