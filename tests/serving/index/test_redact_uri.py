"""Redis URI credentials never reach logs, error messages or written files (`redact_uri`)."""

import pytest

from mm_ads.serving.index.events import EventLogError, RedisStream, open_stream
from mm_ads.serving.index.index_table import IndexTableError, RedisIndexTable, open_index_table
from mm_ads.serving.index.redis_local import redact_uri

pytest.importorskip("redis")  # connect() needs redis-py even with a client given


@pytest.mark.parametrize("uri, shown", [
    ("redis://:s3cret@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
    ("redis://app:s3cret@host:6379/2?prefix=idx", "redis://app:***@host:6379/2?prefix=idx"),
    ("rediss://app:p@ss:w0rd@host/0?stream=ev", "rediss://app:***@host/0?stream=ev"),  # '@' inside the password
    ("redis://s3cret@host:6379", "redis://***@host:6379"),
    ("redis://host:6379/0?stream=ev&password=s3cret", "redis://host:6379/0?stream=ev&password=***"),
    ("unix://:s3cret@/tmp/redis.sock?db=0", "unix://:***@/tmp/redis.sock?db=0"),
    ("redis://127.0.0.1:6379/0?prefix=a@b", "redis://127.0.0.1:6379/0?prefix=a@b"),  # '@' after the host: kept
    ("runs/events.log", "runs/events.log"),
    ("/data/user:name@x/events.log", "/data/user:name@x/events.log"),
    # several modalities' tables (`--index_table=image=URI,text=URI`): every entry
    ("image=redis://:s3cret@h/0?prefix=i,text=runs/text.db", "image=redis://:***@h/0?prefix=i,text=runs/text.db"),
    ("image=redis://a:b@h/0,text=rediss://c:d@h/1?password=x",
     "image=redis://a:***@h/0,text=rediss://c:***@h/1?password=***"),
])
def test_redact_uri(uri, shown):
    assert redact_uri(uri) == shown


class _FakeRedis:
    """Just what opening a Redis index table reads: its metadata hash."""

    def hgetall(self, key):
        return {b"dim": b"8", b"dtype": b"float32", b"scale": b"1", b"encoder_version": b"enc"}


def test_redis_backends_show_no_password():
    uri = "redis://app:s3cret@host:6379/0?stream=ev"
    stream = RedisStream(uri, client=_FakeRedis())
    assert "s3cret" not in repr(stream) and "s3cret" not in str(stream.path)  # logged; nearline_stats.json "stream"
    assert stream.uri == "redis://app:***@host:6379/0?stream=ev"
    table = RedisIndexTable("redis://:s3cret@host:6379/0?prefix=idx", client=_FakeRedis())
    assert table.uri == "redis://:***@host:6379/0?prefix=idx" and "s3cret" not in repr(table)
    with pytest.raises(IndexTableError) as e:
        RedisIndexTable("redis://:s3cret@host:6379/0?prefix=idx", dim=4, client=_FakeRedis())
    assert "dim 8, expected 4" in str(e.value) and "s3cret" not in str(e.value)
    with pytest.raises(IndexTableError) as e:
        open_index_table("redis+tls://:s3cret@host/0")
    assert "unknown index table scheme" in str(e.value) and "s3cret" not in str(e.value)
    with pytest.raises(EventLogError) as e:
        open_stream("redis+tls://:s3cret@host/0")
    assert "unknown stream scheme" in str(e.value) and "s3cret" not in str(e.value)
