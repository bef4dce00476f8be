"""Tests of the tf.data CTR pipeline and the vector join."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from mm_ads.data import pipeline
from mm_ads.data.dataset import DatasetWriter, Manifest
from mm_ads.data.spec import FeatureSpec, missing_flag_name
from mm_ads.data.vectors import VectorTable, write_vector_table

S, D, NUM_ITEMS, N, SHARDS = 5, 8, 50, 100, 4
IN_TABLE = np.arange(1, 41)  # items 41..50 have no vector


def _spec(vector_dim=D, with_history_side=True):
    return FeatureSpec.default(seq_len=S, vector_dim=vector_dim, num_items=NUM_ITEMS, num_categories=5,
                               num_brands=7, num_users=10, with_history_side=with_history_side)


def _no_vectors(spec):
    return FeatureSpec([f for f in spec if f.role != "vector"], spec.seq_len, 0)


def _columns(n=N, seed=0):
    rng = np.random.default_rng(seed)
    hist = rng.integers(1, NUM_ITEMS + 1, (n, S))
    lengths = rng.integers(0, S + 1, n)
    hist[np.arange(S)[None, :] >= lengths[:, None]] = 0  # right-padded with padding_id 0
    return {
        "user_id": rng.integers(1, 11, n),
        "item_id": rng.integers(1, NUM_ITEMS + 1, n),
        "category_id": rng.integers(1, 6, n),
        "brand_id": rng.integers(1, 8, n),
        "hist_item_id": hist,
        "hist_category_id": np.where(hist > 0, rng.integers(1, 6, (n, S)), 0),
        "hist_brand_id": np.where(hist > 0, rng.integers(1, 8, (n, S)), 0),
        "timestamp": np.arange(n) + 1000,  # unique: identifies a row
        "item_created_at": rng.integers(0, 1000, n),
        "label": rng.integers(0, 2, n).astype(np.float32),
    }


def _write_dataset(path, columns, spec, num_shards, tables=(), table_ids=IN_TABLE, dtype="float32"):
    """Writes ctr/train and one vector table per name in `tables` (listed in the manifest)."""
    rng = np.random.default_rng(1)
    with DatasetWriter(str(path), name="t", format="test", spec=spec, seed=0) as w:
        w.write_ctr("train", columns, num_shards=num_shards)
        for name in tables:
            rel = f"vectors/{name}.parquet"
            vectors = rng.uniform(-1, 1, (len(table_ids), D)).astype(np.float32)
            write_vector_table(os.path.join(w.tmp_dir, rel), table_ids, vectors, "enc-1", dtype=dtype)
        if tables:
            w.manifest.extra["vector_tables"] = [f"vectors/{name}.parquet" for name in tables]
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    columns = _columns()
    path = _write_dataset(tmp_path_factory.mktemp("ds") / "d", columns, _spec(), SHARDS, tables=("scl",))
    return path, columns


def _collect(ds):
    """Concatenates every batch: ({name: array [N, ...]}, label [N])."""
    feats, labels = {}, []
    for f, y in ds:
        for k, v in f.items():
            feats.setdefault(k, []).append(v.numpy())
        labels.append(y.numpy())
    return {k: np.concatenate(v) for k, v in feats.items()}, np.concatenate(labels)


def _sorted_by_timestamp(feats, labels):
    order = np.argsort(feats["timestamp"])
    return {k: v[order] for k, v in feats.items()}, labels[order]


def test_shapes_and_dtypes_follow_the_spec(data):
    path, _ = data
    spec = _spec()
    ds = pipeline.make_ctr_dataset(path, "train", 16, drop_remainder=True)
    features, label = next(iter(ds))
    assert label.shape == (16,) and label.dtype == tf.float32
    expected = {f.name: f for f in spec if f.role != "label"}
    flags = {missing_flag_name(f.name): f.shape[:-1] for f in spec.by_role("vector")}
    assert set(features) == set(expected) | set(flags)
    dtypes = {"int64": tf.int64, "float32": tf.float32}
    for name, f in expected.items():
        assert features[name].shape == (16,) + f.shape, name
        assert features[name].dtype == dtypes[f.dtype], name
    for name, shape in flags.items():
        assert features[name].shape == (16,) + shape and features[name].dtype == tf.float32
    assert ds.element_spec[0]["hist_item_vector"].shape == (16, S, D)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_values_and_vectors_equal_what_was_written(tmp_path, dtype):
    columns = _columns()
    path = _write_dataset(tmp_path / "d", columns, _spec(), 3, tables=("scl",), dtype=dtype)
    feats, labels = _sorted_by_timestamp(*_collect(pipeline.make_ctr_dataset(path, "train", 7)))
    for name, col in columns.items():
        got = labels if name == "label" else feats[name]
        np.testing.assert_array_equal(got, col, err_msg=name)
    table = VectorTable.load(os.path.join(path, "vectors", "scl.parquet"))
    assert table.dtype == dtype
    for vec, ids in (("item_vector", "item_id"), ("hist_item_vector", "hist_item_id")):
        want, missing = table.lookup(columns[ids])
        np.testing.assert_allclose(feats[vec], want, rtol=1e-6, atol=1e-7, err_msg=vec)
        # Padding (id 0) is not in the table but must not be flagged missing.
        np.testing.assert_array_equal(feats[missing_flag_name(vec)], (missing & (columns[ids] != 0)).astype(np.float32))
    assert feats["hist_item_vector_missing"].sum() > 0 and feats["item_vector_missing"].sum() > 0


def test_int8_passthrough_with_scale(tmp_path):
    columns = _columns()
    path = _write_dataset(tmp_path / "d", columns, _spec(), 2, tables=("scl",), dtype="int8")
    join = pipeline.build_vector_join(path, vector_dtype="int8")
    ds = pipeline.make_ctr_dataset(path, "train", 10, vector_table=join, vector_dtype="int8")
    feats, _ = _sorted_by_timestamp(*_collect(ds))
    assert feats["hist_item_vector"].dtype == np.int8
    table = VectorTable.load(os.path.join(path, "vectors", "scl.parquet"))
    want, _ = table.lookup(columns["hist_item_id"])
    np.testing.assert_allclose(feats["hist_item_vector"].astype(np.float32) * np.float32(join.scale), want, rtol=1e-6)
    with pytest.raises(ValueError, match="needs an int8 table"):
        pipeline.build_vector_join(_write_dataset(tmp_path / "f", columns, _spec(), 1, tables=("scl",)),
                                   vector_dtype="int8")


def test_padding_is_zero_and_never_counted_even_if_its_id_has_a_vector(tmp_path):
    columns = _columns()
    ids = np.arange(0, 41)  # the padding id 0 has a (non-zero) vector in this table
    path = _write_dataset(tmp_path / "d", columns, _spec(), 2, tables=("scl",), table_ids=ids)
    join = pipeline.build_vector_join(path)
    feats, _ = _sorted_by_timestamp(*_collect(pipeline.make_ctr_dataset(path, "train", 32, vector_table=join)))
    pad = columns["hist_item_id"] == 0
    assert pad.any()
    assert not feats["hist_item_vector"][pad].any()
    assert not feats["hist_item_vector_missing"][pad].any()
    hist, item = columns["hist_item_id"], columns["item_id"]
    stats = join.stats()
    want_hist = {"lookups": int((hist != 0).sum()), "missing": int((hist > 40).sum())}
    assert stats["features"]["hist_item_vector"] == want_hist
    assert stats["features"]["item_vector"] == {"lookups": N, "missing": int((item > 40).sum())}
    assert stats["lookups"] == N + int((hist != 0).sum())
    assert stats["missing"] == int((hist > 40).sum() + (item > 40).sum())
    assert stats["miss_rate"] == pytest.approx(stats["missing"] / stats["lookups"])
    join.reset_stats()
    assert join.stats(log=False)["lookups"] == 0


def test_miss_rate_is_logged_as_a_warning(data):
    path, _ = data
    join = pipeline.build_vector_join(path, "scl", warn_miss_rate=0.01)
    _collect(pipeline.make_ctr_dataset(path, "train", 50, vector_table=join))
    with pytest.MonkeyPatch.context() as mp:
        logged = []
        mp.setattr(pipeline.logging, "warning", lambda msg, *args: logged.append(msg % args))
        rate = join.stats()["miss_rate"]
    assert rate > 0.01 and len(logged) == 1 and f"{100 * rate:.3f}%" in logged[0]


def test_unshuffled_order_is_deterministic(data):
    path, _ = data
    runs = [_collect(pipeline.make_ctr_dataset(path, "train", 8))[0]["timestamp"] for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])


def test_seeded_shuffle_is_a_reproducible_permutation(data):
    path, _ = data
    spec = _no_vectors(_spec())

    def order(seed, **kw):
        ds = pipeline.make_ctr_dataset(path, "train", 8, spec=spec, shuffle=True, shuffle_buffer=64, seed=seed, **kw)
        return _collect(ds)[0]["timestamp"]

    a, b, c = order(1), order(1), order(2)
    plain = _collect(pipeline.make_ctr_dataset(path, "train", 8, spec=spec))[0]["timestamp"]
    np.testing.assert_array_equal(np.sort(a), np.arange(N) + 1000)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, plain)
    # Each epoch of a repeated pipeline is a new permutation (one batch = one epoch here).
    ds = pipeline.make_ctr_dataset(path, "train", N, spec=spec, shuffle=True, seed=1, repeat=True)
    first, second = [f["timestamp"].numpy() for f, _ in ds.take(2)]
    np.testing.assert_array_equal(np.sort(second), np.arange(N) + 1000)
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("num_shards,policy,mode", [(SHARDS, "auto", "files"), (1, "auto", "records"),
                                                    (SHARDS, "records", "records")])
def test_two_shards_are_disjoint_and_cover_the_split(tmp_path, num_shards, policy, mode):
    columns = _columns()
    spec = _no_vectors(_spec())
    path = _write_dataset(tmp_path / "d", columns, spec, num_shards)
    parts = []
    for i in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i, num_replicas_in_sync=2)
        ds = pipeline.make_ctr_dataset(path, "train", 8, input_context=ctx, shard_policy=policy)
        parts.append(_collect(ds)[0]["timestamp"])
    assert not set(parts[0]) & set(parts[1])
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), columns["timestamp"])
    if mode == "files":  # pipeline 0 reads files 0 and 2 whole
        files = Manifest.load(path).files("ctr", "train")
        records = [r for f in files[0::2] for r in tf.data.TFRecordDataset(f).as_numpy_iterator()]
        want = [tf.train.Example.FromString(r).features.feature["timestamp"].int64_list.value[0] for r in records]
        np.testing.assert_array_equal(np.sort(parts[0]), np.sort(want))
    else:  # every other record of the interleaved stream
        assert abs(len(parts[0]) - len(parts[1])) <= 1


def test_files_policy_needs_enough_files(tmp_path):
    path = _write_dataset(tmp_path / "d", _columns(), _no_vectors(_spec()), 1)
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=0, num_replicas_in_sync=2)
    with pytest.raises(ValueError, match="at least 2 files"):
        pipeline.make_ctr_dataset(path, "train", 8, input_context=ctx, shard_policy="files")


def test_table_dim_must_equal_spec_dim(tmp_path):
    path = _write_dataset(tmp_path / "d", _columns(), _spec(), 1, tables=("scl",))
    spec4 = _spec(vector_dim=4)
    table = os.path.join(path, "vectors", "scl.parquet")
    with pytest.raises(ValueError, match=rf"{table} has dim {D} but the FeatureSpec has vector_dim 4"):
        pipeline.make_ctr_dataset(path, "train", 8, spec=spec4)


def test_vector_table_resolution_errors(tmp_path, data):
    columns = _columns()
    none = _write_dataset(tmp_path / "none", columns, _spec(), 1)
    with pytest.raises(ValueError, match="has vector features but .* lists no vector table"):
        pipeline.make_ctr_dataset(none, "train", 8)
    two = _write_dataset(tmp_path / "two", columns, _spec(), 1, tables=("scl", "clip"))
    with pytest.raises(ValueError, match=r"several vector tables \['clip', 'scl'\]"):
        pipeline.make_ctr_dataset(two, "train", 8)
    with pytest.raises(ValueError, match=r"vector_table='nope' is neither .* \['clip', 'scl'\]"):
        pipeline.make_ctr_dataset(two, "train", 8, vector_table="nope")
    ds = pipeline.make_ctr_dataset(two, "train", 8, vector_table="clip")
    assert next(iter(ds))[0]["item_vector"].shape == (8, D)
    # A path outside the manifest works too.
    path, _ = data
    ds = pipeline.make_ctr_dataset(none, "train", 8, vector_table=os.path.join(path, "vectors", "scl.parquet"))
    assert next(iter(ds))[0]["hist_item_vector"].shape == (8, S, D)
    with pytest.raises(ValueError, match="no vector features"):
        pipeline.make_ctr_dataset(path, "train", 8, spec=_no_vectors(_spec()), vector_table="scl")
    with pytest.raises(ValueError, match="expected 'enc-2'"):
        pipeline.build_vector_join(path, "scl", encoder_version="enc-2")


def test_files_lacking_a_spec_feature_fail_at_construction_naming_feature_and_file(tmp_path):
    short = _no_vectors(_spec(with_history_side=False))  # records without hist_category_id / hist_brand_id
    path = _write_dataset(tmp_path / "d", _columns(), short, 2)
    with pytest.raises(ValueError, match=r"ctr/train: .*train-00000-of-00002\.tfrecord, Feature: hist_\w+_id"):
        pipeline.make_ctr_dataset(path, "train", 8, spec=_no_vectors(_spec()))


def test_files_of_the_wrong_shape_fail_at_construction_naming_the_file(tmp_path):
    path = _write_dataset(tmp_path / "d", _columns(), _no_vectors(_spec()), 1)
    longer = FeatureSpec.default(seq_len=S + 1, vector_dim=0, num_items=NUM_ITEMS, num_categories=5,
                                 num_brands=7, num_users=10)
    with pytest.raises(ValueError, match=r"train-00000-of-00001\.tfrecord, Key: hist_\w+_id.*expected"):
        pipeline.make_ctr_dataset(path, "train", 8, spec=longer)


@pytest.mark.parametrize("record_file_names", [False, True])
def test_a_bad_record_inside_a_file_fails_naming_split_or_file(tmp_path, record_file_names):
    spec = _no_vectors(_spec())
    path = _write_dataset(tmp_path / "d", _columns(), spec, 1)
    bad = _write_dataset(tmp_path / "bad", _columns(n=3), _no_vectors(_spec(with_history_side=False)), 1)
    shard = Manifest.load(path).files("ctr", "train")[0]
    records = list(tf.data.TFRecordDataset(shard).as_numpy_iterator())
    records += list(tf.data.TFRecordDataset(Manifest.load(bad).files("ctr", "train")[0]).as_numpy_iterator())
    with tf.io.TFRecordWriter(shard) as w:
        for r in records:
            w.write(r)
    _set_file_rows(path, [len(records)])  # the manifest lists them: the records, not their count, are bad
    ds = pipeline.make_ctr_dataset(path, "train", 8, record_file_names=record_file_names)  # first record is fine
    where = re.escape(shard if record_file_names else os.path.join(path, "ctr", "train") + " (one of 1 files)")
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"Name: {where}, Feature: hist_\w+_id"):
        _collect(ds)


def _set_file_rows(path, rows):
    """Rewrites the ctr/train entry's per-file counts in the manifest (None: removes them, as old manifests)."""
    manifest = os.path.join(path, "manifest.json")
    with open(manifest) as f:
        obj = json.load(f)
    entry = obj["components"]["ctr"]["train"]
    if rows is None:
        entry.pop("file_rows")
    else:
        entry["file_rows"] = rows
    with open(manifest, "w") as f:
        json.dump(obj, f)


def _record_bounds(shard):
    """(start, end) byte offsets of every record of a TFRecord file."""
    bounds, offset = [], 0
    for r in tf.data.TFRecordDataset(shard).as_numpy_iterator():
        bounds.append((offset, offset + len(r) + 16))
        offset += len(r) + 16
    return bounds


def test_the_manifest_lists_every_files_record_count(data):
    path, _ = data
    m = Manifest.load(path)
    rows = m.file_rows("ctr", "train")
    assert rows == [25, 25, 25, 25] and sum(rows) == m.num_rows("ctr", "train") == N
    for shard, n in zip(m.files("ctr", "train"), rows):
        assert sum(1 for _ in tf.data.TFRecordDataset(shard)) == n


def test_a_shard_cut_at_a_record_boundary_fails_naming_file_and_counts(tmp_path):
    path = _write_dataset(tmp_path / "d", _columns(), _no_vectors(_spec()), 2)
    shard = Manifest.load(path).files("ctr", "train")[1]
    bounds = _record_bounds(shard)
    with open(shard, "r+b") as f:
        f.truncate(bounds[40][0])  # 40 of 50 records left, every one intact
    assert sum(1 for _ in tf.data.TFRecordDataset(shard)) == 40  # what TensorFlow alone reports: nothing wrong
    pattern = (rf"ctr/train: {re.escape(shard)} holds 40 readable records, the manifest lists 50: reading stopped "
               rf"at record index 40 \(byte offset {bounds[40][0]}; the file ends there")
    with pytest.raises(ValueError, match=pattern):
        pipeline.make_ctr_dataset(path, "train", 8)
    # without the check the split just ends early
    feats, _ = _collect(pipeline.make_ctr_dataset(path, "train", 8, check_counts=False))
    assert len(feats["timestamp"]) == 90


@pytest.mark.parametrize("where", ["data", "cut_inside"])
def test_a_corrupt_record_fails_naming_file_index_and_offset(tmp_path, where):
    path = _write_dataset(tmp_path / "d", _columns(), _no_vectors(_spec()), 2)
    shard = Manifest.load(path).files("ctr", "train")[0]
    bounds = _record_bounds(shard)
    with open(shard, "r+b") as f:
        if where == "data":
            f.seek(bounds[17][0] + 12 + 5)  # a byte of record 17's data: its CRC no longer matches
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        else:
            f.truncate(bounds[17][0] + 20)  # cut inside record 17
    error = "corrupted record at" if where == "data" else "truncated record at"
    pattern = (rf"{re.escape(shard)} holds 17 readable records, the manifest lists 50: reading stopped at record "
               rf"index 17 \(byte offset {bounds[17][0]}; TensorFlow's reader: {error}")
    with pytest.raises(ValueError, match=pattern):
        pipeline.make_ctr_dataset(path, "train", 8)


def test_a_shard_with_more_records_than_listed_fails(tmp_path):
    path = _write_dataset(tmp_path / "d", _columns(), _no_vectors(_spec()), 2)
    _set_file_rows(path, [49, 50])
    with pytest.raises(ValueError, match="holds 50 readable records, the manifest lists 49: "
                                         "the file has records the manifest does not list"):
        pipeline.make_ctr_dataset(path, "train", 8)


def test_a_file_is_verified_once_per_process_until_it_changes(tmp_path, monkeypatch):
    path = _write_dataset(tmp_path / "d", _columns(), _no_vectors(_spec()), 2)
    files = Manifest.load(path).files("ctr", "train")
    pipeline.make_ctr_dataset(path, "train", 8)
    assert all(pipeline._VERIFIED.get(pipeline._file_key(f)) == 50 for f in files)
    with monkeypatch.context() as m:  # e.g. the next epoch's pipeline: no file is read again
        m.setattr(tf.data, "TFRecordDataset", lambda *a, **k: pytest.fail("a verified file was read again"))
        pipeline.verify_record_counts(files, [50, 50], "ctr/train")
    located = []
    locate = pipeline._locate_stop
    monkeypatch.setattr(pipeline, "_locate_stop", lambda p: located.append(p) or locate(p))
    with open(files[0], "r+b") as f:  # changed: verified again
        f.truncate(_record_bounds(files[0])[10][0])
    with pytest.raises(ValueError, match="holds 10 readable records"):
        pipeline.make_ctr_dataset(path, "train", 8)
    assert located == [files[0]]  # only the file that differs is read record by record


_MIRRORED = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    from mm_ads.data import pipeline

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    path = sys.argv[1]
    with strategy.scope():
        try:
            pipeline.build_vector_join(path)
            raise SystemExit("no error inside strategy.scope()")
        except ValueError as e:
            assert "outside strategy.scope()" in str(e), e
    join = pipeline.build_vector_join(path)
    global_batch = 8

    def dataset_fn(ctx):
        return pipeline.make_ctr_dataset(path, "train", ctx.get_per_replica_batch_size(global_batch),
                                         vector_table=join, input_context=ctx)

    dist = strategy.distribute_datasets_from_function(dataset_fn)

    @tf.function
    def step(features, label):
        def replica(features, label):
            return tf.reduce_sum(features["hist_item_vector"]) * 0.0 + tf.cast(tf.size(label), tf.float32)
        return strategy.reduce("SUM", strategy.run(replica, args=(features, label)), axis=None)

    total = sum(float(step(f, y)) for f, y in dist)
    stats = join.stats()
    print("TOTAL", int(total), stats["lookups"])
""")


def test_mirrored_strategy_with_two_cpu_replicas(data, repo_root):
    """Logical CPU devices must be configured before TensorFlow initialises: run in a fresh process."""
    path, columns = data
    env = dict(os.environ, PYTHONPATH=repo_root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", _MIRRORED, path], check=False, capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("TOTAL"))
    total, lookups = map(int, line.split()[1:])
    assert total == N
    assert lookups == N + int((columns["hist_item_id"] != 0).sum())


def test_vector_table_paths_every_manifest_form():
    from types import SimpleNamespace

    def paths(entry):
        return pipeline.vector_table_paths(SimpleNamespace(extra={"vector_tables": entry}, data_dir="/d"))

    assert paths(["vectors/scl.parquet", "v/x.parquet"]) == {"scl": "/d/vectors/scl.parquet", "x": "/d/v/x.parquet"}
    assert paths({"a": "vectors/a.parquet"}) == {"a": "/d/vectors/a.parquet"}
    # the Taobao-MM reader describes its table
    assert paths({"scl": {"path": "vectors/scl.parquet", "dim": 128}}) == {"scl": "/d/vectors/scl.parquet"}
    assert paths(None) == {}
    with pytest.raises(ValueError, match=r"vector_tables'\]\['bad'\]"):
        paths({"bad": {"dim": 128}})
