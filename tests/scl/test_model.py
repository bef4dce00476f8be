"""SCLModel: the MoCo key encoder is a frozen copy of the query encoder."""

import numpy as np
import pytest
import tensorflow as tf

from mm_ads import config as config_lib
from mm_ads.scl.task import build_scl_model


@pytest.mark.parametrize("modality", ["text", "image"])
def test_moco_key_encoder_is_a_frozen_copy(modality):
    scl = config_lib.SCLConfig(modality=modality, queue_size=16, output_dim=8, projection_hidden=8, text_width=8,
                               text_layers=1, text_heads=2, image_widths=(8, 16), image_size=16)
    model = build_scl_model(scl, vocabulary=["red", "dress", "blue", "mug"])
    key_weights = {id(w) for w in model.key_encoder.weights}
    assert key_weights and key_weights.isdisjoint(id(w) for w in model.encoder.weights)
    # no key encoder variable is trainable (its sublayers are created in build(): frozen after it)
    assert [w.path for w in model.key_encoder.weights if w.trainable] == []
    assert model.key_encoder.trainable_weights == []
    assert key_weights.isdisjoint(id(w) for w in model.trainable_variables)
    assert {id(w) for w in model.encoder.trainable_weights} <= {id(w) for w in model.trainable_variables}
    assert model.encoder.trainable_weights
    inputs = (tf.constant(["red dress", "blue mug"]) if modality == "text" else
              tf.random.uniform((2, 16, 16, 3), seed=1))
    np.testing.assert_allclose(model.keys(inputs).numpy(), model(inputs).numpy(), atol=1e-6)
