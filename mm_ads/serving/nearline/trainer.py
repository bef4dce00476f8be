r"""The near-line trainer: continues training the CTR model on a stream of impression events.

`python -m mm_ads.serving.nearline --flagfile=configs/serving/nearline.flags --data_dir=DIR --model_dir=DIR \
    --stream=EVENT_LOG --index_table=URI [--init_model_dir=OFFLINE_MODEL_DIR]`

The model, optimizers and training step are the offline trainer's: the flagfile includes a
`configs/ctr/<variant>.flags` file, `CTRTask` builds the model from the dataset's FeatureSpec (`--data_dir`: the
world the events come from), and every batch goes through `Trainer.train_batch`, the same replica step as
`python -m mm_ads.train`, fed from numpy instead of a `tf.data` file pipeline. What differs is the input:

```
stream (EventLog file | redis://...?stream=) ─► read from the committed offset ─► ImpressionSchema.parse
    (bad record: counted skip naming offset and field, or --on_bad_record=fail) ─► batch of --batch_size
    events (a partial batch after --max_batch_delay_s, or at the end with --stop_at_end)
    ─► IndexTableJoin (target + history vectors, one get_many per batch; missing → zero vector, flag 1)
    ─► Trainer.train_batch ─► commit the batch's offsets ─► checkpoint every --checkpoint_every steps
    ─► export every --export_every_events events or --export_every_s seconds
```

The event schema is documented in `mm_ads.serving.nearline.impressions`.

**Exactly once.** The stream position lives in the model's checkpoint: `StreamState` (next offset to read,
events trained, events skipped, clicks, the offset of the last trained event and an order-sensitive
fingerprint of every trained event's offset) is saved by the same `tf.train.Checkpoint` as the model and both
optimizers (`Trainer(extra_checkpoint=...)`), and a checkpoint becomes current in one atomic rename of its
state file. The offsets of a batch are committed only after its step, and only a prefix of the stream that is
fully handled (trained or skipped) is ever committed. A restart (after `kill -9` at any instruction) restores
the last checkpoint and reads the stream from its offset: the events trained after it were lost together with
the weights they changed, so they are trained again once and nothing is counted twice. Exports are taken
right after a checkpoint, so every exported version is a checkpointed state (`exports.json` maps versions to
their step, event count and offset). Batches are `batch_size` consecutive events from the committed offset,
so with `--deterministic` and a stream written before the run, a killed-and-resumed run trains exactly the
batches of an uninterrupted one (the test compares the weights).

Reports: a log line every `--stats_every_s` and the JSON file `<model_dir>/nearline_stats.json`:
events/s over the period, the stream lag (`lag_s`: training time − `ts` of the newest event of the last
batch; `lag_max_s`: the largest over the period, oldest event of a batch), exported versions, skips by
field, ignored records, vector misses, the committed offset and the backlog (bytes of an event log).

Library use (e.g. from a thread of the online demo):

```python
config, nearline = configs_from_flagfile("configs/serving/nearline.flags", data_dir=..., model_dir=...,
                                         stream=..., index_table=...)
trainer = NearlineTrainer(config, nearline)
stop = threading.Event()
threading.Thread(target=trainer.run, args=(stop,)).start()   # ... stop.set() to checkpoint, export and return
```
"""

import dataclasses
import hashlib
import json
import math
import os
import queue
import signal
import threading
import time

from absl import app, logging

from mm_ads import config as config_lib
from mm_ads import options as options_lib
from mm_ads.serving.index.modalities import tables_by_modality
from mm_ads.serving.index.redis_local import redact_uri
from mm_ads.training import model_dir as run_dir
from mm_ads.utils import io as io_utils

NEARLINE_FILE = "nearline.json"
STATS_FILE = "nearline_stats.json"
EXPORTS_FILE = "exports.json"
BAD_RECORD_POLICIES = ("skip", "fail")
_LOGGED_SKIPS = 20  # the first skips are logged one by one, then every 1000th


@dataclasses.dataclass
class NearlineConfig:
    """The near-line trainer's own settings (the model, optimizer and batch come from the CTR flagfile).

    Args:
        stream: the impression stream: an event-log path or `redis://host:port/db?stream=NAME`.
        index_table: the item → vector index table (a path, `sqlite:///path` or `redis://...`); required by the
            multimodal variants. A model of several modalities reads one table per modality:
            `image=URI,text=URI` (`mm_ads.serving.index.modalities`; the names of its FeatureSpec's modalities).
        init_model_dir: a model dir of `python -m mm_ads.train` (same model config and FeatureSpec) whose latest
            checkpoint (weights, optimizer state, step) the trainer starts from when its own `model_dir` has no
            checkpoint yet; "" = a freshly initialised model.
        start_offset: where a trainer without a checkpoint starts reading: "beginning", "end" (only new
            events) or an offset of the stream.
        export_base: TF-Serving base path of the exported versions ("" = `<model_dir>/export`).
        export_at_start: export the starting model when `export_base` has no version yet (the server has a
            model to load from the start).
        export_every_events: export after this many trained events since the last export.
        export_every_s: export when this much time passed since the last export and something was
            trained since (0 = only by events).
        max_batch_delay_s: a partial batch is trained once its first event waited this long.
        poll_interval_s: longest wait for new events before checking timers and the stop event.
        max_events_per_second: cap on the training rate (0 = none), to leave CPU to a co-located server.
        prefetch: read, validate and join the next batch in a background thread while the current one trains
            (the batches and their order are the same; batches prepared but not trained are never committed).
        on_bad_record: "skip" (count it and log offset + field) or "fail" (raise; the offset is not committed).
        stop_at_end: train the stream to its current end (including the last partial batch), then checkpoint,
            export and exit (replays, backfills, tests); off = follow the stream until stopped.
        stats_every_s: period of the log line and of `<model_dir>/nearline_stats.json`.
        expected_encoder_version: refuse an index table whose vectors come from another encoder ("" = any); with
            several modalities `<modality>=<version>,...`.
    """

    stream: str = ""
    index_table: str = ""
    init_model_dir: str = ""
    start_offset: str = "beginning"
    export_base: str = ""
    export_at_start: bool = True
    export_every_events: int = 20_000
    export_every_s: float = 30.0
    max_batch_delay_s: float = 2.0
    poll_interval_s: float = 0.1
    max_events_per_second: float = 0.0
    prefetch: bool = True
    on_bad_record: str = "skip"
    stop_at_end: bool = False
    stats_every_s: float = 10.0
    expected_encoder_version: str = ""

    def validate(self):
        if not self.stream:
            raise ValueError("nearline.stream is required (--stream=EVENT_LOG or redis://...?stream=NAME)")
        if self.export_every_events < 1:
            raise ValueError(f"--export_every_events must be >= 1, got {self.export_every_events}")
        for name in ("export_every_s", "max_batch_delay_s", "max_events_per_second"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("poll_interval_s", "stats_every_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.on_bad_record not in BAD_RECORD_POLICIES:
            raise ValueError(f"--on_bad_record must be one of {BAD_RECORD_POLICIES}, got {self.on_bad_record!r}")
        if not self.start_offset:
            raise ValueError("--start_offset must be 'beginning', 'end' or an offset")
        return self

    @classmethod
    def from_values(cls, values):
        """From `{field: value}` (flagfile strings or typed values); unknown names are an error."""
        return options_lib.options_from_values(cls, values, "near-line")


_FIELDS = {f.name: f for f in dataclasses.fields(NearlineConfig)}
_clash = set(_FIELDS) & ({f.name for _, kind in config_lib.SECTION_KINDS for f in dataclasses.fields(kind)}
                         | {"task", "model_dir"})
assert not _clash, f"near-line flags clash with the experiment flags: {_clash}"


def configs_from_values(values):
    """`{flag name: value}` (flagfile strings or typed values) → `(ExperimentConfig, NearlineConfig)`, validated."""
    values = dict(values)
    mine = {name: values.pop(name) for name in list(values) if name in _FIELDS}
    return config_lib.config_from_values(values), NearlineConfig.from_values(mine)


def configs_from_flagfile(path, **overrides):
    """`configs_from_values(read_flagfile(path) | overrides)`: the library twin of the command line."""
    return configs_from_values({**config_lib.read_flagfile(path), **overrides})


def decode_offset(text):
    """A stored offset (text) → the stream's offset: int for an event log, the string id for Redis."""
    text = str(text)
    return int(text) if text.lstrip("-").isdigit() else text


def fingerprint(previous, offset):
    """Chains one offset into an order-sensitive 64-bit fingerprint (signed int, as the checkpoint stores it).

    `fingerprint(... fingerprint(fingerprint(0, o1), o2) ..., oK)` identifies the exact sequence of offsets a
    model was trained on: a lost, repeated or reordered event changes it.
    """
    digest = hashlib.blake2b(int(previous).to_bytes(8, "little", signed=True) + str(offset).encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def fingerprint_of(offsets):
    """`fingerprint` chained over a sequence of offsets, from 0."""
    value = 0
    for offset in offsets:
        value = fingerprint(value, offset)
    return value


class StreamState:
    """The stream accounting checkpointed with the model (see the module docstring).

    Plain Python values while training; `to_variables` copies them into the checkpointed variables right
    before a save, `from_variables` after a restore.
    """

    _INTS = ("events", "skipped", "ignored", "clicks", "fingerprint")
    _STRINGS = ("next_offset", "last_offset")

    def __init__(self):
        import tensorflow as tf

        self.events = self.skipped = self.ignored = self.clicks = self.fingerprint = 0
        self.next_offset, self.last_offset = "0", ""
        self.last_ts = 0.0
        with tf.device("/cpu:0"):
            self._vars = {name: tf.Variable(0, dtype=tf.int64, trainable=False, name=name) for name in self._INTS}
            self._vars.update({name: tf.Variable("", dtype=tf.string, trainable=False, name=name)
                               for name in self._STRINGS})
            self._vars["last_ts"] = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="last_ts")
        self.checkpoint = tf.train.Checkpoint(**self._vars)

    def to_variables(self):
        for name, var in self._vars.items():
            var.assign(getattr(self, name))

    def from_variables(self):
        for name in self._INTS:
            setattr(self, name, int(self._vars[name].numpy()))
        for name in self._STRINGS:
            setattr(self, name, self._vars[name].numpy().decode())
        self.last_ts = float(self._vars["last_ts"].numpy())

    def to_json(self):
        return {"events": self.events, "skipped": self.skipped, "ignored": self.ignored, "clicks": self.clicks,
                "next_offset": self.next_offset, "last_offset": self.last_offset, "fingerprint": self.fingerprint,
                "last_ts": self.last_ts}


def read_checkpoint_state(model_dir, checkpoint=None):
    """The `StreamState` values saved in a near-line model dir's latest (or the given) checkpoint, as a dict."""
    import tensorflow as tf

    path = checkpoint or run_dir.require_checkpoint(model_dir)
    reader = tf.train.load_checkpoint(path)
    out = {}
    for name in StreamState._INTS + StreamState._STRINGS + ("last_ts",):
        value = reader.get_tensor(f"stream/{name}/.ATTRIBUTES/VARIABLE_VALUE")
        out[name] = value.decode() if isinstance(value, bytes) else value.item()
    out["step"] = int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))
    return out


_CAUGHT_UP = object()  # the stream is drained (stop_at_end)


@dataclasses.dataclass
class _Batch:
    """Records read from the stream, ready to train: `pending` = every (offset, next offset, parsed event or
    None) in stream order, `events` = the parsed ones, `inputs` / `labels` = their model inputs (None if none)."""

    pending: list
    events: list
    skipped: int
    ignored: int
    inputs: dict
    labels: object


def _field_root(field):
    return field.split("[", 1)[0]


def _encoder_versions(table):
    """The encoder version of the index table ("" without one); several modalities' tables: `m=version,...`."""
    tables = tables_by_modality(table)
    if list(tables) == [""]:
        return tables[""].encoder_version
    return ",".join(f"{m}={t.encoder_version}" for m, t in tables.items())


def _check_encoder_versions(table, expected):
    """`--expected_encoder_version`: one version (one index table), or `<modality>=<version>,...` for the tables of
    several modalities (each named modality checked); "" checks nothing."""
    from mm_ads.serving.index.modalities import parse_index_tables

    if not expected:
        return
    tables = tables_by_modality(table)
    wanted = dict(parse_index_tables(expected, option="--expected_encoder_version"))
    if list(tables) != [""] and "" in wanted:
        raise ValueError(f"--expected_encoder_version={expected!r}: the index tables hold the modalities "
                         f"{sorted(tables)}: give <modality>=<version> entries")
    for modality, version in wanted.items():
        if modality not in tables:
            raise ValueError(f"--expected_encoder_version: no index table for the modality {modality!r} (have "
                             f"{sorted(tables)})")
        got = tables[modality].encoder_version
        if got != version:
            raise ValueError(f"Index table {tables[modality]!r} holds vectors of encoder {got!r}, expected "
                             f"{version!r} (--expected_encoder_version)")


class NearlineTrainer:
    """Continues training a CTR model on an impression stream (see the module docstring).

    Args:
        config: a validated `ExperimentConfig` (task ctr, the default strategy).
        nearline: a validated `NearlineConfig`.
        stream: an open stream (`mm_ads.serving.index.events` contract); default `open_stream(nearline.stream)`.
        index_table: an open `IndexTable`; default `open_index_table(nearline.index_table)` (multimodal variants).

    `step_once()` trains at most one batch; `run(stop_event)` loops until the event is set (or, with
    `stop_at_end`, the stream is drained), then checkpoints, exports what is not exported yet and returns the
    stats. `close()` closes what the trainer opened.
    """

    def __init__(self, config, nearline, stream=None, index_table=None):
        self._owned = []
        try:
            self._init(config, nearline, stream, index_table)
        except BaseException:
            self.close()  # what it opened: a refused start leaves no open table or stream behind
            raise

    def _init(self, config, nearline, stream, index_table):
        from mm_ads.ctr.task import CTRTask
        from mm_ads.serving.index import events
        from mm_ads.serving.nearline.impressions import ImpressionSchema, IndexTableJoin
        from mm_ads.training import trainer as trainer_lib

        self.config, self.nearline = config, nearline.validate()
        if config.task != "ctr":
            raise ValueError(f"The near-line trainer trains CTR models, got --task={config.task}")
        if config.train.strategy != "default":
            raise ValueError(f"The near-line trainer feeds one replica: --strategy=default, got "
                             f"{config.train.strategy}")
        if config.model.pretrains_make and not nearline.init_model_dir:
            raise ValueError(f"Variant {config.model.variant!r} pre-trains MAKE offline (--make_epochs="
                             f"{config.model.make_epochs}): start from its model dir with --init_model_dir")
        self.model_dir = config.model_dir
        os.makedirs(self.model_dir, exist_ok=True)
        run_dir.check_resume(self.model_dir, config)
        if config.train.deterministic:
            trainer_lib.set_global_determinism(config.train.seed)
        self.stream = stream if stream is not None else self._own(events.open_stream(nearline.stream))
        self.table = None
        if config.model.uses_vectors:
            if index_table is None:
                if not nearline.index_table:
                    raise ValueError(f"Variant {config.model.variant!r} reads multimodal vectors: --index_table is "
                                     "required")
                from mm_ads.serving.index.modalities import open_index_tables

                index_table = self._own(open_index_tables(nearline.index_table))
            self.table = index_table
            _check_encoder_versions(self.table, nearline.expected_encoder_version)
        dims = {m: int(t.dim) for m, t in tables_by_modality(self.table).items()}
        self.task = CTRTask(config, vector_dims=dims or None)
        self.spec = self.task.spec
        self.schema = ImpressionSchema(self.spec)
        self.join = IndexTableJoin(self.table, self.spec) if self.table is not None else None
        self.state = StreamState()
        self.trainer = trainer_lib.Trainer(self.task, config.train, config.data.batch_size, self.model_dir,
                                           extra_checkpoint={"stream": self.state.checkpoint})
        self.batch_size = self.trainer.global_batch
        self.export_base = nearline.export_base or run_dir.path(self.model_dir, run_dir.EXPORT)
        from mm_ads.export.saved_model import remove_stale_temporaries

        stale = remove_stale_temporaries(self.export_base)  # this trainer is the base's one writer
        if stale:
            logging.info("Removed %d unfinished export(s) of an earlier run from %s: %s", len(stale),
                         self.export_base, stale)
        self._check_encoder_version()
        io_utils.write_json(run_dir.path(self.model_dir, run_dir.CONFIG), config.to_json())
        io_utils.write_json(run_dir.path(self.model_dir, run_dir.SPEC), self.spec.to_json())
        self.started_from = self._restore()
        self._read_offset = decode_offset(self.state.next_offset)
        self._pending, self._pending_since = [], None
        self._pending_valid = self._pending_skipped = self._pending_ignored = 0
        self._caught_up = False
        self._producer = self._queue = self._producer_stop = None
        self._saved_step = self.trainer.manager.latest_checkpoint and int(self.trainer.step.numpy())
        self.exports = self._load_exports()
        exported = self.exports[-1]["events"] if self.exports else 0
        self._unexported = self.state.events - exported
        self._last_export = time.monotonic()
        self._run_start = self._window_start = self._last_report = time.monotonic()
        self._run_events = self._window_events = 0
        self._window_loss, self._window_steps = 0.0, 0
        self._lag = self._lag_max = None
        self._skipped_by_field = {}
        self._exported_this_run = []
        self._next_allowed = time.monotonic()
        logging.info("Near-line trainer: %s from %s, stream %s at offset %s (%d events trained so far), batch %d",
                     config.model.variant, self.started_from, self.stream, self.state.next_offset, self.state.events,
                     self.batch_size)

    def _own(self, resource):
        self._owned.append(resource)
        return resource

    # -- start ----------------------------------------------------------------------------------
    def _check_encoder_version(self):
        path = os.path.join(self.model_dir, NEARLINE_FILE)
        version = _encoder_versions(self.table)
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f).get("encoder_version", "")
            if old != version:
                raise ValueError(f"{path}: this model was trained on vectors of encoder {old!r}, the index table "
                                 f"holds encoder {version!r}: use a new --model_dir")
        settings = dataclasses.asdict(self.nearline)
        settings.update({k: redact_uri(settings[k]) for k in ("stream", "index_table") if settings.get(k)})
        io_utils.write_json(path, {"encoder_version": version, "nearline": settings})

    def _restore(self):

        from mm_ads.training.checkpoint import training_checkpoint

        latest = self.trainer.manager.latest_checkpoint
        if latest:
            self.trainer.checkpoint.restore(latest).assert_existing_objects_matched()
            self.state.from_variables()
            return latest
        init = self.nearline.init_model_dir
        if init:
            self._check_init_model_dir(init)
            ckpt = run_dir.require_checkpoint(init, f"--init_model_dir={init}")
            t = self.trainer
            offline = training_checkpoint(t.model, t.sparse_opt, t.dense_opt, t.step)
            offline.restore(ckpt).expect_partial().assert_existing_objects_matched()
            started = ckpt
        else:
            started = "a new model"
        start = self.nearline.start_offset
        if start == "beginning":
            offset = 0
        elif start == "end":
            offset = self.stream.end_offset()
        else:
            offset = decode_offset(start)
        self.state.next_offset = str(offset)
        return started

    def _check_init_model_dir(self, init):
        old, spec = run_dir.load_ctr_run(init, f"--init_model_dir={init}")
        if old.model != self.config.model:
            raise ValueError(f"--init_model_dir={init} trained another model config ({old.model}) than this flagfile "
                             f"({self.config.model})")
        if spec != self.spec:
            def vectors(s):
                return {m.name or "(unnamed)": m.dim for m in s.modalities()}

            raise ValueError(f"{run_dir.path(init, run_dir.SPEC)}: the offline model's FeatureSpec differs from the "
                             f"one of --data_dir with the index tables' modalities and dims (vectors: offline "
                             f"{vectors(spec)}, index tables {vectors(self.spec)}; {spec} vs {self.spec})")

    def _load_exports(self):
        path = os.path.join(self.model_dir, EXPORTS_FILE)
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return json.load(f)

    # -- the loop -------------------------------------------------------------------------------
    def step_once(self, timeout=0.0):
        """Trains at most one batch; returns the number of events trained (0: no batch ready yet).

        Waits up to `timeout` seconds for a batch to fill. A partial batch is trained when its first event has
        waited `max_batch_delay_s`, or when the stream is drained with `stop_at_end`. With `prefetch`,
        the batches are read, validated and joined one ahead in a background thread.
        """
        prepared = self._prefetched(timeout) if self.nearline.prefetch else self._prepare(timeout)
        if prepared is _CAUGHT_UP:
            self._caught_up = True
            return 0
        if prepared is None:
            return 0
        self._caught_up = False
        return self._train(prepared)

    def _prepare(self, timeout):
        """Reads and validates events until a batch is ready; returns it with its vectors joined, `None` when
        none is ready within `timeout`, or `_CAUGHT_UP` when `stop_at_end` and the stream is drained."""
        deadline = time.monotonic() + timeout
        while True:
            need = self.batch_size - self._pending_valid
            records = self.stream.read(self._read_offset, need)
            if records:
                self._consume(records)
                if self._pending_valid >= self.batch_size:
                    return self._take_pending()
                continue
            now = time.monotonic()
            if self._pending and (self.nearline.stop_at_end
                                  or now - self._pending_since >= self.nearline.max_batch_delay_s):
                return self._take_pending()
            if not self._pending and self.nearline.stop_at_end:
                return _CAUGHT_UP
            left = deadline - now
            if left <= 0:
                return None
            wait = min(left, self.nearline.poll_interval_s)
            if self._pending:
                wait = min(wait, max(0.0, self._pending_since + self.nearline.max_batch_delay_s - now))
            self._wait(wait)

    def _take_pending(self):
        """The pending records as a batch ready to train (features joined); the pending list starts anew."""
        pending = self._pending
        events = [p for _, _, p in pending if p is not None]
        inputs = labels = None
        if events:
            features, labels = self.schema.batch(events)
            if self.join is not None:
                features = self.join(features)
            inputs = {name: features[name] for name in self.task.input_names}
        batch = _Batch(pending, events, self._pending_skipped, self._pending_ignored, inputs, labels)
        self._pending, self._pending_since = [], None
        self._pending_valid = self._pending_skipped = self._pending_ignored = 0
        return batch

    # one batch ahead in a background thread: reading, validation and the join overlap the train step
    def _prefetched(self, timeout):
        if self._producer is None or not self._producer.is_alive():
            if self._queue is None or self._queue.empty():
                self._start_producer()
        try:
            item = self._queue.get(timeout=max(timeout, 0.0)) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def _reset_to_committed(self):
        """Reads again from the committed offset (no producer runs): drops what was read but not trained."""
        self._read_offset = decode_offset(self.state.next_offset)
        self._pending, self._pending_since = [], None
        self._pending_valid = self._pending_skipped = self._pending_ignored = 0

    def _start_producer(self):
        self._reset_to_committed()
        self._queue = queue.Queue(maxsize=1)
        self._producer_stop = threading.Event()
        self._producer = threading.Thread(target=self._produce, args=(self._queue, self._producer_stop),
                                          name="nearline-prefetch", daemon=True)
        self._producer.start()

    def _produce(self, out, stop):
        def put(item):
            while not stop.is_set():
                try:
                    out.put(item, timeout=self.nearline.poll_interval_s)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            while not stop.is_set():
                prepared = self._prepare(self.nearline.poll_interval_s)
                if prepared is not None and (not put(prepared) or prepared is _CAUGHT_UP):
                    return  # stopped, or drained: a later step_once starts a new producer
        except BaseException as e:  # handed to the training thread, which raises it
            put(e)

    def _stop_producer(self):
        if self._producer is not None:
            self._producer_stop.set()
            self._producer.join()
            self._producer = None
            # prepared batches still queued were never trained nor committed: read them again next time
            self._queue = None
            self._reset_to_committed()

    def _wait(self, seconds):
        wait = getattr(self.stream, "wait", None)
        if wait is not None:
            wait(self._read_offset, seconds)
        else:
            time.sleep(seconds)

    def _consume(self, records):
        from mm_ads.serving.nearline.impressions import EventError

        for offset, next_offset, record in records:
            if not self._pending:
                self._pending_since = time.monotonic()
            parsed = None
            if not self.schema.is_impression(record) and isinstance(record, dict) and "type" in record:
                self._pending_ignored += 1
            else:
                try:
                    parsed = self.schema.parse(record, offset)
                    self._pending_valid += 1
                except EventError as e:
                    if self.nearline.on_bad_record == "fail":
                        raise
                    self._pending_skipped += 1
                    root = _field_root(e.field)
                    self._skipped_by_field[root] = self._skipped_by_field.get(root, 0) + 1
                    total = sum(self._skipped_by_field.values())
                    if total <= _LOGGED_SKIPS or total % 1000 == 0:
                        logging.warning("Skipped (%d so far): %s", total, e)
            self._pending.append((offset, next_offset, parsed))
            self._read_offset = next_offset  # per record: a raised bad record is read again, nothing twice

    def _throttle(self, n):
        rate = self.nearline.max_events_per_second
        if rate <= 0:
            return
        now = time.monotonic()
        if self._next_allowed > now:
            time.sleep(self._next_allowed - now)
        self._next_allowed = max(now, self._next_allowed) + n / rate

    def _train(self, batch):
        pending, events = batch.pending, batch.events
        n = len(events)
        if n:
            self._throttle(n)
            loss = self.trainer.train_batch(batch.inputs, batch.labels)
            if not math.isfinite(loss):
                raise FloatingPointError(f"Loss became {loss} at step {int(self.trainer.step.numpy())} (events at "
                                         f"offsets {pending[0][0]}..{pending[-1][0]}); the last checkpoint "
                                         f"({self.trainer.manager.latest_checkpoint}) is intact")
            self._window_loss += loss
            self._window_steps += 1
        # commit: the weights now hold exactly the events before pending[-1]'s next offset
        st = self.state
        for offset, _, parsed in pending:
            if parsed is not None:
                st.fingerprint = fingerprint(st.fingerprint, offset)
                st.last_offset = str(offset)
        st.events += n
        st.clicks += int(sum(p["label"] for p in events))
        st.skipped += batch.skipped
        st.ignored += batch.ignored
        st.next_offset = str(pending[-1][1])
        if n:
            st.last_ts = events[-1]["ts"]
            now = time.time()
            self._lag = now - events[-1]["ts"]  # the newest event of the batch
            oldest = now - min(p["ts"] for p in events)
            self._lag_max = oldest if self._lag_max is None else max(self._lag_max, oldest)
        self._run_events += n
        self._window_events += n
        self._unexported += n
        step = int(self.trainer.step.numpy())
        if n and step % self.config.train.checkpoint_every == 0:
            self.checkpoint()
        self._maybe_export()
        self._maybe_report()
        return n

    def checkpoint(self):
        """Saves model, optimizers and stream state in one checkpoint (when the step moved since the last)."""
        step = int(self.trainer.step.numpy())
        if self._saved_step == step and self.trainer.manager.latest_checkpoint:
            return self.trainer.manager.latest_checkpoint
        self.state.to_variables()
        path = self.trainer.save()
        self._saved_step = step
        return path

    def export(self):
        """Checkpoints, then exports the checkpointed weights as a new version under `export_base`; its path."""
        from mm_ads.export.saved_model import export_saved_model

        self.checkpoint()
        # the index table's encoder is the one these vectors came from: the server checks it against its table
        tables = tables_by_modality(self.table)
        vectors = {m: {"encoder_version": t.encoder_version, "dim": int(t.dim), "table": redact_uri(t.uri)}
                   for m, t in tables.items()}
        vectors = vectors.get("", vectors) or None  # one unnamed table: its record; several: one per modality
        path = export_saved_model(self.trainer.model, self.export_base, spec=self.spec, vectors=vectors)
        entry = {"version": int(os.path.basename(path)), "path": os.path.abspath(path),
                 "step": int(self.trainer.step.numpy()), "events": self.state.events,
                 "next_offset": self.state.next_offset, "exported_at": time.time()}
        self.exports.append(entry)
        io_utils.write_json(os.path.join(self.model_dir, EXPORTS_FILE), self.exports)
        self._exported_this_run.append(entry["version"])
        self._unexported = 0
        self._last_export = time.monotonic()
        logging.info("Exported version %d (%d events, step %d): %s", entry["version"], entry["events"], entry["step"],
                     path)
        return path

    def _maybe_export(self):
        nl = self.nearline
        if not self._unexported:
            return None
        due = self._unexported >= nl.export_every_events or (
            nl.export_every_s > 0 and time.monotonic() - self._last_export >= nl.export_every_s)
        return self.export() if due else None

    def run(self, stop_event=None):
        """Trains until `stop_event` is set (or the stream is drained with `stop_at_end`); returns the stats.

        On return the last batch is checkpointed and exported (when anything was trained since the last
        export). An exception propagates without a checkpoint: the last one stays consistent.
        """
        from mm_ads.export.saved_model import latest_version

        if self.nearline.export_at_start and latest_version(self.export_base) == 0:
            self.export()
        try:
            while not (stop_event is not None and stop_event.is_set()):
                self.step_once(timeout=self.nearline.poll_interval_s)
                if self._caught_up and self.nearline.stop_at_end:
                    break
                self._maybe_export()
                self._maybe_report()
        except BaseException:
            self._stop_producer()
            raise
        return self.finish()

    def finish(self):
        """Checkpoints, exports unexported events and writes the stats; returns them. Pending events (a batch
        not trained yet) are left to the next run: their offsets are not committed."""
        self._stop_producer()
        self.checkpoint()
        if self._unexported:
            self.export()
        return self._maybe_report(force=True)

    # -- reports --------------------------------------------------------------------------------
    def stats(self):
        """The current figures (also written to `<model_dir>/nearline_stats.json`)."""
        now = time.monotonic()
        window = max(now - self._window_start, 1e-9)
        run_s = max(now - self._run_start, 1e-9)
        try:
            end = self.stream.end_offset()
        except Exception:  # noqa: BLE001 - a report must not stop training
            end = None
        nxt = decode_offset(self.state.next_offset)
        out = {
            **{k: v for k, v in self.state.to_json().items() if k != "last_ts"},
            "step": int(self.trainer.step.numpy()),
            "events_per_second": round(self._window_events / window, 1),
            "loss": round(self._window_loss / self._window_steps, 5) if self._window_steps else None,
            "lag_s": None if self._lag is None else round(self._lag, 4),
            "lag_max_s": None if self._lag_max is None else round(self._lag_max, 4),
            "run": {"events": self._run_events, "seconds": round(run_s, 2),
                    "events_per_second": round(self._run_events / run_s, 1),
                    "skipped_by_field": dict(self._skipped_by_field), "started_from": str(self.started_from)},
            "exported_versions": list(self._exported_this_run),
            "latest_version": self.exports[-1]["version"] if self.exports else None,
            "export_base": os.path.abspath(self.export_base),
            "stream": str(self.stream),
            "end_offset": None if end is None else str(end),
            "backlog_bytes": end - nxt if isinstance(end, int) and isinstance(nxt, int) else None,
            "vector_join": self.join.stats() if self.join is not None else None,
            "encoder_version": _encoder_versions(self.table) or None,
            "updated_at": time.time(),
        }
        return out

    def _maybe_report(self, force=False):
        now = time.monotonic()
        if not force and now - self._last_report < self.nearline.stats_every_s:
            return None
        stats = self.stats()
        io_utils.write_json(os.path.join(self.model_dir, STATS_FILE), stats)
        miss = stats["vector_join"]["miss_rate"] if stats["vector_join"] else 0.0
        lag = f"lag {stats['lag_s']} s (max {stats['lag_max_s']} s)" if self._window_events else "idle"
        logging.info(
            "nearline: %d events (+%d, %.1f events/s), %s, step %d, loss %s, %d versions exported (latest %s), "
            "%d skipped, vector miss %.2f%%, offset %s",
            stats["events"], self._window_events, stats["events_per_second"], lag, stats["step"],
            stats["loss"], len(self._exported_this_run), stats["latest_version"], stats["skipped"], 100 * miss,
            stats["next_offset"])
        self._last_report = self._window_start = now
        self._window_events, self._window_loss, self._window_steps = 0, 0.0, 0
        self._lag_max = None
        return stats

    def close(self):
        if getattr(self, "_producer", None) is not None:
            self._stop_producer()
        for resource in reversed(self._owned):
            resource.close()
        self._owned = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def define_flags():
    """The flags of `python -m mm_ads.serving.nearline`: the experiment's (`mm_ads.flags`) and one per
    `NearlineConfig` field."""
    from mm_ads import flags as flags_lib  # noqa: F401  (defines the experiment flags first)

    options_lib.define_flags(NearlineConfig, "Near-line trainer")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from mm_ads import flags as flags_lib

    config = flags_lib.config_from_flags()
    nearline = options_lib.options_from_flags(NearlineConfig)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with NearlineTrainer(config, nearline) as trainer:
        stats = trainer.run(stop)
    keys = ("events", "skipped", "ignored", "step", "next_offset", "latest_version")
    print(json.dumps({**{k: stats.get(k) for k in keys}, "run": stats["run"]}))
    print(f"stats: {os.path.join(os.path.abspath(config.model_dir), STATS_FILE)}")
