import keras
import numpy as np
import pytest

from mm_ads.layers import SimScore
from tests.layer_test_case import assert_padding_invariant, dtype_policy, run_layer_test

TARGET = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
HISTORY = np.array(
    [
        [[3.0, 4.0], [-4.0, 3.0], [0.0, 2.0], [9.0, 9.0]],    # cos 1, 0, 0.8, (3*9 + 4*9) / (5 * 9 sqrt 2)
        [[-1.0, 0.0], [-2.0, 1.0], [0.0, 0.0], [7.0, 7.0]],   # cos -1, -2/sqrt5, zero vector, (padding)
    ],
    np.float32,
)
MASK = np.array([[True, True, True, False], [True, True, True, False]])
COS = np.array([[1.0, 0.0, 0.8, 0.0], [-1.0, -2.0 / np.sqrt(5.0), 0.0, 0.0]], np.float32)
DOT = np.array([[25.0, 0.0, 8.0, 0.0], [-1.0, -2.0, 0.0, 0.0]], np.float32)


def test_layer_standard_checks():
    data = {"target": TARGET, "history": HISTORY, "mask": MASK}
    run_layer_test(SimScore, {}, data, expected_output_shape=(2, 4), expected_mixed_output_dtype="float32",
                   mixed_precision_atol=0.0)
    run_layer_test(
        SimScore,
        {"similarity": "dot", "summary": "mean_max", "keepdims": True},
        data,
        expected_output_shape=[(2, 4, 1), (2, 2)],
        expected_mixed_output_dtype="float32",
        mixed_precision_atol=0.0,
    )


def test_exact_values_cosine_and_dot():
    np.testing.assert_allclose(SimScore()(TARGET, HISTORY, mask=MASK).numpy(), COS, atol=1e-6)
    np.testing.assert_allclose(SimScore(similarity="dot")(TARGET, HISTORY, mask=MASK).numpy(), DOT, atol=1e-5)
    out = SimScore(keepdims=True)(TARGET, HISTORY, mask=MASK).numpy()
    np.testing.assert_allclose(out[..., 0], COS, atol=1e-6)


def test_summaries_use_only_valid_non_zero_items():
    scores, summary = SimScore(summary="mean_max")(TARGET, HISTORY, mask=MASK)
    # Row 0: valid cos 1, 0, 0.8. Row 1: valid -1, -2/sqrt5; the zero vector is missing, not a 0 score,
    # so the max is -2/sqrt5 (not 0) and the mean is over 2 items.
    expected = [[1.8 / 3.0, 1.0], [(-1.0 - 2.0 / np.sqrt(5.0)) / 2.0, -2.0 / np.sqrt(5.0)]]
    np.testing.assert_allclose(summary.numpy(), expected, atol=1e-6)
    _, mean = SimScore(summary="mean")(TARGET, HISTORY, mask=MASK)
    _, peak = SimScore(summary="max")(TARGET, HISTORY, mask=MASK)
    np.testing.assert_allclose(np.concatenate([mean.numpy(), peak.numpy()], -1), expected, atol=1e-6)


def test_all_padded_row_is_zero_and_finite():
    mask = np.array([[False] * 4, [True, False, False, False]])
    scores, summary = SimScore(summary="mean_max", similarity="dot")(TARGET, HISTORY, mask=mask)
    np.testing.assert_array_equal(scores.numpy()[0], np.zeros(4))
    np.testing.assert_array_equal(summary.numpy(), [[0.0, 0.0], [-1.0, -1.0]])


def test_padding_does_not_change_output():
    data = {"target": TARGET, "history": HISTORY, "mask": MASK}
    assert_padding_invariant(SimScore(summary="mean_max"), data, ["history"], atol=0)


def test_int8_with_scale_and_bfloat16_policy():
    q_target, q_history = TARGET.astype(np.int8), HISTORY.astype(np.int8)
    out = SimScore(similarity="dot", scale=0.5)(q_target, q_history, mask=MASK).numpy()
    np.testing.assert_allclose(out, DOT * 0.25, atol=1e-5)
    with dtype_policy("mixed_bfloat16"):
        out = SimScore()(TARGET, HISTORY, mask=MASK)
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
        np.testing.assert_allclose(out.numpy(), COS, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"similarity": "l2"}, "similarity='l2'"),
        ({"summary": "min"}, "summary='min'"),
        ({"scale": -1.0}, "scale=-1.0"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimScore(**kwargs)
