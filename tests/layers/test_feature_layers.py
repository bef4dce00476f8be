"""StringHashing, MaskedPooling and NumericEncoding: exact values, padding, round trips."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_ads.layers import MaskedPooling, NumericEncoding, StringHashing
from tests.layer_test_case import (
    assert_config_round_trip,
    assert_keras_save_round_trip,
    assert_padding_invariant,
    dtype_policy,
    run_layer_test,
)

STRINGS = np.array([["doctor", "", "artist"], ["", "", ""]], object)


def test_string_hashing_is_the_farmhash_bucket_plus_one_and_padding_is_row_zero():
    rows = StringHashing(num_buckets=50)(tf.constant(STRINGS)).numpy()
    expected = tf.strings.to_hash_bucket_fast(["doctor", "artist"], 49).numpy() + 1
    np.testing.assert_array_equal(rows[0, [0, 2]], expected)
    np.testing.assert_array_equal(rows[0, 1], 0)
    np.testing.assert_array_equal(rows[1], [0, 0, 0])
    assert rows.dtype == np.int64 and rows.min() >= 0 and rows.max() < 50
    # stable across machines and versions (FarmHash Fingerprint64): the rows a trained table was written with
    np.testing.assert_array_equal(rows[0, [0, 2]], [42, 32])
    assert StringHashing(num_buckets=2)(tf.constant(["a", "b", ""])).numpy().tolist() == [1, 1, 0]


def test_string_hashing_round_trip_and_validation():
    layer = StringHashing(num_buckets=7, padding_value="<pad>", name="h")
    revived = assert_config_round_trip(layer)
    x = tf.constant([["a", "<pad>"], ["b", "c"]])
    np.testing.assert_array_equal(revived(x).numpy(), layer(x).numpy())
    assert layer(x).numpy()[0, 1] == 0
    inp = keras.Input((2,), dtype="string", name="s")
    model = keras.Model(inp, keras.ops.cast(layer(inp), "float32"))
    assert_keras_save_round_trip(model, x)
    with pytest.raises(ValueError, match="num_buckets must be an int >= 2"):
        StringHashing(num_buckets=1)


EMB = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
MASK = np.array([[True, False, True], [False, False, False]])


@pytest.mark.parametrize("combiner", ["mean", "sum"])
def test_masked_pooling_equals_numpy_reference(combiner):
    out = MaskedPooling(combiner)(EMB, mask=MASK).numpy()
    weights = MASK.astype(np.float32)
    total = np.einsum("bme,bm->be", EMB, weights)
    if combiner == "mean":
        total = total / np.maximum(weights.sum(1, keepdims=True), 1.0)
    np.testing.assert_allclose(out, total, atol=1e-6)
    np.testing.assert_allclose(out[0], [2.0, 3.0] if combiner == "mean" else [4.0, 6.0])
    np.testing.assert_array_equal(out[1], [0.0, 0.0])  # all padded: finite zeros


def test_masked_pooling_standard_checks_and_padding():
    data = {"inputs": EMB, "mask": MASK}
    run_layer_test(MaskedPooling, {"combiner": "sum"}, data, expected_output_shape=(2, 2),
                   mixed_precision_atol=0.1)
    layer = MaskedPooling("mean")
    assert_padding_invariant(layer, {"inputs": EMB, "mask": MASK}, ["inputs"])
    nan = EMB.copy()
    nan[0, 1] = np.nan  # under padding
    assert np.isfinite(layer(nan, mask=MASK).numpy()).all()
    with pytest.raises(ValueError, match="combiner must be one of"):
        MaskedPooling("max")


def test_numeric_encoding_standardises_and_bucketises():
    np.testing.assert_allclose(NumericEncoding(mean=30.0, std=10.0)(np.array([20.0, 45.0])).numpy(), [[-1.0], [1.5]])
    two = NumericEncoding(mean=[1.0, 2.0], std=[2.0, 4.0])(np.array([[3.0, 2.0], [1.0, 10.0]], np.float32))
    np.testing.assert_allclose(two.numpy(), [[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(NumericEncoding()(np.array([1.5, -2.0])).numpy(), [[1.5], [-2.0]])
    buckets = NumericEncoding(boundaries=[18.0, 25.0])(np.array([17.0, 18.0, 24.9, 25.0, 60.0]))
    assert buckets.dtype == tf.int64
    np.testing.assert_array_equal(buckets.numpy()[:, 0], [0, 1, 1, 2, 2])
    np.testing.assert_array_equal(buckets.numpy()[:, 0], np.digitize([17.0, 18.0, 24.9, 25.0, 60.0], [18.0, 25.0]))


def test_numeric_encoding_round_trips_and_validation():
    x = np.array([[3.0, 2.0], [1.0, 10.0]], np.float32)
    run_layer_test(NumericEncoding, {"mean": [1.0, 2.0], "std": [2.0, 4.0]}, {"inputs": x},
                   expected_output_shape=(2, 2), expected_mixed_output_dtype="float32", mixed_precision_atol=0.0)
    bucket = NumericEncoding(boundaries=[0.0, 5.0])
    revived = assert_config_round_trip(bucket)
    np.testing.assert_array_equal(revived(x).numpy(), [[1, 1], [1, 2]])
    with dtype_policy("mixed_bfloat16"):
        np.testing.assert_array_equal(NumericEncoding(boundaries=[0.0, 5.0])(x).numpy(), [[1, 1], [1, 2]])
    for kwargs, match in [({"mean": 1.0}, "together"), ({"mean": 0.0, "std": 0.0}, "std must be > 0"),
                          ({"boundaries": [2.0, 1.0]}, "strictly increasing"),
                          ({"mean": 0.0, "std": 1.0, "boundaries": [1.0]}, "either mean/std or boundaries")]:
        with pytest.raises(ValueError, match=match):
            NumericEncoding(**kwargs)
