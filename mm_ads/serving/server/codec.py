"""Request/response encodings of TF Serving's APIs: `TensorProto` ↔ numpy, and the REST JSON formats.

`TensorProto`s with `tensor_content` (what `tf.make_tensor_proto` writes for arrays) are decoded with
`np.frombuffer` — a read-only view of the request bytes, no copy; protos with typed repeated fields
(`float_val`, `int64_val`, ...) with `np.fromiter`. The declared shape is validated before anything is
allocated: its size once decoded against the server's limit, and the bytes / number of values given against
it (`tensor_proto_to_ndarray`). Responses are written as `tensor_content`.

String inputs (`DT_STRING`, e.g. a hashed string id feature) come in `string_val`, one bytes value per element
(or one that fills the shape), and decode to a numpy object array of `bytes`; their size is the strings' bytes plus
`_STRING_OVERHEAD` per element. In JSON they are strings, or TF Serving's `{"b64": "..."}` for binary values.

REST (TF Serving's JSON API, https://www.tensorflow.org/tfx/serving/api_rest):
  * row format `{"signature_name": s, "instances": [{input: per-example value, ...}, ...]}` →
    `{"predictions": [...]}` (a list of values for one output, of `{output: value}` dicts otherwise);
    a signature with a single input also accepts `"instances": [value, ...]`;
  * columnar format `{"inputs": {input: batched value, ...}}` (or `"inputs": value` for one input) →
    `{"outputs": value}` for one output, `{"outputs": {output: value}}` otherwise.
JSON numbers are converted to each input's signature dtype; a non-integral number for an integer input,
a ragged list or a shape that does not match is an `InvalidArgument` naming the input.
"""

import base64
import binascii
import math

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from mm_ads.serving.server.errors import InvalidArgument, ResourceExhausted

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
_VALUE_FIELDS = {  # the TensorProto field that holds each dtype's typed values
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_INT8: "int_val",
    types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_BOOL: "bool_val",
}
MAX_RANK = 32
_STRING_OVERHEAD = 8  # bytes counted per string element on top of its bytes (a reference in the object array)


def declared_size(proto, name):
    """(shape, numpy dtype, bytes) a request `TensorProto` declares, read from its header only (nothing allocated).

    `InvalidArgument` naming `name` for an unknown rank, a negative dimension, a rank over `MAX_RANK` or a dtype the
    server does not take (float, double, int64, int32, int8, uint8, bool, string).
    """
    if proto.tensor_shape.unknown_rank:
        raise InvalidArgument(f"input {name!r}: tensor_shape has unknown rank")
    shape = tuple(int(d.size) for d in proto.tensor_shape.dim)
    if len(shape) > MAX_RANK:
        raise InvalidArgument(f"input {name!r}: tensor_shape has {len(shape)} dimensions, at most {MAX_RANK} are "
                              "accepted")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {name!r}: tensor_shape has a negative dimension {list(shape)}")
    if proto.dtype == types_pb2.DT_STRING:
        count = math.prod(shape)
        values = proto.string_val
        data = count * len(values[0]) if len(values) == 1 else sum(len(v) for v in values)
        return shape, np.dtype(object), data + count * _STRING_OVERHEAD
    dtype = _PROTO_DTYPES.get(proto.dtype)
    if dtype is None:
        accepted = ", ".join(types_pb2.DataType.Name(k) for k in (*_PROTO_DTYPES, types_pb2.DT_STRING))
        raise InvalidArgument(f"input {name!r}: dtype {_dtype_name(proto.dtype)} is not accepted (one of {accepted})")
    return shape, np.dtype(dtype), math.prod(shape) * np.dtype(dtype).itemsize


def _dtype_name(enum):
    try:
        return types_pb2.DataType.Name(enum)
    except ValueError:
        return str(enum)


def tensor_protos_to_ndarrays(protos, max_bytes):
    """Decodes the `{name: TensorProto}` inputs of a request, at most `max_bytes` in all once decoded.

    The declared shapes are checked against `max_bytes` (`ResourceExhausted`) before any tensor is decoded, so a
    small message declaring a huge shape allocates nothing.
    """
    sizes = {name: declared_size(proto, name) for name, proto in protos.items()}
    total = sum(size for _, _, size in sizes.values())
    if total > max_bytes:
        biggest = max(sizes, key=lambda k: sizes[k][2])
        shape, dtype, size = sizes[biggest]
        raise ResourceExhausted(f"the request's inputs declare {total} bytes once decoded, the limit is {max_bytes} "
                                f"bytes (input {biggest!r}: shape {list(shape)} of {dtype.name}, {size} bytes)")
    return {name: tensor_proto_to_ndarray(proto, name, max_bytes) for name, proto in protos.items()}


def tensor_proto_to_ndarray(proto, name, max_bytes=None):
    """Decodes one request `TensorProto`; `InvalidArgument` naming `name` when it is malformed.

    The declared shape is checked first: at most `max_bytes` once decoded (`ResourceExhausted`; None: no limit),
    and `tensor_content` must have exactly the bytes the shape needs; typed values (`float_val`, ...) must number
    exactly the elements of the shape, or be a single value that fills it (TF's convention, what
    `tf.make_tensor_proto(scalar, shape=...)` writes). Nothing is allocated before these checks.
    """
    shape, dtype, nbytes = declared_size(proto, name)
    if max_bytes is not None and nbytes > max_bytes:
        raise ResourceExhausted(f"input {name!r}: shape {list(shape)} of {dtype.name} is {nbytes} bytes once "
                                f"decoded, the limit is {max_bytes} bytes")
    if proto.dtype == types_pb2.DT_STRING:
        return _strings(proto, name, shape)
    count = nbytes // dtype.itemsize
    if proto.tensor_content:
        if len(proto.tensor_content) != nbytes:
            raise InvalidArgument(f"input {name!r}: tensor_content has {len(proto.tensor_content)} bytes, shape "
                                  f"{list(shape)} of {dtype.name} needs {nbytes}")
        return np.frombuffer(proto.tensor_content, dtype).reshape(shape)
    field = _VALUE_FIELDS[proto.dtype]
    others = [f.name for f, _ in proto.ListFields() if f.name.endswith("_val") and f.name != field]
    if others:
        raise InvalidArgument(f"input {name!r}: dtype {dtype.name} takes its values in {field}, got {others}")
    values = getattr(proto, field)
    given = len(values)
    try:
        if given == count:
            return (np.fromiter(values, dtype, count=count) if count else np.zeros(0, dtype)).reshape(shape)
        if given == 1:  # one value fills the shape
            return np.full(shape, values[0], dtype)
    except OverflowError as e:  # int8 / uint8 values out of range in int_val
        raise InvalidArgument(f"input {name!r}: a value in {field} is out of range for {dtype.name} ({e})") from None
    raise InvalidArgument(f"input {name!r}: {given} value(s) in {field}, shape {list(shape)} needs {count} (or a "
                          "single value that fills it)")


def _strings(proto, name, shape):
    """A `DT_STRING` proto's `string_val` → object array of bytes of `shape`."""
    count = math.prod(shape)
    if proto.tensor_content:
        raise InvalidArgument(f"input {name!r}: a string tensor takes its values in string_val, not tensor_content")
    others = [f.name for f, _ in proto.ListFields() if f.name.endswith("_val") and f.name != "string_val"]
    if others:
        raise InvalidArgument(f"input {name!r}: dtype string takes its values in string_val, got {others}")
    values = proto.string_val
    out = np.empty(count, object)
    if len(values) == count:
        out[:] = list(values)
    elif len(values) == 1:
        out[:] = values[0]
    else:
        raise InvalidArgument(f"input {name!r}: {len(values)} value(s) in string_val, shape {list(shape)} needs "
                              f"{count} (or a single value that fills it)")
    return out.reshape(shape)


def _json_strings(value, name):
    """Nested JSON lists of strings (or `{"b64": ...}` objects) → object array of bytes; None if not strings."""
    def convert(v):
        if isinstance(v, list):
            return [convert(x) for x in v]
        if isinstance(v, str):
            return v.encode("utf-8")
        if isinstance(v, dict) and set(v) == {"b64"} and isinstance(v["b64"], str):
            try:
                return base64.b64decode(v["b64"], validate=True)
            except binascii.Error:
                raise InvalidArgument(f"input {name!r}: 'b64' value is not base64") from None
        raise InvalidArgument(f"input {name!r}: expected strings, got {_describe(v)}")

    converted = convert(value)
    array = np.empty(np.shape(converted) if _rectangular(converted) else (), object)
    if array.shape == () and isinstance(converted, list):
        raise InvalidArgument(f"input {name!r}: not a rectangular array of strings")
    if array.shape == ():
        array[()] = converted
    else:
        array[...] = converted
    return array


def _rectangular(value):
    """Whether nested lists have one length per level (so `np.shape` is their shape)."""
    if not isinstance(value, list):
        return True
    if not value:
        return True
    inner = [np.shape(v) if _rectangular(v) else None for v in value]
    return all(isinstance(v, list) == isinstance(value[0], list) for v in value) and None not in inner and \
        len(set(inner)) == 1


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
    if spec.dtype == tf.string:
        return _check_shape(_json_strings(value, name), name, spec, batched)
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
    return _check_shape(array.astype(dtype, copy=False), name, spec, batched)


def _check_shape(array, name, spec, batched):
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
        signature: the `mm_ads.serving.server.model_manager.Signature` the request names.
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
