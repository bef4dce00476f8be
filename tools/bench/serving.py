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
* **grpc_predict** — the official client (`PredictionServiceStub.Predict`, request built with
  `tf.make_tensor_proto` once) sending the full model inputs (`hist_item_vector` is [200, 50, 128] floats,
  5 MB per request).
* **grpc_rank** — the official client's Predict with `signature_name="rank"`: ids only; the server fetches
  vectors from the index table and item features from the catalogue.
* **grpc_rank_nocache** — the same against a second server process started with `--vector_cache_items=0`
  (every request asks the SQLite index table).
* **rest_rank** — `POST /v1/models/ctr:rank` (JSON ids), keep-alive `http.client` connections.
* **rest_predict** (`--rest_predict`) — `POST :predict` with the full inputs as JSON (~10 MB of text).

Every mode runs `--repeats` times interleaved with the others for `--seconds` each (after `--warmup`
requests per thread); the table gives the median over repeats of p50/p99 latency (ms) and requests/s, the
best repeat (lowest p50, highest requests/s: the least disturbed by other processes), and the overhead
ratios p50(mode) / p50(bare), p99(mode) / p99(bare) and best p50 / best bare p50 at the same concurrency.
Client and server share the machine's cores, so throughput under concurrency includes the clients' own CPU.

```
python -m tools.bench.serving                                  # ~3 minutes on 2 cores
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
_MODES = flags.DEFINE_list("modes", ["bare", "bare_user", "grpc_predict", "grpc_rank", "grpc_rank_nocache",
                                     "rest_rank"],
                           "Modes to time.")
_REST_PREDICT = flags.DEFINE_bool("rest_predict", False, "Also time REST :predict with the full JSON inputs.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the world and the requests.")


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


def summarize(latencies, elapsed):
    return {"p50_ms": 1e3 * float(np.percentile(latencies, 50)), "p99_ms": 1e3 * float(np.percentile(latencies, 99)),
            "rps": len(latencies) / elapsed, "n": int(len(latencies))}


def main(argv):
    del argv
    import tensorflow as tf

    from mm_ads.serving.index_table import open_index_table
    from mm_ads.serving.model_manager import LoadedModel
    from mm_ads.serving.ranking import Catalogue, Ranker, RankRequest

    modes = list(_MODES.value) + (["rest_predict"] if _REST_PREDICT.value else [])
    concurrency = [int(c) for c in _CONCURRENCY.value]
    print(json.dumps({"machine": machine_info(), "candidates": _CANDIDATES.value, "seq_len": _SEQ_LEN.value,
                      "vector_dim": _VECTOR_DIM.value, "variant": _VARIANT.value}))
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
        user_inputs, full_inputs = [], []
        assert ranker.signature_for(model) == "user_candidates"
        for r in requests:
            req = RankRequest(np.asarray(r["candidates"]), np.asarray(r["history"]),
                              {"user_id": r["user_id"], **r["features"]})
            inputs, _ = ranker.build_inputs(model, req)
            user_inputs.append({k: np.asarray(v) for k, v in inputs.items()})
            n = len(r["candidates"])
            full_inputs.append({k: np.ascontiguousarray(np.broadcast_to(v, (n,) + v.shape[1:]))
                                for k, v in user_inputs[-1].items()})
        fn = model.signature("serving_default").fn
        user_fn = model.signature("user_candidates").fn
        bare_tensors = [{k: tf.constant(v) for k, v in x.items()} for x in full_inputs]
        user_tensors = [{k: tf.constant(v) for k, v in x.items()} for x in user_inputs]
        for full, one in zip(bare_tensors[:2], user_tensors[:2]):  # the two signatures agree
            np.testing.assert_allclose(fn(**full)["ctr"].numpy(), user_fn(**one)["ctr"].numpy(), atol=1e-5)
        proc, ports = start_server(world)
        proc_nocache, ports_nocache = (start_server(world, extra=["--vector_cache_items=0"])
                                       if "grpc_rank_nocache" in modes else (None, None))
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

                    if mode == "bare":
                        return lambda: fn(**nxt(bare_tensors))["ctr"].numpy()
                    if mode == "bare_user":
                        return lambda: user_fn(**nxt(user_tensors))["ctr"].numpy()
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
                        lat, elapsed = run_threads(make(mode), c, _SECONDS.value, _WARMUP.value)
                        s = summarize(lat, elapsed)
                        results.setdefault((mode, c), []).append(s)
                        print(f"  repeat {rep} c={c} {mode:13s} p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:7.2f} ms"
                              f"  {s['rps']:7.1f} req/s  (n={s['n']})", flush=True)
        finally:
            stop_server(proc)
            if proc_nocache is not None:
                stop_server(proc_nocache)
            table.close()
    print()
    # the ids-only ranking modes call `user_candidates`: their baseline is bare_user; the others' is bare
    print("| concurrency | mode | p50 ms | p99 ms | req/s | best p50 ms | best req/s | p50 / base | p99 / base "
          "| best p50 / best base | base |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for c in concurrency:
        runs = {m: results[(m, c)] for m in modes}
        med = {m: {k: statistics.median(r[k] for r in runs[m]) for k in ("p50_ms", "p99_ms", "rps")} for m in modes}
        for m in modes:
            med[m]["best_p50_ms"] = min(r["p50_ms"] for r in runs[m])
            med[m]["best_rps"] = max(r["rps"] for r in runs[m])
        for m in modes:
            base = "bare_user" if m.endswith("_rank") or m.endswith("_nocache") else "bare"
            r, b = med[m], med.get(base)
            ratios = [f"{r[k] / b[k]:.2f}" if b else "—" for k in ("p50_ms", "p99_ms", "best_p50_ms")]
            print(f"| {c} | {m} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['rps']:.0f} | {r['best_p50_ms']:.2f} | "
                  f"{r['best_rps']:.0f} | " + " | ".join(ratios) + f" | {base if b else '—'} |")
            summary[f"{m}@{c}"] = r
    print(json.dumps({"summary": summary, "load_after": os.getloadavg()}))


if __name__ == "__main__":
    app.run(main)
