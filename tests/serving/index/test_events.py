"""Event streams: the file log and Redis Streams through the same tests, plus the file log's crash recovery."""

import os
import struct
import threading
import time
import zlib

import pytest

from mm_ads.serving.index.events import EventLog, EventLogError, EventTail, RedisStream, open_stream
from tests.serving.index.crash_writer import run_and_kill


def _records(n, start=0):
    return [{"type": "item", "item_id": start + i, "title": f"red dress {start + i} é", "ts": 1.5 + start + i}
            for i in range(n)]


def test_round_trip_and_offsets(stream_uri):
    with open_stream(stream_uri) as log:
        assert log.read(0, 10) == []
        first = log.append(_records(3))
        second = log.append(_records(2, start=3))
        assert len(first) == 3 and len(second) == 2
        got = log.read(0, 100)
        assert [r for _, _, r in got] == _records(5)
        assert [o for o, _, _ in got] == first + second
        # next_offset chains: reading from it gives the following record (for Redis it is a lower bound of the
        # next id, "<ms>-<seq + 1>", equal to it only when both were appended in the same millisecond)
        assert [log.read(n, 1)[0][0] for _, n, _ in got[:-1]] == [o for o, _, _ in got[1:]]
        if isinstance(log, EventLog):
            assert [n for _, n, _ in got[:-1]] == [o for o, _, _ in got[1:]]
        assert log.end_offset() == got[-1][1]
        assert log.read(got[-1][1], 10) == []
        assert [r["item_id"] for _, _, r in log.read(first[2], 2)] == [2, 3]
        assert len(log.read(0, 2)) == 2 and log.read(0, 0) == []
    if isinstance(log, EventLog):
        assert first[0] == 0 and isinstance(first[1], int)
    else:
        assert isinstance(first[0], str) and "-" in first[0]
    with open_stream(stream_uri) as again:  # a new reader sees the same records and offsets
        assert again.read(0, 100) == got
        assert again.end_offset() == got[-1][1]


@pytest.mark.parametrize("bad,match", [
    ([{"a": float("nan")}], "record 0 is not JSON-serialisable"),
    ([{"a": 1}, ["not", "a", "dict"]], "record 1 must be a dict"),
    ([{"a": object()}], "record 0 is not JSON-serialisable"),
])
def test_bad_records_are_refused_whole(stream_uri, bad, match):
    with open_stream(stream_uri) as log:
        log.append(_records(1))
        end = log.end_offset()
        with pytest.raises(EventLogError, match=match):
            log.append(bad)
        assert log.end_offset() == end and len(log.read(0, 10)) == 1


def test_tail_follows_appends(stream_uri):
    with open_stream(stream_uri) as writer:
        writer.append(_records(2))
        tail = EventTail(stream_uri, offset=0)
        try:
            assert [r["item_id"] for _, _, r in tail.poll(10)] == [0, 1]
            t0 = time.monotonic()
            assert tail.poll(10, timeout_s=0.2) == []
            assert time.monotonic() - t0 >= 0.15
            timer = threading.Timer(0.1, writer.append, args=(_records(3, start=2),))
            timer.start()
            got = tail.poll(2, timeout_s=5.0)
            timer.join()
            assert [r["item_id"] for _, _, r in got] == [2, 3]
            assert [r["item_id"] for _, _, r in tail.poll(10)] == [4]
            assert tail.offset == writer.end_offset()
        finally:
            tail.close()


def test_writer_killed_with_sigkill(stream_uri):
    """Every acknowledged batch survives; what is readable is an in-order prefix; appends then continue."""
    batch = 500
    acked = run_and_kill("events", stream_uri, batch, min_acked=3, delay_s=0.003)
    with open_stream(stream_uri) as log:
        got = [r for _, _, r in log.read(0, 10**6)]
        assert [(r["b"], r["k"]) for r in got] == [(i // batch, i % batch) for i in range(len(got))]
        assert len(got) >= (acked + 1) * batch
        if isinstance(log, RedisStream):
            assert len(got) % batch == 0  # MULTI/EXEC: whole appends only
        log.append([{"after": "restart"}])
        assert log.read(0, 10**6)[-1][2] == {"after": "restart"}
        assert len(log.read(0, 10**6)) == len(got) + 1


def _write_log(path, n):
    with EventLog(path) as log:
        offsets = log.append(_records(n))
        return offsets, log.end_offset()


def test_torn_tail_at_every_byte(tmp_path):
    path = str(tmp_path / "e.log")
    offsets, end = _write_log(path, 3)
    whole = open(path, "rb").read()
    last = offsets[-1]
    for cut in range(last + 1, end):
        with open(path, "wb") as f:
            f.write(whole[:cut])
        with EventLog(path) as log:
            assert [r for _, _, r in log.read(0, 10)] == _records(2), cut
            assert log.end_offset() == last
            assert EventTail(log, 0).poll(10, timeout_s=0.01)[-1][1] == last
            assert log.append([{"new": cut}]) == [last]  # the torn tail is truncated, not skipped
        with EventLog(path, create=False) as log:
            assert [r for _, _, r in log.read(0, 10)] == _records(2) + [{"new": cut}]
            assert os.path.getsize(path) == log.end_offset()


def test_zero_filled_tail_is_torn_not_corrupt(tmp_path):
    path = str(tmp_path / "e.log")
    _, end = _write_log(path, 2)
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)
    with EventLog(path) as log:
        assert len(log.read(0, 10)) == 2 and log.end_offset() == end
        assert log.append([{"x": 1}]) == [end]
        assert [r for _, _, r in log.read(0, 10)][-1] == {"x": 1}


@pytest.mark.parametrize("damage", ["payload", "length"])
def test_corrupt_record_in_the_middle_is_an_error(tmp_path, damage):
    path = str(tmp_path / "e.log")
    offsets, _ = _write_log(path, 3)
    data = bytearray(open(path, "rb").read())
    if damage == "payload":
        data[offsets[1] + 12] ^= 0xFF
    else:
        struct.pack_into("<I", data, offsets[1], 0)
    with open(path, "wb") as f:
        f.write(bytes(data))
    with EventLog(path) as log:
        assert len(log.read(0, 1)) == 1  # records before the damage still read
        with pytest.raises(EventLogError, match=rf"e.log is corrupt at offset {offsets[1]}"):
            log.read(0, 10)
        with pytest.raises(EventLogError, match=f"offset {offsets[1]}"):
            log.append([{"x": 1}])
    assert bytes(data) == open(path, "rb").read()  # nothing was truncated


def test_valid_crc_but_not_json(tmp_path):
    path = str(tmp_path / "e.log")
    payload = b"{not json"
    with open(path, "wb") as f:
        f.write(struct.pack("<II", len(payload), zlib.crc32(payload)) + payload)
    with EventLog(path) as log, pytest.raises(EventLogError, match="offset 0 has a valid CRC but is not JSON"):
        log.read(0, 10)


def test_single_writer_and_missing_file(tmp_path):
    path = str(tmp_path / "e.log")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EventLog(path, create=False)
    with EventLog(path) as a, EventLog(path) as b:
        a.append([{"a": 1}])
        with pytest.raises(EventLogError, match="another writer"):
            b.append([{"b": 1}])
        assert [r for _, _, r in b.read(0, 10)] == [{"a": 1}]  # readers are fine
    with pytest.raises(EventLogError, match="unknown stream scheme"):
        open_stream("kafka://x/y")


def test_redis_offsets(redis_url, unique_name):
    with open_stream(f"{redis_url}?stream={unique_name}") as s:
        assert s.end_offset() == "0-0"
        offs = s.append(_records(2))
        assert s.read("0", 5)[0][0] == offs[0]
        with pytest.raises(EventLogError, match="'<ms>-<seq>'"):
            s.read("garbage", 1)
