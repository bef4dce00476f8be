"""Early stopping: the trainer's rule, and MAKE's pre-training stopped on the validation split."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from mm_ads.config import TrainConfig
from mm_ads.ctr import make as make_lib
from mm_ads.train import run
from mm_ads.training.trainer import Trainer
from tests.ctr.test_make import _checkpoint_values, _config


class _History(Trainer):
    """The early-stopping rule of `Trainer` over a given evaluation history (no model)."""

    def __init__(self, values, patience, metric="gauc", steps_per_epoch=10, selection="eval"):
        self.config = TrainConfig(early_stopping_patience=patience, early_stopping_metric=metric)
        self.selection = selection
        self._planned = (steps_per_epoch, steps_per_epoch * 10)
        self.history = [{"step": steps_per_epoch * (i + 1), "epoch": i + 1.0, metric: v} for i, v in enumerate(values)]


@pytest.mark.parametrize("values, patience, best_epoch, stop", [
    ([0.70, 0.72, 0.71], 1, 2, True),
    ([0.70, 0.72, 0.71], 2, 2, False),
    ([0.70, 0.72, 0.71, 0.715], 2, 2, True),
    ([0.70, 0.70], 1, 1, True),  # a tie is no improvement
    ([0.70, 0.71, 0.72], 1, 3, False),
])
def test_rule_keeps_the_best_epoch_and_stops_after_patience_evaluations(values, patience, best_epoch, stop):
    h = _History(values, patience)
    best, _ = h._early_stopping_state()
    assert best["epoch"] == best_epoch and h._should_stop() is stop


def test_rule_logloss_is_lower_better_and_ignores_mid_epoch_evaluations():
    h = _History([0.5, 0.4, 0.45], 1, metric="logloss")
    assert h._early_stopping_state()[0]["epoch"] == 2 and h._should_stop()
    h.history.append({"step": 35, "epoch": 3.5, "logloss": 0.1})  # not an epoch's end: not a candidate
    assert h._early_stopping_state()[0]["epoch"] == 2


def test_rule_reads_only_the_selection_splits_entries():
    h = _History([0.70, 0.72, 0.71], 1, selection="valid")
    assert h._early_stopping_state()[0] is None  # entries without a split are the eval split's
    for entry in h.history:
        entry["split"] = "valid"
    # the eval split's evaluation of epoch 3 is better, but it is not where the epoch is chosen
    h.history.append({"step": 30, "epoch": 3.0, "split": "eval", "gauc": 0.99})
    assert h._early_stopping_state()[0]["epoch"] == 2 and h._should_stop()


def test_config_checks():
    with pytest.raises(ValueError, match="early_stopping_metric"):
        TrainConfig(early_stopping_metric="acc").validate()
    with pytest.raises(ValueError, match="eval_every=0"):
        TrainConfig(early_stopping_patience=1, eval_every=5).validate()


def _with_valid(tiny_world, out, source):
    """A copy of the tiny world in `out` whose `valid` ctr split is its `source` split's files."""
    shutil.copytree(tiny_world, out)
    path = os.path.join(out, "manifest.json")
    manifest = json.load(open(path))
    manifest["components"]["ctr"]["valid"] = dict(manifest["components"]["ctr"][source])
    json.dump(manifest, open(path, "w"))
    return out


@pytest.fixture(scope="module")
def world_with_valid(tiny_world, tmp_path_factory):
    """The tiny world with a `valid` ctr split (a copy of its test files under another name)."""
    return _with_valid(tiny_world, str(tmp_path_factory.mktemp("valid") / "world"), "test")


def test_make_pretraining_stops_on_validation_gauc_and_phase_b_uses_the_best_epoch(world_with_valid, tmp_path):
    # a high learning rate over-fits the tiny world within a few epochs
    cfg = _config(world_with_valid, tmp_path / "m", "make", make_epochs=6, make_learning_rate=0.2, export=False)
    assert make_lib.validation_split(cfg) == "valid"
    a_cfg = make_lib.pretrain_config(cfg)
    assert (a_cfg.data.eval_split, a_cfg.train.early_stopping_patience, a_cfg.train.epochs) == ("valid", 1, 6)
    metrics = run(cfg)
    a = metrics["make_pretrain"]
    es = a["early_stopping"]
    gaucs = [h["gauc"] for h in a["eval_history"]]
    best = int(np.argmax(gaucs)) + 1
    assert es["best_epoch"] == best and es["best_value"] == max(gaucs)
    # it trained until `patience` epochs did not improve (or the maximum)
    assert es["epochs_trained"] == len(gaucs) == min(best + 1, 6)
    assert es["stopped_early"] and es["epochs_trained"] < 6  # (this rate over-fits by epoch 3)
    # phase A's metrics are the best epoch's, on the validation split
    assert a["gauc"] == pytest.approx(max(gaucs), abs=1e-9)
    assert a["num_examples"] == a["eval_history"][0]["num_examples"]
    # phase B's frozen MAKE is the best epoch's checkpoint
    best_ckpt = tf.train.latest_checkpoint(os.path.join(cfg.model_dir, "make", "ckpt_best"))
    assert best_ckpt.endswith(f"-{es['best_step']}")
    phase_a = _checkpoint_values(os.path.join(cfg.model_dir, "make", "ckpt_best"), "make/")
    phase_b = _checkpoint_values(os.path.join(cfg.model_dir, "ckpt"), "make/")
    assert phase_a and set(phase_a) == set(phase_b)
    for k in phase_a:
        np.testing.assert_array_equal(phase_a[k], phase_b[k])
    # phase A is finished: a second run reuses it (and its best checkpoint)
    done, checkpoint = make_lib.finished_pretraining(cfg)
    assert checkpoint == best_ckpt and done["early_stopping"] == es


def test_without_a_validation_split_make_trains_its_fixed_epochs(tiny_world, tmp_path):
    cfg = _config(tiny_world, tmp_path / "m", "make", make_epochs=2, export=False)
    assert make_lib.validation_split(cfg) is None
    a_cfg = make_lib.pretrain_config(cfg)
    assert a_cfg.train.early_stopping_patience == 0 and a_cfg.data.eval_split == "test"
    cfg.model.make_patience = 0
    assert make_lib.validation_split(cfg) is None


@pytest.fixture(scope="module")
def world_train_as_valid(tiny_world, tmp_path_factory):
    """The tiny world with a `valid` ctr split that is its train split (so valid and test metrics differ)."""
    return _with_valid(tiny_world, str(tmp_path_factory.mktemp("train_valid") / "world"), "train")


def test_early_stopping_chooses_the_epoch_on_the_validation_split_and_reports_the_eval_split(world_train_as_valid,
                                                                                             tmp_path):
    cfg = _config(world_train_as_valid, tmp_path / "id", "id", make_epochs=0, epochs=3, early_stopping_patience=1,
                  export=False)
    metrics = run(cfg)
    es, history = metrics["early_stopping"], metrics["eval_history"]
    valid = [h for h in history if h["split"] == "valid"]
    evals = [h for h in history if h["split"] == "eval"]
    assert es["split"] == "valid" and len(valid) == es["epochs_trained"]
    gaucs = [h["gauc"] for h in valid]
    assert es["best_value"] == max(gaucs) and es["best_epoch"] == int(np.argmax(gaucs)) + 1
    # only the chosen epoch is evaluated on the eval (test) split, and that is what the run returns
    assert len(evals) == 1 and evals[0]["step"] == es["best_step"]
    assert metrics["gauc"] == evals[0]["gauc"] != es["best_value"]
    manifest = json.load(open(os.path.join(world_train_as_valid, "manifest.json")))
    assert metrics["num_examples"] == manifest["components"]["ctr"]["test"]["num_rows"]
    assert valid[0]["num_examples"] == manifest["components"]["ctr"]["train"]["num_rows"]
    assert json.load(open(os.path.join(cfg.model_dir, "eval_history.json"))) == history
    # a second invocation resumes the finished run: the same choice and the same test metrics
    again = run(cfg)
    assert again["early_stopping"] == es and again["gauc"] == pytest.approx(metrics["gauc"], abs=1e-9)


def test_without_a_validation_split_early_stopping_uses_the_eval_split(tiny_world, tmp_path):
    cfg = _config(tiny_world, tmp_path / "id", "id", make_epochs=0, epochs=2, early_stopping_patience=1,
                  export=False)
    metrics = run(cfg)
    assert metrics["early_stopping"]["split"] == "eval"
    assert {h["split"] for h in metrics["eval_history"]} == {"eval"}
    assert metrics["gauc"] == metrics["early_stopping"]["best_value"]
