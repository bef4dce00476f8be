"""Popularity baselines of Table 3: exact scores and metrics on hand examples, the smoothing choice, the rows."""

import math

import numpy as np
import pytest

from mm_ads.data.dataset import DatasetWriter
from mm_ads.data.spec import FeatureSpec
from mm_ads.reports import paper
from mm_ads.reports import popularity as pop

# train: item 1 clicked 2 of 3 times, item 2 0 of 2, item 3 1 of 1 → prior 3/6
TRAIN_ITEMS, TRAIN_LABELS = [1, 1, 1, 2, 2, 3], [1, 0, 1, 0, 0, 1]
# test rows (user, item, label); item 4 never seen in train
TEST = [(1, 1, 1), (1, 2, 0), (1, 4, 0), (2, 3, 1), (2, 1, 0), (2, 2, 1)]


def test_scores_and_metrics_on_a_hand_example():
    stats = pop.ItemStats(TRAIN_ITEMS, TRAIN_LABELS)
    users, items, labels = (np.array(c) for c in zip(*TEST))
    assert stats.prior == 0.5
    count = pop.scores("pop_count", stats, items)
    np.testing.assert_array_equal(count, [2, 0, 0, 1, 2, 0])
    ctr = pop.scores("pop_ctr", stats, items, smoothing=2.0)
    np.testing.assert_allclose(ctr, [3 / 5, 1 / 4, 1 / 2, 2 / 3, 3 / 5, 1 / 4])  # (c + 2·0.5) / (n + 2)
    m = pop.evaluate(labels, count, users, probability=False)
    # positives score 2, 1, 0 against negatives 0, 0, 2: (2.5 + 2 + 1) / 9 (ties count 1/2)
    assert m["auc"] == pytest.approx(5.5 / 9) and m["logloss"] is None
    assert m["gauc"] == pytest.approx(0.5)  # user 1: 1.0, user 2: 0.0, 3 impressions each
    m = pop.evaluate(labels, ctr, users, probability=True)
    assert m["auc"] == pytest.approx(6 / 9) and m["gauc"] == pytest.approx(0.75)  # user 2: 2/3 > 3/5, 1/4 < 3/5
    want = -np.mean(np.log([3 / 5, 3 / 4, 1 / 2, 2 / 3, 2 / 5, 1 / 4]))
    assert m["logloss"] == pytest.approx(want)
    with pytest.raises(ValueError, match="unknown baseline 'pop_x'"):
        pop.scores("pop_x", stats, items)
    with pytest.raises(ValueError, match="smoothing must be > 0"):
        stats.smoothed_ctr(items, 0.0)


def test_choose_smoothing_is_the_valid_logloss_argmin():
    stats = pop.ItemStats(TRAIN_ITEMS, TRAIN_LABELS)
    _, items, labels = (np.array(c) for c in zip(*TEST))
    losses = {a: -np.mean(np.where(labels == 1, np.log(p), np.log(1 - p)))
              for a in pop.SMOOTHING_GRID for p in [stats.smoothed_ctr(items, a)]}
    best = min(losses, key=losses.get)
    assert pop.choose_smoothing(stats, labels, items) == best
    assert pop.choose_smoothing(stats, [1, 1, 1], [1, 1, 3], grid=(1.0, 1000.0)) == 1.0  # trust the counts
    assert pop.choose_smoothing(stats, [0, 0, 0], [3, 3, 3], grid=(1.0, 1000.0)) == 1000.0  # the prior


def _dataset(path, splits):
    spec = FeatureSpec.default(2, 0, num_items=5, num_categories=1, num_brands=1, num_users=3)
    with DatasetWriter(str(path), name="t", format="test", spec=spec) as w:
        for split, rows in splits.items():
            n = len(rows)
            users, items, labels = (np.array(c, np.int64) for c in zip(*rows))
            w.write_ctr(split, {"user_id": users, "item_id": items, "category_id": np.ones(n, np.int64),
                                "brand_id": np.ones(n, np.int64), "hist_item_id": np.zeros((n, 2), np.int64),
                                "hist_category_id": np.zeros((n, 2), np.int64),
                                "hist_brand_id": np.zeros((n, 2), np.int64), "timestamp": np.zeros(n, np.int64),
                                "item_created_at": np.zeros(n, np.int64), "label": labels.astype(np.float32)})
    return str(path)


def test_popularity_baselines_on_a_dataset(tmp_path):
    train = [(1, i, y) for i, y in zip(TRAIN_ITEMS, TRAIN_LABELS)]
    valid = [(3, 1, 1), (3, 3, 1), (3, 2, 0), (3, 4, 0)]
    with_valid = pop.popularity_baselines(_dataset(tmp_path / "a", {"train": train, "valid": valid, "test": TEST}))
    stats = pop.ItemStats(TRAIN_ITEMS, TRAIN_LABELS)
    a = pop.choose_smoothing(stats, [1, 1, 0, 0], [1, 3, 2, 4])
    assert with_valid["pop_ctr"]["smoothing"] == a and with_valid["pop_ctr"]["smoothing_from"] == "valid"
    users, items, labels = (np.array(c) for c in zip(*TEST))
    assert with_valid["pop_ctr"]["auc"] == pop.evaluate(labels, stats.smoothed_ctr(items, a), users, True)["auc"]
    assert with_valid["pop_count"] == {"auc": pytest.approx(5.5 / 9), "gauc": pytest.approx(0.5), "logloss": None}
    without = pop.popularity_baselines(_dataset(tmp_path / "b", {"train": train, "test": TEST}))
    assert (without["pop_ctr"]["smoothing"], without["pop_ctr"]["smoothing_from"]) == (pop.DEFAULT_SMOOTHING,
                                                                                      "default")
    assert without["prior"] == 0.5 and without["eval_split"] == "test"


def _results(id_gauc):
    table = {"id": {"auc": (0.70, 0.01), "gauc": (id_gauc, 0.01), "logloss": (0.5, 0.0)},
             "simtier": {"auc": (0.75, 0.01), "gauc": (0.66, 0.01), "logloss": (0.45, 0.0),
                         "auc_rel": (0.07, 0.0), "gauc_rel": (0.02, 0.0)}}
    id_runs = {0: {"auc": 0.69, "gauc": id_gauc - 0.01}, 1: {"auc": 0.71, "gauc": id_gauc + 0.01}}
    base = {"pop_count": {"auc": 0.72, "gauc": 0.60, "logloss": None},
            "pop_ctr": {"auc": 0.74, "gauc": 0.62, "logloss": 0.48, "smoothing": 20.0, "smoothing_from": "valid"},
            "prior": 0.2, "eval_split": "test"}
    return {"table3": {"table": table, "baselines": paper.popularity_rows(base, id_runs)}, "table2": {}}


def test_paper_rows_markdown_and_findings():
    results = _results(0.64)
    rows = results["table3"]["baselines"]["rows"]
    assert rows["pop_count"]["auc"] == (0.72, 0.0) and rows["pop_count"]["logloss"] is None
    mean, std = rows["pop_ctr"]["auc_rel"]
    assert mean == pytest.approx(((0.74 - 0.69) / 0.69 + (0.74 - 0.71) / 0.71) / 2)
    assert std == pytest.approx(abs((0.74 - 0.69) / 0.69 - (0.74 - 0.71) / 0.71) / math.sqrt(2))
    md = paper.table3_markdown(results)
    assert "| pop_count | 0.7200 ± 0.0000 | 0.6000 ± 0.0000 | — |" in md
    assert "| pop_ctr | 0.7400 ± 0.0000 | 0.6200 ± 0.0000 | 0.4800 ± 0.0000 |" in md
    assert "a = 20 (chosen on the `valid` split)" in md
    lines = paper.popularity_findings(results)
    assert lines == ["Table 3: id does NOT beat pop_count AUC, pop_ctr AUC",
                     "Table 3: simtier beats both popularity baselines (pop_count, pop_ctr) in AUC and GAUC"]
    assert paper.popularity_findings({"table3": {"table": results["table3"]["table"]}}) == []
    assert "does NOT beat pop_count AUC" in " ".join(paper.findings(results))


def test_paper_runner_popularity_step(tmp_path, repo_root):
    """The paper report's step: the id flagfile's eval split, rows relative to the given id runs."""
    data = _dataset(tmp_path / "d", {"train": [(1, i, y) for i, y in zip(TRAIN_ITEMS, TRAIN_LABELS)], "test": TEST})
    options = paper.PaperConfig(ctr_config_dir=f"{repo_root}/configs/ctr", ctr_overrides=("eval_split=test",))
    runner = paper.PaperRunner(options, str(tmp_path / "report"))
    runner.world = data
    out = runner.run_popularity({"id": {0: {"auc": 0.5, "gauc": 0.5}}})
    assert out["rows"]["pop_count"]["auc"] == (pytest.approx(5.5 / 9), 0.0)
    assert out["rows"]["pop_count"]["auc_rel"] == (pytest.approx((5.5 / 9 - 0.5) / 0.5), 0.0)
    assert (out["smoothing"], out["smoothing_from"], out["eval_split"]) == (pop.DEFAULT_SMOOTHING, "default", "test")
    runner.o.ctr_overrides = ("eval_split=valid",)
    with pytest.raises(KeyError, match="no ctr/valid"):
        runner.run_popularity({})
