"""CTR train step with collision-free dynamic tables vs fixed-size tables: step time and memory at 1M / 10M ids.

For each item-id count (`--sizes`, default 1M and 10M; the user, category and brand tables are small), one
process builds three configurations of the `id` CTR model, each trained by the real step of
`mm_ads.training.trainer.Trainer` (`_make_train_step`, its own input path, the sparse optimizer `--optimizer` on
the tables and Adam on the dense variables, one host sync per step):

* **fixed**: `SparseEmbedding` tables of `N + 1` rows, ids are rows (`id_mapping="dense"`) with the default
  admission counts (`admit_after=1`): the configuration every model trains with today.
* **dynamic**: `DynamicEmbedding` tables (`id_mapping="dynamic"`) whose pools have as many rows as the
  fixed tables, starting empty: every new id of a step is admitted (hash-map insert, row initialised, slots
  reset), known ids are looked up in the map.
* **dynamic_full**: the same, but every table's pool starts full of ids that never occur in the stream (their
  last read one step before the first): every new id of the stream needs an eviction, so the step pays the
  reclaim passes (a scan of the pool and a top-k of the lowest-frequency rows, ≥ 1% of the pool at once).

The input is a stream of `--batches` distinct synthetic batches (ids Zipf-distributed over each table and
scattered by a hash, as `tools.bench.ctr_step`; ~`--pad_fraction` history padding), the same stream for every
configuration; it is long enough that no configuration sees a batch twice, so new ids keep arriving as in
training (the Zipf tail). The configurations are timed interleaved: `--repeats` rounds of `--steps` steps each,
after `--warmup` untimed steps; the table reports median and best ms/step and the ratio of each dynamic
configuration to fixed at the same size, in the same run (target: ≤ 1.3 at 10M ids).

Memory: the bytes of every variable of the model and of the sparse optimizer's slots; the dynamic tables' hash
maps (entries and buckets × 16 bytes, read at the end); and the process's `VmRSS` growth when building each
configuration. Run from the repository root (~5 minutes on 2 cores):

```
python -m tools.bench.dynamic_tables --steps=20
python -m tools.bench.dynamic_tables --sizes=1000000 --optimizer=adam
```

`--optimizer`, `--steps`, `--warmup`, `--repeats`, `--batch_size`, `--seq_len`, `--embedding_dim`,
`--zipf_exponent`, `--pad_fraction` and `--seed` are `tools.bench.ctr_step`'s flags, with its defaults.
"""

import gc
import os
import statistics
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from mm_ads.config import CTRModelConfig
from mm_ads.layers.dynamic_embedding import DynamicEmbedding
from mm_ads.layers.sparse_embedding import SparseEmbedding
from tools.bench import ctr_step  # its flags are defined too; the shared ones below are used here
from tools.bench import machine as bench_machine
from tools.bench.ctr_step import InMemoryCTRTask, Ours, make_spec, markdown_table, rss_mb, synthetic_batch

_SIZES = flags.DEFINE_list("sizes", ["1000000", "10000000"], "Item ids (rows of the fixed item table - 1).")
_KINDS = flags.DEFINE_list("kinds", ["fixed", "dynamic", "dynamic_full"], "Configurations to measure.")
# shared with tools.bench.ctr_step (imported above, which defines them): --optimizer, --steps, --warmup,
# --repeats, --batch_size, --seq_len, --embedding_dim, --zipf_exponent, --pad_fraction, --seed
_OPTIMIZER, _STEPS, _WARMUP, _REPEATS = ctr_step._OPTIMIZER, ctr_step._STEPS, ctr_step._WARMUP, ctr_step._REPEATS
_BATCH_SIZE, _SEQ_LEN, _EMBEDDING_DIM = ctr_step._BATCH_SIZE, ctr_step._SEQ_LEN, ctr_step._EMBEDDING_DIM
_ZIPF, _PAD, _SEED = ctr_step._ZIPF, ctr_step._PAD, ctr_step._SEED

_KIND_NAMES = ("fixed", "dynamic", "dynamic_full")


class StreamTask(InMemoryCTRTask):
    """The CTR task on a stream of distinct in-memory batches (`features` and `labels` stacked: `[K, B, ...]`)."""

    def build_inputs(self, split, batch_size, input_context=None, epoch=0, training=True):
        if batch_size != self.labels.shape[1]:
            raise ValueError(f"The batches have {self.labels.shape[1]} examples, asked for {batch_size}")
        return tf.data.Dataset.from_tensor_slices((self.features, self.labels)).repeat()


def make_stream(spec, batches, rng):
    """`batches` distinct synthetic batches of the `id` variant, stacked; and the item lookups' statistics."""
    parts = [synthetic_batch(spec, "id", _BATCH_SIZE.value, rng, _ZIPF.value, _PAD.value) for _ in range(batches)]
    features = {k: np.stack([p[0][k] for p in parts]) for k in parts[0][0]}
    labels = np.stack([p[1] for p in parts])
    items = np.concatenate([np.concatenate([p[0]["item_id"], p[0]["hist_item_id"][p[2]]]) for p in parts])
    return features, labels, {"item_lookups": items.size, "distinct_items": len(np.unique(items))}


def fill_pool(table):
    """Fills a `DynamicEmbedding`'s pool with ids that no batch holds (negative), last read one step ago."""
    c = table.capacity
    ids = -tf.range(1, c + 1, dtype=tf.int64)
    rows = tf.range(c, dtype=tf.int64)
    table.id_to_row.insert(table.map_keys(ids), rows)
    table.row_ids.assign(ids)
    table.last_seen.assign(tf.zeros([c], tf.int64))
    table.frequency.assign(tf.ones([c], tf.int64))
    table.num_free.assign(0)
    table.calls.assign(table.calls_per_step)  # the clock at step 1


def tables_of(model):
    return [layer for layer in model.layers if isinstance(layer, (SparseEmbedding, DynamicEmbedding))]


def variable_bytes(variables):
    return sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in variables)


class Runner(Ours):
    """One configuration: `Trainer`'s step on the stream; `run(n)` runs n steps with a host sync per step."""

    def __init__(self, kind, spec, stream, model_dir):
        features, labels = stream
        model_config = CTRModelConfig(variant="id", embedding_dim=_EMBEDDING_DIM.value,
                                      id_mapping="dense" if kind == "fixed" else "dynamic")
        super().__init__(spec, model_config, features, labels, _OPTIMIZER.value, _BATCH_SIZE.value, model_dir,
                         task_class=StreamTask)
        self.kind = kind
        if kind == "dynamic_full":
            for table in tables_of(self.model):
                fill_pool(table)

    def memory(self):
        """`{model MB, slots MB, map entries, map MB}`: variables, sparse-optimizer slots, hash maps."""
        entries = buckets = 0
        for table in tables_of(self.model):
            if isinstance(table, DynamicEmbedding):
                keys, _ = table.id_to_row.export()
                buckets += int(keys.shape[0])
                entries += int(table.size())
        slots = [v for v in self.trainer.sparse_opt.variables if len(v.shape) == 2]
        return {"model_mb": variable_bytes(self.model.variables) / 2**20,
                "slots_mb": variable_bytes(slots) / 2**20, "map_entries": entries, "map_mb": buckets * 16 / 2**20}


def main(argv):
    del argv
    kinds = _KINDS.value
    for k in kinds:
        if k not in _KIND_NAMES:
            raise app.UsageError(f"--kinds: each of {_KIND_NAMES}, got {k!r}")
    if "fixed" not in kinds:
        raise app.UsageError("--kinds must include fixed: the ratios are against it")
    sizes = [int(s) for s in _SIZES.value]
    keras.config.set_dtype_policy("float32")
    info = bench_machine.machine_info(keras=keras.__version__)
    rng = np.random.default_rng(_SEED.value)
    batches = _WARMUP.value + _REPEATS.value * _STEPS.value
    start_all = time.perf_counter()
    configs, stats = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_dynamic_tables_") as tmp:
        for n in sizes:
            spec = make_spec(n + 1, _SEQ_LEN.value, 0)
            features, labels, stats[n] = make_stream(spec, batches, rng)
            for kind in kinds:
                gc.collect()
                before = rss_mb()
                start = time.perf_counter()
                runner = Runner(kind, spec, (features, labels), os.path.join(tmp, f"{kind}_{n}"))
                built = time.perf_counter() - start
                build_mb = rss_mb() - before
                runner.run(_WARMUP.value)
                logging.info("%s n=%d built in %.1f s, RSS %+.0f MB", kind, n, built, build_mb)
                configs[(kind, n)] = {"runner": runner, "build_s": built, "build_mb": build_mb, "ms": []}
        for r in range(_REPEATS.value):
            for key, c in configs.items():
                start = time.perf_counter()
                c["runner"].run(_STEPS.value)
                c["ms"].append((time.perf_counter() - start) * 1000.0 / _STEPS.value)
                logging.info("repeat %d %s n=%d: %.2f ms/step", r, key[0], key[1], c["ms"][-1])
        for c in configs.values():
            c["memory"] = c["runner"].memory()
            del c["runner"]
    load_after = os.getloadavg()

    rows, ratio_rows, mem_rows = [], [], []
    for (kind, n), c in configs.items():
        med, best = statistics.median(c["ms"]), min(c["ms"])
        rows.append([kind, f"{n:,}", f"{med:.2f}", f"{best:.2f}", " ".join(f"{x:.1f}" for x in c["ms"])])
        m = c["memory"]
        mem_rows.append([kind, f"{n:,}", f"{c['build_s']:.1f}", f"{m['model_mb']:,.0f}", f"{m['slots_mb']:,.0f}",
                         f"{m['map_entries']:,}", f"{m['map_mb']:,.0f}", f"{c['build_mb']:+,.0f}"])
        if kind != "fixed":
            fixed = configs[("fixed", n)]["ms"]
            ratio = med / statistics.median(fixed)
            target = "≤ 1.3" if n >= 10_000_000 else "-"
            verdict = ("met" if ratio <= 1.3 else "NOT met") if target != "-" else "-"
            ratio_rows.append([f"{kind} / fixed ms/step at {n:,} ids", f"{ratio:.2f}", f"{best / min(fixed):.2f}",
                               target, verdict])
    load = info["load"]
    print(f"machine: {info['cpus']} CPUs, {info['cpu_model']}; load average (1/5/15 min) before "
          f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, after {load_after[0]:.2f}/{load_after[1]:.2f}/"
          f"{load_after[2]:.2f}; nice {info['nice']}")
    print(f"versions: Python {info['python']}, TensorFlow {info['tensorflow']}, Keras {info['keras']}; dtype float32")
    print(f"id CTR model, batch {_BATCH_SIZE.value}, S={_SEQ_LEN.value}, E={_EMBEDDING_DIM.value}, "
          f"Sparse{_OPTIMIZER.value.capitalize()} on the tables + Adam on dense; ids Zipf({_ZIPF.value}); "
          f"{_WARMUP.value} warm-up steps, {_REPEATS.value} interleaved repeats × {_STEPS.value} steps, "
          f"{batches} distinct batches per configuration; total {time.perf_counter() - start_all:.0f} s")
    print()
    print(markdown_table(rows, ["table", "item ids", "median ms/step", "best ms/step", "per repeat ms"]))
    print()
    print(markdown_table(ratio_rows, ["ratio", "median", "best", "target", "verdict"]))
    print()
    print(markdown_table(mem_rows, ["table", "item ids", "build s", "variables MB", "sparse slots MB",
                                    "map entries (end)", "map buckets MB (end)", "ΔRSS build MB"]))
    print()
    print(markdown_table([[f"{n:,}", f"{s['distinct_items']:,} / {s['item_lookups']:,}"] for n, s in stats.items()],
                         ["item ids", "distinct item ids / item lookups in the stream"]))


if __name__ == "__main__":
    app.run(main)
