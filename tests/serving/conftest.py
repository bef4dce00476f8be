"""Fixtures of the serving tests: a private `redis-server` on 127.0.0.1 (random free port, temp dir).

Redis tests skip with a reason when the `redis-server` binary or redis-py is absent (`.ci/run` installs both).
The server is always killed at the end of the session.
"""

import contextlib
import os
import uuid

import pytest

from mm_ads.serving.index.redis_local import RedisUnavailable, local_redis_server


@contextlib.contextmanager
def redis_server(extra_args=()):
    """`mm_ads.serving.index.redis_local.local_redis_server`, skipping the test when Redis cannot run here."""
    try:
        with local_redis_server(extra_args) as url:
            yield url
    except RedisUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def redis_url():
    """Base URL (`redis://127.0.0.1:PORT/0`) of a private redis-server shared by the session's tests."""
    with redis_server() as url:
        yield url


@pytest.fixture
def unique_name():
    """A key prefix / stream name no other test uses on the shared server."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["sqlite", "redis"])
def table_uri(request, tmp_path, unique_name):
    """URI of a not-yet-created index table, once per backend."""
    if request.param == "sqlite":
        return os.path.join(str(tmp_path), "index.db")
    return f"{request.getfixturevalue('redis_url')}?prefix={unique_name}"


@pytest.fixture(params=["file", "redis"])
def stream_uri(request, tmp_path, unique_name):
    """URI of an empty event stream, once per backend."""
    if request.param == "file":
        return os.path.join(str(tmp_path), "events.log")
    return f"{request.getfixturevalue('redis_url')}?stream={unique_name}"


@pytest.fixture(scope="module")
def stub(server):
    """A TF Serving PredictionService client of the module's `server` fixture (gRPC on 127.0.0.1)."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()
