"""Helpers shared by the format readers: error type, fingerprints, streamed CTR splits."""

import hashlib
import os
import unicodedata

import numpy as np

from mm_ads.data.dataset import conform_columns, empty_columns

_INT63_MASK = (1 << 63) - 1


class DataFormatError(ValueError):
    """Malformed input: names the file, the place in it, the field and what was expected.

    Args:
        path: the input file (or archive) that holds the bad value.
        where: the place in the file, e.g. `"line 7"`, `"row 3 (0-based)"`, `"member 'a/b.jpg'"`.
        field: the column / attribute that is wrong.
        expected: what a valid value looks like.
        got: the offending value (optional; shortened in the message).
    """

    def __init__(self, path, where, field, expected, got=None):
        self.path = os.fspath(path)
        self.where = where
        self.field = field
        self.expected = expected
        self.got = got
        msg = f"{self.path}: {where}: field {field!r}: expected {expected}"
        if got is not None:
            text = repr(got)
            msg += f", got {text[:200] + '...' if len(text) > 200 else text}"
        super().__init__(msg)

    def __reduce__(self):
        return (type(self), (self.path, self.where, self.field, self.expected, self.got))


def normalize_text(text):
    """NFKC, lower case, whitespace runs collapsed to one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def fingerprint_bytes(data):
    """A stable, non-negative int64 id of a byte string (first 8 bytes of BLAKE2b; never 0 or -1)."""
    value = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") & _INT63_MASK
    return value or 1


def fingerprint_text(text):
    """`fingerprint_bytes` of the UTF-8 of `normalize_text(text)`: equal texts up to case/spacing share an id."""
    return fingerprint_bytes(normalize_text(text).encode("utf-8"))


class CtrSplitWriter:
    """Streams one CTR split into `ctr/<split>-NNNNN-of-MMMMM.tfrecord` through `DatasetWriter.write_ctr`.

    `DatasetWriter.write_ctr` takes a whole split in memory; readers whose splits do not fit (MovieLens-25M
    with S=50 is ~1 KB per impression) add column chunks here instead. Every `rows_per_shard` rows become
    one shard written by `write_ctr` (so the record encoding stays in one place); `close()` renames the
    shards to the canonical `-of-` names and registers the split in the manifest.

    Args:
        writer: an entered `DatasetWriter` whose manifest holds the FeatureSpec.
        split: split name, e.g. `"train"`.
        rows_per_shard: rows per TFRecord file.
        progress: optional object with `add(n)`, called per written record.
    """

    def __init__(self, writer, split, rows_per_shard=200_000, progress=None):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self._writer = writer
        self._spec = writer.manifest.spec
        self.split = split
        self.rows_per_shard = int(rows_per_shard)
        self._progress = progress
        self._names = [f.name for f in self._spec.stored_features]
        self._parts = []
        self._buffer = []
        self._buffered = 0
        self.num_rows = 0

    def add(self, columns):
        """Adds `{feature: array [n, ...]}` (all stored features of the spec; see `conform_columns`)."""
        columns, n = conform_columns(columns, self._spec, f"ctr/{self.split}", first_row=self.num_rows + self._buffered,
                                     fallbacks=self._writer.fallbacks)
        if n == 0:
            return
        self._buffer.append({k: columns[k] for k in self._names})
        self._buffered += n
        while self._buffered >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, n):
        cols = {k: np.concatenate([c[k] for c in self._buffer]) for k in self._names}
        part = f"{self.split}.part{len(self._parts):05d}"
        self._writer.write_ctr(part, {k: v[:n] for k, v in cols.items()}, num_shards=1, progress=self._progress)
        self._parts.append(part)
        rest = {k: v[n:] for k, v in cols.items()}
        self._buffered -= n
        self._buffer = [rest] if self._buffered else []
        self.num_rows += n

    def close(self):
        """Writes the remaining rows, names the shards `<split>-i-of-k`, registers the split; returns its rows."""
        if self._buffered:
            self._flush(self._buffered)
        if not self._parts:  # an empty split is still listed (one empty shard), as write_ctr does
            self._writer.write_ctr(self.split, empty_columns(self._spec), num_shards=1)
            return 0
        comps = self._writer.manifest.components["ctr"]
        files, counts, k = [], [], len(self._parts)
        for i, part in enumerate(self._parts):
            entry = comps.pop(part)
            (src,) = entry["files"]
            dst = f"ctr/{self.split}-{i:05d}-of-{k:05d}.tfrecord"
            os.replace(os.path.join(self._writer.tmp_dir, src), os.path.join(self._writer.tmp_dir, dst))
            files.append(dst)
            counts.append(int(entry["num_rows"]))
        total = sum(counts)
        comps[self.split] = {"files": files, "num_rows": int(total), "file_rows": counts}
        self._parts = []
        return total


class ItemCounter:
    """Accumulates per-item impression counts and first-seen times chunk by chunk (for item_stats)."""

    def __init__(self):
        self._ids = []
        self._counts = []
        self._first = []

    def add(self, item_ids, timestamps=None):
        ids = np.asarray(item_ids, np.int64)
        if ids.size == 0:
            return
        uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
        self._ids.append(uniq)
        self._counts.append(counts)
        if timestamps is not None:
            first = np.full(len(uniq), np.iinfo(np.int64).max, np.int64)
            np.minimum.at(first, inverse, np.asarray(timestamps, np.int64))
            self._first.append(first)

    def write(self, writer):
        """Calls `writer.write_item_stats` with the accumulated counts (and first-seen times when tracked)."""
        if not self._ids:
            return writer.write_item_stats(np.zeros((0,), np.int64), None)
        ids = np.concatenate(self._ids)
        uniq, inverse = np.unique(ids, return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate(self._counts), minlength=len(uniq)).astype(np.int64)
        timestamps = None
        if self._first:
            first = np.full(len(uniq), np.iinfo(np.int64).max, np.int64)
            np.minimum.at(first, inverse, np.concatenate(self._first))
            timestamps = np.repeat(first, counts)
        # write_item_stats owns the item_stats schema; it takes one entry per impression.
        return writer.write_item_stats(np.repeat(uniq, counts), timestamps)
