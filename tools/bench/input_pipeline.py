"""Throughput of the CTR input pipeline, with and without the multimodal vector join.

Writes a synthetic canonical dataset into a temporary directory (or reads `--data_dir`), then measures
examples/s of `make_ctr_dataset` for: no join, a float32 table, an int8 table dequantised to float32, and
an int8 table passed on as int8. The configurations are interleaved within every repeat (fresh iterator,
warm-up, timed batches), and the table reports the median and best over repeats plus the ratio to the
no-join pipeline measured in the same run.

Run from the repository root:

```
python -m tools.bench.input_pipeline --num_vectors=1000000 --timed_batches=150
```

The machine line reports the CPU allocator (`TF_CPU_ALLOCATOR_USE_BFC=true` selects TensorFlow's BFC
allocator: measured no gain here once the untimed round has run) and the load average, because other
processes on a 2-core machine change the numbers by 2×.
"""

import os
import statistics
import tempfile
import time

import numpy as np
from absl import app, flags, logging

from mm_ads.data import pipeline
from mm_ads.data.dataset import DatasetWriter, Manifest
from mm_ads.data.spec import FeatureSpec
from mm_ads.data.vectors import VectorTable, write_vector_table
from tools.bench import machine as bench_machine

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Existing dataset (with vector features); default: synthetic.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to read.")
_VECTOR_TABLE = flags.DEFINE_string("vector_table", None, "With --data_dir: manifest table name or path.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 50_000, "Synthetic impressions written (read repeatedly).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 8, "Synthetic TFRecord files.")
_NUM_VECTORS = flags.DEFINE_integer("num_vectors", 1_000_000, "Rows of the synthetic vector table.")
_MISS_RATE = flags.DEFINE_float("miss_rate", 0.02, "Fraction of synthetic item ids without a vector.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 50, "Behaviour-sequence length S.")
_VECTOR_DIM = flags.DEFINE_integer("vector_dim", 128, "Vector dim D.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1024, "Examples per batch.")
_WARMUP = flags.DEFINE_integer("warmup_batches", 20, "Untimed batches per measurement.")
_TIMED = flags.DEFINE_integer("timed_batches", 100, "Timed batches per measurement.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Measurements per configuration (interleaved).")
_WARMUP_ROUNDS = flags.DEFINE_integer(
    "warmup_rounds", 1, "Untimed rounds over all configurations first (the process's allocator settles).")
_SHUFFLE = flags.DEFINE_bool("shuffle", True, "Shuffle as in training (seeded).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic data and the shuffle.")


def machine_info():
    """The machine (tools.bench.machine) and the CPU allocator in use."""
    allocator = "BFC" if os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "").lower() in ("1", "true") else "default"
    return bench_machine.machine_info(cpu_allocator=allocator)


def write_synthetic(out_dir, num_examples, num_shards, num_vectors, miss_rate, seq_len, vector_dim, seed):
    """Writes a canonical dataset with float32 and int8 vector tables of `num_vectors` rows.

    Item ids are uniform in `[1, num_items]` (the least cache-friendly case), a `miss_rate` fraction of
    them has no vector, and history lengths are uniform in `[0, S]` (the rest is padding).

    Args:
        out_dir: dataset directory to create.
        num_examples: impressions of the `train` split.
        num_shards: its TFRecord files.
        num_vectors: rows of each vector table.
        miss_rate: fraction of item ids absent from the tables.
        seq_len: behaviour-sequence length S.
        vector_dim: vector dim D.
        seed: NumPy seed.

    Returns:
        `out_dir`; its manifest lists the tables `f32` and `i8`.
    """
    rng = np.random.default_rng(seed)
    num_items = max(1, int(round(num_vectors / (1.0 - miss_rate))))
    spec = FeatureSpec.default(seq_len=seq_len, vector_dim=vector_dim, num_items=num_items, num_categories=1000,
                               num_brands=10_000, num_users=100_000)
    n, s = num_examples, seq_len
    hist = rng.integers(1, num_items + 1, (n, s))  # [N, S]
    padding = np.arange(s)[None, :] >= rng.integers(0, s + 1, n)[:, None]  # [N, S]
    hist[padding] = 0
    columns = {
        "user_id": rng.integers(1, 100_001, n),
        "item_id": rng.integers(1, num_items + 1, n),
        "category_id": rng.integers(1, 1001, n),
        "brand_id": rng.integers(1, 10_001, n),
        "hist_item_id": hist,
        "hist_category_id": np.where(padding, 0, rng.integers(1, 1001, (n, s))),
        "hist_brand_id": np.where(padding, 0, rng.integers(1, 10_001, (n, s))),
        "timestamp": np.arange(n),
        "item_created_at": rng.integers(0, n, n),
        "label": (rng.random(n) < 0.05).astype(np.float32),
    }
    item_ids = np.sort(rng.choice(np.arange(1, num_items + 1), size=num_vectors, replace=False))
    vectors = rng.standard_normal((num_vectors, vector_dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with DatasetWriter(out_dir, name="bench", format="synthetic", spec=spec, seed=seed) as w:
        w.write_ctr("train", columns, num_shards=num_shards)
        for name, dtype in (("f32", "float32"), ("i8", "int8")):
            write_vector_table(os.path.join(w.tmp_dir, "vectors", f"{name}.parquet"), item_ids, vectors,
                               encoder_version="bench", dtype=dtype)
        w.manifest.extra["vector_tables"] = ["vectors/f32.parquet", "vectors/i8.parquet"]
    return out_dir


def measure(dataset, warmup_batches, timed_batches, batch_size):
    """Examples/s of one fresh pass: `warmup_batches` untimed, then `timed_batches` timed."""
    iterator = iter(dataset)
    for _ in range(warmup_batches):
        next(iterator)
    start = time.perf_counter()
    for _ in range(timed_batches):
        next(iterator)
    return timed_batches * batch_size / (time.perf_counter() - start)


def markdown_table(rows, header):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run_benchmark(data_dir, split, vector_table, batch_size, warmup, timed, repeats, shuffle, seed, warmup_rounds):
    """Measures every configuration; returns (context lines, markdown table)."""
    load_before = os.getloadavg()[0]
    manifest = Manifest.load(data_dir)
    spec = manifest.spec
    if not spec.by_role("vector"):
        raise ValueError(f"{data_dir}: the FeatureSpec has no vector features; nothing to join")
    no_vectors = FeatureSpec([f for f in spec if f.role != "vector"], spec.seq_len, 0)
    tables = pipeline.vector_table_paths(manifest)
    if vector_table is not None:
        tables = {vector_table: tables.get(vector_table, vector_table)}
    joins, build_s = {}, {}
    for name, path in tables.items():
        table = VectorTable.load(path)
        start = time.perf_counter()
        joins[(name, "float32")] = pipeline.VectorJoin(table, spec)
        build_s[name] = time.perf_counter() - start
        if table.dtype == "int8":
            joins[(name, "int8")] = pipeline.VectorJoin(table, spec, vector_dtype="int8")
        del table

    def dataset(spec_, join=None, vector_dtype="float32"):
        return pipeline.make_ctr_dataset(data_dir, split, batch_size, spec=spec_, vector_table=join,
                                         vector_dtype=vector_dtype, shuffle=shuffle, seed=seed, repeat=True)

    configs = {"no join": (None, None, dataset(no_vectors))}
    for (name, out_dtype), join in joins.items():
        configs[f"join {name} ({join.dtype} → {out_dtype})"] = (join, name, dataset(spec, join, out_dtype))
    for _ in range(warmup_rounds):
        for _, _, ds in configs.values():
            measure(ds, warmup, timed, batch_size)
    results = {label: [] for label in configs}
    for r in range(repeats):
        for label, (_, _, ds) in configs.items():
            results[label].append(measure(ds, warmup, timed, batch_size))
            logging.info("repeat %d %-40s %10.0f examples/s", r, label, results[label][-1])
    base = statistics.median(results["no join"])
    rows = []
    for label, (join, name, _) in configs.items():
        med, best = statistics.median(results[label]), max(results[label])
        rows.append([
            label,
            "-" if join is None else f"{join.num_rows:,}",
            "-" if join is None else f"{build_s[name]:.1f}",
            f"{med:,.0f}",
            f"{best:,.0f}",
            f"{med / base:.2f}",
        ])
    header = ["pipeline", "table rows", "join build s", "median ex/s", "best ex/s", "vs no join (median)"]
    info = machine_info()
    context = [
        f"machine: {info['cpus']} CPUs, {info['cpu_model']}, load average {load_before:.1f} → "
        f"{info['load'][0]:.1f} (1 min, before → after); Python {info['python']}, TF {info['tensorflow']}, "
        f"CPU allocator {info['cpu_allocator']}",
        f"data: {manifest.num_rows('ctr', split):,} impressions in {len(manifest.files('ctr', split))} files, "
        f"S={spec.seq_len}, D={spec.vector_dim}, batch {batch_size}, shuffle={shuffle}; "
        f"{warmup_rounds} untimed round, then {warmup} warm-up + {timed} timed batches × {repeats} repeats "
        "(interleaved)",
    ]
    return context, markdown_table(rows, header)


def main(argv):
    del argv
    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
        data_dir = _DATA_DIR.value
        if data_dir is None:
            start = time.perf_counter()
            data_dir = write_synthetic(os.path.join(tmp, "data"), _NUM_EXAMPLES.value, _NUM_SHARDS.value,
                                       _NUM_VECTORS.value, _MISS_RATE.value, _SEQ_LEN.value, _VECTOR_DIM.value,
                                       _SEED.value)
            logging.info("synthetic dataset written in %.1f s", time.perf_counter() - start)
        context, table = run_benchmark(data_dir, _SPLIT.value, _VECTOR_TABLE.value, _BATCH_SIZE.value,
                                       _WARMUP.value, _TIMED.value, _REPEATS.value, _SHUFFLE.value, _SEED.value,
                                       _WARMUP_ROUNDS.value)
    print("\n".join(context))
    print()
    print(table)


if __name__ == "__main__":
    app.run(main)
