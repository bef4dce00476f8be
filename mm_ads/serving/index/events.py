"""Durable event streams: new-item events for the encoder service, impressions for the near-line trainer.

Two implementations of one contract (`append`, `read`, `end_offset`, `wait`):

* **`EventLog`** (the embedded default): an append-only local file of records

      [u32 length][u32 crc32 of the payload][payload: `length` bytes of UTF-8 JSON]   (little endian)

  An offset is the byte position of a record's header (the first record is at 0); `read(offset)` returns
  records from that offset on, each with the offset of the next. `append` writes all its records with one
  write and one `fsync`, so a returned offset is durable. A writer killed mid-append leaves a *torn tail*:
  a header or payload cut short (or zero-filled after a power loss). Readers stop cleanly before it, and the
  next append (after reopening) truncates it first; the records of the torn call were never acknowledged.
  A record that fails its CRC or does not parse while complete records follow it is corruption, not a torn
  tail: reading raises `EventLogError` naming the file and offset rather than skipping data silently.
  One writer at a time (an exclusive `flock` on the file while an `EventLog` appends); any number of readers,
  also in other processes.
* **`RedisStream`**: a Redis stream (`XADD` in one MULTI/EXEC per `append`, `XRANGE` to read). Offsets are
  **strings**, the Redis entry ids `"<ms>-<seq>"`; `read(offset)` is inclusive and a record's next offset is
  `"<ms>-<seq+1>"`. Offset `0` (int) or `"0"` means the start, as for `EventLog`. Durability is the server's
  (`appendonly yes`, `appendfsync always` matches `EventLog`'s per-call fsync).

`open_stream(uri)` picks one: a path → `EventLog`, `redis://host:port/db?stream=NAME` → `RedisStream`.
`EventTail` follows either from an offset (polling a file, blocking `XREAD` on Redis).

Records are JSON objects (dicts); NaN/inf are refused (not JSON). The new-item event record is
`{"type": "item", "item_id": int, "title": str (optional), "image_png_b64": str (optional), "ts": float}`.
"""

import fcntl
import json
import os
import struct
import threading
import time
import urllib.parse
import zlib

from absl import logging

from mm_ads.serving.index.redis_local import redact_uri

_HEADER = struct.Struct("<II")
MAX_RECORD_BYTES = 64 << 20  # a longer length field is corruption, not a record
_READ_CHUNK = 1 << 20


class EventLogError(ValueError):
    """A corrupt event log (names the file and offset) or a record that cannot be written."""


def _encode(records, where):
    out = []
    for k, record in enumerate(records):
        if not isinstance(record, dict):
            raise EventLogError(f"{where}: record {k} must be a dict, got {type(record).__name__}")
        try:
            payload = json.dumps(record, separators=(",", ":"), allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise EventLogError(f"{where}: record {k} is not JSON-serialisable: {e}") from e
        if len(payload) > MAX_RECORD_BYTES:
            raise EventLogError(f"{where}: record {k} has {len(payload)} bytes, more than {MAX_RECORD_BYTES}")
        out.append(payload)
    return out


class EventLog:
    """An append-only, CRC-checked, fsync'd log of JSON records in one local file.

    Args:
        path: the log file.
        create: create the file when missing (otherwise a missing file is an error).

    Example:

    ```python
    log = EventLog("runs/online/items.log")
    offsets = log.append([{"type": "item", "item_id": 7, "title": "red dress", "ts": time.time()}])
    for offset, next_offset, record in log.read(0, max_records=100):
        ...
    ```
    """

    def __init__(self, path, create=True):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.exists(self.path):
            if not create:
                raise FileNotFoundError(f"Event log {self.path} does not exist")
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.fsync(fd)
            os.close(fd)
            _fsync_dir(os.path.dirname(self.path))
        self._rfd = os.open(self.path, os.O_RDONLY)
        self._wfd = None           # opened (and flock'ed) by the first append
        self._write_end = None     # end of the last whole record, known to the writer
        self._scan_end = 0         # end_offset(): whole records verified up to here
        self._lock = threading.Lock()

    # ---- reading ---------------------------------------------------------------------------------------

    def _parse(self, offset, max_records, max_bytes=None):
        """→ (records [(offset, next_offset, record)], stop offset). Stops at EOF or a torn tail."""
        size = os.fstat(self._rfd).st_size
        out = []
        buf, buf_start = b"", offset
        pos = offset
        while len(out) < max_records and pos < size:
            if max_bytes is not None and pos - offset >= max_bytes:
                break
            need = pos - buf_start + _HEADER.size
            if need > len(buf):
                buf = os.pread(self._rfd, max(_READ_CHUNK, _HEADER.size), pos)
                buf_start = pos
            rel = pos - buf_start
            if len(buf) - rel < _HEADER.size:
                break  # torn header at the tail
            length, crc = _HEADER.unpack_from(buf, rel)
            end = pos + _HEADER.size + length
            if length == 0 or length > MAX_RECORD_BYTES:
                self._corrupt_or_tail(pos, size, f"bad record length {length}")
                break
            if end > size:
                break  # torn payload at the tail
            if end - buf_start > len(buf):
                buf = os.pread(self._rfd, max(_READ_CHUNK, end - pos), pos)
                buf_start, rel = pos, 0
            payload = buf[rel + _HEADER.size:rel + _HEADER.size + length]
            if zlib.crc32(payload) != crc:
                self._corrupt_or_tail(pos, size, "CRC mismatch", end)
                break
            try:
                record = json.loads(payload)
            except ValueError as e:
                raise EventLogError(f"Event log {self.path}: record at offset {pos} has a valid CRC but is not "
                                    f"JSON: {e}") from e
            out.append((pos, end, record))
            pos = end
        return out, pos

    def _corrupt_or_tail(self, pos, size, why, end=None):
        """A bad record is a torn tail when nothing but it (or zero fill) follows; otherwise corruption."""
        rest_start = end if end is not None and end < size else pos + _HEADER.size
        if end is not None and end >= size:
            return  # the damaged record is the last one: a torn tail
        rest = os.pread(self._rfd, size - rest_start, rest_start) if size > rest_start else b""
        if rest.count(0) == len(rest):
            return  # zero fill after a power loss: a torn tail
        raise EventLogError(
            f"Event log {self.path} is corrupt at offset {pos} ({why}) with {size - pos} bytes after it: "
            "this is not a torn tail from a crash mid-append; restore the file or cut it at this offset")

    def read(self, offset, max_records=1000):
        """Records from `offset` on: a list of (offset, next_offset, record), at most `max_records`.

        Returns fewer (or none) at the end of the log or before a torn tail. `offset` must be 0 or an offset
        this log returned; anything else reads as corruption.
        """
        offset = int(offset)
        if offset < 0:
            raise EventLogError(f"Event log {self.path}: offset must be >= 0, got {offset}")
        if max_records <= 0:
            return []
        return self._parse(offset, max_records)[0]

    def end_offset(self):
        """Offset just past the last whole record (where the next append goes)."""
        with self._lock:
            if self._write_end is not None:
                return self._write_end
            while True:
                records, pos = self._parse(self._scan_end, 1 << 16)
                self._scan_end = pos
                if len(records) < (1 << 16):
                    return pos

    def wait(self, offset, timeout_s, poll_interval_s=0.005):
        """Blocks until the log has bytes past `offset` or `timeout_s` passed; True if it has."""
        deadline = time.monotonic() + timeout_s
        while True:
            if os.fstat(self._rfd).st_size > int(offset) and self._parse(int(offset), 1)[0]:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(poll_interval_s, left))

    # ---- writing ---------------------------------------------------------------------------------------

    def _open_writer(self):
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EventLogError(f"Event log {self.path} is being appended to by another writer") from None
        self._wfd = fd
        pos = self._scan_end
        while True:  # recovery: find the end of the whole records
            records, pos = self._parse(pos, 1 << 16)
            if len(records) < (1 << 16):
                break
        size = os.fstat(fd).st_size
        if size > pos:
            logging.warning("Event log %s: truncating a torn tail of %d bytes at offset %d (an append that "
                            "crashed before it returned)", self.path, size - pos, pos)
            os.ftruncate(fd, pos)
            os.fsync(fd)
        self._write_end = self._scan_end = pos

    def append(self, records):
        """Appends records (dicts) with one write and one fsync; returns each record's offset."""
        payloads = _encode(records, f"Event log {self.path}")
        if not payloads:
            return []
        with self._lock:
            if self._wfd is None:
                self._open_writer()
            offsets, parts, pos = [], [], self._write_end
            for p in payloads:
                offsets.append(pos)
                parts.append(_HEADER.pack(len(p), zlib.crc32(p)))
                parts.append(p)
                pos += _HEADER.size + len(p)
            data = memoryview(b"".join(parts))
            written = 0
            while written < len(data):
                written += os.pwrite(self._wfd, data[written:], self._write_end + written)
            os.fsync(self._wfd)
            self._write_end = self._scan_end = pos
        return offsets

    def close(self):
        with self._lock:
            for fd in (self._rfd, self._wfd):
                if fd is not None:
                    os.close(fd)  # closing releases the flock
            self._rfd = self._wfd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"EventLog({self.path!r})"


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _redis_id(offset, where):
    """Offset → (ms, seq). 0 / "0" is the start of the stream."""
    if offset in (0, "0"):
        return 0, 0
    if isinstance(offset, bytes):
        offset = offset.decode()
    try:
        ms, seq = str(offset).split("-")
        return int(ms), int(seq)
    except ValueError:
        raise EventLogError(f"{where}: a Redis stream offset is '<ms>-<seq>' (or 0), got {offset!r}") from None


class RedisStream:
    """A Redis stream with `EventLog`'s contract; offsets are Redis entry ids as strings ("<ms>-<seq>").

    Each record is one stream entry with a single field `r` holding its JSON.
    """

    def __init__(self, uri, client=None):
        from mm_ads.serving.index.redis_local import connect

        self._client, self.stream = connect(uri, "stream", "mm_ads:events", "Redis streams", client)
        self.uri = redact_uri(uri)  # shown in messages, logs and stats files: no password
        self.path = self.uri

    def append(self, records):
        payloads = _encode(records, f"Redis stream {self.uri}")
        if not payloads:
            return []
        with self._client.pipeline(transaction=True) as pipe:  # MULTI … EXEC: all records or none
            for p in payloads:
                pipe.xadd(self.stream, {"r": p})
            ids = pipe.execute()
        return [i.decode() for i in ids]

    def _entries(self, entries):
        out = []
        for entry_id, fields in entries:
            eid = entry_id.decode()
            ms, seq = _redis_id(eid, self.uri)
            try:
                record = json.loads(fields[b"r"])
            except (KeyError, ValueError) as e:
                raise EventLogError(f"Redis stream {self.uri}: entry {eid} is not an mm_ads record "
                                    f"(field 'r' with JSON): {e}") from e
            out.append((eid, f"{ms}-{seq + 1}", record))
        return out

    def read(self, offset, max_records=1000):
        ms, seq = _redis_id(offset, self.uri)
        if max_records <= 0:
            return []
        return self._entries(self._client.xrange(self.stream, min=f"{ms}-{seq}", count=max_records))

    def end_offset(self):
        last = self._client.xrevrange(self.stream, count=1)
        if not last:
            return "0-0"
        ms, seq = _redis_id(last[0][0], self.uri)
        return f"{ms}-{seq + 1}"

    def wait(self, offset, timeout_s):
        """Blocks (XREAD BLOCK) until an entry at or after `offset` exists or `timeout_s` passed."""
        ms, seq = _redis_id(offset, self.uri)
        if self.read(offset, 1):
            return True
        after = f"{ms}-{seq - 1}" if seq > 0 else (f"{ms - 1}-18446744073709551615" if ms > 0 else "0-0")
        got = self._client.xread({self.stream: after}, count=1, block=max(1, int(timeout_s * 1000)))
        return bool(got)

    def close(self):
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"RedisStream({self.uri!r})"


def open_stream(uri, create=True):
    """A path → `EventLog`; `redis://host:port/db?stream=NAME` → `RedisStream`."""
    uri = os.fspath(uri)
    if uri.startswith(("redis://", "rediss://", "unix://")):
        return RedisStream(uri)
    if uri.startswith("file://"):
        uri = urllib.parse.urlsplit(uri).path
    elif "://" in uri:
        raise EventLogError(f"{redact_uri(uri)}: unknown stream scheme (expected a path or redis://…?stream=NAME)")
    return EventLog(uri, create=create)


class EventTail:
    """Follows a stream from an offset.

    Args:
        log_or_path: an `EventLog`, a `RedisStream`, or a path / URI for `open_stream`.
        offset: where to start (0 = the beginning); `self.offset` then advances past every polled record.
    """

    def __init__(self, log_or_path, offset=0):
        self.log = open_stream(log_or_path) if isinstance(log_or_path, (str, os.PathLike)) else log_or_path
        self._owns = self.log is not log_or_path
        self.offset = offset

    def poll(self, max_records=1000, timeout_s=0.0):
        """Up to `max_records` new (offset, next_offset, record); waits up to `timeout_s` for the first one."""
        records = self.log.read(self.offset, max_records)
        if not records and timeout_s > 0 and self.log.wait(self.offset, timeout_s):
            records = self.log.read(self.offset, max_records)
        if records:
            self.offset = records[-1][1]
        return records

    def close(self):
        if self._owns:
            self.log.close()
