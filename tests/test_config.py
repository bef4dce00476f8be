"""Flagfiles → configs without absl's global state (`mm_ads.config.read_flagfile` / `config_from_values`)."""

import glob
import os

import pytest

from mm_ads import config as config_lib
from mm_ads.data import synthetic


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_read_flagfile_comments_booleans_and_override(tmp_path):
    base = _write(tmp_path / "base.flags", "# comment\n--epochs=3\n--use_queue\n\n// also a comment\n--batch_size=8\n")
    top = _write(tmp_path / "top.flags", f"--flagfile={base}\n--epochs=5\n--nouse_triplet\n")
    assert config_lib.read_flagfile(top) == {"epochs": "5", "use_queue": "true", "batch_size": "8",
                                             "use_triplet": "false"}


def test_read_flagfile_errors_name_the_line(tmp_path):
    bad = _write(tmp_path / "bad.flags", "--epochs=3\nepochs 4\n")
    with pytest.raises(ValueError, match=r"bad.flags:2: expected '--name=value'"):
        config_lib.read_flagfile(bad)
    loop = tmp_path / "loop.flags"
    loop.write_text(f"--flagfile={loop}\n")
    with pytest.raises(ValueError, match="includes itself"):
        config_lib.read_flagfile(str(loop))


def test_config_from_values_types_and_validation():
    c = config_lib.config_from_values({"task": "scl", "data_dir": "d", "model_dir": "m", "epochs": "4",
                                       "dense_learning_rate": "0.5", "use_queue": "false", "image_widths": "8,16",
                                       "attention_units": (4, 2)})
    assert (c.task, c.train.epochs, c.train.dense_learning_rate, c.scl.use_queue) == ("scl", 4, 0.5, False)
    assert c.scl.image_widths == (8, 16) and c.model.attention_units == (4, 2)
    with pytest.raises(ValueError, match=r"Unknown flags: \['no_such_flag'\]"):
        config_lib.config_from_values({"data_dir": "d", "model_dir": "m", "no_such_flag": "1"})
    with pytest.raises(ValueError, match="--epochs: cannot read 'x' as int"):
        config_lib.config_from_values({"data_dir": "d", "model_dir": "m", "epochs": "x"})
    with pytest.raises(ValueError, match="--use_queue must be true or false"):
        config_lib.config_from_values({"data_dir": "d", "model_dir": "m", "use_queue": "maybe"})
    with pytest.raises(ValueError, match="scl.output_dim must be >= 1"):
        config_lib.config_from_values({"data_dir": "d", "model_dir": "m", "output_dim": "0"})
    c = config_lib.config_from_values({"data_dir": "d", "model_dir": "m", "output_dim": "0", "text_encoder": "minilm"})
    assert c.scl.output_dim == 0


def test_every_training_flagfile_parses(repo_root):
    """The library parser and the flagfiles agree (the absl entry point is covered by tests/test_entry_points.py)."""
    paths = sorted(glob.glob(os.path.join(repo_root, "configs", "ctr", "*.flags")) +
                   glob.glob(os.path.join(repo_root, "configs", "scl", "*.flags")))
    assert len(paths) >= 10
    for path in paths:
        config = config_lib.config_from_flagfile(path, data_dir="d", model_dir="m")
        assert config.task in config_lib.TASKS, path


def test_every_world_flagfile_parses(repo_root):
    for path in glob.glob(os.path.join(repo_root, "configs", "data", "*.flags")):
        if "--format=" in open(path).read():  # a real dataset's prepare flags (mm_ads.data.prepare), not a world
            continue
        assert synthetic.world_config_from_flagfile(path).num_items >= 1
    with pytest.raises(ValueError, match="Unknown world options"):
        synthetic.world_config_from_flagfile(os.path.join(repo_root, "configs", "data", "smoke.flags"), bogus="1")


def test_every_paper_flagfile_parses(repo_root, monkeypatch):
    """The report profiles are valid `PaperConfig`s (nested flagfiles followed), and the one-epoch profile is the quick
    one with the id tables on Adam."""
    from mm_ads.reports import paper

    monkeypatch.chdir(repo_root)  # nested --flagfile= paths are relative to the working directory, like absl's
    profiles = {}
    for path in sorted(glob.glob(os.path.join(repo_root, "configs", "paper", "*.flags"))):
        profiles[os.path.basename(path)] = paper.PaperConfig.from_values(config_lib.read_flagfile(path))
    assert len(profiles) >= 6
    quick, one_epoch = profiles["quick.flags"], profiles["quick_one_epoch.flags"]
    assert tuple(one_epoch.ctr_overrides) == ("sparse_optimizer=adam", "sparse_learning_rate=0.05")
    assert one_epoch.fig3_epochs == 4 and quick.fig3_epochs == 0
    assert (one_epoch.world_flagfile, one_epoch.seeds) == (quick.world_flagfile, quick.seeds)
