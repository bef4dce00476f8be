"""TF Serving's SavedModel warm-up file: `<version>/assets.extra/tf_serving_warmup_requests`.

The file is a TFRecord of `tensorflow.serving.PredictionLog` protos, the format TF Serving reads when it loads a
version (https://www.tensorflow.org/tfx/serving/saved_model_warmup): it replays each record's request before the
version serves, so the first real requests do not pay for tracing and kernel set-up. At most `MAX_RECORDS`
(1000) records: TF Serving refuses a version whose file has more.

An export writes one `predict_log` record per (signature, batch size) (`warmup_logs`; one for a signature without a
variable batch dimension, such as an encoder's input-less `encoder_info`): `model_spec.signature_name`
names the signature (the model name is left empty: TF Serving ignores it in warm-up, and the file does not depend
on the name a server gives the model) and `inputs` holds one `TensorProto` per signature input, of the input's
dtype, with the batch size on the batch dimension (a fixed batch dimension, the user side of `user_candidates`,
keeps its size), written as one value that fills the shape (`warmup_tensor_proto`: a few KB at any batch size).
The values are valid ones that run the real kernels (`warmup_value`): id 1 (a real row, not the
padding id, so attention sees a full history), unit vectors (a cosine of zero vectors would divide by zero),
missing flags 0 (the vectors are there).

The prediction server (`mm_ads.serving.server.model_manager.LoadedModel.warmup`) replays the same file
(`read_warmup_logs`), with TF Serving's reading semantics: records read in order, a record that is not a
`PredictionLog` or a file that is not a TFRecord refuses the version, more than `MAX_RECORDS` refuse it, an empty
file is no warm-up.
"""

import os

import numpy as np
import tensorflow as tf

WARMUP_ASSET = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_RECORDS = 1000  # TF Serving's WarmupConsts::kMaxNumRecords
# the prediction server's default warm-up batch sizes (`ServerConfig.warmup_batch_sizes`): one row, and a ranking
# request of 200 candidates
DEFAULT_BATCH_SIZES = (1, 200)


def check_batch_sizes(batch_sizes):
    """`batch_sizes` as a tuple of distinct positive ints; `ValueError` showing the value otherwise."""
    sizes = tuple(batch_sizes)
    if any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1 for b in sizes):
        raise ValueError(f"warm-up batch sizes must be positive integers, got {batch_sizes!r}")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"warm-up batch sizes must be distinct, got {batch_sizes!r}")
    return tuple(int(b) for b in sizes)


def warmup_value(name, spec, batch_size, feature_spec=None, value=None):
    """A valid input of `spec` (a `tf.TensorSpec`) with `batch_size` rows: `(shape, numpy dtype, value)`, every
    element being `value`.

    Integer inputs (ids) are 1, or the padding id of a FeatureSpec table with one row; float inputs named like a
    missing flag (`<vector>_missing`, `mm_ads.data.spec.missing_flag_name`) or with no feature dimension are 0;
    other float inputs (vectors) are unit vectors along the last axis; bool inputs are False; string features of the
    FeatureSpec (string ids, tags) are "warm-up". A given `value` is used instead (the only way for another string
    input: a text, encoded image bytes).
    """
    dims = tuple(spec.shape)
    if not dims:
        raise ValueError(f"warm-up input {name!r}: a scalar input has no batch dimension (shape {list(dims)})")
    if any(d is None for d in dims[1:]):
        raise ValueError(f"warm-up input {name!r}: shape {_shape_str(dims)} has an unknown dimension after the batch "
                         "one; a warm-up request needs a fixed shape")
    shape = (batch_size if dims[0] is None else int(dims[0]),) + tuple(int(d) for d in dims[1:])
    dtype = tf.as_dtype(spec.dtype)
    if value is not None:
        return shape, (object if dtype == tf.string else dtype.as_numpy_dtype), value
    if dtype.is_integer:
        feature = _feature(feature_spec, name)
        value = 1
        if feature is not None and feature.is_id and feature.id_mapping == "dense" and feature.num_buckets < 2:
            value = feature.padding_id
    elif dtype.is_floating:
        value = 0.0 if name.endswith("_missing") or len(shape) < 2 else 1.0 / np.sqrt(shape[-1])
    elif dtype == tf.bool:
        value = False
    elif dtype == tf.string and _feature(feature_spec, name) is not None:
        value = b"warm-up"  # a string id or tag of the FeatureSpec: hashed into a row like any non-empty string
        return shape, object, value
    else:
        raise ValueError(f"warm-up input {name!r}: no warm-up value for dtype {dtype.name}")
    return shape, dtype.as_numpy_dtype, value


def warmup_tensor_proto(name, spec, batch_size, feature_spec=None, value=None):
    """The `TensorProto` of `warmup_value`: its shape and one typed value (`float_val`, `int64_val`, ...) that fills
    it, TF's convention for a constant tensor (what `tf.make_tensor_proto(value, shape=...)` writes; TF Serving,
    `tf.make_ndarray` and the prediction server expand it), so the file stays small at any batch size."""
    shape, dtype, value = warmup_value(name, spec, batch_size, feature_spec, value)
    return tf.make_tensor_proto(np.asarray(value, dtype), dtype=tf.as_dtype(spec.dtype), shape=shape)


def _feature(feature_spec, name):
    if feature_spec is None or name not in feature_spec:
        return None
    return feature_spec[name]


def _shape_str(shape):
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def warmup_logs(signatures, batch_sizes=DEFAULT_BATCH_SIZES, feature_spec=None, values=None):
    """The warm-up records of an export: one `PredictionLog` per (signature, batch size), in that order; a signature
    without a variable batch dimension (no inputs, or every batch dimension fixed) gets one record.

    Args:
        signatures: `{signature name: {input name: tf.TensorSpec}}` of the exported signatures.
        batch_sizes: the batch sizes of each signature's requests (distinct positive ints).
        feature_spec: the model's `FeatureSpec` (tells id and vector inputs apart, see `warmup_value`), or None.
        values: `{input name: value}` that fills those inputs instead of `warmup_value`'s defaults (needed for
            string inputs).
    """
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    sizes = check_batch_sizes(batch_sizes)
    per_signature = {name: sizes if any(s.shape.rank and s.shape[0] is None for s in specs.values()) else sizes[:1]
                     for name, specs in signatures.items()}
    count = sum(len(b) for b in per_signature.values())
    if count > MAX_RECORDS:
        raise ValueError(f"{len(signatures)} signature(s) x {len(sizes)} warm-up batch size(s) = {count} records; "
                         f"TF Serving reads at most {MAX_RECORDS}")
    values = values or {}
    logs = []
    for signature, specs in signatures.items():
        for b in per_signature[signature]:
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = signature
            for name, spec in specs.items():
                request.inputs[name].CopyFrom(warmup_tensor_proto(name, spec, b, feature_spec, values.get(name)))
            logs.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    return logs


def write_warmup_file(path, logs):
    """Writes `logs` (`PredictionLog`s) as the TFRecord file `path` (its directory is created), synced to disk."""
    if len(logs) > MAX_RECORDS:
        raise ValueError(f"{len(logs)} warm-up records; TF Serving reads at most {MAX_RECORDS}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for log in logs:
            writer.write(log.SerializeToString())
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def read_warmup_logs(path, max_records=MAX_RECORDS):
    """The `PredictionLog`s of the warm-up file `path`, in order.

    `ValueError` naming the file (and the record's index, from 0) when the file is not a TFRecord (or is
    truncated), a record is not a `PredictionLog`, or it holds more than `max_records` records (only
    `max_records + 1` are read).
    """
    from google.protobuf.message import DecodeError
    from tensorflow_serving.apis import prediction_log_pb2

    logs = []
    try:
        for index, record in enumerate(tf.data.TFRecordDataset(path).take(max_records + 1).as_numpy_iterator()):
            if index >= max_records:
                raise ValueError(f"warm-up file {path}: more than {max_records} records (TF Serving reads at most "
                                 f"{MAX_RECORDS})")
            try:
                logs.append(prediction_log_pb2.PredictionLog.FromString(record))
            except DecodeError as e:
                raise ValueError(f"warm-up file {path}: record {index} is not a PredictionLog ({e})") from None
    except tf.errors.OpError as e:  # DataLossError: not a TFRecord, a truncated or corrupted record
        raise ValueError(f"warm-up file {path}: record {len(logs)} cannot be read, the file is not a valid TFRecord "
                         f"file ({type(e).__name__}: {e.message})") from None
    return logs
