"""The triplet term is live: one step with `use_triplet=true` moves the weights differently from `false` exactly
when some triplet of the batch violates the margin; and evaluation reports how often triplets violate it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_ads.config import DataConfig, ExperimentConfig, SCLConfig, TrainConfig
from mm_ads.scl.task import SCLTask
from tests.scl.tiny_data import write_tiny_text_pairs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("triplet") / "data")
    write_tiny_text_pairs(path)
    return path


def _task(data_dir, tmp_path, use_triplet, margin, use_queue=True):
    config = ExperimentConfig(
        task="scl", model_dir=str(tmp_path / f"m{int(use_triplet)}"),
        data=DataConfig(data_dir=data_dir, batch_size=16, eval_batch_size=16, shuffle_buffer=0),
        train=TrainConfig(dense_optimizer="sgd", dense_learning_rate=0.5, seed=0, max_steps=1, export=False),
        scl=SCLConfig(output_dim=8, projection_hidden=16, text_width=8, text_layers=1, text_heads=2, max_tokens=8,
                      num_oov_buckets=4, use_queue=use_queue, queue_size=13, momentum=0.9, temperature_init=0.2,
                      use_triplet=use_triplet, triplet_weight=1.0, triplet_margin=0.5)).validate()
    # set after validation: a negative margin (refused in configs) makes "no triplet violates it" certain
    config.scl.triplet_margin = margin
    return SCLTask(config)


def _step(task):
    """Gradients of one step's loss on the first training batch, from the same initial weights (seed 0)."""
    keras.utils.set_random_seed(0)
    model = task.build_model()
    features, labels = next(iter(task.build_inputs("train", 16, training=False)))
    with tf.GradientTape() as tape:
        per, _ = task.per_example_loss(model, features, labels, training=True)
        loss = tf.reduce_mean(per)
    grads = tape.gradient(loss, model.trainable_variables)
    return model, [np.zeros(v.shape) if g is None else tf.convert_to_tensor(g).numpy()
                   for v, g in zip(model.trainable_variables, grads)]


@pytest.mark.parametrize("use_queue", [True, False])
def test_triplet_changes_the_step_only_when_a_triplet_violates_the_margin(data_dir, tmp_path, use_queue):
    # margin 0.5 on a fresh encoder: q·p ≈ q·n, so most triplets violate it
    with_t, g_with = _step(_task(data_dir, tmp_path, True, 0.5, use_queue))
    _, g_without = _step(_task(data_dir, tmp_path, False, 0.5, use_queue))
    assert with_t.trainable_variables and len(g_with) == len(g_without)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(g_with, g_without))
    assert diff > 1e-4, diff
    # margin −2: margin − q·p + q·n ≤ 0 for unit vectors, no triplet is violated, the term adds nothing
    _, g_with = _step(_task(data_dir, tmp_path, True, -2.0, use_queue))
    _, g_without = _step(_task(data_dir, tmp_path, False, -2.0, use_queue))
    for a, b in zip(g_with, g_without):  # equal up to float summation order (the negatives' extra forward pass)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_evaluation_reports_the_violation_rate(data_dir, tmp_path):
    task = _task(data_dir, tmp_path, True, 0.5)
    keras.utils.set_random_seed(0)
    model = task.build_model()
    low, high = task.triplet_violations(model, "eval"), _task(data_dir, tmp_path, True, 2.0).triplet_violations(
        model, "eval")
    rows = task._columns("test")
    expected_rows = int(np.sum((rows["negative_id"] >= 0) & (rows["negative_id"] != rows["positive_id"])))
    assert low["triplet_rows"] == high["triplet_rows"] == expected_rows > 0
    assert 0.0 < low["triplet_violation_rate"] <= 1.0
    assert high["triplet_violation_rate"] == 1.0  # margin 2 > any q·p − q·n except exact ties
    assert high["triplet_loss"] > low["triplet_loss"]
    assert -2.0 < _task(data_dir, tmp_path, True, -2.0).triplet_violations(model)["triplet_loss"] + 1e-9 <= 1e-9
