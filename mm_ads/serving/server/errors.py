"""Errors of the prediction server, each with its gRPC status code and HTTP status.

Handlers raise these; the gRPC layer turns them into `context.abort(code, message)` and the REST
layer into `{"error": message}` with the HTTP status (TF Serving's REST error format).
"""


class ServingError(Exception):
    """Base class: `grpc_code` is a `grpc.StatusCode` name, `http_status` an HTTP status."""

    grpc_code = "INTERNAL"
    http_status = 500


class InvalidArgument(ServingError):
    """A malformed request; the message names the bad field."""

    grpc_code = "INVALID_ARGUMENT"
    http_status = 400


class NotFound(ServingError):
    """Unknown model name, version or signature."""

    grpc_code = "NOT_FOUND"
    http_status = 404


class Unavailable(ServingError):
    """No version loaded yet, or the server is shutting down."""

    grpc_code = "UNAVAILABLE"
    http_status = 503


class FailedPrecondition(ServingError):
    """The server is not configured for this call (e.g. ranking without an index table)."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 400


class ResourceExhausted(ServingError):
    """A request over a size limit (candidates, rows, body bytes)."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 413
