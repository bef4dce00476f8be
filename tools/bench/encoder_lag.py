"""Encoder-service lag under a steady new-item event rate, against the bare encoder call.

Builds an (untrained: the speed does not depend on the weights) text encoder with the architecture of
`--scl_flagfile` (default `configs/scl/text.flags`: 2 transformer layers, width 64, D=128, 32 tokens), exports
it with `mm_ads.scl.export`, and for each `--backends` pair runs `EncoderService` in a thread while a producer
appends one new-item event every 1/`--rate` s (one fsync'd append each, as separate producers would) for
`--seconds` s. Lag = vector committed in the index table − event `ts` (the service's own `stats()`).
Baseline measured in the same run: the bare SavedModel call on one title and on a `--max_batch_size` batch.

```
python -m tools.bench.encoder_lag --rate=200 --seconds=20
```
"""

import os
import platform
import shutil
import statistics
import tempfile
import threading
import time

import numpy as np
from absl import app, flags, logging

from mm_ads import config as config_lib
from mm_ads.serving.index.encoder_service import EncoderService, EncoderServiceConfig, ExportedEncoder
from mm_ads.serving.index.events import open_stream
from mm_ads.serving.index.redis_local import RedisUnavailable, local_redis_server

_SCL_FLAGFILE = flags.DEFINE_string("scl_flagfile", "configs/scl/text.flags", "The encoder architecture.")
_RATE = flags.DEFINE_float("rate", 200.0, "New-item events per second.")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "Seconds of steady load per backend pair.")
_MAX_BATCH = flags.DEFINE_integer("max_batch_size", 64, "Encoder service micro-batch size.")
_MAX_WAIT = flags.DEFINE_integer("max_wait_ms", 20, "Encoder service micro-batch wait.")
_BACKENDS = flags.DEFINE_list("backends", ["file+sqlite", "redis+redis"], "event stream + index table pairs.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic titles.")


def _titles(n, rng):
    colours = ["red", "blue", "green", "black", "white", "navy", "beige", "pink"]
    things = ["dress", "mug", "pillow", "scarf", "lamp", "sneaker", "backpack", "kettle"]
    extras = ["wool", "cotton", "striped", "xl", "vintage", "ceramic", "soft", "2024", "gift", "new"]
    return [" ".join([rng.choice(colours), *rng.choice(extras, 4), rng.choice(things)]) for _ in range(n)]


def export_encoder(flagfile, out_dir, rng):
    import tensorflow as tf

    from mm_ads.scl.export import export_encoder as export
    from mm_ads.scl.task import build_encoder
    from mm_ads.scl.text_tower import build_vocabulary

    values = config_lib.read_flagfile(flagfile)
    values.update(model_dir=out_dir, data_dir=out_dir)  # required by the config, not used here
    config = config_lib.config_from_values(values)
    vocab, _ = build_vocabulary(_titles(2000, rng), config.scl.vocab_size)
    encoder = build_encoder(config.scl, vocab)
    encoder(tf.constant(["warm up"]))
    return export(encoder, out_dir, config.scl.modality, config.scl.image_size)


def bare_call_ms(encoder, titles, batch, calls=50):
    times = {1: [], batch: []}
    for size in times:
        for k in range(calls + 5):
            start = time.perf_counter()
            encoder.encode(titles[k * size % (len(titles) - size):][:size])
            if k >= 5:
                times[size].append((time.perf_counter() - start) * 1000)
    return {size: (statistics.median(t), float(np.percentile(t, 99))) for size, t in times.items()}


def run_pair(pair, encoder, workdir, redis_url, titles):
    events_kind, table_kind = pair.split("+")
    name = f"lag{os.getpid()}_{pair.replace('+', '_')}"
    events = os.path.join(workdir, f"{name}.log") if events_kind == "file" else f"{redis_url}?stream={name}"
    table = os.path.join(workdir, f"{name}.db") if table_kind == "sqlite" else f"{redis_url}?prefix={name}"
    config = EncoderServiceConfig(encoder=encoder.path, events=events, index_table=table,
                                  checkpoint_path=os.path.join(workdir, f"{name}.json"),
                                  max_batch_size=_MAX_BATCH.value, max_wait_ms=_MAX_WAIT.value, poll_timeout_ms=50,
                                  log_every_s=5, lag_window=10**6)
    service = EncoderService(config, encoder=encoder)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,))
    thread.start()
    n = int(_RATE.value * _SECONDS.value)
    with open_stream(events) as stream:
        start = time.monotonic()
        for k in range(n):
            delay = start + k / _RATE.value - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            stream.append([{"type": "item", "item_id": k + 1, "title": titles[k % len(titles)], "ts": time.time()}])
        produce_s = time.monotonic() - start
        deadline = time.monotonic() + 60
        while service.stats()["written"] < n and time.monotonic() < deadline:
            time.sleep(0.01)
    stop.set()
    thread.join()
    stats = service.stats()
    service.close()
    return stats, n / produce_s


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    rng = np.random.default_rng(_SEED.value)
    titles = _titles(5000, rng)
    workdir = tempfile.mkdtemp(prefix="bench_encoder_lag_")
    try:
        encoder = ExportedEncoder(export_encoder(_SCL_FLAGFILE.value, os.path.join(workdir, "export"), rng))
        bare = bare_call_ms(encoder, titles, _MAX_BATCH.value)
        rows = []
        redis_ctx = None
        url = ""
        if any("redis" in p for p in _BACKENDS.value):
            try:
                redis_ctx = local_redis_server()
                url = redis_ctx.__enter__()
            except RedisUnavailable as e:
                logging.warning("Redis pairs left out: %s", e)
                redis_ctx = None
        try:
            for pair in _BACKENDS.value:
                if "redis" in pair and not url:
                    continue
                stats, rate = run_pair(pair, encoder, workdir, url, titles)
                rows.append((pair, rate, stats))
        finally:
            if redis_ctx is not None:
                redis_ctx.__exit__(None, None, None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, load average "
          f"{os.getloadavg()[0]:.1f} (1 min, at the end); encoder {_SCL_FLAGFILE.value} (dim {encoder.dim}); "
          f"micro-batches ≤ {_MAX_BATCH.value} events / {_MAX_WAIT.value} ms")
    print(f"bare SavedModel call: 1 title p50 {bare[1][0]:.2f} ms (p99 {bare[1][1]:.2f}); "
          f"{_MAX_BATCH.value} titles p50 {bare[_MAX_BATCH.value][0]:.2f} ms (p99 {bare[_MAX_BATCH.value][1]:.2f})")
    print()
    print("| events + table | events/s | items | batches | lag p50 ms | lag p99 ms | lag max ms | p50 / bare 1-title |")
    print("|---|---|---|---|---|---|---|---|")
    for pair, rate, s in rows:
        print(f"| {pair} | {rate:.0f} | {s['written']} | {s['batches']} | {s['lag_p50_s'] * 1000:.1f} | "
              f"{s['lag_p99_s'] * 1000:.1f} | {s['lag_max_s'] * 1000:.1f} | "
              f"{s['lag_p50_s'] * 1000 / bare[1][0]:.1f} |")


if __name__ == "__main__":
    app.run(main)
