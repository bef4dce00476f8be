"""Version watching: new versions swap in atomically under load; half-written and broken versions are never served."""

import logging
import os
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from mm_ads.serving.server.model_manager import ModelManager, incomplete_reason, version_dirs
from mm_ads.serving.server.prediction_server import PredictionServer, ServerConfig
from tests.serving.server import server_helpers as h


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two exported models (different weights) in a scratch base path, copied into the served base by tests."""
    root = tmp_path_factory.mktemp("versions")
    spec = h.tiny_spec()
    src = str(root / "src")
    h.export_version(spec, src, 1, seed=1)
    h.export_version(spec, src, 2, seed=2)
    return spec, src


def _reference(path, x):
    fn = tf.saved_model.load(path).signatures["serving_default"]
    return fn(**{k: tf.constant(v) for k, v in x.items()})["ctr"].numpy()


def _wait(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_incomplete_reason(versions, tmp_path):
    _, src = versions
    assert incomplete_reason(os.path.join(src, "1")) is None
    half = tmp_path / "half"
    shutil.copytree(os.path.join(src, "1"), half)
    shards = [f for f in os.listdir(half / "variables") if f.startswith("variables.data")]
    os.remove(half / "variables" / shards[0])
    assert "data shard" in incomplete_reason(str(half))
    os.remove(half / "saved_model.pb")
    assert incomplete_reason(str(half)) == "no saved_model.pb"
    for name in ("3", ".4.abc.tmp", "5.tmp", "0", "x"):
        os.makedirs(tmp_path / "base" / name)
    assert version_dirs(str(tmp_path / "base")) == {3: str(tmp_path / "base" / "3")}


def test_hot_swap_under_load_skips_half_written_and_broken_versions(versions, tmp_path):
    spec, src = versions
    base = tmp_path / "base"
    shutil.copytree(os.path.join(src, "1"), base / "1")
    config = ServerConfig(model_base_path=str(base), grpc_port=0, rest_port=-1, poll_interval_s=0.05,
                          warmup_batch_sizes=(1, 8))
    x = h.random_batch(spec, 8, seed=5)
    expected = {1: _reference(os.path.join(src, "1"), x), 2: _reference(os.path.join(src, "2"), x)}
    assert not np.allclose(expected[1], expected[2])
    server = PredictionServer(config).start()
    seen, errors, stop = [], [], threading.Event()

    def load():
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "ctr"
        for k, v in x.items():
            request.inputs[k].CopyFrom(tf.make_tensor_proto(v))
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not stop.is_set():
                try:
                    response = stub.Predict(request, timeout=30)
                    seen.append((response.model_spec.version.value, tf.make_ndarray(response.outputs["ctr"])))
                except grpc.RpcError as e:
                    errors.append(e)

    caller = threading.Thread(target=load)
    caller.start()
    try:
        assert _wait(lambda: len(seen) > 5)
        # a version being exported (hidden temp dir), a half-written integer dir, a broken version
        shutil.copytree(os.path.join(src, "2"), base / ".7.x1y2.tmp")
        os.makedirs(base / "5" / "variables")
        shutil.copy(os.path.join(src, "2", "saved_model.pb"), base / "5")
        shutil.copy(os.path.join(src, "2", "variables", "variables.index"), base / "5" / "variables")
        shutil.copytree(os.path.join(src, "2"), base / "4")
        with open(base / "4" / "saved_model.pb", "wb") as f:
            f.write(b"not a SavedModel")
        assert _wait(lambda: any(s["version"] == 4 and s["state"] == "END" for s in server.manager.status()))
        n = len(seen)
        assert _wait(lambda: len(seen) > n + 5)
        assert server.manager.current.version == 1
        # a complete new version: published like export_saved_model does (a rename), swapped in under load
        shutil.copytree(os.path.join(src, "2"), base / ".6.tmp")
        os.rename(base / ".6.tmp", base / "6")
        assert _wait(lambda: seen and seen[-1][0] == 6)
        n = len(seen)
        assert _wait(lambda: len(seen) > n + 5)
        # rollback: the served version's directory is deleted → the largest remaining good version
        shutil.rmtree(base / "6")
        assert _wait(lambda: seen and seen[-1][0] == 1)
    finally:
        stop.set()
        caller.join(30)
        server.stop()
    assert errors == []
    versions_seen = [v for v, _ in seen]
    assert set(versions_seen) == {1, 6}
    first6, last6 = versions_seen.index(6), len(versions_seen) - 1 - versions_seen[::-1].index(6)
    assert set(versions_seen[first6:last6 + 1]) == {6}  # one switch each way, no flapping
    for version, ctr in seen:
        np.testing.assert_allclose(ctr, expected[1 if version == 1 else 2], rtol=1e-6, atol=1e-7)
    status = {s["version"]: s for s in server.manager.status()}
    assert status[4]["state"] == "END" and "saved_model.pb" in status[4]["error"]
    assert 5 not in status and 7 not in status  # never tried: incomplete / hidden


def test_no_version_yet_is_unavailable_then_the_first_version_loads(versions, tmp_path):
    spec, src = versions
    base = tmp_path / "empty"
    manager = ModelManager("ctr", str(base), poll_interval_s=0.05).start()
    try:
        from mm_ads.serving.server.errors import NotFound, Unavailable

        with pytest.raises(Unavailable):
            manager.get("ctr")
        with pytest.raises(NotFound):
            manager.get("other")
        shutil.copytree(os.path.join(src, "2"), base / "3")
        assert _wait(lambda: manager.current is not None)
        assert manager.get("ctr").version == 3
        with pytest.raises(NotFound):
            manager.get("ctr", version=2)
    finally:
        manager.stop()


def test_waiting_for_a_first_version_logs_what_is_missing_at_info(versions, tmp_path, caplog):
    """Like TF Serving, a missing or empty base path is polled, not an error: a heartbeat line says what is missing."""
    _, src = versions
    base = tmp_path / "later" / "export"
    manager = ModelManager("ctr", str(base), poll_interval_s=0.02, wait_log_interval_s=0.05)

    def waiting(text):
        return [r for r in caplog.records if "waiting for a first version" in r.getMessage() and text in r.getMessage()]

    with caplog.at_level(logging.INFO, logger="absl"):  # the package logs through absl (INFO shown under app.run)
        manager.start()
        try:
            # the first line at start(), then one per interval (the watcher is alive and says so)
            assert _wait(lambda: len(waiting(f"the base path {base} does not exist")) >= 2), caplog.text
            line = waiting("does not exist")[0]
            assert line.levelno == logging.INFO
            assert os.path.join(str(base), "<version>", "saved_model.pb") in line.getMessage()
            base.mkdir(parents=True)
            assert _wait(lambda: waiting(f"no version directory in {base}")), caplog.text
            (base / "3").mkdir()
            (base / "5").mkdir()
            (base / "5" / "saved_model.pb").write_bytes(b"not a SavedModel")
            assert _wait(lambda: waiting("5 (failed to load: ") and waiting("3 (no saved_model.pb)")), caplog.text
            assert manager.current is None
            shutil.copytree(os.path.join(src, "1"), base / "4")  # below the broken 5: served all the same
            assert _wait(lambda: manager.current is not None)
            assert manager.current.version == 4
            served = [r for r in caplog.records if "now serving version 4" in r.getMessage()]
            assert [r.levelno for r in served] == [logging.INFO]
            before = len(waiting(""))
            manager._log_waiting(force=True)  # a version is served: nothing to wait for
            assert len(waiting("")) == before
        finally:
            manager.stop()
    with pytest.raises(ValueError, match="wait_log_interval_s must be > 0"):
        ModelManager("ctr", str(base), wait_log_interval_s=0)


def test_remove_stale_temporaries_removes_only_unfinished_exports(tmp_path):
    from mm_ads.export.saved_model import remove_stale_temporaries

    base = tmp_path / "export"
    for d in ("1", "2", ".3.ab_cd.tmp", ".12.x.tmp", ".hidden", "3.tmp", ".3.notes"):
        (base / d).mkdir(parents=True)
    (base / ".4.file.tmp").write_text("a file, not an export directory")
    assert remove_stale_temporaries(str(base)) == [".12.x.tmp", ".3.ab_cd.tmp"]
    assert sorted(os.listdir(base)) == sorted([".3.notes", ".4.file.tmp", ".hidden", "1", "2", "3.tmp"])
    assert remove_stale_temporaries(str(tmp_path / "absent")) == []


def test_a_swapped_out_version_is_freed_then_its_memory_released(versions, tmp_path):
    spec, src = versions
    base = tmp_path / "base"
    shutil.copytree(os.path.join(src, "1"), base / "1")
    calls = []
    manager = ModelManager("ctr", str(base), release_memory=lambda: calls.append(1))
    assert manager.poll() and manager.current.version == 1
    in_flight = manager.get("ctr")  # a request still running on version 1
    shutil.copytree(os.path.join(src, "2"), base / "2")
    assert manager.poll() and manager.current.version == 2
    assert not manager.poll() and calls == []  # version 1 is still in use
    del in_flight
    assert not manager.poll()
    assert calls == [1] and manager.memory_releases == 1
    assert not manager.poll() and calls == [1]  # once per swap
