"""Index table speed: batched gets and put throughput, SQLite vs Redis vs an in-memory NumPy baseline.

Fills each store with the same `--num_items` unit vectors (D=`--dim`), then measures, interleaved in one
process (each get request goes to every store, in a random order, so load bursts from other processes hit
all alike):

- `get_many` of `--get_sizes` random ids (default 200 = a ranking request's candidates, and 10,000 = a
  near-line training batch's history ids), about `--miss_rate` of them unknown: p50/p99 ms per call over
  `--calls` calls × `--repeats` rounds, after warm-up calls;
- `put_many` throughput (rows/s) at `--put_batch` rows per call (64 = an encoder-service micro-batch, and a
  bulk-load batch), each call its own committed transaction (SQLite: WAL + `synchronous=FULL`, so one fsync
  per call; Redis: one MULTI/EXEC, no persistence in the private server this benchmark starts).

The baseline is the fastest thing a single process can do: a Python dict id → row plus a NumPy array
(`dict` lookups and one fancy index per get, array writes per put), with none of the durability, sharing
between processes or encoder-version checks of the real stores. Ratios are store / baseline (≥ 1: slower).

Run from the repository root (Redis rows are left out when `redis-server` is not installed):

```
python -m tools.bench.index_table
python -m tools.bench.index_table --num_items=1000000 --backends=sqlite,numpy
```
"""

import os
import shutil
import sqlite3
import statistics
import tempfile
import time

import numpy as np
from absl import app, flags, logging

from mm_ads.serving.index.index_table import RedisIndexTable, open_index_table
from mm_ads.serving.index.redis_local import RedisUnavailable, local_redis_server
from tools.bench import machine as bench_machine

_NUM_ITEMS = flags.DEFINE_integer("num_items", 100_000, "Rows in every store.")
_DIM = flags.DEFINE_integer("dim", 128, "Vector dim D.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "int8"], "Storage dtypes of the real stores.")
_BACKENDS = flags.DEFINE_list("backends", ["numpy", "sqlite", "redis"], "Stores to measure.")
_GET_SIZES = flags.DEFINE_list("get_sizes", ["200", "10000"], "Ids per get_many call.")
_PUT_BATCH = flags.DEFINE_list("put_batch", ["64", "5000"], "Rows per put_many call.")
_PUT_ROWS = flags.DEFINE_integer("put_rows", 20_000, "Rows written per put measurement.")
_MISS_RATE = flags.DEFINE_float("miss_rate", 0.02, "Fraction of requested ids that are not stored.")
_CALLS = flags.DEFINE_integer("calls", 50, "Timed get calls per size and round.")
_WARMUP = flags.DEFINE_integer("warmup_calls", 5, "Untimed get calls per size and round.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Interleaved rounds.")
_REDIS_URL = flags.DEFINE_string("redis_url", "", "An existing Redis (redis://host:port/db); default: start one.")
_SEED = flags.DEFINE_integer("seed", 0, "NumPy seed.")
_PYTHON_PARSER = flags.DEFINE_bool("python_parser", True, "Also measure Redis with redis-py's pure-Python reply "
                                   "parser instead of hiredis (the reason `serving` pins hiredis).")


class NumpyDict:
    """The in-memory baseline with the index table's get/put interface (no validation, no durability)."""

    def __init__(self, dim, capacity):
        self.dim = dim
        self.rows = {}
        self.vectors = np.zeros((capacity, dim), np.float32)

    def put_many(self, item_ids, vectors, encoder_version=None, timestamps=None):
        for i, v in zip(item_ids.tolist(), vectors):
            row = self.rows.setdefault(i, len(self.rows))
            self.vectors[row] = v

    def get_many(self, item_ids):
        rows = np.array([self.rows.get(i, -1) for i in item_ids.tolist()], np.int64)
        found = rows >= 0
        out = self.vectors[np.where(found, rows, 0)]
        out[~found] = 0.0
        return out, found

    def close(self):
        pass


def machine_info():
    info = bench_machine.machine_info()
    return (f"{info['cpus']} CPUs, {info['cpu_model']}, Python {info['python']}, "
            f"SQLite {sqlite3.sqlite_version}")


def _percentile_ms(values, q):
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def run_benchmark(stores, num_items, dim, get_sizes, put_batches, put_rows, miss_rate, calls, warmup, repeats,
                  seed):
    """`stores`: {label: factory() → empty store}. Returns (context lines, get table rows, put table rows)."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(1, 10 * num_items), size=num_items, replace=False).astype(np.int64)
    vectors = rng.standard_normal((num_items, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    unknown = -np.arange(1, 100_001, dtype=np.int64)  # never stored
    opened, fill_s = {}, {}
    for label, factory in stores.items():
        store = factory()
        start = time.perf_counter()
        for s in range(0, num_items, 10_000):
            store.put_many(ids[s:s + 10_000], vectors[s:s + 10_000], "bench")
        fill_s[label] = time.perf_counter() - start
        opened[label] = store
        logging.info("filled %s with %d rows in %.1f s", label, num_items, fill_s[label])

    def request(n):
        want = rng.choice(ids, size=n)
        miss = rng.random(n) < miss_rate
        want[miss] = rng.choice(unknown, size=int(miss.sum()))
        return want

    get_times = {(label, n): [] for label in opened for n in get_sizes}
    put_rates = {(label, b): [] for label in opened for b in put_batches}
    next_id = [10 * num_items]
    for r in range(repeats):
        for n in get_sizes:
            labels = list(opened)
            for k in range(warmup + calls):  # call by call across the stores, in a new random order each time:
                want = request(n)            # load bursts and wake-ups of the Redis server hit all alike
                answers = {}
                for j in rng.permutation(len(labels)):
                    label = labels[j]
                    start = time.perf_counter()
                    answers[label] = opened[label].get_many(want)
                    elapsed = time.perf_counter() - start
                    if k >= warmup:
                        get_times[(label, n)].append(elapsed)
                for out, found in answers.values():  # every store answers like the baseline
                    np.testing.assert_allclose(out, answers[labels[0]][0], atol=1.0 / 127)
                    np.testing.assert_array_equal(found, answers[labels[0]][1])
        for b in put_batches:
            new_ids = np.arange(next_id[0], next_id[0] + put_rows, dtype=np.int64)
            next_id[0] += put_rows
            new_vectors = vectors[rng.integers(0, num_items, put_rows)]
            for label, store in opened.items():
                start = time.perf_counter()
                for s in range(0, put_rows, b):
                    store.put_many(new_ids[s:s + b], new_vectors[s:s + b], "bench")
                put_rates[(label, b)].append(put_rows / (time.perf_counter() - start))
        logging.info("round %d done", r)
    for store in opened.values():
        if hasattr(store, "drop"):
            store.drop()  # Redis: leave the server as it was
        store.close()

    get_rows = []
    for n in get_sizes:
        base = statistics.median(get_times[("numpy", n)]) if ("numpy", n) in get_times else None
        for label in opened:
            t = get_times[(label, n)]
            med = statistics.median(t)
            get_rows.append([f"{n:,}", label, f"{_percentile_ms(t, 50):.2f}", f"{_percentile_ms(t, 99):.2f}",
                             f"{n / med:,.0f}", f"{med / base:.1f}" if base else "-"])
    put_rows_out = []
    for b in put_batches:
        base = statistics.median(put_rates[("numpy", b)]) if ("numpy", b) in put_rates else None
        for label in opened:
            rate = statistics.median(put_rates[(label, b)])
            put_rows_out.append([f"{b:,}", label, f"{rate:,.0f}", f"{rate * 1.0 / b:,.0f}",
                                 f"{base / rate:.1f}" if base else "-"])
    context = [
        f"machine: {machine_info()}; load average {os.getloadavg()[0]:.1f} (1 min, at the end)",
        f"{num_items:,} rows of D={dim} unit vectors per store (fill: " +
        ", ".join(f"{k} {v:.1f} s" for k, v in fill_s.items()) + f"); {miss_rate:.0%} unknown ids per get; "
        f"{warmup} warm-up + {calls} timed calls per size × {repeats} interleaved rounds; puts of {put_rows:,} new "
        "rows per batch size and round",
    ]
    return context, get_rows, put_rows_out


def markdown_table(rows, header):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    dim, n = _DIM.value, _NUM_ITEMS.value
    get_sizes = [int(v) for v in _GET_SIZES.value]
    put_batches = [int(v) for v in _PUT_BATCH.value]
    capacity = n + _REPEATS.value * len(put_batches) * _PUT_ROWS.value
    tmp = tempfile.mkdtemp(prefix="bench_index_table_")
    stores = {}
    if "numpy" in _BACKENDS.value:
        stores["numpy"] = lambda: NumpyDict(dim, capacity)
    for dtype in _DTYPES.value:
        if "sqlite" in _BACKENDS.value:
            stores[f"sqlite {dtype}"] = (lambda d=dtype: open_index_table(
                os.path.join(tmp, f"{d}.db"), dim=dim, encoder_version="bench", dtype=d, create=True))
    try:
        with _redis(_BACKENDS.value) as url:
            for dtype in _DTYPES.value:
                if url:
                    stores[f"redis {dtype}"] = (lambda d=dtype: open_index_table(
                        f"{url}?prefix=bench_{d}_{os.getpid()}", dim=dim, encoder_version="bench", dtype=d,
                        create=True))
            if url and _PYTHON_PARSER.value:
                stores["redis float32, pure-Python parser"] = lambda: _python_parser_table(url, dim)
            context, gets, puts = run_benchmark(stores, n, dim, get_sizes, put_batches, _PUT_ROWS.value,
                                                _MISS_RATE.value, _CALLS.value, _WARMUP.value, _REPEATS.value,
                                                _SEED.value)
            if url and not _REDIS_URL.value:
                context.append("Redis: a private redis-server on 127.0.0.1 (TCP loopback), no persistence")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(context))
    print()
    print(markdown_table(gets, ["ids per get", "store", "p50 ms", "p99 ms", "ids/s (median)",
                                "× numpy (median)"]))
    print()
    print(markdown_table(puts, ["rows per put", "store", "rows/s (median)", "puts/s", "× numpy (slower by)"]))


def _python_parser_table(url, dim):
    """A Redis table whose client parses replies in Python (what redis-py does without hiredis)."""
    import redis
    from redis._parsers import _RESP2Parser  # redis-py's own fallback parser; no public name

    uri = f"{url}?prefix=bench_pyparser_{os.getpid()}"
    return RedisIndexTable(uri, dim, "bench", "float32", create=True,
                           client=redis.Redis.from_url(url, parser_class=_RESP2Parser))


class _redis:
    """The Redis URL to use ("" when Redis is not measured or cannot run here)."""

    def __init__(self, backends):
        self.backends = backends
        self._ctx = None

    def __enter__(self):
        if "redis" not in self.backends:
            return ""
        if _REDIS_URL.value:
            return _REDIS_URL.value
        try:
            self._ctx = local_redis_server()
            return self._ctx.__enter__()
        except RedisUnavailable as e:
            logging.warning("Redis left out: %s", e)
            self._ctx = None
            return ""

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


if __name__ == "__main__":
    app.run(main)
