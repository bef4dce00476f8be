"""Which versions the server serves: only those whose vector inputs match the index table, and a failed version is
tried again once its directory was repaired (and only then)."""

import json
import logging
import os
import shutil

import numpy as np
import pytest

from mm_ads.data.spec import FeatureSpec
from mm_ads.export.saved_model import VECTORS_ASSET, read_vector_record
from mm_ads.serving.server.model_manager import ModelManager, dir_fingerprint
from mm_ads.serving.server.prediction_server import PredictionServer, ServerConfig
from tests.serving.server import server_helpers as h

ENCODER = "enc-test"  # the encoder version of `tiny_server_world`'s index table


def _export(spec, base, version, seed, encoder=ENCODER):
    """A version of `spec` recording the vectors of `encoder` (None: no record, as exports before the record)."""
    import keras

    from mm_ads.config import CTRModelConfig
    from mm_ads.ctr.model import build_ctr_model
    from mm_ads.export.saved_model import export_saved_model

    keras.utils.set_random_seed(seed)
    model = build_ctr_model(spec, CTRModelConfig(variant="simtier", **h.SMALL_MODEL))
    vectors = None if encoder is None else {"encoder_version": encoder, "dim": spec.vector_dim, "table": "t"}
    return export_saved_model(model, base, version=version, spec=spec, vectors=vectors)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    w = h.tiny_server_world(str(root))
    src = str(root / "src")
    _export(w["spec"], src, 1, seed=1)
    _export(w["spec"], src, 2, seed=2, encoder="enc-other")  # same dim, another encoder
    wide = FeatureSpec.default(seq_len=h.SEQ_LEN, vector_dim=2 * h.DIM, num_items=h.NUM_ITEMS,
                               num_categories=h.NUM_CATEGORIES, num_brands=h.NUM_BRANDS, num_users=h.NUM_USERS,
                               profile_buckets=(3,))
    _export(wide, src, 3, seed=3)  # the right encoder's name, twice the dim
    _export(w["spec"], src, 4, seed=4, encoder=None)  # no record: its dim is checked only
    yield dict(w, src=src)
    w["table"].close()


def _messages(caplog, text):
    return [r for r in caplog.records if text in r.getMessage()]


def test_export_records_the_encoder_of_each_vector_input(world):
    record = read_vector_record(os.path.join(world["src"], "1"))
    assert set(record["inputs"]) == {"item_vector", "hist_item_vector"}
    assert record["inputs"]["item_vector"] == {"encoder_version": ENCODER, "dim": h.DIM, "table": "t"}
    assert read_vector_record(os.path.join(world["src"], "4")) is None
    assert not any(name.endswith(".tmp") for name in os.listdir(world["src"]))


def test_a_version_that_does_not_match_the_index_table_is_refused_and_the_good_one_keeps_serving(
        world, tmp_path, caplog):
    base = tmp_path / "base"
    shutil.copytree(os.path.join(world["src"], "1"), base / "1")
    config = ServerConfig(model_base_path=str(base), grpc_port=-1, rest_port=0, poll_interval_s=60)
    server = PredictionServer(config, index_table=world["table"], catalogue=world["catalogue"], spec=world["spec"])
    with caplog.at_level(logging.INFO, logger="absl"):
        server.start()
        try:
            assert server.manager.current.version == 1
            before = server.rank(candidates=[3, 17, 42], history=[5, 9], features={"user_id": 2, "user_profile_0": 1})
            for version in (2, 3):
                shutil.copytree(os.path.join(world["src"], str(version)), base / str(version))
            assert server.manager.poll() is False  # both refused: nothing swapped
            assert server.manager.current.version == 1
            status = {s["version"]: s for s in server.manager.status()}
            assert status[1]["state"] == "AVAILABLE"
            for version, why in ((2, "input 'item_vector' was trained on vectors of encoder 'enc-other'"),
                                 (3, f"input 'item_vector' takes vectors of dim {2 * h.DIM}")):
                assert status[version]["state"] == "END"
                assert status[version]["code"] == "FAILED_PRECONDITION"
                assert why in status[version]["error"]
                assert f"holds dim {h.DIM}, encoder '{ENCODER}'" in status[version]["error"]
                logged = _messages(caplog, f"version {version} at {base / str(version)} was refused")
                assert len(logged) == 1 and logged[0].levelno == logging.ERROR
                assert why in logged[0].getMessage() and "version 1 keeps serving" in logged[0].getMessage()
            # TF Serving's status over REST names the reason
            code, body = h.rest_call(server.rest_port, "GET", "/v1/models/ctr")
            assert code == 200
            rest = {int(s["version"]): s for s in body["model_version_status"]}
            assert rest[2]["state"] == "END" and rest[2]["status"]["error_code"] == "FAILED_PRECONDITION"
            assert "enc-other" in rest[2]["status"]["error_message"]
            assert rest[1]["status"] == {"error_code": "OK", "error_message": ""}
            # ranking goes on with version 1, unchanged
            after = server.rank(candidates=[3, 17, 42], history=[5, 9], features={"user_id": 2, "user_profile_0": 1})
            assert after.version == 1
            np.testing.assert_array_equal(after.scores, before.scores)
            # refused versions are not tried again while their directories stay the same
            attempts = []
            load = server.manager._load
            server.manager._load = lambda *a: attempts.append(a[0]) or load(*a)
            for _ in range(3):
                assert server.manager.poll() is False
            assert attempts == []
            # a version without a record but of the right dim is served (its encoder cannot be checked: a warning)
            shutil.copytree(os.path.join(world["src"], "4"), base / "4")
            assert server.manager.poll() is True
            assert server.manager.current.version == 4
            assert _messages(caplog, "records no encoder version")
            assert server.rank(candidates=[3], history=[5], features={"user_id": 2, "user_profile_0": 1}).version == 4
        finally:
            server.stop()


def test_the_check_runs_without_a_feature_spec_too(world, tmp_path):
    """The check belongs to the version, not to ranking: a server given only the index table refuses as well."""
    base = tmp_path / "base"
    shutil.copytree(os.path.join(world["src"], "2"), base / "2")
    manager = ModelManager("ctr", str(base), index_table=world["table"])
    assert manager.poll() is False and manager.current is None
    assert "enc-other" in manager.waiting_message()
    # the same version under a server without an index table (Predict only) is served
    assert ModelManager("ctr", str(base)).poll() is True


def test_a_failed_version_is_retried_once_its_directory_is_repaired_in_place(world, tmp_path, caplog):
    base = tmp_path / "base"
    shutil.copytree(os.path.join(world["src"], "1"), base / "1")
    shutil.copytree(os.path.join(world["src"], "4"), base / "2")
    shard = next(p for p in (base / "2" / "variables").iterdir() if p.name.startswith("variables.data"))
    good = shard.read_bytes()
    shard.write_bytes(good[:len(good) // 2])  # a shard cut short: the version fails to load
    manager = ModelManager("ctr", str(base))
    attempts = []
    load = manager._load
    manager._load = lambda *a: attempts.append(a[0]) or load(*a)
    with caplog.at_level(logging.INFO, logger="absl"):
        assert manager.poll() is True and manager.current.version == 1  # 2 failed, 1 served
        assert attempts == [2, 1]
        status = {s["version"]: s for s in manager.status()}
        assert status[2]["state"] == "END" and status[2]["code"] == "UNKNOWN" and status[2]["error"]
        fingerprint = dir_fingerprint(str(base / "2"))
        for _ in range(5):  # unchanged: never loaded again
            assert manager.poll() is False
        assert attempts == [2, 1]
        assert dir_fingerprint(str(base / "2")) == fingerprint
        # repaired in place: the directory's own mtime and saved_model.pb do not change
        dir_mtime = os.stat(base / "2").st_mtime_ns
        shard.write_bytes(good)
        assert os.stat(base / "2").st_mtime_ns == dir_mtime
        assert dir_fingerprint(str(base / "2")) != fingerprint
        assert manager.poll() is False  # the change is seen; retried once it held for a poll
        assert attempts == [2, 1]
        assert _messages(caplog, "changed since it failed")
        assert manager.poll() is True
        assert attempts == [2, 1, 2]
        assert manager.current.version == 2
        assert [s["version"] for s in manager.status()] == [2]  # no stale END entry


def test_a_version_changing_while_it_is_copied_is_loaded_only_once_it_settles(world, tmp_path):
    base = tmp_path / "base"
    (base / "3").mkdir(parents=True)
    (base / "3" / "saved_model.pb").write_bytes(b"not yet")
    manager = ModelManager("ctr", str(base))
    attempts = []
    load = manager._load
    manager._load = lambda *a: attempts.append(a[0]) or load(*a)
    assert manager.poll() is False and attempts == [3]
    for i in range(4):  # a slow copy: the content changes between every two polls
        (base / "3" / f"part{i}").write_bytes(b"x" * (i + 1))
        assert manager.poll() is False
    assert attempts == [3]
    shutil.rmtree(base / "3")
    shutil.copytree(os.path.join(world["src"], "1"), base / "3")
    assert manager.poll() is False
    assert manager.poll() is True and attempts == [3, 3] and manager.current.version == 3


def test_a_malformed_record_refuses_the_version(world, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(os.path.join(world["src"], "1"), base / "1")
    with open(base / "1" / VECTORS_ASSET, "w") as f:
        json.dump({"inputs": []}, f)
    manager = ModelManager("ctr", str(base), index_table=world["table"])
    assert manager.poll() is False
    (entry,) = manager.status()
    assert entry["code"] == "FAILED_PRECONDITION" and VECTORS_ASSET in entry["error"]
