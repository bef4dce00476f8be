"""Encoder service end to end on tiny untrained encoders exported by mm_ads.scl.export."""

import base64
import dataclasses
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from mm_ads.scl.encode import encode_values, encoder_version
from mm_ads.scl.export import export_encoder
from mm_ads.scl.image_tower import ImageTower
from mm_ads.scl.text_tower import TextTower, build_vocabulary
from mm_ads.serving.index.encoder_service import EncoderService, EncoderServiceConfig, ExportedEncoder
from mm_ads.serving.index.events import open_stream
from mm_ads.serving.index.index_table import open_index_table

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
TITLES = ["red striped pillow", "blue ceramic mug", "crimson cushion xl", "green wool scarf", "unseen words here"]


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
    vocab, _ = build_vocabulary(TITLES, 50)
    tower = TextTower(vocab, max_tokens=6, num_oov_buckets=4, width=8, num_layers=1, num_heads=2, output_dim=6,
                      projection_hidden=8, name="text")
    tower(tf.constant(TITLES[:1]))
    path = export_encoder(tower, str(tmp_path_factory.mktemp("text") / "export"), "text")
    return tower, path


@pytest.fixture(scope="module")
def image_encoder(tmp_path_factory):
    tower = ImageTower(widths=(4, 8), groups=2, output_dim=5, projection_hidden=0, name="image")
    tower(np.zeros((1, 16, 16, 3), np.float32))
    path = export_encoder(tower, str(tmp_path_factory.mktemp("image") / "export"), "image", image_size=16)
    return tower, path


@pytest.fixture(params=["file+sqlite", "redis+redis"])
def uris(request, tmp_path, unique_name):
    """(events URI, index table URI, checkpoint path) per backend pair."""
    if request.param == "file+sqlite":
        return str(tmp_path / "items.log"), str(tmp_path / "index.db"), ""
    url = request.getfixturevalue("redis_url")
    return f"{url}?stream={unique_name}", f"{url}?prefix={unique_name}", str(tmp_path / "ckpt.json")


def _config(encoder_path, uris, **kw):
    events, table, ckpt = uris
    return EncoderServiceConfig(encoder=encoder_path, events=events, index_table=table, checkpoint_path=ckpt,
                                max_wait_ms=0, poll_timeout_ms=0, log_every_s=0, **kw)


def _drain(service):
    while service.run_once(timeout_s=0):
        pass


def _items(ids, titles, ts=None):
    return [{"type": "item", "item_id": i, "title": t, "ts": ts or time.time()} for i, t in zip(ids, titles)]


def test_encoder_exports_carry_tf_serving_warm_up_requests_that_run(text_encoder, image_encoder):
    from tensorflow_serving.apis import prediction_log_pb2

    from mm_ads.export.warmup import WARMUP_ASSET

    for (_, path), modality, dim in ((text_encoder, "text", 6), (image_encoder, "image", 5)):
        loaded = tf.saved_model.load(path)
        records = [prediction_log_pb2.PredictionLog.FromString(r).predict_log.request
                   for r in tf.data.TFRecordDataset(os.path.join(path, WARMUP_ASSET)).as_numpy_iterator()]
        inputs = [{k: tf.make_ndarray(v) for k, v in r.inputs.items()} for r in records]
        assert [(r.model_spec.signature_name, {k: v.shape for k, v in x.items()}) for r, x in zip(records, inputs)] == \
            [("serving_default", {modality: (1,)}), ("serving_default", {modality: (200,)}), ("encoder_info", {})]
        assert inputs[0][modality][0]  # a title or an encoded image, not the empty input
        for r, x in zip(records[:2], inputs):
            vectors = loaded.signatures[r.model_spec.signature_name](**x)["vector"].numpy()
            assert vectors.shape == (len(x[modality]), dim)
            np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1, rtol=1e-5)
        assert loaded.signatures["encoder_info"]()["modality"].numpy().decode() == modality


def test_text_events_to_vectors_skips_and_restart(text_encoder, uris, caplog):
    tower, path = text_encoder
    version = encoder_version(tower, "scl-text")
    with open_stream(uris[0]) as stream:
        stream.append(_items([1, 2, 3], TITLES[:3], ts=time.time() - 0.5))
        stream.append([{"type": "item", "item_id": 4, "title": "   ", "ts": 1.0},  # empty title
                       {"type": "item", "item_id": 5, "ts": 1.0},                   # no title
                       {"type": "impression", "ts": 1.0, "label": 1},               # another consumer's
                       {"type": "item", "item_id": "x7", "title": "a", "ts": 1.0},  # bad id
                       *_items([6, 1], [TITLES[3], TITLES[4]])])                    # 1 again: last one wins
        service = EncoderService(_config(path, uris, max_batch_size=4))
        assert service.encoder.encoder_version == version and service.encoder.dim == 6
        with caplog.at_level(logging.WARNING):
            _drain(service)
        stats = service.stats()
        assert stats["events"] == 9 and stats["ignored"] == 1 and stats["batches"] == 3
        assert stats["skipped_by_reason"] == {"empty_title": 2, "bad_item_id": 1}
        assert "skipped item 4 (empty_title)" in caplog.text and "skipped item 5 (empty_title)" in caplog.text
        assert 0.4 < stats["lag_max_s"] < 60 and stats["lag_p50_s"] <= stats["lag_p99_s"] <= stats["lag_max_s"]
        assert stats["written"] == 5  # 1, 2, 3 then 6 and 1 again
        service.close()

        with open_index_table(uris[1], encoder_version=version) as table:
            vecs, found = table.get_many([1, 2, 3, 4, 5, 6])
            np.testing.assert_array_equal(found, [True, True, True, False, False, True])
            expected = tower(tf.constant([TITLES[4], TITLES[1], TITLES[2], TITLES[3]])).numpy()
            np.testing.assert_allclose(vecs[[0, 1, 2, 5]], expected, atol=1e-5)
            before = table.timestamps([2, 3])

        # restart: resumes at the checkpoint, so only the new events are read and encoded
        stream.append(_items([8], ["green wool scarf again"]))
        again = EncoderService(_config(path, uris))
        assert again.offset == stream.read(0, 100)[-2][1]
        _drain(again)
        assert again.stats()["events"] == 1 and again.stats()["written"] == 1
        again.close()
        with open_index_table(uris[1]) as table:
            np.testing.assert_array_equal(table.timestamps([2, 3]), before)  # not re-encoded
            vec, found = table.get_many([8])
            assert found[0]
            np.testing.assert_allclose(vec[0], tower(tf.constant(["green wool scarf again"])).numpy()[0], atol=1e-5)
        if not uris[2]:
            ckpt = json.load(open(uris[1] + ".encoder_service.json"))
            assert ckpt["offset"] == stream.end_offset() and ckpt["encoder_version"] == version


def test_the_checkpoint_and_logs_show_no_redis_password(text_encoder, tmp_path, caplog):
    _, path = text_encoder
    events = "redis://app:s3cret@10.0.0.5:6379/0?stream=items"  # named by the config; the events come from a file
    ckpt = tmp_path / "ckpt.json"
    config = _config(path, (events, str(tmp_path / "index.db"), str(ckpt)))
    with open_stream(str(tmp_path / "items.log")) as stream:
        stream.append(_items([1, 2], TITLES[:2]))
        service = EncoderService(config, stream=stream)
        _drain(service)
        service.close()
        written = ckpt.read_text()
        assert json.loads(written)["events"] == "redis://app:***@10.0.0.5:6379/0?stream=items"
        assert "s3cret" not in written
        with caplog.at_level(logging.INFO, logger="absl"):  # a restart matches the redacted checkpoint
            again = EncoderService(config, stream=stream)
        assert again.offset == stream.end_offset()
        again.close()
    assert "resuming redis://app:***@10.0.0.5:6379/0?stream=items" in caplog.text
    assert "s3cret" not in caplog.text


def _png(seed, size=(20, 24)):
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, size + (3,), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_image_events_and_corrupt_images(image_encoder, tmp_path, caplog):
    tower, path = image_encoder
    pngs = [_png(i) for i in range(3)]
    events = [{"type": "item", "item_id": 10 + i, "image_png_b64": base64.b64encode(p).decode(), "ts": time.time()}
              for i, p in enumerate(pngs)]
    events.insert(1, {"type": "item", "item_id": 20, "ts": 1.0, "title": "no image"})
    events.insert(2, {"type": "item", "item_id": 21, "ts": 1.0,
                      "image_png_b64": base64.b64encode(b"\x89PNG but not really").decode()})
    events.insert(3, {"type": "item", "item_id": 22, "ts": 1.0, "image_png_b64": "***not base64***"})
    uris = (str(tmp_path / "items.log"), str(tmp_path / "index.db"), "")
    with open_stream(uris[0]) as stream:
        stream.append(events)
    service = EncoderService(_config(path, uris, dtype="int8"))
    with caplog.at_level(logging.WARNING):
        _drain(service)
    assert service.stats()["skipped_by_reason"] == {"no_image": 1, "bad_image": 2}
    assert "skipped item 21 (bad_image)" in caplog.text and "skipped item 22 (bad_image)" in caplog.text
    vecs, found = service.table.get_many([10, 11, 12, 20, 21, 22])
    np.testing.assert_array_equal(found, [True] * 3 + [False] * 3)
    assert service.table.dtype == "int8" and service.table.encoder_version == encoder_version(tower, "scl-image")
    np.testing.assert_allclose(vecs[:3], encode_values(tower, pngs, "image", image_size=16), atol=0.5 / 127 + 1e-5)
    service.close()


def test_run_in_a_thread_until_stopped(text_encoder, tmp_path):
    _, path = text_encoder
    uris = (str(tmp_path / "items.log"), str(tmp_path / "index.db"), "")
    config = EncoderServiceConfig(encoder=path, events=uris[0], index_table=uris[1], max_wait_ms=5,
                                  poll_timeout_ms=20, log_every_s=0)
    service = EncoderService(config)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,))
    thread.start()
    try:
        with open_stream(uris[0]) as stream:
            for k in range(5):
                stream.append(_items([100 + k], [TITLES[k]]))
        deadline = time.monotonic() + 30
        while len(service.table) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive() and len(service.table) == 5
    assert service.stats()["lag_p99_s"] < 30
    service.close()


def test_encoder_version_and_config_checks(text_encoder, tmp_path):
    tower, path = text_encoder
    enc = ExportedEncoder(os.path.dirname(path))  # the base path: latest version
    assert enc.path == path and enc.modality == "text"
    np.testing.assert_allclose(enc.encode(TITLES[:2]), tower(tf.constant(TITLES[:2])).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="--encoder_version='other' but the model is version 'scl-text-"):
        ExportedEncoder(path, encoder_version="other")
    with pytest.raises(FileNotFoundError, match="neither an encoder SavedModel"):
        ExportedEncoder(str(tmp_path))
    with pytest.raises(ValueError, match="--max_batch_size must be >= 1"):
        EncoderServiceConfig(encoder=path, events="e", index_table="t", max_batch_size=0).validate()
    with pytest.raises(ValueError, match="--events is required"):
        EncoderServiceConfig(encoder=path, index_table="t").validate()
    with pytest.raises(ValueError, match="Unknown encoder service options"):
        EncoderServiceConfig.from_values({"encoder": path, "batchsize": "3"})
    table = str(tmp_path / "other.db")
    open_index_table(table, dim=6, encoder_version="scl-text-0000", create=True).close()
    from mm_ads.serving.index.index_table import IndexTableError
    with pytest.raises(IndexTableError, match="vectors of encoder 'scl-text-0000', expected 'scl-text-"):
        EncoderService(EncoderServiceConfig(encoder=path, events=str(tmp_path / "e.log"), index_table=table))


def _start_service(repo_root, path, log, table):
    return subprocess.Popen(
        [sys.executable, "-m", "mm_ads.serving.index.encoder_service",
         f"--flagfile={os.path.join(repo_root, 'configs', 'serving', 'encoder_service.flags')}",
         f"--encoder={path}", f"--events={log}", f"--index_table={table}", "--poll_timeout_ms=20"],
        cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": repo_root})


def _wait_for(predicate, proc, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None and not predicate():
        time.sleep(0.1)
    assert predicate(), "the service did not get there in time"


def _stop(proc, sig=signal.SIGTERM):
    try:
        proc.send_signal(sig)
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_entry_point_flagfile(text_encoder, tmp_path, repo_root):
    """`python -m mm_ads.serving.index.encoder_service --flagfile=configs/serving/encoder_service.flags` runs until
    SIGTERM, then prints its stats."""
    tower, path = text_encoder
    log, table = str(tmp_path / "items.log"), str(tmp_path / "index.db")
    with open_stream(log) as stream:
        stream.append(_items([1, 2], TITLES[:2]))
    proc = _start_service(repo_root, path, log, table)
    _wait_for(lambda: os.path.exists(table + ".encoder_service.json"), proc)
    out, err = _stop(proc)
    assert proc.returncode == 0, err[-2000:]
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["written"] == 2 and stats["skipped"] == 0
    with open_index_table(table) as t:
        np.testing.assert_allclose(t.get_many([1, 2])[0], tower(tf.constant(TITLES[:2])).numpy(), atol=1e-5)


@pytest.mark.large
def test_killed_service_resumes_from_its_checkpoint(text_encoder, tmp_path, repo_root):
    """kill -9, more events, restart: every event encoded, the restarted service reads only the new ones."""
    tower, path = text_encoder
    log, table = str(tmp_path / "items.log"), str(tmp_path / "index.db")
    ckpt = table + ".encoder_service.json"
    with open_stream(log) as stream:
        stream.append(_items([1, 2, 3], TITLES[:3]))
        proc = _start_service(repo_root, path, log, table)
        _wait_for(lambda: os.path.exists(ckpt) and json.load(open(ckpt))["offset"] == stream.end_offset(), proc)
        _stop(proc, signal.SIGKILL)
        assert proc.returncode == -signal.SIGKILL
        stream.append(_items([4, 5], TITLES[3:5]))
        proc = _start_service(repo_root, path, log, table)
        _wait_for(lambda: json.load(open(ckpt))["offset"] == stream.end_offset(), proc)
        out, err = _stop(proc)
    assert proc.returncode == 0, err[-2000:]
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["events"] == 2 and stats["written"] == 2
    with open_index_table(table) as t:
        vecs, found = t.get_many([1, 2, 3, 4, 5])
        assert found.all()
        np.testing.assert_allclose(vecs, tower(tf.constant(TITLES)).numpy(), atol=1e-5)


def test_two_modalities_encode_every_new_item_into_their_own_tables(text_encoder, image_encoder, tmp_path):
    """`--encoder=image=...,text=...`: one service per modality on the same stream; an item without an image is the
    image service's counted skip, and its text vector is written all the same."""
    from mm_ads.serving.index.encoder_service import ModalityEncoderServices, open_encoder_service
    from mm_ads.serving.index.modalities import open_index_tables

    (text_tower, text_path), (_, image_path) = text_encoder, image_encoder
    png = _png(1, size=(16, 16))
    events = [{"type": "item", "item_id": 1, "title": TITLES[0], "image_png_b64": base64.b64encode(png).decode(),
               "ts": time.time()},
              {"type": "item", "item_id": 2, "title": TITLES[1], "ts": time.time()}]  # no image yet
    log = str(tmp_path / "items.log")
    with open_stream(log) as stream:
        stream.append(events)
    tables = f"image={tmp_path / 'image.db'},text={tmp_path / 'text.db'}"
    config = EncoderServiceConfig(encoder=f"image={image_path},text={text_path}", events=log, index_table=tables,
                                  max_wait_ms=0, poll_timeout_ms=0, log_every_s=0)
    services = open_encoder_service(config)
    assert isinstance(services, ModalityEncoderServices) and list(services.services) == ["image", "text"]
    while any(services.run_once(timeout_s=0).values()):
        pass
    stats = services.stats()
    assert stats["text"]["written"] == 2 and stats["image"]["written"] == 1
    assert stats["image"]["skipped_by_reason"] == {"no_image": 1}
    services.close()
    with open_index_tables(tables) as opened:
        got = opened.get_many([1, 2])
        assert got["text"][1].tolist() == [True, True] and got["image"][1].tolist() == [True, False]
        np.testing.assert_allclose(got["text"][0][0], text_tower(tf.constant([TITLES[0]])).numpy()[0], atol=1e-5)
        assert opened.dims == {"image": 5, "text": 6}
    # a restart resumes each modality from its own checkpoint: nothing is encoded twice
    services = open_encoder_service(config)
    assert sum(services.run_once(timeout_s=0).values()) == 0
    services.close()
    bad = dataclasses.replace(config, index_table=f"image={tmp_path / 'image.db'}")
    with pytest.raises(ValueError, match="must name the same modalities"):
        open_encoder_service(bad)
