"""End-to-end: `python -m mm_ads.train --flagfile=configs/scl/smoke_*.flags`, then `mm_ads.encode` and the export."""

import io
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from mm_ads.config import ExperimentConfig
from mm_ads.data.dataset import Manifest
from mm_ads.data.pipeline import resolve_vector_table_path
from mm_ads.data.vectors import VectorTable
from mm_ads.scl.encode import encode_model_dir, encode_values, encoder_version, load_encoder
from mm_ads.scl.task import SCLTask


def _train(repo_root, flagfile, data_dir, model_dir, *extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo_root)
    proc = subprocess.run([sys.executable, "-m", "mm_ads.train", f"--flagfile=configs/scl/{flagfile}",
                           f"--data_dir={data_dir}", f"--model_dir={model_dir}", *extra], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.load(open(os.path.join(model_dir, "metrics.json")))
    for key in ("acc@1", "acc@5", "acc@10"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["acc@1"] <= metrics["acc@5"] <= metrics["acc@10"]
    assert metrics["num_queries"] == Manifest.load(data_dir).num_rows(
        f"pretrain/{metrics['modality']}_pairs", "test")
    return metrics


def _untrained_acc1(model_dir):
    config = ExperimentConfig.from_json(json.load(open(os.path.join(model_dir, "config.json"))))
    task = SCLTask(config)
    keras.utils.set_random_seed(config.train.seed)
    return task.evaluate(task.build_model())["acc@1"]


def test_text_smoke_trains_encodes_and_exports(smoke_world, tmp_path, repo_root):
    model_dir = str(tmp_path / "text")
    metrics = _train(repo_root, "smoke_text.flags", smoke_world, model_dir)
    # 240 steps of SCL beat the untrained encoder by a wide margin (measured: ~0.56 vs ~0.05)
    untrained = _untrained_acc1(model_dir)
    assert metrics["acc@1"] > untrained + 0.2, (metrics["acc@1"], untrained)
    assert len(metrics["eval_history"]) == 20 and metrics["queue_fill"] == 1000
    vocab = json.load(open(os.path.join(model_dir, "vocab.json")))
    assert vocab["vocab_size"] == len(vocab["vocabulary"]) > 50 and 0 <= metrics["oov_fraction"] < 0.05

    # encode without registering: the dataset's manifest is untouched
    data_dir = str(tmp_path / "data")
    shutil.copytree(smoke_world, data_dir)
    before = open(os.path.join(data_dir, "manifest.json")).read()
    plain = encode_model_dir(model_dir, data_dir)
    assert open(os.path.join(data_dir, "manifest.json")).read() == before
    assert plain["path"].startswith(model_dir)
    encoder = load_encoder(os.path.join(model_dir, "encoder.keras"))
    version = encoder_version(encoder, "scl-text")
    items = pq.read_table(os.path.join(data_dir, "items.parquet"), columns=["item_id", "title"]).to_pydict()
    table = VectorTable.load(plain["path"], expected_encoder_version=version)
    np.testing.assert_array_equal(table.item_ids, items["item_id"])
    np.testing.assert_allclose(table.vectors, encoder(tf.constant(items["title"][:300])).numpy().tolist()
                               + encoder(tf.constant(items["title"][300:])).numpy().tolist(), atol=1e-5)

    # int8 + register: the table is listed in the manifest and resolvable by name
    reg = encode_model_dir(model_dir, data_dir, dtype="int8", register=True, name="scl_text_int8")
    manifest = Manifest.load(data_dir)
    assert manifest.extra["vector_tables"]["scl_text_int8"] == "vectors/scl_text_int8.parquet"
    path = resolve_vector_table_path(manifest, "scl_text_int8")
    q = VectorTable.load(path, expected_encoder_version=version)
    assert q.dtype == "int8" and reg["encoder_version"] == version
    np.testing.assert_allclose(q.float_vectors(), table.vectors, atol=1.0 / 127)
    assert {**json.load(open(os.path.join(data_dir, "manifest.json"))), "extra": None} == \
        {**json.loads(before), "extra": None}  # only extra changed

    # the SavedModel (raw strings in) equals the Keras encoder
    loaded = tf.saved_model.load(metrics["export_path"])
    fn = loaded.signatures["serving_default"]
    assert set(fn.structured_input_signature[1]) == {"text"} and set(fn.structured_outputs) == {"vector"}
    titles = tf.constant(items["title"][:50] + ["", "words never seen before"])
    np.testing.assert_allclose(fn(text=titles)["vector"].numpy(), encoder(titles).numpy(), atol=1e-5)


def _png(array):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# large (~11 s): the text smoke above covers the same command-line train, encode and export path; an image
# encoder's SavedModel taking image bytes is checked in test_pretrained_image_tower
@pytest.mark.large
def test_image_smoke_trains_encodes_and_exports(smoke_world, tmp_path, repo_root):
    model_dir = str(tmp_path / "image")
    metrics = _train(repo_root, "smoke_image.flags", smoke_world, model_dir, "--max_steps=6", "--image_widths=4,8")
    assert metrics["steps"] == 6 and metrics["queue_fill"] == 6 * 64 and metrics["temperature"] > 0
    encoder = load_encoder(os.path.join(model_dir, "encoder.keras"))
    items = pq.read_table(os.path.join(smoke_world, "items.parquet"), columns=["image"]).to_pydict()
    data = items["image"][:20] + [_png(np.full((48, 40, 3), 200, np.uint8))]  # another size: resized to 32
    expected = encode_values(encoder, data, "image", image_size=32)
    fn = tf.saved_model.load(metrics["export_path"]).signatures["serving_default"]
    np.testing.assert_allclose(fn(image=tf.constant(data))["vector"].numpy(), expected, atol=1e-5)
    decoded = np.stack([np.asarray(tf.image.resize(tf.image.convert_image_dtype(tf.io.decode_png(b, 3),
                                                                                  tf.float32), (32, 32),
                                                   antialias=True)) for b in data[:3]])
    np.testing.assert_allclose(expected[:3], encoder(np.clip(decoded, 0, 1)).numpy(), atol=1e-5)
    result = encode_model_dir(model_dir, smoke_world, dtype="float32")
    assert result["num_items"] == 500 and result["encoder_version"] == encoder_version(encoder, "scl-image")


@pytest.mark.large
def test_image_smoke_beats_untrained(smoke_world, tmp_path, repo_root):
    model_dir = str(tmp_path / "image")
    metrics = _train(repo_root, "smoke_image.flags", smoke_world, model_dir, "--epochs=20")
    assert metrics["acc@1"] > _untrained_acc1(model_dir) + 0.05
