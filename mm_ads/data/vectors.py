"""Item → multimodal vector tables.

A table is one Parquet file with columns `item_id` (int64, unique) and `vector`
(fixed-size list of float32, or of int8 with a per-table `scale`: value = int8 * scale).
The file's metadata carries `mm_ads.dim`, `mm_ads.dtype`, `mm_ads.scale` and
`mm_ads.encoder_version` (a content hash of the encoder weights), so that training and
serving can refuse to mix vectors from different encoders.
"""

import hashlib
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mm_ads.utils import io as io_utils

_META = "mm_ads."


def quantize_int8(vectors, scale=None):
    """float32 [N, D] → (int8 [N, D], scale). Default scale 1/127 when |v| ≤ 1 (unit vectors)."""
    vectors = np.asarray(vectors, np.float32)
    if scale is None:
        peak = float(np.max(np.abs(vectors))) if vectors.size else 1.0
        scale = 1.0 / 127.0 if peak <= 1.0 else peak / 127.0
    q = np.clip(np.rint(vectors / scale), -127, 127).astype(np.int8)
    return q, float(scale)


def random_unit_vectors(num, dim, seed=0):
    """float32 `[num, dim]` random unit vectors (Gaussian, normalised; deterministic for `seed`): the vectors of the
    random-vector control, which carry no information about the items."""
    v = np.random.default_rng(seed).normal(size=(num, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_vector_table(path, item_ids, vectors, encoder_version, dtype="float32", scale=None, source=""):
    """Validates and writes a vector table atomically.

    Args:
        path: output `.parquet` path.
        item_ids: int64 [N], unique.
        vectors: float32 [N, D] (quantised here when `dtype="int8"`), or int8 [N, D] with `scale`.
        encoder_version: identifier of the encoder that produced the vectors.
        dtype: storage dtype, "float32" or "int8".
        scale: int8 scale; for float input computed by `quantize_int8` when omitted.
    """
    ids = np.asarray(item_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{path}: item_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"{path}: vectors must be [N={len(ids)}, D], got shape {vectors.shape}")
    if vectors.shape[1] < 1:
        raise ValueError(f"{path}: vector dim must be >= 1")
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        raise ValueError(f"{path}: duplicate item_id {int(uniq[counts > 1][0])}")
    if dtype not in ("float32", "int8"):
        raise ValueError(f"{path}: dtype must be 'float32' or 'int8', got {dtype!r}")
    if not encoder_version:
        raise ValueError(f"{path}: encoder_version must be a non-empty string")
    if vectors.dtype == np.int8:
        if dtype != "int8" or scale is None:
            raise ValueError(f"{path}: int8 vectors need dtype='int8' and an explicit scale")
        stored = vectors
    else:
        vectors = vectors.astype(np.float32)
        bad = ~np.isfinite(vectors).all(axis=1)
        if bad.any():
            raise ValueError(f"{path}: vector of item_id {int(ids[bad][0])} has NaN/inf")
        if dtype == "int8":
            stored, scale = quantize_int8(vectors, scale)
        else:
            stored, scale = vectors, 1.0
    dim = stored.shape[1]
    value_type = pa.int8() if dtype == "int8" else pa.float32()
    flat = pa.array(stored.reshape(-1), type=value_type)
    table = pa.table({"item_id": pa.array(ids), "vector": pa.FixedSizeListArray.from_arrays(flat, dim)})
    meta = {"dim": str(dim), "dtype": dtype, "scale": repr(float(scale)), "encoder_version": str(encoder_version),
            "source": str(source)}
    table = table.replace_schema_metadata({(_META + k).encode(): v.encode() for k, v in meta.items()})
    with io_utils.atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_table_info(path, expected_dim=None, expected_encoder_version=None):
    """A vector table's metadata from its Parquet footer only (cheap: no vector is read).

    Returns `{"dim", "dtype", "scale", "encoder_version", "num_rows"}`; raises `FileNotFoundError` when
    `path` does not exist and `ValueError` when it is not a readable table of this module's format or its
    dim / encoder version is not the expected one (`VectorTable.load` runs the same checks).
    """
    try:
        parquet = pq.ParquetFile(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"Vector table {path} does not exist") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"Vector table {path} is not a readable Parquet file: {e}") from e
    schema = parquet.schema_arrow
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    missing = [k for k in ("dim", "dtype", "scale", "encoder_version") if _META + k not in meta]
    if missing or "item_id" not in schema.names or "vector" not in schema.names:
        raise ValueError(
            f"Vector table {path} lacks item_id/vector columns or metadata {missing}; "
            "write it with mm_ads.data.vectors.write_vector_table"
        )
    dim = int(meta[_META + "dim"])
    version = meta[_META + "encoder_version"]
    if expected_dim is not None and dim != expected_dim:
        raise ValueError(f"Vector table {path} has dim {dim}, expected {expected_dim}")
    if expected_encoder_version is not None and version != expected_encoder_version:
        raise ValueError(
            f"Vector table {path} was made by encoder {version!r}, expected {expected_encoder_version!r}: "
            "vectors of different encoder versions cannot be mixed"
        )
    return {"dim": dim, "dtype": meta[_META + "dtype"], "scale": float(meta[_META + "scale"]),
            "encoder_version": version, "num_rows": parquet.metadata.num_rows}


_FINGERPRINTS = {}  # (real path, inode, size, mtime_ns) -> fingerprint, for this process
_FINGERPRINTS_LOCK = threading.Lock()


def table_fingerprint(path):
    """`"sha256:<hex>"` of a vector table file's bytes: changes with any vector, id or metadata.

    The whole file is hashed (~600 MB/s on the 2-core VM: 2 s for a 10M × 128 int8 table, 8.5 s in float32; about
    what loading it costs); a process hashes a file once while its inode, size and mtime stay the same.
    """
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    with _FINGERPRINTS_LOCK:
        if key in _FINGERPRINTS:
            return _FINGERPRINTS[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    fingerprint = f"sha256:{digest.hexdigest()}"
    with _FINGERPRINTS_LOCK:
        _FINGERPRINTS[key] = fingerprint
    return fingerprint


class VectorTable:
    """An item → vector table held in memory.

    Attributes: `item_ids` int64 [N], `vectors` (float32 or int8) [N, D], `dim`, `dtype`,
    `scale`, `encoder_version`.
    """

    def __init__(self, item_ids, vectors, dtype, scale, encoder_version, path=None):
        self.item_ids = item_ids
        self.vectors = vectors
        self.dim = vectors.shape[1]
        self.dtype = dtype
        self.scale = scale
        self.encoder_version = encoder_version
        self.path = path
        self._index = None

    def __len__(self):
        return len(self.item_ids)

    @classmethod
    def load(cls, path, expected_dim=None, expected_encoder_version=None):
        info = read_table_info(path, expected_dim, expected_encoder_version)
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"Vector table {path} is not a readable Parquet file: {e}") from e
        dim, dtype, version = info["dim"], info["dtype"], info["encoder_version"]
        ids = table.column("item_id").to_numpy().astype(np.int64)
        col = table.column("vector").combine_chunks()
        vecs = col.values.to_numpy(zero_copy_only=False).reshape(len(ids), dim)
        vecs = vecs.astype(np.int8 if dtype == "int8" else np.float32, copy=False)
        if dtype != "int8":
            bad = ~np.isfinite(vecs).all(axis=1)
            if bad.any():
                raise ValueError(f"Vector table {path}: the vector of item_id {int(ids[bad][0])} has NaN/inf "
                                 f"({int(bad.sum())} such rows)")
        return cls(ids, vecs, dtype, info["scale"], version, path)

    def float_vectors(self):
        if self.dtype == "int8":
            return self.vectors.astype(np.float32) * np.float32(self.scale)
        return self.vectors

    def lookup(self, ids):
        """NumPy lookup: ids [...] → (float32 vectors [..., D], missing bool [...])."""
        if self._index is None:
            order = np.argsort(self.item_ids)
            self._index = (self.item_ids[order], order)
        sorted_ids, order = self._index
        ids = np.asarray(ids, np.int64)
        pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
        found = (sorted_ids[pos] == ids) if len(sorted_ids) else np.zeros(ids.shape, bool)
        rows = order[pos]
        out = self.float_vectors()[rows] if len(sorted_ids) else np.zeros(ids.shape + (self.dim,), np.float32)
        out = np.where(found[..., None], out, 0.0).astype(np.float32)
        return out, ~found
