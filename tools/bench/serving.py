r"""Prediction-server latency and throughput: a bare in-process SavedModel call vs the server's gRPC and REST APIs.

The request of the issue: rank `--candidates` (200) items for one user with a history of S=`--seq_len` (50)
items and D=`--vector_dim` (128) multimodal vectors. One synthetic served world is built in a temp dir: a
randomly initialised CTR model (`--variant`, the default `CTRModelConfig` sizes) exported as version 1, a
catalogue (`items.parquet`), and an SQLite index table holding vectors of 95% of the items.

The server runs as its own process (`python -m mm_ads.serving.server`, as in production); the clients are
threads of this process. Modes, each timed with `--concurrency` client threads:

* **bare** (the baseline) — `signatures["serving_default"](**inputs)` on tensors built once, in this process:
  the SavedModel's own cost on the request with the user side repeated on every candidate's row.
* **bare_user** — `signatures["user_candidates"](**inputs)`: the same request with the user side given once
  (batch 1): the model call the server's ranking makes. The ranking modes' ratios are taken against it.
* **matmul_floor** — only the matrix products that run per (candidate, history position): for every
  `DINAttention` of the model, the first attention layer's `[N, E] x [E, S·H1]` product and the
  `[N·S, H1] x [H1, H2] (+ bias)` one, on random inputs of the request's sizes, in one `tf.function`. No
  implementation of this model on TF's CPU kernels can answer more requests/s than this mode (the
  activations, the softmax and everything per candidate or per request come on top).
* **rank_inproc** — `Ranker.rank` in this process (index table behind the server's `VectorCache`, catalogue
  lookups, building the inputs, their conversion to tensors, the `user_candidates` call): the ranking call
  without the RPC, which splits the server's overhead into its in-process part and the gRPC round trip.
* **grpc_predict** — the official client (`PredictionServiceStub.Predict`, request built with
  `tf.make_tensor_proto` once) sending the full model inputs (`hist_item_vector` is [200, 50, 128] floats,
  5 MB per request).
* **grpc_rank** — the official client's Predict with `signature_name="rank"`: ids only; the server fetches
  vectors from the index table and item features from the catalogue.
* **grpc_rank_nocache** — the same against a second server process started with `--vector_cache_items=0`
  (every request asks the SQLite index table).
* **grpc_rank_2proc** (not in the default `--modes`) — `grpc_rank` against two server processes of the same flags,
  client thread i calling process i % 2 (the "several server processes" lever; serving CPU sums both).
* **rest_rank** — `POST /v1/models/ctr:rank` (JSON ids), keep-alive `http.client` connections.
* **rest_predict** (`--rest_predict`) — `POST :predict` with the full inputs as JSON (~10 MB of text).

Every mode runs `--repeats` times interleaved with the others for `--seconds` each (after `--warmup`
requests per thread); the table gives the median over repeats of p50/p99 latency (ms) and requests/s, the
best repeat (lowest p50, highest requests/s: the least disturbed by other processes), and the overhead
ratios p50 / p50(base), p99 / p99(base) and best p50 / best p50(base) at the same concurrency (base:
`bare_user` for the ranking modes and `matmul_floor`, `bare` for the others).
Client and server share the machine's cores, so throughput under concurrency includes the clients' own CPU;
the table therefore also gives the CPU time per request of the process that answers (the server process, or
this one for the in-process modes; all threads, from /proc) and of the clients: on dedicated cores,
`cores / serving CPU` bounds the requests/s. `--intra_op_threads` (default 1, the server flagfile's value)
applies to this process and to the servers, so that the bare calls run with the server's threading.

```
python -m tools.bench.serving                                  # ~8 minutes on 2 cores
python -m tools.bench.serving --concurrency=1,4 --seconds=5 --repeats=3 --rest_predict
```
"""

import json
import os
import statistics
import tempfile
import threading
import time

import numpy as np
from absl import app, flags

from tools.bench.serving_world import (
    GrpcClient,
    RestClient,
    build_world,
    machine_info,
    rank_requests,
    start_server,
    stop_server,
)

_CANDIDATES = flags.DEFINE_integer("candidates", 200, "Candidates per request.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 50, "History length S.")
_VECTOR_DIM = flags.DEFINE_integer("vector_dim", 128, "Multimodal vector dim D.")
_NUM_ITEMS = flags.DEFINE_integer("num_items", 20_000, "Items in the catalogue and the item embedding table.")
_VARIANT = flags.DEFINE_string("variant", "simtier", "CTR model variant.")
_CONCURRENCY = flags.DEFINE_list("concurrency", ["1", "4"], "Client threads per measurement.")
_SECONDS = flags.DEFINE_float("seconds", 4.0, "Timed seconds per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed requests per thread before each measurement.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Interleaved repeats of every measurement.")
_MODES = flags.DEFINE_list("modes", ["matmul_floor", "bare", "bare_user", "rank_inproc", "grpc_predict", "grpc_rank",
                                     "grpc_rank_nocache", "rest_rank"],
                           "Modes to time.")
_REST_PREDICT = flags.DEFINE_bool("rest_predict", False, "Also time REST :predict with the full JSON inputs.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the world and the requests.")
_SERVER_FLAGS = flags.DEFINE_list("server_flags", [], "Extra flags of the server processes, e.g. "
                                  "--server_flags=--grpc_workers=4.")
_INTRA_OP = flags.DEFINE_integer("intra_op_threads", 1, "TF's intra-op threads, in this process (the bare modes) "
                                 "and the servers; 1 is configs/serving/server.flags' value, 0 TF's default.")


def run_threads(make_call, concurrency, seconds, warmup):
    """Runs `concurrency` threads, each calling `make_call(thread index)()` repeatedly.

    Returns (latencies in s, elapsed s); the first failed request aborts the measurement with an error.
    """
    barrier = threading.Barrier(concurrency + 1)
    lat = [[] for _ in range(concurrency)]
    errors = []
    stop = threading.Event()

    def worker(i):
        call = make_call(i)
        try:
            for _ in range(warmup):
                call()
            barrier.wait()
            while not stop.is_set():
                t0 = time.perf_counter()
                call()
                lat[i].append(time.perf_counter() - t0)
        except Exception as e:  # a failed request ends the measurement with an error report
            errors.append(e)
            stop.set()
            try:
                barrier.abort()
            except threading.BrokenBarrierError:
                pass

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"request failed: {errors[0]!r}")
    return np.concatenate([np.asarray(x) for x in lat]), elapsed


def process_cpu_s(pid=None):
    """CPU seconds (user + system, all threads) of this process, or of process `pid` (Linux /proc)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def matmul_floor_fn(variant, spec, candidates, seq_len):
    """A `tf.function` running the per-(candidate, position) matrix products of the model's DIN attentions."""
    import tensorflow as tf

    from mm_ads.config import CTRModelConfig
    from mm_ads.ctr.model import build_ctr_model
    from mm_ads.layers.din_attention import DINAttention

    model = build_ctr_model(spec, CTRModelConfig(variant=variant))
    shapes = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, DINAttention) and layer.attention_mlp.dense_layers:
            dense = layer.attention_mlp.dense_layers
            width = dense[0].kernel.shape[0] // 4  # the kernel is [4E + F, H1] (F < 4 side features): E
            units = [d.kernel.shape[1] for d in dense]
            shapes.append((width, units))
    if not shapes:
        raise ValueError(f"variant {variant!r} has no DIN attention with hidden layers")
    rng = np.random.default_rng(0)
    consts = []
    for width, units in shapes:
        consts.append([tf.constant(rng.normal(size=(candidates, width)), tf.float32),
                       tf.constant(rng.normal(size=(width, seq_len * units[0])), tf.float32)]
                      + [(tf.constant(rng.normal(size=(a, b)), tf.float32), tf.constant(np.zeros(b), tf.float32))
                         for a, b in zip(units[:-1], units[1:])])

    @tf.function
    def floor():
        total = tf.constant(0.0)
        for query, pair_kernel, *layers in consts:
            x = tf.reshape(tf.matmul(query, pair_kernel), (candidates * seq_len, -1))
            for kernel, bias in layers:
                x = tf.nn.bias_add(tf.matmul(x, kernel), bias)
            total += x[0, 0]
        return total

    macs = sum(candidates * seq_len * (w * u[0] + sum(a * b for a, b in zip(u[:-1], u[1:]))) for w, u in shapes)
    print(f"matmul_floor: DIN attentions (E, units) {shapes}: {macs / 1e6:.1f} M multiply-adds per request")
    return floor


def summarize(latencies, elapsed):
    return {"p50_ms": 1e3 * float(np.percentile(latencies, 50)), "p99_ms": 1e3 * float(np.percentile(latencies, 99)),
            "rps": len(latencies) / elapsed, "n": int(len(latencies))}


def main(argv):
    del argv
    import tensorflow as tf

    from mm_ads.serving.index.index_table import open_index_table
    from mm_ads.serving.server.model_manager import LoadedModel
    from mm_ads.serving.server.prediction_server import set_tf_threads

    set_tf_threads(_INTRA_OP.value, 0)  # the bare calls run with the server's threading
    from mm_ads.serving.server.ranking import Catalogue, Ranker, RankRequest, VectorCache

    modes = list(_MODES.value) + (["rest_predict"] if _REST_PREDICT.value else [])
    concurrency = [int(c) for c in _CONCURRENCY.value]
    print(json.dumps({"machine": machine_info(), "candidates": _CANDIDATES.value, "seq_len": _SEQ_LEN.value,
                      "vector_dim": _VECTOR_DIM.value, "variant": _VARIANT.value,
                      "intra_op_threads": _INTRA_OP.value}))
    with tempfile.TemporaryDirectory(prefix="mm_ads_bench_serving_") as root:
        t0 = time.perf_counter()
        world = build_world(root, _NUM_ITEMS.value, _SEQ_LEN.value, _VECTOR_DIM.value, _VARIANT.value, _SEED.value)
        requests = rank_requests(16, world["num_items"], _CANDIDATES.value, _SEQ_LEN.value, _SEED.value)
        print(f"world built in {time.perf_counter() - t0:.1f} s")
        # the exact model inputs of each request, as the server builds them (for bare and grpc_predict)
        model = LoadedModel("ctr", 1, os.path.join(world["base"], "1"))
        table = open_index_table(world["index_uri"])
        ranker = Ranker(world["spec"], table, Catalogue.load(os.path.join(world["data_dir"], "items.parquet"),
                                                             ["category_id", "brand_id"]), 1000)
        inproc = Ranker(world["spec"], VectorCache(table), ranker.catalogue, 1000)
        user_inputs, full_inputs, rank_objects = [], [], []
        assert ranker.signature_for(model) == "user_candidates"
        for r in requests:
            req = RankRequest(np.asarray(r["candidates"]), np.asarray(r["history"]),
                              {"user_id": r["user_id"], **r["features"]})
            inputs, _ = ranker.build_inputs(model, req)
            rank_objects.append(req)
            user_inputs.append({k: np.asarray(v) for k, v in inputs.items()})
            n = len(r["candidates"])
            full_inputs.append({k: np.ascontiguousarray(np.broadcast_to(v, (n,) + v.shape[1:]))
                                for k, v in user_inputs[-1].items()})
        floor_fn = (matmul_floor_fn(_VARIANT.value, world["spec"], _CANDIDATES.value, _SEQ_LEN.value)
                    if "matmul_floor" in modes else None)
        fn = model.signature("serving_default").fn
        user_fn = model.signature("user_candidates").fn
        bare_tensors = [{k: tf.constant(v) for k, v in x.items()} for x in full_inputs]
        user_tensors = [{k: tf.constant(v) for k, v in x.items()} for x in user_inputs]
        for full, one in zip(bare_tensors[:2], user_tensors[:2]):  # the two signatures agree
            np.testing.assert_allclose(fn(**full)["ctr"].numpy(), user_fn(**one)["ctr"].numpy(), atol=1e-5)
        threads = [f"--intra_op_threads={_INTRA_OP.value}", *_SERVER_FLAGS.value]
        proc, ports = start_server(world, extra=threads)
        proc_nocache, ports_nocache = (start_server(world, extra=threads + ["--vector_cache_items=0"])
                                       if "grpc_rank_nocache" in modes else (None, None))
        # grpc_rank_2proc: a second server process of the same flags; client thread i calls process i % 2
        proc_second, ports_second = (start_server(world, extra=threads) if "grpc_rank_2proc" in modes
                                     else (None, None))
        try:
            grpc_predict = [GrpcClient.request(x) for x in full_inputs]
            grpc_rank = [GrpcClient.request(
                {"item_id": np.asarray(r["candidates"], np.int64), "hist_item_id": np.asarray(r["history"], np.int64),
                 "user_id": np.asarray(r["user_id"], np.int64),
                 **{k: np.asarray(v, np.int64) for k, v in r["features"].items()}}, "rank") for r in requests]
            rank_bodies = [json.dumps(r).encode() for r in requests]
            predict_bodies = [json.dumps({"inputs": {k: v.tolist() for k, v in x.items()}}).encode()
                              for x in full_inputs[:2]]
            print(f"request sizes: grpc_predict {grpc_predict[0].ByteSize() / 1e6:.2f} MB, grpc_rank "
                  f"{grpc_rank[0].ByteSize() / 1e3:.1f} kB, rest_rank {len(rank_bodies[0]) / 1e3:.1f} kB, "
                  f"rest_predict {len(predict_bodies[0]) / 1e6:.1f} MB")

            def make(mode):
                def per_thread(i):
                    k = [i]

                    def nxt(items):
                        k[0] += 1
                        return items[k[0] % len(items)]

                    if mode == "matmul_floor":
                        return lambda: floor_fn().numpy()
                    if mode == "bare":
                        return lambda: fn(**nxt(bare_tensors))["ctr"].numpy()
                    if mode == "bare_user":
                        return lambda: user_fn(**nxt(user_tensors))["ctr"].numpy()
                    if mode == "rank_inproc":
                        return lambda: inproc.rank(model, nxt(rank_objects), count=False)
                    if mode == "grpc_rank_2proc":
                        client = GrpcClient((ports, ports_second)[i % 2]["grpc_port"])
                        return lambda: client.call(nxt(grpc_rank))
                    if mode in ("grpc_predict", "grpc_rank", "grpc_rank_nocache"):
                        client = GrpcClient((ports_nocache if mode == "grpc_rank_nocache" else ports)["grpc_port"])
                        items = grpc_predict if mode == "grpc_predict" else grpc_rank
                        return lambda: client.call(nxt(items))
                    client = RestClient(ports["rest_port"])
                    if mode == "rest_rank":
                        return lambda: client.call("/v1/models/ctr:rank", nxt(rank_bodies))
                    return lambda: client.call("/v1/models/ctr:predict", nxt(predict_bodies))
                return per_thread

            results = {}
            for rep in range(_REPEATS.value):
                for c in concurrency:
                    for mode in modes:
                        server = {"grpc_rank_nocache": proc_nocache}.get(mode, proc) if mode not in (
                            "matmul_floor", "bare", "bare_user", "rank_inproc") else None
                        servers = [server] + ([proc_second] if mode == "grpc_rank_2proc" else []) if server else []

                        def server_cpu(servers=servers):
                            return sum(process_cpu_s(p.pid) for p in servers)

                        cpu0 = process_cpu_s(), server_cpu()
                        lat, elapsed = run_threads(make(mode), c, _SECONDS.value, _WARMUP.value)
                        s = summarize(lat, elapsed)
                        # CPU per request (the warm-up requests included) of the process that serves (this one
                        # for the in-process modes) and of the clients (this process, for the server modes)
                        requests = s["n"] + c * _WARMUP.value
                        own = 1e3 * (process_cpu_s() - cpu0[0]) / requests
                        s["serve_cpu_ms"] = 1e3 * (server_cpu() - cpu0[1]) / requests if server else own
                        s["client_cpu_ms"] = own if server else 0.0
                        results.setdefault((mode, c), []).append(s)
                        print(f"  repeat {rep} c={c} {mode:13s} p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:7.2f} ms"
                              f"  {s['rps']:7.1f} req/s  CPU/req serving {s['serve_cpu_ms']:.2f} ms, clients "
                              f"{s['client_cpu_ms']:.2f} ms  (n={s['n']})", flush=True)
        finally:
            stop_server(proc)
            for extra_proc in (proc_nocache, proc_second):
                if extra_proc is not None:
                    stop_server(extra_proc)
            table.close()
    print()
    # the ids-only ranking modes call `user_candidates`: their baseline is bare_user; the others' is bare
    # The ranking modes' baseline is bare_user (the call they make); the others' is bare. "serving CPU" is the
    # CPU time per request of the process that answers (the server, or this process for in-process modes):
    # on dedicated cores, `cores / serving CPU` bounds the requests/s whatever the clients cost.
    print("| concurrency | mode | p50 ms | p99 ms | req/s | best p50 ms | best req/s | p50 / base | p99 / base "
          "| best p50 / best base | serving CPU ms/req | / base | client CPU ms/req | base |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    summary = {}
    keys = ("p50_ms", "p99_ms", "rps", "serve_cpu_ms", "client_cpu_ms")
    for c in concurrency:
        runs = {m: results[(m, c)] for m in modes}
        med = {m: {k: statistics.median(r[k] for r in runs[m]) for k in keys} for m in modes}
        for m in modes:
            med[m]["best_p50_ms"] = min(r["p50_ms"] for r in runs[m])
            med[m]["best_rps"] = max(r["rps"] for r in runs[m])
        for m in modes:
            base = ("bare_user" if "_rank" in m or m in ("rank_inproc", "matmul_floor")
                    else "bare")
            r, b = med[m], med.get(base)
            ratios = [f"{r[k] / b[k]:.2f}" if b and m != base else "—"
                      for k in ("p50_ms", "p99_ms", "best_p50_ms", "serve_cpu_ms")]
            print(f"| {c} | {m} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['rps']:.0f} | {r['best_p50_ms']:.2f} | "
                  f"{r['best_rps']:.0f} | " + " | ".join(ratios[:3]) + f" | {r['serve_cpu_ms']:.2f} | {ratios[3]} | "
                  f"{r['client_cpu_ms']:.2f} | {base if b and m != base else '—'} |")
            summary[f"{m}@{c}"] = r
    print(json.dumps({"summary": summary, "load_after": os.getloadavg()}))


if __name__ == "__main__":
    app.run(main)
