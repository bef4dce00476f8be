"""A run records its vector table; resuming or exporting against another table is refused unless allowed."""

import json
import logging
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from mm_ads.data.vectors import write_vector_table
from mm_ads.export.saved_model import export_checkpoint, read_vector_record
from mm_ads.train import InputError, run
from mm_ads.training import vector_record
from mm_ads.training.vector_record import VectorTableChanged
from tests.ctr.conftest import attribute_vectors
from tests.ctr.test_train import _config

TABLE = os.path.join("vectors", "attributes.parquet")


@pytest.fixture
def world(tiny_world, tmp_path):
    """A private copy of the tiny world: the tests replace its vector table."""
    out = str(tmp_path / "world")
    shutil.copytree(tiny_world, out)
    return out


def _replace_table(world, encoder="test-attributes", dim=16, seed=0):
    items = pq.read_table(os.path.join(world, "items.parquet"), columns=["item_id", "category_id", "colour",
                                                                         "pattern", "material"]).to_pydict()
    write_vector_table(os.path.join(world, TABLE), np.asarray(items["item_id"]),
                       attribute_vectors(items, dim=dim, seed=seed), encoder_version=encoder)


def test_the_run_records_its_table_and_the_export_carries_its_encoder(world, tmp_path):
    model_dir = tmp_path / "m"
    metrics = run(_config(world, model_dir, "simtier", max_steps=2))
    record = json.load(open(model_dir / vector_record.RECORD_FILE))
    entry = record["tables"]["attributes"]
    assert entry["encoder_version"] == "test-attributes" and entry["dim"] == 16
    assert entry["path"] == os.path.join(world, TABLE) and entry["num_rows"] > 0
    assert entry["fingerprint"].startswith("sha256:") and len(entry["fingerprint"]) == 7 + 64
    exported = read_vector_record(metrics["export_path"])
    assert set(exported["inputs"]) == {"item_vector", "hist_item_vector"}
    assert exported["inputs"]["item_vector"]["encoder_version"] == "test-attributes"
    assert exported["inputs"]["item_vector"]["dim"] == 16
    # a run without vectors records nothing
    run(_config(world, tmp_path / "id", "id", max_steps=1, export=False))
    assert not os.path.exists(tmp_path / "id" / vector_record.RECORD_FILE)


@pytest.mark.parametrize("change, differs", [
    (dict(encoder="other-encoder"), "encoder version 'test-attributes' → 'other-encoder'"),
    (dict(seed=5), "content fingerprint 'sha256:"),
    (dict(dim=8), "dim 16 → 8"),
])
def test_resume_and_export_against_another_table_are_refused(world, tmp_path, change, differs):
    model_dir = tmp_path / "m"
    run(_config(world, model_dir, "simtier", max_steps=2, export=False))
    before = open(model_dir / vector_record.RECORD_FILE).read()
    checkpoints = sorted(os.listdir(model_dir / "ckpt"))
    _replace_table(world, **change)
    with pytest.raises(InputError) as e:
        run(_config(world, model_dir, "simtier", max_steps=4, export=False))
    message = str(e.value)
    assert "the vector table 'attributes'" in message and os.path.join(world, TABLE) in message
    assert differs in message and "Refusing to resume" in message and "--allow_vector_table_change" in message
    assert open(model_dir / vector_record.RECORD_FILE).read() == before  # nothing was written
    assert sorted(os.listdir(model_dir / "ckpt")) == checkpoints
    with pytest.raises(VectorTableChanged, match=f"{differs[:20]}.*Refusing to export"):
        export_checkpoint(str(model_dir))
    assert not os.path.exists(model_dir / "export")


def test_allow_vector_table_change_goes_on_with_a_warning_and_records_the_new_table(world, tmp_path, caplog):
    model_dir = tmp_path / "m"
    run(_config(world, model_dir, "simtier", max_steps=2, export=False))
    old = vector_record.recorded_entry(str(model_dir))
    _replace_table(world, encoder="other-encoder")
    with pytest.raises(VectorTableChanged):
        export_checkpoint(str(model_dir))
    with caplog.at_level(logging.WARNING, logger="absl"):
        path = export_checkpoint(str(model_dir), allow_vector_table_change=True)
    assert read_vector_record(path)["inputs"]["item_vector"]["encoder_version"] == "other-encoder"
    assert vector_record.recorded_entry(str(model_dir)) == old  # an export does not rewrite the run's record
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="absl"):
        metrics = run(_config(world, model_dir, "simtier", max_steps=4, allow_vector_table_change=True))
    warned = [r for r in caplog.records if "--allow_vector_table_change" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert "encoder version 'test-attributes' → 'other-encoder'" in warned[0].getMessage()
    assert metrics["steps"] == 4  # resumed from step 2
    record = json.load(open(model_dir / vector_record.RECORD_FILE))
    assert record["tables"]["attributes"]["encoder_version"] == "other-encoder"
    assert [e["encoder_version"] for e in record["replaced"]] == ["test-attributes"]
    assert read_vector_record(metrics["export_path"])["inputs"]["item_vector"]["encoder_version"] == "other-encoder"
    # from now on the new table is the recorded one: no flag needed
    run(_config(world, model_dir, "simtier", max_steps=5, export=False))
