"""Reader for the public Taobao-MM parquet layout (alimama-tech/MUSE `data_demo/`, HuggingFace `TaoBao-MM`).

Input layout (`INPUT` is a directory; every component may be one file `<stem>.parquet`, several files
`<stem>*.parquet` — e.g. `train_samples.part_0000.parquet` — or a directory `<stem>/` of parquet files):

```
INPUT/
  train_samples*.parquet        one impression per row
      label_0     list<int8>    [click, ...]; the CTR label is label_0[0] (0 or 1)
      129_1       int64         user id
      205         int64         target item id
  test_samples*.parquet         optional, same columns
  train_user_features*.parquet  one row per user (129_1 unique), joined to train_samples by 129_1
      129_1       int64         user id
      130_1..130_5 int64        user profile ids
      150_2_180   list<int64>   lifelong behaviour sequence of item ids (up to 1000), oldest first, newest last
      151_2_180   list<int64>   the category id of each behaviour (same length as 150_2_180)
  test_user_features*.parquet   optional, same columns, joined to test_samples
  item_features*.parquet        one row per item (205 unique), left-joined to the samples by 205
      205         int64         item id
      206         int64         item category (the id space of 151_2_180)
      213, 214    int64         further item attributes
  scl_embedding*.parquet        optional: item → 128-d SCL vector
      205         int64         item id
      205_c       list<int8>    value = int8 / 127 (the public p90 table); list<float> is quantised here
```

Every id is a signed 64-bit hash; 0 means null / padding (also what null parquet values become).
The data carries no timestamps, so the output has no meta features and item_stats has no first_seen.

Output (see `mm_ads.data.dataset`): `ctr/{train,test}` TFRecords with the FeatureSpec below, `item_stats`
from the train split, and `vectors/scl.parquet` (int8, scale 1/127, `encoder_version =
"taobao_mm_scl_int8_" + 12 hex digits of a SHA-256 over the sorted ids and vectors`) whose relative path,
scale, dim and version are in `manifest.extra["vector_tables"]["scl"]`.

FeatureSpec (raw hashed ids; every table has `num_buckets` rows and `id_mapping="hash"`: the model hashes ids
into the rows itself, see `mm_ads.layers.SparseEmbedding`):
  `user_id` (129_1, table user), `user_profile_1..5` (130_*, own tables), `item_id` (205, table item),
  `item_attr_206` (table category), `item_attr_213`, `item_attr_214` (own tables),
  `hist_item_id` [S] (150_2_180, table item), `hist_category_id` [S] (151_2_180, table category),
  `label` (float32), plus `item_vector` / `hist_item_vector` joined from the SCL table when present.

Decisions:
  * History = the last S entries of 150_2_180 / 151_2_180, kept in order (most recent last) and
    left-padded with 0. The lists are not padded in the data (the demo has 19 rows of exactly 1000 and
    one of 351 entries) and carry no timestamps; the team's loader (MUSE `utils/muse_dataset.py`) keeps
    `hist[-max_seq_len:]` and pads on the left ("older interactions on the left, recent on the right"),
    and their short sequence 150_1_180 is "obtained by truncating the long sequence from the newer end".
    This is also the layout of the synthetic world and the MovieLens reader.
  * 206 shares the `category` table with 151_2_180: in the demo data 5 of the 10 item_features 206 values
    occur in the 151_2_180 sequences while no 213/214 value does (and no 206 value occurs in 150_2_180);
    MUSE builds one vocabulary for 151_2_180 and 206 (and one for 150_2_180 and 205) the same way.
  * A sample whose user is absent from the user features: `on_missing_user="error"` (default) raises
    naming the file and row; `"skip"` drops it; `"null"` keeps it with profile and history ids 0 — the
    official MUSE preprocessing (a LEFT JOIN with nulls filled by 0). Skips/nulls are counted in
    `manifest.extra["stats"]`. (In the 10-row demo files no sample's user is in the user features.)
  * A sample whose item is absent from item_features gets attributes 0 (null), counted in the stats.
"""

import glob
import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from absl import logging

from mm_ads.data.dataset import DatasetWriter
from mm_ads.data.readers.common import CtrSplitWriter, DataFormatError, ItemCounter
from mm_ads.data.spec import Feature, FeatureSpec
from mm_ads.data.vectors import quantize_int8, write_vector_table
from mm_ads.utils.progress import Progress

FORMAT = "taobao_mm"
USER = "129_1"
PROFILE = ("130_1", "130_2", "130_3", "130_4", "130_5")
ITEM = "205"
ITEM_ATTRS = ("206", "213", "214")
HIST_ITEMS = "150_2_180"
HIST_CATEGORIES = "151_2_180"
LABEL = "label_0"
VECTOR = "205_c"
SCL_SCALE = 1.0 / 127.0
MISSING_USER_POLICIES = ("error", "skip", "null")
_BATCH = 65_536


def find_component(input_dir, stem, required=True):
    """Parquet files of one component: `<stem>.parquet`, `<stem>*.parquet` or `<stem>/*.parquet`, sorted."""
    files = sorted(glob.glob(os.path.join(glob.escape(input_dir), stem + "*.parquet")))
    sub = os.path.join(input_dir, stem)
    if os.path.isdir(sub):
        files += sorted(glob.glob(os.path.join(glob.escape(sub), "*.parquet")))
    if not files and required:
        raise FileNotFoundError(
            f"{input_dir}: no {stem}*.parquet (or {stem}/*.parquet) found; expected the Taobao-MM layout "
            "described in mm_ads/data/readers/taobao_mm.py"
        )
    return files


def _open(path, columns):
    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataFormatError(path, "file", "(whole file)", "a readable Parquet file", str(e)) from e
    names = f.schema_arrow.names
    for c in columns:
        if c not in names:
            raise DataFormatError(path, "schema", c, f"a column {c!r} (have {names})")
    return f


def _batches(paths, columns):
    """Yields (file index, path, first row, RecordBatch) over the files, reading only `columns`."""
    for i, path in enumerate(paths):
        f = _open(path, columns)
        row = 0
        for batch in f.iter_batches(batch_size=_BATCH, columns=list(columns)):
            yield i, path, row, batch
            row += batch.num_rows


def _where(file_index, row0, n):
    """[n, 2] (file index, row) of a batch, for error messages after sorting."""
    return np.stack([np.full(n, file_index, np.int64), row0 + np.arange(n, dtype=np.int64)], axis=1)


def _sorted_unique(ids, where, paths, field, what):
    """Sorts `ids` (with their `where` rows); raises naming the second occurrence of a duplicate."""
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    dup = np.flatnonzero(ids[1:] == ids[:-1])
    if len(dup):
        f, r = where[order[dup[0] + 1]]
        raise DataFormatError(paths[f], f"row {r} (0-based)", field, f"each id once in {what}", int(ids[dup[0]]))
    return ids, order


def _ids(batch, name, path, row0):
    """An integer id column as int64 numpy, nulls → 0."""
    col = batch.column(name)
    if not pa.types.is_integer(col.type):
        raise DataFormatError(path, f"rows {row0}..{row0 + len(col) - 1} (0-based)", name,
                              "an integer id column", str(col.type))
    return pc.fill_null(col, 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _list_parts(col, name, path, row0, integer=True):
    """(lengths [n], row start offsets into values [n], values numpy) of a list column; null lists are empty."""
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise DataFormatError(path, f"rows {row0}..{row0 + len(col) - 1} (0-based)", name,
                              "a list column", str(col.type))
    vtype = col.type.value_type
    if integer and not pa.types.is_integer(vtype):
        raise DataFormatError(path, f"rows {row0}..{row0 + len(col) - 1} (0-based)", name,
                              "a list of integers", str(col.type))
    offsets = col.offsets.to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    if col.null_count:
        lengths[col.is_null().to_numpy(zero_copy_only=False)] = 0
    values = pc.fill_null(col.values, 0).to_numpy(zero_copy_only=False)
    return lengths, offsets[:-1], values


def tail_window(lengths, starts, values, seq_len):
    """The last `seq_len` values of each list, most recent last, left-padded with 0 → int64 [n, seq_len]."""
    keep = np.minimum(lengths, seq_len)
    pos = np.arange(seq_len)[None, :]
    valid = pos >= (seq_len - keep)[:, None]
    idx = (starts + lengths)[:, None] - seq_len + pos  # [n, S]
    out = np.where(valid, values[np.where(valid, idx, 0)] if len(values) else 0, 0)
    return out.astype(np.int64)


class _UserTable:
    """User features keyed by 129_1, with histories already cut to S."""

    def __init__(self, paths, seq_len):
        ids, profiles, hist_items, hist_cats, where = [], [], [], [], []
        for fi, path, row0, batch in _batches(paths, (USER,) + PROFILE + (HIST_ITEMS, HIST_CATEGORIES)):
            ids.append(_ids(batch, USER, path, row0))
            profiles.append(np.stack([_ids(batch, p, path, row0) for p in PROFILE], axis=1))
            li, si, vi = _list_parts(batch.column(HIST_ITEMS), HIST_ITEMS, path, row0)
            lc, sc, vc = _list_parts(batch.column(HIST_CATEGORIES), HIST_CATEGORIES, path, row0)
            bad = np.flatnonzero(li != lc)
            if len(bad):
                r = int(bad[0])
                raise DataFormatError(path, f"row {row0 + r} (0-based)", HIST_CATEGORIES,
                                      f"one category per behaviour ({li[r]} entries like {HIST_ITEMS})",
                                      f"{lc[r]} entries")
            hist_items.append(tail_window(li, si, vi, seq_len))
            hist_cats.append(tail_window(lc, sc, vc, seq_len))
            where.append(_where(fi, row0, len(li)))
        self.paths = paths
        if not ids:
            raise DataFormatError(paths[0], "file", USER, "at least one user row")
        self.ids, order = _sorted_unique(np.concatenate(ids), np.concatenate(where), paths, USER,
                                         "the user features")
        self.profiles = np.concatenate(profiles)[order]
        self.hist_items = np.concatenate(hist_items)[order]
        self.hist_cats = np.concatenate(hist_cats)[order]

    def lookup(self, user_ids):
        """(row [n], found bool [n])."""
        pos = np.clip(np.searchsorted(self.ids, user_ids), 0, len(self.ids) - 1)
        return pos, self.ids[pos] == user_ids


class _ItemTable:
    """item_features keyed by 205."""

    def __init__(self, paths):
        ids, attrs, where = [], [], []
        for fi, path, row0, batch in _batches(paths, (ITEM,) + ITEM_ATTRS):
            ids.append(_ids(batch, ITEM, path, row0))
            attrs.append(np.stack([_ids(batch, a, path, row0) for a in ITEM_ATTRS], axis=1))
            where.append(_where(fi, row0, batch.num_rows))
        if not ids:
            self.ids, self.attrs = np.zeros((0,), np.int64), np.zeros((0, len(ITEM_ATTRS)), np.int64)
            return
        self.ids, order = _sorted_unique(np.concatenate(ids), np.concatenate(where), paths, ITEM, "item_features")
        self.attrs = np.concatenate(attrs)[order]

    def lookup(self, item_ids):
        if len(self.ids) == 0:
            return np.zeros((len(item_ids), len(ITEM_ATTRS)), np.int64), np.zeros(len(item_ids), bool)
        pos = np.clip(np.searchsorted(self.ids, item_ids), 0, len(self.ids) - 1)
        found = self.ids[pos] == item_ids
        return np.where(found[:, None], self.attrs[pos], 0), found


def make_spec(seq_len, num_buckets, vector_dim=0):
    """The Taobao-MM FeatureSpec (see the module docstring)."""
    def ids(name, role, table, shape=()):
        return Feature(name, role, shape=shape, table=table, num_buckets=num_buckets, id_mapping="hash")

    feats = [ids("user_id", "user", "user")]
    feats += [ids(f"user_profile_{i + 1}", "user", f"user_profile_{i + 1}") for i in range(len(PROFILE))]
    feats += [
        ids("item_id", "item", "item"),
        ids("item_attr_206", "item", "category"),
        ids("item_attr_213", "item", "item_attr_213"),
        ids("item_attr_214", "item", "item_attr_214"),
        ids("hist_item_id", "history", "item", shape=(seq_len,)),
        ids("hist_category_id", "history", "category", shape=(seq_len,)),
        Feature("label", "label", dtype="float32"),
    ]
    spec = FeatureSpec(feats, seq_len, 0)
    return spec.with_vectors(vector_dim) if vector_dim else spec


def _labels(batch, path, row0):
    lengths, starts, values = _list_parts(batch.column(LABEL), LABEL, path, row0)
    bad = np.flatnonzero(lengths < 1)
    if len(bad):
        raise DataFormatError(path, f"row {row0 + int(bad[0])} (0-based)", LABEL,
                              "a non-empty list [click, ...]", batch.column(LABEL)[int(bad[0])].as_py())
    click = values[starts] if len(values) else np.zeros((0,), np.int64)
    bad = np.flatnonzero((click != 0) & (click != 1))
    if len(bad):
        raise DataFormatError(path, f"row {row0 + int(bad[0])} (0-based)", LABEL,
                              "label_0[0] (the click) to be 0 or 1", int(click[bad[0]]))
    return click.astype(np.float32)


def _write_split(writer, split, sample_paths, users, items, on_missing_user, rows_per_shard, item_counter, stats):
    progress = Progress(f"taobao_mm {split} impressions")
    out = CtrSplitWriter(writer, split, rows_per_shard, progress)
    missing_users = missing_items = 0
    for _, path, row0, batch in _batches(sample_paths, (LABEL, USER, ITEM)):
        label = _labels(batch, path, row0)
        user = _ids(batch, USER, path, row0)
        item = _ids(batch, ITEM, path, row0)
        rows, found = users.lookup(user)
        if not found.all():
            missing_users += int((~found).sum())
            if on_missing_user == "error":
                r = int(np.flatnonzero(~found)[0])
                raise DataFormatError(
                    path, f"row {row0 + r} (0-based)", USER,
                    f"a user id present in the user features ({', '.join(users.paths) or 'none'}); "
                    "pass on_missing_user='skip' (drop such samples) or 'null' (profile/history ids 0)",
                    int(user[r]))
            if on_missing_user == "skip":
                label, user, item, rows = label[found], user[found], item[found], rows[found]
                found = found[found]
        attrs, item_found = items.lookup(item)
        missing_items += int((~item_found).sum())
        f = found[:, None]
        cols = {
            "user_id": user,
            "item_id": item,
            "item_attr_206": attrs[:, 0],
            "item_attr_213": attrs[:, 1],
            "item_attr_214": attrs[:, 2],
            "hist_item_id": np.where(f, users.hist_items[rows], 0) if len(rows) else users.hist_items[:0],
            "hist_category_id": np.where(f, users.hist_cats[rows], 0) if len(rows) else users.hist_cats[:0],
            "label": label,
        }
        profiles = np.where(f, users.profiles[rows], 0) if len(rows) else users.profiles[:0]
        for i in range(len(PROFILE)):
            cols[f"user_profile_{i + 1}"] = profiles[:, i]
        out.add(cols)
        if item_counter is not None:
            item_counter.add(item)
    n = out.close()
    progress.done()
    stats[f"{split}_impressions"] = n
    stats[f"{split}_samples_missing_user"] = missing_users
    stats[f"{split}_samples_missing_item_features"] = missing_items
    return n


def read_vectors(paths):
    """(item ids int64 [N] sorted, int8 vectors [N, D]) from scl_embedding*.parquet files."""
    ids, vecs, where, dim = [], [], [], None
    for fi, path, row0, batch in _batches(paths, (ITEM, VECTOR)):
        item = _ids(batch, ITEM, path, row0)
        col = batch.column(VECTOR)
        lengths, starts, values = _list_parts(col, VECTOR, path, row0, integer=False)
        is_int = pa.types.is_integer(col.type.value_type)
        if dim is None and len(lengths):
            dim = int(lengths[0])
            if dim < 1:
                raise DataFormatError(path, f"row {row0} (0-based)", VECTOR, "a non-empty vector", [])
        bad = np.flatnonzero(lengths != dim)
        if len(bad):
            raise DataFormatError(path, f"row {row0 + int(bad[0])} (0-based)", VECTOR,
                                  f"a vector of {dim} values like the first row", f"{lengths[bad[0]]} values")
        block = values[starts[:, None] + np.arange(dim)[None, :]]
        if is_int:
            if block.size and (block.min() < -127 or block.max() > 127):
                r = int(np.flatnonzero((block < -127).any(1) | (block > 127).any(1))[0])
                raise DataFormatError(path, f"row {row0 + r} (0-based)", VECTOR, "int8 values in [-127, 127]",
                                      block[r].tolist()[:8])
            block = block.astype(np.int8)
        else:
            block = block.astype(np.float32)
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                r = int(np.flatnonzero(~finite)[0])
                raise DataFormatError(path, f"row {row0 + r} (0-based)", VECTOR, "finite floats", "NaN/inf")
            block, _ = quantize_int8(np.clip(block, -1.0, 1.0), SCL_SCALE)
        ids.append(item)
        vecs.append(block)
        where.append(_where(fi, row0, len(item)))
    if not ids or dim is None:
        raise DataFormatError(paths[0], "file", VECTOR, "at least one vector row")
    ids, order = _sorted_unique(np.concatenate(ids), np.concatenate(where), paths, ITEM, "the SCL table")
    return ids, np.concatenate(vecs)[order]


def vector_version(ids, vectors):
    """`taobao_mm_scl_int8_` + 12 hex digits of SHA-256 over the sorted ids and their int8 vectors."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(ids, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(vectors, dtype=np.int8).tobytes())
    return "taobao_mm_scl_int8_" + h.hexdigest()[:12]


def prepare(input_path, output_dir, seq_len=50, num_buckets=1 << 20, on_missing_user="error",
            rows_per_shard=200_000, name=None, seed=0, overwrite=False, provenance=None):
    """Converts a Taobao-MM directory into the canonical dataset layout.

    Args:
        input_path: directory with the layout in the module docstring.
        output_dir: dataset directory to create (atomically).
        seq_len: history length S (the newest S behaviours are kept).
        num_buckets: rows of every embedding table (raw hashed ids are bucketed by the model).
        on_missing_user: "error", "skip" or "null" for samples whose user has no user-feature row.
        rows_per_shard: impressions per TFRecord file.
        name: dataset name (default: the input directory's name).
        seed: recorded in the manifest (this conversion is deterministic and draws nothing at random).
        overwrite: replace an existing non-empty `output_dir`.
        provenance: extra provenance (e.g. the command line) merged into the manifest's.

    Returns:
        The written `Manifest`.
    """
    if on_missing_user not in MISSING_USER_POLICIES:
        raise ValueError(f"on_missing_user must be one of {MISSING_USER_POLICIES}, got {on_missing_user!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    if not os.path.isdir(input_path):
        raise FileNotFoundError(f"{input_path}: not a directory (expected the Taobao-MM parquet layout)")
    files = {
        "train_samples": find_component(input_path, "train_samples"),
        "train_user_features": find_component(input_path, "train_user_features"),
        "item_features": find_component(input_path, "item_features"),
        "test_samples": find_component(input_path, "test_samples", required=False),
        "test_user_features": find_component(input_path, "test_user_features", required=False),
        "scl_embedding": find_component(input_path, "scl_embedding", required=False),
    }
    if bool(files["test_samples"]) != bool(files["test_user_features"]):
        have = "test_samples" if files["test_samples"] else "test_user_features"
        raise FileNotFoundError(f"{input_path}: found {have}*.parquet but not its counterpart; "
                                "test_samples and test_user_features come together")

    logging.info("taobao_mm: reading item features and SCL vectors")
    items = _ItemTable(files["item_features"])
    vec_ids, vectors = read_vectors(files["scl_embedding"]) if files["scl_embedding"] else (None, None)
    vector_dim = int(vectors.shape[1]) if vectors is not None and len(vectors) else 0
    spec = make_spec(seq_len, num_buckets, vector_dim)

    prov = {"input": os.path.abspath(input_path),
            "files": {k: [os.path.relpath(p, input_path) for p in v] for k, v in files.items()}}
    prov.update(provenance or {})
    name = name or os.path.basename(os.path.normpath(input_path))
    stats = {"item_features_rows": int(len(items.ids))}
    with DatasetWriter(output_dir, name=name, format=FORMAT, spec=spec, seed=seed, provenance=prov,
                       overwrite=overwrite) as w:
        counter = ItemCounter()
        splits = [("train", "train_samples", "train_user_features", counter)]
        if files["test_samples"]:
            splits.append(("test", "test_samples", "test_user_features", None))
        for split, samples_key, users_key, item_counter in splits:
            logging.info("taobao_mm: reading %s", users_key)
            users = _UserTable(files[users_key], seq_len)
            stats[f"{users_key}_rows"] = int(len(users.ids))
            _write_split(w, split, files[samples_key], users, items, on_missing_user, rows_per_shard,
                         item_counter, stats)
            del users
        counter.write(w)
        w.manifest.extra["on_missing_user"] = on_missing_user
        w.manifest.extra["history"] = ("hist_item_id/hist_category_id = the newest S entries of "
                                       "150_2_180/151_2_180, most recent last, left-padded with 0")
        w.manifest.extra["id_space"] = ("raw signed 64-bit hashes (0 = null); tables share ids: "
                                        "item = {205, 150_2_180}, category = {206, 151_2_180}")
        if vectors is not None:
            rel = "vectors/scl.parquet"
            version = vector_version(vec_ids, vectors)
            write_vector_table(os.path.join(w.tmp_dir, rel), vec_ids, vectors, version, dtype="int8",
                               scale=SCL_SCALE, source="taobao_mm 205_c")
            w.manifest.extra["vector_tables"] = {
                "scl": {"path": rel, "dtype": "int8", "scale": SCL_SCALE, "dim": vector_dim,
                        "num_rows": int(len(vec_ids)), "encoder_version": version, "source_feature": "item_id"}
            }
            stats["scl_vectors"] = int(len(vec_ids))
        w.manifest.extra["stats"] = stats
    return w.manifest
