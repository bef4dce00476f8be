"""SimTier's quantile tiers in a run: computed from the training split, stored in config.json, exported."""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf

from mm_ads.config import ExperimentConfig
from mm_ads.ctr import tiers
from mm_ads.ctr.task import CTRTask
from mm_ads.export.saved_model import USER_SIGNATURE, export_checkpoint
from mm_ads.train import run
from tests.ctr.helpers import restored_predictions
from tests.ctr.test_train import _config
from tests.export.test_warmup import check_records_run


def test_training_similarities_are_the_cosines_of_valid_history_items(tiny_world):
    from mm_ads.data.dataset import read_ctr_columns
    from mm_ads.data.vectors import VectorTable

    sims = tiers.training_similarities(tiny_world, "", sample=50, seed=3)
    cols = read_ctr_columns(tiny_world, "train", ["item_id", "hist_item_id"])
    rows = np.sort(np.random.default_rng(3).choice(len(cols["item_id"]), 50, replace=False))
    table = VectorTable.load(f"{tiny_world}/vectors/attributes.parquet")
    expected = []
    for r in rows:
        t, _ = table.lookup(cols["item_id"][r])
        for h in cols["hist_item_id"][r]:
            if h != 0:
                v, missing = table.lookup(h)
                if not missing:
                    expected.append(float(t @ v / np.linalg.norm(t) / np.linalg.norm(v)))
    np.testing.assert_allclose(sims, expected, rtol=1e-5, atol=1e-6)
    assert len(sims) > 50


def test_quantile_tiers_are_stored_in_the_config_and_exported(tiny_world, tmp_path):
    cfg = _config(tiny_world, tmp_path / "m", "simtier", max_steps=6)
    cfg.model.tier_calibration = "quantile"
    metrics = run(cfg)
    saved = ExperimentConfig.from_json(json.load(open(tmp_path / "m" / "config.json")))
    inner = saved.model.tier_boundaries
    assert 1 <= len(inner) <= cfg.model.num_tiers - 1 and all(a < b for a, b in zip(inner, inner[1:]))
    sims = tiers.training_similarities(tiny_world, "", seed=0)
    counts = np.bincount(np.searchsorted(inner, sims, side="left"), minlength=len(inner) + 1)
    assert counts.max() < 2.5 * len(sims) / (len(inner) + 1)  # roughly equal mass per tier
    # the model's layer has them; the export equals the Keras model
    task = CTRTask(saved)
    x, expected = restored_predictions(task, saved)
    loaded = tf.saved_model.load(metrics["export_path"])
    np.testing.assert_allclose(loaded.signatures["serving_default"](**x)["ctr"].numpy(), expected, rtol=1e-5,
                               atol=1e-6)
    again = export_checkpoint(str(tmp_path / "m"), export_base=str(tmp_path / "again"), warmup_batch_sizes=(1, 5))
    loaded_again = tf.saved_model.load(again)
    np.testing.assert_allclose(loaded_again.signatures["serving_default"](**x)["ctr"].numpy(), expected, rtol=1e-5,
                               atol=1e-6)
    # both export paths write TF Serving's warm-up file: a record per signature and batch size, each runs
    check_records_run(metrics["export_path"], ["serving_default", USER_SIGNATURE], [1, 200], loaded)
    check_records_run(again, ["serving_default", USER_SIGNATURE], [1, 5], loaded_again)
    # a re-run computes the same boundaries: the run resumes (same config) instead of being refused
    cfg2 = _config(tiny_world, tmp_path / "m", "simtier", max_steps=6)
    cfg2.model.tier_calibration = "quantile"
    assert run(cfg2)["steps"] == 6 and cfg2.model.tier_boundaries == inner


def test_quantile_tiers_without_boundaries_cannot_build():
    from mm_ads.config import CTRModelConfig
    from mm_ads.ctr.model import build_ctr_model
    from mm_ads.data.spec import FeatureSpec

    spec = FeatureSpec.default(seq_len=5, vector_dim=8, num_items=100, num_categories=5, num_brands=7, num_users=10,
                               profile_buckets=(3,))
    with pytest.raises(ValueError, match="tier_boundaries"):
        build_ctr_model(spec, dataclasses.replace(CTRModelConfig(variant="simtier"), tier_calibration="quantile"))
    with pytest.raises(ValueError, match="strictly increasing"):
        CTRModelConfig(variant="simtier", tier_boundaries=(0.5, 0.1)).validate()


def test_a_finished_quantile_run_is_reused_by_the_reports(tiny_world, tmp_path):
    from mm_ads.reports.options import reusable_metrics

    cfg = _config(tiny_world, tmp_path / "m", "simtier", max_steps=4)
    cfg.model.tier_calibration = "quantile"
    metrics = run(cfg)
    again = _config(tiny_world, tmp_path / "m", "simtier", max_steps=4)
    again.model.tier_calibration = "quantile"  # boundaries not computed yet, as a report plans a run
    assert reusable_metrics(str(tmp_path / "m"), again)["steps"] == metrics["steps"] == 4
    again.model.tier_transform = "log1p"
    with pytest.raises(ValueError, match="another model config"):
        reusable_metrics(str(tmp_path / "m"), again)
