"""The near-line trainer: event schema, index-table join, the offline training step, exports, exactly-once."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from mm_ads.data.dataset import Manifest
from mm_ads.data.pipeline import VectorJoin, make_ctr_dataset
from mm_ads.data.spec import FeatureSpec
from mm_ads.data.vectors import VectorTable
from mm_ads.serving.index.events import EventLog, open_stream
from mm_ads.serving.nearline.impressions import EventError, ImpressionSchema, IndexTableJoin
from mm_ads.serving.nearline.replay import replay
from mm_ads.serving.nearline.trainer import (
    NearlineTrainer,
    configs_from_flagfile,
    decode_offset,
    fingerprint_of,
    read_checkpoint_state,
)
from tests.serving.nearline.nearline_world import DIM, attribute_vectors, make_index_table, make_world

SMOKE = "configs/ctr/smoke.flags"
DROPPED = tuple(range(1, 15))  # items without a vector in the index table


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(str(tmp_path_factory.mktemp("nearline") / "world"), drop_items=DROPPED)


@pytest.fixture(scope="module")
def index_uri(world, tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("index") / "index.db")
    make_index_table(world, uri).close()
    return uri


def _vector_spec(world):
    spec = Manifest.load(world).spec
    return FeatureSpec([f for f in spec if f.role != "vector"], spec.seq_len, 0).with_vectors(DIM)


def _event_log(path, world, limit):
    log = EventLog(path)
    replay(world, log, limit=limit)
    offsets = [o for o, _, _ in log.read(0, 10**6)]
    assert len(offsets) == limit
    return log, offsets


def _configs(world, model_dir, stream, index_uri, **overrides):
    values = dict(variant="simtier", data_dir=world, model_dir=model_dir, stream=stream, index_table=index_uri,
                  batch_size=32, checkpoint_every=1, export_every_events=10**6, export_every_s=0,
                  shuffle_buffer=0, deterministic=True, stop_at_end=True, stats_every_s=3600,
                  export_at_start=False)
    values.update(overrides)
    return configs_from_flagfile(SMOKE, **values)


def _model_variables(checkpoint):
    reader = tf.train.load_checkpoint(checkpoint)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.startswith("model/") and "OPTIMIZER_SLOT" not in k}


def _assert_same_weights(a, b, atol=1e-5):
    va, vb = _model_variables(a), _model_variables(b)
    assert sorted(va) == sorted(vb) and va
    for k in va:
        np.testing.assert_allclose(va[k], vb[k], atol=atol, err_msg=k)


# -- the schema --------------------------------------------------------------------------------------------------
def test_schema_round_trip_and_errors(world):
    spec = _vector_spec(world)
    schema = ImpressionSchema(spec)
    features, label = next(iter(make_ctr_dataset(world, "train", 64, spec=FeatureSpec(
        [f for f in spec if f.role != "vector"], spec.seq_len, 0))))
    rows = {k: v.numpy() for k, v in features.items()}
    rows["label"] = label.numpy()
    parsed = [schema.parse(schema.to_record({k: v[i] for k, v in rows.items()}, ts=123.5), offset=i)
              for i in range(64)]
    batch, labels = schema.batch(parsed)
    np.testing.assert_array_equal(labels, rows["label"])
    for name, values in batch.items():
        np.testing.assert_array_equal(values, rows[name], err_msg=name)
    assert any((rows["hist_item_id"] == 0).any(axis=1)), "the round trip must cover padded histories"

    s = spec.seq_len
    good = schema.to_record({k: v[0] for k, v in rows.items()}, ts=1.0)
    short = dict(good, hist_item_id=[5, 6], hist_category_id=[1, 2], hist_brand_id=[3, 4])
    got = schema.parse(short, 0)
    np.testing.assert_array_equal(got["hist_item_id"], [0] * (s - 2) + [5, 6])
    long = dict(good, hist_item_id=list(range(1, s + 3)), hist_category_id=[1] * (s + 2), hist_brand_id=[1] * (s + 2))
    np.testing.assert_array_equal(schema.parse(long, 0)["hist_item_id"], list(range(3, s + 3)))

    bad = {
        "item_id": dict(good, item_id=None),
        "user_id": dict(good, user_id=3.5),
        "label": dict(good, label=True),
        "ts": dict(good, ts=float("nan")),
        "hist_brand_id": dict(good, hist_brand_id=[1]),
        "hist_item_id[1]": dict(good, hist_item_id=[4, "x"] + [1] * (len(good["hist_item_id"]) - 2)),
        "type": dict(good, type="click"),
    }
    for field, record in bad.items():
        if field == "hist_item_id[1]" and len(good["hist_item_id"]) < 2:
            continue
        with pytest.raises(EventError, match=re.escape(f"offset 777: field {field!r}")) as e:
            schema.parse(record, 777)
        assert e.value.offset == 777 and e.value.field == field
    missing = dict(good)
    del missing["category_id"]
    with pytest.raises(EventError, match="'category_id': expected a 64-bit integer id, missing"):
        schema.parse(missing, 5)
    with pytest.raises(EventError, match="expected a JSON object"):
        schema.parse([1, 2], 9)


def test_index_table_join_equals_the_offline_vector_join(world, index_uri):
    """Same vectors, flags and counts as `VectorJoin` of the tf.data pipeline, on the same batch."""
    from mm_ads.serving.index.index_table import open_index_table

    spec = _vector_spec(world)
    offline = VectorJoin(VectorTable.load(os.path.join(world, "vectors", "attributes.parquet")), spec)
    base = FeatureSpec([f for f in spec if f.role != "vector"], spec.seq_len, 0)
    features, _ = next(iter(make_ctr_dataset(world, "train", 256, spec=base)))
    expected = offline(features)
    with open_index_table(index_uri) as table:
        join = IndexTableJoin(table, spec)
        got = join({k: v.numpy() for k, v in features.items()})
    for name in ("item_vector", "item_vector_missing", "hist_item_vector", "hist_item_vector_missing"):
        np.testing.assert_allclose(got[name], expected[name].numpy(), atol=1e-6, err_msg=name)
    stats, want = join.stats(), offline.stats(log=False)
    assert stats["features"] == want["features"] and stats["missing"] > 0
    dropped = np.isin(features["item_id"].numpy(), DROPPED)
    assert dropped.any()
    np.testing.assert_array_equal(got["item_vector_missing"], dropped.astype(np.float32))
    assert not got["item_vector"][dropped].any()
    padding = features["hist_item_id"].numpy() == 0
    assert padding.any() and not got["hist_item_vector_missing"][padding].any()


# -- training ----------------------------------------------------------------------------------------------------
def test_same_step_as_the_offline_trainer_and_init_from_its_model_dir(world, index_uri, tmp_path):
    """Events replayed in the dataset's order train the same weights as `python -m mm_ads.train` on it."""
    from mm_ads import train as train_lib
    from mm_ads.config import config_from_flagfile

    steps, batch = 6, 32
    offline_dir = str(tmp_path / "offline")
    offline = config_from_flagfile(SMOKE, variant="simtier", data_dir=world, model_dir=offline_dir,
                                   vector_table="attributes", batch_size=batch, max_steps=steps, shuffle_buffer=0,
                                   deterministic=True, export=False, checkpoint_every=100)
    train_lib.run(offline)
    log, _ = _event_log(str(tmp_path / "events.log"), world, steps * batch)
    config, nearline = _configs(world, str(tmp_path / "nearline"), log.path, index_uri, prefetch=False)
    with NearlineTrainer(config, nearline) as trainer:
        stats = trainer.run()
    assert stats["events"] == steps * batch and stats["step"] == steps
    _assert_same_weights(tf.train.latest_checkpoint(os.path.join(offline_dir, "ckpt")),
                         tf.train.latest_checkpoint(str(tmp_path / "nearline" / "ckpt")))

    # a new near-line model dir continues the offline checkpoint: same weights and step, then trains on
    empty = EventLog(str(tmp_path / "empty.log"))
    config, nearline = _configs(world, str(tmp_path / "continued"), empty.path, index_uri, init_model_dir=offline_dir)
    with NearlineTrainer(config, nearline) as trainer:
        assert "offline/ckpt/ckpt-6" in trainer.started_from
        stats = trainer.run()
    assert stats["events"] == 0 and stats["step"] == steps
    _assert_same_weights(tf.train.latest_checkpoint(os.path.join(offline_dir, "ckpt")),
                         tf.train.latest_checkpoint(str(tmp_path / "continued" / "ckpt")))

    config, nearline = _configs(world, str(tmp_path / "other"), empty.path, index_uri, init_model_dir=offline_dir,
                                embedding_dim=8)
    with pytest.raises(ValueError, match="trained another model config"):
        NearlineTrainer(config, nearline)


def test_skips_exports_stats_and_the_served_model(world, index_uri, tmp_path):
    log = EventLog(str(tmp_path / "events.log"))
    replay(world, log, limit=100)
    good = log.read(0, 1)[0][2]
    bad_offsets = log.append([dict(good, label=2), {"type": "item", "item_id": 5, "ts": 1.0},
                              dict(good, hist_brand_id=[1])])
    replay(world, log, limit=60)
    config, nearline = _configs(world, str(tmp_path / "model"), log.path, index_uri, export_every_events=80)
    with NearlineTrainer(config, nearline) as trainer:
        stats = trainer.run()
        model = trainer.trainer.model
    trained = [o for o, _, r in log.read(0, 1000) if o not in bad_offsets]
    assert (stats["events"], stats["skipped"], stats["ignored"]) == (160, 2, 1)
    assert stats["run"]["skipped_by_field"] == {"label": 1, "hist_brand_id": 1}
    assert stats["fingerprint"] == fingerprint_of(trained)
    assert stats["next_offset"] == str(log.end_offset()) and stats["backlog_bytes"] == 0
    assert stats["clicks"] == sum(r["label"] for o, _, r in log.read(0, 1000) if o in trained)
    assert stats["vector_join"]["missing"] > 0 and stats["lag_s"] >= 0
    # version 1 after 80 events (3 batches of 32: 96), then the rest at the end
    with open(tmp_path / "model" / "nearline_stats.json") as f:
        assert json.load(f)["events"] == 160
    exports = json.load(open(tmp_path / "model" / "exports.json"))
    assert [e["version"] for e in exports] == [1, 2] == stats["exported_versions"]
    assert [e["events"] for e in exports] == [96, 160]
    assert sorted(os.listdir(tmp_path / "model" / "export")) == ["1", "2"]

    loaded = tf.saved_model.load(exports[-1]["path"])
    fn = loaded.signatures["serving_default"]
    assert {"item_vector", "hist_item_vector", "item_vector_missing"} <= set(fn.structured_input_signature[1])
    spec = trainer.spec
    events = [trainer.schema.parse(r, o) for o, _, r in log.read(0, 16)]
    features, _ = trainer.schema.batch(events)
    from mm_ads.serving.index.index_table import open_index_table

    with open_index_table(index_uri) as table:
        features = IndexTableJoin(table, spec)(features)
    inputs = {k: tf.constant(features[k]) for k in trainer.task.input_names}
    np.testing.assert_allclose(fn(**inputs)["ctr"].numpy(), model(inputs, training=False)["ctr"].numpy(), atol=1e-6)

    # --on_bad_record=fail stops at the bad record, naming it; nothing after it is committed
    config, nearline = _configs(world, str(tmp_path / "strict"), log.path, index_uri, on_bad_record="fail")
    with NearlineTrainer(config, nearline) as trainer:
        with pytest.raises(EventError, match=f"offset {bad_offsets[0]}: field 'label'"):
            trainer.run()
        with pytest.raises(EventError, match=f"offset {bad_offsets[0]}: field 'label'"):
            trainer.step_once(timeout=60)  # again at the same record; the 100 good ones before are trained once
        assert trainer.state.events == 96 and len(trainer._pending) == 4


def test_follows_a_live_stream_in_a_thread(world, index_uri, tmp_path):
    """The library use of the online demo: the trainer follows a stream that a rate-limited replay is writing,
    trains partial batches after max_batch_delay_s, and stops on the event with everything exported."""
    import threading

    log = EventLog(str(tmp_path / "events.log"))
    config, nearline = _configs(world, str(tmp_path / "model"), log.path, index_uri, stop_at_end=False,
                                max_batch_delay_s=0.2, poll_interval_s=0.05, batch_size=64)
    trainer = NearlineTrainer(config, nearline)
    stop, result = threading.Event(), {}
    thread = threading.Thread(target=lambda: result.update(trainer.run(stop)))
    thread.start()
    try:
        replayed = replay(world, log, rate=400, limit=100, chunk=16)
        assert replayed["events"] == 100
        deadline = time.monotonic() + 120
        while trainer.state.events < 100 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=120)
        trainer.close()
    assert not thread.is_alive()
    offsets = [o for o, _, _ in log.read(0, 1000)]
    assert result["events"] == 100 and result["fingerprint"] == fingerprint_of(offsets)
    assert result["step"] >= 2  # 100 = 64 + 36 at least: the partial batch did not wait for more events
    assert result["exported_versions"] and result["latest_version"] == result["exported_versions"][-1]
    assert read_checkpoint_state(str(tmp_path / "model"))["events"] == 100

    # the replay's own checks: a bad rate is refused, a set stop event appends nothing
    stop_now = threading.Event()
    stop_now.set()
    with pytest.raises(ValueError, match="rate must be >= 0"):
        replay(world, log, rate=-1)
    assert replay(world, log, limit=50, stop_event=stop_now)["events"] == 0


def test_redis_stream(world, index_uri, tmp_path, redis_url, unique_name):
    uri = f"{redis_url}?stream={unique_name}"
    with open_stream(uri) as stream:
        replay(world, stream, limit=70)
        offsets = [o for o, _, _ in stream.read(0, 1000)]
    config, nearline = _configs(world, str(tmp_path / "model"), uri, index_uri)
    with NearlineTrainer(config, nearline) as trainer:
        stats = trainer.run()
    assert stats["events"] == 70 and stats["fingerprint"] == fingerprint_of(offsets)
    assert isinstance(decode_offset(stats["next_offset"]), str)
    state = read_checkpoint_state(str(tmp_path / "model"))
    assert state["events"] == 70 and state["next_offset"] == stats["next_offset"]


def test_config_errors(world, index_uri, tmp_path):
    with pytest.raises(ValueError, match="nearline.stream is required"):
        configs_from_flagfile(SMOKE, data_dir=world, model_dir=str(tmp_path))
    with pytest.raises(ValueError, match="--on_bad_record must be one of"):
        configs_from_flagfile(SMOKE, data_dir=world, model_dir=str(tmp_path), stream="x", on_bad_record="drop")
    config, nearline = _configs(world, str(tmp_path / "m"), str(tmp_path / "e.log"), "")
    with pytest.raises(ValueError, match="--index_table is required"):
        NearlineTrainer(config, nearline)
    config, nearline = _configs(world, str(tmp_path / "m"), str(tmp_path / "e.log"), index_uri,
                                expected_encoder_version="other")
    with pytest.raises(ValueError, match="expected 'other'"):
        NearlineTrainer(config, nearline)
    # the serving flagfile is the offline simtier model plus the near-line settings
    served = configs_from_flagfile("configs/serving/nearline.flags", data_dir=world, model_dir=str(tmp_path),
                                   stream="x")[0]
    offline = configs_from_flagfile("configs/ctr/simtier.flags", data_dir=world, model_dir=str(tmp_path),
                                    stream="x")[0]
    assert served.model == offline.model and served.data.batch_size == offline.data.batch_size


# -- kill -9 and restart -------------------------------------------------------------------------------------------
def _checkpoint_number(model_dir):
    try:
        with open(os.path.join(model_dir, "ckpt", "checkpoint")) as f:
            return int(re.search(r'model_checkpoint_path: "ckpt-(\d+)"', f.read()).group(1))
    except (FileNotFoundError, AttributeError):
        return -1


def test_resume_after_an_abandoned_run_equals_an_uninterrupted_one(world, index_uri, tmp_path):
    """In-process twin of the kill -9 test below (which is `large`): a trainer dropped after 5 steps with its
    last checkpoint at step 4; a new one on the same model dir retrains step 5's events once, from offset 128."""
    k = 200  # 6 full batches of 32 and one of 8
    log, offsets = _event_log(str(tmp_path / "events.log"), world, k)
    config, nearline = _configs(world, str(tmp_path / "resumed"), log.path, index_uri, checkpoint_every=2)
    crashed = NearlineTrainer(config, nearline)
    assert [crashed.step_once(timeout=60) for _ in range(5)] == [32] * 5
    crashed._stop_producer()  # dropped without finish(): the weights of step 5 are lost
    crashed.close()
    state = read_checkpoint_state(str(tmp_path / "resumed"))
    assert (state["step"], state["events"], int(state["next_offset"])) == (4, 128, offsets[128])
    assert state["fingerprint"] == fingerprint_of(offsets[:128])
    with NearlineTrainer(config, nearline) as resumed:
        stats = resumed.run()
    assert (stats["events"], stats["step"], stats["run"]["events"]) == (k, 7, k - 128)
    assert stats["fingerprint"] == fingerprint_of(offsets)
    config, nearline = _configs(world, str(tmp_path / "uninterrupted"), log.path, index_uri, checkpoint_every=2)
    with NearlineTrainer(config, nearline) as trainer:
        assert trainer.run()["fingerprint"] == stats["fingerprint"]
    _assert_same_weights(tf.train.latest_checkpoint(str(tmp_path / "resumed" / "ckpt")),
                         tf.train.latest_checkpoint(str(tmp_path / "uninterrupted" / "ckpt")))


@pytest.mark.large
def test_kill_9_and_restart_loses_and_double_counts_nothing(world, index_uri, tmp_path, repo_root):
    k, batch = 950, 32  # 29 full batches and a partial one
    log, offsets = _event_log(str(tmp_path / "events.log"), world, k)
    model_dir = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "mm_ads.serving.nearline", f"--flagfile={SMOKE}", "--variant=simtier",
           f"--data_dir={world}", f"--model_dir={model_dir}", f"--stream={log.path}", f"--index_table={index_uri}",
           f"--batch_size={batch}", "--checkpoint_every=1", "--export_every_events=100000", "--export_every_s=0",
           "--noexport_at_start", "--max_batch_delay_s=3600", "--deterministic"]
    env = dict(os.environ, PYTHONPATH=repo_root)
    proc = subprocess.Popen(cmd + ["--max_events_per_second=250"], cwd=repo_root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while _checkpoint_number(model_dir) < 8 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()

    # the checkpoint at the kill: full batches only (the last partial one waits for the end of the stream),
    # exactly the first `events` offsets, the next offset right after them
    state = read_checkpoint_state(model_dir)
    events = state["events"]
    assert 8 * batch <= events < k and events == state["step"] * batch
    assert state["fingerprint"] == fingerprint_of(offsets[:events])
    assert int(state["next_offset"]) == offsets[events]

    # what a kill during an export leaves behind: an unfinished version directory (never served), which the
    # restarted trainer removes
    stale = os.path.join(model_dir, "export", ".1.k9x2.tmp")
    os.makedirs(os.path.join(stale, "variables"))
    done = subprocess.run(cmd + ["--stop_at_end"], cwd=repo_root, env=env, capture_output=True, timeout=300)
    assert not os.path.exists(stale)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    state = read_checkpoint_state(model_dir)
    assert (state["events"], state["skipped"], state["step"]) == (k, 0, 30)
    assert state["fingerprint"] == fingerprint_of(offsets)
    assert int(state["next_offset"]) == log.end_offset()
    exports = json.load(open(os.path.join(model_dir, "exports.json")))
    assert [(e["version"], e["events"], e["step"]) for e in exports] == [(1, k, 30)]

    # the same events without the kill: the same weights
    config, nearline = _configs(world, str(tmp_path / "uninterrupted"), log.path, index_uri)
    with NearlineTrainer(config, nearline) as trainer:
        stats = trainer.run()
    assert stats["events"] == k and stats["fingerprint"] == state["fingerprint"]
    _assert_same_weights(tf.train.latest_checkpoint(os.path.join(model_dir, "ckpt")),
                         tf.train.latest_checkpoint(str(tmp_path / "uninterrupted" / "ckpt")))


def test_two_modalities_from_two_index_tables_train_like_the_offline_trainer(world, index_uri, tmp_path):
    """A model of two modalities (`--vector_table=attributes,text`) continues near-line from one index table per
    modality (`--index_table=attributes=URI,text=URI`) and trains the same weights as offline on the same events."""
    import shutil

    import pyarrow.parquet as pq

    from mm_ads import train as train_lib
    from mm_ads.config import config_from_flagfile
    from mm_ads.data.vectors import write_vector_table
    from mm_ads.serving.index.index_table import load_vector_table_into, open_index_table

    data = str(tmp_path / "world")
    shutil.copytree(world, data)
    items = pq.read_table(os.path.join(data, "items.parquet")).to_pydict()
    text = os.path.join(data, "vectors", "text.parquet")
    write_vector_table(text, np.asarray(items["item_id"]), attribute_vectors(items, dim=4, seed=5),
                       encoder_version="test-text")
    manifest = json.load(open(os.path.join(data, "manifest.json")))
    manifest["extra"]["vector_tables"]["text"] = "vectors/text.parquet"
    json.dump(manifest, open(os.path.join(data, "manifest.json"), "w"))
    text_uri = str(tmp_path / "text.db")
    with open_index_table(text_uri, dim=4, encoder_version="test-text", create=True) as table:
        load_vector_table_into(table, text)
    steps, batch = 4, 32
    offline_dir = str(tmp_path / "offline")
    train_lib.run(config_from_flagfile(SMOKE, variant="simtier", data_dir=data, model_dir=offline_dir,
                                       vector_table="attributes,text", batch_size=batch, max_steps=steps,
                                       shuffle_buffer=0, deterministic=True, export=False, checkpoint_every=100))
    log, _ = _event_log(str(tmp_path / "events.log"), data, steps * batch)
    tables = f"attributes={index_uri},text={text_uri}"
    config, nearline = _configs(data, str(tmp_path / "nearline"), log.path, tables, prefetch=False)
    with NearlineTrainer(config, nearline) as trainer:
        assert [m.name for m in trainer.spec.modalities()] == ["attributes", "text"]
        stats = trainer.run()
    assert stats["step"] == steps
    assert stats["vector_join"]["features"]["item_vector_text"]["missing"] == 0
    joined = stats["vector_join"]["features"]
    assert joined["item_vector_attributes"]["missing"] + joined["hist_item_vector_attributes"]["missing"] > 0
    assert joined["hist_item_vector_text"]["missing"] == 0  # the attributes table lacks items the text one has
    _assert_same_weights(tf.train.latest_checkpoint(os.path.join(offline_dir, "ckpt")),
                         tf.train.latest_checkpoint(str(tmp_path / "nearline" / "ckpt")))
    # index tables named after other modalities than the offline model's: refused, naming both
    config, nearline = _configs(data, str(tmp_path / "other"), log.path, f"image={index_uri},text={text_uri}",
                                init_model_dir=offline_dir)
    with pytest.raises(ValueError, match=r"offline \{'attributes': 8, 'text': 4\}, index tables \{'image': 8, "
                                         r"'text': 4\}"):
        NearlineTrainer(config, nearline)
