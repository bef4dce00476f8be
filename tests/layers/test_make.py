import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_ads.layers import MAKE, DINAttention
from tests.layer_test_case import assert_padding_invariant, run_layer_test

SMALL = {"mlp_units": (8, 6, 5, 4), "attention_units": (7,), "activation": "prelu"}


def random_inputs(b=4, s=6, d=5, seed=0):
    rng = np.random.default_rng(seed)
    target = rng.normal(size=(b, d)).astype(np.float32)
    history = rng.normal(size=(b, s, d)).astype(np.float32)
    mask = rng.random((b, s)) < 0.7
    mask[:, 0] = True
    mask[-1] = False  # an all-padded row
    return target, history, mask


def test_layer_standard_checks():
    target, history, mask = random_inputs()
    missing = np.array([0, 1, 0, 0], np.float32)
    # outputs flattened in key order: hidden (4), logit, v_make
    shapes = [(4, 8), (4, 6), (4, 5), (4, 4), (4, 1), (4, 10)]
    layer = run_layer_test(
        MAKE,
        SMALL,
        {"target": target, "history": history, "mask": mask, "target_missing": missing},
        shapes,
        # attention: 1 hidden Dense, the output's kernel (softmax: no bias), 1 PReLU; MLP: 4 hidden Dense +
        # 4 PReLU + output Dense
        expected_num_trainable_weights=2 + 1 + 1 + 4 * 2 + 4 + 2,
        expected_output_dtype="float32",
        expected_mixed_output_dtype=["bfloat16"] * 4 + ["float32", "bfloat16"],
        run_gradient_check=False,
    )
    # every trainable weight gets a gradient from the logit (the pre-training loss of eq. 5)
    with tf.GradientTape() as tape:
        logit = layer(target, history, mask=mask, target_missing=missing, training=True)["logit"]
        loss = tf.reduce_sum(logit * tf.constant([[1.0], [-2.0], [0.5], [3.0]]))
    grads = tape.gradient(loss, layer.trainable_weights)
    for w, g in zip(layer.trainable_weights, grads):
        assert g is not None and np.any(g.numpy() != 0), w.path


def test_v_make_is_target_and_attention_pooled_history():
    target, history, mask = random_inputs()
    layer = MAKE(**SMALL)
    out = layer(target, history, mask=mask)
    d = target.shape[1]
    np.testing.assert_allclose(out["v_make"][:, :d], target, rtol=1e-6)
    # the second half is the layer's own DINAttention applied to (target, history, mask)
    pooled = layer.attention(target, history, mask=mask)
    np.testing.assert_allclose(out["v_make"][:, d:], pooled, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["v_make"][-1, d:], 0.0)  # all-padded history
    # the logit is MLP_MAKE of [v_make, target missing indicator]
    x = tf.concat([out["v_make"], tf.zeros((4, 1))], -1)
    logit, hidden = layer.mlp(x)
    np.testing.assert_allclose(out["logit"], logit, rtol=1e-5, atol=1e-6)
    for a, b in zip(out["hidden"], hidden):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_padding_and_missing_history_vectors_are_ignored():
    target, history, mask = random_inputs()
    layer = MAKE(**SMALL)
    assert_padding_invariant(layer, {"target": target, "history": history, "mask": mask}, ["history"])
    base = layer(target, history, mask=mask)
    # an absent history item (zero vector from the join) at an unmasked position is not attended to
    extra_history = np.concatenate([history, np.zeros_like(history[:, :2])], axis=1)
    extra_mask = np.concatenate([mask, np.ones_like(mask[:, :2])], axis=1)
    for a, b in zip(keras.tree.flatten(layer(target, extra_history, mask=extra_mask)), keras.tree.flatten(base)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # garbage in masked positions does not change anything either
    garbage = history.copy()
    garbage[~mask] = 1e4
    for a, b in zip(keras.tree.flatten(layer(target, garbage, mask=mask)), keras.tree.flatten(base)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_missing_target_is_zeroed_and_flagged():
    target, history, mask = random_inputs()
    layer = MAKE(**SMALL)
    flagged = layer(target, history, mask=mask, target_missing=np.array([1, 0, 0, 0], np.float32))
    zeroed = target.copy()
    zeroed[0] = 0.0
    by_zero = layer(zeroed, history, mask=mask)
    for a, b in zip(keras.tree.flatten(flagged), keras.tree.flatten(by_zero)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flagged["v_make"][0, :5], 0.0)
    # the indicator column (1.0 for the missing target) reaches the MLP
    without_indicator, _ = layer.mlp(tf.concat([flagged["v_make"], tf.zeros((4, 1))], -1))
    np.testing.assert_allclose(without_indicator[1:], flagged["logit"][1:], rtol=1e-5, atol=1e-6)
    assert not np.allclose(without_indicator[0], flagged["logit"][0])


def test_frozen_layer_has_no_trainable_weights_and_runs_in_inference_mode():
    target, history, mask = random_inputs()
    layer = MAKE(mlp_units=(8, 4), attention_units=(6,), activation="dice", dropout=0.5, trainable=False)
    inputs = {k: keras.Input(v.shape[1:], dtype=v.dtype, name=k) for k, v in
              {"target": target, "history": history, "mask": mask}.items()}
    out = layer(**inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(out["v_make"]))
    assert layer.trainable_weights == [] and layer.weights
    assert {id(v) for v in model.trainable_weights}.isdisjoint({id(v) for v in layer.weights})
    before = [w.numpy().copy() for w in layer.weights]
    x = {"target": target, "history": history, "mask": mask}
    # training=True: no dropout, no Dice statistics update: deterministic and equal to inference
    a, b = layer(**x, training=True), layer(**x, training=False)
    for u, v in zip(keras.tree.flatten(a), keras.tree.flatten(b)):
        np.testing.assert_array_equal(u, v)
    for w, v in zip(layer.weights, before):
        np.testing.assert_array_equal(w.numpy(), v)
    # config round trip keeps it frozen
    assert MAKE.from_config(layer.get_config()).trainable is False
    layer.trainable = True
    assert len(layer.trainable_weights) > 0


@pytest.mark.parametrize("freeze", ["constructor", "before_build", "after_build"])
def test_frozen_layer_freezes_every_variable_however_it_is_frozen(freeze):
    # Keras passes `trainable` on only to sublayers that exist when it is set, and MAKE and MLP create theirs
    # in build(): every variable must end up non-trainable, or the model around MAKE would train it.
    target, history, mask = random_inputs()
    layer = MAKE(**SMALL, trainable=freeze != "constructor")
    if freeze == "before_build":
        layer.trainable = False
    layer(target, history, mask=mask)
    if freeze == "after_build":
        layer.trainable = False
    assert layer.weights and [v.path for v in layer.weights if v.trainable] == []
    inputs = {k: keras.Input(v.shape[1:], dtype=v.dtype, name=k) for k, v in
              {"target": target, "history": history, "mask": mask}.items()}
    model = keras.Model(inputs, keras.layers.Dense(1)(layer(**inputs)["v_make"]))
    assert len(model.trainable_variables) == 2  # the Dense head's kernel and bias only


def test_int8_vectors_are_scaled():
    target, history, mask = random_inputs()
    q_t = np.clip(np.round(target * 40), -127, 127).astype(np.int8)
    q_h = np.clip(np.round(history * 40), -127, 127).astype(np.int8)
    layer = MAKE(**SMALL, scale=1 / 40)
    out_q = layer(q_t, q_h, mask=mask)
    out_f = layer(q_t.astype(np.float32) / 40, q_h.astype(np.float32) / 40, mask=mask)
    for a, b in zip(keras.tree.flatten(out_q), keras.tree.flatten(out_f)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"mlp_units": ()}, "must not be empty"),
    ({"mlp_units": (4, 0)}, "positive ints"),
    ({"attention_normalization": "max"}, "attention_normalization"),
    ({"dropout": 1.0}, "dropout"),
    ({"activation": "nope"}, "activation"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MAKE(**kwargs)


def test_uses_din_attention():
    layer = MAKE(**SMALL)
    target, history, mask = random_inputs()
    layer(target, history, mask=mask)
    assert isinstance(layer.attention, DINAttention)
    assert layer.mlp.hidden_units == [8, 6, 5, 4] and layer.mlp.output_units == 1
