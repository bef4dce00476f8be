import keras
import numpy as np
import pytest

from mm_ads.layers import MLP, Dice
from tests.layer_test_case import assert_padding_invariant, run_layer_test

RNG = np.random.default_rng(0)
X2 = RNG.normal(size=(4, 6)).astype(np.float32)
X3 = RNG.normal(size=(3, 5, 6)).astype(np.float32)
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool)


def test_standard_checks_relu_logit():
    run_layer_test(MLP, {"hidden_units": [8, 4], "output_units": 1}, {"inputs": X2}, expected_output_shape=(4, 1),
                   expected_num_trainable_weights=6, expected_mixed_output_dtype="float32", mixed_precision_atol=0.05)


def test_output_use_bias():
    # the output layer alone without a bias (hidden layers keep theirs); None follows `use_bias`
    layer = MLP(hidden_units=[8], output_units=1, output_use_bias=False)
    layer(X2)
    assert [w.path.split("/", 1)[1] for w in layer.trainable_weights] == ["dense_0/kernel", "dense_0/bias",
                                                                         "output/kernel"]
    assert MLP.from_config(layer.get_config()).output_use_bias is False
    default = MLP(hidden_units=[8], output_units=1, use_bias=False)
    default(X2)
    assert len(default.trainable_weights) == 2


def test_standard_checks_dice_batch_norm_return_hidden():
    # per block: Dense (2) + BN gamma/beta (2) + Dice alpha (1) trainable; BN (2) + Dice (2) moving statistics.
    run_layer_test(
        MLP,
        {"hidden_units": [8, 4], "activation": "dice", "normalization": "batch", "output_units": 2,
         "return_hidden": True},
        {"inputs": X3, "mask": MASK},
        expected_output_shape=[(3, 5, 2), (3, 5, 8), (3, 5, 4)],
        expected_num_trainable_weights=12,
        expected_num_non_trainable_weights=8,
        expected_mixed_output_dtype=["float32", "bfloat16", "bfloat16"],
        mixed_precision_atol=0.1,
    )


def test_standard_checks_prelu_layer_norm_dropout_no_output_layer():
    # per block: Dense (2) + LayerNorm (2) + PReLU (1).
    run_layer_test(
        MLP,
        {"hidden_units": [8, 4], "activation": "prelu", "normalization": "layer", "dropout": 0.5},
        {"inputs": X3},
        expected_output_shape=(3, 5, 4),
        expected_num_trainable_weights=10,
        expected_mixed_output_dtype="bfloat16",
    )


def test_standard_checks_dice_layer():
    run_layer_test(Dice, {}, {"inputs": X3, "mask": MASK}, expected_output_shape=(3, 5, 6),
                   expected_num_trainable_weights=1, expected_num_non_trainable_weights=2,
                   expected_mixed_output_dtype="bfloat16", mixed_precision_atol=0.05)


def test_exact_values_with_ones_initializer():
    mlp = MLP([2, 3], kernel_initializer="ones", output_units=1, return_hidden=True)
    out, hidden = mlp(np.array([[1.0, 2.0], [-1.0, -2.0]], np.float32))
    np.testing.assert_allclose(hidden[0].numpy(), [[3.0, 3.0], [0.0, 0.0]])
    np.testing.assert_allclose(hidden[1].numpy(), [[6.0, 6.0, 6.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(out.numpy(), [[18.0], [0.0]])
    sig = MLP([1], activation="sigmoid", kernel_initializer="ones")(np.array([[0.5, -0.5], [1.0, 1.0]], np.float32))
    np.testing.assert_allclose(sig.numpy(), [[0.5], [1.0 / (1.0 + np.exp(-2.0))]], rtol=1e-6)
    prelu = MLP([1], activation="prelu", kernel_initializer="ones")(np.array([[-1.0, -3.0]], np.float32))
    np.testing.assert_allclose(prelu.numpy(), [[-1.0]], rtol=1e-6)  # slope 0.25 * -4


def test_dice_exact_values_training_and_inference():
    x = np.array([[1.0], [3.0]], np.float32)
    dice = Dice(alpha_initializer=keras.initializers.Constant(0.5), momentum=0.9)
    # Inference with the initial moving statistics (mean 0, variance 1).
    p = 1.0 / (1.0 + np.exp(-x / np.sqrt(1.0 + 1e-8)))
    np.testing.assert_allclose(dice(x).numpy(), p * x + (1 - p) * 0.5 * x, rtol=1e-6)
    # Training: batch mean 2, variance 1.
    p = 1.0 / (1.0 + np.exp(-(x - 2.0)))
    np.testing.assert_allclose(dice(x, training=True).numpy(), p * x + (1 - p) * 0.5 * x, rtol=1e-6)
    np.testing.assert_allclose(dice.moving_mean.numpy(), [0.2], rtol=1e-6)
    np.testing.assert_allclose(dice.moving_variance.numpy(), [1.0], rtol=1e-6)
    # A masked position does not enter the statistics; an all-masked batch leaves them untouched.
    xm = np.array([[[1.0], [3.0], [100.0]]], np.float32)
    out = dice(xm, training=True, mask=np.array([[True, True, False]])).numpy()
    np.testing.assert_allclose(out[0, :2], (p * x + (1 - p) * 0.5 * x), rtol=1e-6)
    before = dice.moving_mean.numpy().copy()
    out = dice(xm, training=True, mask=np.zeros((1, 3), bool)).numpy()
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(dice.moving_mean.numpy(), before)


@pytest.mark.parametrize("normalization", [None, "batch"])
def test_padding_does_not_change_output_in_training(normalization):
    mlp = MLP([4], activation="dice", normalization=normalization, output_units=1)
    # The padded rows' outputs differ (garbage in, garbage out); the valid ones must not.
    data = {"inputs": X3[:2], "mask": MASK[:2]}
    assert_padding_invariant(mlp, data, ["inputs"], call_kwargs={"training": True}, atol=1e-4)


def test_dropout_only_in_training():
    mlp = MLP([64], dropout=0.5, kernel_initializer="ones")
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(mlp(x).numpy(), np.full((2, 64), 3.0))
    assert np.any(mlp(x, training=True).numpy() == 0.0)


def test_batch_norm_synchronized_option():
    mlp = MLP([4], normalization="batch", synchronized=True)
    mlp(X2)
    assert mlp.norm_layers[0].synchronized
    assert keras.layers.deserialize(keras.layers.serialize(mlp)).synchronized


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_units": [4, -1]}, r"hidden_units=\[4, -1\]"),
        ({"hidden_units": []}, "no layer"),
        ({"activation": "swishy"}, "activation='swishy'"),
        ({"activation": len}, "activation=<built-in function len>"),
        ({"dropout": -0.1}, "dropout=-0.1"),
        ({"normalization": "group"}, "normalization='group'"),
        ({"output_units": 0}, "output_units=0"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLP(**kwargs)


def test_invalid_dice_arguments():
    with pytest.raises(ValueError, match="momentum=1.0"):
        Dice(momentum=1.0)
    with pytest.raises(ValueError, match="epsilon=0"):
        Dice(epsilon=0)


@pytest.mark.parametrize("normalization", [None, "batch", "layer"])
def test_call_from_pre_activation_equals_call(normalization):
    """From the first Dense's output, the MLP gives what it gives on the input (hidden outputs too), with the
    mask and training passed through to the batch statistics."""
    keras.utils.set_random_seed(0)
    mlp = MLP(hidden_units=(6, 3), activation="dice", normalization=normalization, output_units=1, return_hidden=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 5, 7)).astype(np.float32)
    mask = rng.random((4, 5)) < 0.7
    for training in (True, False):
        want, want_hidden = mlp(x, mask=mask, training=training)
        got, got_hidden = mlp.call_from_pre_activation(mlp.dense_layers[0](x), mask=mask, training=training)
        np.testing.assert_array_equal(got.numpy(), want.numpy())
        for g, w in zip(got_hidden, want_hidden, strict=True):
            np.testing.assert_array_equal(g.numpy(), w.numpy())


def test_call_from_pre_activation_needs_a_hidden_layer():
    mlp = MLP(hidden_units=(), output_units=1)
    mlp.build((2, 3))
    with pytest.raises(ValueError, match="at least one hidden layer"):
        mlp.call_from_pre_activation(keras.ops.ones((2, 3)))


@pytest.mark.parametrize("freeze", ["constructor", "before_build", "after_build"])
@pytest.mark.parametrize("activation,normalization", [("prelu", "batch"), ("dice", "layer")])
def test_frozen_mlp_has_no_trainable_variable(freeze, activation, normalization):
    # MLP creates its sublayers in build(); Keras passes `trainable` on only to sublayers that exist when it is
    # set, so a frozen MLP freezes them itself: no variable may stay trainable for a model around it to train.
    x = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)
    mlp = MLP((6, 4), activation=activation, normalization=normalization, dropout=0.2, output_units=1,
              trainable=freeze != "constructor")
    if freeze == "before_build":
        mlp.trainable = False
    mlp(x)
    if freeze == "after_build":
        mlp.trainable = False
    assert mlp.weights and [v.path for v in mlp.variables if v.trainable] == []
    model = keras.Sequential([keras.Input((3, 5)), mlp, keras.layers.Dense(1)])
    assert len(model.trainable_variables) == 2  # the Dense head's kernel and bias only
    mlp.trainable = True
    assert len(mlp.trainable_weights) == 2 * 2 + 2 + 2 * 2 + 2  # dense_i, activation_i, norm_i, output
