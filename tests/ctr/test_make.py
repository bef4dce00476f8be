"""MAKE in the CTR model: the variants, the two phases, freezing, resume and export (paper section 4.3)."""

import json
import logging
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_ads.config import CTRModelConfig, DataConfig, ExperimentConfig, TrainConfig
from mm_ads.ctr import make as make_lib
from mm_ads.ctr.model import MAKE_LAYER, build_ctr_model, model_input_names
from mm_ads.ctr.task import CTRTask
from mm_ads.data.spec import FeatureSpec
from mm_ads.train import run
from mm_ads.training.checkpoint import model_checkpoint
from mm_ads.training.trainer import Trainer
from tests.ctr.helpers import random_inputs, restored_predictions

MAKE_UNITS = (12, 8, 6, 4)
SMALL_MODEL = dict(embedding_dim=4, attention_units=(8,), mlp_units=(16, 8), activation="relu", num_tiers=10,
                   make_units=MAKE_UNITS, make_attention_units=(8,))
SPEC = FeatureSpec.default(seq_len=5, vector_dim=8, num_items=100, num_categories=5, num_brands=7, num_users=10,
                           profile_buckets=(3,))


def _config(data_dir, model_dir, variant="make", make_epochs=2, make_trainable=False, **train):
    train = {"checkpoint_every": 10, "log_every": 10, "seed": 0, "dense_learning_rate": 0.01, **train}
    return ExperimentConfig(
        model_dir=str(model_dir),
        data=DataConfig(data_dir=data_dir, vector_table="attributes", batch_size=128, eval_batch_size=512,
                        shuffle_buffer=1000),
        model=CTRModelConfig(variant=variant, make_epochs=make_epochs, make_trainable=make_trainable,
                             **SMALL_MODEL),
        train=TrainConfig(**train),
    ).validate()


def _make_weights(model):
    return {v.path: v.numpy().copy() for v in model.get_layer(MAKE_LAYER).weights}


def _checkpoint_values(ckpt_dir, prefix):
    """`{variable path: value}` of the model variables under `prefix` (e.g. "make/") in the latest checkpoint of
    `ckpt_dir` (`model_checkpoint` keys a variable by its path with "." for "/"; checkpoints escape "." as "..")."""
    reader = tf.train.load_checkpoint(ckpt_dir)
    suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
    out = {}
    for key in reader.get_variable_to_shape_map():
        if key.startswith("model/") and key.endswith(suffix):
            path = key[len("model/"):-len(suffix)].replace("..", "/")
            if path.startswith(prefix):
                out[path] = reader.get_tensor(key)
    return out


def _same_json(a, b):
    """Equal as JSON (NaN metrics of one-class slices compare equal)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# -- the model -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["make", "simtier_make", "make_only"])
def test_variants_build_predict_and_round_trip(variant, tmp_path):
    model = build_ctr_model(SPEC, CTRModelConfig(variant=variant, **SMALL_MODEL))
    assert sorted(t.name for t in model.inputs) == sorted(model_input_names(SPEC, variant))
    x = random_inputs(model, min_id=1)
    out = model(x)
    assert out["ctr"].shape == (3,)
    np.testing.assert_allclose(out["ctr"], tf.sigmoid(out["logit"]), rtol=1e-6)
    path = str(tmp_path / "m.keras")
    model.save(path)
    again = keras.models.load_model(path)
    np.testing.assert_allclose(again(x)["ctr"], out["ctr"], rtol=1e-6)
    assert again.get_layer(MAKE_LAYER).trainable == model.get_layer(MAKE_LAYER).trainable


def test_make_only_reads_vectors_only_and_outputs_the_make_logit():
    assert model_input_names(SPEC, "make_only") == ["hist_item_id", "item_vector", "item_vector_missing",
                                                    "hist_item_vector", "hist_item_vector_missing"]
    model = build_ctr_model(SPEC, CTRModelConfig(variant="make_only", **SMALL_MODEL))
    make = model.get_layer(MAKE_LAYER)
    assert make.trainable and make.mlp.hidden_units == list(MAKE_UNITS)
    assert all(w.path.startswith("make/") for w in model.weights)
    x = random_inputs(model, min_id=1)
    hist = x["hist_item_id"].numpy()
    hist[:, :2] = 0  # left padding
    x["hist_item_id"] = tf.constant(hist)
    mask = tf.logical_and(tf.not_equal(x["hist_item_id"], 0), tf.equal(x["hist_item_vector_missing"], 0.0))
    expected = make(x["item_vector"], x["hist_item_vector"], mask=mask, target_missing=x["item_vector_missing"])
    np.testing.assert_allclose(model(x)["logit"], expected["logit"][:, 0], rtol=1e-6)
    # garbage under padding changes nothing
    v = x["hist_item_vector"].numpy()
    v[:, :2] = 1000.0
    noisy = dict(x, hist_item_vector=tf.constant(v))
    np.testing.assert_allclose(model(noisy)["logit"], model(x)["logit"], rtol=1e-6)


@pytest.mark.parametrize("base,variant", [("id", "make"), ("simtier", "simtier_make")])
def test_main_mlp_reads_v_make_hidden_outputs_and_logit(base, variant):
    without = build_ctr_model(SPEC, CTRModelConfig(variant=base, **SMALL_MODEL))
    model = build_ctr_model(SPEC, CTRModelConfig(variant=variant, **SMALL_MODEL))
    width = lambda m: m.get_layer("mlp").dense_layers[0].kernel.shape[0]  # noqa: E731
    # v_MAKE [B, 2D] + the hidden outputs + the MAKE logit (+ the missing flag the id variant lacks)
    extra = 2 * SPEC.vector_dim + sum(MAKE_UNITS) + 1 + (1 if base == "id" else 0)
    assert width(model) == width(without) + extra
    x = random_inputs(model, min_id=1)
    before = model(x)["ctr"].numpy()
    make = model.get_layer(MAKE_LAYER)
    make.mlp.output_layer.bias.assign([3.0])  # only the MAKE logit moves
    after_logit = model(x)["ctr"].numpy()
    assert not np.allclose(after_logit, before)
    for w in make.mlp.dense_layers[0].weights:
        w.assign(w.numpy() * 2.0)
    assert not np.allclose(model(x)["ctr"].numpy(), after_logit)


@pytest.mark.parametrize("make_epochs,make_trainable,frozen", [(2, False, True), (2, True, False),
                                                               (0, False, False), (0, True, False)])
def test_make_is_frozen_only_when_pretrained_and_not_fine_tuned(make_epochs, make_trainable, frozen):
    cfg = CTRModelConfig(variant="make", make_epochs=make_epochs, make_trainable=make_trainable, **SMALL_MODEL)
    assert cfg.make_frozen == frozen and cfg.pretrains_make == (make_epochs > 0)
    model = build_ctr_model(SPEC, cfg)
    make_ids = {id(v) for v in model.get_layer(MAKE_LAYER).weights}
    trainable_ids = {id(v) for v in model.trainable_weights}
    assert make_ids.isdisjoint(trainable_ids) == frozen
    if not frozen:
        assert {id(v) for v in model.get_layer(MAKE_LAYER).trainable_weights} <= trainable_ids
    assert len(model.trainable_weights) > len(model.get_layer(MAKE_LAYER).trainable_weights)


def test_restore_make_loads_only_make_from_a_make_only_checkpoint(tmp_path):
    source = build_ctr_model(SPEC, CTRModelConfig(variant="make_only", **SMALL_MODEL))
    for w in source.weights:
        w.assign(np.random.default_rng(len(w.path)).normal(size=w.shape).astype(np.float32))
    path = tf.train.Checkpoint(model=model_checkpoint(source)).save(str(tmp_path / "ckpt" / "ckpt"))
    target = build_ctr_model(SPEC, CTRModelConfig(variant="simtier_make", **SMALL_MODEL))
    others = {v.path: v.numpy().copy() for v in target.weights if not v.path.startswith("make/")}
    make_lib.restore_make(target, path)
    restored = _make_weights(target)
    assert restored.keys() == {w.path for w in source.weights}
    for w in source.weights:
        np.testing.assert_array_equal(restored[w.path], w.numpy())
    for v in target.weights:
        if not v.path.startswith("make/"):
            np.testing.assert_array_equal(v.numpy(), others[v.path])
    other_sizes = build_ctr_model(SPEC, CTRModelConfig(variant="make", **dict(SMALL_MODEL, make_units=(5, 4))))
    with pytest.raises((AssertionError, ValueError)):
        make_lib.restore_make(other_sizes, path)


def test_pretrain_config(tiny_world):
    cfg = _config(tiny_world, "/runs/m", make_epochs=3, make_learning_rate=0.05, max_steps=7)
    a = make_lib.pretrain_config(cfg)
    assert a.model_dir == os.path.join("/runs/m", "make") and a.model.variant == "make_only"
    assert (a.train.epochs, a.train.dense_learning_rate, a.train.max_steps, a.train.export) == (3, 0.05, 7, False)
    assert a.model.make_units == MAKE_UNITS and cfg.model.variant == "make"  # the original is untouched
    assert make_lib.pretrain_config(_config(tiny_world, "/m", make_epochs=3)).train.dense_learning_rate == 0.01
    # MAKE alone has no id table: the tables' options do not change its pre-training (a report shares it)
    rows_off = _config(tiny_world, "/runs/m", make_epochs=3, make_learning_rate=0.05, max_steps=7)
    rows_off.model.admit_after, rows_off.model.unseen_row = 0, "learned"
    assert make_lib.pretrain_config(rows_off).to_json() == a.to_json()
    with pytest.raises(ValueError, match="no MAKE pre-training"):
        make_lib.pretrain_config(_config(tiny_world, "/m", make_epochs=0))


# -- the two phases --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def make_run(tiny_world, tmp_path_factory):
    """`make` trained by `train.run`: 2 epochs of MAKE pre-training, then one epoch of the ID model."""
    cfg = _config(tiny_world, tmp_path_factory.mktemp("make") / "m", "make", make_epochs=2)
    return cfg, run(cfg)


def test_two_phases_write_their_own_dirs_and_metrics(make_run):
    cfg, metrics = make_run
    root = cfg.model_dir
    saved = json.load(open(os.path.join(root, "metrics.json")))
    assert saved["variant"] == "make" and saved["epochs"] == 1 and 0.0 < saved["logloss"] < 0.69
    a = saved["make_pretrain"]
    assert a["variant"] == "make_only" and a["epochs"] == 2 and 0.0 < a["logloss"] < 0.69 and a["auc"] > 0.5
    assert [h["epoch"] for h in a["eval_history"]] == [1.0, 2.0]  # one evaluation per pre-training epoch
    phase_a = os.path.join(root, "make")
    assert _same_json(json.load(open(os.path.join(phase_a, "metrics.json"))), a)
    assert json.load(open(os.path.join(phase_a, "config.json")))["model"]["variant"] == "make_only"
    assert tf.train.latest_checkpoint(os.path.join(phase_a, "ckpt")).endswith(f"-{a['steps']}")
    assert not os.path.exists(os.path.join(phase_a, "export"))
    assert metrics["export_path"] == os.path.join(root, "export", "1")


def test_frozen_make_is_bit_identical_after_phase_b_while_id_weights_train(make_run, tmp_path):
    cfg, _ = make_run
    phase_a = _checkpoint_values(os.path.join(cfg.model_dir, "make", "ckpt"), "make/")
    phase_b = _checkpoint_values(os.path.join(cfg.model_dir, "ckpt"), "make/")
    # kernels and biases: attention MLP 1 Dense + the score kernel (no bias under softmax), MLP_MAKE 5 (ReLU)
    assert len(phase_a) == 2 + 1 + 5 * 2
    assert "make/mlp/output/kernel" in phase_a
    assert phase_a.keys() == phase_b.keys()
    for k in phase_a:
        np.testing.assert_array_equal(phase_b[k], phase_a[k], err_msg=k)
    # before/after one phase B: MAKE starts from phase A and does not move, the ID model does
    b_cfg = _config(cfg.data.data_dir, tmp_path / "b", "make", make_epochs=2, max_steps=6)
    a_ckpt = tf.train.latest_checkpoint(os.path.join(cfg.model_dir, "make", "ckpt"))
    trainer = Trainer(CTRTask(b_cfg, make_checkpoint=a_ckpt), b_cfg.train, b_cfg.data.batch_size, b_cfg.model_dir)
    make_ids = {id(v) for v in trainer.model.get_layer(MAKE_LAYER).weights}
    assert not make_ids & {id(v) for v in trainer.dense_vars + trainer.sparse_vars}
    before = {v.path: v.numpy().copy() for v in trainer.model.weights}
    for path, value in phase_a.items():
        np.testing.assert_array_equal(before[path], value)
    trainer.train()
    for v in trainer.model.weights:
        if v.path.startswith("make/"):
            np.testing.assert_array_equal(v.numpy(), before[v.path], err_msg=v.path)
    after = {v.path: v.numpy() for v in trainer.model.weights}
    for path in ("emb_item/embeddings", "mlp/dense_0/kernel", "din/attention_mlp/dense_0/kernel"):
        assert not np.array_equal(after[path], before[path]), path


def test_make_trainable_fine_tunes_the_pretrained_make(make_run, tmp_path):
    cfg, _ = make_run
    b_cfg = _config(cfg.data.data_dir, tmp_path / "b", "make", make_epochs=2, make_trainable=True, max_steps=6)
    a_ckpt = tf.train.latest_checkpoint(os.path.join(cfg.model_dir, "make", "ckpt"))
    trainer = Trainer(CTRTask(b_cfg, make_checkpoint=a_ckpt), b_cfg.train, b_cfg.data.batch_size, b_cfg.model_dir)
    before = _make_weights(trainer.model)
    phase_a = _checkpoint_values(os.path.join(cfg.model_dir, "make", "ckpt"), "make/")
    for path, value in phase_a.items():
        np.testing.assert_array_equal(before[path], value)
    trainer.train()
    after = _make_weights(trainer.model)
    assert not np.array_equal(after["make/mlp/dense_0/kernel"], before["make/mlp/dense_0/kernel"])
    assert not np.array_equal(after["make/attention/attention_mlp/dense_0/kernel"],
                              before["make/attention/attention_mlp/dense_0/kernel"])


def test_make_epochs_0_trains_make_jointly_without_phase_a(tiny_world, tmp_path):
    cfg = _config(tiny_world, tmp_path / "m", "make", make_epochs=0, max_steps=6, export=False)
    metrics = run(cfg)
    assert "make_pretrain" not in metrics and not os.path.exists(tmp_path / "m" / "make")
    b_cfg = _config(tiny_world, tmp_path / "b", "make", make_epochs=0, max_steps=6)
    trainer = Trainer(CTRTask(b_cfg), b_cfg.train, b_cfg.data.batch_size, b_cfg.model_dir)
    before = _make_weights(trainer.model)
    trainer.train()
    after = _make_weights(trainer.model)
    for path in ("make/mlp/dense_0/kernel", "make/mlp/output/kernel", "make/attention/attention_mlp/dense_0/kernel"):
        assert not np.array_equal(after[path], before[path]), path


def test_rerun_skips_finished_phase_a_and_resumes_phase_b(make_run, tmp_path, caplog):
    cfg, metrics = make_run
    copy = tmp_path / "m"
    shutil.copytree(cfg.model_dir, copy)
    phase_a_files = [os.path.join("ckpt", p) for p in os.listdir(copy / "make" / "ckpt")] + ["metrics.json"]
    phase_a_files = {p: os.path.getmtime(os.path.join(copy, "make", p)) for p in phase_a_files}
    again_cfg = _config(cfg.data.data_dir, copy, "make", make_epochs=2)
    with caplog.at_level(logging.INFO, logger="absl"):
        again = run(again_cfg)
    assert "MAKE pre-training already done" in caplog.text and "Restored" in caplog.text
    assert "MAKE pre-training (phase A)" not in caplog.text
    for p, mtime in phase_a_files.items():
        assert os.path.getmtime(os.path.join(copy, "make", p)) == mtime, p
    assert _same_json(again["make_pretrain"], metrics["make_pretrain"])
    assert again["auc"] == pytest.approx(metrics["auc"], abs=1e-6)
    # a phase A of another length cannot feed the phase B that already trained
    with pytest.raises(ValueError, match="already trained with it"):
        run(_config(cfg.data.data_dir, copy, "make", make_epochs=2, max_steps=3))
    with pytest.raises(ValueError, match="different model config"):
        run(_config(cfg.data.data_dir, copy, "make", make_epochs=3))


def test_interrupted_phase_a_resumes(tiny_world, tmp_path, caplog):
    cfg = _config(tiny_world, tmp_path / "m", "make", make_epochs=1, max_steps=12, export=False)
    a_cfg = make_lib.pretrain_config(cfg)
    # phase A killed after its checkpoint at step 10: no metrics.json yet
    a_cfg.train.max_steps = 10
    trainer = Trainer(CTRTask(a_cfg), a_cfg.train, a_cfg.data.batch_size, a_cfg.model_dir)
    trainer.train()
    assert make_lib.finished_pretraining(cfg) is None
    with caplog.at_level(logging.INFO, logger="absl"):
        metrics = run(cfg)
    assert "Restored" in caplog.text and metrics["make_pretrain"]["steps"] == 12
    assert tf.train.latest_checkpoint(os.path.join(a_cfg.model_dir, "ckpt")).endswith("-12")


def test_simtier_make_export_equals_the_keras_model(tiny_world, tmp_path):
    cfg = _config(tiny_world, tmp_path / "m", "simtier_make", make_epochs=1, max_steps=8)
    metrics = run(cfg)
    assert metrics["make_pretrain"]["steps"] == 8 and metrics["steps"] == 8
    task = CTRTask(cfg)
    fn = tf.saved_model.load(metrics["export_path"]).signatures["serving_default"]
    assert set(fn.structured_input_signature[1]) == set(model_input_names(task.spec, "simtier_make"))
    x, expected = restored_predictions(task, cfg)
    np.testing.assert_allclose(fn(**x)["ctr"].numpy(), expected, rtol=1e-5, atol=1e-6)
    # MAKE is computed in the graph from the vectors: other vectors, other predictions
    moved = dict(x, hist_item_vector=tf.reverse(x["hist_item_vector"], axis=[0]))
    assert not np.allclose(fn(**moved)["ctr"].numpy(), expected)


# the make variant is large (~13 s): simtier_make runs the same command line through both phases
@pytest.mark.parametrize("variant", [pytest.param("make", marks=pytest.mark.large), "simtier_make"])
def test_flagfile_runs_both_phases_from_the_command_line(variant, tiny_world, tmp_path, repo_root):
    model_dir = tmp_path / "m"
    cmd = [sys.executable, "-m", "mm_ads.train", f"--flagfile=configs/ctr/{variant}.flags",
           f"--data_dir={tiny_world}", "--vector_table=attributes", f"--model_dir={model_dir}", "--batch_size=512",
           "--make_epochs=2", "--eval_batch_size=2048"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo_root)
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.load(open(model_dir / "metrics.json"))
    assert metrics["variant"] == variant and metrics["make_pretrain"]["epochs"] == 2
    assert json.load(open(model_dir / "config.json"))["model"]["make_units"] == [256, 128, 64, 32]
    assert os.path.isdir(model_dir / "export" / "1") and "make_pretrain" in proc.stdout


def test_config_json_without_the_make_fields_still_resumes(tmp_path):
    from mm_ads.training.model_dir import check_resume

    cfg = _config("data", tmp_path, "simtier")
    cfg.model = CTRModelConfig(variant="simtier")  # the MAKE fields at their defaults
    old = cfg.to_json()
    for name in ("make_units", "make_attention_units", "make_epochs", "make_trainable"):
        del old["model"][name]
    del old["train"]["make_learning_rate"]
    json.dump(old, open(tmp_path / "config.json", "w"))
    check_resume(str(tmp_path), cfg)  # a model dir written before MAKE existed: defaults, same config
    cfg.model.make_epochs = 1
    with pytest.raises(ValueError, match="different model config"):
        check_resume(str(tmp_path), cfg)


def test_phase_a_does_not_depend_on_simtier_options(tiny_world):
    plain = make_lib.pretrain_config(_config(tiny_world, "/m", "make", make_epochs=2))
    tiered = _config(tiny_world, "/m", "simtier_make", make_epochs=2)
    tiered.model.tier_transform, tiered.model.num_tiers = "fraction", 7
    a = make_lib.pretrain_config(tiered)
    assert a.to_json() == plain.to_json()
    assert (tiered.model.tier_transform, tiered.model.num_tiers) == ("fraction", 7)  # the original is untouched
