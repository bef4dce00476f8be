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
        columns: ordered `{feature name: (values [n, k] int64 or float32, is_float)}`.

    Returns:
        A numpy object array of n serialized `tf.train.Example` byte strings.
    """
    import tensorflow as tf

    n = len(next(iter(columns.values()))[0])
    one = tf.ones([n, 1], tf.int32)
    entries = []
    for name, (values, is_float) in columns.items():
        values = tf.constant(values, tf.float32 if is_float else tf.int64)  # [n, k]
        kind = ("FloatList", "float_list") if is_float else ("Int64List", "int64_list")
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


def check_columns(columns, spec, where):
    """Checks that `columns` hold every stored feature with the spec's shape; returns the row count."""
    n = None
    for f in spec.stored_features:
        if f.name not in columns:
            raise ValueError(f"{where}: missing column {f.name!r} required by the FeatureSpec")
        arr = np.asarray(columns[f.name])
        if arr.shape[1:] != f.shape:
            raise ValueError(f"{where}: column {f.name!r} has per-row shape {arr.shape[1:]}, expected {f.shape}")
        if f.dtype == "float32" and not np.all(np.isfinite(arr)):
            bad = int(np.argwhere(~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1))[0][0])
            raise ValueError(f"{where}: column {f.name!r} has NaN/inf at row {bad}")
        if n is None:
            n = len(arr)
        elif len(arr) != n:
            raise ValueError(f"{where}: column {f.name!r} has {len(arr)} rows, others have {n}")
    return n or 0


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

    def __enter__(self):
        self._ctx = io_utils.atomic_directory(self.output_dir, overwrite=self._overwrite)
        self.tmp_dir = self._ctx.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
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
        n = check_columns(columns, spec, f"ctr/{split}")
        num_shards = max(1, min(int(num_shards), max(n, 1)))
        os.makedirs(os.path.join(self.tmp_dir, "ctr"), exist_ok=True)
        feats = spec.stored_features
        # reshape to an explicit width: `reshape(n, -1)` is ambiguous (and fails) for an empty split
        cols = {f.name: (np.asarray(columns[f.name]).reshape(n, int(np.prod(f.shape))), f.dtype == "float32")
                for f in feats}
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
        return {n: np.zeros((0,), np.float32 if parse[n].dtype == tf.float32 else np.int64) for n in names}
    return {n: np.concatenate([p[n] for p in parts]) for n in names}
