"""A tiny served world for the prediction-server tests: FeatureSpec, exported CTR versions, catalogue, index table."""

import os

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mm_ads.config import CTRModelConfig
from mm_ads.ctr.model import build_ctr_model
from mm_ads.data.spec import FeatureSpec
from mm_ads.export.saved_model import export_saved_model

NUM_ITEMS, NUM_CATEGORIES, NUM_BRANDS, NUM_USERS = 50, 5, 7, 10
SEQ_LEN, DIM = 6, 8
WITH_VECTOR = 40  # items 1..40 have a vector in the index table; 41..50 do not
SMALL_MODEL = dict(embedding_dim=4, attention_units=(8,), mlp_units=(16, 8), activation="relu", num_tiers=10)


def tiny_spec():
    return FeatureSpec.default(seq_len=SEQ_LEN, vector_dim=DIM, num_items=NUM_ITEMS, num_categories=NUM_CATEGORIES,
                               num_brands=NUM_BRANDS, num_users=NUM_USERS, profile_buckets=(3,))


def export_version(spec, base, version, seed, variant="simtier"):
    """Builds a randomly initialised CTR model (`seed`) and exports it as `<base>/<version>/`; returns the model."""
    keras.utils.set_random_seed(seed)
    model = build_ctr_model(spec, CTRModelConfig(variant=variant, **SMALL_MODEL))
    export_saved_model(model, base, version=version, spec=spec)
    return model


def catalogue_columns():
    ids = np.arange(1, NUM_ITEMS + 1, dtype=np.int64)
    return {"item_id": ids, "category_id": ids % NUM_CATEGORIES + 1, "brand_id": ids % NUM_BRANDS + 1,
            "colour": ids % 3}


def write_catalogue(path):
    pq.write_table(pa.table(catalogue_columns()), path)
    return path


def item_vectors():
    rng = np.random.default_rng(7)
    return rng.normal(size=(NUM_ITEMS + 1, DIM)).astype(np.float32)  # row i = item i (row 0 unused)


def fill_index_table(table):
    ids = np.arange(1, WITH_VECTOR + 1, dtype=np.int64)
    table.put_many(ids, item_vectors()[ids], table.encoder_version)
    return table


def random_batch(spec, batch, seed=0):
    """Serving inputs of `batch` rows: ids in range, vectors ~ N(0, 1), a few missing flags set."""
    rng = np.random.default_rng(seed)
    x = {}
    for f in spec.model_features:
        shape = (batch,) + f.shape
        if f.is_id:
            x[f.name] = rng.integers(1, f.num_buckets, shape).astype(np.int64)
        else:
            x[f.name] = rng.normal(size=shape).astype(np.float32)
            x[f.name + "_missing"] = (rng.random(shape[:-1]) < 0.2).astype(np.float32)
    return x


def manual_rank_inputs(spec, candidates, history, features, index_table):
    """The model inputs of a ranking call, assembled by hand (the reference the server must match)."""
    cols = catalogue_columns()
    row_of = {int(i): k for k, i in enumerate(cols["item_id"])}
    n, s = len(candidates), spec.seq_len
    hist = list(history)[-s:]
    pad = s - len(hist)
    hist_ids = [0] * pad + hist
    x = {"item_id": np.array(candidates, np.int64)}
    for name in ("category_id", "brand_id"):
        x[name] = np.array([cols[name][row_of[c]] if c in row_of else 0 for c in candidates], np.int64)
        hist_col = [0] * pad + [cols[name][row_of[h]] if h in row_of else 0 for h in hist]
        x["hist_" + name] = np.tile(np.array(hist_col, np.int64), (n, 1))
    x["hist_item_id"] = np.tile(np.array(hist_ids, np.int64), (n, 1))
    for k, v in features.items():
        x[k] = np.full(n, v, np.int64)
    cand_vec, cand_found = index_table.get_many(np.array(candidates, np.int64))
    x["item_vector"] = cand_vec.astype(np.float32)
    x["item_vector_missing"] = (~cand_found).astype(np.float32)
    hv = np.zeros((s, spec.vector_dim), np.float32)
    hm = np.zeros(s, np.float32)
    if hist:
        v, f = index_table.get_many(np.array(hist, np.int64))
        hv[pad:] = v
        hm[pad:] = (~f).astype(np.float32)
    x["hist_item_vector"] = np.tile(hv[None], (n, 1, 1))
    x["hist_item_vector_missing"] = np.tile(hm[None], (n, 1))
    return x


def free_threads_snapshot():
    import threading

    return {t.ident for t in threading.enumerate()}


def exported_path(base, version):
    return os.path.join(base, str(version))


def tiny_server_world(root):
    """A tiny simtier version 1 under `root/export`, its catalogue and a filled index table, and the exported
    signature to compare scores with: the world of the server tests."""
    import tensorflow as tf

    from mm_ads.serving.index.index_table import open_index_table
    from mm_ads.serving.server.ranking import Catalogue

    spec = tiny_spec()
    base = str(os.path.join(root, "export"))
    export_version(spec, base, 1, seed=1)
    catalogue = Catalogue.load(write_catalogue(str(os.path.join(root, "items.parquet"))), ["category_id", "brand_id"])
    table = fill_index_table(open_index_table(str(os.path.join(root, "index.db")), dim=DIM, encoder_version="enc-test",
                                              create=True))
    reference = tf.saved_model.load(exported_path(base, 1)).signatures["serving_default"]
    return {"spec": spec, "base": base, "catalogue": catalogue, "table": table, "reference": reference, "root": root}


def reference_scores(world, x):
    """The exported `serving_default` scores of inputs `x` (numpy dict) in a `tiny_server_world`."""
    import tensorflow as tf

    return world["reference"](**{k: tf.constant(v) for k, v in x.items()})["ctr"].numpy()


def rest_call(port, method, path, body=None, raw=None, headers=None, timeout=30):
    """One REST request to 127.0.0.1:`port` (`body` as JSON, or `raw` bytes); returns (status, decoded JSON)."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()
