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

import numpy as np
import tensorflow as tf
from absl import logging

from mm_ads.serving.server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from mm_ads.serving.server.model_manager import DEFAULT_SIGNATURE, ModelManager
from mm_ads.serving.server.ranking import RANK_SIGNATURE, Catalogue, Ranker, RankRequest, VectorCache
from mm_ads.serving.server.stats import ServingStats


@dataclasses.dataclass
class ServerConfig:
    """Settings of a `PredictionServer` (the flags of the same names; see `define_flags`)."""

    model_base_path: str = ""
    model_name: str = "ctr"
    host: str = "127.0.0.1"
    grpc_port: int = 8500  # 0: any free port; -1: no gRPC server
    rest_port: int = 8501  # 0: any free port; -1: no REST server
    poll_interval_s: float = 1.0
    wait_log_interval_s: float = 10.0  # while no version is served: one INFO line this often about what is missing
    warmup_batch_sizes: tuple = (1, 200)
    max_candidates: int = 1000  # rows of a Predict request / candidates of a rank request
    vector_cache_items: int = 100_000  # ranking's cache of found vectors (0: every request asks the table)
    vector_cache_ttl_s: float = 1.0  # a vector rewritten in the index table is seen after at most this
    max_body_bytes: int = 64 << 20  # REST request body (its Content-Length; 413 beyond, the body not read)
    max_rest_inflight_bytes: int = 128 << 20  # REST bodies being read or handled at once, over all connections
    rest_read_timeout_s: float = 5.0  # a REST request (line + headers, then body) must arrive within this; idle too
    max_grpc_message_bytes: int = 64 << 20
    max_decoded_bytes: int = 256 << 20  # a gRPC request's input tensors once decoded (from their declared shapes)
    max_rest_connections: int = 256  # open REST connections (a thread each); more are closed at once
    grpc_workers: int = 8
    shutdown_grace_s: float = 10.0

    def validate(self):
        if not self.model_base_path:
            raise ValueError("model_base_path is required (the TF Serving base path <base>/<version>/)")
        if not self.model_name or "/" in self.model_name or ":" in self.model_name:
            raise ValueError(f"model_name must be a non-empty name without '/' or ':', got {self.model_name!r}")
        for name in ("max_candidates", "max_body_bytes", "max_rest_inflight_bytes", "max_grpc_message_bytes",
                     "max_decoded_bytes", "max_rest_connections", "grpc_workers"):
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


def check_finite(inputs):
    """`InvalidArgument` naming the first floating-point input with a NaN or an infinity."""
    for name in sorted(inputs):
        if not tf.as_dtype(inputs[name].dtype).is_floating:
            continue
        value = np.asarray(inputs[name])  # no copy for numpy arrays (what both front-ends pass)
        finite = np.isfinite(value)
        if not finite.all():
            raise InvalidArgument(f"input {name!r}: has non-finite values ({value[~finite].flat[0]}); NaN and "
                                  "infinities are refused")


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
            self.vectors = VectorCache(index_table, config.vector_cache_items, config.vector_cache_ttl_s)
        self.ranker = None if spec is None else Ranker(spec, self.vectors, catalogue, config.max_candidates,
                                                        self.stats)
        self.manager = ModelManager(config.model_name, config.model_base_path, config.poll_interval_s,
                                    config.warmup_batch_sizes, on_load=self._warm_rank,
                                    wait_log_interval_s=config.wait_log_interval_s, index_table=index_table)
        self._grpc = self._grpc_executor = self._rest = None
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
    """The flags of `python -m mm_ads.serving.server` (the entry point defines them; importing defines none)."""
    from absl import flags

    d = ServerConfig()
    flags.DEFINE_string("model_base_path", None, "TF Serving base path: <base>/<version>/ SavedModels.")
    flags.DEFINE_string("model_name", d.model_name, "The model name requests use.")
    flags.DEFINE_string("host", d.host, "Address to bind (127.0.0.1: this machine only).")
    flags.DEFINE_integer("grpc_port", d.grpc_port, "gRPC port (0: any free port, -1: off).")
    flags.DEFINE_integer("rest_port", d.rest_port, "REST port (0: any free port, -1: off).")
    flags.DEFINE_float("poll_interval_s", d.poll_interval_s, "How often the base path is polled for new versions.")
    flags.DEFINE_float("wait_log_interval_s", d.wait_log_interval_s,
                       "While no version is served (the base path missing or without a complete "
                       "<version>/saved_model.pb), log what is missing at INFO this often. The server keeps "
                       "polling, like TF Serving.")
    flags.DEFINE_list("warmup_batch_sizes", [str(b) for b in d.warmup_batch_sizes],
                      "Batch sizes of the warm-up calls before a version is swapped in.")
    flags.DEFINE_integer("max_candidates", d.max_candidates, "Max rows of a Predict / candidates of a rank request.")
    flags.DEFINE_integer("vector_cache_items", d.vector_cache_items,
                         "Ranking's cache of found vectors in front of the index table (0: off).")
    flags.DEFINE_float("vector_cache_ttl_s", d.vector_cache_ttl_s,
                       "A cached vector is used this long (a rewritten vector is seen after at most this).")
    flags.DEFINE_integer("max_body_bytes", d.max_body_bytes,
                         "Max REST request body, from its Content-Length before anything is read: 413 beyond "
                         "(a missing Content-Length: 411; a negative or non-numeric one: 400).")
    flags.DEFINE_integer("max_rest_inflight_bytes", d.max_rest_inflight_bytes,
                         "Max bytes of REST request bodies being read or handled at once over all connections "
                         "(>= --max_body_bytes). A request that does not fit waits up to --rest_read_timeout_s "
                         "for others to finish, then gets 503 (a body over 64 KiB is then not read and its connection "
                         "is closed).")
    flags.DEFINE_float("rest_read_timeout_s", d.rest_read_timeout_s,
                       "A REST connection must send its next request line and headers within this many seconds "
                       "(new or kept alive: idle connections are closed after it), and then its body within as "
                       "long again.")
    flags.DEFINE_integer("max_grpc_message_bytes", d.max_grpc_message_bytes, "Max gRPC message (both ways).")
    flags.DEFINE_integer("max_decoded_bytes", d.max_decoded_bytes,
                         "Max bytes of a gRPC Predict request's input tensors once decoded (elements x dtype size, "
                         "summed), checked from their declared shapes before anything is allocated: "
                         "RESOURCE_EXHAUSTED beyond.")
    flags.DEFINE_integer("max_rest_connections", d.max_rest_connections,
                         "Max open REST connections (one thread each); more are closed at once.")
    flags.DEFINE_integer("grpc_workers", d.grpc_workers, "gRPC handler threads.")
    flags.DEFINE_float("shutdown_grace_s", d.shutdown_grace_s, "How long requests in progress may finish on stop.")
    flags.DEFINE_integer("intra_op_threads", 0, "Threads one TF op may use (TF Serving's "
                         "--tensorflow_intra_op_parallelism); 0: TF's default, one per core.")
    flags.DEFINE_integer("inter_op_threads", 0, "Threads running independent TF ops at once (TF Serving's "
                         "--tensorflow_inter_op_parallelism); 0: TF's default.")
    flags.DEFINE_string("data_dir", None, "Dataset dir: FeatureSpec (manifest.json) and catalogue (items.parquet) "
                                          "for ranking.")
    flags.DEFINE_string("feature_spec", None, "FeatureSpec JSON (default: the data_dir manifest's).")
    flags.DEFINE_string("catalogue", None, "Item catalogue Parquet (default <data_dir>/items.parquet).")
    flags.DEFINE_string("index_table", None, "Index table URI (mm_ads.serving.index.index_table.open_index_table) for "
                                             "ranking.")


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
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not f.model_base_path:
        raise app.UsageError("--model_base_path is required")
    set_tf_threads(f.intra_op_threads, f.inter_op_threads)
    config = ServerConfig(
        model_base_path=f.model_base_path, model_name=f.model_name, host=f.host, grpc_port=f.grpc_port,
        rest_port=f.rest_port, poll_interval_s=f.poll_interval_s, wait_log_interval_s=f.wait_log_interval_s,
        warmup_batch_sizes=tuple(int(b) for b in f.warmup_batch_sizes), max_candidates=f.max_candidates,
        vector_cache_items=f.vector_cache_items, vector_cache_ttl_s=f.vector_cache_ttl_s,
        max_body_bytes=f.max_body_bytes, max_rest_inflight_bytes=f.max_rest_inflight_bytes,
        rest_read_timeout_s=f.rest_read_timeout_s, max_grpc_message_bytes=f.max_grpc_message_bytes,
        max_decoded_bytes=f.max_decoded_bytes, max_rest_connections=f.max_rest_connections,
        grpc_workers=f.grpc_workers, shutdown_grace_s=f.shutdown_grace_s)
    spec, catalogue = load_ranking_inputs(f.data_dir, f.feature_spec, f.catalogue)
    table = None
    if f.index_table:
        from mm_ads.serving.index.index_table import IndexTableError, open_index_table

        try:
            table = open_index_table(f.index_table)
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
