"""The prediction server against hostile input: huge declared shapes, oversized or lying bodies, deep JSON, NaN,
idle and vanishing connections (issue 19). Each test runs a real server on the tiny model of `server_helpers`."""

import http.client
import json
import logging
import socket
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2

from mm_ads.serving.server import codec
from mm_ads.serving.server.errors import InvalidArgument, ResourceExhausted
from mm_ads.serving.server.prediction_server import PredictionServer, ServerConfig
from tests.serving.server import server_helpers as h

WAIT_S = 30  # generous bound of every wait on a condition


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_world")
    world = h.tiny_server_world(root)
    yield world
    world["table"].close()


def _config(world, **overrides):
    settings = dict(model_base_path=world["base"], grpc_port=0, rest_port=0, max_candidates=64,
                    max_body_bytes=200_000, max_rest_inflight_bytes=400_000, max_grpc_message_bytes=1_000_000,
                    max_decoded_bytes=4_000_000, poll_interval_s=30, warmup_batch_sizes=(1,), vector_cache_items=0)
    settings.update(overrides)
    return ServerConfig(**settings)


@pytest.fixture(scope="module")
def server(world):
    srv = PredictionServer(_config(world), world["table"], world["catalogue"], world["spec"]).start()
    yield srv
    srv.stop()


def _request(protos, signature="serving_default"):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "ctr"
    request.model_spec.signature_name = signature
    for k, v in protos.items():
        request.inputs[k].CopyFrom(v if isinstance(v, tensor_pb2.TensorProto) else tf.make_tensor_proto(v))
    return request


def _grpc_error(stub, request):
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(request, timeout=WAIT_S)
    return e.value.code(), e.value.details()


def _proto(dtype, shape, **values):
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]
    return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims), **values)


def _rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _rest(port, method, path, body=None, raw=None, headers=None):
    return h.rest_call(port, method, path, body, raw, headers, timeout=WAIT_S)


def _raw_http(port, head, body=b""):
    """Sends `head` (request line + headers, without the blank line) and `body`; returns (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, json.loads(resp.read())


# -- 1. gRPC: the declared shape is checked before anything is allocated ------------------------------------------
def test_a_tiny_grpc_request_declaring_a_huge_tensor_is_refused_without_allocating_it(server, stub):
    # 4e8 int64 elements (3.2 GB) declared with one value: what tf.make_ndarray expanded before any check
    request = _request({"item_id": _proto(types_pb2.DT_INT64, [400_000_000], int64_val=[1])})
    assert request.ByteSize() < 64
    rss = _rss_bytes()  # the server runs in this process
    t0 = time.monotonic()
    code, details = _grpc_error(stub, request)
    assert time.monotonic() - t0 < 10
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "item_id" in details and "3200000000 bytes" in details and "4000000" in details
    assert _rss_bytes() - rss < 200 << 20
    # the same declared size spread over several inputs is the request's total
    parts = {f"in{i}": _proto(types_pb2.DT_FLOAT, [400_000], float_val=[0.0]) for i in range(3)}
    code, details = _grpc_error(stub, _request(parts))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "4800000 bytes" in details


def test_grpc_tensor_protos_must_hold_what_their_shape_declares(world, server, stub):
    x = h.random_batch(world["spec"], 3, seed=5)
    cases = [  # (the bad proto of input item_id, what the error names)
        (_proto(types_pb2.DT_INT64, [3], int64_val=[1, 2]), "2 value(s) in int64_val, shape [3] needs 3"),
        (_proto(types_pb2.DT_INT64, [3], tensor_content=b"\0" * 20), "tensor_content has 20 bytes"),
        (_proto(types_pb2.DT_INT64, [3], float_val=[1, 2, 3]), "int64_val"),
        (_proto(types_pb2.DT_HALF, [3], half_val=[1, 2, 3]), "DT_HALF is not accepted"),
        # strings decode (string id features), and are refused for an int64 input
        (_proto(types_pb2.DT_STRING, [3], string_val=[b"a", b"b", b"c"]), "expected dtype int64, got string"),
        (_proto(types_pb2.DT_STRING, [3], string_val=[b"a", b"b"]), "2 value(s) in string_val, shape [3] needs 3"),
        (_proto(types_pb2.DT_INT64, [1] * 40, int64_val=[1]), "40 dimensions"),
        (_proto(types_pb2.DT_INT64, [3, -1], int64_val=[1]), "negative dimension"),
    ]
    for proto, message in cases:
        code, details = _grpc_error(stub, _request({**x, "item_id": proto}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "item_id" in details and message in details, details
    # typed values: an exact count, or one value filling the shape (tf.make_tensor_proto(scalar, shape=...))
    protos = {k: _proto(types_pb2.DT_FLOAT if v.dtype == np.float32 else types_pb2.DT_INT64, v.shape,
                        **{"float_val" if v.dtype == np.float32 else "int64_val": v.reshape(-1).tolist()})
              for k, v in x.items()}
    protos["user_id"] = tf.make_tensor_proto(np.int64(4), shape=[3])
    response = stub.Predict(_request(protos), timeout=WAIT_S)
    expected = h.reference_scores(world, {**x, "user_id": np.full(3, 4, np.int64)})
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["ctr"]), expected, rtol=1e-6, atol=1e-7)


def test_codec_decodes_typed_values_like_tf_and_checks_sizes_first():
    for array in (np.arange(6, dtype=np.int64).reshape(2, 3), np.linspace(0, 1, 4, dtype=np.float32),
                  np.array([True, False]), np.array([-3, 7], np.int8), np.zeros((0, 3), np.float64)):
        proto = tf.make_tensor_proto(array)
        field = codec._VALUE_FIELDS[proto.dtype]
        typed = _proto(proto.dtype, array.shape, **{field: array.reshape(-1).tolist()})
        for p in (proto, typed):
            got = codec.tensor_proto_to_ndarray(p, "x")
            np.testing.assert_array_equal(got, tf.make_ndarray(p))
            assert got.dtype == array.dtype and got.shape == array.shape
    with pytest.raises(ResourceExhausted, match="'x': shape \\[10, 10\\] of float32 is 400 bytes"):
        codec.tensor_proto_to_ndarray(_proto(types_pb2.DT_FLOAT, [10, 10], float_val=[1.0]), "x", max_bytes=399)
    with pytest.raises(InvalidArgument, match="out of range for int8"):
        codec.tensor_proto_to_ndarray(_proto(types_pb2.DT_INT8, [2], int_val=[1, 300]), "x")


# -- 2. REST: body size, Content-Length, bytes in flight, read deadline -------------------------------------------
def test_rest_content_length_is_checked_before_the_body_is_read(server):
    port, path = server.rest_port, "POST /v1/models/ctr:predict HTTP/1.1\r\nHost: x"
    status, body = _raw_http(port, path + "\r\nContent-Length: 1000000000")  # no body sent at all
    assert status == 413 and "1000000000" in body["error"] and "200000" in body["error"]
    status, body = _raw_http(port, path + "\r\nContent-Length: -5")
    assert status == 400 and "'-5'" in body["error"]
    status, body = _raw_http(port, path + "\r\nContent-Length: lots")
    assert status == 400 and "'lots'" in body["error"]
    status, body = _raw_http(port, path)
    assert status == 411 and "Content-Length" in body["error"]
    counters = server.stats.snapshot()
    assert counters["rest_errors_413"] >= 1 and counters["rest_errors_411"] >= 1


def test_rest_body_that_stops_arriving_gets_408_after_the_read_timeout(world):
    server = PredictionServer(_config(world, grpc_port=-1, rest_read_timeout_s=0.5)).start()
    try:
        t0 = time.monotonic()
        status, body = _raw_http(server.rest_port, "POST /v1/models/ctr:predict HTTP/1.1\r\nContent-Length: 100",
                                 b'{"inputs": ')  # 11 of 100 bytes, then nothing
        assert status == 408 and "100 bytes" in body["error"] and "0.5 s" in body["error"]
        assert time.monotonic() - t0 < WAIT_S
    finally:
        server.stop()


class _GatedTable:
    """An index table whose lookups wait for `gate` once `armed` (a rank request held in flight)."""

    def __init__(self, table):
        self.table, self.dim = table, table.dim
        self.armed, self.gate, self.entered = False, threading.Event(), threading.Event()

    def get_many(self, ids):
        if self.armed:
            self.entered.set()
            assert self.gate.wait(WAIT_S)
        return self.table.get_many(ids)


def test_rest_bodies_in_flight_are_bounded_over_all_connections(world):
    table = _GatedTable(world["table"])
    config = _config(world, grpc_port=-1, max_body_bytes=1000, max_rest_inflight_bytes=1000, rest_read_timeout_s=0.5)
    server = PredictionServer(config, table, world["catalogue"], world["spec"]).start()
    rank = {"candidates": [3, 4], "history": [5], "user_id": 1, "features": {"user_profile_0": 1}}
    padded = json.dumps(rank).encode().ljust(960)  # 960 of the 1000 bytes allowed in flight
    small = json.dumps(rank).encode()
    assert len(small) > 40  # does not fit next to the first
    try:
        table.armed = True
        results = {}
        first = threading.Thread(target=lambda: results.setdefault("first", _rest(
            server.rest_port, "POST", "/v1/models/ctr:rank", raw=padded)))
        first.start()
        assert table.entered.wait(WAIT_S)  # the first request holds 960 bytes while it is handled
        status, body = _rest(server.rest_port, "POST", "/v1/models/ctr:rank", raw=small)
        assert status == 503 and "server busy" in body["error"] and "1000 bytes" in body["error"]
        assert server.stats.snapshot()["rest_busy"] == 1
        table.gate.set()
        first.join(WAIT_S)
        assert results["first"][0] == 200
        status, body = _rest(server.rest_port, "POST", "/v1/models/ctr:rank", raw=small)  # room again
        assert status == 200 and len(body["scores"]) == 2
        assert server._rest.budget.used == 0
    finally:
        table.gate.set()
        server.stop()


class _ThreadRecordingTable:
    """An index table that records the name and id of each thread calling `get_many` (the model call's thread)."""

    def __init__(self, table):
        self.table, self.dim, self.callers = table, table.dim, []

    def get_many(self, ids):
        thread = threading.current_thread()
        self.callers.append((thread.name, thread.ident))
        return self.table.get_many(ids)


def test_rest_model_calls_run_on_a_fixed_pool_not_on_the_connection_threads(world):
    # a thread that has run the model leaves ~2 MB behind when it exits: a client opening a connection per request
    # grew the server by ~2 MB a request while the short-lived connection threads ran the model
    table = _ThreadRecordingTable(world["table"])
    config = _config(world, grpc_port=-1, rest_workers=2)
    server = PredictionServer(config, table, world["catalogue"], world["spec"]).start()
    rank = {"candidates": [3, 4], "history": [5], "user_id": 1, "features": {"user_profile_0": 1}}
    try:
        table.callers.clear()  # the warm-up ran before the server listened
        for _ in range(12):  # each on a new connection, so on a new connection thread
            status, body = _rest(server.rest_port, "POST", "/v1/models/ctr:rank", rank)
            assert status == 200 and len(body["scores"]) == 2
        x = {k: v.tolist() for k, v in h.random_batch(world["spec"], 2).items()}
        status, _ = _rest(server.rest_port, "POST", "/v1/models/ctr:predict", {"inputs": x})
        assert status == 200
    finally:
        server.stop()
    assert len(table.callers) == 12
    assert {name.split("_")[0] for name, _ in table.callers} == {"rest-model"}
    assert len({ident for _, ident in table.callers}) <= 2
    assert server._model_executor is None  # shut down by stop()


# -- 3. deep JSON, NaN and infinities -------------------------------------------------------------------------------
def test_deeply_nested_json_is_a_400(server):
    for path in ("/v1/models/ctr:predict", "/v1/models/ctr:rank"):
        status, body = _rest(server.rest_port, "POST", path, raw=b"[" * 100_000)
        assert status == 400 and "nested too deeply" in body["error"], body
        deep = b'{"inputs": {"item_id": ' + b"[" * 500 + b"1" + b"]" * 500 + b"}}"  # parses; not an array
        status, body = _rest(server.rest_port, "POST", path, raw=deep)
        assert status == 400, body
    assert "rest_errors_500" not in server.stats.snapshot()


def test_nan_and_infinite_inputs_are_refused_naming_the_input(world, server, stub):
    x = h.random_batch(world["spec"], 2, seed=9)
    columns = {k: v.tolist() for k, v in x.items()}
    for bad in ("NaN", "Infinity", "-Infinity"):
        columns["item_vector"][1][3] = "@"
        raw = json.dumps({"inputs": columns}).replace('"@"', bad).encode()
        status, body = _rest(server.rest_port, "POST", "/v1/models/ctr:predict", raw=raw)
        assert status == 400 and "item_vector" in body["error"] and "non-finite" in body["error"], body
        instances = [{k: v[i] for k, v in columns.items()} for i in range(2)]
        raw = json.dumps({"instances": instances}).replace('"@"', bad).encode()
        status, body = _rest(server.rest_port, "POST", "/v1/models/ctr:predict", raw=raw)
        assert status == 400 and "item_vector" in body["error"], body
    for value in (np.nan, np.inf):
        hist = x["hist_item_vector"].copy()
        hist[0, 2, 1] = value
        code, details = _grpc_error(stub, _request({**x, "hist_item_vector": hist}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "hist_item_vector" in details and "non-finite" in details
    with pytest.raises(InvalidArgument, match="item_vector_missing"):  # the Python API too
        server.predict({**x, "item_vector_missing": np.full_like(x["item_vector_missing"], np.nan)}, "ctr")
    status, _ = _rest(server.rest_port, "POST", "/v1/models/ctr:predict", {"inputs": columns | {
        "item_vector": x["item_vector"].tolist()}})
    assert status == 200  # finite inputs still pass


# -- 4. idle and vanishing connections ------------------------------------------------------------------------------
def _wait_for(condition):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_idle_connections_time_out_and_disconnects_leave_no_traceback(world, caplog, capfd):
    caplog.set_level(logging.DEBUG, logger="absl")
    config = _config(world, grpc_port=-1, max_rest_connections=4, rest_read_timeout_s=1.0)
    server = PredictionServer(config).start()
    port, rest = server.rest_port, server._rest
    hogs = []
    try:
        for i in range(4):  # every connection slot: two send nothing, two stop in the middle of their headers
            sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
            if i % 2:
                sock.sendall(b"POST /v1/models/ctr:predict HTTP/1.1\r\nHost: x\r\n")
            hogs.append(sock)
        _wait_for(lambda: len(rest._conns) == 4)
        t0 = time.monotonic()
        while True:  # refused while the slots are taken; served once the idle ones timed out
            try:
                status, _ = _rest(port, "GET", "/v1/models/ctr")
                break
            except (http.client.RemoteDisconnected, ConnectionError):
                assert time.monotonic() - t0 < 10, "the idle connections still hold every slot"
                time.sleep(0.05)
        assert status == 200
        assert server.stats.snapshot()["rest_connections_refused"] >= 1
        for sock in hogs:  # the server closed them: EOF
            assert sock.recv(1024) == b""
        _wait_for(lambda: not rest._conns)
        # clients that go away on their own while the server waits for their request: a close and a reset
        quiet = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        reset = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        reset.sendall(b"GET /v1/models/ctr HTTP/1.1\r\nHost: x\r\n")
        _wait_for(lambda: len(rest._conns) == 2)
        quiet.close()
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close = RST
        reset.close()
        _wait_for(lambda: not rest._conns)
        # a client that vanishes mid-body, and the handler of a broken pipe
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        sock.sendall(b"POST /v1/models/ctr:predict HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
        sock.close()
        try:
            raise BrokenPipeError(32, "Broken pipe")
        except BrokenPipeError:
            rest.handle_error(None, ("127.0.0.1", 1))
        _wait_for(lambda: any("the request body ended after 1 of 50 bytes" in r.getMessage() for r in caplog.records))
        assert server.stats.snapshot()["rest_disconnects"] >= 2  # the cut body, the pipe
    finally:
        for sock in hogs:
            sock.close()
        server.stop()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    gone = [r for r in caplog.records if "went away" in r.getMessage()]
    assert all(r.levelno == logging.DEBUG for r in gone)
    assert any("the request body ended after 1 of 50 bytes" in r.getMessage() for r in gone)
    assert any("BrokenPipeError" in r.getMessage() for r in gone)
    assert "Traceback" not in capfd.readouterr().err


def test_readme_limits_table_and_flagfile_match_the_server_defaults(repo_root):
    import dataclasses
    import os
    import re

    readme = open(os.path.join(repo_root, "README.md")).read()
    section = readme[readme.index("## Online serving: the prediction server"):]
    section = section[:section.index("\n## ", 1)]
    table = dict(re.findall(r"^\| `--(\w+)` \(([^)]*)\) \|", section, re.M))
    defaults = ServerConfig()
    limits = {f.name for f in dataclasses.fields(ServerConfig) if f.name.startswith("max_") or "timeout" in f.name}
    assert set(table) == limits
    flagfile = dict(re.findall(r"^--(\w+)=(\S+)$", open(os.path.join(repo_root, "configs/serving/server.flags")).read(),
                               re.M))
    for name, shown in table.items():
        value = getattr(defaults, name)
        number, _, unit = shown.partition(" ")
        assert float(number) * {"": 1, "MiB": 1 << 20}[unit] == value, (name, shown)
        assert float(flagfile[name]) == value, name
