import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_ads.layers import DINAttention
from tests.layer_test_case import assert_padding_invariant, dtype_policy, run_layer_test

B, S, E = 3, 5, 4


def inputs(seed=0, value_dim=None, side_dim=None):
    rng = np.random.default_rng(seed)
    data = {
        "query": rng.normal(size=(B, E)).astype(np.float32),
        "keys": rng.normal(size=(B, S, E)).astype(np.float32),
        "mask": np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool),  # full, short, empty
    }
    if value_dim:
        data["value"] = rng.normal(size=(B, S, value_dim)).astype(np.float32)
    if side_dim == 0:
        data["side_features"] = rng.uniform(-1, 1, size=(B, S)).astype(np.float32)
    elif side_dim:
        data["side_features"] = rng.uniform(-1, 1, size=(B, S, side_dim)).astype(np.float32)
    return data


def test_layer_standard_checks_default_dice():
    # attention MLP (80, 40) + output: 2 Dense (kernel, bias), the output's kernel (no bias under softmax),
    # 2 Dice alphas; 2 Dice x (moving mean, variance).
    run_layer_test(
        DINAttention,
        {},
        inputs(),
        expected_output_shape=[(B, E), (B, S)],
        expected_num_trainable_weights=7,
        expected_num_non_trainable_weights=4,
        call_kwargs={"return_attention_scores": True},
        expected_mixed_output_dtype=["bfloat16", "float32"],
        mixed_precision_atol=0.05,
    )


def test_layer_standard_checks_value_side_features_prelu_none():
    # Dense(6) kernel+bias, PReLU alpha, output kernel+bias.
    run_layer_test(
        DINAttention,
        {"hidden_units": (6,), "activation": "prelu", "normalization": "none"},
        inputs(value_dim=7, side_dim=2),
        expected_output_shape=(B, 7),
        expected_num_trainable_weights=5,
        mixed_precision_atol=0.1,
    )


def _expected_scores(q, k, side=None):
    # One output unit with kernel ones and bias zero over [q, k, q - k, q * k, side]:
    # sum(q) + sum(k) + sum(q) - sum(k) + q.k + sum(side) = 2 sum(q) + q.k + sum(side).
    scores = 2.0 * q.sum(-1, keepdims=True) + np.einsum("be,bse->bs", q, k)
    if side is not None:
        scores = scores + side.reshape(side.shape[0], side.shape[1], -1).sum(-1)
    return scores


@pytest.mark.parametrize("normalization", ["softmax", "none"])
def test_exact_values(normalization):
    x = inputs(value_dim=3, side_dim=0)
    q, k, v, side, mask = (x[n] for n in ("query", "keys", "value", "side_features", "mask"))
    layer = DINAttention(hidden_units=(), kernel_initializer="ones", normalization=normalization)
    pooled, weights = layer(q, k, value=v, side_features=side, mask=mask, return_attention_scores=True)
    scores = _expected_scores(q, k, side)
    if normalization == "softmax":
        expected_w = np.zeros_like(scores)
        for b in np.nonzero(mask.any(-1))[0]:
            w = np.exp(scores[b][mask[b]] - scores[b][mask[b]].max())
            expected_w[b][mask[b]] = w / w.sum()
        np.testing.assert_allclose(weights.numpy().sum(-1), [1.0, 1.0, 0.0], rtol=1e-6)
    else:
        expected_w = np.where(mask, scores, 0.0)
    np.testing.assert_allclose(weights.numpy(), expected_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled.numpy(), np.einsum("bs,bsd->bd", expected_w, v), rtol=1e-5, atol=1e-5)


def test_values_default_to_keys_and_3d_side_features():
    x = inputs(side_dim=2)
    layer = DINAttention(hidden_units=(), kernel_initializer="ones")
    pooled, weights = layer(x["query"], x["keys"], side_features=x["side_features"], mask=x["mask"],
                            return_attention_scores=True)
    np.testing.assert_allclose(pooled.numpy(), np.einsum("bs,bsd->bd", weights.numpy(), x["keys"]), rtol=1e-5)
    scores = _expected_scores(x["query"], x["keys"], x["side_features"])
    np.testing.assert_allclose(weights.numpy()[0], np.exp(scores[0]) / np.exp(scores[0]).sum(), rtol=1e-5)


@pytest.mark.parametrize("normalization", ["softmax", "none"])
@pytest.mark.parametrize("training", [False, True])
def test_padding_does_not_change_output(normalization, training):
    layer = DINAttention(hidden_units=(8, 4), activation="dice", normalization=normalization)
    x = inputs(value_dim=3, side_dim=0)
    # training=True: the Dice batch statistics must use only the valid positions.
    assert_padding_invariant(layer, x, ["keys", "value", "side_features"],
                             call_kwargs={"return_attention_scores": True, "training": training})


def test_nan_and_inf_padding_do_not_leak():
    x = inputs(value_dim=3, side_dim=0)
    layer = DINAttention(hidden_units=(4,), activation="dice")
    expected = layer(**x, training=True).numpy()
    pad = ~x["mask"]
    for key in ("keys", "value", "side_features"):
        x[key] = x[key].copy()
        x[key][pad] = np.nan if key != "value" else np.inf
    np.testing.assert_allclose(layer(**x, training=True).numpy(), expected, rtol=1e-6)
    query = tf.Variable(x.pop("query"))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(query, **x, training=True))
    grads = tape.gradient(loss, [query, *layer.trainable_weights])
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_all_padded_row_is_zero_and_finite(policy):
    x = inputs()
    x["keys"] = x["keys"] * 300.0  # large logits: a fixed -1e9 fill or a fp16 softmax would overflow
    with dtype_policy(policy):
        layer = DINAttention(hidden_units=(4,), activation="sigmoid", kernel_initializer="ones")
        pooled, weights = layer(x["query"], x["keys"], mask=x["mask"], return_attention_scores=True)
    pooled = pooled.numpy().astype(np.float32)
    assert np.all(np.isfinite(pooled)) and np.all(np.isfinite(weights.numpy()))
    np.testing.assert_array_equal(pooled[2], np.zeros(E))
    np.testing.assert_array_equal(weights.numpy()[2], np.zeros(S))
    np.testing.assert_array_equal(weights.numpy()[1, 2:], np.zeros(3))


def test_gradients_finite_with_all_padded_row():
    x = inputs()
    layer = DINAttention(hidden_units=(4,))
    query = tf.Variable(x["query"])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(query, x["keys"], mask=x["mask"], training=True))
    grads = tape.gradient(loss, [query, *layer.trainable_weights])
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    np.testing.assert_array_equal(grads[0].numpy()[2], np.zeros(E))  # nothing flows from an empty history


@pytest.mark.parametrize("normalization", ["softmax", "none"])
@pytest.mark.parametrize("seed", range(5))
def test_every_weight_learns(normalization, seed):
    # Softmax is invariant to a shift of all scores: a bias on the score would get an exactly-zero gradient
    # (whether it came out as 0 or as float noise depended on the random initialisation). Under softmax the
    # score has no bias; every remaining weight gets a non-zero gradient for any initialisation.
    keras.utils.set_random_seed(seed)
    x = inputs(seed)
    layer = DINAttention(hidden_units=(4,), activation="prelu", normalization=normalization)
    with tf.GradientTape() as tape:
        out = layer(x["query"], x["keys"], mask=x["mask"], training=True)
        loss = tf.reduce_sum(out * tf.constant(np.arange(1.0, E + 1, dtype=np.float32)))
    paths = [w.path for w in layer.trainable_weights]
    assert any(p.endswith("attention_mlp/output/bias") for p in paths) == (normalization == "none"), paths
    for w, g in zip(layer.trainable_weights, tape.gradient(loss, layer.trainable_weights)):
        assert np.any(g.numpy() != 0), w.path


def test_no_mask_means_all_valid():
    x = inputs()
    layer = DINAttention(hidden_units=(4,))
    full = np.ones((B, S), bool)
    np.testing.assert_allclose(layer(x["query"], x["keys"]).numpy(),
                               layer(x["query"], x["keys"], mask=full).numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"normalization": "sparsemax"}, "normalization='sparsemax'"),
        ({"activation": "nope"}, "activation='nope'"),
        ({"hidden_units": (8, 0)}, r"hidden_units=\[8, 0\]"),
        ({"dropout": 1.0}, "dropout=1.0"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DINAttention(**kwargs)


def test_query_keys_width_mismatch_raises():
    with pytest.raises(ValueError, match="same width"):
        DINAttention()(np.ones((2, 3), np.float32), np.ones((2, 4, 5), np.float32))


def test_config_lists_every_argument():
    layer = DINAttention(hidden_units=(3,), activation="sigmoid", normalization="none", dropout=0.1,
                         kernel_initializer="ones", bias_initializer="zeros", kernel_regularizer="l2")
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    for name in ("hidden_units", "activation", "normalization", "dropout"):
        assert getattr(restored, name) == getattr(layer, name)
    assert isinstance(restored.kernel_initializer, keras.initializers.Ones)
    assert isinstance(restored.kernel_regularizer, keras.regularizers.L2)


@pytest.mark.parametrize("freeze", ["constructor", "before_build", "after_build"])
@pytest.mark.parametrize("activation", ["dice", "prelu"])
def test_frozen_layer_has_no_trainable_variable(freeze, activation):
    # Keras passes `trainable` on only to sublayers that exist when it is set; the attention MLP exists from the
    # constructor on, and creates its own sublayers in its build(): no variable may stay trainable.
    data = inputs()
    layer = DINAttention(hidden_units=(6, 3), activation=activation, trainable=freeze != "constructor")
    if freeze == "before_build":
        layer.trainable = False
    layer(data["query"], data["keys"], mask=data["mask"])
    if freeze == "after_build":
        layer.trainable = False
    assert layer.weights and [v.path for v in layer.variables if v.trainable] == []
    query, keys = keras.Input((E,)), keras.Input((S, E))
    model = keras.Model([query, keys], keras.layers.Dense(1)(layer(query, keys)))
    assert len(model.trainable_variables) == 2  # the Dense head's kernel and bias only
    layer.trainable = True
    assert len(layer.trainable_weights) == 2 * 2 + 2 + 1  # dense_i, activation_i, the output's kernel
