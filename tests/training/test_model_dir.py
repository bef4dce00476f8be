"""The run directory's owner: its file names, the resume rule and the reuse rule."""

import json

import pytest

from mm_ads import config as config_lib
from mm_ads.data.spec import FeatureSpec
from mm_ads.errors import InputError
from mm_ads.training import model_dir as run_dir
from mm_ads.utils.io import write_json


def _config(tmp_path, **values):
    return config_lib.config_from_values({"data_dir": "d", "model_dir": str(tmp_path), **values})


def test_resume_allows_more_epochs_and_refuses_another_model(tmp_path):
    run_dir.check_resume(str(tmp_path), _config(tmp_path))  # empty directory: nothing to compare
    write_json(run_dir.path(str(tmp_path), run_dir.CONFIG), _config(tmp_path, epochs="1").to_json())
    run_dir.check_resume(str(tmp_path), _config(tmp_path, epochs="3", checkpoint_every="5"))
    with pytest.raises(InputError, match=r"config.json holds a different model config than this run .*use a new "
                                         r"--model_dir"):
        run_dir.check_resume(str(tmp_path), _config(tmp_path, variant="simtier"))
    with pytest.raises(InputError, match="different data config"):
        run_dir.check_resume(str(tmp_path), _config(tmp_path, data_dir="other"))


def test_resume_of_an_older_config_fills_the_fields_added_since(tmp_path):
    saved = _config(tmp_path, variant="simtier").to_json()
    del saved["model"]["tier_transform"]  # written before the field existed: its default applies
    write_json(run_dir.path(str(tmp_path), run_dir.CONFIG), saved)
    run_dir.check_resume(str(tmp_path), _config(tmp_path, variant="simtier"))
    with pytest.raises(InputError, match="different model config"):
        run_dir.check_resume(str(tmp_path), _config(tmp_path, variant="simtier", tier_transform="fraction"))


def test_reuse_needs_a_finished_run_of_the_same_results_config(tmp_path):
    d = str(tmp_path)
    assert run_dir.reusable_metrics(d, _config(tmp_path)) is None
    write_json(run_dir.path(d, run_dir.CONFIG), _config(tmp_path, epochs="2").to_json())
    assert run_dir.reusable_metrics(d, _config(tmp_path, epochs="2")) is None  # not finished: no metrics.json
    write_json(run_dir.path(d, run_dir.METRICS), {"auc": 0.7})
    assert run_dir.finished_metrics(d) == {"auc": 0.7}
    # checkpointing, logging and export do not change results; the number of epochs does
    assert run_dir.reusable_metrics(d, _config(tmp_path, epochs="2", log_every="3", export="false")) == {"auc": 0.7}
    with pytest.raises(ValueError, match="finished run of another train config"):
        run_dir.reusable_metrics(d, _config(tmp_path, epochs="3"))


def test_load_ctr_run_and_checkpoint_name_what_is_missing(tmp_path):
    d = str(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config.json not found: --init_model_dir=X is not a model dir"):
        run_dir.load_ctr_run(d, "--init_model_dir=X")
    config = _config(tmp_path)
    write_json(run_dir.path(d, run_dir.CONFIG), config.to_json())
    with pytest.raises(FileNotFoundError, match=r"feature_spec.json not found: .* is not a model dir"):
        run_dir.load_ctr_run(d)
    spec = FeatureSpec.default(seq_len=4, vector_dim=0, num_items=10, num_categories=3, num_brands=3, num_users=5)
    with open(run_dir.path(d, run_dir.SPEC), "w") as f:
        json.dump(spec.to_json(), f)
    loaded, loaded_spec = run_dir.load_ctr_run(d)
    assert loaded.model == config.model and loaded_spec == spec
    assert run_dir.latest_checkpoint(d) is None
    with pytest.raises(FileNotFoundError, match=r"--init_model_dir=X: no checkpoint in .*ckpt"):
        run_dir.require_checkpoint(d, "--init_model_dir=X")


def test_options_the_variant_never_reads_do_not_make_another_run(tmp_path):
    d = str(tmp_path)
    write_json(run_dir.path(d, run_dir.CONFIG), _config(tmp_path, variant="make", tier_transform="fraction",
                                                        vector_projection_dim="8").to_json())
    write_json(run_dir.path(d, run_dir.METRICS), {"auc": 0.7})
    # MAKE alone reads neither SimTier's options nor the vector projection's
    assert run_dir.reusable_metrics(d, _config(tmp_path, variant="make")) == {"auc": 0.7}
    run_dir.check_resume(d, _config(tmp_path, variant="make", num_tiers="10"))
    with pytest.raises(InputError, match="different model config"):
        run_dir.check_resume(d, _config(tmp_path, variant="make", make_units="64,32"))
    # SimTier reads them
    simtier = _config(tmp_path, variant="simtier", tier_transform="fraction")
    write_json(run_dir.path(d, run_dir.CONFIG), simtier.to_json())
    with pytest.raises(ValueError, match="finished run of another model config"):
        run_dir.reusable_metrics(d, _config(tmp_path, variant="simtier"))
    assert run_dir.reusable_metrics(d, _config(tmp_path, variant="simtier", tier_transform="fraction",
                                               vector_projection_dim="4")) == {"auc": 0.7}

