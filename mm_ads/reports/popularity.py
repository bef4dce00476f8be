"""Non-learned popularity baselines for Table 3, scored on the same evaluation split as the CTR variants.

  * `pop_count` — an impression's score is its item's number of clicks in the train split (0 for items
    never seen in train). A count is not a probability, so it has no LogLoss (reported as None / "—");
    calibrating it (e.g. isotonic on valid) would just make another CTR estimate, which `pop_ctr` already is.
  * `pop_ctr` — the item's smoothed train CTR, `(clicks + a · prior) / (impressions + a)` with prior = the
    global train CTR: unseen items get the prior, rare items are pulled towards it. `a` is chosen on the
    valid split when the dataset has one (the `SMOOTHING_GRID` value with the lowest valid LogLoss — LogLoss
    is the proper scoring rule for a probability estimate; ties → the smaller `a`), else
    `DEFAULT_SMOOTHING`.

Everything comes from the train split only (the same data the models train on); the metrics are the
package's own (`mm_ads.metrics.ctr`: exact AUC, impression-weighted GAUC by the first user feature as in
`CTRTask.evaluate`, LogLoss). No training, so the whole computation is a few passes over the records.
"""

import numpy as np

from mm_ads.data.dataset import read_ctr_columns
from mm_ads.data.spec import ITEM_ID
from mm_ads.metrics import ctr as ctr_metrics

SMOOTHING_GRID = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
DEFAULT_SMOOTHING = 10.0  # impressions' worth of prior when no valid split exists
BASELINES = ("pop_count", "pop_ctr")


class ItemStats:
    """Per-item impressions and clicks of a training set.

    Args:
        item_ids: [n] item id of each training impression.
        labels: [n] its 0/1 click.
    """

    def __init__(self, item_ids, labels):
        item_ids = np.asarray(item_ids, np.int64).reshape(-1)
        labels = np.asarray(labels, np.float64).reshape(-1)
        if len(item_ids) != len(labels) or len(item_ids) == 0:
            raise ValueError(f"ItemStats needs equally long, non-empty item ids and labels, got {len(item_ids)} "
                             f"and {len(labels)}")
        self.ids, inverse = np.unique(item_ids, return_inverse=True)
        self.impressions = np.bincount(inverse, minlength=len(self.ids)).astype(np.float64)
        self.clicks = np.bincount(inverse, weights=labels, minlength=len(self.ids))
        self.prior = float(labels.mean())

    def _lookup(self, item_ids):
        item_ids = np.asarray(item_ids, np.int64).reshape(-1)
        pos = np.clip(np.searchsorted(self.ids, item_ids), 0, len(self.ids) - 1)
        return pos, self.ids[pos] == item_ids

    def click_counts(self, item_ids):
        """[n] train clicks of each item (0 when unseen)."""
        pos, seen = self._lookup(item_ids)
        return np.where(seen, self.clicks[pos], 0.0)

    def smoothed_ctr(self, item_ids, smoothing):
        """[n] `(clicks + a · prior) / (impressions + a)`; the prior for unseen items."""
        if smoothing <= 0:
            raise ValueError(f"smoothing must be > 0, got {smoothing}")
        pos, seen = self._lookup(item_ids)
        clicks = np.where(seen, self.clicks[pos], 0.0)
        impressions = np.where(seen, self.impressions[pos], 0.0)
        return (clicks + smoothing * self.prior) / (impressions + smoothing)


def scores(name, stats, item_ids, smoothing=DEFAULT_SMOOTHING):
    """Scores of baseline `name` ("pop_count" or "pop_ctr") for `item_ids`."""
    if name == "pop_count":
        return stats.click_counts(item_ids)
    if name == "pop_ctr":
        return stats.smoothed_ctr(item_ids, smoothing)
    raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")


def evaluate(labels, score, groups, probability):
    """`{"auc", "gauc", "logloss"}` of a score; logloss None when the score is not a probability."""
    return {"auc": ctr_metrics.auc(labels, score), "gauc": ctr_metrics.gauc(labels, score, groups),
            "logloss": ctr_metrics.logloss(labels, score) if probability else None}


def choose_smoothing(stats, labels, item_ids, grid=SMOOTHING_GRID):
    """The `grid` value whose smoothed CTR has the lowest LogLoss on (labels, item_ids); ties → the first."""
    losses = [ctr_metrics.logloss(labels, stats.smoothed_ctr(item_ids, a)) for a in grid]
    return float(grid[int(np.argmin(losses))])


def popularity_baselines(data_dir, eval_split="test", train_split="train", valid_split="valid"):
    """Both baselines on `eval_split` of a dataset, from its `train_split`; `a` of pop_ctr on `valid_split`.

    Returns:
        `{"pop_count": {"auc", "gauc", "logloss": None}, "pop_ctr": {"auc", "gauc", "logloss", "smoothing",
        "smoothing_from"}, "prior": global train CTR, "eval_split": ...}`; `smoothing_from` is the valid split's
        name or "default".
    """
    from mm_ads.data.dataset import Manifest

    manifest = Manifest.load(data_dir)
    spec = manifest.spec
    users = spec.by_role("user")
    group = users[0].name if users else None
    names = [spec.label, ITEM_ID] + ([group] if group else [])
    train = read_ctr_columns(data_dir, train_split, names)
    stats = ItemStats(train[ITEM_ID], train[spec.label])
    smoothing, source = DEFAULT_SMOOTHING, "default"
    if manifest.validation_split(valid_split, eval_split):
        valid = read_ctr_columns(data_dir, valid_split, names)
        if len(valid[spec.label]):
            smoothing, source = choose_smoothing(stats, valid[spec.label], valid[ITEM_ID]), valid_split
    ev = read_ctr_columns(data_dir, eval_split, names)
    labels = ev[spec.label]
    groups = ev[group] if group else np.zeros(len(labels), np.int64)
    out = {"prior": stats.prior, "eval_split": eval_split}
    for name in BASELINES:
        out[name] = evaluate(labels, scores(name, stats, ev[ITEM_ID], smoothing), groups,
                             probability=name == "pop_ctr")
    out["pop_ctr"].update(smoothing=smoothing, smoothing_from=source)
    return out
