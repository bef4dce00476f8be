import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mm_ads.data.vectors import VectorTable, quantize_int8, write_vector_table


def _unit(n, d, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_float_round_trip_and_lookup(tmp_path):
    ids = np.array([7, -3, 1 << 62, 5], np.int64)
    vecs = _unit(4, 6)
    path = str(tmp_path / "v.parquet")
    write_vector_table(path, ids, vecs, encoder_version="enc-1")
    t = VectorTable.load(path, expected_dim=6, expected_encoder_version="enc-1")
    np.testing.assert_array_equal(t.item_ids, ids)
    np.testing.assert_array_equal(t.vectors, vecs)
    out, missing = t.lookup(np.array([[5, 99], [1 << 62, 7]]))
    np.testing.assert_array_equal(missing, [[False, True], [False, False]])
    np.testing.assert_array_equal(out[0, 0], vecs[3])
    np.testing.assert_array_equal(out[0, 1], np.zeros(6))
    np.testing.assert_array_equal(out[1, 0], vecs[2])


def test_int8_keeps_int8_with_scale(tmp_path):
    vecs = _unit(50, 16, seed=1)
    path = str(tmp_path / "q.parquet")
    write_vector_table(path, np.arange(50), vecs, encoder_version="e", dtype="int8")
    t = VectorTable.load(path)
    assert t.vectors.dtype == np.int8 and t.scale == pytest.approx(1 / 127)
    assert pq.read_table(path).schema.field("vector").type.value_type == pa.int8()
    np.testing.assert_allclose(t.float_vectors(), vecs, atol=0.5 / 127 + 1e-7)
    q, scale = quantize_int8(vecs * 3.0)
    assert scale == pytest.approx(np.abs(vecs * 3).max() / 127) and np.abs(q).max() == 127


@pytest.mark.parametrize("ids,vecs,kw,match", [
    ([1, 1], np.zeros((2, 3), np.float32), {}, "duplicate item_id 1"),
    ([1, 2], np.array([[0, np.nan, 0], [0, 0, 0]], np.float32), {}, "item_id 1 has NaN"),
    ([1, 2], np.zeros((3, 3), np.float32), {}, "N=2"),
    ([1, 2], np.zeros((2, 3), np.float32), {"encoder_version": ""}, "encoder_version"),
    ([1, 2], np.zeros((2, 3), np.float32), {"dtype": "float16"}, "dtype"),
])
def test_write_rejects_bad_input(tmp_path, ids, vecs, kw, match):
    path = tmp_path / "bad.parquet"
    args = {"encoder_version": "e", **kw}
    with pytest.raises(ValueError, match=match):
        write_vector_table(str(path), np.asarray(ids), vecs, **args)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_load_refuses_mixed_versions_and_dims(tmp_path):
    path = str(tmp_path / "v.parquet")
    write_vector_table(path, np.arange(3), _unit(3, 4), encoder_version="v1")
    with pytest.raises(ValueError, match="'v1', expected 'v2'"):
        VectorTable.load(path, expected_encoder_version="v2")
    with pytest.raises(ValueError, match="dim 4, expected 8"):
        VectorTable.load(path, expected_dim=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VectorTable.load(str(tmp_path / "nope.parquet"))
    pq.write_table(pa.table({"a": [1]}), str(tmp_path / "plain.parquet"))
    with pytest.raises(ValueError, match="write_vector_table"):
        VectorTable.load(str(tmp_path / "plain.parquet"))


def test_load_rejects_nan_written_by_another_tool(tmp_path):
    path = str(tmp_path / "v.parquet")
    write_vector_table(path, np.arange(3), _unit(3, 4), encoder_version="v1")
    table = pq.read_table(path)
    flat = np.asarray(table.column("vector").combine_chunks().values).copy()
    flat[5] = np.nan
    bad = table.set_column(1, "vector", pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), 4))
    pq.write_table(bad.replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(ValueError, match="item_id 1 has NaN/inf"):
        VectorTable.load(path)


def test_random_unit_vectors_are_unit_norm_and_seeded():
    from mm_ads.data.vectors import random_unit_vectors

    v = random_unit_vectors(50, 16)
    assert v.shape == (50, 16) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(v, random_unit_vectors(50, 16))
    assert not np.array_equal(v, random_unit_vectors(50, 16, seed=1))
