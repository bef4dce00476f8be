"""`python -m mm_ads.train` checks its inputs before it writes anything to --model_dir, and names the flag to fix."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from absl import app, flags
from absl.testing import flagsaver

from mm_ads import config as config_lib
from mm_ads import train
from mm_ads.data.spec import FeatureSpec
from mm_ads.training import model_dir as run_dir

FLAGS = flags.FLAGS


def _smoke(repo_root, data_dir, model_dir, **values):
    flagfile = os.path.join(repo_root, "configs", "ctr", "smoke.flags")
    return config_lib.config_from_flagfile(flagfile, data_dir=data_dir, model_dir=str(model_dir), max_steps="3",
                                           export="false", **values)


def _copy(world, tmp_path):
    return shutil.copytree(world, str(tmp_path / "world"))


def test_missing_vector_table_then_the_corrected_command(tiny_world, tmp_path, repo_root):
    from mm_ads import flags as _  # noqa: F401  (defines the flags of mm_ads.train)

    model_dir = tmp_path / "m"
    argv = ["mm_ads.train", f"--flagfile={os.path.join(repo_root, 'configs', 'ctr', 'smoke.flags')}",
            f"--data_dir={tiny_world}", f"--model_dir={model_dir}", "--variant=simtier", "--max_steps=3",
            "--noexport"]
    with flagsaver.flagsaver():
        FLAGS(argv + ["--vector_table=attributs"])
        with pytest.raises(app.UsageError) as e:
            train.main(["mm_ads.train"])
    message = str(e.value)
    assert message.startswith("--vector_table='attributs' is neither a vector table") and "'attributes'" in message
    assert "vector_table=" not in message.replace("--vector_table=", "")  # the flag, not the Python argument
    assert not model_dir.exists()
    with flagsaver.flagsaver():
        FLAGS(argv + ["--vector_table=attributes"])
        train.main(["mm_ads.train"])
    saved = json.load(open(model_dir / "config.json"))
    assert saved["data"]["vector_table"] == "attributes" and saved["model"]["variant"] == "simtier"
    assert json.load(open(model_dir / "metrics.json"))["steps"] == 3


def test_missing_data_dir_or_split_names_the_flag(tiny_world, tmp_path, repo_root):
    model_dir = tmp_path / "m"
    with pytest.raises(train.InputError, match=r"^--data_dir=.*nowhere: no such directory"):
        train.run(_smoke(repo_root, str(tmp_path / "nowhere"), model_dir))
    (tmp_path / "empty").mkdir()
    with pytest.raises(train.InputError, match=r"^--data_dir=.*empty: .*manifest.json not found"):
        train.run(_smoke(repo_root, str(tmp_path / "empty"), model_dir))
    with pytest.raises(train.InputError, match=r"^--eval_split=valid: .* has no ctr/valid split \(it has \['test', "
                                               r"'train'\]\)"):
        train.run(_smoke(repo_root, tiny_world, model_dir, eval_split="valid"))
    assert not model_dir.exists()


def _garbage(path):
    with open(path, "wb") as f:
        f.write(b"PAR1 this is not a parquet file")


def _wrong_columns(path):
    pq.write_table(pa.table({"item_id": np.arange(3, dtype=np.int64)}), path)


@pytest.mark.parametrize("corrupt", [_garbage, _wrong_columns])
def test_corrupt_item_stats_fails_before_training(tiny_world, tmp_path, repo_root, corrupt):
    world = _copy(tiny_world, tmp_path)
    stats = os.path.join(world, "item_stats.parquet")
    corrupt(stats)
    model_dir = tmp_path / "m"
    with pytest.raises(train.InputError) as e:
        train.run(_smoke(repo_root, world, model_dir))
    assert stats in str(e.value) and "train_count" in str(e.value)
    assert not model_dir.exists()


def test_vector_table_of_the_wrong_dim(tiny_world, tmp_path, repo_root):
    world = _copy(tiny_world, tmp_path)
    model_dir = tmp_path / "m"
    config = _smoke(repo_root, world, model_dir, variant="simscore", vector_table="attributes")
    # the manifest declares a dim (as the Taobao-MM reader does) that the table does not have
    manifest = json.load(open(os.path.join(world, "manifest.json")))
    manifest["extra"]["vector_tables"] = {"attributes": {"path": "vectors/attributes.parquet", "dim": 8}}
    json.dump(manifest, open(os.path.join(world, "manifest.json"), "w"))
    with pytest.raises(train.InputError, match=r"^--vector_table=attributes: .*attributes.parquet has dim 16, but "
                                               r"the manifest .* declares dim 8"):
        train.run(config)
    assert not model_dir.exists()
    # a run being resumed was trained with vectors of another dim
    manifest["extra"]["vector_tables"] = {"attributes": "vectors/attributes.parquet"}
    json.dump(manifest, open(os.path.join(world, "manifest.json"), "w"))
    model_dir.mkdir()
    spec = FeatureSpec.from_json(manifest["spec"])
    trained = FeatureSpec([f for f in spec if f.role != "vector"], spec.seq_len, 0).with_vectors(8)
    json.dump(trained.to_json(), open(model_dir / run_dir.SPEC, "w"))
    with pytest.raises(train.InputError, match=r"has dim 16, but the run in .* was trained with dim 8 .*"
                                               r"feature_spec.json"):
        train.run(config)
    assert os.listdir(model_dir) == [run_dir.SPEC]


def test_unreadable_vector_table_path(tiny_world, tmp_path, repo_root):
    bad = tmp_path / "vectors.parquet"
    bad.write_bytes(b"not parquet")
    model_dir = tmp_path / "m"
    with pytest.raises(train.InputError, match=r"^--vector_table=.*vectors.parquet: Vector table .* is not a "
                                               r"readable Parquet file"):
        train.run(_smoke(repo_root, tiny_world, model_dir, variant="vector", vector_table=str(bad)))
    assert not model_dir.exists()
