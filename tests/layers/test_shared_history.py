"""One behaviour sequence for a batch of targets (static batch 1 of the history side, as when the candidates of one
user are ranked): DINAttention, SimTier, SimScore and MAKE give the results of the sequence repeated per target."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_ads.layers import MAKE, DINAttention, SimScore, SimTier

B, S, E, D = 7, 6, 4, 8


def _history(seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(1, S, E)).astype(np.float32)
    keys[0, 0] = np.inf  # padding may hold anything: it must not leak
    mask = np.array([[0, 1, 1, 0, 1, 1]], bool)
    return rng, keys, mask


def _repeat(x):
    return np.repeat(x, B, axis=0)


@pytest.mark.parametrize("units,normalization,side_dim", [((8, 4), "softmax", None), ((8,), "none", 2),
                                                          ((8, 4), "softmax", 0), ((), "softmax", None)])
def test_din_attention_shared_sequence_equals_repeated(units, normalization, side_dim):
    rng, keys, mask = _history()
    query = rng.normal(size=(B, E)).astype(np.float32)
    side = None
    if side_dim is not None:  # side information depends on the target: one row per target
        side = rng.uniform(-1, 1, size=(B, S) if side_dim == 0 else (B, S, side_dim)).astype(np.float32)
    keras.utils.set_random_seed(1)
    layer = DINAttention(hidden_units=units, activation="prelu", normalization=normalization)
    full = layer(query, _repeat(keys), side_features=side, mask=_repeat(mask))

    @tf.function  # the serving path: keys [1, S, E] with a static batch of 1, queries of any batch
    def shared(q, k, m):
        return layer(q, k, side_features=side, mask=m, return_attention_scores=True)

    got, weights = shared(tf.constant(query), tf.constant(keys), tf.constant(mask))
    np.testing.assert_allclose(got.numpy(), full.numpy(), rtol=1e-5, atol=1e-6)
    assert weights.shape == (B, S) and np.all(weights.numpy()[:, ~mask[0]] == 0.0)
    assert np.all(np.isfinite(got.numpy()))


def test_din_attention_shared_values():
    rng, keys, mask = _history(2)
    query = rng.normal(size=(B, E)).astype(np.float32)
    value = rng.normal(size=(1, S, 3)).astype(np.float32)
    layer = DINAttention(hidden_units=(8,), activation="relu")
    full = layer(query, _repeat(keys), value=_repeat(value), mask=_repeat(mask))
    got = layer(query, keys, value=value, mask=mask)
    np.testing.assert_allclose(got.numpy(), full.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", [SimTier(num_tiers=5), SimScore(keepdims=True), SimScore(summary="mean_max")],
                         ids=["simtier", "simscore", "simscore_summary"])
def test_similarity_layers_shared_history_equal_repeated(layer):
    rng = np.random.default_rng(3)
    target = rng.normal(size=(B, D)).astype(np.float32)
    target[2] = 0.0  # a missing target vector
    history = rng.normal(size=(1, S, D)).astype(np.float32)
    history[0, 1] = 0.0  # a missing history vector
    mask = np.array([[1, 1, 1, 0, 1, 1]], bool)
    full = layer(target, _repeat(history), mask=_repeat(mask))
    got = layer(target, history, mask=mask)
    for a, b in zip(tf.nest.flatten(got), tf.nest.flatten(full)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_make_shared_history_equals_repeated():
    rng = np.random.default_rng(4)
    target = rng.normal(size=(B, D)).astype(np.float32)
    history = rng.normal(size=(1, S, D)).astype(np.float32)
    mask = np.array([[0, 1, 1, 1, 1, 1]], bool)
    missing = (rng.random(B) < 0.3).astype(np.float32)
    keras.utils.set_random_seed(5)
    layer = MAKE(mlp_units=(16, 8), attention_units=(8,), activation="relu")
    full = layer(target, _repeat(history), mask=_repeat(mask), target_missing=missing)
    got = layer(target, history, mask=mask, target_missing=missing)
    for a, b in zip(tf.nest.flatten(got), tf.nest.flatten(full)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
