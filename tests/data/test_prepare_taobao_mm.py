"""Tests of the Taobao-MM reader on the real demo files and on fixtures written here."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from mm_ads.data.dataset import Manifest
from mm_ads.data.readers import DataFormatError, taobao_mm
from mm_ads.data.vectors import VectorTable


def _read_ctr(data_dir, split):
    m = Manifest.load(data_dir)
    ds = tf.data.TFRecordDataset(m.files("ctr", split)).batch(1 << 16)
    parts = [tf.io.parse_example(b, m.spec.parse_spec()) for b in ds]
    return {k: np.concatenate([p[k].numpy() for p in parts]) for k in m.spec.parse_spec()} if parts else {}


def _demo(shared_data):
    path = os.path.join(shared_data, "taobao_mm_demo")
    if not os.path.isdir(path):
        pytest.skip(f"{path} is absent")
    return path


# -- real demo files -----------------------------------------------------------------------------------------------
def test_demo_default_refuses_samples_without_user_features(shared_data, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataFormatError) as e:
        taobao_mm.prepare(_demo(shared_data), str(out))
    msg = str(e.value)
    assert "train_samples.parquet" in msg and "row 0 (0-based)" in msg and "'129_1'" in msg
    assert "on_missing_user" in msg
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_demo_null_join(shared_data, tmp_path):
    demo = _demo(shared_data)
    out = str(tmp_path / "out")
    m = taobao_mm.prepare(demo, out, seq_len=8, on_missing_user="null", provenance={"argv": ["x"]})
    assert m.format == "taobao_mm" and m.provenance["input"] == os.path.abspath(demo) and m.provenance["argv"] == ["x"]
    spec = Manifest.load(out).spec
    assert spec.names("history") == ["hist_item_id", "hist_category_id"]
    assert spec["item_attr_206"].table == spec["hist_category_id"].table == "category"
    assert spec["item_id"].table == spec["hist_item_id"].table == "item"
    assert set(spec.tables().values()) == {1 << 20}
    assert spec.vector_dim == 128 and "item_vector" in spec and not spec.names("meta")
    for split in ("train", "test"):
        samples = pq.read_table(os.path.join(demo, f"{split}_samples.parquet")).to_pydict()
        ctr = _read_ctr(out, split)
        assert len(ctr["label"]) == len(samples["205"]) == 10
        assert ctr["hist_item_id"].shape == (10, 8) and ctr["hist_item_id"].dtype == np.int64
        assert ctr["label"].dtype == np.float32
        np.testing.assert_array_equal(ctr["label"], [lab[0] for lab in samples["label_0"]])
        np.testing.assert_array_equal(ctr["item_id"], samples["205"])
        np.testing.assert_array_equal(ctr["user_id"], samples["129_1"])
        # no demo sample's user/item has feature rows: "null" fills 0
        assert not ctr["hist_item_id"].any() and not ctr["user_profile_3"].any() and not ctr["item_attr_206"].any()
        assert m.extra["stats"][f"{split}_samples_missing_user"] == 10
    stats = pq.read_table(os.path.join(out, "item_stats.parquet")).to_pydict()
    assert sum(stats["train_count"]) == 10 and "first_seen" not in stats
    assert sorted(stats["item_id"]) == sorted(set(pq.read_table(os.path.join(demo, "train_samples.parquet"))
                                                  .column("205").to_pylist()))


def test_demo_vectors_round_trip_int8(shared_data, tmp_path):
    demo = _demo(shared_data)
    out = str(tmp_path / "out")
    m = taobao_mm.prepare(demo, out, on_missing_user="skip")
    info = m.extra["vector_tables"]["scl"]
    assert info["path"] == "vectors/scl.parquet" and info["scale"] == pytest.approx(1 / 127)
    table = VectorTable.load(os.path.join(out, info["path"]), expected_dim=128,
                             expected_encoder_version=info["encoder_version"])
    assert info["encoder_version"].startswith("taobao_mm_scl_int8_") and len(info["encoder_version"]) == 31
    src = pq.read_table(os.path.join(demo, "scl_embedding_int8_p90.parquet")).to_pydict()
    want = dict(zip(src["205"], src["205_c"]))
    assert table.vectors.dtype == np.int8 and table.scale == pytest.approx(1 / 127)
    assert sorted(table.item_ids.tolist()) == sorted(want)
    for i, v in zip(table.item_ids.tolist(), table.vectors):
        np.testing.assert_array_equal(v, want[i])
    np.testing.assert_allclose(table.float_vectors(), table.vectors.astype(np.float32) / 127.0, rtol=1e-6)
    # "skip" drops every demo sample (no user rows), but the splits are still listed
    assert m.num_rows("ctr", "train") == 0 and m.extra["stats"]["train_samples_missing_user"] == 10
    # same content → same version
    m2 = taobao_mm.prepare(demo, str(tmp_path / "again"), on_missing_user="skip")
    assert m2.extra["vector_tables"]["scl"]["encoder_version"] == info["encoder_version"]


def test_demo_users_joined_by_129_1(shared_data, tmp_path):
    """Samples that point at the demo's real user and item rows get their sequences and attributes."""
    demo = _demo(shared_data)
    inp = tmp_path / "in"
    inp.mkdir()
    users = pq.read_table(os.path.join(demo, "train_user_features.parquet"))
    items = pq.read_table(os.path.join(demo, "item_features.parquet"))
    pq.write_table(users, inp / "train_user_features.parquet")
    pq.write_table(items, inp / "item_features.parquet")
    u = users.column("129_1").to_pylist()
    it = items.column("205").to_pylist()
    pq.write_table(pa.table({
        "label_0": pa.array([[1, 0], [0, 1], [1, 0]], pa.list_(pa.int8())),
        "129_1": pa.array([u[3], u[0], u[3]], pa.int64()),
        "205": pa.array([it[1], it[2], it[9]], pa.int64()),
    }), inp / "train_samples.parquet")
    out = str(tmp_path / "out")
    taobao_mm.prepare(str(inp), out, seq_len=20)
    ctr = _read_ctr(out, "train")
    seqs = users.column("150_2_180").to_pylist()
    cats = users.column("151_2_180").to_pylist()
    np.testing.assert_array_equal(ctr["hist_item_id"][0], seqs[3][-20:])  # the newest 20, most recent last
    np.testing.assert_array_equal(ctr["hist_category_id"][1], cats[0][-20:])
    np.testing.assert_array_equal(ctr["user_profile_5"], np.array(users.column("130_5").to_pylist())[[3, 0, 3]])
    np.testing.assert_array_equal(ctr["item_attr_214"], np.array(items.column("214").to_pylist())[[1, 2, 9]])
    np.testing.assert_array_equal(ctr["label"], [1, 0, 1])


# -- fixtures ----------------------------------------------------------------------------------------------------
def _write_fixture(d, user_rows=None, sample_rows=None):
    d.mkdir(exist_ok=True)
    user_rows = user_rows or {
        "129_1": [11, -22, 33],
        **{f"130_{i}": [100 + i, 200 + i, 0] for i in range(1, 6)},
        "150_2_180": [[5, 6, 7, 8, 9], [7], None],
        "151_2_180": [[50, 60, 70, 80, 90], [70], None],
    }
    sample_rows = sample_rows or {"label_0": [[1, 0], [0, 0], [1, 1], [0]], "129_1": [11, -22, 33, 11],
                                  "205": [7, 8, 9, 1000]}
    pq.write_table(pa.table({
        "label_0": pa.array(sample_rows["label_0"], pa.list_(pa.int8())),
        "129_1": pa.array(sample_rows["129_1"], pa.int64()),
        "205": pa.array(sample_rows["205"], pa.int64()),
    }), d / "train_samples.parquet")
    pq.write_table(pa.table({k: pa.array(v, pa.list_(pa.int64()) if k.startswith("15") else pa.int64())
                             for k, v in user_rows.items()}), d / "train_user_features.parquet")
    pq.write_table(pa.table({"205": [7, 8, 9], "206": [70, 80, 90], "213": [1, 2, 3], "214": [4, 5, 6]}),
                   d / "item_features.parquet")
    return d


def test_fixture_tail_window_left_padding_and_missing_items(tmp_path):
    inp = _write_fixture(tmp_path / "in")
    out = str(tmp_path / "out")
    m = taobao_mm.prepare(str(inp), out, seq_len=3, num_buckets=1000)
    assert set(m.spec.tables().values()) == {1000} and m.spec.vector_dim == 0 and "vector_tables" not in m.extra
    assert "test" not in m.components["ctr"]
    ctr = _read_ctr(out, "train")
    np.testing.assert_array_equal(ctr["hist_item_id"], [[7, 8, 9], [0, 0, 7], [0, 0, 0], [7, 8, 9]])
    np.testing.assert_array_equal(ctr["hist_category_id"], [[70, 80, 90], [0, 0, 70], [0, 0, 0], [70, 80, 90]])
    np.testing.assert_array_equal(ctr["item_attr_206"], [70, 80, 90, 0])
    np.testing.assert_array_equal(ctr["user_profile_2"], [102, 202, 0, 102])
    np.testing.assert_array_equal(ctr["label"], [1, 0, 1, 0])
    assert m.extra["stats"]["train_samples_missing_item_features"] == 1


def test_fixture_sharded_output(tmp_path):
    inp = _write_fixture(tmp_path / "in")
    m = taobao_mm.prepare(str(inp), str(tmp_path / "out"), seq_len=2, rows_per_shard=3)
    files = m.components["ctr"]["train"]["files"]
    assert files == ["ctr/train-00000-of-00002.tfrecord", "ctr/train-00001-of-00002.tfrecord"]
    assert sorted(os.listdir(tmp_path / "out" / "ctr")) == [os.path.basename(f) for f in files]
    assert len(_read_ctr(str(tmp_path / "out"), "train")["label"]) == 4


@pytest.mark.parametrize("change,file,where,field", [
    (lambda u, s: s["label_0"].__setitem__(2, [2, 0]), "train_samples.parquet", "row 2", "label_0"),
    (lambda u, s: s["label_0"].__setitem__(1, []), "train_samples.parquet", "row 1", "label_0"),
    (lambda u, s: u["151_2_180"].__setitem__(1, [70, 71]), "train_user_features.parquet", "row 1", "151_2_180"),
    (lambda u, s: u["129_1"].__setitem__(2, 11), "train_user_features.parquet", "row 2", "129_1"),
    (lambda u, s: u.pop("130_4"), "train_user_features.parquet", "schema", "130_4"),
])
def test_fixture_malformed_input_names_file_row_field(tmp_path, change, file, where, field):
    users = {"129_1": [11, -22, 33], **{f"130_{i}": [1, 2, 3] for i in range(1, 6)},
             "150_2_180": [[5, 6], [7], []], "151_2_180": [[50, 60], [70], []]}
    samples = {"label_0": [[1, 0], [0, 0], [1, 1]], "129_1": [11, -22, 33], "205": [7, 8, 9]}
    change(users, samples)
    inp = _write_fixture(tmp_path / "in", users, samples)
    out = tmp_path / "out"
    with pytest.raises(DataFormatError) as e:
        taobao_mm.prepare(str(inp), str(out))
    assert e.value.path.endswith(file) and e.value.where.startswith(where) and e.value.field == field
    assert file in str(e.value) and repr(field) in str(e.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_missing_component_and_bad_policy(tmp_path):
    inp = _write_fixture(tmp_path / "in")
    os.remove(inp / "item_features.parquet")
    with pytest.raises(FileNotFoundError, match="item_features"):
        taobao_mm.prepare(str(inp), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="'drop'"):
        taobao_mm.prepare(str(inp), str(tmp_path / "out"), on_missing_user="drop")


def test_float_vectors_are_quantised_with_scale_1_127(tmp_path):
    inp = _write_fixture(tmp_path / "in")
    vecs = np.array([[0.5, -1.0, 0.25], [1.5, 0.0, -0.004]], np.float32)
    pq.write_table(pa.table({"205": pa.array([8, 7], pa.int64()),
                             "205_c": pa.array(vecs.tolist(), pa.list_(pa.float32()))}), inp / "scl_embedding.parquet")
    m = taobao_mm.prepare(str(inp), str(tmp_path / "out"))
    t = VectorTable.load(os.path.join(tmp_path / "out", m.extra["vector_tables"]["scl"]["path"]))
    np.testing.assert_array_equal(t.item_ids, [7, 8])
    np.testing.assert_array_equal(t.vectors, [[127, 0, -1], [64, -127, 32]])  # clipped to [-1, 1], rounded
    assert m.spec.vector_dim == 3
