r"""The encoder service: new-item events in → multimodal vectors in the index table within a second.

`python -m mm_ads.serving.index.encoder_service --flagfile=configs/serving/encoder_service.flags`

Follows an event stream (`mm_ads.serving.index.events`: a local `EventLog` or a Redis stream) from its checkpointed
offset, collects new-item events (`{"type": "item", "item_id", "title" | "image_png_b64", "ts"}`) into micro-
batches (at most `max_batch_size` events, waiting at most `max_wait_ms` after the first one), runs them through
the encoder SavedModel exported by the SCL code (`mm_ads.scl.export`: raw titles or encoded image bytes in,
unit vectors out) and writes the vectors to the index table under the encoder's version (the content hash that
`python -m mm_ads.encode` gives the batch vector tables of the same encoder, so a table can be bulk-loaded from
the catalogue first and then kept fresh here).

* **Offsets.** After each batch is in the table, the offset after its last event is written atomically to a
  JSON checkpoint (default `<table>.encoder_service.json` next to a SQLite table). A restart resumes there:
  nothing is skipped. A crash between the table write and the checkpoint re-encodes at most that one batch,
  which is idempotent: the same encoder gives the same item the same vector (only its timestamp moves).
* **Bad events** (no title / empty title for a text encoder, no or undecodable image for an image encoder, a
  missing or non-integer item id) are skipped, counted by reason and logged with the item id; they never stop
  the service. Events of other types (impressions) on a shared stream are ignored and counted.
* **Lag** = time the vector was committed − the event's `ts`; p50/p99/max over the last `lag_window` items in
  `stats()` and in a log line every `log_every_s`.

Library use (tools, tests, the demo embed it in a thread):

```python
service = EncoderService(EncoderServiceConfig(encoder="runs/scl/export", events="runs/online/items.log",
                                              index_table="runs/online/index.db"))
stop = threading.Event()
threading.Thread(target=service.run, args=(stop,)).start()
...
stop.set()
```
"""

import base64
import binascii
import collections
import dataclasses
import json
import os
import threading
import time

import numpy as np
from absl import logging

from mm_ads import options as options_lib
from mm_ads.serving.index.events import EventTail, open_stream
from mm_ads.serving.index.index_table import open_index_table
from mm_ads.serving.index.redis_local import redact_uri
from mm_ads.utils import io as io_utils

CHECKPOINT_SUFFIX = ".encoder_service.json"


@dataclasses.dataclass
class EncoderServiceConfig:
    """What the encoder service runs (flag names = field names; see `configs/serving/encoder_service.flags`).

    Args:
        encoder: an encoder SavedModel version dir (`<export>/<version>/`) or its base (the latest version).
            Several modalities: `image=DIR,text=DIR`, with `index_table` naming a table per modality
            (`ModalityEncoderServices`: every new item is encoded by every modality's encoder).
        events: the new-item event stream: a log file path or `redis://host:port/db?stream=NAME`.
        index_table: the index table URI (a path / `sqlite:///…` or `redis://host:port/db?prefix=NAME`); created
            with the encoder's dim and version when missing. Several modalities: `image=URI,text=URI`.
        checkpoint_path: the consumed-offset checkpoint (JSON); "" = `<table>.encoder_service.json` next to a
            SQLite table (required for a Redis table).
        dtype: storage dtype of a new table ("float32" or "int8").
        encoder_version: the version to write under when the SavedModel has no `encoder_info` signature
            (exports made before it existed); must match the model's own when it has one.
        start_at: where to start without a checkpoint: "beginning" or "end" of the stream.
        max_batch_size: events per encoder call at most.
        max_wait_ms: how long a micro-batch waits for more events after its first one.
        poll_timeout_ms: how long an idle poll blocks before `run` checks its stop event.
        log_every_s: seconds between stats log lines (0 = never).
        lag_window: how many recent items the lag percentiles cover.
        retry_s: pause before retrying a batch whose table write or read failed (`run` only).
    """

    encoder: str = ""
    events: str = ""
    index_table: str = ""
    checkpoint_path: str = ""
    dtype: str = "float32"
    encoder_version: str = ""
    start_at: str = "beginning"
    max_batch_size: int = 64
    max_wait_ms: int = 20
    poll_timeout_ms: int = 200
    log_every_s: float = 10.0
    lag_window: int = 10000
    retry_s: float = 1.0

    def validate(self):
        for name in ("encoder", "events", "index_table"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        if self.dtype not in ("float32", "int8"):
            raise ValueError(f"--dtype must be float32 or int8, got {self.dtype!r}")
        if self.start_at not in ("beginning", "end"):
            raise ValueError(f"--start_at must be 'beginning' or 'end', got {self.start_at!r}")
        for name in ("max_batch_size", "lag_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "poll_timeout_ms", "log_every_s", "retry_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        return self

    @classmethod
    def from_values(cls, values):
        """From `{field: value}` (flagfile strings or typed values); unknown names are an error."""
        return options_lib.options_from_values(cls, values, "encoder service")


def resolve_saved_model(path):
    """A SavedModel dir, or a TF-Serving base path → its largest complete integer version dir."""
    from mm_ads.export.saved_model import latest_version

    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    version = latest_version(path)
    if version and os.path.exists(os.path.join(path, str(version), "saved_model.pb")):
        return os.path.join(path, str(version))
    raise FileNotFoundError(f"{path} is neither an encoder SavedModel nor a base path with integer versions "
                            "(export one with python -m mm_ads.encode --export_base or mm_ads.train --task=scl)")


class ExportedEncoder:
    """The encoder SavedModel of `mm_ads.scl.export`: `encode(values)` → float32 `[N, D]`.

    Attributes: `path`, `modality` ("text" or "image"), `dim`, `encoder_version` (None when the model has no
    `encoder_info` signature and none was given).
    """

    def __init__(self, path, encoder_version=""):
        import tensorflow as tf

        from mm_ads.scl.export import read_encoder_info

        self.path = resolve_saved_model(path)
        self._tf = tf
        try:  # the MiniLM tower tokenizes with tensorflow-text ops, registered by this import
            import tensorflow_text  # noqa: F401
        except ImportError:
            pass
        self._loaded = tf.saved_model.load(self.path)
        if "serving_default" not in self._loaded.signatures:
            raise ValueError(f"{self.path}: the SavedModel has no serving_default signature")
        self._fn = self._loaded.signatures["serving_default"]
        inputs = list(self._fn.structured_input_signature[1])
        if len(inputs) != 1 or inputs[0] not in ("text", "image") or "vector" not in self._fn.structured_outputs:
            raise ValueError(f"{self.path}: not an mm_ads encoder (serving_default must take `text` or `image` and "
                             f"return `vector`; it takes {inputs} and returns {list(self._fn.structured_outputs)})")
        self.modality = inputs[0]
        info = read_encoder_info(self._loaded)
        dim = self._fn.structured_outputs["vector"].shape[-1]
        self.dim = int(dim if dim is not None else (info or {}).get("dim") or self.encode(["dim probe"]).shape[1])
        if info is not None and encoder_version and encoder_version != info["encoder_version"]:
            raise ValueError(f"{self.path}: --encoder_version={encoder_version!r} but the model is version "
                             f"{info['encoder_version']!r}")
        self.encoder_version = info["encoder_version"] if info is not None else (encoder_version or None)
        if not self.encoder_version:
            raise ValueError(f"{self.path}: the SavedModel has no encoder_info signature (exported by an older "
                             "mm_ads): pass --encoder_version (the encoder_version of its vector tables)")

    def encode(self, values):
        """Titles (str) or encoded image bytes → float32 `[N, D]`."""
        if not len(values):
            return np.zeros((0, self.dim), np.float32)
        x = self._tf.constant(list(values), self._tf.string)
        return self._fn(**{self.modality: x})["vector"].numpy()


class EncoderService:
    """Tails new-item events, encodes them in micro-batches, writes the index table, checkpoints its offset.

    Args:
        config: an `EncoderServiceConfig`.
        encoder / stream / index_table: already-open objects to use instead of the ones the config names
            (tests and tools that share them); the service closes only what it opened.
    """

    def __init__(self, config, encoder=None, stream=None, index_table=None):
        self.config = config.validate()
        self.encoder = encoder or ExportedEncoder(config.encoder, config.encoder_version)
        self._owned = []
        if index_table is None:
            index_table = open_index_table(config.index_table, dim=self.encoder.dim,
                                           encoder_version=self.encoder.encoder_version, dtype=config.dtype,
                                           create=True)
            self._owned.append(index_table)
        elif (index_table.dim, index_table.encoder_version) != (self.encoder.dim, self.encoder.encoder_version):
            raise ValueError(f"{index_table.uri} holds dim {index_table.dim} / encoder {index_table.encoder_version!r}"
                             f", the encoder gives dim {self.encoder.dim} / {self.encoder.encoder_version!r}")
        self.table = index_table
        if stream is None:
            stream = open_stream(config.events)
            self._owned.append(stream)
        self.stream = stream
        self.checkpoint_path = config.checkpoint_path or self._default_checkpoint_path()
        offset = self._load_checkpoint()
        if offset is None:
            offset = 0 if config.start_at == "beginning" else stream.end_offset()
        self.tail = EventTail(stream, offset)
        self._lags = collections.deque(maxlen=config.lag_window)
        self._counts = collections.Counter()
        self._skips = collections.Counter()
        self._lock = threading.RLock()  # stats() may run in another thread
        self._last_log = time.monotonic()

    # ---- checkpoint ------------------------------------------------------------------------------------

    def _default_checkpoint_path(self):
        uri = self.table.uri
        if "://" in uri:
            raise ValueError(f"--checkpoint_path is required with a non-file index table ({uri})")
        return uri + CHECKPOINT_SUFFIX

    def _load_checkpoint(self):
        if not os.path.exists(self.checkpoint_path):
            return None
        try:
            with open(self.checkpoint_path) as f:
                ckpt = json.load(f)
            offset = ckpt["offset"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.checkpoint_path}: not an encoder service checkpoint ({e})") from e
        events = redact_uri(self.config.events)  # what logs and the checkpoint show of the stream URI
        if ckpt.get("events") not in (None, events, self.config.events):
            raise ValueError(f"{self.checkpoint_path} holds the offset of stream {redact_uri(ckpt['events'])!r}, "
                             f"not {events!r}: use another --checkpoint_path")
        logging.info("Encoder service: resuming %s at offset %s (%s)", events, offset, self.checkpoint_path)
        return offset

    def _save_checkpoint(self, offset):
        io_utils.write_json(self.checkpoint_path, {
            "offset": offset, "events": redact_uri(self.config.events), "index_table": self.table.uri,
            "encoder_version": self.encoder.encoder_version, "updated": time.time()})

    @property
    def offset(self):
        """The offset of the next event to consume (checkpointed after each batch)."""
        return self.tail.offset

    # ---- one micro-batch -------------------------------------------------------------------------------

    def _skip(self, reason, item_id, detail=""):
        with self._lock:
            self._skips[reason] += 1
        logging.warning("Encoder service: skipped item %s (%s)%s", item_id, reason, f": {detail}" if detail else "")

    def _input_of(self, record):
        """The encoder input of a new-item event, or None after counting a skip."""
        item_id = record.get("item_id")
        if isinstance(item_id, bool) or not isinstance(item_id, int) or item_id == 0:
            self._skip("bad_item_id", repr(item_id), "item_id must be a non-zero integer")
            return None
        if self.encoder.modality == "text":
            title = record.get("title")
            if not isinstance(title, str) or not title.strip():
                self._skip("empty_title", item_id)
                return None
            return title.encode("utf-8")
        data = record.get("image_png_b64")
        if not isinstance(data, str) or not data:
            self._skip("no_image", item_id)
            return None
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            self._skip("bad_image", item_id, f"image_png_b64 is not base64: {e}")
            return None

    def _encode(self, ids, values):
        """→ (ids, vectors) of the items that encode; an undecodable image is found one by one and skipped."""
        import tensorflow as tf

        try:
            return ids, self.encoder.encode(values)
        except tf.errors.InvalidArgumentError:
            pass
        good_ids, good = [], []
        for item_id, value in zip(ids, values):
            try:
                good.append(self.encoder.encode([value])[0])
                good_ids.append(item_id)
            except tf.errors.InvalidArgumentError as e:
                self._skip("bad_image", item_id, str(e).splitlines()[0][:200])
        return good_ids, np.stack(good) if good else np.zeros((0, self.encoder.dim), np.float32)

    def _collect(self, first_timeout_s):
        """A micro-batch of (offset, next_offset, record) from the tail."""
        cfg = self.config
        records = self.tail.poll(cfg.max_batch_size, timeout_s=first_timeout_s)
        if not records:
            return records
        deadline = time.monotonic() + cfg.max_wait_ms / 1000.0
        while len(records) < cfg.max_batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            records += self.tail.poll(cfg.max_batch_size - len(records), timeout_s=left)
        return records

    def run_once(self, timeout_s=None):
        """Consumes one micro-batch (waiting up to `timeout_s`, default `poll_timeout_ms`, for its first event);
        returns the number of events consumed (0 when none came)."""
        timeout_s = self.config.poll_timeout_ms / 1000.0 if timeout_s is None else timeout_s
        start = self.tail.offset
        try:
            return self._process(self._collect(timeout_s))
        except BaseException:
            self.tail.offset = start  # not consumed: the next call (or a restart) reads these events again
            raise

    def _process(self, records):
        if not records:
            self._maybe_log()
            return 0
        latest = {}  # item id → (value, event ts); the last event of an item in the batch wins
        with self._lock:
            for _, _, record in records:
                if record.get("type") != "item":
                    self._counts["ignored"] += 1
                    continue
                value = self._input_of(record)
                if value is not None:
                    ts = record.get("ts")
                    latest[record["item_id"]] = (value, float(ts) if isinstance(ts, (int, float)) else None)
            self._counts["events"] += len(records)
        ids = list(latest)
        ids, vectors = self._encode(ids, [latest[i][0] for i in ids])
        if ids:
            self.table.put_many(np.asarray(ids, np.int64), vectors, self.encoder.encoder_version)
        written = time.time()
        self._save_checkpoint(records[-1][1])
        with self._lock:
            self._counts["written"] += len(ids)
            self._counts["batches"] += 1
            self._lags.extend(written - latest[i][1] for i in ids if latest[i][1] is not None)
        self._maybe_log()
        return len(records)

    def run(self, stop_event=None):
        """Runs micro-batches until `stop_event` is set (forever without one)."""
        stop_event = stop_event or threading.Event()
        logging.info("Encoder service: %s (%s, dim %d, %s) → %s from offset %s", self.encoder.path,
                     self.encoder.modality, self.encoder.dim, self.encoder.encoder_version, self.table.uri,
                     self.offset)
        while not stop_event.is_set():
            try:
                self.run_once()
            except Exception as e:  # a store or stream outage: retry the same events after a pause
                with self._lock:
                    self._counts["errors"] += 1
                logging.exception("Encoder service: batch at offset %s failed (%s); retrying in %.1f s",
                                  self.offset, e, self.config.retry_s)
                stop_event.wait(self.config.retry_s)
        logging.info("Encoder service stopped: %s", json.dumps(self.stats()))

    # ---- reporting -------------------------------------------------------------------------------------

    def stats(self):
        """Counters, the next offset, and lag percentiles (seconds) over the last `lag_window` items."""
        with self._lock:
            lags = np.asarray(self._lags, np.float64)
            out = {"events": self._counts["events"], "written": self._counts["written"],
                   "batches": self._counts["batches"], "ignored": self._counts["ignored"],
                   "errors": self._counts["errors"],
                   "skipped": sum(self._skips.values()), "skipped_by_reason": dict(self._skips),
                   "offset": self.offset}
        for name, q in (("lag_p50_s", 50), ("lag_p99_s", 99)):
            out[name] = float(np.percentile(lags, q)) if len(lags) else None
        out["lag_max_s"] = float(lags.max()) if len(lags) else None
        return out

    def _maybe_log(self):
        every = self.config.log_every_s
        if every and time.monotonic() - self._last_log >= every:
            self._last_log = time.monotonic()
            s = self.stats()
            fmt = lambda v: "n/a" if v is None else f"{v * 1000:.1f} ms"  # noqa: E731
            logging.info("Encoder service: %d events, %d vectors written, %d skipped, %d ignored; lag p50 %s "
                         "p99 %s; offset %s", s["events"], s["written"], s["skipped"], s["ignored"],
                         fmt(s["lag_p50_s"]), fmt(s["lag_p99_s"]), s["offset"])

    def close(self):
        for obj in self._owned:
            obj.close()
        self._owned = []


class ModalityEncoderServices:
    """The encoder service of several modalities: one `EncoderService` per modality (its encoder, its index table,
    its offset checkpoint), all following the same new-item stream, each in its own thread.

    `config.encoder` and `config.index_table` name one entry per modality, `image=PATH,text=PATH` and
    `image=URI,text=URI` (the same modality names; `config.checkpoint_path` and `config.encoder_version`, when set,
    too). Every new item is encoded by every modality's encoder; an item one encoder cannot read (no image yet) is
    that service's counted skip, and its other vectors are written all the same: readers see the missing modality
    as a miss of that modality's table (`mm_ads.serving.index.modalities`).
    """

    def __init__(self, config):
        from mm_ads.serving.index.modalities import parse_index_tables

        config.validate()
        fields = {}
        for name in ("encoder", "index_table", "checkpoint_path", "encoder_version"):
            value = getattr(config, name)
            fields[name] = dict(parse_index_tables(value, option=f"--{name}")) if value else {}
        modalities = list(fields["encoder"])
        if "" in fields["encoder"] or sorted(fields["index_table"]) != sorted(modalities):
            raise ValueError(f"--encoder={config.encoder!r} and --index_table={redact_uri(config.index_table)!r} must "
                             "name the same modalities (image=...,text=...)")
        for name in ("checkpoint_path", "encoder_version"):
            extra = sorted(set(fields[name]) - set(modalities))
            if extra:
                raise ValueError(f"--{name}: entries for {extra}, which --encoder does not name ({modalities})")
        self.services = {}
        try:
            for m in modalities:
                self.services[m] = EncoderService(dataclasses.replace(
                    config, encoder=fields["encoder"][m], index_table=fields["index_table"][m],
                    checkpoint_path=fields["checkpoint_path"].get(m, ""),
                    encoder_version=fields["encoder_version"].get(m, "")))
        except BaseException:
            self.close()
            raise

    def run(self, stop_event=None):
        """Runs every modality's service in its own thread until `stop_event` is set."""
        stop_event = stop_event or threading.Event()
        threads = [threading.Thread(target=svc.run, args=(stop_event,), name=f"encoder-{m}", daemon=True)
                   for m, svc in self.services.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def run_once(self, timeout_s=None):
        """One micro-batch of every modality's service; `{modality: events processed}`."""
        return {m: svc.run_once(timeout_s) for m, svc in self.services.items()}

    def stats(self):
        """`{modality: EncoderService.stats()}`."""
        return {m: svc.stats() for m, svc in self.services.items()}

    def close(self):
        for svc in self.services.values():
            svc.close()


def open_encoder_service(config):
    """The `EncoderService` of `config`, or a `ModalityEncoderServices` when `config.encoder` names several
    modalities (`image=PATH,text=PATH`)."""
    from mm_ads.serving.index.modalities import parse_index_tables

    if config.encoder and parse_index_tables(config.encoder, option="--encoder")[0][0]:
        return ModalityEncoderServices(config)
    return EncoderService(config)


def define_flags():
    """absl flags for every `EncoderServiceConfig` field (entry point only)."""
    options_lib.define_flags(EncoderServiceConfig, "Encoder service")


def main(argv):
    import signal

    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = options_lib.options_from_flags(EncoderServiceConfig)
    service = open_encoder_service(config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        service.run(stop)
    finally:
        service.close()
    print(json.dumps(service.stats()))


if __name__ == "__main__":
    import sys

    from absl import app

    define_flags()
    app.run(main, argv=sys.argv)
