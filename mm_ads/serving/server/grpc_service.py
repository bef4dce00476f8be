"""TF Serving's gRPC API (`tensorflow.serving.PredictionService` and `ModelService`) over a `PredictionServer`.

The servicers subclass the official generated bases of `tensorflow-serving-api`, so the wire format is TF
Serving's and the official client stubs work unchanged:

  * `Predict`: `model_spec` (name, optional version, `signature_name`, default `serving_default`),
    `inputs` `{name: TensorProto}` (their declared shapes checked against `--max_decoded_bytes` before
    anything is decoded; see `mm_ads.serving.server.codec.tensor_proto_to_ndarray`), optional `output_filter`;
    the response carries the served version in `model_spec`. `signature_name="rank"` is the ids-only
    ranking call (see `mm_ads.serving.server.ranking`).
  * `GetModelMetadata` with `metadata_field=["signature_def"]`: the SavedModel's SignatureDefs (plus
    `rank` when ranking is configured).
  * `ModelService.GetModelStatus`: the version states.
  * `Classify`, `Regress`, `MultiInference`, `HandleReloadConfigRequest`: UNIMPLEMENTED (the bases' default).

Errors become gRPC status codes: malformed → INVALID_ARGUMENT, unknown model/version/signature →
NOT_FOUND, over a limit → RESOURCE_EXHAUSTED, no version loaded / shutting down → UNAVAILABLE.
"""

import functools
from concurrent import futures

import grpc
import tensorflow as tf
from absl import logging
from google.protobuf import any_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from mm_ads.serving.server.codec import ndarray_to_tensor_proto, tensor_protos_to_ndarrays
from mm_ads.serving.server.errors import InvalidArgument, NotFound, ServingError


def _rpc(kind):
    """Maps `ServingError`s (and TF's runtime argument errors) to gRPC status codes; counts calls."""

    def wrap(method):
        @functools.wraps(method)
        def handler(self, request, context):
            self.server.stats.add(**{f"grpc_{kind}": 1})
            try:
                return method(self, request, context)
            except ServingError as e:
                code = e.grpc_code
                message = str(e)
            except tf.errors.InvalidArgumentError as e:
                code, message = "INVALID_ARGUMENT", e.message
            except Exception as e:  # an unexpected failure: logged, INTERNAL to the client
                logging.exception("gRPC %s failed", kind)
                code, message = "INTERNAL", f"{type(e).__name__}: {e}"
            self.server.stats.add(**{f"grpc_errors_{code}": 1})
            context.abort(getattr(grpc.StatusCode, code), message)

        return handler

    return wrap


def _version(model_spec):
    if model_spec.version_label:
        raise NotFound(f"model {model_spec.name!r}: version labels are not supported "
                       f"(got {model_spec.version_label!r}); give a version number or none")
    return model_spec.version.value if model_spec.HasField("version") else None


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """`tensorflow.serving.PredictionService` backed by a `mm_ads.serving.server.prediction_server.PredictionServer`."""

    def __init__(self, server):
        self.server = server

    @_rpc("predict")
    def Predict(self, request, context):
        spec = request.model_spec
        inputs = tensor_protos_to_ndarrays(request.inputs, self.server.config.max_decoded_bytes)
        model, signature, outputs = self.server.predict(inputs, spec.name, _version(spec), spec.signature_name)
        if request.output_filter:
            unknown = sorted(set(request.output_filter) - set(outputs))
            if unknown:
                raise InvalidArgument(f"output_filter: unknown output(s) {unknown}; the signature has "
                                      f"{sorted(outputs)}")
            outputs = {k: outputs[k] for k in request.output_filter}
        response = predict_pb2.PredictResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.model_spec.signature_name = signature
        for name, value in outputs.items():
            response.outputs[name].CopyFrom(ndarray_to_tensor_proto(value))
        return response

    @_rpc("metadata")
    def GetModelMetadata(self, request, context):
        fields = list(request.metadata_field)
        if fields != ["signature_def"]:
            raise InvalidArgument(f"metadata_field must be ['signature_def'], got {fields}")
        model, defs = self.server.metadata(request.model_spec.name, _version(request.model_spec))
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for name, sig in defs.items():
            sig_map.signature_def[name].CopyFrom(sig)
        packed = any_pb2.Any()
        packed.Pack(sig_map)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.metadata["signature_def"].CopyFrom(packed)
        return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """`tensorflow.serving.ModelService.GetModelStatus`."""

    def __init__(self, server):
        self.server = server

    @_rpc("status")
    def GetModelStatus(self, request, context):
        response = get_model_status_pb2.GetModelStatusResponse()
        for entry in self.server.status(request.model_spec.name, _version(request.model_spec)):
            status = response.model_version_status.add()
            status.version = entry["version"]
            status.state = get_model_status_pb2.ModelVersionStatus.State.Value(entry["state"])
            if entry["error"]:
                # tensorflow.error.Code: FAILED_PRECONDITION (9) for a version refused by the index-table check,
                # INTERNAL (13) for a load failure
                status.status.error_code = 9 if entry.get("code") == "FAILED_PRECONDITION" else 13
                status.status.error_message = entry["error"]
        return response


def make_grpc_server(server, host, port, max_message_bytes, workers):
    """A started-ready `grpc.Server` (not started) with both services; returns (grpc server, bound port, executor)."""
    executor = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc-predict")
    grpc_server = grpc.server(executor, options=[
        ("grpc.max_receive_message_length", int(max_message_bytes)),
        ("grpc.max_send_message_length", int(max_message_bytes)),
        ("grpc.so_reuseport", 0),
    ])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(server), grpc_server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(server), grpc_server)
    bound = grpc_server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"gRPC: cannot bind {host}:{port}")
    return grpc_server, bound, executor
