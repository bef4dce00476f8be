import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from mm_ads.config import CTRModelConfig, DataConfig, ExperimentConfig, TrainConfig
from mm_ads.ctr.model import model_input_names
from mm_ads.ctr.task import CTRTask
from mm_ads.export.saved_model import USER_SIGNATURE
from mm_ads.train import run
from tests.export.test_warmup import check_records_run

SMALL_MODEL = dict(embedding_dim=4, attention_units=(8,), mlp_units=(16, 8), activation="relu", num_tiers=10)


def _config(data_dir, model_dir, variant="id", **train):
    train = {"checkpoint_every": 10, "log_every": 10, "seed": 0, **train}
    return ExperimentConfig(
        model_dir=str(model_dir),
        data=DataConfig(data_dir=data_dir, batch_size=128, eval_batch_size=512, shuffle_buffer=1000),
        model=CTRModelConfig(variant=variant, **SMALL_MODEL),
        train=TrainConfig(**train),
    ).validate()


def _env(repo_root):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo_root)


@pytest.mark.parametrize("variant", ["id", "simtier"])
def test_train_writes_metrics_config_and_export(tiny_world, tmp_path, variant):
    cfg = _config(tiny_world, tmp_path / "m", variant, epochs=2, dense_learning_rate=0.01)
    metrics = run(cfg)
    saved = json.load(open(tmp_path / "m" / "metrics.json"))
    for key in ("auc", "gauc", "logloss", "num_examples", "calibration", "slices"):
        assert key in saved
    task = CTRTask(cfg)
    assert saved["num_examples"] == task.num_examples("eval")
    assert {f"freq_{i}" for i in range(1, 9)} | {"new"} <= set(saved["slices"])
    assert sum(saved["slices"][f"freq_{i}"]["num_examples"] for i in range(1, 9)) + \
        saved["slices"]["new"]["num_examples"] == saved["num_examples"]
    assert 0.0 < saved["logloss"] < 0.69
    # one evaluation per epoch (the curves of Fig 3)
    assert [h["epoch"] for h in saved["eval_history"]] == [1.0, 2.0]
    assert json.load(open(tmp_path / "m" / "config.json"))["model"]["variant"] == variant
    assert os.listdir(tmp_path / "m" / "summaries")
    assert metrics["export_path"].endswith(os.path.join("export", "1"))


def test_export_signature_equals_model(tiny_world, tmp_path, repo_root):
    cfg = _config(tiny_world, tmp_path / "m", "simtier", max_steps=5)
    metrics = run(cfg)
    task = CTRTask(cfg)
    loaded = tf.saved_model.load(metrics["export_path"])
    fn = loaded.signatures["serving_default"]
    names = set(fn.structured_input_signature[1])
    assert names == set(model_input_names(task.spec, "simtier"))
    assert set(fn.structured_outputs) == {"ctr"}
    # the Keras model restored from the last checkpoint gives the same predictions as the SavedModel
    from tests.ctr.helpers import restored_predictions

    x, expected = restored_predictions(task, cfg)
    np.testing.assert_allclose(fn(**x)["ctr"].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert x["hist_item_vector"].shape[1:] == (task.spec.seq_len, task.spec.vector_dim)
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    proc = subprocess.run([cli, "show", "--dir", metrics["export_path"], "--tag_set", "serve",
                           "--signature_def", "serving_default"], capture_output=True, text=True, timeout=120,
                          env=_env(repo_root))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("item_vector", "hist_item_vector", "hist_item_id", "user_id"):
        assert f"inputs['{name}']" in proc.stdout
    assert "outputs['ctr']" in proc.stdout


def test_resume_with_a_different_model_config_is_refused(tiny_world, tmp_path):
    run(_config(tiny_world, tmp_path / "m", "id", max_steps=3))
    with pytest.raises(ValueError, match="different model config"):
        run(_config(tiny_world, tmp_path / "m", "simtier", max_steps=3))


def _final_weights(model_dir):
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "ckpt"))
    shapes = reader.get_variable_to_shape_map()
    # every saved variable (model weights are reached through the optimizers' references), not the save counter
    dtypes = reader.get_variable_to_dtype_map()
    return {k: reader.get_tensor(k) for k in shapes
            if not k.startswith("save_counter") and dtypes[k].is_floating}


def _train_cmd(data_dir, model_dir):
    return [sys.executable, "-m", "mm_ads.train", "--flagfile=configs/ctr/smoke.flags", f"--data_dir={data_dir}",
            f"--model_dir={model_dir}", "--batch_size=32", "--epochs=2", "--checkpoint_every=10",
            "--deterministic", "--noexport"]


def test_kill_and_resume_equals_uninterrupted_run(tiny_world, tmp_path, repo_root):
    env = _env(repo_root)
    straight = tmp_path / "straight"
    proc = subprocess.run(_train_cmd(tiny_world, straight), cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "killed"
    p = subprocess.Popen(_train_cmd(tiny_world, killed), cwd=repo_root, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (killed / "ckpt" / "ckpt-40.index").exists():
            assert p.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not (killed / "metrics.json").exists()
    proc = subprocess.run(_train_cmd(tiny_world, killed), cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Restored" in proc.stderr
    a, b = _final_weights(straight), _final_weights(killed)
    assert a.keys() == b.keys() and len(a) > 20
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    ma = json.load(open(straight / "metrics.json"))
    mb = json.load(open(killed / "metrics.json"))
    assert ma["auc"] == pytest.approx(mb["auc"], abs=1e-5)


# large (~16 s): tests/distributed and the 2-replica tests of the layers cover training over replicas
@pytest.mark.large
def test_mirrored_strategy_on_two_logical_cpus(tiny_world, tmp_path, repo_root):
    cmd = _train_cmd(tiny_world, tmp_path / "mirrored")[:-2] + ["--strategy=mirrored", "--num_devices=2",
                                                                 "--epochs=1", "--batch_size=64"]
    proc = subprocess.run(cmd, cwd=repo_root, env=_env(repo_root), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.load(open(tmp_path / "mirrored" / "metrics.json"))
    assert metrics["num_examples"] > 0 and 0.0 < metrics["logloss"] < 0.69
    assert "MirroredStrategy" in proc.stderr


def test_entry_point_helpfull_and_bad_flags(repo_root):
    env = _env(repo_root)
    proc = subprocess.run([sys.executable, "-m", "mm_ads.train", "--helpfull"], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert "--variant" in proc.stdout and "--sparse_optimizer" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "mm_ads.train", "--flagfile=configs/ctr/id.flags",
                           "--variant=bogus", "--data_dir=x", "--model_dir=y"], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "model.variant must be one of" in proc.stderr


def test_export_entry_point_from_checkpoint(tiny_world, tmp_path, repo_root):
    cfg = _config(tiny_world, tmp_path / "m", "simscore", max_steps=4)
    metrics = run(cfg)
    proc = subprocess.run([sys.executable, "-m", "mm_ads.export", f"--model_dir={tmp_path / 'm'}",
                           "--warmup_batch_sizes=2,3"], cwd=repo_root, env=_env(repo_root), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = os.path.join(str(tmp_path / "m"), "export", "2")
    assert proc.stdout.strip().endswith(second)
    task = CTRTask(cfg)
    features, _ = next(iter(task.build_inputs("eval", 32, training=False)))
    x = task.model_inputs(features)
    first = tf.saved_model.load(metrics["export_path"]).signatures["serving_default"](**x)["ctr"].numpy()
    loaded = tf.saved_model.load(second)
    again = loaded.signatures["serving_default"](**x)["ctr"].numpy()
    np.testing.assert_allclose(again, first, rtol=1e-6)
    check_records_run(second, ["serving_default", USER_SIGNATURE], [2, 3], loaded)  # --warmup_batch_sizes
    # no temporary directories are left next to the versions
    assert sorted(os.listdir(tmp_path / "m" / "export")) == ["1", "2"]
    proc = subprocess.run([sys.executable, "-m", "mm_ads.export", f"--model_dir={tmp_path}"], cwd=repo_root,
                          env=_env(repo_root), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "is not a model dir" in proc.stderr


def test_multimodal_variant_without_vector_table_is_a_clear_error(tiny_world, tmp_path):
    cfg = _config(tiny_world, tmp_path / "m", "simtier")
    cfg.data.vector_table = "no_such_table"
    with pytest.raises(ValueError, match="no_such_table.*attributes"):
        CTRTask(cfg)
