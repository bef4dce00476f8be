"""Request/response encodings of TF Serving's APIs: `TensorProto` ↔ numpy, and the REST JSON formats.

`TensorProto`s with `tensor_content` (what `tf.make_tensor_proto` writes for arrays) are decoded with
`np.frombuffer` — a read-only view of the request bytes, no copy; protos with typed repeated fields
(`float_val`, `int64_val`, ...) go through `tf.make_ndarray`. Responses are written as `tensor_content`.

REST (TF Serving's JSON API, https://www.tensorflow.org/tfx/serving/api_rest):
  * row format `{"signature_name": s, "instances": [{input: per-example value, ...}, ...]}` →
    `{"predictions": [...]}` (a list of values for one output, of `{output: value}` dicts otherwise);
    a signature with a single input also accepts `"instances": [value, ...]`;
  * columnar format `{"inputs": {input: batched value, ...}}` (or `"inputs": value` for one input) →
    `{"outputs": value}` for one output, `{"outputs": {output: value}}` otherwise.
JSON numbers are converted to each input's signature dtype; a non-integral number for an integer input,
a ragged list or a shape that does not match is an `InvalidArgument` naming the input.
"""

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from mm_ads.serving.errors import InvalidArgument

_PROTO_DTYPES = {
    types_pb2.DT_FLOAT: np.float32,
    types_pb2.DT_DOUBLE: np.float64,
    types_pb2.DT_INT64: np.int64,
    types_pb2.DT_INT32: np.int32,
    types_pb2.DT_INT8: np.int8,
    types_pb2.DT_UINT8: np.uint8,
    types_pb2.DT_BOOL: np.bool_,
}
_NP_TO_PROTO = {np.dtype(v): k for k, v in _PROTO_DTYPES.items()}


def tensor_proto_to_ndarray(proto, name):
    """Decodes one request `TensorProto`; `InvalidArgument` naming `name` when it is malformed."""
    if proto.tensor_shape.unknown_rank:
        raise InvalidArgument(f"input {name!r}: tensor_shape has unknown rank")
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {name!r}: tensor_shape has a negative dimension {list(shape)}")
    dtype = _PROTO_DTYPES.get(proto.dtype)
    if proto.tensor_content and dtype is not None:
        count = int(np.prod(shape, dtype=np.int64))
        if len(proto.tensor_content) != count * np.dtype(dtype).itemsize:
            raise InvalidArgument(f"input {name!r}: tensor_content has {len(proto.tensor_content)} bytes, shape "
                                  f"{list(shape)} of {np.dtype(dtype).name} needs {count * np.dtype(dtype).itemsize}")
        return np.frombuffer(proto.tensor_content, dtype).reshape(shape)
    try:
        return tf.make_ndarray(proto)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"input {name!r}: cannot decode TensorProto ({e})") from None


def ndarray_to_tensor_proto(array):
    """Encodes a numpy array as a `TensorProto` (`tensor_content`, like `tf.make_tensor_proto`)."""
    array = np.ascontiguousarray(array)
    dtype = _NP_TO_PROTO.get(array.dtype)
    if dtype is None:
        return tf.make_tensor_proto(array)
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d)
                                                    for d in array.shape])
    return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape, tensor_content=array.tobytes())


def json_to_array(value, name, spec, batched=True):
    """A JSON value → numpy array of the input's dtype and shape (`spec`: a `tf.TensorSpec`).

    `batched`: the value carries the batch dimension (columnar format); otherwise one example (row format).
    """
    dtype = spec.dtype.as_numpy_dtype
    try:
        array = np.asarray(value)
    except ValueError as e:  # ragged nested lists
        raise InvalidArgument(f"input {name!r}: not a rectangular array ({e})") from None
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise InvalidArgument(f"input {name!r}: expected numbers of dtype {spec.dtype.name}, got "
                              f"{_describe(value)}")
    if np.issubdtype(dtype, np.integer):
        if array.dtype.kind == "f":
            if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
                raise InvalidArgument(f"input {name!r}: expected integers ({spec.dtype.name}), got non-integral "
                                      "numbers")
        elif array.dtype.kind == "b":
            raise InvalidArgument(f"input {name!r}: expected integers ({spec.dtype.name}), got booleans")
    array = array.astype(dtype, copy=False)
    want = tuple(spec.shape) if batched else tuple(spec.shape[1:])
    if array.ndim != len(want) or any(w is not None and w != s for w, s in zip(want, array.shape)):
        shape = "[" + ", ".join("?" if d is None else str(d) for d in want) + "]"
        what = "" if batched else " per instance"
        raise InvalidArgument(f"input {name!r}: expected shape {shape}{what}, got {list(array.shape)}")
    return array


def _describe(value):
    if isinstance(value, list) and value:
        return f"a list of {type(value[0]).__name__}"
    return type(value).__name__


def parse_predict_json(body, signature):
    """A REST predict body → (`{input: array}`, "row" or "columnar").

    Args:
        body: the decoded JSON object.
        signature: the `mm_ads.serving.model_manager.Signature` the request names.
    """
    specs = signature.inputs
    has_instances, has_inputs = "instances" in body, "inputs" in body
    if has_instances == has_inputs:
        raise InvalidArgument("request body must have exactly one of 'instances' (row format) or 'inputs' "
                              "(columnar format)")
    unknown = sorted(set(body) - {"instances", "inputs", "signature_name"})
    if unknown:
        raise InvalidArgument(f"request body has unknown key(s) {unknown}")
    if has_inputs:
        value = body["inputs"]
        if not isinstance(value, dict):
            if len(specs) != 1:
                raise InvalidArgument(f"'inputs' must be an object {{input name: value}}: signature "
                                      f"{signature.name!r} has inputs {sorted(specs)}")
            value = {next(iter(specs)): value}
        _check_names(value, specs, "inputs")
        return {k: json_to_array(v, k, specs[k]) for k, v in value.items()}, "columnar"
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise InvalidArgument("'instances' must be a non-empty list")
    if not all(isinstance(x, dict) for x in instances):
        if len(specs) != 1 or any(isinstance(x, dict) for x in instances):
            raise InvalidArgument(f"'instances' must be a list of objects {{input name: value}}: signature "
                                  f"{signature.name!r} has inputs {sorted(specs)}")
        instances = [{next(iter(specs)): x} for x in instances]
    columns = {}
    for i, inst in enumerate(instances):
        _check_names(inst, specs, f"instances[{i}]")
        for k, v in inst.items():
            columns.setdefault(k, []).append(v)
    out = {}
    for k, values in columns.items():
        rows = [json_to_array(v, k, specs[k], batched=False) for v in values]
        out[k] = np.stack(rows)
    return out, "row"


def _check_names(given, specs, where):
    missing = sorted(set(specs) - set(given))
    if missing:
        raise InvalidArgument(f"{where}: missing input(s) {missing}; expected {sorted(specs)}")
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise InvalidArgument(f"{where}: unknown input(s) {unknown}; expected {sorted(specs)}")


def predict_json_response(outputs, fmt):
    """`{output: array}` → the REST response body of TF Serving for the request's format."""
    names = sorted(outputs)
    if fmt == "columnar":
        if len(names) == 1:
            return {"outputs": outputs[names[0]].tolist()}
        return {"outputs": {k: outputs[k].tolist() for k in names}}
    if len(names) == 1:
        return {"predictions": outputs[names[0]].tolist()}
    lists = {k: outputs[k].tolist() for k in names}
    batch = len(lists[names[0]])
    return {"predictions": [{k: lists[k][i] for k in names} for i in range(batch)]}
