"""The server warms a version up from its TF Serving warm-up file (the export's records, through the signatures
real requests use), refuses a version whose file is broken with the file and record in the reason, and falls back
to zero inputs for a version without the file."""

import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import classification_pb2, prediction_log_pb2

from mm_ads.export.warmup import WARMUP_ASSET, read_warmup_logs, write_warmup_file
from mm_ads.serving.server.model_manager import LoadedModel, ModelManager
from tests.serving.server import server_helpers as h


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    src = str(tmp_path_factory.mktemp("warmup_file") / "src")
    h.export_version(h.tiny_spec(), src, 1, seed=1)
    version = os.path.join(src, "1")
    return dict(version=version, logs=read_warmup_logs(os.path.join(version, WARMUP_ASSET)),
                model=LoadedModel("ctr", 1, version))


@pytest.fixture
def calls(monkeypatch):
    """`[(signature, batch size)]` of every `LoadedModel.predict` call, the path of real Predict requests."""
    seen = []
    predict = LoadedModel.predict

    def spy(self, inputs, signature_name=None, check=True):
        seen.append((signature_name, len(inputs["item_id"])))
        return predict(self, inputs, signature_name, check)

    monkeypatch.setattr(LoadedModel, "predict", spy)
    return seen


def _manager(base, **kwargs):
    return ModelManager("ctr", str(base), poll_interval_s=60, warmup_batch_sizes=(1, 4), **kwargs)


def test_a_version_is_warmed_up_with_the_records_of_its_file(world, tmp_path, calls, caplog):
    shutil.copytree(world["version"], tmp_path / "1")
    manager = _manager(tmp_path)
    with caplog.at_level(logging.INFO, logger="absl"):
        assert manager.poll() is True
    assert calls == [("serving_default", 1), ("serving_default", 200), ("user_candidates", 1),
                     ("user_candidates", 200)]  # the file's records, not warmup_batch_sizes
    path = str(tmp_path / "1" / WARMUP_ASSET)
    assert any(f"version 1 loaded and warmed up with 4 record(s) of {path}" in r.getMessage() for r in caplog.records)


def test_a_version_without_the_file_is_warmed_up_with_zero_inputs(world, tmp_path, calls, caplog):
    shutil.copytree(world["version"], tmp_path / "1")
    os.remove(tmp_path / "1" / WARMUP_ASSET)  # as exported before the file existed
    manager = _manager(tmp_path)
    with caplog.at_level(logging.INFO, logger="absl"):
        assert manager.poll() is True
    assert sorted(calls) == [("serving_default", 1), ("serving_default", 4), ("user_candidates", 1),
                             ("user_candidates", 4)]
    assert any("warmed up with 4 zero-input call(s): the version has no" in r.getMessage() for r in caplog.records)


def test_a_record_naming_an_unknown_signature_refuses_the_version(world, tmp_path):
    shutil.copytree(world["version"], tmp_path / "1")
    path = str(tmp_path / "1" / WARMUP_ASSET)
    logs = [prediction_log_pb2.PredictionLog.FromString(log.SerializeToString()) for log in world["logs"]]
    logs[2].predict_log.request.model_spec.signature_name = "score"
    write_warmup_file(path, logs)
    manager = _manager(tmp_path)
    assert manager.poll() is False and manager.current is None
    (status,) = manager.status()
    assert status["version"] == 1 and status["state"] == "END" and status["code"] == "UNKNOWN"
    assert f"warm-up file {path}: record 2 (signature 'score'): model 'ctr' version 1 has no signature 'score'" in \
        status["error"]


def _bad_request(logs, change):
    """A copy of the first record with `change(request)` applied."""
    log = prediction_log_pb2.PredictionLog.FromString(logs[0].SerializeToString())
    change(log.predict_log.request)
    return log


def _float_ids(request):
    request.inputs["item_id"].CopyFrom(tf.make_tensor_proto(np.ones(1, np.float32)))


def _nan_vector(request):
    request.inputs["item_vector"].CopyFrom(tf.make_tensor_proto(np.full((1, h.DIM), np.nan, np.float32)))


@pytest.mark.parametrize("records, error", [
    (lambda logs: logs[:1] + [_bad_request(logs, _float_ids)],
     r"record 1 \(signature 'serving_default'\): input 'item_id': expected dtype int64, got float32"),
    (lambda logs: [_bad_request(logs, lambda r: r.inputs.pop("item_vector"))],
     r"record 0 \(signature 'serving_default'\): signature 'serving_default': missing input\(s\) \['item_vector'\]"),
    (lambda logs: [_bad_request(logs, _nan_vector)],
     r"record 0 \(signature 'serving_default'\): input 'item_vector': has non-finite values \(nan\)"),
    (lambda logs: logs[:1] + [prediction_log_pb2.PredictionLog(
        classify_log=prediction_log_pb2.ClassifyLog(request=classification_pb2.ClassificationRequest()))],
     r"record 1 is a classify_log PredictionLog; this server warms up with predict_log records only"),
    (lambda logs: [b"\xff\xff\xff"], r"record 0 is not a PredictionLog"),
])
def test_a_broken_record_fails_the_warm_up_naming_the_file_and_the_record(world, tmp_path, records, error):
    path = str(tmp_path / "tf_serving_warmup_requests")
    with tf.io.TFRecordWriter(path) as writer:
        for record in records(world["logs"]):
            writer.write(record if isinstance(record, bytes) else record.SerializeToString())
    with pytest.raises(ValueError, match=f"warm-up file {path}: {error}"):
        world["model"].warmup_from_file(path)


def test_a_file_that_is_not_a_tfrecord_or_is_cut_short_fails_the_warm_up(world, tmp_path):
    path = str(tmp_path / "tf_serving_warmup_requests")
    write_warmup_file(path, world["logs"])
    assert world["model"].warmup_from_file(path) == 4
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-10])  # the last record cut short
    with pytest.raises(ValueError, match=f"warm-up file {path}: record 3 cannot be read, the file is not a valid "
                                         "TFRecord file"):
        world["model"].warmup_from_file(path)
    with open(path, "wb") as f:
        f.write(b"{not a tfrecord}")
    with pytest.raises(ValueError, match=f"warm-up file {path}: record 0 cannot be read"):
        world["model"].warmup_from_file(path)


def test_a_record_over_the_decoded_size_limit_fails_the_warm_up(world, tmp_path):
    path = str(tmp_path / "tf_serving_warmup_requests")
    write_warmup_file(path, world["logs"])
    with pytest.raises(ValueError, match=f"warm-up file {path}: record 1 .*the limit is 20000 bytes"):
        world["model"].warmup_from_file(path, max_decoded_bytes=20_000)  # batch 1 fits, batch 200 does not
