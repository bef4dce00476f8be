"""Fixtures of the serving tests: a private `redis-server` on 127.0.0.1 (random free port, temp dir).

Redis tests skip with a reason when the `redis-server` binary or redis-py is absent (`.ci/run` installs both).
The server is always killed at the end of the session.
"""

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import pytest


def _free_port():
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(extra_args=()):
    """Starts `redis-server` (no persistence) on a random free port; yields its base URL; always kills it."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
    try:
        import redis
    except ImportError:
        pytest.skip("redis-py is not installed (pip install 'mm_ads[serving]')")
    workdir = tempfile.mkdtemp(prefix="mm_ads_redis_")
    proc = None
    try:
        for _ in range(5):  # another process may take the free port between probing and binding
            port = _free_port()
            proc = subprocess.Popen(
                [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", workdir, "--save", "",
                 "--appendonly", "no", "--protected-mode", "yes", *extra_args],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            client = redis.Redis(host="127.0.0.1", port=port)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.02)
            client.close()
            if proc.poll() is None:
                break
            proc = None
        if proc is None:
            pytest.fail("redis-server did not start on a free port in 5 attempts")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


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
