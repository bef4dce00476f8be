"""TF Serving's warm-up file of an export: one PredictionLog per (signature, batch size), read the way TF Serving
reads it (TFRecord + `PredictionLog.FromString`), whose requests fit their signatures and run to finite scores."""

import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from mm_ads.export.saved_model import USER_SIGNATURE, export_saved_model
from mm_ads.export.warmup import MAX_RECORDS, WARMUP_ASSET, read_warmup_logs, warmup_logs, write_warmup_file
from tests.serving.server import server_helpers as h


def tf_serving_records(version_dir):
    """The warm-up file's records as TF Serving reads them: `[(signature name, {input: ndarray})]` in file order."""
    path = os.path.join(version_dir, WARMUP_ASSET)
    out = []
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog.FromString(record)
        assert log.WhichOneof("log_type") == "predict_log"
        request = log.predict_log.request
        out.append((request.model_spec.signature_name, {k: tf.make_ndarray(v) for k, v in request.inputs.items()}))
    return out


def check_records_run(version_dir, signatures, batch_sizes, loaded=None):
    """Asserts one record per (signature, batch size), in that order, whose inputs match the signature's input specs
    in names, dtypes and shapes and give finite outputs of the batch size through `tf.saved_model.load(version_dir)`
    (`loaded`, when the caller has it)."""
    loaded = loaded or tf.saved_model.load(version_dir)
    records = tf_serving_records(version_dir)
    assert [(name, len(x["item_id"])) for name, x in records] == [(s, b) for s in signatures for b in batch_sizes]
    for name, x in records:
        fn = loaded.signatures[name]
        specs = fn.structured_input_signature[1]
        assert sorted(x) == sorted(specs)
        batch = len(x["item_id"])
        for k, spec in specs.items():
            assert x[k].dtype == spec.dtype.as_numpy_dtype, k
            want = (batch if spec.shape[0] is None else spec.shape[0],) + tuple(spec.shape[1:])
            assert x[k].shape == want, (name, k)
        out = fn(**x)
        assert out["ctr"].shape == (batch,)
        assert np.all(np.isfinite(out["ctr"].numpy())), name
    return records


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    spec = h.tiny_spec()
    base = str(tmp_path_factory.mktemp("warmup") / "export")
    model = h.export_version(spec, base, 1, seed=1)
    return dict(spec=spec, model=model, base=base, version=os.path.join(base, "1"))


def test_every_signature_has_a_record_per_batch_size_that_runs(export):
    records = check_records_run(export["version"], ["serving_default", USER_SIGNATURE], [1, 200])
    for name, x in records:
        user = export["spec"].user_side_inputs(list(x))
        for k, v in x.items():
            if name == USER_SIGNATURE and k in user:
                assert v.shape[0] == 1, k  # the user side is sent once
            if v.dtype == np.int64:
                np.testing.assert_array_equal(v, 1, err_msg=k)  # a real id, not the padding id
            elif k.endswith("_missing"):
                np.testing.assert_array_equal(v, 0, err_msg=k)
            else:
                np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1, rtol=1e-6, err_msg=k)  # unit vectors
    # compact: one value fills each input, so the file does not grow with the batch size
    assert os.path.getsize(os.path.join(export["version"], WARMUP_ASSET)) < 4096
    assert not any(d.endswith(".tmp") for d in os.listdir(export["base"]))


def test_the_batch_sizes_are_a_parameter_of_the_export(export):
    version = export_saved_model(export["model"], export["base"], version=2, warmup_batch_sizes=(3, 7))
    check_records_run(version, ["serving_default"], [3, 7])  # no FeatureSpec: serving_default only
    version = export_saved_model(export["model"], export["base"], version=3, spec=export["spec"],
                                 warmup_batch_sizes=())
    assert not os.path.exists(os.path.join(version, WARMUP_ASSET))
    assert os.path.exists(os.path.join(version, "saved_model.pb"))
    for sizes in ((0,), (2, 2), (1.5,)):
        with pytest.raises(ValueError, match="warm-up batch sizes must be"):
            export_saved_model(export["model"], export["base"], version=4, warmup_batch_sizes=sizes)
    assert sorted(os.listdir(export["base"])) == ["1", "2", "3"]  # refused before anything is written


def test_at_most_1000_records_are_written_and_read(export, tmp_path):
    specs = {"item_id": tf.TensorSpec((None,), tf.int64, name="item_id")}
    with pytest.raises(ValueError, match=r"2 signature\(s\) x 501 warm-up batch size\(s\) = 1002 records; TF "
                                         "Serving reads at most 1000"):
        warmup_logs({"a": specs, "b": specs}, range(1, 502))
    logs = warmup_logs({"a": specs, "b": specs}, range(1, 501))
    assert len(logs) == MAX_RECORDS
    path = str(tmp_path / "tf_serving_warmup_requests")
    write_warmup_file(path, logs)
    assert [log.predict_log.request.model_spec.signature_name for log in read_warmup_logs(path)] == \
        ["a"] * 500 + ["b"] * 500
    with tf.io.TFRecordWriter(path) as writer:
        for log in logs + logs[:1]:
            writer.write(log.SerializeToString())
    with pytest.raises(ValueError, match=f"warm-up file {path}: more than 1000 records"):
        read_warmup_logs(path)


def test_warm_up_values_of_inputs_without_a_feature_spec():
    from mm_ads.export.warmup import warmup_value

    assert warmup_value("x", tf.TensorSpec((None, 4), tf.float32), 2) == ((2, 4), np.float32, 0.5)
    assert warmup_value("x_missing", tf.TensorSpec((None, 3), tf.float32), 2)[2] == 0.0
    assert warmup_value("ids", tf.TensorSpec((1, 5), tf.int64), 9) == ((1, 5), np.int64, 1)
    with pytest.raises(ValueError, match=r"warm-up input 'tokens': shape \[\?, \?\] has an unknown dimension"):
        warmup_value("tokens", tf.TensorSpec((None, None), tf.int64), 2)
    with pytest.raises(ValueError, match="warm-up input 'text': no warm-up value for dtype string"):
        warmup_value("text", tf.TensorSpec((None,), tf.string), 2)
