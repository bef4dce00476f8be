"""Mixed good and hostile traffic against a running prediction server (no flags; `tools.bench.serving_load
--mode=soak_mixed` and its test drive it).

* `hostile_catalogue`: a fixed list of bad requests over gRPC and REST, each with the status the server must
  answer (the gRPC code name, or the HTTP status): declared tensor shapes over the decoded-size limit, value
  counts or byte counts that do not match the declared shape, wrong and unaccepted dtypes, unknown inputs,
  NaN / infinite vectors, malformed and deeply nested JSON, negative / non-numeric / oversized / missing
  Content-Length, unknown model, version, signature and route, too many candidates, the padding id as an item
  id. Unknown item ids are not an error (ids are hashed into the tables, the vector is missing): they are in
  the catalogue as `*_unknown_ids` with the expected answer 200 / OK, so that path is exercised too.
* `measure_max`: closed-loop good `rank` requests from `concurrency` threads: the throughput the server
  sustains.
* `MixedLoad.run`: open-loop (paced) requests at a fixed rate; request k is sent at `k / rate` s whether or
  not earlier ones have been answered (a worker pool sends them; a late start is measured as lag). A fixed
  fraction of the requests, evenly spaced, are hostile, drawn from seeded permutations of the catalogue (each
  kind once per pass); the others alternate gRPC `rank` and REST `:rank`. Timed events (the hot swap) and an
  RSS sampler run in the calling thread.
* `summarize`: the figures and the verdict (PASS: 0 good-request errors, every hostile request answered with
  its expected status, the swap seen in the responses and in the version status with no good request served by
  the old version after the first answer of the new one, RSS within the tolerance of its post-settle median).
"""

import dataclasses
import http.client
import json
import os
import queue
import shutil
import socket
import threading
import time

import numpy as np

from tools.bench import serving_world as bench

HUGE_ELEMENTS = 400_000_000  # a declared int64 tensor of 3.2 GB, over any sane --max_decoded_bytes


@dataclasses.dataclass(frozen=True)
class Hostile:
    """One kind of bad request: `payload` is a `PredictRequest` (gRPC) or the raw HTTP request bytes (REST)."""

    name: str
    transport: str  # "grpc" or "rest"
    expected: object  # a grpc.StatusCode name, or an HTTP status
    payload: object


# -- the catalogue --------------------------------------------------------------------------------------------------
def _proto(dtype, shape, **values):
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]
    return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims), **values)


def _predict_request(protos, model_name, signature, version=None):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for k, v in protos.items():
        request.inputs[k].CopyFrom(v if not isinstance(v, np.ndarray) else tf.make_tensor_proto(v))
    return request


def rank_arrays(request):
    """The gRPC `rank` inputs (int64 arrays) of a rank request `{"candidates", "history", "user_id", "features"}`."""
    return {"item_id": np.asarray(request["candidates"], np.int64),
            "hist_item_id": np.asarray(request["history"], np.int64),
            "user_id": np.asarray(request["user_id"], np.int64),
            **{k: np.asarray(v, np.int64) for k, v in request["features"].items()}}


def predict_batch(spec, batch, seed=0):
    """`serving_default` inputs of `batch` rows: ids in range, unit-ish vectors, no missing flag."""
    rng = np.random.default_rng(seed)
    x = {}
    for f in spec.model_features:
        shape = (batch,) + tuple(f.shape)
        if f.is_id:
            x[f.name] = rng.integers(1, f.num_buckets, shape).astype(np.int64)
        else:
            x[f.name] = np.round(rng.normal(size=shape), 3).astype(np.float32)
            x[f.name + "_missing"] = np.zeros(shape[:-1], np.float32)
    return x


def _http(method, path, body=b"", headers=None, length=True):
    """Raw HTTP/1.1 request bytes; `length`: True for the body's Content-Length, a string to lie, None for none."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", "Content-Type: application/json"]
    if length is True:
        lines.append(f"Content-Length: {len(body)}")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body if length is True else b"")


def hostile_catalogue(spec, good, model_name="ctr", max_candidates=1000, num_items=None):
    """The hostile requests (see the module docstring), built once from the FeatureSpec and one good rank request.

    Args:
        spec: the served model's `FeatureSpec` (the `serving_default` inputs of the NaN / Inf requests).
        good: a good rank request `{"candidates", "history", "user_id", "features"}`.
        model_name: the served model's name.
        max_candidates: the server's `--max_candidates`.
        num_items: ids above it are unknown (default: the item table size of `spec`).
    """
    from tensorflow.core.framework import types_pb2

    rank = rank_arrays(good)
    n = len(rank["item_id"])
    unknown_base = (num_items or spec["item_id"].num_buckets) + 1_000_000
    unknown = np.arange(unknown_base, unknown_base + n, dtype=np.int64)
    too_many = np.arange(1, max_candidates + 2, dtype=np.int64)
    x = predict_batch(spec, 1)
    nan_x = {**x, "item_vector": x["item_vector"].copy()}
    nan_x["item_vector"][0, 1] = np.nan
    inf_x = {**x, "hist_item_vector": x["hist_item_vector"].copy()}
    inf_x["hist_item_vector"][0, -1, 2] = np.inf

    def g(name, expected, protos, signature="rank", model=model_name, version=None):
        return Hostile(name, "grpc", expected, _predict_request(protos, model, signature, version))

    grpc_kinds = [
        g("grpc_huge_declared_shape", "RESOURCE_EXHAUSTED",
          {**rank, "item_id": _proto(types_pb2.DT_INT64, [HUGE_ELEMENTS], int64_val=[1])}),
        g("grpc_value_count_not_shape", "INVALID_ARGUMENT",
          {**rank, "item_id": _proto(types_pb2.DT_INT64, [n], int64_val=rank["item_id"][:-1].tolist())}),
        g("grpc_content_bytes_not_shape", "INVALID_ARGUMENT",
          {**rank, "item_id": _proto(types_pb2.DT_INT64, [n], tensor_content=rank["item_id"].tobytes()[:-4])}),
        g("grpc_negative_dimension", "INVALID_ARGUMENT",
          {**rank, "item_id": _proto(types_pb2.DT_INT64, [n, -1], int64_val=[1])}),
        g("grpc_wrong_dtype", "INVALID_ARGUMENT", {**rank, "item_id": rank["item_id"].astype(np.float32)}),
        g("grpc_string_dtype", "INVALID_ARGUMENT",
          {**rank, "item_id": _proto(types_pb2.DT_STRING, [2], string_val=[b"a", b"b"])}),
        g("grpc_unknown_input", "INVALID_ARGUMENT", {**rank, "junk": np.zeros(3, np.int64)}),
        g("grpc_nan_vector", "INVALID_ARGUMENT", nan_x, signature="serving_default"),
        g("grpc_inf_vector", "INVALID_ARGUMENT", inf_x, signature="serving_default"),
        g("grpc_unknown_model", "NOT_FOUND", rank, model="no_such_model"),
        g("grpc_unknown_signature", "NOT_FOUND", rank, signature="no_such_signature"),
        g("grpc_unknown_version", "NOT_FOUND", rank, version=999_999),
        g("grpc_too_many_candidates", "RESOURCE_EXHAUSTED", {**rank, "item_id": too_many}),
        g("grpc_padding_id", "INVALID_ARGUMENT", {**rank, "item_id": np.concatenate([rank["item_id"][:-1], [0]])}),
        g("grpc_unknown_ids", "OK", {**rank, "item_id": unknown}),
    ]
    rank_path = f"/v1/models/{model_name}:rank"
    predict_path = f"/v1/models/{model_name}:predict"

    def body(**changes):
        out = {**good, **changes}
        return json.dumps({k: v for k, v in out.items() if v is not None}).encode()

    def as_json(arrays):
        return {k: v.tolist() for k, v in arrays.items()}

    columns = as_json(x)
    columns["item_vector"][0][1] = "@"  # replaced by a bare NaN / Infinity, which json.dumps does not write
    nan_columns = json.dumps({"inputs": columns}).replace('"@"', "NaN")
    inf_rows = json.dumps({"instances": [{k: v[0] for k, v in columns.items()}]}).replace('"@"', "Infinity")
    deep_valid = b'{"candidates": ' + b"[" * 500 + b"1" + b"]" * 500 + b', "user_id": 1}'

    def r(name, expected, raw):
        return Hostile(name, "rest", expected, raw)

    rest_kinds = [
        r("rest_malformed_json", 400, _http("POST", rank_path, b'{"candidates": [1, 2')),
        r("rest_deeply_nested_json", 400, _http("POST", rank_path, b"[" * 100_000)),
        r("rest_nested_ids", 400, _http("POST", rank_path, deep_valid)),
        r("rest_nan_vector", 400, _http("POST", predict_path, nan_columns.encode())),
        r("rest_inf_vector", 400, _http("POST", predict_path, inf_rows.encode())),
        r("rest_negative_content_length", 400, _http("POST", rank_path, length="-5")),
        r("rest_non_numeric_content_length", 400, _http("POST", rank_path, length="lots")),
        r("rest_oversized_content_length", 413, _http("POST", rank_path, length=str(10 ** 12))),
        r("rest_missing_content_length", 411, _http("POST", rank_path, length=None)),
        r("rest_unknown_model", 404, _http("POST", "/v1/models/no_such_model:rank", body())),
        r("rest_unknown_version", 404, _http("POST", f"/v1/models/{model_name}/versions/999999:rank", body())),
        r("rest_unknown_route", 404, _http("POST", f"/v1/models/{model_name}:explode", body())),
        r("rest_wrong_id_type", 400, _http("POST", rank_path, body(candidates=good["candidates"][:-1] + ["a"]))),
        r("rest_unknown_key", 400, _http("POST", rank_path, body(extra=1))),
        r("rest_missing_feature", 400, _http("POST", rank_path, body(user_id=None))),
        r("rest_empty_candidates", 400, _http("POST", rank_path, body(candidates=[]))),
        r("rest_too_many_candidates", 413, _http("POST", rank_path, body(candidates=too_many.tolist()))),
        r("rest_padding_id", 400, _http("POST", rank_path, body(history=good["history"][:-1] + [0]))),
        r("rest_unknown_ids", 200, _http("POST", rank_path, body(candidates=unknown.tolist()))),
    ]
    return grpc_kinds + rest_kinds


def send_hostile(kind, stub, rest_port, timeout=10.0):
    """Sends one hostile request (REST: on a new connection); returns the gRPC code name or the HTTP status."""
    import grpc

    if kind.transport == "grpc":
        try:
            stub.Predict(kind.payload, timeout=timeout)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name
    with socket.create_connection(("127.0.0.1", rest_port), timeout=timeout) as sock:
        sock.sendall(kind.payload)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        resp.read()
        return resp.status


def is_expected(kind, observed):
    return observed == kind.expected


# -- clients --------------------------------------------------------------------------------------------------------
class _Clients:
    """One thread's gRPC channel (official stub) and keep-alive REST connection."""

    def __init__(self, ports, timeout):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.channel = grpc.insecure_channel(f"127.0.0.1:{ports['grpc_port']}", options=[
            ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.rest = bench.RestClient(ports["rest_port"], timeout=timeout)
        self.rest_port = ports["rest_port"]
        self.timeout = timeout

    def good(self, payload, use_grpc):
        """Sends a good rank request; returns the model version that answered."""
        if use_grpc:
            return self.stub.Predict(payload, timeout=self.timeout).model_spec.version.value
        return int(self.rest.call(payload[0], payload[1])["model_version"])

    def close(self):
        self.channel.close()
        self.rest.close()


def good_payloads(requests, model_name="ctr"):
    """(gRPC `rank` PredictRequests, REST `(path, body)` pairs) of rank request dicts."""
    grpc_requests = [_predict_request(rank_arrays(r), model_name, "rank") for r in requests]
    rest = [(f"/v1/models/{model_name}:rank", json.dumps(r).encode()) for r in requests]
    return grpc_requests, rest


def measure_max(ports, requests, concurrency, seconds, warmup_s=2.0, timeout=10.0, model_name="ctr"):
    """Closed-loop good `rank` requests (even threads gRPC, odd REST) for `warmup_s` + `seconds`; returns
    `{"rps", "requests", "errors", "p50_ms", "p99_ms"}` over the `seconds` after the warm-up."""
    grpc_requests, rest = good_payloads(requests, model_name)
    stop = threading.Event()
    events, lock = [], threading.Lock()

    def worker(i):
        clients = _Clients(ports, timeout)
        k = i
        try:
            while not stop.is_set():
                k += 1
                t0 = time.monotonic()
                try:
                    use_grpc = i % 2 == 0
                    clients.good(grpc_requests[k % len(grpc_requests)] if use_grpc else rest[k % len(rest)], use_grpc)
                    ok = True
                except Exception:  # counted: the probe must be error-free too
                    ok = False
                with lock:
                    events.append((t0, time.monotonic(), ok))
        finally:
            clients.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    t_start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(warmup_s + seconds)
    stop.set()
    for t in threads:
        t.join(timeout + 5)
    lo, hi = t_start + warmup_s, t_start + warmup_s + seconds
    window = [e for e in events if lo <= e[1] < hi]
    lat = np.asarray([e[1] - e[0] for e in window if e[2]])
    return {"rps": round(sum(e[2] for e in window) / seconds, 2), "requests": len(window),
            "errors": sum(not e[2] for e in window), "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99)}


def _pct(values, q):
    return round(1e3 * float(np.percentile(values, q)), 2) if len(values) else None


# -- the open-loop mixed load -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    index: int
    kind: str  # "good_grpc", "good_rest" or a hostile kind's name
    scheduled: float  # monotonic time the request was due
    start: float
    end: float
    observed: object  # good: the model version or None; hostile: the code / status received
    error: str = ""  # good: the exception, hostile: the exception when no status came back


class MixedLoad:
    """Open-loop good and hostile requests at `rate` per second (see the module docstring).

    Args:
        ports: `{"grpc_port", "rest_port"}` of the server.
        requests: good rank request dicts (sent in turn).
        hostile: the `hostile_catalogue`.
        rate: requests per second, good and hostile together.
        bad_fraction: the share of hostile requests, evenly spaced (request k is hostile when
            `floor((k + 1) f) > floor(k f)`).
        workers: threads sending the due requests (each with its own gRPC channel and REST connection).
        seed: seeds the permutations of the catalogue.
    """

    def __init__(self, ports, requests, hostile, rate, bad_fraction=0.1, workers=8, seed=0, timeout=10.0,
                 model_name="ctr"):
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        if not 0 <= bad_fraction < 1:
            raise ValueError(f"bad_fraction must be in [0, 1), got {bad_fraction}")
        self.ports, self.hostile, self.rate = ports, list(hostile), float(rate)
        self.bad_fraction, self.workers, self.timeout = float(bad_fraction), int(workers), float(timeout)
        self.grpc_requests, self.rest_requests = good_payloads(requests, model_name)
        self.rng = np.random.default_rng(seed)
        self.outcomes, self.lock = [], threading.Lock()
        self.lag_max = 0.0

    def plan(self):
        """The kinds of requests 0, 1, ...: "good_grpc" / "good_rest", or an index into the catalogue."""
        deck, good, k = [], 0, 0
        f = self.bad_fraction
        while True:
            if np.floor((k + 1) * f) > np.floor(k * f):
                if not deck:
                    deck = list(self.rng.permutation(len(self.hostile)))
                yield int(deck.pop())
            else:
                yield "good_grpc" if good % 2 == 0 else "good_rest"
                good += 1
            k += 1

    def _worker(self, jobs):
        clients = _Clients(self.ports, self.timeout)
        try:
            while True:
                job = jobs.get()
                if job is None:
                    return
                k, what, due = job
                start = time.monotonic()
                error = ""
                if isinstance(what, str):
                    payload = (self.grpc_requests[k % len(self.grpc_requests)] if what == "good_grpc" else
                               self.rest_requests[k % len(self.rest_requests)])
                    try:
                        observed = clients.good(payload, what == "good_grpc")
                    except Exception as e:  # a failed good request: the soak's first failure criterion
                        observed, error = None, f"{type(e).__name__}: {str(e)[:200]}"
                    name = what
                else:
                    kind = self.hostile[what]
                    name = kind.name
                    try:
                        observed = send_hostile(kind, clients.stub, clients.rest_port, self.timeout)
                    except Exception as e:  # no status at all (reset, timeout): a failure of this kind
                        observed, error = type(e).__name__, str(e)[:200]
                out = Outcome(k, name, due, start, time.monotonic(), observed, error)
                with self.lock:
                    self.outcomes.append(out)
        finally:
            clients.close()

    def run(self, seconds=None, max_requests=None, events=(), rss=None, sample_every_s=1.0, until=None,
            tick_s=0.02):
        """Sends requests at `rate` for `seconds` (or until `max_requests` were due), then waits for the answers.

        `events`: `[(at_s, callable)]` run in this thread when due (a callable's return value is kept); `rss`: a
        callable sampled every `sample_every_s`; `until`: a callable, requests go on at the same rate past the
        end until it returns True. Returns `{"t0", "t_sent", "events": [(at_s, t, value)], "rss": [(s, MB)],
        "outcomes": [Outcome]}`.
        """
        if seconds is None and max_requests is None:
            raise ValueError("give seconds or max_requests")
        count = max_requests if max_requests is not None else int(np.ceil(seconds * self.rate))
        if seconds is not None:
            count = min(count, int(np.ceil(seconds * self.rate)))
        plan = self.plan()
        jobs = queue.Queue()
        threads = [threading.Thread(target=self._worker, args=(jobs,), daemon=True) for _ in range(self.workers)]
        for t in threads:
            t.start()
        pending = sorted(events, key=lambda e: e[0])
        fired, samples = [], []
        t0 = time.monotonic()
        next_sample = t0
        k = 0
        try:
            while k < count or pending or (until is not None and not until()):
                now = time.monotonic()
                while t0 + k / self.rate <= now:
                    jobs.put((k, next(plan), t0 + k / self.rate))
                    k += 1
                while pending and t0 + pending[0][0] <= now:
                    at, fn = pending.pop(0)
                    fired.append((at, time.monotonic(), fn()))
                if rss is not None and now >= next_sample:
                    samples.append((round(now - t0, 2), rss()))
                    next_sample += sample_every_s
                time.sleep(tick_s)
        finally:
            t_sent = time.monotonic()
            for _ in threads:
                jobs.put(None)
            for t in threads:
                t.join(self.timeout + 30)
        if rss is not None:
            samples.append((round(time.monotonic() - t0, 2), rss()))
        return {"t0": t0, "t_sent": t_sent, "events": fired, "rss": samples,
                "outcomes": sorted(self.outcomes, key=lambda o: o.index)}


# -- the hot swap ------------------------------------------------------------------------------------------------------
def publish_version(src, base, version):
    """Copies the SavedModel directory `src` to `<base>/<version>` the way an export publishes it: into a hidden
    temp directory first, then one rename. Returns the monotonic time of the rename."""
    tmp = os.path.join(base, f".{version}.soak.tmp")
    shutil.copytree(src, tmp)
    os.rename(tmp, os.path.join(base, str(version)))
    return time.monotonic()


def rest_get(rest_port, path, timeout=10.0):
    """The decoded JSON of `GET <path>` on the server's REST port."""
    conn = http.client.HTTPConnection("127.0.0.1", rest_port, timeout=timeout)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def served_versions(rest_port, model_name="ctr", timeout=10.0):
    """`{version: state}` from `GET /v1/models/<name>` (TF Serving's model version status)."""
    body = rest_get(rest_port, f"/v1/models/{model_name}", timeout)
    return {int(s["version"]): s["state"] for s in body.get("model_version_status", [])}


def wait_for_version(rest_port, version, timeout_s, model_name="ctr", every_s=0.05):
    """Polls the status until `version` is AVAILABLE; returns the monotonic time it was seen, or None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if served_versions(rest_port, model_name).get(version) == "AVAILABLE":
            return time.monotonic()
        time.sleep(every_s)
    return None


class Swap:
    """The hot swap as a `MixedLoad.run` event: publishes `src` as `<base>/<version>` and waits (in its own thread,
    so the load keeps its pace) until the status shows the version AVAILABLE.

    Attributes: `t_published`, `t_available` (monotonic times, None until they happen), `done`.
    """

    def __init__(self, src, base, version, rest_port, timeout_s=300.0, model_name="ctr"):
        self.src, self.base, self.version, self.rest_port = src, base, int(version), rest_port
        self.timeout_s, self.model_name = timeout_s, model_name
        self.t_published = self.t_available = None
        self._thread = None

    def __call__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        self.t_published = publish_version(self.src, self.base, self.version)
        self.t_available = wait_for_version(self.rest_port, self.version, self.timeout_s, self.model_name)

    @property
    def done(self):
        return self._thread is not None and not self._thread.is_alive()

    def join(self):
        if self._thread is not None:
            self._thread.join(self.timeout_s + 10)


# -- the figures and the verdict ------------------------------------------------------------------------------------
def summarize(result, hostile, rate, old_version, new_version, t_swap=None, t_status=None, settle_s=10.0,
              rss_tolerance=0.05):
    """The report of a `MixedLoad.run` (see the module docstring); `t_swap`: the monotonic time the new version was
    published, `t_status`: when the status first showed it AVAILABLE; `new_version` None: no swap (not checked)."""
    outcomes, t0 = result["outcomes"], result["t0"]
    good = [o for o in outcomes if o.kind.startswith("good_")]
    bad = [o for o in outcomes if not o.kind.startswith("good_")]
    failed = [o for o in good if o.error]
    expected = {k.name: k.expected for k in hostile}
    by_kind = {}
    for o in bad:
        entry = by_kind.setdefault(o.kind, {"expected": expected[o.kind], "sent": 0, "received": {}})
        entry["sent"] += 1
        entry["received"][str(o.observed)] = entry["received"].get(str(o.observed), 0) + 1
    unexpected = {name: e["received"] for name, e in by_kind.items()
                  if set(e["received"]) != {str(e["expected"])}}
    server_errors = sum(n for e in by_kind.values() for code, n in e["received"].items()
                        if code.isdigit() and int(code) >= 500 or code in ("INTERNAL", "UNKNOWN", "UNAVAILABLE"))
    lat = np.asarray([o.end - o.start for o in good if not o.error])
    lat_due = np.asarray([o.end - o.scheduled for o in good if not o.error])
    elapsed = max((o.end for o in outcomes), default=t0) - t0
    sent_span = max((o.start for o in outcomes), default=t0) - t0
    report = {
        "target_rps": round(rate, 2),
        "achieved_rps": round((len(outcomes) - 1) / max(sent_span, 1e-9), 2) if len(outcomes) > 1 else None,
        "requests": len(outcomes), "elapsed_s": round(elapsed, 1),
        "max_start_lag_ms": round(1e3 * max((o.start - o.scheduled for o in outcomes), default=0.0), 1),
        "good_requests": len(good), "good_errors": len(failed),
        "good_error_samples": sorted({o.error for o in failed})[:5],
        "good_p50_ms": _pct(lat, 50), "good_p99_ms": _pct(lat, 99), "good_p99_from_due_ms": _pct(lat_due, 99),
        "hostile_requests": len(bad), "hostile_kinds": len(hostile), "hostile_kinds_sent": len(by_kind),
        "hostile_unexpected": unexpected, "hostile_5xx_or_internal": server_errors,
        "hostile_by_kind": dict(sorted(by_kind.items())),
    }
    # the swap: every good answer from the first new-version answer on is the new version
    versions = [(o.end, o.start, o.observed) for o in good if not o.error]
    first_new = min((end for end, _, v in versions if v == new_version), default=None)
    stale = sum(1 for _, start, v in versions if first_new is not None and start > first_new and v != new_version)
    report["swap"] = {
        "old_version": old_version, "new_version": new_version,
        "published_at_s": round(t_swap - t0, 1) if t_swap is not None else None,
        "first_answer_of_new_s": round(first_new - t_swap, 2) if first_new is not None and t_swap else None,
        "status_available_s": round(t_status - t_swap, 2) if t_status is not None and t_swap else None,
        "answers_by_version": {str(v): sum(1 for *_, x in versions if x == v) for v in sorted(
            {x for *_, x in versions})},
        "old_version_answers_after_first_new": stale,
        "good_errors_within_10s_of_swap": sum(1 for o in failed if t_swap is not None and abs(o.end - t_swap) < 10),
    }
    swapped = None if new_version is None else first_new is not None and t_status is not None and stale == 0
    # memory: the deviation from the median after settling
    after = [m for s, m in result["rss"] if s >= settle_s]
    rss = {"samples": len(result["rss"])}
    if after:
        median = float(np.median(after))
        dev = max(abs(m - median) for m in after) / median
        rss.update({"mb_at_settle": round(after[0], 1), "mb_end": round(after[-1], 1),
                    "mb_median_after_settle": round(median, 1), "mb_min": round(min(after), 1),
                    "mb_max": round(max(after), 1), "max_deviation_pct": round(100 * dev, 2),
                    "series_mb": [(s, round(m, 1)) for s, m in result["rss"][:: max(1, len(result["rss"]) // 20)]]})
        flat = dev <= rss_tolerance
    else:
        flat = None
    report["rss"] = rss
    checks = {"good_errors_0": not failed, "hostile_all_expected": not unexpected and server_errors == 0,
              "all_hostile_kinds_sent": len(by_kind) == len(hostile), "swapped": swapped,
              "rss_flat": flat}
    report["checks"] = checks
    report["verdict"] = "PASS" if all(v is not False for v in checks.values()) else "FAIL"
    return report


def print_summary(report):
    """A few readable lines of a `summarize` report."""
    r, s, m = report, report["swap"], report["rss"]
    lines = [
        f"rate: {r['achieved_rps']} req/s achieved, {r['target_rps']} target; {r['requests']} requests in "
        f"{r['elapsed_s']} s (max start lag {r['max_start_lag_ms']} ms)",
        f"good: {r['good_requests']} requests, {r['good_errors']} errors; p50 {r['good_p50_ms']} ms, "
        f"p99 {r['good_p99_ms']} ms",
        f"hostile: {r['hostile_requests']} requests of {r['hostile_kinds_sent']}/{r['hostile_kinds']} kinds; "
        f"unexpected answers: {r['hostile_unexpected'] or 'none'}; 5xx/INTERNAL: {r['hostile_5xx_or_internal']}",
        f"swap: version {s['old_version']} -> {s['new_version']} published at {s['published_at_s']} s; first answer "
        f"of the new version after {s['first_answer_of_new_s']} s, status AVAILABLE after {s['status_available_s']} "
        f"s; answers by version {s['answers_by_version']}; old-version answers after the first new one: "
        f"{s['old_version_answers_after_first_new']}",
    ]
    if "max_deviation_pct" in m:
        lines.append(f"RSS: {m['mb_at_settle']} MB at settle, {m['mb_end']} MB at the end, median "
                     f"{m['mb_median_after_settle']} MB, max deviation {m['max_deviation_pct']}%")
    lines.append(f"checks: {r['checks']} -> {r['verdict']}")
    print("\n".join(lines), flush=True)
