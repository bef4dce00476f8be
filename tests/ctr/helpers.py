"""Helpers shared by the CTR tests."""

import numpy as np
import tensorflow as tf

from mm_ads.training.trainer import Trainer


def random_inputs(model, batch=3, seed=0, min_id=0):
    """Random inputs for every input of a CTR model: ids in [min_id, 6), vectors ~ N(0, 1), no missing flags."""
    rng = np.random.default_rng(seed)
    x = {}
    for t in model.inputs:
        shape = (batch,) + tuple(t.shape[1:])
        if t.dtype == "int64":
            x[t.name] = tf.constant(rng.integers(min_id, 6, shape), tf.int64)
        elif t.name.endswith("_missing"):
            x[t.name] = tf.zeros(shape)
        else:
            x[t.name] = tf.constant(rng.normal(size=shape).astype(np.float32))
    return x


def restored_predictions(task, cfg, batch=64):
    """(model inputs of the first eval batch, the CTR predictions of the model restored from cfg's checkpoint)."""
    trainer = Trainer(task, cfg.train, cfg.data.batch_size, cfg.model_dir)
    trainer.restore()
    features, _ = next(iter(task.build_inputs("eval", batch, training=False)))
    x = task.model_inputs(features)
    return x, trainer.model(x, training=False)["ctr"].numpy()


def default_layout_inputs(items, categories):
    """Inputs of a model of `FeatureSpec.default(seq_len=4, ...)` for the target items and categories given: user 3,
    brand 2, a fixed behaviour sequence (padding first)."""
    n = len(items)
    return {
        "user_id": tf.constant([3] * n, tf.int64),
        "item_id": tf.constant(items, tf.int64),
        "category_id": tf.constant(categories, tf.int64),
        "brand_id": tf.constant([2] * n, tf.int64),
        "hist_item_id": tf.constant([[0, 1, 2, 3]] * n, tf.int64),
        "hist_category_id": tf.constant([[0, 1, 1, 2]] * n, tf.int64),
        "hist_brand_id": tf.constant([[0, 1, 2, 2]] * n, tf.int64),
    }
