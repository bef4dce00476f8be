"""Index table: both backends through the same tests (Redis ones skip when redis-server is absent)."""

import time

import numpy as np
import pytest

from mm_ads.data.vectors import write_vector_table
from mm_ads.serving.index.index_table import (
    IndexTableError,
    SQLiteIndexTable,
    load_vector_table_into,
    open_index_table,
)
from tests.serving.index.crash_writer import batch_vectors, run_and_kill


def _unit(n, d, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_float_round_trip_missing_padding_and_reopen(table_uri):
    vecs = _unit(4, 8)
    with open_index_table(table_uri, dim=8, encoder_version="enc-a", create=True) as t:
        assert (t.dim, t.dtype, t.encoder_version, len(t)) == (8, "float32", "enc-a", 0)
        t.put_many([5, -3, 1 << 62, 9], vecs, "enc-a", timestamps=[10.0, 11.0, 12.0, 13.0])
        out, found = t.get_many(np.array([[9, 0], [77, 1 << 62]]))  # 0 = padding, 77 unknown
        np.testing.assert_array_equal(found, [[True, False], [False, True]])
        np.testing.assert_array_equal(out[0, 0], vecs[3])
        np.testing.assert_array_equal(out[1, 1], vecs[2])
        np.testing.assert_array_equal(out[0, 1], np.zeros(8))
        np.testing.assert_array_equal(out[1, 0], np.zeros(8))
        np.testing.assert_array_equal(t.timestamps([-3, 77, 5]), [11.0, np.nan, 10.0])
        t.put_many([5], vecs[1:2] * 0.5, "enc-a")  # overwrite
        assert len(t) == 4
        assert abs(t.timestamps([5])[0] - time.time()) < 60
    with open_index_table(table_uri, dim=8, encoder_version="enc-a") as t:  # reopened: durable, same meta
        out, found = t.get_many([5, -3])
        assert found.all() and len(t) == 4
        np.testing.assert_array_equal(out, np.stack([vecs[1] * 0.5, vecs[1]]))
        empty, none = t.get_many([])
        assert empty.shape == (0, 8) and none.shape == (0,)


def test_int8_storage_and_range(table_uri):
    vecs = _unit(50, 16, seed=1)
    with open_index_table(table_uri, dim=16, encoder_version="q", dtype="int8", create=True) as t:
        assert t.dtype == "int8" and t.scale == pytest.approx(1 / 127)
        t.put_many(np.arange(1, 51), vecs, "q")
        out, found = t.get_many(np.arange(1, 51))
        assert found.all() and out.dtype == np.float32
        np.testing.assert_allclose(out, vecs, atol=0.5 / 127 + 1e-6)
        assert np.abs(out - vecs).max() > 0  # really quantised
        with pytest.raises(IndexTableError, match=r"item_id 7 has \|value\| 2 beyond the int8 range"):
            t.put_many([6, 7], np.stack([vecs[0], vecs[1] * 0 + 2.0]), "q")
        assert t.get_many([6])[1][0]  # unchanged by the refused call
        np.testing.assert_allclose(t.get_many([6])[0][0], vecs[5], atol=0.5 / 127 + 1e-6)
    with open_index_table(table_uri) as t:
        assert (t.dtype, t.dim, t.encoder_version) == ("int8", 16, "q")


_GOOD = np.zeros((2, 4), np.float32)


@pytest.mark.parametrize("ids,vecs,version,kw,match", [
    ([1, 2], np.array([[0, np.nan, 0, 0], [0, 0, 0, 0]], np.float32), "v", {}, "item_id 1 has NaN/inf"),
    ([1, 2], np.array([[0, 0, 0, 0], [np.inf, 0, 0, 0]], np.float32), "v", {}, "item_id 2 has NaN/inf"),
    ([1, 2], np.zeros((2, 5), np.float32), "v", {}, r"shape \[N=2, dim=4\], got \(2, 5\)"),
    ([1, 2], np.zeros((3, 4), np.float32), "v", {}, r"N=2"),
    ([1, 2], _GOOD, "other", {}, "encoder_version 'other' differs from the table's 'v'"),
    ([3, 3], _GOOD, "v", {}, "duplicate item_id 3"),
    ([1.5, 2.0], _GOOD, "v", {}, "item_ids must be integers, got dtype float64"),
    (["a", "b"], _GOOD, "v", {}, "item_ids must be integers"),
    ([[1, 2]], _GOOD, "v", {}, "must be 1-D"),
    ([0, 2], _GOOD, "v", {}, "item_id 0 is the padding id"),
    ([1, 2], _GOOD, "v", {"timestamps": [1.0]}, r"timestamps must have shape \[N=2\]"),
    ([1, 2], _GOOD, "v", {"timestamps": [1.0, np.nan]}, "timestamp of item_id 2 is not finite"),
    ([1, 2], np.array([["a"] * 4] * 2), "v", {}, "vectors must be numeric"),
])
def test_put_rejects_bad_input_atomically(table_uri, ids, vecs, version, kw, match):
    with open_index_table(table_uri, dim=4, encoder_version="v", create=True) as t:
        t.put_many([100], np.ones((1, 4), np.float32), "v")
        with pytest.raises(IndexTableError, match=match):
            t.put_many(ids, vecs, version, **kw)
        assert len(t) == 1  # nothing of the bad call was written
        np.testing.assert_array_equal(t.get_many([1, 2, 3])[1], [False, False, False])


def test_open_checks(table_uri, tmp_path):
    with pytest.raises(IndexTableError, match="does not exist; create it from a vector table with "
                                              "`python -m mm_ads.serving.index.load_index_table --index_table="):
        open_index_table(table_uri)
    with pytest.raises(IndexTableError, match="needs dim >= 1"):
        open_index_table(table_uri, encoder_version="v", create=True)
    with pytest.raises(IndexTableError, match="non-empty encoder_version"):
        open_index_table(table_uri, dim=4, create=True)
    with pytest.raises(IndexTableError, match="dtype must be 'float32' or 'int8'"):
        open_index_table(table_uri, dim=4, encoder_version="v", dtype="float16", create=True)
    open_index_table(table_uri, dim=4, encoder_version="v", create=True).close()
    with pytest.raises(IndexTableError, match="has dim 4, expected 8"):
        open_index_table(table_uri, dim=8)
    with pytest.raises(IndexTableError, match="vectors of encoder 'v', expected 'w'"):
        open_index_table(table_uri, encoder_version="w", create=True)
    with open_index_table(table_uri, dim=4, encoder_version="v", create=True) as t:  # create on existing = open
        assert t.dim == 4
        with pytest.raises(IndexTableError, match="item_ids must be integers"):
            t.get_many([1.5])


def test_not_an_index_table(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(IndexTableError, match="junk.db"):
        open_index_table(str(junk))
    with pytest.raises(IndexTableError, match="unknown index table scheme"):
        open_index_table("mysql://x/y")
    t = open_index_table(f"sqlite://{tmp_path}/u.db", dim=2, encoder_version="v", create=True)
    assert isinstance(t, SQLiteIndexTable) and t.path == str(tmp_path / "u.db")
    t.close()


def test_get_many_is_one_query(table_uri):
    """10,000 ids, one round trip; a second handle (another reader) sees the committed writes."""
    n, d = 10_000, 8
    vecs = _unit(n, d, seed=2)
    ids = np.arange(1, n + 1) * 7
    with open_index_table(table_uri, dim=d, encoder_version="v", create=True) as writer, \
            open_index_table(table_uri) as reader:
        writer.put_many(ids, vecs, "v")
        queries = []
        if isinstance(reader, SQLiteIndexTable):
            reader._conn().set_trace_callback(queries.append)
        else:
            orig = reader._client.execute_command
            reader._client.execute_command = lambda *a, **k: queries.append(a[0]) or orig(*a, **k)
        want = np.concatenate([ids[::-1], [3, 5]])
        out, found = reader.get_many(want)
        assert len(queries) == 1, queries[:3]
        np.testing.assert_array_equal(found, [True] * n + [False, False])
        np.testing.assert_array_equal(out[:n], vecs[::-1])


def test_load_index_table_creates_reloads_and_refuses_another_encoder(table_uri, tmp_path):
    from mm_ads.serving.index.load_index_table import load_index_table

    vecs = _unit(50, 4, seed=5)
    ids = np.arange(1, 51) * 2
    path = str(tmp_path / "v.parquet")
    write_vector_table(path, ids, vecs, encoder_version="enc-a")
    result = load_index_table(table_uri, path)
    assert result == {"index_table": table_uri, "vectors": path, "encoder_version": "enc-a", "dim": 4,
                      "loaded": 50, "items_before": 0, "items": 50}
    with open_index_table(table_uri) as t:  # an item the encoder service added later
        t.put_many([7], _unit(1, 4, seed=6), "enc-a")
    again = load_index_table(table_uri, path)  # re-running: the same rows again, nothing duplicated
    assert (again["loaded"], again["items_before"], again["items"]) == (50, 51, 51)
    with open_index_table(table_uri) as t:
        out, found = t.get_many(np.concatenate([ids, [7]]))
        assert found.all() and t.encoder_version == "enc-a" and t.dtype == "float32"
        np.testing.assert_allclose(out[:50], vecs, atol=1e-6)
    other = str(tmp_path / "other.parquet")
    write_vector_table(other, ids, vecs, encoder_version="enc-b")
    with pytest.raises(IndexTableError, match=r"cannot take --vectors=.*other.parquet \(encoder 'enc-b', dim 4\): "
                                              r".*encoder 'enc-a', expected 'enc-b'.*Load into a new --index_table"):
        load_index_table(table_uri, other)
    with pytest.raises(FileNotFoundError, match="absent.parquet does not exist"):
        load_index_table(table_uri, str(tmp_path / "absent.parquet"))


def test_load_index_table_command_int8_and_errors(tmp_path, repo_root):
    import json
    import os
    import subprocess
    import sys

    vecs = _unit(20, 3, seed=7)
    path = str(tmp_path / "v8.parquet")
    write_vector_table(path, np.arange(1, 21), vecs, encoder_version="enc-8", dtype="int8")
    uri = str(tmp_path / "online" / "index.db")

    def run(*flags):
        return subprocess.run([sys.executable, "-m", "mm_ads.serving.index.load_index_table", *flags], cwd=repo_root,
                              capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=repo_root))

    out = run(f"--index_table={uri}", f"--vectors={path}", "--dtype=int8")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["items"] == 20
    assert any(x.startswith("I") and "loaded 20 vectors of encoder 'enc-8' (dim 3)" in x  # INFO, shown by default
               for x in out.stderr.splitlines()), out.stderr
    with open_index_table(uri) as t:
        assert t.dtype == "int8"
        np.testing.assert_allclose(t.get_many(np.arange(1, 21))[0], vecs, atol=1 / 127 + 1e-6)
    write_vector_table(str(tmp_path / "w.parquet"), [1], _unit(1, 5), encoder_version="enc-w")
    out = run(f"--index_table={uri}", f"--vectors={tmp_path / 'w.parquet'}")
    assert out.returncode == 1 and out.stdout == ""
    assert "load_index_table: --index_table=" in out.stderr and "has dim 3, expected 5" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_load_vector_table_into(table_uri, tmp_path, dtype):
    vecs = _unit(300, 6, seed=3)
    ids = np.arange(1, 301) * 3
    path = str(tmp_path / "v.parquet")
    write_vector_table(path, ids, vecs, encoder_version="enc-p", dtype=dtype)
    with open_index_table(table_uri, dim=6, encoder_version="enc-p", dtype=dtype, create=True) as t:
        assert load_vector_table_into(t, path, timestamp=5.0, batch_size=128) == 300
        out, found = t.get_many(ids)
        assert found.all() and len(t) == 300
        np.testing.assert_allclose(out, vecs, atol=1e-6 if dtype == "float32" else 1 / 127 + 1e-6)
        np.testing.assert_array_equal(t.timestamps(ids[:2]), [5.0, 5.0])
    other = str(tmp_path / "other.parquet")
    write_vector_table(other, ids, vecs, encoder_version="enc-q")
    with open_index_table(table_uri) as t, pytest.raises(IndexTableError, match="'enc-q', expected 'enc-p'"):
        load_vector_table_into(t, other)


@pytest.mark.parametrize("kill_after", [2, 5])
def test_sigkill_mid_put_many_leaves_whole_batches(table_uri, kill_after):
    """A writer killed by SIGKILL during a put_many loop: reopening shows exactly whole batches."""
    batch, dim = 20_000, 16
    acked = run_and_kill("index", table_uri, batch, dim, min_acked=kill_after, delay_s=0.01 * kill_after)
    with open_index_table(table_uri, dim=dim, encoder_version="crash-v1") as t:
        n = len(t)
        assert n % batch == 0 and n // batch >= acked + 1  # whole batches, every acknowledged one kept
        ids = np.arange(1, n + batch + 1)
        out, found = t.get_many(ids)
        assert found[:n].all() and not found[n:].any()
        for b in range(n // batch):
            sl = slice(b * batch, (b + 1) * batch)
            np.testing.assert_array_equal(out[sl], batch_vectors(b, ids[sl], dim))


def test_corrupt_stored_row_is_reported(table_uri):
    with open_index_table(table_uri, dim=4, encoder_version="v", create=True) as t:
        t.put_many([1, 2], np.ones((2, 4), np.float32), "v", timestamps=[7.0, 8.0])
        if isinstance(t, SQLiteIndexTable):
            t._conn().execute("UPDATE vectors SET vec = x'0000' WHERE item_id = 2")
        else:
            t._client.hset(t._rows_key, "2", b"\0" * 5)
        np.testing.assert_array_equal(t.get_many([1])[0], np.ones((1, 4)))
        with pytest.raises(IndexTableError, match="row of item_id 2 has .* bytes, expected .*corrupt"):
            t.get_many([1, 2])
