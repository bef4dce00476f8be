"""The canonical dataset layout shared by the synthetic world and every real-format reader.

```
DIR/
  manifest.json                 spec, splits with files and row counts (per file for ctr), provenance, seed,
                                extras
  ctr/<split>-NNNNN-of-MMMMM.tfrecord
                                impressions as tf.train.Example, one feature per stored FeatureSpec entry
  items.parquet                 item catalogue (item_id, attributes, created_at, title, image bytes)
  item_stats.parquet            item_id, train_count (impressions in the train split), first_seen
  pretrain/<kind>-<split>.parquet
                                pre-training pairs: query, positive, negative (+ their item ids)
  vectors/<name>.parquet        optional item → vector tables (see `mm_ads.data.vectors`)
```

Every component is optional except the manifest; the manifest lists exactly what exists.
A dataset is written into a temporary sibling directory and renamed into place at the end,
so a crash or a malformed input never leaves a half-written dataset behind.
"""

import datetime
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mm_ads.data.spec import FeatureSpec
from mm_ads.utils import io as io_utils

MANIFEST = "manifest.json"
FORMAT_VERSION = 1

# Pre-training pair tables: `query`/`positive`/`negative` are strings (text) or encoded image bytes
# (image); `*_id` are int64 item ids (negative_id = -1 when there is no hard negative).
PAIR_COLUMNS = ("query", "positive", "negative", "positive_id", "negative_id")
# Optional: the item id of the query itself, when queries are catalogue items (e.g. MovieLens co-liked pairs:
# query = the text of the movie liked before). SCL masks that item out of the query's negatives and Acc@N out
# of its candidates; -1 = the query is not an item.
QUERY_ITEM_ID = "query_item_id"
# Optional: an id of what makes two positives "the same" for the contrastive loss when that is coarser than the
# item (e.g. the product of a catalogue image, when a product has several images). SCL masks keys with the
# query's positive group as false negatives (in the batch and the queue) instead of keys of the same item only.
POSITIVE_GROUP_ID = "positive_group_id"


class Manifest:
    """What a dataset directory holds. Load with `Manifest.load(dir)`."""

    def __init__(self, name, format, spec=None, seed=None, provenance=None, components=None, extra=None):
        self.name = name
        self.format = format
        self.spec = spec
        self.seed = seed
        self.provenance = dict(provenance or {})
        self.components = dict(components or {})
        self.extra = dict(extra or {})

    def to_json(self):
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "format": self.format,
            "spec": self.spec.to_json() if self.spec is not None else None,
            "seed": self.seed,
            "provenance": self.provenance,
            "components": self.components,
            "extra": self.extra,
        }

    @classmethod
    def load(cls, data_dir):
        path = os.path.join(data_dir, MANIFEST)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} not found: {data_dir} is not an mm_ads dataset directory "
                "(create one with `python -m mm_ads.data.synthetic` or `python -m mm_ads.data.prepare`)"
            )
        try:
            with open(path) as f:
                obj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        version = obj.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        spec = FeatureSpec.from_json(obj["spec"]) if obj.get("spec") else None
        m = cls(obj["name"], obj["format"], spec, obj.get("seed"), obj.get("provenance"),
                obj.get("components"), obj.get("extra"))
        m.data_dir = data_dir
        return m

    def files(self, component, split):
        """Absolute paths of a component's split; a clear error if it is absent."""
        try:
            entry = self.components[component][split]
        except KeyError:
            have = {c: sorted(s) for c, s in self.components.items()}
            raise KeyError(f"Dataset {self.name!r} has no {component}/{split}; it has {have}") from None
        base = getattr(self, "data_dir", "")
        return [os.path.join(base, p) for p in entry["files"]]

    def has_split(self, component, split):
        """Whether `component` has a split named `split` ("" never)."""
        return bool(split) and split in self.components.get(component, {})

    def validation_split(self, valid_split, eval_split):
        """`valid_split` when the `ctr` component has it and it is not `eval_split`, else None: where choices
        (the training epoch, a smoothing) are made apart from the split whose metrics are reported."""
        return valid_split if valid_split != eval_split and self.has_split("ctr", valid_split) else None

    def num_rows(self, component, split):
        return self.components[component][split]["num_rows"]

    def file_rows(self, component, split):
        """Rows of each file of a split (in `files` order), or None when the manifest does not say.

        Manifests list them as `file_rows` (written since the input pipeline checks them); an older manifest
        without them still says it for a split of one file (its `num_rows`).
        """
        entry = self.components[component][split]
        rows = entry.get("file_rows")
        if rows is None:
            return [int(entry["num_rows"])] if len(entry["files"]) == 1 else None
        if len(rows) != len(entry["files"]) or any(int(r) < 0 for r in rows):
            raise ValueError(f"Dataset {self.name!r}: {component}/{split} lists {len(entry['files'])} files but "
                             f"file_rows {rows}")
        return [int(r) for r in rows]

    def summary(self):
        """A short human-readable description."""
        lines = [f"dataset {self.name!r} (format {self.format}, seed {self.seed})"]
        if self.spec is not None:
            lines.append(f"  spec: S={self.spec.seq_len} D={self.spec.vector_dim} "
                         f"tables={self.spec.tables()}")
        for comp, splits in sorted(self.components.items()):
            parts = ", ".join(f"{s}={v['num_rows']:,}" for s, v in sorted(splits.items()))
            lines.append(f"  {comp}: {parts}")
        for k, v in sorted(self.extra.get("stats", {}).items()):
            lines.append(f"  {k}: {v}")
        return "\n".join(lines)


ITEM_STATS_COLUMNS = ("item_id", "train_count")


def read_item_stats(manifest):
    """`(item ids int64 [N], training impressions int64 [N])` of a dataset's `item_stats` component, or None.

    A file that is not readable Parquet or lacks the `ITEM_STATS_COLUMNS` raises a `ValueError` naming it.
    """
    if "item_stats" not in manifest.components:
        return None
    path = manifest.files("item_stats", "all")[0]
    try:
        table = pq.read_table(path, columns=list(ITEM_STATS_COLUMNS))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist, but the manifest lists it (item_stats)") from None
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        raise ValueError(f"{path} is not a readable item_stats table with columns {list(ITEM_STATS_COLUMNS)} "
                         f"({e}); re-create the dataset") from e
    return (table.column("item_id").to_numpy().astype(np.int64),
            table.column("train_count").to_numpy().astype(np.int64))


def serialize_examples(columns):
    """Serialises rows as `tf.train.Example` protos, vectorised (C++ `encode_proto`, ~3× Python protobuf).

    Args:
        columns: ordered `{feature name: (values [n, k], kind)}`, kind "int64", "float32" or "string" (bytes or
            str values).

    Returns:
        A numpy object array of n serialized `tf.train.Example` byte strings.
    """
    import tensorflow as tf

    n = len(next(iter(columns.values()))[0])
    one = tf.ones([n, 1], tf.int32)
    entries = []
    lists = {"float32": (tf.float32, "FloatList", "float_list"), "int64": (tf.int64, "Int64List", "int64_list"),
             "string": (tf.string, "BytesList", "bytes_list")}
    for name, (values, kind) in columns.items():
        dtype, *kind = lists[kind]
        values = tf.constant(values, dtype)  # [n, k]
        value_list = tf.io.encode_proto(sizes=tf.fill([n, 1], values.shape[1]), values=[values],
                                        field_names=["value"], message_type=f"tensorflow.{kind[0]}")
        feature = tf.io.encode_proto(sizes=one, values=[value_list[:, None]], field_names=[kind[1]],
                                     message_type="tensorflow.Feature")
        entries.append(tf.io.encode_proto(sizes=tf.ones([n, 2], tf.int32),
                                          values=[tf.fill([n, 1], name), feature[:, None]],
                                          field_names=["key", "value"],
                                          message_type="tensorflow.Features.FeatureEntry"))
    features = tf.io.encode_proto(sizes=tf.fill([n, 1], len(entries)), values=[tf.stack(entries, 1)],
                                  field_names=["feature"], message_type="tensorflow.Features")
    examples = tf.io.encode_proto(sizes=one, values=[features[:, None]], field_names=["features"],
                                  message_type="tensorflow.Example")
    return examples.numpy()


def numpy_dtype(feature):
    """The numpy dtype of a stored feature's column as `conform_columns` returns it (strings: bytes objects)."""
    return {"float32": np.float32, "string": object}.get(feature.dtype, np.int64)


def empty_columns(spec):
    """Columns of zero rows for every stored feature (an empty split)."""
    return {f.name: np.zeros((0,) + f.shape, numpy_dtype(f)) for f in spec.stored_features}


def _plain(value):
    """A numpy scalar as its Python value (for messages: `'teacher'`, not `np.str_('teacher')`)."""
    return value.item() if isinstance(value, np.generic) else value


def _row(arr, bad):
    """Index of the first row of `arr` [n, ...] where the bool array `bad` (same shape) holds."""
    return int(np.argmax(bad.reshape(len(arr), -1).any(axis=1)))


def _describe(f):
    kind = "" if f.kind == "id" else f" {f.kind}"
    return f"feature {f.name!r} ({f.dtype}{kind}{' ' + str(list(f.shape)) if f.shape else ''})"


def _tags(values, f, where, first_row, counts):
    """Variable-length lists (or a padded [n, m] array) → padded [n, M] of the feature's values."""
    width = f.shape[0]
    pad = b"" if f.dtype == "string" else f.padding_id
    if isinstance(values, np.ndarray) and values.ndim == 2 and values.dtype != object:
        if values.shape[1] <= width:
            out = np.full((len(values), width), pad, values.dtype if f.dtype != "string" else object)
            out[:, :values.shape[1]] = values
            return out
        values = list(values)  # wider than M: the lengths below decide (trailing padding is not a value)
    rows = []
    truncated = 0
    for i, row in enumerate(values):
        row = [] if row is None else list(row)
        while row and (row[-1] == pad or (f.dtype == "string" and row[-1] == "")):
            row.pop()  # trailing padding of a padded row
        if len(row) > width:
            if not f.truncate:
                raise ValueError(f"{where}: row {first_row + i}: {_describe(f)} has {len(row)} values, more than its "
                                 f"maximum {width}: {[_plain(v) for v in row[:width + 3]]!r}; raise the shape or "
                                 "declare truncate=True (keeps the first values, counted)")
            row = row[:width]
            truncated += 1
        rows.append(row + [pad] * (width - len(row)))
    if truncated:
        counts[f.name]["truncated"] = counts[f.name].get("truncated", 0) + truncated
    if not rows:
        return np.zeros((0, width), numpy_dtype(f))
    return np.array(rows, dtype=object)


def _as_int64(arr, f, where, first_row):
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            i = _row(arr, bad)
            raise ValueError(f"{where}: row {first_row + i}: {_describe(f)} is declared int64 but holds "
                             f"{arr[i].tolist()!r}")
        return arr.astype(np.int64)
    flat = arr.reshape(len(arr), -1)
    for i, row in enumerate(flat):
        for v in row:
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{where}: row {first_row + i}: {_describe(f)} is declared int64 but holds "
                                 f"{_plain(v)!r} ({type(_plain(v)).__name__}); declare dtype 'string' for string ids "
                                 "(hashed by the model)")
    return arr.astype(np.int64)


def _as_float32(arr, f, where, first_row, counts):
    if arr.dtype.kind not in "iubf":
        flat = arr.reshape(len(arr), -1)
        for i, row in enumerate(flat):
            for v in row:
                if isinstance(v, (str, bytes)) or not isinstance(v, (int, float, np.integer, np.floating)):
                    raise ValueError(f"{where}: row {first_row + i}: {_describe(f)} is declared float32 but holds "
                                     f"{_plain(v)!r} ({type(_plain(v)).__name__})")
    arr = arr.astype(np.float32)
    nan = np.isnan(arr)
    if nan.any():
        if f.nan_value is None:
            raise ValueError(f"{where}: row {first_row + _row(arr, nan)}: {_describe(f)} is NaN"
                             + ("; declare nan_value=<float> to replace NaNs (counted)" if f.kind == "numeric" else ""))
        arr = np.where(nan, np.float32(f.nan_value), arr)
        counts[f.name]["nan_filled"] = counts[f.name].get("nan_filled", 0) + int(nan.sum())
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: row {first_row + _row(arr, ~np.isfinite(arr))}: {_describe(f)} is inf")
    return arr


def _as_bytes(arr, f, where, first_row):
    if arr.dtype.kind == "S":
        return arr.astype(object)
    if arr.dtype.kind == "U":
        return np.char.encode(arr, "utf-8").astype(object)
    out = np.empty(arr.shape, object)
    flat, dst = arr.reshape(len(arr), -1), out.reshape(len(arr), -1)
    for i, row in enumerate(flat):
        for j, v in enumerate(row):
            if isinstance(v, bytes):
                dst[i, j] = v
            elif isinstance(v, str):
                dst[i, j] = v.encode("utf-8")
            else:
                raise ValueError(f"{where}: row {first_row + i}: {_describe(f)} is declared string but holds {v!r} "
                                 f"({type(v).__name__}); give its ids as strings")
    return out


def conform_columns(columns, spec, where, first_row=0, fallbacks=None):
    """Checks columns against the spec's stored features and converts them to what the records hold.

    Every stored feature must have a column of the spec's per-row shape (`tags`: a padded `[n, M]` array, or one
    list per row of at most M values, padded here) and values of its dtype: int64 columns take integers only (a
    string is an error: declare the feature `dtype="string"`), float32 columns numbers without NaN or inf, string
    columns `str`/`bytes`. A feature's declared fallback replaces the error and is counted in `fallbacks`:
    `nan_value` (a NaN becomes that value, `"nan_filled"`), `truncate` (a tags list keeps its first M values,
    `"truncated"`).

    Args:
        columns: `{feature name: array-like [n, ...]}`.
        spec: the `FeatureSpec`.
        where: what the columns are, for the messages (e.g. "ctr/train").
        first_row: the row number of the first row, for the messages (a split written in chunks).
        fallbacks: optional `{feature: {"nan_filled": k, "truncated": k}}` the counts are added to.

    Returns:
        `({name: np.ndarray [n, *shape]} (int64, float32, or bytes objects for strings), n)`.

    Raises:
        ValueError: naming `where`, the row and the feature.
    """
    counts = fallbacks if fallbacks is not None else {}
    out, n = {}, None
    for f in spec.stored_features:
        if f.name not in columns:
            raise ValueError(f"{where}: missing column {f.name!r} required by the FeatureSpec")
        counts.setdefault(f.name, {})
        col = columns[f.name]
        arr = _tags(col, f, where, first_row, counts) if f.kind == "tags" else np.asarray(col)
        if arr.shape[1:] != f.shape:
            raise ValueError(f"{where}: column {f.name!r} has per-row shape {arr.shape[1:]}, expected {f.shape}")
        if f.dtype == "string":
            arr = _as_bytes(arr, f, where, first_row)
        elif f.dtype == "float32":
            arr = _as_float32(arr, f, where, first_row, counts)
        else:
            arr = _as_int64(arr, f, where, first_row)
        if not counts[f.name]:
            del counts[f.name]
        out[f.name] = arr
        if n is None:
            n = len(arr)
        elif len(arr) != n:
            raise ValueError(f"{where}: column {f.name!r} has {len(arr)} rows, others have {n}")
    return out, n or 0


class DatasetWriter:
    """Writes a dataset directory atomically.

    Example:

    ```python
    with DatasetWriter(out_dir, name="demo", format="synthetic", spec=spec, seed=1) as w:
        w.write_ctr("train", columns, num_shards=4)
        w.write_parquet("items", None, items_table)
    ```
    """

    def __init__(self, output_dir, name, format, spec=None, seed=None, provenance=None, overwrite=False):
        self.output_dir = output_dir
        self.manifest = Manifest(name, format, spec, seed, provenance)
        self.manifest.provenance.setdefault(
            "created_utc", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        )
        self._overwrite = overwrite
        self._ctx = None
        self.tmp_dir = None
        # {feature: {"nan_filled": k, "truncated": k}}: the fallbacks features declared, as used (`conform_columns`)
        self.fallbacks = {}

    def __enter__(self):
        self._ctx = io_utils.atomic_directory(self.output_dir, overwrite=self._overwrite)
        self.tmp_dir = self._ctx.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if self.fallbacks:
                self.manifest.extra["feature_fallbacks"] = self.fallbacks
            io_utils.write_json(os.path.join(self.tmp_dir, MANIFEST), self.manifest.to_json())
        return self._ctx.__exit__(exc_type, exc, tb)

    def _register(self, component, split, rel_files, num_rows, file_rows=None):
        entry = {"files": rel_files, "num_rows": int(num_rows)}
        if file_rows is not None:
            entry["file_rows"] = [int(r) for r in file_rows]
        self.manifest.components.setdefault(component, {})[split or "all"] = entry

    def write_ctr(self, split, columns, num_shards=1, progress=None):
        """Writes impressions (`{feature: array [N, ...]}`) as `num_shards` TFRecord files."""
        import tensorflow as tf

        spec = self.manifest.spec
        columns, n = conform_columns(columns, spec, f"ctr/{split}", fallbacks=self.fallbacks)
        num_shards = max(1, min(int(num_shards), max(n, 1)))
        os.makedirs(os.path.join(self.tmp_dir, "ctr"), exist_ok=True)
        feats = spec.stored_features
        # reshape to an explicit width: `reshape(n, -1)` is ambiguous (and fails) for an empty split
        cols = {f.name: (columns[f.name].reshape(n, int(np.prod(f.shape))),
                         f.dtype if f.dtype in ("float32", "string") else "int64") for f in feats}
        rel = []
        bounds = np.linspace(0, n, num_shards + 1).astype(np.int64)
        chunk = 65536
        for s in range(num_shards):
            name = f"ctr/{split}-{s:05d}-of-{num_shards:05d}.tfrecord"
            rel.append(name)
            with tf.io.TFRecordWriter(os.path.join(self.tmp_dir, name)) as w:
                for lo in range(bounds[s], bounds[s + 1], chunk):
                    hi = min(lo + chunk, bounds[s + 1])
                    for record in serialize_examples({k: (v[lo:hi], f) for k, (v, f) in cols.items()}):
                        w.write(record)
                    if progress is not None:
                        progress.add(hi - lo)
        self._register("ctr", split, rel, n, file_rows=np.diff(bounds))
        return rel

    def write_parquet(self, component, split, table, row_group_size=65536):
        """Writes a pyarrow Table as `<component>.parquet` or `<component>-<split>.parquet`."""
        if not isinstance(table, pa.Table):
            table = pa.table(table)
        if component.startswith("pretrain/"):
            missing = [c for c in PAIR_COLUMNS if c not in table.column_names]
            if missing:
                raise ValueError(f"{component}/{split}: pair table lacks columns {missing}")
        name = f"{component}.parquet" if split is None else f"{component}-{split}.parquet"
        path = os.path.join(self.tmp_dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(table, path, row_group_size=row_group_size)
        self._register(component, split, [name], table.num_rows)
        return name

    def write_item_stats(self, train_item_ids, timestamps=None):
        """Per-item training frequency (the basis of the frequency-group slices)."""
        ids, counts = np.unique(np.asarray(train_item_ids, np.int64), return_counts=True)
        cols = {"item_id": ids, "train_count": counts.astype(np.int64)}
        if timestamps is not None:
            order = np.argsort(np.asarray(train_item_ids), kind="stable")
            ts = np.asarray(timestamps, np.int64)[order]
            sorted_ids = np.asarray(train_item_ids, np.int64)[order]
            first = np.minimum.reduceat(ts, np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]))
            cols["first_seen"] = first
        return self.write_parquet("item_stats", None, pa.table(cols))


def read_ctr_columns(data_dir, split, names):
    """`{name: np.ndarray}` of some stored features of a dataset's `ctr/<split>` (parsed in large batches)."""
    import tensorflow as tf

    manifest = Manifest.load(data_dir)
    parse = manifest.spec.parse_spec()
    wanted = {n: parse[n] for n in names}
    ds = tf.data.TFRecordDataset(manifest.files("ctr", split)).batch(1 << 16).map(
        lambda b: tf.io.parse_example(b, wanted))
    parts = list(ds.as_numpy_iterator())
    if not parts:
        return {n: np.zeros((0,) + tuple(parse[n].shape), {tf.float32: np.float32, tf.string: object}.get(
            parse[n].dtype, np.int64)) for n in names}
    return {n: np.concatenate([p[n] for p in parts]) for n in names}
