"""The tf.data input pipeline for CTR training and evaluation.

```
files ─► shard (files mode) ─► shuffle files ─► interleave TFRecord readers ─► shard (records mode)
      ─► shuffle records ─► repeat ─► batch ─► parse_example (vectorised) + VectorJoin ─► prefetch
```

Records are batched while still serialized and parsed a batch at a time. Records that do not match the
spec are reported in three ways, from cheapest to most precise:
  * at construction, the first record of every file is parsed: a file written with another schema
    (a missing feature, a wrong number of values) raises a `ValueError` naming the file and the feature;
  * a bad record further inside a file fails the parse with an error naming the split and the data
    directory (`Name: <dir>/ctr/<split> (one of N files), Feature: <name> ...`);
  * `record_file_names=True` makes every record carry its file name, so that error names the file
    (costs about half the record-reading throughput; for debugging).
Bytes that are not a `tf.train.Example` at all fail without a name (TensorFlow's parser reports only the
bytes).

Every file is also checked against the number of records the manifest lists for it (`Manifest.file_rows`):
a file cut short at a record boundary would otherwise just end early, and a corrupt record (a CRC mismatch,
a file cut inside a record) makes TensorFlow's reader fail without naming the file. At construction,
`verify_record_counts` reads the files once (batched, in parallel, every record's CRC checked) and raises a
`ValueError` naming the file, the expected and actual counts, and the record index and byte offset where reading
stopped (with TensorFlow's own error for a corrupt record). A process verifies a file once while its inode, size
and mtime stay the same, so the pipelines of later epochs cost nothing more. Counting inside the pipeline instead
(per file, checked at its end) measured 20-45% fewer records/s; the pass reads the data once more at start (BUILD.md,
"Record counts"). A manifest written before it had per-file counts is checked only for a split of one file; its
other splits are read as before.

Multimodal vectors are not stored in the records: `VectorJoin` looks every item id up in an item → vector
table held in memory (a `tf.lookup.StaticHashTable` id → row and a non-trainable `tf.Variable` of rows)
and adds the vector features of the spec with their missing flags.

Example:

```python
join = build_vector_join(data_dir)                    # the manifest's only vector table
train = make_ctr_dataset(data_dir, "train", 1024, vector_table=join, shuffle=True, seed=1, repeat=True)
for features, label in train.take(10):
    ...
join.stats()                                          # {"lookups": ..., "missing": ..., "miss_rate": ...}
```
"""

import os
import re
import threading

import numpy as np
import tensorflow as tf
from absl import logging

from mm_ads.data.dataset import Manifest
from mm_ads.data.spec import missing_flag_name
from mm_ads.data.vectors import VectorTable

VECTOR_DTYPES = ("float32", "int8")
SHARD_POLICIES = ("auto", "files", "records")
# Rows copied into the vector variable per assignment: bounds the transient copy to ~64 MB.
_ASSIGN_CHUNK_BYTES = 64 << 20


def vector_table_paths(manifest):
    """The vector tables a dataset lists in `manifest.extra["vector_tables"]`.

    The entry is either a list of paths relative to the dataset directory (each named by its file stem:
    `vectors/scl.parquet` → `"scl"`) or a `{name: relative path}` dict, where a value may also be a dict
    describing the table with its relative path under `"path"` (what the Taobao-MM reader writes).

    Args:
        manifest: a loaded `Manifest`.

    Returns:
        `{name: absolute path}`, in the manifest's order.
    """
    entry = manifest.extra.get("vector_tables") or {}
    if isinstance(entry, (list, tuple)):
        entry = {os.path.splitext(os.path.basename(p))[0]: p for p in entry}
    base = getattr(manifest, "data_dir", "")
    paths = {}
    for name, rel in entry.items():
        if isinstance(rel, dict):
            rel = rel.get("path")
        if not isinstance(rel, str) or not rel:
            raise ValueError(f"{base or 'dataset'}: manifest extra['vector_tables'][{name!r}] must be a relative "
                             f"path or a dict with a 'path', got {entry[name]!r}")
        paths[name] = os.path.join(base, rel)
    return paths


def resolve_vector_table_path(manifest, vector_table=None, option="vector_table"):
    """Path of a dataset's vector table.

    Args:
        manifest: a loaded `Manifest`.
        vector_table: a name listed in `extra["vector_tables"]` (see `vector_table_paths`), a path, or
            None for the manifest's only table.
        option: how the caller's user names `vector_table` in the errors: the argument (`"vector_table"`)
            or a command-line flag (`"--vector_table"`, as `mm_ads.train` does).

    Returns:
        The table's path; a `ValueError` listing the available names if there is no such table, or
        when `vector_table` is None and the manifest lists none or several.
    """
    tables = vector_table_paths(manifest)
    where = f"dataset {manifest.name!r} ({getattr(manifest, 'data_dir', '?')})"
    choices = "<name | path>" if option.startswith("--") else "<path | VectorTable | VectorJoin>"
    if vector_table is None:
        if len(tables) == 1:
            return next(iter(tables.values()))
        if not tables:
            raise ValueError(
                f"The FeatureSpec has vector features but {where} lists no vector table "
                f"(manifest extra['vector_tables']); pass {option}={choices}, "
                "or use a spec without vector features"
            )
        raise ValueError(f"{where} lists several vector tables {sorted(tables)}; choose one with {option}=<name>")
    if vector_table in tables:
        return tables[vector_table]
    if os.path.exists(vector_table):
        return vector_table
    raise ValueError(
        f"{option}={vector_table!r} is neither a vector table of {where} (it has {sorted(tables)}) "
        "nor an existing file"
    )


def resolve_modality_tables(manifest, vector_table=None, option="vector_table"):
    """The vector tables of a run, one per modality: `[(modality, path, manifest name or None)]`.

    `vector_table` is what `resolve_vector_table_path` takes (one table: the spec's single unnamed modality "",
    as before), or a comma-separated list of several: `"image,text"` (names listed in the manifest, or paths), each
    entry optionally `modality=<name | path>`. A listed name is its own modality name unless `modality=` renames
    it; a path's modality is its file stem. Modalities are distinct `mm_ads.data.spec.check_modality_name` names.

    Example: `--vector_table=image=vectors/effnet.parquet,text=minilm` joins `item_vector_image`,
    `hist_item_vector_image`, `item_vector_text` and `hist_item_vector_text`.
    """
    from mm_ads.data.spec import check_modality_name

    entries = [e.strip() for e in (vector_table or "").split(",")] if vector_table else [None]
    if len(entries) == 1 and (entries[0] is None or "=" not in entries[0] or os.path.exists(entries[0]) or
                              entries[0] in vector_table_paths(manifest)):
        path = resolve_vector_table_path(manifest, entries[0], option=option)
        return [("", path, _manifest_name(manifest, path))]
    out, seen = [], set()
    for entry in entries:
        if not entry:
            raise ValueError(f"{option}={vector_table!r}: an empty entry in the comma-separated list")
        modality, _, value = entry.rpartition("=")
        path = resolve_vector_table_path(manifest, value, option=option)
        name = _manifest_name(manifest, path)
        modality = modality or name or os.path.splitext(os.path.basename(path))[0]
        check_modality_name(modality, f"{option}={vector_table!r}: the table {value!r} gives the modality")
        if modality in seen:
            raise ValueError(f"{option}={vector_table!r}: the modality {modality!r} is given twice")
        seen.add(modality)
        out.append((modality, path, name))
    return out


def _manifest_name(manifest, path):
    return next((n for n, p in vector_table_paths(manifest).items() if p == path), None)


# Kept for callers written before the public name existed.


class VectorJoin:
    """Adds multimodal vectors and their missing flags to parsed CTR batches.

    Item ids are mapped to rows by a `tf.lookup.StaticHashTable` (measured 1.7× faster than
    `tf.lookup.experimental.DenseHashTable` for 52k lookups out of 1M keys); the rows live in a
    non-trainable `tf.Variable` on the CPU, so a 10M × 128 table never becomes a GraphDef constant.
    The variable has one extra all-zero row `N` that absent items and padding slots point to. int8
    tables stay int8 in memory (4× less) and are dequantised after the gather, or passed on as int8
    with `vector_dtype="int8"` (the model multiplies by `join.scale`).

    For every vector feature of the spec (`source` names the id feature):
      * `<name>`: float32 (or int8) `[B, D]` for an item id, `[B, S, D]` for a history;
      * `<name>_missing`: float32 `[B]` / `[B, S]`, 1.0 where a (non-padding) id is not in the table.
    Padding slots of history features (`padding_id`) get a zero vector and flag 0 and are not counted.

    Counters of lookups and misses (padding excluded) are updated inside the input pipeline, i.e. for
    every batch the pipeline produces, including batches prefetched but not yet consumed.

    Build it outside any `tf.distribute` strategy scope (the variable would be copied per replica) and
    share one instance between the train and eval pipelines and across input pipelines.

    Args:
        table: a `VectorTable`.
        spec: the `FeatureSpec`; the joined modality's dim must equal the table's dim.
        vector_dtype: "float32" or "int8" (int8 tables only) for the joined vectors.
        warn_miss_rate: `stats()` logs a warning when the miss rate exceeds this.
        modality: the modality (`FeatureSpec.modalities`) whose vector features this table fills; None: the
            spec's only one. A spec with several modalities takes one `VectorJoin` per modality.

    Example:

    ```python
    join = VectorJoin(VectorTable.load(path), spec)
    features = join(features)  # adds item_vector, hist_item_vector and their flags
    join.stats()["miss_rate"]
    ```
    """

    def __init__(self, table, spec, vector_dtype="float32", warn_miss_rate=0.0, modality=None):
        where = f"Vector table {table.path or '<in memory>'}"
        if vector_dtype not in VECTOR_DTYPES:
            raise ValueError(f"vector_dtype must be one of {VECTOR_DTYPES}, got {vector_dtype!r}")
        if vector_dtype == "int8" and table.dtype != "int8":
            raise ValueError(f"vector_dtype='int8' needs an int8 table; {where} is {table.dtype}")
        modalities = {m.name: m for m in spec.modalities()}
        if not modalities:
            raise ValueError(
                f"The FeatureSpec has no vector features to join from {where}; "
                "use spec.with_vectors(D) to add item_vector / hist_item_vector"
            )
        if modality is None:
            if len(modalities) > 1:
                raise ValueError(f"The FeatureSpec has the modalities {sorted(modalities)}: name the one {where} "
                                 "holds (VectorJoin(..., modality=...))")
            modality = next(iter(modalities))
        if modality not in modalities:
            raise ValueError(f"{where}: the FeatureSpec has no modality {modality!r} (it has {sorted(modalities)})")
        self.modality = modality
        self.vector_features = [f for f in spec if f.role == "vector" and f.modality == modality]
        if table.dim != modalities[modality].dim:
            what = f"vector_dim {spec.vector_dim}" if not modality else \
                f"dim {modalities[modality].dim} for modality {modality!r}"
            raise ValueError(f"{where} has dim {table.dim} but the FeatureSpec has {what}")
        if tf.distribute.has_strategy():
            raise ValueError(
                "Build the VectorJoin (and the dataset) outside strategy.scope(): inside it the vector "
                "variable would be mirrored, one full copy per replica"
            )
        self.path = table.path
        self.dim = table.dim
        self.num_rows = len(table)
        self.dtype = table.dtype
        self.scale = float(table.scale)
        self.encoder_version = table.encoder_version
        self.vector_dtype = vector_dtype
        self.warn_miss_rate = float(warn_miss_rate)
        # Padding only exists in history features; a target item id is always looked up.
        self._padding = {
            f.name: (spec[f.source].padding_id if spec[f.source].role == "history" else None)
            for f in self.vector_features
        }
        store_dtype = tf.int8 if table.dtype == "int8" else tf.float32
        n = self.num_rows
        with tf.device("/cpu:0"):
            self._index = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(
                    np.asarray(table.item_ids, np.int64), np.arange(n, dtype=np.int64)
                ),
                default_value=n,
            )
            # Filled chunk by chunk: never holds a second full copy of the table next to the variable.
            # (scatter_update writes in place; a sliced assign copies the whole variable every time.)
            self._vectors = tf.Variable(
                tf.zeros([n + 1, self.dim], store_dtype), trainable=False, name="item_vectors"
            )  # [N + 1, D]
            chunk = max(1, _ASSIGN_CHUNK_BYTES // max(1, table.vectors[:1].nbytes))
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                self._vectors.scatter_update(
                    tf.IndexedSlices(table.vectors[start:stop], tf.range(start, stop, dtype=tf.int64))
                )
            # [F, 2]: lookups and misses per vector feature.
            self._counts = tf.Variable(
                tf.zeros([len(self.vector_features), 2], tf.int64), trainable=False, name="vector_join_counts"
            )
        logging.info(
            "VectorJoin: %s, %d rows, dim %d, %s (encoder %s) → %s",
            self.path, n, self.dim, self.dtype, self.encoder_version, vector_dtype,
        )

    def __call__(self, features):
        """Adds the vector features and their missing flags.

        Args:
            features: dict of batched tensors holding every `source` id feature (`[B]` or `[B, S]`).

        Returns:
            A new dict with the vector features (`[B, D]` / `[B, S, D]`) and float32 flags added.
        """
        out = dict(features)
        counts = []
        for f in self.vector_features:
            ids = features[f.source]  # [B] or [B, S]
            rows = self._index.lookup(ids)
            absent = tf.equal(rows, self.num_rows)
            padding_id = self._padding[f.name]
            if padding_id is not None:
                padding = tf.equal(ids, padding_id)
                rows = tf.where(padding, tf.constant(self.num_rows, tf.int64), rows)
                absent = tf.logical_and(absent, tf.logical_not(padding))
                looked_up = tf.size(ids, out_type=tf.int64) - tf.math.count_nonzero(padding, dtype=tf.int64)
            else:
                looked_up = tf.size(ids, out_type=tf.int64)
            vectors = tf.gather(self._vectors, rows)  # [B, D] or [B, S, D]
            if self.dtype == "int8" and self.vector_dtype == "float32":
                vectors = tf.cast(vectors, tf.float32) * self.scale
            out[f.name] = vectors
            out[missing_flag_name(f.name)] = tf.cast(absent, tf.float32)  # [B] or [B, S]
            counts.append(tf.stack([looked_up, tf.math.count_nonzero(absent, dtype=tf.int64)]))
        self._counts.assign_add(tf.stack(counts))
        return out

    def stats(self, log=True):
        """Lookups and misses counted so far (padding excluded).

        Args:
            log: log the miss rate (a warning when it exceeds `warn_miss_rate`).

        Returns:
            `{"lookups": n, "missing": m, "miss_rate": m / n, "features": {name: {"lookups", "missing"}}}`.
        """
        counts = self._counts.numpy()
        per_feature = {
            f.name: {"lookups": int(c[0]), "missing": int(c[1])} for f, c in zip(self.vector_features, counts)
        }
        lookups, missing = int(counts[:, 0].sum()), int(counts[:, 1].sum())
        rate = missing / lookups if lookups else 0.0
        if log:
            log_fn = logging.warning if rate > self.warn_miss_rate else logging.info
            log_fn(
                "VectorJoin %s: %d of %d item ids (%.3f%%) have no vector; by feature: %s",
                self.path, missing, lookups, 100.0 * rate, per_feature,
            )
        return {"lookups": lookups, "missing": missing, "miss_rate": rate, "features": per_feature}

    def reset_stats(self):
        """Sets the counters to zero (e.g. between the train and eval passes)."""
        self._counts.assign(tf.zeros_like(self._counts))


def _pipeline_joins(data_dir, vector_table, spec, vector_dtype):
    """The `VectorJoin`s a CTR pipeline applies (checked against the spec: one per modality), [] without vectors."""
    modalities = spec.modalities()
    if not modalities:
        if vector_table is not None and not (isinstance(vector_table, (list, tuple)) and not vector_table):
            raise ValueError("vector_table was given but the FeatureSpec has no vector features; "
                             "use spec.with_vectors(D) to join item_vector / hist_item_vector")
        return []
    if isinstance(vector_table, (list, tuple)):
        joins = list(vector_table)
        if not all(isinstance(j, VectorJoin) for j in joins):
            raise ValueError(f"vector_table: a list must hold VectorJoins, got {[type(j).__name__ for j in joins]}")
    elif isinstance(vector_table, VectorJoin):
        joins = [vector_table]
    elif len(modalities) > 1:
        raise ValueError(f"The FeatureSpec has the modalities {[m.name for m in modalities]}: pass one VectorJoin "
                         "per modality (vector_table=[...])")
    else:
        return [build_vector_join(data_dir, vector_table, spec, vector_dtype=vector_dtype)]
    dims = {m.name: m.dim for m in modalities}
    got = [j.modality for j in joins]
    if sorted(got) != sorted(dims):
        raise ValueError(f"vector_table: VectorJoins for the modalities {got}, but the FeatureSpec has {sorted(dims)}")
    for join in joins:
        if join.dim != dims[join.modality] or join.vector_dtype != vector_dtype:
            raise ValueError(
                f"VectorJoin of {join.path} gives dim {join.dim} {join.vector_dtype}, but the pipeline wants "
                f"dim {dims[join.modality]} {vector_dtype}"
            )
    return joins


def build_vector_join(data_dir, vector_table=None, spec=None, vector_dtype="float32", encoder_version=None,
                      warn_miss_rate=0.0, modality=None):
    """Loads a dataset's vector table and builds its `VectorJoin`.

    Args:
        data_dir: the dataset directory.
        vector_table: a name listed in the manifest's `extra["vector_tables"]` (file stem or dict key), a
            path, a `VectorTable`, or None for the manifest's only table (an error if it lists none or
            several).
        spec: the `FeatureSpec` (default: the manifest's).
        vector_dtype: "float32" or "int8" (see `VectorJoin`).
        encoder_version: when given, the table must have been made by this encoder.
        warn_miss_rate: see `VectorJoin`.
        modality: the spec's modality the table fills (see `VectorJoin`).

    Returns:
        A `VectorJoin`.
    """
    manifest = Manifest.load(data_dir)
    spec = manifest.spec if spec is None else spec
    if not isinstance(vector_table, VectorTable):
        path = resolve_vector_table_path(manifest, vector_table)
        vector_table = VectorTable.load(path, expected_encoder_version=encoder_version)
    return VectorJoin(vector_table, spec, vector_dtype=vector_dtype, warn_miss_rate=warn_miss_rate, modality=modality)


_COUNT_BATCH = 8192  # records counted together by the verification pass
_RECORD_OVERHEAD = 16  # bytes of a TFRecord around its data: length (8), its CRC (4), the data's CRC (4)
_VERIFIED = {}  # (real path, inode, size, mtime_ns) -> record count verified in this process
_VERIFIED_LOCK = threading.Lock()


def _file_key(path):
    st = os.stat(path)
    return os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns


def _locate_stop(path):
    """(records read, byte offset after them, TensorFlow's error or "") of reading `path` record by record."""
    count, offset = 0, 0
    try:
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            count += 1
            offset += len(record) + _RECORD_OVERHEAD
    except tf.errors.OpError as e:
        return count, offset, re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\].*", "", e.message).strip()
    return count, offset, ""


def verify_record_counts(files, expected, what="records"):
    """Checks that every TFRecord file holds the number of records the manifest lists and that every record reads.

    One pass over the files' bytes (batched, files in parallel; the reader checks every record's CRC), once per
    process for a file whose path, inode, size and mtime stay the same. A file that differs is read again record
    by record to say where reading stops.

    Args:
        files: TFRecord paths.
        expected: the manifest's record count of each file.
        what: what the files hold, for the message (e.g. "ctr/train").

    Raises:
        ValueError: naming the file, both counts, and the record index and byte offset where reading stopped
            (with TensorFlow's reader error for a corrupt or cut record).
    """
    todo = []
    with _VERIFIED_LOCK:
        for path, n in zip(files, expected):
            try:
                key = _file_key(path)
            except OSError:
                raise ValueError(f"{what}: {path} is listed in the manifest but cannot be read") from None
            if _VERIFIED.get(key) != n:
                todo.append((path, int(n), key))
    if not todo:
        return

    def count(path):
        return tf.data.TFRecordDataset(path).batch(_COUNT_BATCH).reduce(
            tf.constant(0, tf.int64), lambda total, batch: total + tf.size(batch, out_type=tf.int64))

    counts = tf.data.Dataset.from_tensor_slices([p for p, _, _ in todo]).map(
        count, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    try:
        got = [int(c) for c in counts]
    except tf.errors.OpError:  # a record that does not read: find which file, and where, below
        got = [None] * len(todo)
    for (path, n, key), actual in zip(todo, got):
        if actual == n:
            with _VERIFIED_LOCK:
                _VERIFIED[key] = n
            continue
        records, offset, error = _locate_stop(path)
        if records == n and not error:  # the batched pass failed on another file
            with _VERIFIED_LOCK:
                _VERIFIED[key] = n
            continue
        head = f"{what}: {path} holds {records} readable records, the manifest lists {n}"
        if records > n and not error:
            raise ValueError(f"{head}: the file has records the manifest does not list; re-create the dataset")
        cause = f"TensorFlow's reader: {error}" if error else \
            "the file ends there: it is cut short at a record boundary"
        raise ValueError(f"{head}: reading stopped at record index {records} (byte offset {offset}; {cause}); "
                         "re-create the dataset or restore the file")


def check_first_records(files, parse_spec, what, files_per_batch=256):
    """Parses the first record of every file; a `ValueError` naming the file if one does not parse.

    Args:
        files: TFRecord paths.
        parse_spec: the `tf.io.parse_example` feature dict.
        what: what the files hold, for the message (e.g. "ctr/train").
        files_per_batch: first records parsed together.
    """
    firsts = tf.data.Dataset.from_tensor_slices(files).interleave(
        lambda path: tf.data.Dataset.zip(tf.data.TFRecordDataset(path).take(1), tf.data.Dataset.from_tensors(path)),
        cycle_length=16,
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    for serialized, names in firsts.batch(files_per_batch):
        try:
            tf.io.parse_example(serialized, parse_spec, example_names=names)
        except tf.errors.InvalidArgumentError as e:
            message = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\]", "", e.message)
            raise ValueError(f"{what}: records do not match the FeatureSpec: {message}") from None


def _shard_mode(shard_policy, num_files, num_pipelines):
    if shard_policy not in SHARD_POLICIES:
        raise ValueError(f"shard_policy must be one of {SHARD_POLICIES}, got {shard_policy!r}")
    if shard_policy == "files" and num_files < num_pipelines:
        raise ValueError(f"shard_policy='files' needs at least {num_pipelines} files, the split has {num_files}")
    if shard_policy == "auto":
        return "files" if num_files >= num_pipelines else "records"
    return shard_policy


def make_ctr_dataset(
    data_dir,
    split,
    batch_size,
    *,
    vector_table=None,
    spec=None,
    shuffle=False,
    shuffle_buffer=16384,
    seed=None,
    repeat=False,
    input_context=None,
    shard_policy="auto",
    drop_remainder=False,
    vector_dtype="float32",
    cycle_length=4,
    parallel_reads=False,
    check_files=True,
    record_file_names=False,
    check_counts=True,
):
    """The CTR impressions of one split as batches of `(features, label)`.

    Args:
        data_dir: a canonical dataset directory (see `mm_ads.data.dataset`).
        split: split name, e.g. "train" or "test".
        batch_size: examples per batch of THIS input pipeline. Under `tf.distribute` pass
            `input_context.get_per_replica_batch_size(global_batch_size)`.
        vector_table: where vector features come from when the spec has any: a `VectorJoin` (preferred:
            build it once with `build_vector_join` and share it), a `VectorTable`, a name listed in the
            manifest's `extra["vector_tables"]`, a path, or None for the manifest's only table. A spec with
            several modalities takes a list of `VectorJoin`s, one per modality.
        spec: the `FeatureSpec` to parse and produce (default: the manifest's). Use a spec without vector
            features to skip the join.
        shuffle: shuffle file order (files mode) and records through a `shuffle_buffer`, every epoch anew.
        shuffle_buffer: records held by the record shuffle.
        seed: makes the shuffle reproducible; without it a shuffled pipeline may also interleave files
            non-deterministically (faster). Unshuffled pipelines are always deterministic.
        repeat: repeat forever.
        input_context: a `tf.distribute.InputContext`: this pipeline reads 1/`num_input_pipelines` of the
            split, by files when there are at least as many files as pipelines, else by records (every
            pipeline reads all files and keeps every n-th record).
        shard_policy: "auto" (the rule above), "files" or "records".
        drop_remainder: drop the last partial batch (static batch dimension).
        vector_dtype: "float32", or "int8" to pass int8 vectors of an int8 table on undequantised (the
            model multiplies by `VectorJoin.scale`).
        cycle_length: files read round-robin (fixed, so that the record order does not depend on the
            machine).
        parallel_reads: read those files in parallel threads: for remote file systems with high latency.
            On a local disk it is ~1.8× slower (per-record hand-off between threads), so it is off.
        check_files: parse the first record of every file now and raise a `ValueError` naming the file
            if it does not match the spec (skipped when called inside a `tf.function`).
        record_file_names: every record carries its file name so that a parse error names the file
            (slower; for debugging bad data).
        check_counts: verify every file's records and their number against the manifest now
            (`verify_record_counts`; skipped inside a `tf.function`, like `check_files`).

    Returns:
        A `tf.data.Dataset` of `(features, label)`: `features` holds every spec feature except the label
        with shape `[B] + feature.shape` (ids int64, vectors `[B, D]` / `[B, S, D]`, their float32
        `<name>_missing` flags `[B]` / `[B, S]`); `label` is float32 `[B]`.
    """
    manifest = Manifest.load(data_dir)
    spec = manifest.spec if spec is None else spec
    if spec is None:
        raise ValueError(f"Dataset {data_dir} has no FeatureSpec in its manifest; pass spec=")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    files = manifest.files("ctr", split)
    if not files:
        raise ValueError(f"Dataset {data_dir}: ctr/{split} has no files")

    parse_spec = spec.parse_spec()
    # Not inside a tf.function (e.g. the dataset function ParameterServerStrategy traces for its workers):
    # there the check's loop would become part of the workers' graph (it hangs them). Such callers build
    # the pipeline once eagerly first (the parameter-server trainer does).
    if check_counts and not tf.inside_function():
        rows = manifest.file_rows("ctr", split)
        if rows is None:
            logging.info("ctr/%s of %s: the manifest has no per-file record counts (written before they were "
                         "recorded): the files' record counts are not checked", split, data_dir)
        else:
            verify_record_counts(files, rows, f"ctr/{split}")
    if check_files and not tf.inside_function():
        check_first_records(files, parse_spec, f"ctr/{split}")
    joins = _pipeline_joins(data_dir, vector_table, spec, vector_dtype)
    deterministic = (not shuffle) or seed is not None
    num_pipelines = input_context.num_input_pipelines if input_context is not None else 1
    pipeline_id = input_context.input_pipeline_id if input_context is not None else 0
    mode = _shard_mode(shard_policy, len(files), num_pipelines) if num_pipelines > 1 else None

    ds = tf.data.Dataset.from_tensor_slices(files)
    if mode == "files":
        ds = ds.shard(num_pipelines, pipeline_id)
    # Record mode needs the same record order in every pipeline: file order is then never shuffled.
    if shuffle and mode != "records":
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)

    def read_file(path):
        records = tf.data.TFRecordDataset(path)
        if record_file_names:
            return tf.data.Dataset.zip(records, tf.data.Dataset.from_tensors(path).repeat())
        return records

    ds = ds.interleave(
        read_file,
        cycle_length=max(1, min(len(files), cycle_length)),
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE if parallel_reads else None,
        deterministic=deterministic if parallel_reads else None,
    )
    if mode == "records":
        ds = ds.shard(num_pipelines, pipeline_id)
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)

    label_name = spec.label
    int8_features = [f.name for f in spec.stored_features if f.dtype == "int8"]
    split_name = f"{os.path.join(data_dir, 'ctr', split)} (one of {len(files)} files)"

    def parse(serialized, names=None):
        if names is None:
            names = tf.fill(tf.shape(serialized), split_name)  # [B]
        features = tf.io.parse_example(serialized, parse_spec, example_names=names)  # {name: [B, ...]}
        for name in int8_features:
            features[name] = tf.cast(features[name], tf.int8)
        label = features.pop(label_name)  # [B]
        for join in joins:
            features = join(features)
        return features, label

    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    if input_context is not None:
        options = tf.data.Options()
        # Already sharded here; a second automatic sharding by tf.distribute would drop data.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        ds = ds.with_options(options)
    return ds
