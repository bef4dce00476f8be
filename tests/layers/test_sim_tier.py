import math

import keras
import numpy as np
import pytest

from mm_ads.layers import SimTier
from tests.layer_test_case import assert_padding_invariant, dtype_policy, run_layer_test

# Target e1 = [1, 0]; cosines of the history rows and their tiers for N = 4 (tier k holds (k/2 - 1, (k+1)/2 - 1]).
TARGET = np.array([[1.0, 0.0]], np.float32)
HISTORY = np.array([[
    [5.0, 0.0],    # s =  1.0 exactly  -> tier 3 (the pseudocode drops it: ceil(4) = 4)
    [-3.0, 0.0],   # s = -1.0 exactly  -> tier 0
    [0.0, 1.0],    # s =  0.0 exactly  -> (0 + 1) / 2 * 4 = 2 -> tier 1
    [3.0, 4.0],    # s =  0.6          -> ceil(3.2) - 1 = tier 3
    [-3.0, 4.0],   # s = -0.6          -> ceil(0.8) - 1 = tier 0
    [1.0, 1.0],    # s =  0.707        -> tier 3
    [4.0, 7.0],    # s =  0.496        -> ceil(2.99) - 1 = tier 2
]], np.float32)
EXPECTED = np.array([[2.0, 1.0, 1.0, 3.0]], np.float32)


def paper_pseudocode(target, seq, n):
    """Algorithm 1 of the paper, verbatim in NumPy (inputs already unit vectors)."""
    sim_score = np.sum(np.expand_dims(target, 1) * seq, axis=2)
    indices = np.reshape(np.ceil((sim_score + 1) / 2 * n), [-1, seq.shape[1]])
    weight = np.equal(np.reshape(np.arange(0, n, 1), [1, n, 1]), np.expand_dims(indices, axis=1))
    return np.sum(weight, axis=2)


def reference(target, history, mask, n):
    """Float64 NumPy reference of the fixed tiering."""
    t = target / np.linalg.norm(target, axis=-1, keepdims=True)
    h = history / np.linalg.norm(history, axis=-1, keepdims=True)
    s = np.nan_to_num(np.einsum("bd,bsd->bs", t, h))  # NaN padding: masked below anyway
    idx = np.clip(np.ceil((s + 1) / 2 * n) - 1, 0, n - 1).astype(int)
    out = np.zeros((target.shape[0], n))
    for b, i in zip(*np.nonzero(mask)):
        out[b, idx[b, i]] += 1
    return out


def random_inputs(b=4, s=9, d=6, seed=0):
    rng = np.random.default_rng(seed)
    target = rng.normal(size=(b, d)).astype(np.float32)
    history = rng.normal(size=(b, s, d)).astype(np.float32)
    history[:, 0] = target + 1e-3 * rng.normal(size=(b, d))  # near-duplicates: s > 1 - 2/N
    mask = rng.random((b, s)) < 0.7
    mask[:, 0] = True
    mask[-1] = False  # an all-padded row
    return target, history, mask


def test_layer_standard_checks():
    target, history, mask = random_inputs()
    run_layer_test(
        SimTier,
        {"num_tiers": 7},
        {"target": target, "history": history, "mask": mask},
        expected_output_shape=(4, 7),
        expected_mixed_output_dtype="float32",
        mixed_precision_atol=0.0,
    )
    run_layer_test(
        SimTier,
        {"num_tiers": 5, "count_transform": "log1p", "learnable_tier_weights": True},
        {"target": target, "history": history, "mask": mask},
        expected_output_shape=(4, 5),
        expected_num_trainable_weights=1,
        expected_mixed_output_dtype="float32",
        mixed_precision_atol=0.0,
    )


def test_hand_computed_counts_and_exact_boundaries():
    out = SimTier(num_tiers=4)(TARGET, HISTORY).numpy()
    np.testing.assert_array_equal(out, EXPECTED)
    # Only s = 1.0 / only s = -1.0: last / first tier.
    np.testing.assert_array_equal(SimTier(num_tiers=4)(TARGET, HISTORY[:, :1]).numpy(), [[0, 0, 0, 1]])
    np.testing.assert_array_equal(SimTier(num_tiers=4)(TARGET, HISTORY[:, 1:2]).numpy(), [[1, 0, 0, 0]])
    # Unit vectors with normalize=False: the same counts from the plain dot product.
    unit = HISTORY / np.linalg.norm(HISTORY, axis=-1, keepdims=True)
    np.testing.assert_array_equal(SimTier(num_tiers=4, normalize=False)(TARGET, unit).numpy(), EXPECTED)


def test_every_valid_score_counted_once_unlike_pseudocode():
    unit = HISTORY / np.linalg.norm(HISTORY, axis=-1, keepdims=True)
    pseudo = paper_pseudocode(TARGET, unit, 4)
    assert pseudo.sum() == 4  # the pseudocode drops the three scores above 1 - 2/N = 0.5
    assert SimTier(num_tiers=4)(TARGET, HISTORY).numpy().sum() == 7

    for n in (1, 7, 20):
        target, history, mask = random_inputs(seed=n)
        out = SimTier(num_tiers=n)(target, history, mask=mask).numpy()
        np.testing.assert_array_equal(out.sum(axis=1), mask.sum(axis=1))
        np.testing.assert_array_equal(out, reference(target, history, mask, n))
    assert out[:-1, -1].min() >= 1  # the near-duplicates land in the last tier (last row: all padded)


def test_padding_never_counted():
    # Zero-padded history: the pseudocode counts every pad (s = 0) in tier N/2.
    n = 4
    target = TARGET
    history = np.concatenate([HISTORY[:, 3:4], np.zeros((1, 3, 2), np.float32)], axis=1)  # 1 item + 3 pads
    mask = np.array([[True, False, False, False]])
    assert paper_pseudocode(target, history, n)[0, 2] == 3
    np.testing.assert_array_equal(SimTier(num_tiers=n)(target, history, mask=mask).numpy(), [[0, 0, 0, 1]])
    # Zero vectors are missing vectors: not counted even without a mask, even where the mask says valid.
    np.testing.assert_array_equal(SimTier(num_tiers=n)(target, history).numpy(), [[0, 0, 0, 1]])
    np.testing.assert_array_equal(SimTier(num_tiers=n)(target, history, mask=np.ones((1, 4), bool)).numpy(),
                                  [[0, 0, 0, 1]])
    # Garbage (non-zero) values under mask=False change nothing.
    t, h, m = random_inputs()
    assert_padding_invariant(SimTier(num_tiers=20), {"target": t, "history": h, "mask": m}, ["history"], atol=0)
    h = h.copy()
    h[~m] = np.nan
    np.testing.assert_array_equal(SimTier(num_tiers=20)(t, h, mask=m).numpy(), reference(t, h, m, 20))


def test_all_padded_row_and_zero_target_give_zeros():
    target, history, _ = random_inputs(b=2)
    mask = np.zeros(history.shape[:2], bool)
    out = SimTier(num_tiers=20, count_transform="log1p")(target, history, mask=mask).numpy()
    np.testing.assert_array_equal(out, np.zeros((2, 20)))
    out = SimTier(num_tiers=20)(np.zeros_like(target), history).numpy()
    np.testing.assert_array_equal(out, np.zeros((2, 20)))


def test_log1p_and_learnable_tier_weights_values():
    layer = SimTier(num_tiers=4, count_transform="log1p", learnable_tier_weights=True)
    layer(TARGET, HISTORY)
    layer.set_weights([np.array([1.0, 2.0, 3.0, 4.0], np.float32)])
    expected = np.log1p(EXPECTED) * [1.0, 2.0, 3.0, 4.0]
    np.testing.assert_allclose(layer(TARGET, HISTORY).numpy(), expected, rtol=1e-6)
    assert layer.tier_weights.dtype == "float32" and layer.tier_weights.trainable


def test_int8_inputs_with_scale():
    q_target, q_history = (TARGET * 10).astype(np.int8), (HISTORY * 10).astype(np.int8)
    np.testing.assert_array_equal(SimTier(num_tiers=4, scale=0.1)(q_target, q_history).numpy(), EXPECTED)
    # Dot-product variant: the scale matters. int8 100 * 0.01 = 1.0 and 50 * 0.01 = 0.5 -> s = 0.5 -> tier 2.
    t = np.array([[100, 0]], np.int8)
    h = np.array([[[50, 0]]], np.int8)
    np.testing.assert_array_equal(SimTier(num_tiers=4, normalize=False, scale=0.01)(t, h).numpy(), [[0, 0, 1, 0]])
    np.testing.assert_array_equal(SimTier(num_tiers=4, normalize=False)(t, h).numpy(), [[0, 0, 0, 1]])


def test_bfloat16_policy_gives_the_same_counts():
    target, history, mask = random_inputs(seed=3)
    many = np.repeat(TARGET[:, None, :], 257, axis=1)  # count 257 is not representable in bfloat16
    expected = SimTier(num_tiers=20)(target, history, mask=mask).numpy()
    with dtype_policy("mixed_bfloat16"):
        layer = SimTier(num_tiers=20)
        out = layer(target, history, mask=mask)
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
        np.testing.assert_array_equal(out.numpy(), expected)
        np.testing.assert_array_equal(SimTier(num_tiers=4)(TARGET, HISTORY).numpy(), EXPECTED)
        assert SimTier(num_tiers=4)(TARGET, many).numpy()[0, 3] == 257
        # bf16 input tensors are upcast, not the reverse.
        out16 = SimTier(num_tiers=4)(keras.ops.cast(TARGET, "bfloat16"), keras.ops.cast(HISTORY, "bfloat16"))
        np.testing.assert_array_equal(out16.numpy(), EXPECTED)
    assert keras.config.dtype_policy().name == "float32"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_tiers": 0}, "num_tiers=0"),
        ({"num_tiers": 2.5}, "num_tiers=2.5"),
        ({"count_transform": "sqrt"}, "count_transform='sqrt'"),
        ({"scale": 0.0}, "scale=0.0"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimTier(**kwargs)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="target_shape"):
        SimTier()(np.ones((2, 3), np.float32), np.ones((2, 4, 5), np.float32))


def test_tier_boundaries_formula():
    # Tier k of N = 20 holds (k / 10 - 1, (k + 1) / 10 - 1]; check representative interior points.
    n = 20
    angles = np.linspace(0.01, math.pi - 0.01, 50)
    history = np.stack([np.cos(angles), np.sin(angles)], axis=-1)[None].astype(np.float32)
    out = SimTier(num_tiers=n)(TARGET, history).numpy()[0]
    s = np.cos(angles)
    expected = np.bincount(np.clip(np.ceil((s + 1) / 2 * n) - 1, 0, n - 1).astype(int), minlength=n)
    np.testing.assert_array_equal(out, expected)


# -- calibrated tiers and the fraction transform ----------------------------------------------------


def test_equal_boundaries_given_explicitly_give_the_equal_tiers():
    for n in (4, 7, 20):
        target, history, mask = random_inputs(seed=n)
        inner = [2.0 * k / n - 1.0 for k in range(1, n)]
        np.testing.assert_array_equal(SimTier(num_tiers=n, boundaries=inner)(target, history, mask=mask).numpy(),
                                      SimTier(num_tiers=n)(target, history, mask=mask).numpy())
    # the hand-computed example, including the exact scores -1, 0 and 1
    np.testing.assert_array_equal(SimTier(num_tiers=None, boundaries=[-0.5, 0.0, 0.5])(TARGET, HISTORY).numpy(),
                                  EXPECTED)


def test_calibrated_boundaries_hand_computed():
    # scores of HISTORY: 1, -1, 0, 0.6, -0.6, 0.707, 0.496; boundaries (0.5, 0.65]: (-inf, .5] (.5, .65] (.65, inf)
    out = SimTier(num_tiers=3, boundaries=[0.5, 0.65])(TARGET, HISTORY).numpy()
    np.testing.assert_array_equal(out, [[4.0, 1.0, 2.0]])
    layer = SimTier(boundaries=[0.5, 0.65], num_tiers=None)
    assert layer.num_tiers == 3
    again = SimTier.from_config(layer.get_config())
    assert again.boundaries == [0.5, 0.65] and again.num_tiers == 3


def test_fraction_transform_is_the_histogram_as_a_distribution():
    target, history, mask = random_inputs()
    counts = SimTier(num_tiers=6)(target, history, mask=mask).numpy()
    frac = SimTier(num_tiers=6, count_transform="fraction")(target, history, mask=mask).numpy()
    np.testing.assert_allclose(frac[:-1], counts[:-1] / counts[:-1].sum(axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(frac[:-1].sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(frac[-1], 0.0)  # the all-padded row


@pytest.mark.parametrize("kwargs, match", [
    ({"boundaries": [0.5, 0.2]}, "strictly increasing"),
    ({"boundaries": []}, "strictly increasing"),
    ({"boundaries": [0.1, 0.2], "num_tiers": 20}, "len\\(boundaries\\) \\+ 1 = 3"),
])
def test_invalid_boundaries(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimTier(**kwargs)


def test_quantile_boundaries_split_the_mass_equally_and_merge_ties():
    from mm_ads.layers.sim_tier import quantile_boundaries

    rng = np.random.default_rng(0)
    sims = rng.uniform(0.2, 0.6, size=100_000)  # a narrow band, as a sentence encoder's
    inner = quantile_boundaries(sims, 20)
    assert len(inner) == 19 and 0.2 < inner[0] < inner[-1] < 0.6
    counts = np.bincount(np.searchsorted(inner, sims, side="left"), minlength=20)
    assert counts.min() > 0.97 * len(sims) / 20 and counts.max() < 1.03 * len(sims) / 20
    # equal tiers over [-1, 1] use only 4 of 20 tiers on the same scores
    assert len(np.unique(np.clip(np.ceil((sims + 1) / 2 * 20) - 1, 0, 19))) == 4
    assert quantile_boundaries(np.r_[np.zeros(90), np.ones(10)], 4) == [0.0]  # ties merged
    with pytest.raises(ValueError, match="finite"):
        quantile_boundaries([np.nan], 4)
