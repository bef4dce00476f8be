"""CLIP-E: item image ↔ item title alignment (`--task=clip`), the cross-modal baseline of Table 2."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_ads import config as config_lib
from mm_ads import train
from mm_ads.scl.clip import CrossModalTask
from mm_ads.scl.encode import load_encoder


def _config(repo_root, data_dir, model_dir, **overrides):
    return config_lib.config_from_flagfile(os.path.join(repo_root, "configs", "scl", "smoke_clip.flags"),
                                           data_dir=data_dir, model_dir=model_dir, **overrides)


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_loss_is_symmetric_infonce(smoke_world, repo_root):
    task = CrossModalTask(_config(repo_root, smoke_world, "unused"))
    keras.utils.set_random_seed(0)
    model = task.build_model()
    features, _ = next(iter(task.build_inputs("train", 16, training=False)))
    loss = task.per_example_loss(model, features, None, training=False).numpy()
    t, v = (x.numpy().astype(np.float64) for x in model(features, training=False))
    logits = v @ t.T / float(model.temperature.tau())
    i = np.arange(16)
    expected = -0.5 * (_log_softmax(logits)[i, i] + _log_softmax(logits.T)[i, i])
    np.testing.assert_allclose(loss, expected, rtol=1e-4, atol=1e-5)


def test_train_saves_both_towers(smoke_world, repo_root, tmp_path):
    model_dir = str(tmp_path / "clip")
    metrics = train.run(_config(repo_root, smoke_world, model_dir, epochs="2"))
    assert metrics["task"] == "clip" and 0.0 <= metrics["acc@1"] <= metrics["acc@5"] <= 1.0
    task = CrossModalTask(_config(repo_root, smoke_world, "unused"))
    assert metrics["num_queries"] == task.num_examples("eval") > 0
    assert task.num_examples("train") + task.num_examples("eval") == 500  # the smoke world's items
    saved = json.load(open(os.path.join(model_dir, "metrics.json")))["encoders"]
    text, image = load_encoder(saved["text"]), load_encoder(saved["image"])
    assert text.output_dim == image.output_dim == 32
    titles = tf.constant(["red dress", "blue mug"])
    v = text(titles).numpy()
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert image(tf.zeros((2, 32, 32, 3))).shape == (2, 32)


def test_needs_items_with_titles_and_images(tmp_path, repo_root, shared_data):
    from mm_ads.data import readers

    data = str(tmp_path / "pairs")
    readers.prepare("product_pairs", os.path.join(shared_data, "product_matching", "Abt-Buy"), data, {})
    with pytest.raises(ValueError, match="has no items table"):
        CrossModalTask(_config(repo_root, data, "unused"))
