"""The online index table: item id → (multimodal vector, encoder version, timestamp).

The encoder service writes a new item's vector here within seconds of the item's creation; the near-line
trainer and the prediction server read it (paper §5, Figure 4). One interface, two backends:

* **SQLite** (the embedded default, standard library): one file, WAL journal with `synchronous=FULL`, one
  transaction per `put_many`. A process killed mid-write leaves the table as it was before that call (the
  transaction is rolled back when the file is next opened): no torn records, no partly written batch.
  Readers in other processes see only committed batches. Row layout: `item_id INTEGER PRIMARY KEY`,
  `vec BLOB` (float32 or int8 bytes, little endian), `ts REAL`.
* **Redis** (redis-py; `pip install mm_ads[serving]`): metadata in the hash `<prefix>:meta`, rows in the hash
  `<prefix>:rows` (field = decimal item id, value = float64 timestamp followed by the vector bytes). A
  `put_many` is one MULTI/EXEC transaction (all rows or none); a `get_many` is one HMGET. Durability is the
  server's (`appendonly yes` + `appendfsync always` for the same guarantee as SQLite).

A table holds vectors of one encoder version and one dim, fixed when it is created: writes with another
version or dim are refused, so a reader never mixes vectors of different encoders. Storage is float32, or
int8 with a per-table scale (value = int8 · scale, like `mm_ads.data.vectors`; default scale 1/127 for unit
vectors); values outside the int8 range of the table are refused rather than clipped.

Item id 0 is the padding id of behaviour sequences (`mm_ads.data.spec`), so it is never stored: looking it up
returns "missing" with a zero vector, which is what a padded history slot needs.

Example:

```python
table = open_index_table("runs/online/index.db", dim=128, encoder_version=version, create=True)
table.put_many([11, 12], vectors, encoder_version=version)
vecs, found = table.get_many([11, 99, 12])      # float32 [3, 128], [True, False, True]
```
"""

import abc
import math
import os
import sqlite3
import struct
import threading
import time
import urllib.parse

import numpy as np

from mm_ads.data.vectors import VectorTable
from mm_ads.serving.index.redis_local import redact_uri

_DTYPES = ("float32", "int8")
_TS = struct.Struct("<d")
# rows per statement of a batched SQLite get (well below SQLITE_MAX_VARIABLE_NUMBER of every SQLite >= 3.32)
_SQLITE_CHUNK = 30_000
_LOAD_CHUNK = 20_000
_SQLITE_MMAP_BYTES = 1 << 30


def _create_hint(uri):
    return (f"create it from a vector table with `python -m mm_ads.serving.index.load_index_table --index_table={uri} "
            "--vectors=<data_dir>/vectors/<name>.parquet` (from Python: open_index_table(..., create=True))")


class IndexTableError(ValueError):
    """Bad input to an index table: the message names the table, the field and the item."""


def _np_dtype(dtype):
    return np.dtype(np.int8) if dtype == "int8" else np.dtype("<f4")


class IndexTable(abc.ABC):
    """item id (int64) → (vector, encoder version, timestamp). One encoder version and dim per table.

    Attributes:
        uri: where the table lives.
        dim: vector dim, fixed when the table is created.
        dtype: storage dtype, "float32" or "int8".
        scale: int8 scale (value = int8 · scale); 1.0 for float32 tables.
        encoder_version: the encoder whose vectors the table holds; fixed when the table is created.
    """

    uri: str
    dim: int
    dtype: str
    scale: float
    encoder_version: str

    # ---- validation shared by the backends -------------------------------------------------------------

    def _ids(self, item_ids, what):
        ids = np.asarray(item_ids)
        if ids.dtype == object or ids.dtype.kind not in "iu":
            if ids.size == 0 and ids.dtype.kind == "f":  # [] parses as float64
                return ids.astype(np.int64)
            raise IndexTableError(f"{self.uri}: {what} item_ids must be integers, got dtype {ids.dtype}")
        if ids.dtype.kind == "u" and ids.size and int(ids.max()) > np.iinfo(np.int64).max:
            raise IndexTableError(f"{self.uri}: {what} item_id {int(ids.max())} does not fit in int64")
        return ids.astype(np.int64)

    def _validate_put(self, item_ids, vectors, encoder_version, timestamps):
        """→ (ids int64 [N], stored [N, dim] in the storage dtype, ts float64 [N])."""
        if encoder_version != self.encoder_version:
            raise IndexTableError(
                f"{self.uri}: encoder_version {encoder_version!r} differs from the table's "
                f"{self.encoder_version!r}: vectors of different encoder versions cannot be mixed "
                "(write them to a new table)")
        ids = self._ids(item_ids, "put_many")
        if ids.ndim != 1:
            raise IndexTableError(f"{self.uri}: put_many item_ids must be 1-D [N], got shape {ids.shape}")
        if (ids == 0).any():
            raise IndexTableError(f"{self.uri}: item_id 0 is the padding id and cannot be stored")
        uniq, counts = np.unique(ids, return_counts=True)
        if len(uniq) != len(ids):
            raise IndexTableError(f"{self.uri}: duplicate item_id {int(uniq[counts > 1][0])} in one put_many call")
        vecs = np.asarray(vectors)
        if vecs.ndim != 2 or vecs.shape[0] != len(ids) or vecs.shape[1] != self.dim:
            raise IndexTableError(
                f"{self.uri}: vectors must have shape [N={len(ids)}, dim={self.dim}], got {vecs.shape}")
        if vecs.dtype.kind not in "fiu":
            raise IndexTableError(f"{self.uri}: vectors must be numeric (float32), got dtype {vecs.dtype}")
        vecs = vecs.astype(np.float32)
        bad = ~np.isfinite(vecs).all(axis=1)
        if bad.any():
            raise IndexTableError(
                f"{self.uri}: the vector of item_id {int(ids[bad][0])} has NaN/inf ({int(bad.sum())} such rows)")
        if self.dtype == "int8":
            q = np.rint(vecs / np.float32(self.scale))
            over = (np.abs(q) > 127).any(axis=1)
            if over.any():
                i = int(np.argmax(over))
                raise IndexTableError(
                    f"{self.uri}: the vector of item_id {int(ids[i])} has |value| {float(np.abs(vecs[i]).max()):.4g} "
                    f"beyond the int8 range of the table (127 · scale = {127 * self.scale:.4g})")
            stored = q.astype(np.int8)
        else:
            stored = vecs.astype("<f4")
        if timestamps is None:
            ts = np.full(len(ids), time.time(), np.float64)
        else:
            ts = np.asarray(timestamps, np.float64)
            if ts.ndim == 0:
                ts = np.full(len(ids), float(ts))
            if ts.shape != (len(ids),):
                raise IndexTableError(f"{self.uri}: timestamps must have shape [N={len(ids)}], got {ts.shape}")
            if not np.isfinite(ts).all():
                raise IndexTableError(f"{self.uri}: the timestamp of item_id {int(ids[~np.isfinite(ts)][0])} "
                                      "is not finite")
        return ids, np.ascontiguousarray(stored), ts

    def _rows(self, blobs, got_ids, header=0):
        """Stored values (`header` bytes then the vector bytes) → storage-dtype [M, dim] (and the headers)."""
        size = header + self.dim * _np_dtype(self.dtype).itemsize
        joined = b"".join(blobs)
        if len(joined) != size * len(blobs):
            for i, b in zip(got_ids, blobs):
                if len(b) != size:
                    raise IndexTableError(f"{self.uri}: the stored row of item_id {int(i)} has {len(b)} bytes, "
                                          f"expected {size} (dim {self.dim} × {self.dtype}): the table is corrupt")
        row = np.dtype([("head", np.uint8, (header,)), ("vec", _np_dtype(self.dtype), (self.dim,))])
        return np.frombuffer(joined, row)

    def _output(self, ids, found, stored):
        """found bool [N] (flat), stored [found.sum(), dim] → (float32 [*ids.shape, dim], bool [*ids.shape])."""
        out = np.zeros((found.size, self.dim), np.float32)
        out[found] = stored.astype(np.float32) * np.float32(self.scale) if self.dtype == "int8" else stored
        return out.reshape(ids.shape + (self.dim,)), found.reshape(ids.shape)

    # ---- the interface ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def put_many(self, item_ids, vectors, encoder_version, timestamps=None):
        """Writes rows atomically (all or none); an existing id is overwritten.

        Args:
            item_ids: int [N], unique, non-zero.
            vectors: float [N, dim], finite.
            encoder_version: must equal the table's `encoder_version`.
            timestamps: float64 seconds since the epoch, scalar or [N]; default now.

        Raises:
            IndexTableError: NaN/inf, wrong dim, another encoder version, duplicate or non-integer ids.
        """

    @abc.abstractmethod
    def get_many(self, item_ids):
        """item ids [...] → (float32 [..., dim] with zeros for missing ids, bool [...] found); one query."""

    @abc.abstractmethod
    def timestamps(self, item_ids):
        """item ids [...] → float64 [...] write timestamps, NaN for missing ids."""

    @abc.abstractmethod
    def __len__(self):
        """Number of stored items."""

    @abc.abstractmethod
    def close(self):
        """Releases connections; the table stays on disk / in the server."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"{type(self).__name__}({self.uri!r}, dim={self.dim}, dtype={self.dtype!r}, "
                f"encoder_version={self.encoder_version!r})")


def _check_meta(uri, meta, dim, encoder_version):
    if dim is not None and int(meta["dim"]) != int(dim):
        raise IndexTableError(f"{uri}: the table has dim {meta['dim']}, expected {dim}")
    if encoder_version is not None and meta["encoder_version"] != encoder_version:
        raise IndexTableError(
            f"{uri}: the table holds vectors of encoder {meta['encoder_version']!r}, expected {encoder_version!r}: "
            "vectors of different encoder versions cannot be mixed")


def _new_meta(uri, dim, encoder_version, dtype, scale):
    if dim is None or int(dim) < 1:
        raise IndexTableError(f"{uri}: creating a table needs dim >= 1, got {dim!r}")
    if not encoder_version or not isinstance(encoder_version, str):
        raise IndexTableError(f"{uri}: creating a table needs a non-empty encoder_version string, got "
                              f"{encoder_version!r}")
    if dtype not in _DTYPES:
        raise IndexTableError(f"{uri}: dtype must be 'float32' or 'int8', got {dtype!r}")
    if dtype == "int8":
        scale = 1.0 / 127.0 if scale is None else float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise IndexTableError(f"{uri}: int8 scale must be a positive number, got {scale!r}")
    else:
        scale = 1.0
    return {"dim": str(int(dim)), "dtype": dtype, "scale": repr(float(scale)), "encoder_version": encoder_version,
            "format": "1"}


class SQLiteIndexTable(IndexTable):
    """The embedded default backend: one SQLite file (WAL, synchronous=FULL, one transaction per put_many).

    Thread-safe: each thread gets its own connection (SQLite readers do not block each other or the writer in
    WAL mode); concurrent writers, also from other processes, are serialised by SQLite's write lock.
    """

    def __init__(self, path, dim=None, encoder_version=None, dtype="float32", create=False, scale=None,
                 busy_timeout_s=30.0):
        self.path = os.path.abspath(os.fspath(path))
        self.uri = self.path
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._connections = []
        self._lock = threading.Lock()
        self._closed = False
        if not os.path.exists(self.path) and not create:
            raise IndexTableError(f"{self.path}: index table does not exist; {_create_hint(self.path)}")
        if create:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        conn = self._conn()
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError:
            meta = None
        except sqlite3.DatabaseError as e:
            raise IndexTableError(f"{self.path}: not an index table (SQLite says: {e})") from e
        if meta is None:
            if not create:
                raise IndexTableError(f"{self.path}: not an index table (no meta table)")
            new = _new_meta(self.path, dim, encoder_version, dtype, scale)
            with conn:
                conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                conn.execute("CREATE TABLE IF NOT EXISTS vectors "
                             "(item_id INTEGER PRIMARY KEY, vec BLOB NOT NULL, ts REAL NOT NULL)")
                conn.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", sorted(new.items()))
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())  # a concurrent creator may have won
        missing = [k for k in ("dim", "dtype", "scale", "encoder_version") if k not in meta]
        if missing:
            raise IndexTableError(f"{self.path}: index table metadata lacks {missing}")
        _check_meta(self.path, meta, dim, encoder_version)
        self.dim = int(meta["dim"])
        self.dtype = meta["dtype"]
        self.scale = float(meta["scale"])
        self.encoder_version = meta["encoder_version"]

    def _conn(self):
        if self._closed:
            raise IndexTableError(f"{self.path}: the index table is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute(f"PRAGMA mmap_size={_SQLITE_MMAP_BYTES}")  # reads without a syscall per page
            except sqlite3.DatabaseError as e:
                raise IndexTableError(f"{self.path}: cannot open the index table: {e}") from e
            # with isolation_level=None nothing is implicit; `with conn` commits or rolls back BEGIN'd work
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def put_many(self, item_ids, vectors, encoder_version, timestamps=None):
        ids, stored, ts = self._validate_put(item_ids, vectors, encoder_version, timestamps)
        if not len(ids):
            return
        rows = [(int(i), v.tobytes(), float(t)) for i, v, t in zip(ids, stored, ts)]
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT OR REPLACE INTO vectors (item_id, vec, ts) VALUES (?, ?, ?)", rows)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _select(self, ids, column):
        """(ids [M], values [M]) of the stored rows among `ids`; one SELECT per 30k distinct ids."""
        conn = self._conn()
        uniq = np.unique(ids).tolist()
        got_ids, values = [], []
        for start in range(0, len(uniq), _SQLITE_CHUNK):
            chunk = uniq[start:start + _SQLITE_CHUNK]
            sql = f"SELECT item_id, {column} FROM vectors WHERE item_id IN ({','.join('?' * len(chunk))})"
            rows = conn.execute(sql, chunk).fetchall()
            if rows:
                i, v = zip(*rows)
                got_ids += i
                values += v
        return got_ids, values

    def get_many(self, item_ids):
        ids = self._ids(item_ids, "get_many")
        flat = ids.reshape(-1)
        got_ids, blobs = self._select(flat, "vec")
        if not got_ids:
            return self._output(ids, np.zeros(flat.shape, bool), np.zeros((0, self.dim), np.float32))
        stored = self._rows(blobs, got_ids)["vec"]
        got = np.asarray(got_ids, np.int64)
        order = np.argsort(got)
        pos = np.minimum(np.searchsorted(got[order], flat), len(got) - 1)
        found = got[order][pos] == flat
        return self._output(ids, found, stored[order[pos[found]]])

    def timestamps(self, item_ids):
        ids = self._ids(item_ids, "timestamps")
        got = dict(zip(*self._select(ids.reshape(-1), "ts")))
        return np.array([got.get(i, np.nan) for i in ids.reshape(-1).tolist()], np.float64).reshape(ids.shape)

    def __len__(self):
        return int(self._conn().execute("SELECT COUNT(*) FROM vectors").fetchone()[0])

    def close(self):
        with self._lock:
            conns, self._connections = self._connections, []
            self._closed = True
        for conn in conns:
            conn.close()


class RedisIndexTable(IndexTable):
    """Redis backend: `<prefix>:meta` hash + `<prefix>:rows` hash; MULTI/EXEC per put_many, HMGET per get."""

    def __init__(self, uri, dim=None, encoder_version=None, dtype="float32", create=False, scale=None, client=None):
        from mm_ads.serving.index.redis_local import connect

        self._client, self.prefix = connect(uri, "prefix", "mm_ads:index", "the Redis index table", client)
        self.uri = uri = redact_uri(uri)  # shown in messages and logs: no password
        self._meta_key = f"{self.prefix}:meta"
        self._rows_key = f"{self.prefix}:rows"
        import redis  # present: connect() checked

        try:
            raw = self._client.hgetall(self._meta_key)
        except redis.RedisError as e:
            raise IndexTableError(f"{uri}: cannot reach Redis: {e}") from e
        meta = {k.decode(): v.decode() for k, v in raw.items()}
        if not meta:
            if not create:
                raise IndexTableError(f"{uri}: index table {self._meta_key!r} does not exist; {_create_hint(uri)}")
            new = _new_meta(uri, dim, encoder_version, dtype, scale)
            # WATCH … MULTI: of two concurrent creators exactly one writes the metadata, the other reads it
            with self._client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self._meta_key)
                    if not pipe.exists(self._meta_key):
                        pipe.multi()
                        pipe.hset(self._meta_key, mapping=new)
                        pipe.execute()
                except redis.WatchError:
                    pass
            meta = {k.decode(): v.decode() for k, v in self._client.hgetall(self._meta_key).items()}
        missing = [k for k in ("dim", "dtype", "scale", "encoder_version") if k not in meta]
        if missing:
            raise IndexTableError(f"{uri}: index table metadata {self._meta_key!r} lacks {missing}")
        _check_meta(uri, meta, dim, encoder_version)
        self.dim = int(meta["dim"])
        self.dtype = meta["dtype"]
        self.scale = float(meta["scale"])
        self.encoder_version = meta["encoder_version"]

    def put_many(self, item_ids, vectors, encoder_version, timestamps=None):
        ids, stored, ts = self._validate_put(item_ids, vectors, encoder_version, timestamps)
        if not len(ids):
            return
        mapping = {str(i): _TS.pack(t) + v.tobytes() for i, v, t in zip(ids.tolist(), stored, ts.tolist())}
        with self._client.pipeline(transaction=True) as pipe:  # MULTI … EXEC: all rows or none
            pipe.hset(self._rows_key, mapping=mapping)
            pipe.execute()

    def get_many(self, item_ids):
        ids = self._ids(item_ids, "get_many")
        flat = ids.reshape(-1)
        values = self._client.hmget(self._rows_key, flat.tolist()) if flat.size else []
        found = np.array([v is not None for v in values], bool).reshape(flat.shape)
        rows = self._rows([v for v in values if v is not None], flat[found], header=_TS.size)
        return self._output(ids, found, rows["vec"])

    def timestamps(self, item_ids):
        ids = self._ids(item_ids, "timestamps")
        flat = ids.reshape(-1)
        values = self._client.hmget(self._rows_key, flat.tolist()) if flat.size else []
        found = np.array([v is not None for v in values], bool).reshape(flat.shape)
        rows = self._rows([v for v in values if v is not None], flat[found], header=_TS.size)
        out = np.full(flat.shape, np.nan)
        out[found] = rows["head"].copy().view("<f8").reshape(-1)
        return out.reshape(ids.shape)

    def __len__(self):
        return int(self._client.hlen(self._rows_key))

    def drop(self):
        """Deletes the table (metadata and rows) from the server."""
        self._client.delete(self._meta_key, self._rows_key)

    def close(self):
        self._client.close()


def open_index_table(uri, dim=None, encoder_version=None, dtype="float32", create=False, scale=None):
    """Opens (or with `create=True` creates) an index table.

    Args:
        uri: a file path or `sqlite:///abs/path.db` (the embedded SQLite backend), or
            `redis://HOST:PORT/DB?prefix=NAME` (Redis; default prefix `mm_ads:index`).
        dim: vector dim; required to create, checked when opening an existing table.
        encoder_version: required to create, checked when opening an existing table.
        dtype: storage dtype of a new table ("float32" or "int8"); an existing table keeps its own.
        create: create the table when it does not exist.
        scale: int8 scale of a new int8 table (default 1/127: unit vectors).

    Raises:
        IndexTableError: the table does not exist (and `create` is false), or its dim / encoder version
            differ from the ones given.
    """
    uri = os.fspath(uri)
    if uri.startswith(("redis://", "rediss://", "unix://")):
        return RedisIndexTable(uri, dim, encoder_version, dtype, create, scale)
    if uri.startswith("sqlite://"):
        path = urllib.parse.urlsplit(uri).path
        if not path:
            raise IndexTableError(f"{uri}: a sqlite URI needs a path: sqlite:///abs/path.db")
        uri = path
    elif "://" in uri:
        raise IndexTableError(f"{redact_uri(uri)}: unknown index table scheme (expected a path, sqlite:///…, or "
                              "redis://…)")
    return SQLiteIndexTable(uri, dim, encoder_version, dtype, create, scale)


def load_vector_table_into(index_table, parquet_path, timestamp=None, batch_size=_LOAD_CHUNK):
    """Bulk-loads an `mm_ads.data.vectors` Parquet table; returns the number of rows loaded.

    The Parquet table must have the index table's dim and encoder version. Rows are written in `put_many`
    batches of `batch_size` (each atomic), with one timestamp (default now).
    """
    try:
        table = VectorTable.load(parquet_path, expected_dim=index_table.dim,
                                 expected_encoder_version=index_table.encoder_version)
    except ValueError as e:
        raise IndexTableError(f"{index_table.uri}: cannot load {parquet_path}: {e}") from e
    vectors = table.float_vectors()
    ts = time.time() if timestamp is None else float(timestamp)
    for start in range(0, len(table), batch_size):
        stop = start + batch_size
        index_table.put_many(table.item_ids[start:stop], vectors[start:stop], index_table.encoder_version,
                             timestamps=ts)
    return len(table)
