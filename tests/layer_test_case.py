"""Reusable checks for mm_ads Keras layers (in the spirit of keras-hub's `TestCase.run_layer_test`).

Plain functions, usable from any pytest test:

- `run_layer_test(cls, init_kwargs, inputs, expected_output_shape, ...)`: build + weight counts, output
  shapes/dtypes/finiteness, config round trip, `deserialize(serialize())` with copied weights gives equal
  outputs, a functional model containing the layer gives equal outputs after `.keras` save/load, gradients
  reach every trainable weight, and a `mixed_bfloat16` run (global policy restored afterwards).
- `assert_padding_invariant(...)`: appending garbage positions under mask=False changes nothing.
- `dtype_policy(name)`: context manager that sets the global dtype policy and always restores it.

`inputs` is a dict of the layer's call arguments (tensors / NumPy arrays, e.g. `{"query": q, "keys": k,
"mask": m}`); non-tensor call arguments (`return_attention_scores=True`) go in `call_kwargs`.
"""

import contextlib
import inspect
import json
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf


@contextlib.contextmanager
def dtype_policy(name):
    """Sets the global Keras dtype policy inside the block; the previous policy is always restored."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def flat(outputs):
    """Outputs (tensor, tuple, list of lists) → flat list of NumPy arrays."""
    return [keras.ops.convert_to_numpy(x) for x in keras.tree.flatten(outputs)]


def assert_outputs_close(actual, expected, atol=1e-6, rtol=1e-6, msg=""):
    actual, expected = flat(actual), flat(expected)
    assert len(actual) == len(expected), f"{msg}: {len(actual)} outputs vs {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{msg}: output {i} shape {a.shape} vs {e.shape}"
        np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), atol=atol, rtol=rtol,
                                   err_msg=f"{msg}: output {i}")


def _shapes(outputs):
    return [tuple(x.shape) for x in keras.tree.flatten(outputs)]


def _dtypes(outputs):
    return [keras.backend.standardize_dtype(x.dtype) for x in keras.tree.flatten(outputs)]


def _expand(per_output, n):
    """A single value applies to every output; a list/tuple gives one value per (flattened) output."""
    if isinstance(per_output, (list, tuple)):
        assert len(per_output) == n, f"expected {n} entries, got {per_output}"
        return list(per_output)
    return [per_output] * n


def _json_config(layer):
    return json.dumps(layer.get_config(), sort_keys=True)


def assert_config_round_trip(layer):
    """`get_config()` lists every constructor argument, and `from_config(get_config())` and
    `deserialize(serialize())` (through JSON) rebuild an equal config.

    Returns the deserialized (unbuilt-or-built, weights not copied) layer.
    """
    config = _json_config(layer)
    arguments = [
        name for name, p in inspect.signature(type(layer).__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    missing = [name for name in arguments if name not in layer.get_config()]
    assert not missing, f"get_config() of {type(layer).__name__} misses constructor arguments {missing}"
    assert _json_config(type(layer).from_config(json.loads(config))) == config
    serialized = json.loads(json.dumps(keras.layers.serialize(layer)))
    revived = keras.layers.deserialize(serialized)
    assert type(revived) is type(layer)
    assert _json_config(revived) == config
    return revived


def _tensor_inputs(inputs):
    return {k: v for k, v in inputs.items() if v is not None}


def build_functional_model(layer, inputs, call_kwargs=None):
    """A functional `keras.Model` whose dict inputs are named after the layer's call arguments."""
    symbolic = {
        k: keras.Input(shape=tuple(np.shape(v))[1:], dtype=keras.backend.standardize_dtype(v.dtype), name=k)
        for k, v in _tensor_inputs(inputs).items()
    }
    outputs = layer(**symbolic, **(call_kwargs or {}))
    return keras.Model(symbolic, outputs)


def assert_keras_save_round_trip(model, inputs, atol=1e-6, rtol=1e-6):
    """Saves `model` to `.keras`, reloads it, checks equal outputs and configs; returns the loaded model."""
    expected = model(inputs, training=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
    assert_outputs_close(loaded(inputs, training=False), expected, atol=atol, rtol=rtol, msg=".keras round trip")
    for original in model.layers:
        assert _json_config(loaded.get_layer(original.name)) == _json_config(original), original.name
    return loaded


def assert_padding_invariant(layer, inputs, sequence_keys, num_pad=3, mask_key="mask", call_kwargs=None,
                             atol=1e-5, seed=0):
    """Appends `num_pad` positions of garbage (large random values) to every `sequence_keys` input along
    axis 1 with `mask` False there; outputs must not change. Outputs with a sequence axis (axis 1 of
    length S + num_pad) are compared on the first S positions."""
    rng = np.random.default_rng(seed)
    call_kwargs = call_kwargs or {}
    seq_len = np.shape(inputs[sequence_keys[0]])[1]
    padded = dict(inputs)
    for key in sequence_keys:
        x = np.asarray(inputs[key])
        garbage = rng.normal(scale=50.0, size=(x.shape[0], num_pad, *x.shape[2:])).astype(x.dtype)
        padded[key] = np.concatenate([x, garbage], axis=1)
    mask = np.ones(np.shape(inputs[sequence_keys[0]])[:2], bool) if inputs.get(mask_key) is None else inputs[mask_key]
    padded[mask_key] = np.concatenate([np.asarray(mask, bool), np.zeros((mask.shape[0], num_pad), bool)], axis=1)
    expected = flat(layer(**inputs, **call_kwargs))
    actual = flat(layer(**padded, **call_kwargs))
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        if a.ndim >= 2 and a.shape[1] == seq_len + num_pad and e.shape[1] == seq_len:
            a = a[:, :seq_len]
        np.testing.assert_allclose(a, e, atol=atol, rtol=1e-5, err_msg=f"padding changed output {i}")


def run_layer_test(
    cls,
    init_kwargs,
    inputs,
    expected_output_shape,
    expected_num_trainable_weights=0,
    expected_num_non_trainable_weights=0,
    call_kwargs=None,
    expected_output_dtype="float32",
    expected_mixed_output_dtype="bfloat16",
    mixed_precision_atol=None,
    run_gradient_check=True,
    atol=1e-6,
):
    """Runs the standard checks on one layer configuration; returns the (float32) layer.

    Args:
        cls: layer class.
        init_kwargs: constructor arguments.
        inputs: dict of tensor call arguments (NumPy arrays / tensors; None values are dropped).
        expected_output_shape: shape tuple, or a list of shape tuples (one per flattened output).
        expected_num_trainable_weights / expected_num_non_trainable_weights: weight counts after build.
        call_kwargs: non-tensor call arguments (e.g. `{"return_attention_scores": True}`).
        expected_output_dtype: output dtype(s) under the float32 policy (one value, or one per output).
        expected_mixed_output_dtype: output dtype(s) under "mixed_bfloat16", e.g. "float32" where the layer
            promises float32 (similarities, counts, logits).
        mixed_precision_atol: if set, the mixed_bfloat16 layer (with the float32 layer's weights) must match
            the float32 outputs within this tolerance.
        run_gradient_check: check that a loss on the first output gives finite gradients to every
            trainable weight, not all zero (skipped without trainable weights).
        atol: tolerance of the round-trip comparisons.
    """
    call_kwargs = call_kwargs or {}
    inputs = _tensor_inputs(inputs)
    expected_shapes = (
        [tuple(s) for s in expected_output_shape]
        if isinstance(expected_output_shape, list)
        else [tuple(expected_output_shape)]
    )
    n_out = len(expected_shapes)

    # Config round trip of the unbuilt layer.
    layer = cls(**init_kwargs)
    assert_config_round_trip(layer)

    # Eager call: build, weight counts, shapes, dtypes, finiteness.
    outputs = layer(**inputs, **call_kwargs)
    assert layer.built
    assert len(layer.trainable_weights) == expected_num_trainable_weights, [w.path for w in layer.trainable_weights]
    assert len(layer.non_trainable_weights) == expected_num_non_trainable_weights, [
        w.path for w in layer.non_trainable_weights
    ]
    assert _shapes(outputs) == expected_shapes, f"output shapes {_shapes(outputs)} != {expected_shapes}"
    assert _dtypes(outputs) == _expand(expected_output_dtype, n_out), _dtypes(outputs)
    for i, x in enumerate(flat(outputs)):
        assert np.all(np.isfinite(x)), f"output {i} is not finite"

    # deserialize(serialize()) of the built layer, weights copied: equal config and equal outputs.
    revived = assert_config_round_trip(layer)
    revived(**inputs, **call_kwargs)
    revived.set_weights(layer.get_weights())
    assert_outputs_close(revived(**inputs, **call_kwargs), outputs, atol=atol, msg="deserialize(serialize())")

    # Functional model: symbolic shapes, equal outputs, `.keras` save/load.
    model = build_functional_model(layer, inputs, call_kwargs)
    symbolic_shapes = [(None, *s[1:]) for s in expected_shapes]
    assert [tuple(x.shape) for x in keras.tree.flatten(model.outputs)] == symbolic_shapes
    assert_outputs_close(model(inputs, training=False), outputs, atol=atol, msg="functional model")
    assert_keras_save_round_trip(model, inputs, atol=atol)

    # Gradients reach every trainable weight (training=True exercises batch statistics and dropout).
    if run_gradient_check and layer.trainable_weights:
        with tf.GradientTape() as tape:
            first = keras.tree.flatten(layer(**inputs, **call_kwargs, training=True))[0]
            weights = tf.random.stateless_normal(tf.shape(first), seed=(1, 2), dtype=first.dtype)
            loss = tf.reduce_sum(tf.cast(first * weights, tf.float32))
        grads = tape.gradient(loss, layer.trainable_weights)
        for w, g in zip(layer.trainable_weights, grads):
            assert g is not None, f"no gradient for {w.path}"
            assert np.all(np.isfinite(keras.ops.convert_to_numpy(g))), f"non-finite gradient for {w.path}"
        assert any(np.any(keras.ops.convert_to_numpy(g) != 0) for g in grads), "all gradients are zero"

    # mixed_bfloat16: float32 variables, promised output dtypes, finite, same shapes.
    with dtype_policy("mixed_bfloat16"):
        mixed = cls(**init_kwargs)
        mixed_outputs = mixed(**inputs, **call_kwargs)
        assert mixed.dtype_policy.name == "mixed_bfloat16"
        for w in mixed.weights:
            assert keras.backend.standardize_dtype(w.dtype) == "float32", f"{w.path} is {w.dtype}"
        assert _shapes(mixed_outputs) == expected_shapes
        assert _dtypes(mixed_outputs) == _expand(expected_mixed_output_dtype, n_out), _dtypes(mixed_outputs)
        for i, x in enumerate(flat(mixed_outputs)):
            assert np.all(np.isfinite(x.astype(np.float32))), f"mixed_bfloat16 output {i} is not finite"
        if mixed_precision_atol is not None:
            mixed.set_weights(layer.get_weights())
            assert_outputs_close(mixed(**inputs, **call_kwargs), outputs, atol=mixed_precision_atol, rtol=0.0,
                                 msg="mixed_bfloat16 vs float32")
    return layer
