"""Exact CTR metrics on host arrays: AUC, GAUC, LogLoss, calibration, slices, streaming accumulator.

Evaluation collects labels and predicted probabilities from the model into NumPy arrays and
computes every metric exactly (no thresholded or histogram approximation), vectorised and
O(n log n): one sort, then per-block sums with `np.add.reduceat` / `np.bincount`. Nothing loops
over rows or over users in Python, so tens of millions of rows take seconds.

AUC is the Mann-Whitney statistic: the fraction of (positive, negative) pairs in which the positive
scores higher, a tied pair counting 1/2. It is computed from the sorted scores block by block
(a block = a run of equal scores): each positive of a block beats every negative of lower blocks
and ties with the negatives of its own block, so `2U = Σ_b pos_b · (2 · neg_below_b + neg_b)`,
an exact integer.

Conventions:
  * labels are 0/1 (bool, integer or float arrays holding only 0 and 1);
  * arrays are 1-D (a `[n, 1]` column is accepted and flattened); empty input, mismatched lengths,
    NaN scores and labels other than 0/1 raise `ValueError`;
  * a metric that is undefined on the data (AUC with a single class, calibration without clicks)
    is `nan`.

Slices (paper Fig. 6b): `frequency_groups` puts each evaluation example's item into one of
`num_groups` groups by the item's frequency in the training data (group 1 = rarest, the last group =
most frequent); items never seen in training form the separate slice 0 ("new"). `item_age_buckets`
buckets examples by item age (impression time − item creation time, seconds).
"""

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

DAY_SECONDS = 86400
DEFAULT_AGE_EDGES = (DAY_SECONDS, 7 * DAY_SECONDS)
FREQUENCY_METHODS = ("item_quantile", "eval_impressions")
GAUC_WEIGHTINGS = ("impressions", "uniform")
NEW_SLICE = 0


# ----------------------------------------------------------------------------------------------
# Input validation.


def _as_1d(name, value, caller):
    array = np.asarray(value)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array.reshape(-1)
    if array.ndim != 1:
        raise ValueError(f"{caller}: {name} must be a 1-D array (or [n, 1]), got shape {array.shape}")
    return array


def _check_lengths(caller, allow_empty=False, **arrays):
    """Raises ValueError naming the arrays when lengths differ or (unless allowed) the input is empty."""
    items = list(arrays.items())
    first_name, first = items[0]
    for name, array in items[1:]:
        if len(array) != len(first):
            raise ValueError(
                f"{caller}: {first_name} (n={len(first)}) and {name} (n={len(array)}) must have the same length"
            )
    if len(first) == 0 and not allow_empty:
        raise ValueError(f"{caller}: empty input ({', '.join(arrays)} have no elements)")


def _labels(value, caller):
    """0/1 labels → bool array."""
    labels = _as_1d("labels", value, caller)
    if labels.dtype == bool:
        return labels
    if labels.dtype.kind not in "iuf":
        raise ValueError(f"{caller}: labels must be numeric or bool, got dtype {labels.dtype}")
    positive = labels == 1
    if not np.all(positive | (labels == 0)):
        bad = labels[~(positive | (labels == 0))][0]
        raise ValueError(f"{caller}: labels must be 0 or 1, got {bad!r}")
    return positive


def _scores(value, caller, name="scores"):
    scores = _as_1d(name, value, caller)
    if scores.dtype.kind not in "iuf":
        raise ValueError(f"{caller}: {name} must be a numeric array, got dtype {scores.dtype}")
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(scores).any():
        raise ValueError(f"{caller}: {name} contain {int(np.isnan(scores).sum())} NaN value(s)")
    return scores


def _probs(value, caller):
    probs = _scores(value, caller, name="probs")
    if len(probs) and (probs.min() < 0 or probs.max() > 1):
        raise ValueError(f"{caller}: probs must lie in [0, 1], got range [{probs.min()}, {probs.max()}]")
    return probs


def _groups(value, caller, name="groups"):
    groups = _as_1d(name, value, caller)
    if groups.dtype.kind == "f" and np.isnan(groups).any():
        raise ValueError(f"{caller}: {name} contain NaN")
    return groups


# ----------------------------------------------------------------------------------------------
# Core: exact (grouped) Mann-Whitney statistics from one sort.


@dataclasses.dataclass(frozen=True)
class _GroupStats:
    """Per-group sufficient statistics of the AUC: group values, positives, negatives and 2U."""

    groups: np.ndarray  # [G] distinct group values, ascending
    positives: np.ndarray  # [G] int64
    negatives: np.ndarray  # [G] int64
    twice_u: np.ndarray  # [G] int64, 2 × Mann-Whitney U (ties counted 1/2)

    def auc(self):
        """Per-group AUC, `nan` where a group has a single class."""
        pairs = self.positives * self.negatives
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(pairs > 0, self.twice_u / (2.0 * pairs), np.nan)


def _group_stats(labels, scores, groups=None):
    """Exact per-group AUC statistics.

    Args:
        labels: bool [n].
        scores: numeric [n], no NaN.
        groups: optional [n] group key (any sortable dtype); `None` = one group.

    Returns:
        A `_GroupStats`; with `groups=None` its arrays have length 1 and `groups` is `[0]`.
    """
    n = len(labels)
    if groups is None:
        order = np.argsort(scores)
        new_group = np.zeros(n, bool)
        new_group[0] = True
        sorted_groups = None
    else:
        by_score = np.argsort(scores)
        order = by_score[np.argsort(groups[by_score], kind="stable")]  # by group, then score (≈2× np.lexsort)
        del by_score
        sorted_groups = groups[order]
        new_group = np.empty(n, bool)
        new_group[0] = True
        np.not_equal(sorted_groups[1:], sorted_groups[:-1], out=new_group[1:])
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    del order
    new_block = new_group.copy()  # a block = a run of equal scores within one group
    new_block[1:] |= sorted_scores[1:] != sorted_scores[:-1]
    del sorted_scores
    block_starts = np.flatnonzero(new_block)  # [B]
    block_pos = np.add.reduceat(sorted_labels, block_starts, dtype=np.int64)  # [B]
    block_size = np.diff(np.append(block_starts, n))  # [B]
    block_neg = block_size - block_pos
    block_is_group_start = new_group[block_starts]  # [B]
    group_first_block = np.flatnonzero(block_is_group_start)  # [G]
    group_of_block = np.cumsum(block_is_group_start) - 1  # [B]
    neg_before = np.cumsum(block_neg) - block_neg  # exclusive cumsum over all blocks
    neg_below = neg_before - neg_before[group_first_block][group_of_block]  # within the block's group
    twice_u_block = block_pos * (2 * neg_below + block_neg)
    positives = np.add.reduceat(block_pos, group_first_block)
    negatives = np.add.reduceat(block_neg, group_first_block)
    twice_u = np.add.reduceat(twice_u_block, group_first_block)
    if sorted_groups is None:
        group_values = np.zeros(1, np.int64)
    else:
        group_values = sorted_groups[new_group]
    return _GroupStats(group_values, positives, negatives, twice_u)


# ----------------------------------------------------------------------------------------------
# Public one-shot metrics.


def auc(labels, scores):
    """Exact ROC AUC (Mann-Whitney U / (P·N)); tied (positive, negative) pairs count 1/2.

    Args:
        labels: [n] 0/1 click labels.
        scores: [n] predicted scores or probabilities (any monotone transform gives the same AUC).

    Returns:
        The AUC as a float; `nan` when all labels belong to one class.

    Raises:
        ValueError: empty input, mismatched lengths, labels other than 0/1, NaN scores.
    """
    labels = _labels(labels, "auc")
    scores = _scores(scores, "auc")
    _check_lengths("auc", labels=labels, scores=scores)
    return float(_group_stats(labels, scores).auc()[0])


@dataclasses.dataclass(frozen=True)
class GAUCResult:
    """Group AUC with its bookkeeping.

    Attributes:
        value: the GAUC; `nan` when no user has both a click and a non-click.
        num_users: users counted (both classes present).
        num_users_skipped: users with a single class (AUC undefined), left out.
        num_impressions: impressions of the counted users.
        weighting: "impressions" or "uniform".
    """

    value: float
    num_users: int
    num_users_skipped: int
    num_impressions: int
    weighting: str


def gauc_details(labels, scores, groups, weighting="impressions"):
    """Group AUC: per-user exact AUC averaged over users that have both classes.

    Args:
        labels: [n] 0/1 click labels.
        scores: [n] predicted scores.
        groups: [n] user (or session) keys, any sortable dtype (int64 ids usually).
        weighting: "impressions" weights each user's AUC by the user's number of impressions (the
            convention of the paper's team); "uniform" is the unweighted mean over users.

    Returns:
        A `GAUCResult`.

    Raises:
        ValueError: as `auc`, plus an unknown `weighting`.
    """
    if weighting not in GAUC_WEIGHTINGS:
        raise ValueError(f"gauc: weighting must be one of {GAUC_WEIGHTINGS}, got {weighting!r}")
    labels = _labels(labels, "gauc")
    scores = _scores(scores, "gauc")
    groups = _groups(groups, "gauc")
    _check_lengths("gauc", labels=labels, scores=scores, groups=groups)
    stats = _group_stats(labels, scores, groups)
    per_user = stats.auc()
    valid = ~np.isnan(per_user)
    impressions = stats.positives + stats.negatives
    num_users = int(valid.sum())
    if num_users == 0:
        value = math.nan
    elif weighting == "impressions":
        value = float(np.sum(per_user[valid] * impressions[valid]) / np.sum(impressions[valid]))
    else:
        value = float(np.mean(per_user[valid]))
    return GAUCResult(
        value=value,
        num_users=num_users,
        num_users_skipped=int(len(per_user) - num_users),
        num_impressions=int(impressions[valid].sum()),
        weighting=weighting,
    )


def gauc(labels, scores, groups, weighting="impressions"):
    """Group AUC as a float; see `gauc_details` for the arguments and the user counts.

    Returns:
        The GAUC; `nan` when no user has both a click and a non-click.
    """
    return gauc_details(labels, scores, groups, weighting=weighting).value


def _example_losses(labels, probs, eps):
    """Per-example binary cross-entropy (float64) with probabilities clipped to [eps, 1 - eps]."""
    p = np.clip(probs.astype(np.float64), eps, 1.0 - eps)
    return -np.log(np.where(labels, p, 1.0 - p))


def logloss(labels, probs, eps=1e-7):
    """Mean binary cross-entropy.

    Args:
        labels: [n] 0/1 click labels.
        probs: [n] predicted click probabilities in [0, 1].
        eps: probabilities are clipped to [eps, 1 - eps] (in float64) before the log.

    Returns:
        The mean log loss as a float.

    Raises:
        ValueError: empty input, mismatched lengths, labels other than 0/1, NaN or out-of-range probs.
    """
    labels = _labels(labels, "logloss")
    probs = _probs(probs, "logloss")
    _check_lengths("logloss", labels=labels, probs=probs)
    return float(np.mean(_example_losses(labels, probs, eps)))


def calibration(labels, probs):
    """Calibration ratio: mean predicted probability / observed CTR (1.0 = calibrated).

    Args:
        labels: [n] 0/1 click labels.
        probs: [n] predicted click probabilities.

    Returns:
        The ratio as a float; `nan` when there is no click.
    """
    labels = _labels(labels, "calibration")
    probs = _probs(probs, "calibration")
    _check_lengths("calibration", labels=labels, probs=probs)
    clicks = int(labels.sum())
    return float(np.sum(probs, dtype=np.float64) / clicks) if clicks else math.nan


# ----------------------------------------------------------------------------------------------
# Slices.


def item_counts(train_item_ids):
    """Counts item occurrences (e.g. impressions) in a training log.

    Args:
        train_item_ids: [m] integer item ids of the training examples.

    Returns:
        `(item_ids, counts)`: int64 arrays, ids ascending, usable as `train_counts_by_item`.
    """
    ids = _as_1d("train_item_ids", train_item_ids, "item_counts")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"item_counts: train_item_ids must be integers, got dtype {ids.dtype}")
    unique, counts = np.unique(ids.astype(np.int64), return_counts=True)
    return unique, counts.astype(np.int64)


def _train_counts(train_counts_by_item, caller):
    """Normalises training counts to (ids ascending, counts > 0) int64 arrays.

    Accepted forms: a `(item_ids, counts)` tuple of arrays; a `Mapping` item id → count; a 1-D
    integer `np.ndarray` indexed by item id (dense ids, e.g. `np.bincount(train_item_ids)`).
    """
    if isinstance(train_counts_by_item, tuple):
        if len(train_counts_by_item) != 2:
            raise ValueError(f"{caller}: train_counts_by_item tuple must be (item_ids, counts)")
        ids = _as_1d("train_counts_by_item[0] (item ids)", train_counts_by_item[0], caller)
        counts = _as_1d("train_counts_by_item[1] (counts)", train_counts_by_item[1], caller)
        if len(ids) != len(counts):
            raise ValueError(
                f"{caller}: train_counts_by_item item ids (n={len(ids)}) and counts (n={len(counts)}) "
                "must have the same length"
            )
    elif isinstance(train_counts_by_item, Mapping):
        ids = np.fromiter(train_counts_by_item.keys(), np.int64, len(train_counts_by_item))
        counts = np.fromiter(train_counts_by_item.values(), np.int64, len(train_counts_by_item))
    elif isinstance(train_counts_by_item, np.ndarray):
        counts = _as_1d("train_counts_by_item", train_counts_by_item, caller)
        ids = np.arange(len(counts), dtype=np.int64)
    else:
        raise ValueError(
            f"{caller}: train_counts_by_item must be an (item_ids, counts) tuple, a mapping or a dense "
            f"np.ndarray indexed by item id, got {type(train_counts_by_item).__name__}"
        )
    for name, array in (("item ids", ids), ("counts", counts)):
        if len(array) and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{caller}: train_counts_by_item {name} must be integers, got dtype {array.dtype}")
    ids = ids.astype(np.int64)
    counts = counts.astype(np.int64)
    if len(counts) and counts.min() < 0:
        raise ValueError(f"{caller}: train counts must be >= 0, got {int(counts.min())}")
    seen = counts > 0
    ids, counts = ids[seen], counts[seen]
    order = np.argsort(ids, kind="stable")
    ids, counts = ids[order], counts[order]
    if len(ids) > 1 and np.any(ids[1:] == ids[:-1]):
        raise ValueError(f"{caller}: duplicate item id {int(ids[1:][ids[1:] == ids[:-1]][0])} in train counts")
    return ids, counts


def _lookup(train_ids, item_ids):
    """Index of each item id in sorted `train_ids`, and whether it is there."""
    position = np.searchsorted(train_ids, item_ids)
    found = position < len(train_ids)
    found[found] = train_ids[position[found]] == item_ids[found]
    return position, found


def _assign_training_items(counts, num_groups, weights=None):
    """Group (1..num_groups) of each training item, by rank of training count.

    Items are ordered by (training count, item id) ascending. Without `weights` the order is cut
    into `num_groups` runs of (as nearly as possible) equal numbers of items; with `weights`
    (evaluation impressions per item) an item goes to the group holding the midpoint of its run
    of cumulative weight, so groups hold ≈ equal evaluation impressions.
    """
    m = len(counts)
    order = np.argsort(counts, kind="stable")  # ids ascending already → ties by id
    if weights is None:
        rank_group = np.arange(m, dtype=np.int64) * num_groups // max(m, 1)
    else:
        w = weights[order].astype(np.float64)
        total = w.sum()
        if total == 0:
            rank_group = np.arange(m, dtype=np.int64) * num_groups // max(m, 1)
        else:
            midpoint = np.cumsum(w) - 0.5 * w
            rank_group = np.minimum((midpoint * num_groups / total).astype(np.int64), num_groups - 1)
    groups = np.empty(m, np.int8)
    groups[order] = rank_group + 1
    return groups


def _frequency_table(train, num_groups, method, item_ids):
    """Group of every training item and the training-count range of every group.

    Args:
        train: `(ids ascending, counts > 0)` from `_train_counts`.
        num_groups: number of groups G.
        method: "item_quantile" or "eval_impressions".
        item_ids: int64 [n] evaluation item ids (used by "eval_impressions" only).

    Returns:
        `(item_group int8 [M], ranges int64 [G, 2])`.
    """
    train_ids, counts = train
    weights = None
    if method == "eval_impressions":
        position, found = _lookup(train_ids, item_ids)
        weights = np.bincount(position[found], minlength=len(train_ids))
    item_group = _assign_training_items(counts, num_groups, weights)
    index = item_group.astype(np.int64) - 1
    lo = np.full(num_groups, np.iinfo(np.int64).max)
    hi = np.full(num_groups, -1, np.int64)
    np.minimum.at(lo, index, counts)
    np.maximum.at(hi, index, counts)
    ranges = np.zeros((num_groups, 2), np.int64)
    nonempty = hi >= 0
    ranges[nonempty, 0] = lo[nonempty]
    ranges[nonempty, 1] = hi[nonempty]
    return item_group, ranges


def _apply_frequency_table(train_ids, item_group, item_ids):
    """int8 group per evaluation example; 0 for items absent from training."""
    position, found = _lookup(train_ids, item_ids)
    out = np.zeros(len(item_ids), np.int8)
    out[found] = item_group[position[found]]
    return out


def _check_frequency_args(num_groups, method, caller):
    if not 1 <= num_groups <= 127:
        raise ValueError(f"{caller}: num_groups must be in [1, 127], got {num_groups}")
    if method not in FREQUENCY_METHODS:
        raise ValueError(f"{caller}: method must be one of {FREQUENCY_METHODS}, got {method!r}")


def _item_ids(value, caller):
    item_ids = _as_1d("item_ids", value, caller)
    if len(item_ids) and not np.issubdtype(item_ids.dtype, np.integer):
        raise ValueError(f"{caller}: item_ids must be integers, got dtype {item_ids.dtype}")
    return item_ids.astype(np.int64)


def frequency_groups(item_ids, train_counts_by_item, num_groups=8, method="item_quantile", return_ranges=False):
    """Assigns each evaluation example to a training-frequency group of its item (paper Fig. 6b).

    Items seen in training (count > 0) are ordered by training count ascending, ties by item id, and
    cut into `num_groups` groups: group 1 = lowest frequency, group `num_groups` = highest. A higher
    group never holds an item with a lower training count (items with equal counts may straddle a
    cut, which keeps every group non-empty on long-tailed data where most items share count 1).
    Items never seen in training get group 0 ("new"), outside 1..num_groups.

    Args:
        item_ids: [n] integer item id of each evaluation example.
        train_counts_by_item: training frequencies: an `(item_ids, counts)` tuple (see `item_counts`),
            a mapping item id → count, or a 1-D integer `np.ndarray` indexed by item id.
        num_groups: number of frequency groups (the paper uses 8), at most 127.
        method: how the cuts are placed.
            "item_quantile" (default; the paper's "divide all items into eight groups"): equal numbers
            (±1) of distinct training items per group; item k of M (0-based, in the order above)
            goes to group `k * num_groups // M + 1`.
            "eval_impressions": ≈ equal numbers of *evaluation* impressions per group: an item goes
            to the group holding the midpoint of its share of the cumulative evaluation impressions
            (an item is never split, so one very frequent item may fill a group and leave a
            neighbour empty).
        return_ranges: also return the training-count range of each group.

    Returns:
        int8 [n] group per example (0 = new item). With `return_ranges`, also an int64
        `[num_groups, 2]` array of (min, max) training count of the training items in each group
        (0, 0 for an empty group).

    Raises:
        ValueError: bad `num_groups`/`method`, non-integer ids, malformed or negative counts.
    """
    caller = "frequency_groups"
    _check_frequency_args(num_groups, method, caller)
    item_ids = _item_ids(item_ids, caller)
    train = _train_counts(train_counts_by_item, caller)
    item_group, ranges = _frequency_table(train, num_groups, method, item_ids)
    out = _apply_frequency_table(train[0], item_group, item_ids)
    return (out, ranges) if return_ranges else out


def frequency_slice_names(num_groups=8):
    """Slice names for `frequency_groups` output: {0: "new", 1: "freq_1", ..., G: "freq_G"}."""
    names = {g: f"freq_{g}" for g in range(1, num_groups + 1)}
    names[NEW_SLICE] = "new"
    return names


def _format_seconds(seconds):
    for unit, size in (("d", DAY_SECONDS), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _check_age_edges(edges, caller):
    edges = np.asarray(edges)
    if edges.ndim != 1 or len(edges) == 0 or not np.issubdtype(edges.dtype, np.integer):
        raise ValueError(f"{caller}: edges must be a non-empty 1-D sequence of integer seconds, got {edges!r}")
    if edges[0] <= 0 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"{caller}: edges must be positive and strictly increasing, got {edges.tolist()}")
    return edges.astype(np.int64)


def age_bucket_names(edges=DEFAULT_AGE_EDGES):
    """Slice names of `item_age_buckets`, e.g. {0: "age_<1d", 1: "age_1d-7d", 2: "age_>=7d"}.

    Args:
        edges: increasing bucket edges in seconds.

    Returns:
        dict bucket index → name.
    """
    edges = [int(e) for e in _check_age_edges(edges, "age_bucket_names")]
    labels = [_format_seconds(e) for e in edges]
    names = {0: f"age_<{labels[0]}"}
    for k in range(1, len(edges)):
        names[k] = f"age_{labels[k - 1]}-{labels[k]}"
    names[len(edges)] = f"age_>={labels[-1]}"
    return names


def item_age_buckets(ages, edges=DEFAULT_AGE_EDGES):
    """Buckets examples by item age = impression time − item creation time.

    Bucket k holds ages in `[edges[k-1], edges[k])` (bucket 0: `age < edges[0]`, last bucket:
    `age >= edges[-1]`); with the default edges: <1 day, 1–7 days, ≥7 days.

    Args:
        ages: [n] item age of each example in seconds (e.g. `timestamp - item_created_at`).
        edges: increasing positive bucket edges in seconds.

    Returns:
        int8 [n] bucket index in 0..len(edges); names from `age_bucket_names(edges)`.

    Raises:
        ValueError: NaN or negative ages (an impression before its item exists means a broken join
            or clock; fix the data rather than bucket it silently), bad edges.
    """
    edges = _check_age_edges(edges, "item_age_buckets")
    ages = _scores(ages, "item_age_buckets", name="ages")
    if len(ages) and ages.min() < 0:
        raise ValueError(
            f"item_age_buckets: {int((ages < 0).sum())} negative age(s) (min {ages.min()}); "
            "impressions must not precede item creation"
        )
    return np.searchsorted(edges, ages, side="right").astype(np.int8)


def sliced_metrics(labels, probs, slice_ids, names=None, eps=1e-7, groups=None, gauc_weighting="impressions"):
    """AUC, LogLoss, CTR and calibration per slice, from one sort; GAUC per slice when `groups` are given.

    Args:
        labels: [n] 0/1 click labels.
        probs: [n] predicted click probabilities.
        slice_ids: [n] integer slice of each example (e.g. from `frequency_groups`).
        names: optional mapping slice id → name. Every named slice is reported (an empty one with
            `num_examples` 0 and `nan` metrics) so reports have stable keys; unnamed ids present in
            the data are reported under `str(id)`.
        eps: LogLoss clipping, as in `logloss`.
        groups: optional [n] user keys: each slice then also has "gauc" and "gauc_num_users", the group AUC
            of the slice's examples (`gauc_details`: a user counts in a slice where the user has both a click
            and a non-click among that slice's examples).
        gauc_weighting: "impressions" or "uniform" (see `gauc_details`).

    Returns:
        dict name → {"auc", "logloss", "num_examples", "ctr", "mean_prediction", "calibration"} (+ "gauc",
        "gauc_num_users" with `groups`).
    """
    caller = "sliced_metrics"
    labels = _labels(labels, caller)
    probs = _probs(probs, caller)
    slice_ids = _as_1d("slice_ids", slice_ids, caller)
    _check_lengths(caller, labels=labels, probs=probs, slice_ids=slice_ids)
    if groups is not None:
        groups = _groups(groups, caller)
        _check_lengths(caller, labels=labels, groups=groups)
    if not np.issubdtype(slice_ids.dtype, np.integer):
        raise ValueError(f"{caller}: slice_ids must be integers, got dtype {slice_ids.dtype}")
    values, index = np.unique(slice_ids, return_inverse=True)
    stats = _group_stats(labels, probs, index)  # groups = 0..len(values)-1, all present
    count = np.bincount(index, minlength=len(values))
    clicks = np.bincount(index, weights=labels, minlength=len(values))
    loss = np.bincount(index, weights=_example_losses(labels, probs, eps), minlength=len(values))
    pred = np.bincount(index, weights=probs.astype(np.float64), minlength=len(values))
    per_slice_auc = stats.auc()
    names = dict(names or {})
    result = {name: _slice_entry(math.nan, math.nan, 0, 0.0, 0.0) for name in names.values()}
    if groups is not None:
        for entry in result.values():
            entry.update(gauc=math.nan, gauc_num_users=0)
    for k, value in enumerate(values.tolist()):
        name = names.get(value, str(value))
        result[name] = _slice_entry(per_slice_auc[k], loss[k] / count[k], count[k], clicks[k], pred[k])
        if groups is not None:
            inside = index == k
            details = gauc_details(labels[inside], probs[inside], groups[inside], gauc_weighting)
            result[name].update(gauc=details.value, gauc_num_users=details.num_users)
    return result


def _slice_entry(auc_value, logloss_value, count, clicks, pred_sum):
    count = int(count)
    return {
        "auc": float(auc_value),
        "logloss": float(logloss_value),
        "num_examples": count,
        "ctr": float(clicks / count) if count else math.nan,
        "mean_prediction": float(pred_sum / count) if count else math.nan,
        "calibration": float(pred_sum / clicks) if clicks else math.nan,
    }


# ----------------------------------------------------------------------------------------------
# Streaming accumulator.


class CTRMetrics:
    """Streaming accumulator of exact CTR metrics over a large evaluation set.

    `update` appends each batch/chunk as compact host arrays (int8 labels, float32 probs, int64
    groups, int8 slice ids); `result` concatenates them once and computes every metric exactly.
    Memory ≈ 13 bytes per example with groups (1 + 4 + 8), plus 1 byte per slicing (frequency, age);
    "eval_impressions" frequency groups keep int64 item ids instead (8 bytes) because their cuts
    depend on the whole evaluation set. `result` temporarily needs a few times that. 100M
    examples ≈ 1.3 GB: acceptable for keeping AUC exact (no histogram approximation).

    Args:
        train_counts_by_item: optional training frequencies (see `frequency_groups`); with it,
            `update(item_ids=...)` adds the slices "freq_1".."freq_G" and "new".
        num_frequency_groups: number of frequency groups G.
        frequency_method: "item_quantile" or "eval_impressions" (see `frequency_groups`).
        age_edges: item-age bucket edges in seconds; `update(item_ages=...)` adds the age slices
            named by `age_bucket_names(age_edges)`.
        gauc_weighting: "impressions" or "uniform" (see `gauc_details`).
        eps: LogLoss clipping.

    Example:
        ```python
        metrics = CTRMetrics(train_counts_by_item=item_counts(train_item_ids))
        for batch in eval_batches:
            metrics.update(batch["label"], model(batch), groups=batch["user_id"],
                           item_ids=batch["item_id"], item_ages=batch["timestamp"] - batch["item_created_at"])
        report = metrics.result()  # {"auc", "gauc", ..., "slices": {"freq_1": {...}, "new": {...}, "age_<1d": {...}}}
        ```
    """

    def __init__(
        self,
        train_counts_by_item=None,
        num_frequency_groups=8,
        frequency_method="item_quantile",
        age_edges=DEFAULT_AGE_EDGES,
        gauc_weighting="impressions",
        eps=1e-7,
    ):
        if gauc_weighting not in GAUC_WEIGHTINGS:
            raise ValueError(f"CTRMetrics: gauc_weighting must be one of {GAUC_WEIGHTINGS}, got {gauc_weighting!r}")
        _check_frequency_args(num_frequency_groups, frequency_method, "CTRMetrics")
        self.train_counts_by_item = train_counts_by_item
        self.num_frequency_groups = num_frequency_groups
        self.frequency_method = frequency_method
        self.age_edges = tuple(int(e) for e in _check_age_edges(age_edges, "CTRMetrics"))
        self.gauc_weighting = gauc_weighting
        self.eps = eps
        self._train = None
        self._frequency_table = None
        if train_counts_by_item is not None:
            self._train = _train_counts(train_counts_by_item, "CTRMetrics")
            if frequency_method == "item_quantile":  # cuts depend on training counts only: fix them once
                self._frequency_table = _frequency_table(self._train, num_frequency_groups, frequency_method, None)
        self.reset()

    def reset(self):
        """Drops all accumulated examples."""
        self._chunks = {"labels": [], "probs": [], "groups": [], "freq": [], "item_ids": [], "age": []}
        self._present = None  # which optional inputs the first update gave
        self._num_examples = 0

    @property
    def num_examples(self):
        """Number of examples accumulated so far."""
        return self._num_examples

    def update(self, labels, probs, groups=None, item_ids=None, item_ages=None):
        """Appends one chunk of examples.

        Args:
            labels: [b] 0/1 click labels.
            probs: [b] predicted click probabilities (stored as float32).
            groups: optional [b] integer user ids for GAUC.
            item_ids: optional [b] integer item ids for frequency slices (needs `train_counts_by_item`).
            item_ages: optional [b] item ages in seconds for age slices.

        An empty chunk is accepted (and still fixes which optional inputs every update must give).

        Raises:
            ValueError: invalid arrays, or optional inputs given in some updates but not in others.
        """
        caller = "CTRMetrics.update"
        labels = _labels(labels, caller)
        probs = _probs(probs, caller)
        arrays = {"labels": labels, "probs": probs}
        if groups is not None:
            arrays["groups"] = _groups(groups, caller)
        if item_ids is not None:
            arrays["item_ids"] = _item_ids(item_ids, caller)
        if item_ages is not None:
            arrays["item_ages"] = _as_1d("item_ages", item_ages, caller)
        _check_lengths(caller, allow_empty=True, **arrays)
        if item_ids is not None and self._train is None:
            raise ValueError(f"{caller}: item_ids given but CTRMetrics was built without train_counts_by_item")
        if groups is not None and not np.issubdtype(arrays["groups"].dtype, np.integer):
            raise ValueError(f"{caller}: groups must be integer user ids, got dtype {arrays['groups'].dtype}")
        age_buckets = None if item_ages is None else item_age_buckets(arrays["item_ages"], self.age_edges)
        present = (groups is not None, item_ids is not None, item_ages is not None)
        if self._present is None:
            self._present = present
        elif present != self._present:
            given = ", ".join(n for n, p in zip(("groups", "item_ids", "item_ages"), self._present) if p) or "none"
            raise ValueError(f"{caller}: every update must give the same optional inputs as the first ({given})")
        chunks = self._chunks
        chunks["labels"].append(labels.astype(np.int8))
        chunks["probs"].append(probs.astype(np.float32))
        if groups is not None:
            chunks["groups"].append(arrays["groups"].astype(np.int64))
        if item_ids is not None:
            if self._frequency_table is not None:
                chunks["freq"].append(
                    _apply_frequency_table(self._train[0], self._frequency_table[0], arrays["item_ids"])
                )
            else:
                chunks["item_ids"].append(arrays["item_ids"])
        if item_ages is not None:
            chunks["age"].append(age_buckets)
        self._num_examples += len(labels)

    def result(self):
        """Computes the exact metrics over everything accumulated.

        Returns:
            dict with "auc", "gauc" (`nan` without groups), "gauc_num_users", "logloss",
            "calibration", "num_examples", "ctr", "mean_prediction"; plus "slices" when item ids
            or ages were given: {"freq_1": {...}, ..., "freq_G": {...}, "new": {...}, "age_<1d": {...}}
            with per-slice "auc", "logloss", "num_examples", "ctr", "mean_prediction", "calibration" (and
            "gauc", "gauc_num_users" when groups were given; frequency slices also "train_count_min" /
            "train_count_max" of their training items).

        Raises:
            ValueError: nothing accumulated.
        """
        if self._num_examples == 0:
            raise ValueError("CTRMetrics.result: no examples accumulated (call update first)")
        chunks = self._chunks
        labels = np.concatenate(chunks["labels"]).astype(bool)
        probs = np.concatenate(chunks["probs"])
        overall = _group_stats(labels, probs).auc()[0]
        clicks = int(labels.sum())
        pred_sum = float(np.sum(probs, dtype=np.float64))
        n = len(labels)
        out = {
            "auc": float(overall),
            "gauc": math.nan,
            "gauc_num_users": 0,
            "logloss": float(np.mean(_example_losses(labels, probs, self.eps))),
            "calibration": pred_sum / clicks if clicks else math.nan,
            "num_examples": n,
            "ctr": clicks / n,
            "mean_prediction": pred_sum / n,
        }
        groups = np.concatenate(chunks["groups"]) if chunks["groups"] else None
        if groups is not None:
            details = gauc_details(labels, probs, groups, self.gauc_weighting)
            out["gauc"], out["gauc_num_users"] = details.value, details.num_users
        slices = {}
        if chunks["freq"] or chunks["item_ids"]:
            if chunks["freq"]:
                freq = np.concatenate(chunks["freq"])
                ranges = self._frequency_table[1]
            else:
                item_ids = np.concatenate(chunks["item_ids"])
                item_group, ranges = _frequency_table(
                    self._train, self.num_frequency_groups, self.frequency_method, item_ids
                )
                freq = _apply_frequency_table(self._train[0], item_group, item_ids)
            names = frequency_slice_names(self.num_frequency_groups)
            freq_slices = sliced_metrics(labels, probs, freq, names=names, eps=self.eps, groups=groups,
                                         gauc_weighting=self.gauc_weighting)
            for g in range(1, self.num_frequency_groups + 1):
                freq_slices[names[g]]["train_count_min"] = int(ranges[g - 1, 0])
                freq_slices[names[g]]["train_count_max"] = int(ranges[g - 1, 1])
            slices.update((names[k], freq_slices[names[k]]) for k in [*range(1, self.num_frequency_groups + 1), 0])
        if chunks["age"]:
            names = age_bucket_names(self.age_edges)
            slices.update(sliced_metrics(labels, probs, np.concatenate(chunks["age"]), names=names, eps=self.eps,
                                         groups=groups, gauc_weighting=self.gauc_weighting))
        if slices:
            out["slices"] = slices
        return out
