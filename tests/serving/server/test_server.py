"""The prediction server: TF Serving's official gRPC client, REST formats, ranking by ids, errors, shutdown."""

import http.client
import json
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from mm_ads.serving.index.index_table import open_index_table
from mm_ads.serving.server.prediction_server import PredictionServer, ServerConfig
from tests.serving.server import server_helpers as h


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving_world")
    world = h.tiny_server_world(root)
    yield world
    world["table"].close()


@pytest.fixture(scope="module")
def server(world):
    config = ServerConfig(model_base_path=world["base"], grpc_port=0, rest_port=0, max_candidates=64,
                          max_body_bytes=200_000, max_grpc_message_bytes=1_000_000, poll_interval_s=30,
                          warmup_batch_sizes=(1, 4))
    srv = PredictionServer(config, world["table"], world["catalogue"], world["spec"]).start()
    yield srv
    srv.stop()


def _predict_request(x, name="ctr", signature="serving_default", version=None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for k, v in x.items():
        request.inputs[k].CopyFrom(tf.make_tensor_proto(v))
    return request


def _rest(server, method, path, body=None, raw=None, headers=None):
    return h.rest_call(server.rest_port, method, path, body, raw, headers)


# -- Predict through the official client --------------------------------------------------------------------
def test_official_grpc_client_predict_equals_in_process_model(world, server, stub):
    x = h.random_batch(world["spec"], 5, seed=3)
    response = stub.Predict(_predict_request(x), timeout=30)
    assert response.model_spec.name == "ctr"
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    got = tf.make_ndarray(response.outputs["ctr"])
    np.testing.assert_allclose(got, h.reference_scores(world, x), rtol=1e-6, atol=1e-7)
    assert got.shape == (5,) and len(set(got.round(6))) > 1  # rows differ: the inputs reach the model
    # an explicit version and output_filter, as TF Serving accepts them
    request = _predict_request(x, version=1)
    request.output_filter.append("ctr")
    np.testing.assert_allclose(tf.make_ndarray(stub.Predict(request, timeout=30).outputs["ctr"]), got, rtol=1e-6)


def test_official_grpc_client_metadata_and_status(world, server, stub):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "ctr"
    request.metadata_field.append("signature_def")
    response = stub.GetModelMetadata(request, timeout=30)
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sig_map)
    serving = sig_map.signature_def["serving_default"]
    assert set(serving.inputs) == set(world["reference"].structured_input_signature[1])
    assert set(serving.outputs) == {"ctr"}
    assert set(sig_map.signature_def["rank"].inputs) == {"item_id", "hist_item_id", "user_id", "user_profile_0",
                                                           "category_id", "brand_id"}
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        status_stub = model_service_pb2_grpc.ModelServiceStub(channel)
        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = "ctr"
        status = status_stub.GetModelStatus(req, timeout=30)
    assert [(s.version, s.state) for s in status.model_version_status] == \
        [(1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]


# -- REST ------------------------------------------------------------------------------------------------------------
def test_rest_row_and_columnar_formats_equal_in_process_model(world, server):
    x = h.random_batch(world["spec"], 3, seed=4)
    expected = h.reference_scores(world, x)
    status, columnar = _rest(server, "POST", "/v1/models/ctr:predict",
                             {"inputs": {k: v.tolist() for k, v in x.items()}})
    assert status == 200, columnar
    np.testing.assert_allclose(columnar["outputs"], expected, rtol=1e-6, atol=1e-7)
    assert columnar["model_version"] == "1"
    instances = [{k: v[i].tolist() for k, v in x.items()} for i in range(3)]
    status, row = _rest(server, "POST", "/v1/models/ctr/versions/1:predict",
                        {"signature_name": "serving_default", "instances": instances})
    assert status == 200, row
    np.testing.assert_allclose(row["predictions"], expected, rtol=1e-6, atol=1e-7)
    status, body = _rest(server, "GET", "/v1/models/ctr")
    assert status == 200
    assert body["model_version_status"] == [{"version": "1", "state": "AVAILABLE",
                                             "status": {"error_code": "OK", "error_message": ""}}]
    status, meta = _rest(server, "GET", "/v1/models/ctr/metadata")
    assert status == 200
    assert "item_vector" in meta["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]


# -- ranking by ids ----------------------------------------------------------------------------------------------------
def test_rank_equals_manual_predict_with_vectors_fetched_by_hand(world, server, stub):
    candidates = [3, 17, 42, 45, 999, 8]  # 42, 45: no vector; 999: neither vector nor catalogue entry
    history = [5, 9, 41, 2, 33, 12, 7, 11]  # longer than S=6: the last 6 are kept; 41 has no vector
    features = {"user_id": 4, "user_profile_0": 2}
    x = h.manual_rank_inputs(world["spec"], candidates, history, features, world["table"])
    expected = h.reference_scores(world, x)
    before = server.stats.snapshot()
    # the version was exported with its FeatureSpec: ranking feeds the user side once (`user_candidates`)
    assert server.ranker.signature_for(server.model("ctr")) == "user_candidates"
    result = server.rank(candidates, history, features)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-6, atol=1e-7)
    assert result.found.tolist() == [True, True, False, False, False, True]
    assert result.version == 1
    assert list(np.asarray(candidates)[result.order]) == [candidates[i] for i in np.argsort(-expected, kind="stable")]
    after = server.stats.snapshot()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta["rank_requests"] == 1 and delta["candidates"] == 6
    assert delta["candidates_unknown"] == 3  # 42, 45, 999
    assert delta["history_items"] == 6 and delta["history_unknown"] == 1  # 41 among the last 6
    assert delta["catalogue_unknown"] == 1  # 999
    status, stats = _rest(server, "GET", "/v1/stats")
    assert status == 200 and stats["model_version"] == 1
    assert stats["counters"]["candidates_unknown"] >= 3
    # REST :rank gives the same scores, and the ranking of candidate ids
    status, body = _rest(server, "POST", "/v1/models/ctr:rank",
                         {"candidates": candidates, "history": history, "user_id": 4,
                          "features": {"user_profile_0": 2}})
    assert status == 200, body
    np.testing.assert_allclose(body["scores"], expected, rtol=1e-6, atol=1e-7)
    assert body["ranking"] == [candidates[i] for i in result.order] and body["model_version"] == "1"
    # gRPC: the official client's Predict with signature_name="rank" and ids only
    ids = {"item_id": np.array(candidates, np.int64), "hist_item_id": np.array(history, np.int64),
           "user_id": np.array(4, np.int64), "user_profile_0": np.array([2], np.int64)}
    response = stub.Predict(_predict_request(ids, signature="rank"), timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["ctr"]), expected, rtol=1e-6, atol=1e-7)
    assert tf.make_ndarray(response.outputs["found"]).tolist() == result.found.tolist()
    # a short history is left-padded; candidate features given in the request override the catalogue
    x2 = h.manual_rank_inputs(world["spec"], [3, 999], [5], features, world["table"])
    x2["category_id"] = np.array([2, 3], np.int64)
    got = server.rank([3, 999], [5], features, candidate_features={"category_id": [2, 3]}).scores
    np.testing.assert_allclose(got, h.reference_scores(world, x2), rtol=1e-6, atol=1e-7)


# -- malformed requests --------------------------------------------------------------------------------------------
def _grpc_error(stub, request):
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(request, timeout=30)
    return e.value.code(), e.value.details()


def test_malformed_grpc_requests_name_the_field(world, server, stub):
    x = h.random_batch(world["spec"], 2)
    missing = {k: v for k, v in x.items() if k != "hist_item_id"}
    code, details = _grpc_error(stub, _predict_request(missing))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "hist_item_id" in details
    code, details = _grpc_error(stub, _predict_request({**x, "user_id": x["user_id"].astype(np.int32)}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "user_id" in details and "int64" in details
    code, details = _grpc_error(stub, _predict_request({**x, "item_vector": x["item_vector"][:, :3]}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "item_vector" in details
    code, details = _grpc_error(stub, _predict_request({**x, "item_id": x["item_id"][:1]}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "item_id" in details and "batch size" in details
    code, details = _grpc_error(stub, _predict_request(x, name="nope"))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
    code, _ = _grpc_error(stub, _predict_request(x, version=7))
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = _grpc_error(stub, _predict_request(x, signature="nope"))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
    code, _ = _grpc_error(stub, _predict_request(h.random_batch(world["spec"], 65)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, _ = _grpc_error(stub, _predict_request({**x, "junk": np.zeros(300_000, np.float32)}))  # 1.2 MB message
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, details = _grpc_error(stub, _predict_request({**x, "junk": np.zeros(3, np.float32)}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "junk" in details
    code, details = _grpc_error(stub, _predict_request({"item_id": np.array([1.5], np.float32)}, signature="rank"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "item_id" in details


def test_malformed_rest_requests_name_the_field(world, server):
    x = {k: v.tolist() for k, v in h.random_batch(world["spec"], 2).items()}
    status, body = _rest(server, "POST", "/v1/models/ctr:predict", raw=b"{not json")
    assert status == 400 and "JSON" in body["error"]
    status, body = _rest(server, "POST", "/v1/models/ctr:predict", {"inputs": {**x, "user_id": [1.5, 2]}})
    assert status == 400 and "user_id" in body["error"]
    status, body = _rest(server, "POST", "/v1/models/ctr:predict",
                         {"inputs": {k: v for k, v in x.items() if k != "brand_id"}})
    assert status == 400 and "brand_id" in body["error"]
    status, body = _rest(server, "POST", "/v1/models/ctr:predict",
                         {"instances": [{**{k: v[0] for k, v in x.items()}, "hist_item_id": [1, 2]}]})
    assert status == 400 and "hist_item_id" in body["error"]
    status, body = _rest(server, "POST", "/v1/models/ctr:predict", {"inputs": x, "instances": []})
    assert status == 400 and "instances" in body["error"]
    status, body = _rest(server, "POST", "/v1/models/other:predict", {"inputs": x})
    assert status == 404 and "other" in body["error"]
    status, body = _rest(server, "GET", "/v1/models/other")
    assert status == 404
    status, body = _rest(server, "POST", "/v1/models/ctr:predict", raw=b" " * 200_001)
    assert status == 413 and "200000" in body["error"]
    status, body = _rest(server, "POST", "/v1/models/ctr:rank", {"candidates": [1, "a"], "user_id": 1,
                                                                  "features": {"user_profile_0": 1}})
    assert status == 400 and "candidates" in body["error"]
    status, body = _rest(server, "POST", "/v1/models/ctr:rank", {"candidates": [1, 2]})
    assert status == 400 and "user_id" in body["error"]
    status, body = _rest(server, "POST", "/v1/models/ctr:rank",
                         {"candidates": list(range(1, 66)), "user_id": 1, "features": {"user_profile_0": 1}})
    assert status == 413 and "64" in body["error"]
    status, body = _rest(server, "POST", "/v1/models/ctr:rank",
                         {"candidates": [1], "history": [0], "user_id": 1, "features": {"user_profile_0": 1}})
    assert status == 400 and "history[0]" in body["error"]
    counters = server.stats.snapshot()
    assert counters["rest_errors_400"] >= 8 and counters["rest_errors_404"] >= 2


# -- life cycle ------------------------------------------------------------------------------------------------------
class _SlowTable:
    """An index table whose lookups take `delay` seconds (a request that is in flight during a stop)."""

    def __init__(self, table, delay):
        self.table, self.delay, self.dim = table, delay, table.dim
        self.entered = threading.Semaphore(0)

    def get_many(self, ids):
        self.entered.release()
        time.sleep(self.delay)
        return self.table.get_many(ids)


def test_stop_finishes_in_flight_requests_and_leaves_no_threads(world):
    threads_before = {t.ident for t in threading.enumerate()}
    slow = _SlowTable(world["table"], 0.0)
    config = ServerConfig(model_base_path=world["base"], grpc_port=0, rest_port=0, poll_interval_s=0.05,
                          warmup_batch_sizes=(1,), vector_cache_items=0)  # every rank call reaches the table
    server = PredictionServer(config, slow, world["catalogue"], world["spec"]).start()
    while slow.entered.acquire(blocking=False):  # the warm-up's lookups
        pass
    idle = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)  # a keep-alive connection left idle
    idle.request("GET", "/v1/models/ctr")
    assert idle.getresponse().read()
    rank = {"candidates": [3, 4], "history": [5], "user_id": 1, "features": {"user_profile_0": 1}}
    results = {}

    def rest_call():
        results["rest"] = _rest(server, "POST", "/v1/models/ctr:rank", rank)

    def grpc_call():
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            ids = {"item_id": np.array([3, 4]), "hist_item_id": np.array([5]), "user_id": np.array(1),
                   "user_profile_0": np.array(1)}
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                _predict_request(ids, signature="rank"), timeout=30)
            results["grpc"] = tf.make_ndarray(response.outputs["ctr"])

    slow.delay = 1.0
    callers = [threading.Thread(target=rest_call), threading.Thread(target=grpc_call)]
    for t in callers:
        t.start()
    assert slow.entered.acquire(timeout=30) and slow.entered.acquire(timeout=30)  # both requests are in flight
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 >= 0.5  # it waited for the requests in flight
    for t in callers:
        t.join(10)
    assert results["rest"][0] == 200 and len(results["rest"][1]["scores"]) == 2
    assert results["grpc"].shape == (2,)
    with pytest.raises(OSError):
        _rest(server, "GET", "/v1/models/ctr")
    idle.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and {t.ident for t in threading.enumerate()} - threads_before:
        time.sleep(0.05)
    assert {t.name for t in threading.enumerate() if t.ident not in threads_before} == set()


def test_entry_point_serves_ranks_and_exits_cleanly_on_sigterm(world, repo_root):
    import os
    import signal
    import subprocess
    import sys

    from mm_ads.data.dataset import Manifest
    from mm_ads.utils import io as io_utils

    data_dir = world["root"] / "data"
    data_dir.mkdir(exist_ok=True)
    h.write_catalogue(str(data_dir / "items.parquet"))
    io_utils.write_json(str(data_dir / "manifest.json"), Manifest("tiny", "synthetic", world["spec"]).to_json())
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo_root)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mm_ads.serving.server", "--flagfile=configs/serving/server.flags",
         f"--model_base_path={world['base']}", "--grpc_port=0", "--rest_port=0", f"--data_dir={data_dir}",
         f"--index_table=sqlite://{world['root'] / 'index.db'}", "--warmup_batch_sizes=1"],
        cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        ports = json.loads(line)

        class _Ports:
            rest_port = ports["rest_port"]

        candidates, history, features = [3, 42], [5, 9], {"user_id": 4, "user_profile_0": 2}
        status, body = _rest(_Ports, "POST", "/v1/models/ctr:rank",
                             {"candidates": candidates, "history": history, "features": features})
        assert status == 200, body
        x = h.manual_rank_inputs(world["spec"], candidates, history, features, world["table"])
        np.testing.assert_allclose(body["scores"], h.reference_scores(world, x), rtol=1e-6, atol=1e-7)
        status, body = _rest(_Ports, "GET", "/v1/stats")
        assert body["tf_threads"] == {"intra_op": 1, "inter_op": 0}  # the flagfile's --intra_op_threads=1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(OSError):
        _rest(_Ports, "GET", "/v1/models/ctr")


def test_tf_threads_are_set_before_the_first_op_and_refused_after_it(repo_root):
    import os
    import subprocess
    import sys

    code = """
import tensorflow as tf
from mm_ads.serving.server.prediction_server import set_tf_threads
set_tf_threads(1, 0)
assert tf.config.threading.get_intra_op_parallelism_threads() == 1
assert tf.config.threading.get_inter_op_parallelism_threads() == 0
tf.constant(1.0) + 1.0  # the runtime starts: the pools are fixed from here
for args, error in (((2, 0), RuntimeError), ((0, -1), ValueError)):
    try:
        set_tf_threads(*args)
    except error as e:
        print(type(e).__name__, e)
    else:
        raise AssertionError(args)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("RuntimeError --intra_op_threads=2: TF's thread pools are fixed"), lines
    assert lines[1] == "ValueError --inter_op_threads must be >= 0 (0: TF's default), got -1", lines


def test_readme_grpc_client_snippet_runs_against_the_server(world, server, repo_root, capsys):
    import os
    import re

    readme = open(os.path.join(repo_root, "README.md")).read()
    section = readme[readme.index("## Online serving: the prediction server"):]
    code = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "prediction_service_pb2_grpc" in b][0]
    # the tiny world has one user profile feature; the README's example is the synthetic world's three
    code = code.replace("127.0.0.1:8500", f"127.0.0.1:{server.grpc_port}")
    code = code.replace(',\n                  "user_profile_0": 3, "user_profile_1": 1, "user_profile_2": 2}',
                        ', "user_profile_0": 3}')
    assert '"user_profile_1"' not in code
    # the README's 1 s deadline is a latency-sensitive client's; a test on a loaded machine must not depend on it
    assert "timeout=1.0" in code
    code = code.replace("timeout=1.0", "timeout=60.0")
    scope = {}
    exec(code, scope)
    version, scores = capsys.readouterr().out.split(" ", 1)
    assert version == "1"
    x = h.manual_rank_inputs(world["spec"], [17, 4, 256], [5, 9, 12], {"user_id": 42, "user_profile_0": 3},
                             world["table"])
    np.testing.assert_allclose(tf.make_ndarray(scope["response"].outputs["ctr"]), h.reference_scores(world, x),
                               rtol=1e-6, atol=1e-7)
    assert "[" in scores


def test_vector_cache_serves_found_vectors_and_sees_new_and_rewritten_ones(tmp_path):
    from mm_ads.serving.server.ranking import VectorCache

    table = open_index_table(str(tmp_path / "t.db"), dim=4, encoder_version="e", create=True)
    now = [0.0]
    cache = VectorCache(table, max_items=4, ttl_s=1.0, clock=lambda: now[0])
    v = np.eye(4, dtype=np.float32)
    table.put_many([1, 2], v[:2], "e")
    got, found = cache.get_many([1, 2, 3])
    np.testing.assert_array_equal(got, np.stack([v[0], v[1], np.zeros(4)]))
    assert found.tolist() == [True, True, False] and (cache.hits, cache.misses) == (0, 3)
    table.put_many([3, 1], v[2:4], "e")  # a new item, and a rewrite of item 1
    got, found = cache.get_many([1, 3])
    assert found.tolist() == [True, True] and (cache.hits, cache.misses) == (1, 4)
    np.testing.assert_array_equal(got, np.stack([v[0], v[2]]))  # item 1 still cached, item 3 seen at once
    now[0] = 1.5  # after the TTL the rewrite shows
    np.testing.assert_array_equal(cache.get_many([1])[0], v[3:4])
    table.put_many([10, 11, 12, 13], np.ones((4, 4), np.float32), "e")
    cache.get_many([10, 11, 12, 13])
    assert len(cache) <= 4  # the size bound holds
    hits = cache.hits
    got, found = cache.get_many([13, 12, 2])  # the newest entries are kept; the oldest (item 2) was dropped
    assert found.tolist() == [True, True, True] and cache.hits == hits + 2
    np.testing.assert_array_equal(got, np.stack([np.ones(4), np.ones(4), v[1]]))
    table.close()


def test_rank_with_the_redis_index_table(world, redis_url, unique_name):
    table = h.fill_index_table(open_index_table(f"{redis_url}?prefix={unique_name}", dim=h.DIM,
                                                encoder_version="enc-test", create=True))
    config = ServerConfig(model_base_path=world["base"], grpc_port=-1, rest_port=-1, warmup_batch_sizes=(1,),
                          vector_cache_items=0)
    server = PredictionServer(config, table, world["catalogue"], world["spec"], own_index_table=True).start()
    try:
        candidates, history, features = [3, 45, 17], [2, 41, 9], {"user_id": 1, "user_profile_0": 1}
        result = server.rank(candidates, history, features)
        x = h.manual_rank_inputs(world["spec"], candidates, history, features, world["table"])  # SQLite, by hand
        np.testing.assert_allclose(result.scores, h.reference_scores(world, x), rtol=1e-6, atol=1e-7)
        assert result.found.tolist() == [True, False, True]
    finally:
        server.stop()


def test_rest_connections_over_the_limit_are_refused(world):
    config = ServerConfig(model_base_path=world["base"], grpc_port=-1, rest_port=0, warmup_batch_sizes=(1,),
                          max_rest_connections=1)
    server = PredictionServer(config).start()
    try:
        first = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
        first.request("GET", "/v1/models/ctr")
        assert first.getresponse().read()  # kept alive: the one connection allowed
        second = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            second.request("GET", "/v1/models/ctr")
            second.getresponse()
        second.close()
        assert server.stats.snapshot()["rest_connections_refused"] == 1
        first.close()
        deadline = time.monotonic() + 10
        while True:  # the closed connection's thread ends, then a new connection is served
            try:
                assert _rest(server, "GET", "/v1/models/ctr")[0] == 200
                break
            except (http.client.RemoteDisconnected, ConnectionError):
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        server.stop()


def _server_process(repo_root, *flags):
    import os
    import subprocess
    import sys

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo_root)
    return subprocess.Popen([sys.executable, "-m", "mm_ads.serving.server", "--flagfile=configs/serving/server.flags",
                             "--grpc_port=0", "--rest_port=0", *flags],
                            cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_entry_point_logs_at_info_while_it_waits_for_a_missing_base_path(tmp_path, repo_root):
    """No --verbosity: INFO lines are shown; a base path that does not exist is polled, with a heartbeat line."""
    import signal

    base = tmp_path / "not" / "yet"
    proc = _server_process(repo_root, f"--model_base_path={base}", "--poll_interval_s=0.05",
                           "--wait_log_interval_s=0.1")
    lines, seen = [], threading.Condition()

    def read():
        for line in proc.stderr:
            with seen:
                lines.append(line.rstrip("\n"))
                seen.notify_all()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    heartbeat = f"waiting for a first version: the base path {base} does not exist (yet); expecting {base}/<version>/"
    try:
        with seen:  # the first line at start, then one per --wait_log_interval_s
            assert seen.wait_for(lambda: sum(heartbeat in x for x in lines) >= 2, timeout=120), "\n".join(lines[-30:])
        assert all(x.startswith("I") for x in lines if heartbeat in x)  # absl's INFO prefix
        assert any(x.startswith("I") and "serving model 'ctr' (version none yet)" in x for x in lines)
        ports = json.loads(proc.stdout.readline())

        class _Ports:
            rest_port = ports["rest_port"]

        status, body = _rest(_Ports, "GET", "/v1/models/ctr")
        assert status == 503 and "has no version yet" in body["error"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        reader.join(timeout=30)
        assert any(x.startswith("I") and "stopping: requests in progress finish" in x for x in lines)
        assert not [x for x in lines if x.startswith("W") and "server.py" in x], lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_entry_point_names_the_command_that_creates_a_missing_index_table(world, tmp_path, repo_root):
    proc = _server_process(repo_root, f"--model_base_path={world['base']}", f"--index_table={tmp_path / 'no.db'}")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert (f"server: --index_table: {tmp_path / 'no.db'}: index table does not exist; create it from a vector "
            f"table with `python -m mm_ads.serving.index.load_index_table --index_table={tmp_path / 'no.db'} "
            "--vectors=<data_dir>/vectors/<name>.parquet`") in err, err[-3000:]
    assert "Traceback" not in err and out == ""
