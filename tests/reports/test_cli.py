"""The report entry points turn invalid options into a usage error that says what is wrong."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module,flag,message", [
    ("mm_ads.reports.table2", "--benchmarks=bogus", "benchmarks must be a non-empty subset"),
    ("mm_ads.reports.paper", "--variants=simtier", "variants must include 'id'"),
    ("mm_ads.reports.paper", "--seeds=0,x", "--seeds must be comma-separated integers"),
])
def test_entry_point_rejects_bad_flags(module, flag, message, repo_root, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo_root)
    proc = subprocess.run([sys.executable, "-m", module, flag, f"--output_dir={tmp_path}"], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not os.listdir(tmp_path)  # nothing written


def test_finished_runs_are_reused_only_for_the_same_config(tmp_path):
    from mm_ads import config as config_lib
    from mm_ads.reports.options import reusable_metrics
    from mm_ads.utils.io import write_json

    def config(**values):
        return config_lib.config_from_values({"data_dir": "d", "model_dir": str(tmp_path), **values})

    assert reusable_metrics(str(tmp_path), config()) is None  # nothing finished yet
    write_json(str(tmp_path / "config.json"), config(epochs="2").to_json())
    write_json(str(tmp_path / "metrics.json"), {"auc": 0.7})
    assert reusable_metrics(str(tmp_path), config(epochs="2", checkpoint_every="7", export="false")) == {"auc": 0.7}
    with pytest.raises(ValueError, match="finished run of another train config"):
        reusable_metrics(str(tmp_path), config(epochs="3"))
    with pytest.raises(ValueError, match="finished run of another model config"):
        reusable_metrics(str(tmp_path), config(epochs="2", variant="simtier"))
