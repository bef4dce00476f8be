"""Near-line trainer throughput: events/s from an event log vs the offline trainer's examples/s, same batch.

One process, one synthetic world (`--num_impressions` impressions, `--seq_len` history, `--vector_dim`-dim
attribute vectors for every item), one CTR model (`--flagfile`, default the served simtier model) at one
`--batch_size`, on the same batches (the dataset's stored order, unshuffled, in both):

* **offline** — `Trainer._make_train_step` on the trainer's own input path (`_dataset`: the TFRecord pipeline
  with the in-memory `VectorJoin`), one host sync per step, as `python -m mm_ads.train` runs it.
* **nearline** — `NearlineTrainer.step_once()` on the same impressions replayed into an `EventLog`, with the
  vectors in an SQLite index table (the embedded defaults): read + validate + batch + `get_many` join +
  `Trainer.train_batch` + offset commit, i.e. everything but checkpoints and exports (their cost depends on
  `--checkpoint_every` / `--export_every_*`; measured separately below). With `prefetch` (the default: the
  next batch is read, validated and joined in a background thread) and without.

Both first train `--warmup` steps (tracing), then `--repeats` interleaved rounds of `--steps` steps each; the
table reports the median and the best round. A breakdown times the near-line stages on the same batches:
read + parse of the records, the index-table join, the train step on ready batches, and one checkpoint and
one export of the model.

```
python -m tools.bench.nearline                         # simtier, batch 256, S=50, D=64
python -m tools.bench.nearline --batch_size=1024 --steps=10
```
"""

import os
import platform
import statistics
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from mm_ads import config as config_lib
from mm_ads.data import synthetic
from mm_ads.data.vectors import write_vector_table

_FLAGFILE = flags.DEFINE_string("flagfile_ctr", "configs/ctr/simtier.flags", "CTR model flagfile.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Batch size of both trainers.")
_STEPS = flags.DEFINE_integer("steps", 20, "Steps per timed round.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Interleaved rounds.")
_IMPRESSIONS = flags.DEFINE_integer("num_impressions", 40_000, "Impressions of the synthetic world.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 50, "History length S.")
_DIM = flags.DEFINE_integer("vector_dim", 64, "Vector dim D.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the world, log and tables go (default: a temp dir).")


def _world(out, num_impressions, seq_len, dim):
    cfg = synthetic.WorldConfig(seed=0, num_items=5000, num_users=3000, num_categories=20,
                                num_impressions=num_impressions, num_search_pairs=10, seq_len=seq_len,
                                image_size=8, num_shards=4, content=False)
    world = synthetic.World(cfg).generate(progress=False)
    synthetic.write_world(world, out, progress=False)
    import json

    import pyarrow.parquet as pq

    items = pq.read_table(os.path.join(out, "items.parquet"), columns=["item_id"]).to_pydict()
    rng = np.random.default_rng(0)
    v = rng.normal(size=(len(items["item_id"]), dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    write_vector_table(os.path.join(out, "vectors", "bench.parquet"), np.asarray(items["item_id"]), v,
                       encoder_version="bench")
    path = os.path.join(out, "manifest.json")
    manifest = json.load(open(path))
    manifest["extra"]["vector_tables"] = {"bench": "vectors/bench.parquet"}
    json.dump(manifest, open(path, "w"))
    return out


def _median_best(rates):
    return statistics.median(rates), max(rates)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from mm_ads.ctr.task import CTRTask
    from mm_ads.serving.index.events import EventLog
    from mm_ads.serving.index.index_table import load_vector_table_into, open_index_table
    from mm_ads.serving.nearline.replay import replay
    from mm_ads.serving.nearline.trainer import NearlineConfig, NearlineTrainer
    from mm_ads.training.trainer import Trainer

    batch, steps, warmup, repeats = _BATCH.value, _STEPS.value, _WARMUP.value, _REPEATS.value
    work = _WORKDIR.value or tempfile.mkdtemp(prefix="bench_nearline_")
    data = os.path.join(work, "world")
    t0 = time.time()
    if not os.path.exists(os.path.join(data, "manifest.json")):
        _world(data, _IMPRESSIONS.value, _SEQ_LEN.value, _DIM.value)
    needed = batch * (warmup + steps * repeats)
    log = EventLog(os.path.join(work, f"events-{time.time_ns()}.log"))
    replay(data, log, limit=needed)
    if log.end_offset() == 0 or len(log.read(0, needed)) < needed:
        raise app.UsageError(f"The world has fewer than {needed} training impressions: raise --num_impressions")
    index = open_index_table(os.path.join(work, f"index-{time.time_ns()}.db"), dim=_DIM.value,
                             encoder_version="bench", create=True)
    load_vector_table_into(index, os.path.join(data, "vectors", "bench.parquet"))
    setup_s = time.time() - t0

    # unshuffled: the offline pipeline yields the replayed events' order, so both train the same batches
    common = dict(data_dir=data, batch_size=batch, checkpoint_every=10**9, shuffle_buffer=0)
    offline_cfg = config_lib.config_from_flagfile(_FLAGFILE.value, model_dir=os.path.join(work, "offline"),
                                                  vector_table="bench", **common)
    offline = Trainer(CTRTask(offline_cfg), offline_cfg.train, batch, offline_cfg.model_dir)
    step_fn = offline._make_train_step()
    iterator = iter(offline._dataset(0, 0))

    def near(prefetch):
        cfg = config_lib.config_from_flagfile(_FLAGFILE.value, model_dir=os.path.join(work, f"near-{time.time_ns()}"),
                                              **common)
        return NearlineTrainer(cfg, NearlineConfig(stream=log.path, export_at_start=False, prefetch=prefetch,
                                                   export_every_events=10**9, export_every_s=0,
                                                   max_batch_delay_s=3600, stats_every_s=3600),
                               index_table=index)

    nearline, serial = near(True), near(False)

    def run_offline(n):
        start = time.perf_counter()
        for _ in range(n):
            float(step_fn(iterator))
        return n * batch / (time.perf_counter() - start)

    def run_nearline(n, trainer):
        start = time.perf_counter()
        for _ in range(n):
            got = trainer.step_once(timeout=10)
            assert got == batch, got
        return n * batch / (time.perf_counter() - start)

    run_offline(warmup)
    run_nearline(warmup, nearline)
    run_nearline(warmup, serial)
    off_rates, near_rates, serial_rates = [], [], []
    for _ in range(repeats):
        off_rates.append(run_offline(steps))
        near_rates.append(run_nearline(steps, nearline))
        serial_rates.append(run_nearline(steps, serial))
    nearline._stop_producer()  # the breakdown below uses the trainer's parts directly

    # breakdown on fresh batches of the same log (read + parse, join, train step on ready batches)
    t = time.perf_counter()
    records = log.read(0, batch * steps)
    parsed = [nearline.schema.parse(r, o) for o, _, r in records]
    parse_s = time.perf_counter() - t
    batches = [nearline.schema.batch(parsed[i:i + batch]) for i in range(0, len(parsed), batch)]
    t = time.perf_counter()
    joined = [(nearline.join(f), y) for f, y in batches]
    join_s = time.perf_counter() - t
    names = nearline.task.input_names
    t = time.perf_counter()
    for f, y in joined:
        nearline.trainer.train_batch({k: f[k] for k in names}, y)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    nearline.trainer.step.assign_add(1)  # a new checkpoint number
    nearline.checkpoint()
    ckpt_s = time.perf_counter() - t
    t = time.perf_counter()
    nearline.export()
    export_s = time.perf_counter() - t
    n_ev = len(parsed)

    om, ob = _median_best(off_rates)
    nm, nb = _median_best(near_rates)
    sm, sb = _median_best(serial_rates)
    ratios = [n / o for n, o in zip(near_rates, off_rates)]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, load "
          f"{os.getloadavg()[0]:.2f}; python {platform.python_version()}, tensorflow {tf.__version__}, "
          f"keras {keras.__version__}; setup {setup_s:.1f} s")
    print(f"model {offline_cfg.model.variant} ({_FLAGFILE.value}), batch {batch}, S={_SEQ_LEN.value}, "
          f"D={_DIM.value}, {steps} steps x {repeats} rounds (+{warmup} warm-up)\n")
    print("| trainer | median examples/s | best examples/s |")
    print("|---|---:|---:|")
    print(f"| offline (tf.data + VectorJoin) | {om:,.0f} | {ob:,.0f} |")
    print(f"| near-line (EventLog + SQLite index table, prefetch) | {nm:,.0f} | {nb:,.0f} |")
    print(f"| near-line without prefetch (--noprefetch) | {sm:,.0f} | {sb:,.0f} |")
    print(f"| ratio near-line / offline | {nm / om:.2f} | {nb / ob:.2f} |")
    print(f"\nper-round ratios near-line / offline: {', '.join(f'{r:.2f}' for r in ratios)} "
          f"(median {statistics.median(ratios):.2f})")
    print(f"near-line stages on {n_ev} events: read+parse {1e6 * parse_s / n_ev:.1f} us/event, "
          f"join {1e6 * join_s / n_ev:.1f} us/event, train step {1e6 * train_s / n_ev:.1f} us/event "
          f"({n_ev / train_s:,.0f} events/s on ready batches); one checkpoint {ckpt_s:.2f} s, one export "
          f"{export_s:.2f} s")
    nearline.close()
    serial.close()
    index.close()


if __name__ == "__main__":
    app.run(main)
