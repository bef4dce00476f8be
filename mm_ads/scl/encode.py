"""Runs a trained SCL encoder over a dataset's item catalogue and writes an item → vector table.

The table's `encoder_version` is a content hash of the encoder (its config, which holds the text
vocabulary, and every weight), so tables made by different encoders are never mixed
(`mm_ads.data.vectors.VectorTable.load(expected_encoder_version=...)`). The source dataset is not
touched unless `register_vector_table` is called (`--register`), which adds the table to the manifest's
`extra["vector_tables"]` under a lock, with an atomic rewrite of `manifest.json`.
"""

import contextlib
import fcntl
import json
import os

import keras
import numpy as np
import pyarrow.parquet as pq
import tensorflow as tf

from mm_ads.data.dataset import MANIFEST, Manifest
from mm_ads.data.vectors import write_vector_table
from mm_ads.scl.export import decode_images, encoder_version, export_encoder
from mm_ads.training import model_dir as run_dir
from mm_ads.utils import io as io_utils

COLUMNS = {"text": "title", "image": "image"}


def load_encoder(path):
    """Loads an `encoder.keras` written by `python -m mm_ads.train --task=scl`."""
    from mm_ads.scl import image_tower, pretrained_image_tower, text_tower  # noqa: F401  (registers the classes)

    return keras.saving.load_model(path)


def encode_values(encoder, values, modality, image_size=32, batch_size=256):
    """float32 `[N, D]` vectors of raw titles (str) or encoded image bytes, `batch_size` at a time."""
    if modality == "text":
        fn = tf.function(lambda x: encoder(x, training=False))
    else:
        fn = tf.function(lambda x: encoder(decode_images(x, image_size), training=False))
    out = [fn(tf.constant(list(values[s:s + batch_size]), tf.string)).numpy()
           for s in range(0, len(values), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, encoder.output_dim), np.float32)


def encode_catalogue(encoder, data_dir, modality, output_path, image_size=32, dtype="float32", batch_size=256):
    """Encodes `items.parquet` and writes the vector table; returns its metadata.

    Text: the `text` column when the items table has one (the item text its pre-training pairs use), else
    `title`. Image: the `image` column (encoded bytes).
    """
    manifest = Manifest.load(data_dir)
    path = manifest.files("items", "all")[0]
    column = COLUMNS[modality]
    if modality == "text" and "text" in pq.read_schema(path).names:
        column = "text"  # the item's full text when the reader writes one (MovieLens: title, genres, tags)
    table = pq.read_table(path, columns=["item_id", column])
    ids = table.column("item_id").to_numpy().astype(np.int64)
    vectors = encode_values(encoder, table.column(column).to_pylist(), modality, image_size, batch_size)
    version = encoder_version(encoder, f"scl-{modality}")
    write_vector_table(output_path, ids, vectors, version, dtype=dtype, source=f"mm_ads.encode {column}")
    return {"path": output_path, "num_items": int(len(ids)), "dim": int(vectors.shape[1]), "dtype": dtype,
            "encoder_version": version}


@contextlib.contextmanager
def _manifest_lock(data_dir):
    with open(os.path.join(data_dir, ".manifest.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def register_vector_table(data_dir, name, table_path):
    """Adds `name → table_path` (stored relative to `data_dir`) to the manifest's `extra["vector_tables"]`."""
    with _manifest_lock(data_dir):
        path = os.path.join(data_dir, MANIFEST)
        with open(path) as f:
            manifest = json.load(f)
        extra = manifest.setdefault("extra", {})
        entry = extra.get("vector_tables") or {}
        if isinstance(entry, (list, tuple)):
            entry = {os.path.splitext(os.path.basename(p))[0]: p for p in entry}
        entry[name] = os.path.relpath(os.path.abspath(table_path), os.path.abspath(data_dir))
        extra["vector_tables"] = entry
        io_utils.write_json(path, manifest)
    return entry[name]


def encode_model_dir(model_dir, data_dir, output=None, name=None, dtype="float32", register=False, batch_size=256,
           export_base=None):
    """Library form of the entry point; returns a dict describing what was written."""
    from mm_ads.config import ExperimentConfig

    config_path, encoder_path = (run_dir.path(model_dir, f) for f in (run_dir.CONFIG, run_dir.ENCODER))
    for path in (config_path, encoder_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: {model_dir} is not an SCL model dir written by mm_ads.train")
    with open(config_path) as f:
        config = ExperimentConfig.from_json(json.load(f))
    scl = config.scl
    encoder = load_encoder(encoder_path)
    name = name or f"scl_{scl.modality}"
    if output is None:
        output = os.path.join(data_dir if register else model_dir, "vectors", f"{name}.parquet")
    result = encode_catalogue(encoder, data_dir, scl.modality, output, scl.image_size, dtype,
                                         batch_size)
    if register:
        result["registered_as"] = name
        result["manifest_path"] = register_vector_table(data_dir, name, output)
    if export_base:
        result["export_path"] = export_encoder(encoder, export_base, scl.modality, scl.image_size)
    return result
