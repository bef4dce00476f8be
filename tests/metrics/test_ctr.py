import math

import numpy as np
import pytest

from mm_ads.metrics import (
    CTRMetrics,
    age_bucket_names,
    auc,
    calibration,
    frequency_groups,
    frequency_slice_names,
    gauc,
    gauc_details,
    item_age_buckets,
    item_counts,
    logloss,
    sliced_metrics,
)


def _brute_auc(labels, scores):
    """O(n²) Mann-Whitney: pairs (positive, negative), a tie counts 1/2."""
    labels = np.asarray(labels).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    diff = pos[:, None].astype(np.float64) - neg[None, :]
    return (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / (len(pos) * len(neg))


def _brute_gauc(labels, scores, groups, weighting):
    total, weight, users, skipped, impressions = 0.0, 0.0, 0, 0, 0
    for user in np.unique(groups):
        mask = groups == user
        value = _brute_auc(labels[mask], scores[mask])
        if math.isnan(value):
            skipped += 1
            continue
        w = mask.sum() if weighting == "impressions" else 1
        total += w * value
        weight += w
        users += 1
        impressions += mask.sum()
    return (total / weight if users else math.nan), users, skipped, impressions


def _random_ctr(n, seed, ties=True, ctr=0.3):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < ctr).astype(np.int64)
    scores = rng.normal(size=n) + labels
    if ties:
        scores = np.round(scores * 2)  # few distinct values: many ties, also across classes
    return labels, scores


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [True, False])
def test_auc_matches_pair_counting(seed, ties):
    labels, scores = _random_ctr(400, seed, ties=ties)
    assert len(np.unique(scores)) < 20 if ties else len(np.unique(scores)) == 400
    assert auc(labels, scores) == pytest.approx(_brute_auc(labels, scores), abs=1e-15)


def test_auc_hand_values_and_dtypes():
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert auc([1, 0], [0.2, 0.9]) == 0.0
    # bool / float labels, int scores and an [n, 1] column give the same answer
    assert auc(np.array([False, False, True, True]), np.array([[1], [3], [2], [4]])) == pytest.approx(0.75)
    assert auc(np.array([0.0, 0.0, 1.0, 1.0], np.float32), np.array([1, 3, 2, 4], np.int32)) == pytest.approx(0.75)


def test_auc_single_class_is_nan():
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([0, 0], [0.1, 0.2]))


@pytest.mark.parametrize(
    "fn, args",
    [
        (auc, ()),
        (logloss, ()),
        (calibration, ()),
        (gauc, ("groups",)),
        (sliced_metrics, ("slice_ids",)),
    ],
)
def test_invalid_inputs_raise(fn, args):
    def call(labels, scores, extra=None):
        n = len(labels)
        rest = [np.zeros(n if extra is None else extra, np.int64) for _ in args]
        return fn(np.asarray(labels), np.asarray(scores), *rest)

    second = "scores" if fn in (auc, gauc) else "probs"
    with pytest.raises(ValueError, match="empty"):
        call([], [])
    with pytest.raises(ValueError, match=rf"labels \(n=3\) and {second} \(n=2\)"):
        call([0, 1, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        call([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="0 or 1"):
        call([0, 2], [0.1, 0.2])
    if args:
        with pytest.raises(ValueError, match=rf"labels \(n=2\) and {args[0]} \(n=3\)"):
            call([0, 1], [0.1, 0.2], extra=3)


def test_probabilities_out_of_range_raise():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        logloss([0, 1], [0.5, 1.5])


@pytest.mark.parametrize("weighting", ["impressions", "uniform"])
@pytest.mark.parametrize("seed", range(3))
def test_gauc_matches_loop_over_users(weighting, seed):
    rng = np.random.default_rng(seed)
    n = 1500
    user_ids = rng.choice(np.array([-7, 3, 10**12, 5, 42, 99, 2**40 + 1, 0, 17, 8]), size=n) + rng.integers(0, 8, n)
    labels, scores = _random_ctr(n, seed + 100)
    # force some users to a single class
    single = np.isin(user_ids, user_ids[:5])
    labels[single] = 0
    details = gauc_details(labels, scores, user_ids, weighting=weighting)
    value, users, skipped, impressions = _brute_gauc(labels, scores, user_ids, weighting)
    assert details.value == pytest.approx(value, abs=1e-12)
    assert gauc(labels, scores, user_ids, weighting=weighting) == details.value
    assert (details.num_users, details.num_users_skipped, details.num_impressions) == (users, skipped, impressions)
    assert details.num_users_skipped >= 1 and details.weighting == weighting


def test_gauc_weightings_differ_and_hand_value():
    # user 1: 2 impressions, AUC 1; user 2: 4 impressions, AUC 0; user 3: one class (skipped)
    labels = np.array([1, 0, 1, 1, 0, 0, 1, 1])
    scores = np.array([0.9, 0.1, 0.1, 0.2, 0.8, 0.9, 0.5, 0.6])
    groups = np.array([1, 1, 2, 2, 2, 2, 3, 3])
    assert gauc(labels, scores, groups) == pytest.approx((2 * 1.0 + 4 * 0.0) / 6)
    assert gauc(labels, scores, groups, weighting="uniform") == pytest.approx(0.5)
    details = gauc_details(labels, scores, groups)
    assert (details.num_users, details.num_users_skipped, details.num_impressions) == (2, 1, 6)
    with pytest.raises(ValueError, match="weighting"):
        gauc(labels, scores, groups, weighting="clicks")


def test_gauc_without_any_two_class_user_is_nan():
    details = gauc_details([1, 0, 1], [0.1, 0.2, 0.3], [1, 2, 3])
    assert math.isnan(details.value) and details.num_users == 0 and details.num_users_skipped == 3


def test_logloss_matches_formula_and_clips():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 1000)
    probs = rng.random(1000).astype(np.float32)
    p = probs.astype(np.float64)
    expected = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    assert logloss(labels, probs) == pytest.approx(expected, rel=1e-12)
    assert logloss([1, 0], [0.0, 1.0], eps=1e-7) == pytest.approx(-math.log(1e-7), rel=1e-9)
    assert logloss([1, 0], [1.0, 0.0]) == pytest.approx(-math.log(1 - 1e-7), rel=1e-6)


def test_calibration():
    assert calibration([1, 0, 0, 0], [0.5, 0.5, 0.25, 0.25]) == pytest.approx(1.5 / 1)
    assert math.isnan(calibration([0, 0], [0.1, 0.2]))


def _zipf_world(seed=0, num_items=2000, num_train=30000, num_eval=20000):
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_items + 1) ** 1.1
    weights = weights[rng.permutation(num_items)]
    item_ids = np.arange(num_items, dtype=np.int64) * 7 + 1000  # sparse, non-dense ids
    train_items = rng.choice(item_ids, size=num_train, p=weights / weights.sum())
    eval_items = np.concatenate(
        [
            rng.choice(item_ids, size=num_eval // 2, p=weights / weights.sum()),
            rng.choice(item_ids, size=num_eval - num_eval // 2),  # uniform: rare and unseen items appear too
        ]
    )
    rng.shuffle(eval_items)
    return train_items, eval_items


def test_frequency_groups_on_zipf_data():
    train_items, eval_items = _zipf_world()
    train_ids, train_counts = item_counts(train_items)
    count_of = dict(zip(train_ids.tolist(), train_counts.tolist()))
    assert np.mean(train_counts == 1) > 1 / 8  # many ties at count 1: cuts must split them
    groups, ranges = frequency_groups(eval_items, (train_ids, train_counts), return_ranges=True)
    counts = np.array([count_of.get(i, 0) for i in eval_items.tolist()])
    np.testing.assert_array_equal(groups == 0, counts == 0)  # unseen items exactly in "new"
    for g in range(1, 9):
        assert np.any(groups == g), g
    for g in range(1, 8):  # monotone: a higher group never has a lower training count
        assert counts[groups == g].max() <= counts[groups == g + 1].min()
        assert ranges[g - 1, 1] <= ranges[g, 0]
    # item-quantile: every group holds 1/8 of the distinct training items (±1)
    train_groups = frequency_groups(train_ids, (train_ids, train_counts))
    sizes = np.bincount(train_groups, minlength=9)[1:]
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == len(train_ids)
    for g in range(1, 9):
        members = train_counts[train_groups == g]
        assert (members.min(), members.max()) == tuple(ranges[g - 1])


def test_frequency_groups_input_forms_agree():
    train_items, eval_items = _zipf_world(seed=1, num_items=300, num_train=3000, num_eval=2000)
    ids, counts = item_counts(train_items)
    expected = frequency_groups(eval_items, (ids, counts))
    as_dict = frequency_groups(eval_items, dict(zip(ids.tolist(), counts.tolist())))
    dense = frequency_groups(eval_items, np.bincount(train_items))
    np.testing.assert_array_equal(as_dict, expected)
    np.testing.assert_array_equal(dense, expected)
    with pytest.raises(ValueError, match="num_groups"):
        frequency_groups(eval_items, (ids, counts), num_groups=0)
    with pytest.raises(ValueError, match="method"):
        frequency_groups(eval_items, (ids, counts), method="counts")
    with pytest.raises(ValueError, match=">= 0"):
        frequency_groups(eval_items, (ids, -counts))
    with pytest.raises(ValueError, match="duplicate item id"):
        frequency_groups(eval_items, (np.array([1, 1]), np.array([2, 3])))


def test_frequency_groups_eval_impressions_balances_eval_traffic():
    train_items, eval_items = _zipf_world(seed=2, num_items=3000, num_train=40000, num_eval=40000)
    ids, counts = item_counts(train_items)
    groups = frequency_groups(eval_items, (ids, counts), method="eval_impressions")
    seen = groups > 0
    per_group = np.bincount(groups[seen], minlength=9)[1:]
    _, eval_counts = np.unique(eval_items[seen], return_counts=True)
    # an item is never split: each group is within one item's traffic of an equal share
    assert np.all(np.abs(per_group - seen.sum() / 8) <= eval_counts.max())
    count_of = dict(zip(ids.tolist(), counts.tolist()))
    c = np.array([count_of.get(i, 0) for i in eval_items.tolist()])
    for g in range(1, 8):
        assert c[groups == g].max() <= c[groups == g + 1].min()


def test_item_age_buckets():
    day = 86400
    ages = np.array([0, day - 1, day, 3 * day, 7 * day - 1, 7 * day, 30 * day])
    np.testing.assert_array_equal(item_age_buckets(ages), [0, 0, 1, 1, 1, 2, 2])
    assert age_bucket_names() == {0: "age_<1d", 1: "age_1d-7d", 2: "age_>=7d"}
    assert age_bucket_names((3600, day)) == {0: "age_<1h", 1: "age_1h-1d", 2: "age_>=1d"}
    with pytest.raises(ValueError, match="negative"):
        item_age_buckets(np.array([5, -1]))
    with pytest.raises(ValueError, match="increasing"):
        item_age_buckets(ages, edges=(day, day))


def test_sliced_metrics_match_masked_metrics():
    labels, scores = _random_ctr(3000, 5, ties=True)
    probs = 1 / (1 + np.exp(-scores))
    slice_ids = np.random.default_rng(5).integers(0, 4, 3000)
    slice_ids[labels == 1] = np.where(slice_ids[labels == 1] == 3, 2, slice_ids[labels == 1])  # slice 3: no clicks
    result = sliced_metrics(labels, probs, slice_ids, names={0: "a", 1: "b", 2: "c", 3: "d", 9: "empty"})
    for k, name in enumerate("abcd"):
        mask = slice_ids == k
        entry = result[name]
        assert entry["num_examples"] == mask.sum()
        assert entry["ctr"] == pytest.approx(labels[mask].mean())
        assert entry["logloss"] == pytest.approx(logloss(labels[mask], probs[mask]), rel=1e-12)
        assert entry["mean_prediction"] == pytest.approx(probs[mask].mean())
        if name == "d":
            assert math.isnan(entry["auc"]) and math.isnan(entry["calibration"])
        else:
            assert entry["auc"] == pytest.approx(auc(labels[mask], probs[mask]), abs=1e-15)
    assert result["empty"]["num_examples"] == 0 and math.isnan(result["empty"]["auc"])
    unnamed = sliced_metrics(labels, probs, slice_ids)
    assert set(unnamed) == {"0", "1", "2", "3"}
    assert "gauc" not in unnamed["0"]


@pytest.mark.parametrize("weighting", ["impressions", "uniform"])
def test_sliced_gauc_is_the_group_auc_of_the_slice(weighting):
    labels, scores = _random_ctr(3000, 7, ties=True)
    probs = 1 / (1 + np.exp(-scores))
    rng = np.random.default_rng(7)
    slice_ids, users = rng.integers(0, 3, 3000), rng.integers(0, 40, 3000)
    slice_ids[labels == 1] = np.where(slice_ids[labels == 1] == 2, 1, slice_ids[labels == 1])  # slice 2: no clicks
    result = sliced_metrics(labels, probs, slice_ids, names={0: "a", 1: "b", 2: "c", 5: "empty"}, groups=users,
                            gauc_weighting=weighting)
    for k, name in enumerate("ab"):
        mask = slice_ids == k
        want = gauc_details(labels[mask], probs[mask], users[mask], weighting)
        assert result[name]["gauc"] == pytest.approx(want.value, abs=1e-15)
        assert result[name]["gauc_num_users"] == want.num_users > 0
    # a user's AUC in a slice uses only that slice's examples: not the user's AUC over every slice
    assert result["a"]["gauc"] != pytest.approx(gauc_details(labels, probs, users, weighting).value, abs=1e-6)
    for name in ("c", "empty"):
        assert math.isnan(result[name]["gauc"]) and result[name]["gauc_num_users"] == 0
    with pytest.raises(ValueError, match="same length"):
        sliced_metrics(labels, probs, slice_ids, groups=users[:-1])


def _eval_set(seed=0, n=6000):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.2).astype(np.int64)
    probs = np.clip(rng.random(n) * 0.6 + 0.3 * labels, 0, 1).astype(np.float32)
    probs = np.round(probs * 50) / 50  # ties
    users = rng.integers(0, 300, n) * 11
    ages = rng.integers(0, 20 * 86400, n)
    return labels, probs.astype(np.float32), users, ages


@pytest.mark.parametrize("frequency_method", ["item_quantile", "eval_impressions"])
def test_streaming_equals_one_shot(frequency_method):
    labels, probs, users, ages = _eval_set()
    train_items, eval_items = _zipf_world(seed=3, num_items=500, num_train=8000, num_eval=len(labels))
    train_counts = item_counts(train_items)
    metrics = CTRMetrics(train_counts_by_item=train_counts, frequency_method=frequency_method)
    cuts = [0, 1, 700, 701, 2500, 5999, len(labels)]
    for a, b in zip(cuts[:-1], cuts[1:]):
        metrics.update(labels[a:b], probs[a:b], groups=users[a:b], item_ids=eval_items[a:b], item_ages=ages[a:b])
    assert metrics.num_examples == len(labels)
    result = metrics.result()
    assert result["auc"] == pytest.approx(auc(labels, probs), abs=1e-15)
    details = gauc_details(labels, probs, users)
    assert result["gauc"] == pytest.approx(details.value, abs=1e-15)
    assert result["gauc_num_users"] == details.num_users
    assert result["logloss"] == pytest.approx(logloss(labels, probs), rel=1e-12)
    assert result["calibration"] == pytest.approx(calibration(labels, probs), rel=1e-9)
    assert result["num_examples"] == len(labels)
    assert result["ctr"] == pytest.approx(labels.mean())
    assert result["mean_prediction"] == pytest.approx(probs.astype(np.float64).mean())

    freq, ranges = frequency_groups(eval_items, train_counts, method=frequency_method, return_ranges=True)
    expected = sliced_metrics(labels, probs, freq, names=frequency_slice_names(8), groups=users)
    expected.update(sliced_metrics(labels, probs, item_age_buckets(ages), names=age_bucket_names(), groups=users))
    names = [f"freq_{g}" for g in range(1, 9)] + ["new", "age_<1d", "age_1d-7d", "age_>=7d"]
    assert list(result["slices"]) == names
    for name in names:
        got, want = result["slices"][name], expected[name]
        assert "gauc" in want
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-12, nan_ok=True), (name, key)
    for g in range(1, 9):
        entry = result["slices"][f"freq_{g}"]
        assert (entry["train_count_min"], entry["train_count_max"]) == tuple(ranges[g - 1])
    assert result["slices"]["new"]["num_examples"] == np.sum(~np.isin(eval_items, train_counts[0]))


def test_streaming_without_optional_inputs_and_reset():
    labels, probs, _, _ = _eval_set(seed=1, n=500)
    metrics = CTRMetrics()
    metrics.update(labels[:200], probs[:200])
    metrics.update(labels[:0], probs[:0])  # an empty last batch is a no-op
    metrics.update(labels[200:], probs[200:])
    assert metrics.num_examples == 500
    result = metrics.result()
    assert result["auc"] == pytest.approx(auc(labels, probs), abs=1e-15)
    assert math.isnan(result["gauc"]) and "slices" not in result
    metrics.reset()
    with pytest.raises(ValueError, match="no examples"):
        metrics.result()


def test_streaming_rejects_inconsistent_updates():
    metrics = CTRMetrics()
    metrics.update([0, 1], [0.1, 0.9], groups=[1, 1])
    with pytest.raises(ValueError, match="same optional inputs"):
        metrics.update([0, 1], [0.1, 0.9])
    fresh = CTRMetrics()
    with pytest.raises(ValueError, match="train_counts_by_item"):
        fresh.update([0, 1], [0.1, 0.9], item_ids=[3, 4])
    fresh.update([0, 1], [0.1, 0.9])  # the failed update fixed nothing
    assert fresh.num_examples == 2
    with pytest.raises(ValueError, match=r"labels \(n=2\) and groups \(n=1\)"):
        CTRMetrics().update([0, 1], [0.1, 0.9], groups=[1])


@pytest.mark.large
def test_auc_on_ten_million_rows():
    rng = np.random.default_rng(0)
    n = 10_000_000
    labels = (rng.random(n) < 0.05).astype(np.int8)
    probs = (rng.random(n) * 0.5 + 0.1 * labels).astype(np.float32)
    value = auc(labels, probs)
    assert 0.6 < value < 0.75
    sample = rng.choice(n, 3000, replace=False)
    assert abs(value - _brute_auc(labels[sample], probs[sample])) < 0.05
