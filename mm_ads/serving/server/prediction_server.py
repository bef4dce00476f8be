r"""The prediction server: TF Serving's gRPC and REST APIs over the latest CTR model version, plus ranking by ids.

`python -m mm_ads.serving.server --flagfile=configs/serving/server.flags --model_base_path=DIR
[--data_dir=DIR] [--index_table=URI]`

  * serves the latest complete version under `--model_base_path` (`<base>/<version>/`, as written by
    `python -m mm_ads.export`), hot-swapping when a new version appears (`mm_ads.serving.server.model_manager`);
  * gRPC on `--grpc_port` (`tensorflow.serving.PredictionService` Predict / GetModelMetadata and
    `ModelService` GetModelStatus; `mm_ads.serving.server.grpc_service`), REST on `--rest_port`
    (`/v1/models/<name>:predict`, `:rank`, status, metadata; `mm_ads.serving.server.rest`);
  * ranking by ids (`:rank`, gRPC Predict with `signature_name="rank"`, `PredictionServer.rank`): the
    multimodal vectors come from the index table `--index_table` and the item-side id features from the
    catalogue `<data_dir>/items.parquet` (`mm_ads.serving.server.ranking`); the FeatureSpec from
    `<data_dir>/manifest.json` or `--feature_spec`.
Until a first version is served (the base path missing, or no complete `<version>/saved_model.pb` in it yet) it
keeps polling, as TF Serving does, and logs what is missing at INFO every `--wait_log_interval_s`. An
`--index_table` that does not exist is an error naming `python -m mm_ads.serving.index.load_index_table`, which
creates it from a vector table. Binds `--host=127.0.0.1` by default. Once serving, it prints one JSON line
`{"grpc_port", "rest_port", "pid"}` (ports 0 pick free ones). SIGTERM/SIGINT: stop accepting, let requests in
progress finish (up to `--shutdown_grace_s`), exit 0.

From Python: `PredictionServer(ServerConfig(...), index_table=..., catalogue=..., spec=...).start()`.
This module defines its flags only when run as a program, so importing it has no flag side effects.
"""

import dataclasses
import json
import os
import signal
import sys
import threading
from concurrent import futures

import numpy as np
import tensorflow as tf
from absl import logging

from mm_ads import options as options_lib
from mm_ads.serving.index.modalities import ModalityIndexTables, tables_by_modality
from mm_ads.serving.server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from mm_ads.serving.server.model_manager import DEFAULT_SIGNATURE, ModelManager, check_finite
from mm_ads.serving.server.ranking import RANK_SIGNATURE, Catalogue, Ranker, RankRequest, VectorCache
from mm_ads.serving.server.stats import ServingStats


def _option(default, help_text):
    """A field of `ServerConfig` / `ServerCommandLine` with its flag's help (`mm_ads.options.define_flags`)."""
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass
class ServerConfig:
    """Settings of a `PredictionServer`: the flags of the same names (their help is each field's `help`)."""

    model_base_path: str = _option("", "TF Serving base path: <base>/<version>/ SavedModels.")
    model_name: str = _option("ctr", "The model name requests use.")
    host: str = _option("127.0.0.1", "Address to bind (127.0.0.1: this machine only).")
    grpc_port: int = _option(8500, "gRPC port (0: any free port, -1: off).")
    rest_port: int = _option(8501, "REST port (0: any free port, -1: off).")
    poll_interval_s: float = _option(1.0, "How often the base path is polled for new versions.")
    wait_log_interval_s: float = _option(
        10.0, "While no version is served (the base path missing or without a complete <version>/saved_model.pb), "
              "log what is missing at INFO this often. The server keeps polling, like TF Serving.")
    warmup_batch_sizes: tuple = _option(
        (1, 200), "Batch sizes of the zero-input warm-up calls before a version is swapped in, for a version without "
                  "TF Serving's warm-up file <version>/assets.extra/tf_serving_warmup_requests (every export writes "
                  "one; a version with it replays its records instead).")
    max_candidates: int = _option(1000, "Max rows of a Predict / candidates of a rank request.")
    vector_cache_items: int = _option(100_000, "Ranking's cache of found vectors in front of the index table "
                                               "(0: off).")
    vector_cache_ttl_s: float = _option(1.0, "A cached vector is used this long (a rewritten vector is seen after "
                                             "at most this).")
    max_body_bytes: int = _option(
        64 << 20, "Max REST request body, from its Content-Length before anything is read: 413 beyond (a missing "
                  "Content-Length: 411; a negative or non-numeric one: 400).")
    max_rest_inflight_bytes: int = _option(
        128 << 20, "Max bytes of REST request bodies being read or handled at once over all connections "
                   "(>= --max_body_bytes). A request that does not fit waits up to --rest_read_timeout_s for others "
                   "to finish, then gets 503 (a body over 64 KiB is then not read and its connection is closed).")
    rest_read_timeout_s: float = _option(
        5.0, "A REST connection must send its next request line and headers within this many seconds (new or kept "
             "alive: idle connections are closed after it), and then its body within as long again.")
    max_grpc_message_bytes: int = _option(64 << 20, "Max gRPC message (both ways).")
    max_decoded_bytes: int = _option(
        256 << 20, "Max bytes of a gRPC Predict request's input tensors once decoded (elements x dtype size, "
                   "summed), checked from their declared shapes before anything is allocated: RESOURCE_EXHAUSTED "
                   "beyond.")
    max_rest_connections: int = _option(256, "Max open REST connections (one thread each); more are closed at "
                                             "once.")
    grpc_workers: int = _option(8, "gRPC handler threads.")
    rest_workers: int = _option(
        8, "Threads that run the model calls of REST requests (at most this many at once). Each REST connection has "
           "its own thread, which hands its Predict / rank call over to these: a thread that has run the model "
           "leaves ~2 MB behind when it exits (measured), so short-lived connection threads must not run it.")
    shutdown_grace_s: float = _option(10.0, "How long requests in progress may finish on stop.")

    def validate(self):
        if not self.model_base_path:
            raise ValueError("model_base_path is required (the TF Serving base path <base>/<version>/)")
        if not self.model_name or "/" in self.model_name or ":" in self.model_name:
            raise ValueError(f"model_name must be a non-empty name without '/' or ':', got {self.model_name!r}")
        for name in ("max_candidates", "max_body_bytes", "max_rest_inflight_bytes", "max_grpc_message_bytes",
                     "max_decoded_bytes", "max_rest_connections", "grpc_workers", "rest_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_rest_inflight_bytes < self.max_body_bytes:
            raise ValueError(f"max_rest_inflight_bytes ({self.max_rest_inflight_bytes}) must be >= max_body_bytes "
                             f"({self.max_body_bytes}): a body of the largest size must fit")
        if self.rest_read_timeout_s <= 0:
            raise ValueError(f"rest_read_timeout_s must be > 0, got {self.rest_read_timeout_s}")
        if self.vector_cache_items < 0 or self.vector_cache_ttl_s < 0:
            raise ValueError(f"vector_cache_items and vector_cache_ttl_s must be >= 0, got "
                             f"{self.vector_cache_items}, {self.vector_cache_ttl_s}")
        if self.poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {self.poll_interval_s}")
        if self.wait_log_interval_s <= 0:
            raise ValueError(f"wait_log_interval_s must be > 0, got {self.wait_log_interval_s}")
        return self

    @classmethod
    def from_values(cls, values):
        """From `{field: value}` (flagfile strings or typed values); unknown names are an error."""
        return options_lib.options_from_values(cls, values, "server")


@dataclasses.dataclass
class ServerCommandLine:
    """What `python -m mm_ads.serving.server` sets up around its `PredictionServer`: TF's thread pools and the
    inputs of ranking (the flags of the same names; their help is each field's `help`)."""

    intra_op_threads: int = _option(0, "Threads one TF op may use (TF Serving's "
                                       "--tensorflow_intra_op_parallelism); 0: TF's default, one per core.")
    inter_op_threads: int = _option(0, "Threads running independent TF ops at once (TF Serving's "
                                       "--tensorflow_inter_op_parallelism); 0: TF's default.")
    data_dir: str = _option("", "Dataset dir: FeatureSpec (manifest.json) and catalogue (items.parquet) for ranking.")
    feature_spec: str = _option("", "FeatureSpec JSON (default: the data_dir manifest's).")
    catalogue: str = _option("", "Item catalogue Parquet (default <data_dir>/items.parquet).")
    index_table: str = _option("", "Index table URI (mm_ads.serving.index.index_table.open_index_table) for "
                                   "ranking; a model of several modalities: one per modality, "
                                   "image=URI,text=URI (mm_ads.serving.index.modalities).")

    def validate(self):
        return self  # the thread counts are checked by `set_tf_threads`

    @classmethod
    def from_values(cls, values):
        """From `{field: value}` (flagfile strings or typed values); unknown names are an error."""
        return options_lib.options_from_values(cls, values, "server command line")


class PredictionServer:
    """The served model, its front-ends and the ranking call (see the module docstring).

    Args:
        config: a `ServerConfig`.
        index_table: `get_many(ids) -> (vectors, found)` source of multimodal vectors for ranking, or None.
        catalogue: a `mm_ads.serving.server.ranking.Catalogue` (item-side id features), or None.
        spec: the dataset's `FeatureSpec` (needed for ranking), or None (ranking then FAILED_PRECONDITION).
        own_index_table: close `index_table` on `stop()`.

    Example:

    ```python
    server = PredictionServer(ServerConfig(model_base_path="runs/simtier/export", grpc_port=0, rest_port=0),
                              index_table=table, catalogue=Catalogue.load("data/items.parquet"), spec=spec)
    server.start()
    result = server.rank(candidates=[3, 17, 42], history=[5, 9], features={"user_id": 7, ...})
    server.stop()
    ```
    """

    def __init__(self, config, index_table=None, catalogue=None, spec=None, own_index_table=False):
        self.config = config.validate()
        self.stats = ServingStats()
        self.index_table = index_table
        self._own_index_table = own_index_table
        self.vectors = index_table
        if index_table is not None and config.vector_cache_items > 0 and config.vector_cache_ttl_s > 0:
            # one cache per modality's table (several modalities: `mm_ads.serving.index.modalities`)
            caches = {m: VectorCache(t, config.vector_cache_items, config.vector_cache_ttl_s)
                      for m, t in tables_by_modality(index_table).items()}
            self.vectors = caches[""] if list(caches) == [""] else ModalityIndexTables(caches)
        self.ranker = None if spec is None else Ranker(spec, self.vectors, catalogue, config.max_candidates,
                                                        self.stats)
        self.manager = ModelManager(config.model_name, config.model_base_path, config.poll_interval_s,
                                    config.warmup_batch_sizes, on_load=self._warm_rank,
                                    wait_log_interval_s=config.wait_log_interval_s, index_table=index_table,
                                    max_decoded_bytes=config.max_decoded_bytes)
        self._grpc = self._grpc_executor = self._rest = self._model_executor = None
        self.grpc_port = self.rest_port = None
        self._stopped = threading.Event()
        self._stopping = False

    # -- the core calls used by both front-ends --------------------------------------------------
    def model(self, name, version=None):
        if self._stopping:
            raise Unavailable("the server is shutting down")
        return self.manager.get(name, version)

    def predict(self, inputs, name, version=None, signature_name=None, model=None):
        """`{input: array}` → (LoadedModel, signature name, `{output: array}`); `rank` signature ranks by ids."""
        model = model or self.model(name, version)
        signature_name = signature_name or DEFAULT_SIGNATURE
        if signature_name == RANK_SIGNATURE and self.ranker is not None and RANK_SIGNATURE not in model.signatures:
            request = RankRequest.from_tensors(inputs, self.ranker.layout(model))
            result = self.ranker.rank(model, request)
            return model, signature_name, {"ctr": result.scores, "found": result.found}
        sig = model.signature(signature_name)
        batch = sig.check(inputs)
        if batch > self.config.max_candidates:
            raise ResourceExhausted(f"request has {batch} rows, the limit is {self.config.max_candidates}")
        if batch == 0:
            raise InvalidArgument("request has no rows (batch size 0)")
        check_finite(inputs)
        self.stats.add(predict_requests=1, predict_rows=batch)
        return model, signature_name, model.predict(inputs, signature_name, check=False)

    def in_model_thread(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` run on one of the `rest_workers` model threads (in the caller's thread when the
        REST front-end is off). The REST front-end calls the model through it: its connection threads come and go
        with their connections, and each thread that has run the model leaves ~2 MB behind when it exits."""
        executor = self._model_executor
        if executor is None:
            return fn(*args, **kwargs)
        return executor.submit(fn, *args, **kwargs).result()

    def rank_request(self, request, name=None, version=None):
        """Scores a `RankRequest`; returns a `mm_ads.serving.server.ranking.RankResult` (its `version` tells which)."""
        if self.ranker is None:
            raise FailedPrecondition("ranking needs the dataset's FeatureSpec (--data_dir or --feature_spec)")
        model = self.model(name or self.config.model_name, version)
        return self.ranker.rank(model, request)

    def rank(self, candidates, history=(), features=None, candidate_features=None, version=None):
        """The Python ranking API: ids in, `RankResult` (scores in candidate order, found mask, order) out."""
        request = RankRequest(np.asarray(candidates, np.int64).reshape(-1), np.asarray(history, np.int64).reshape(-1),
                              {k: int(v) for k, v in (features or {}).items()},
                              {k: np.asarray(v, np.int64).reshape(-1) for k, v in (candidate_features or {}).items()})
        return self.rank_request(request, self.config.model_name, version)

    def metadata(self, name, version=None):
        """(LoadedModel, `{signature name: SignatureDef}`), with `rank` when ranking is configured."""
        model = self.model(name, version)
        defs = dict(model.signature_defs)
        if self.ranker is not None and RANK_SIGNATURE not in defs:
            try:
                defs[RANK_SIGNATURE] = self.ranker.layout(model).signature_def()
            except FailedPrecondition as e:
                logging.warning("no rank signature in the metadata: %s", e)
        return model, defs

    def status(self, name, version=None):
        if name != self.config.model_name:
            self.manager.get(name)  # raises NotFound
        entries = self.manager.status()
        if version is not None:
            entries = [e for e in entries if e["version"] == int(version)]
            if not entries:
                self.manager.get(name, version)  # raises NotFound
        if not entries:
            raise Unavailable(f"model {name!r} has no version yet (base path {self.manager.base_path})")
        return entries

    def stats_snapshot(self):
        model = self.manager.current
        out = {"model_name": self.config.model_name, "model_version": model.version if model else None,
               "swaps": self.manager.swaps, "counters": self.stats.snapshot()}
        if isinstance(self.vectors, VectorCache):
            out["vector_cache"] = {"hits": self.vectors.hits, "misses": self.vectors.misses}
        elif isinstance(self.vectors, ModalityIndexTables):
            out["vector_cache"] = {m: {"hits": c.hits, "misses": c.misses} for m, c in self.vectors.items()
                                   if isinstance(c, VectorCache)}
        # 0: TF's default (one thread per core)
        out["tf_threads"] = {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                             "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}
        return out

    def _warm_rank(self, model):
        """Before a version is swapped in: build its ranking layout and run one ranking call through it.

        A version the ranking layout does not fit (e.g. an input the FeatureSpec lacks) still serves Predict;
        its rank calls then fail with FAILED_PRECONDITION naming the input.
        """
        if self.ranker is None:
            return
        try:
            layout = self.ranker.layout(model)
        except FailedPrecondition as e:
            logging.warning("model %s version %d: ranking is not available: %s", model.name, model.version, e)
            return
        catalogue = self.ranker.catalogue
        cand = np.asarray(catalogue.item_ids[:2] if catalogue is not None and len(catalogue) else [1], np.int64)
        self.ranker.rank(model, RankRequest(cand, cand[:1], {n: 0 for n in layout.request_features}), count=False)

    # -- life cycle --------------------------------------------------------------------------------
    def start(self):
        """Loads the latest version (if any), starts the watcher, the gRPC and the REST servers."""
        from mm_ads.serving.server.grpc_service import make_grpc_server
        from mm_ads.serving.server.rest import RestServer

        c = self.config
        self.manager.start()
        try:
            if c.grpc_port >= 0:
                self._grpc, self.grpc_port, self._grpc_executor = make_grpc_server(
                    self, c.host, c.grpc_port, c.max_grpc_message_bytes, c.grpc_workers)
                self._grpc.start()
            if c.rest_port >= 0:
                self._model_executor = futures.ThreadPoolExecutor(max_workers=c.rest_workers,
                                                                  thread_name_prefix="rest-model")
                self._rest = RestServer(self, c.host, c.rest_port, c.max_rest_connections,
                                        c.max_rest_inflight_bytes, c.rest_read_timeout_s).start()
                self.rest_port = self._rest.server_port
        except BaseException:
            self.stop()
            raise
        current = self.manager.current
        logging.info("serving model %r (version %s) from %s: gRPC %s:%s, REST %s:%s", c.model_name,
                        current.version if current else "none yet", self.manager.base_path, c.host, self.grpc_port,
                        c.host, self.rest_port)
        return self

    def stop(self, grace_s=None):
        """Graceful stop: no new requests, requests in progress finish (up to `grace_s`), threads joined."""
        grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        # the front-ends refuse new requests themselves; requests already inside a handler go on
        if self._rest is not None:
            self._rest.stopping.set()
        if self._grpc is not None:
            self._grpc.stop(grace_s).wait()
            self._grpc_executor.shutdown(wait=True)
            self._grpc = None
        if self._rest is not None:
            self._rest.stop()
            self._rest = None
        if self._model_executor is not None:
            self._model_executor.shutdown(wait=True)
            self._model_executor = None
        self._stopping = True  # the Python API too
        self.manager.stop()
        if self._own_index_table and self.index_table is not None:
            self.index_table.close()
        self._stopped.set()

    def wait(self, timeout=None):
        """Blocks until `stop()` finished."""
        return self._stopped.wait(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def load_ranking_inputs(data_dir=None, feature_spec=None, catalogue=None):
    """(FeatureSpec or None, Catalogue or None) from a dataset dir and/or explicit paths."""
    from mm_ads.data.dataset import Manifest
    from mm_ads.data.spec import FeatureSpec

    spec = None
    if feature_spec:
        with open(feature_spec) as f:
            spec = FeatureSpec.from_json(json.load(f))
    elif data_dir:
        spec = Manifest.load(data_dir).spec
    catalogue_path = catalogue or (os.path.join(data_dir, "items.parquet") if data_dir else None)
    cat = None
    if catalogue_path:
        columns = None
        if spec is not None:
            import pyarrow.parquet as pq

            have = set(pq.read_schema(catalogue_path).names)
            columns = [f.name for f in spec.by_role("item") if f.name in have and f.name != "item_id"]
        cat = Catalogue.load(catalogue_path, columns)
    return spec, cat


# -- command line ------------------------------------------------------------------------------------
def define_flags():
    """The flags of `python -m mm_ads.serving.server`, one per field of `ServerConfig` and `ServerCommandLine`
    (the entry point defines them; importing this module defines none)."""
    options_lib.define_flags(ServerConfig, "Server")
    options_lib.define_flags(ServerCommandLine, "Server")


def set_tf_threads(intra_op, inter_op):
    """Sets TF's thread pools (0 leaves TF's default); must run before the first TF op of the process.

    With several requests in flight, one thread per op (`intra_op=1`) gives more requests/s on few cores:
    the requests are the parallelism, and ops split over threads only contend (BUILD.md, "Prediction server,
    measured").
    """
    for what, value, setter in (("intra_op_threads", intra_op, tf.config.threading.set_intra_op_parallelism_threads),
                                ("inter_op_threads", inter_op, tf.config.threading.set_inter_op_parallelism_threads)):
        if value < 0:
            raise ValueError(f"--{what} must be >= 0 (0: TF's default), got {value}")
        if value:
            try:
                setter(value)
            except RuntimeError as e:  # TF's runtime was already initialised in this process
                raise RuntimeError(f"--{what}={value}: TF's thread pools are fixed once TF has run an op ({e})") from e


def main(argv):
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = options_lib.options_from_flags(ServerConfig)
    cmd = options_lib.options_from_flags(ServerCommandLine)
    set_tf_threads(cmd.intra_op_threads, cmd.inter_op_threads)
    spec, catalogue = load_ranking_inputs(cmd.data_dir, cmd.feature_spec, cmd.catalogue)
    table = None
    if cmd.index_table:
        from mm_ads.serving.index.index_table import IndexTableError
        from mm_ads.serving.index.modalities import open_index_tables

        try:
            table = open_index_tables(cmd.index_table)
        except IndexTableError as e:
            sys.exit(f"server: --index_table: {e}")
    server = PredictionServer(config, table, catalogue, spec, own_index_table=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    print(json.dumps({"grpc_port": server.grpc_port, "rest_port": server.rest_port, "pid": os.getpid()}), flush=True)
    while not stop.wait(0.5):
        pass
    logging.info("stopping: requests in progress finish (grace %.1f s)", config.shutdown_grace_s)
    server.stop()
    logging.info("stopped")
