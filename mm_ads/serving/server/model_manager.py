"""Model versions under a TF-Serving base path: discovery, loading, warm-up and the atomic hot swap.

Layout (what `mm_ads.export.saved_model.export_saved_model` writes): `<base>/<version>/` with `version` a
positive integer. A directory is a candidate version only when its name is all digits (so the hidden
`.<version>.*.tmp` directories an export writes into, and any other temp or hidden name, are never looked
at) and it holds a complete SavedModel: `saved_model.pb` and, when it has a `variables/` directory,
`variables.index` plus every data shard that the shard names announce (`variables.data-0000i-of-0000N`).

Version policy: serve the largest complete version that loads (TF Serving's default "latest" policy).
`ModelManager.poll()` loads a new target version off the request path — `tf.saved_model.load`, then warm-up calls —
and only then swaps one reference. The warm-up replays the version's TF Serving warm-up file
`assets.extra/tf_serving_warmup_requests` (`mm_ads.export.warmup`, written by every export) as TF Serving does: each
record's request is decoded and checked like a gRPC Predict request and run through its signature, and its outputs
must be finite; a file that cannot be read, more than 1000 records, a record naming a signature the version lacks or
with inputs that do not fit it fail the load, with the file and the record's index in the error. A version without
the file (exported before it existed) is warmed up with zero inputs of each signature and each `warmup_batch_sizes`.
A request takes that reference once (`ModelManager.get()`), so in-flight requests finish on the version they started
with, and the old version is freed when its last request drops it; the next poll then gives the C heap's free pages back
to the system (`release_free_memory`, glibc's `malloc_trim`). A version that fails to load or to warm up is logged,
recorded in the status (state END with the error) and skipped until its directory's content changes
(`dir_fingerprint`: file names, sizes, mtimes) and then stays the same for one poll; the version already loaded
keeps serving. Given the index table ranking reads (`index_table=`), a version is loaded only if its vector inputs
take the table's dim and were trained on the table's encoder version (`vector_mismatch`, from the signatures and the
export's `assets.extra/mm_ads_vectors.json`); otherwise it is refused before loading: status END with code
FAILED_PRECONDITION and the reason, an ERROR log line, and the served version stays. When the served version's
directory disappears, the largest remaining version is loaded (rollback by deleting a version); with no version
left, the loaded one keeps serving.

Waiting for the first version: like TF Serving, a base path that does not exist yet, or holds no loadable
version yet, is not an error — the watcher keeps polling it (a trainer may create it later). Until a version
is served, one INFO line every `wait_log_interval_s` says what the watcher sees (the base path missing, no
version directory, or each version directory and why it is not served) and what it expects:
`<base>/<version>/saved_model.pb`.
"""

import ctypes
import ctypes.util
import gc
import os
import re
import threading
import time
import weakref

import numpy as np
import tensorflow as tf
from absl import logging

from mm_ads.data.spec import HIST_ITEM_VECTOR, ITEM_VECTOR
from mm_ads.serving.server.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

DEFAULT_SIGNATURE = "serving_default"
_SHARD = re.compile(r"^variables\.data-(\d+)-of-(\d+)$")
VECTOR_FEATURES = (ITEM_VECTOR, HIST_ITEM_VECTOR)


def incomplete_reason(path):
    """Why `path` is not a complete SavedModel directory, or None when it is."""
    if not os.path.isdir(path):
        return "not a directory"
    names = set(os.listdir(path))
    if "saved_model.pb" not in names and "saved_model.pbtxt" not in names:
        return "no saved_model.pb"
    var_dir = os.path.join(path, "variables")
    if os.path.isdir(var_dir):
        files = set(os.listdir(var_dir))
        if files and "variables.index" not in files:
            return "variables/variables.index is missing"
        shards = [_SHARD.match(f) for f in files]
        shards = [(int(m.group(1)), int(m.group(2))) for m in shards if m]
        if "variables.index" in files and not shards:
            return "variables/ has an index but no data shard"
        for total in {n for _, n in shards}:
            have = {i for i, n in shards if n == total}
            if have != set(range(total)):
                return f"variables/ has {len(have)} of {total} data shards"
    return None


def version_dirs(base_path):
    """`{version: path}` of the integer-named subdirectories of `base_path` (complete or not)."""
    if not os.path.isdir(base_path):
        return {}
    out = {}
    for name in os.listdir(base_path):
        if name.isdigit() and int(name) > 0 and os.path.isdir(os.path.join(base_path, name)):
            out[int(name)] = os.path.join(base_path, name)
    return out


def dir_fingerprint(path):
    """A fingerprint of a version directory's content: every file's relative path, size and mtime (ns).

    Repairing a version in place (copying a missing shard, rewriting `saved_model.pb`, replacing a file with one of
    another size or time) changes it; a directory that is not touched keeps it. Cost: one `os.stat` a file (a
    SavedModel has a handful).
    """
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:  # removed while walking: the next poll sees the new content
                continue
            entries.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return tuple(entries)


class Signature:
    """One signature of a loaded SavedModel: its concrete function and input/output specs.

    Attributes: `name`, `fn` (the `ConcreteFunction`), `inputs` `{name: tf.TensorSpec}` (batch dim
    first, None), `outputs` `{name: tf.TensorSpec}`.
    """

    def __init__(self, name, fn):
        self.name = name
        self.fn = fn
        self.inputs = dict(fn.structured_input_signature[1])
        self.outputs = dict(fn.structured_outputs)

    def check(self, inputs):
        """Validates `{name: array or tensor}` against the input specs; returns the batch size.

        Raises `InvalidArgument` naming the missing/unknown input or the one with a wrong dtype or shape.
        """
        missing = sorted(set(self.inputs) - set(inputs))
        if missing:
            raise InvalidArgument(f"signature {self.name!r}: missing input(s) {missing}; "
                                  f"expected {sorted(self.inputs)}")
        unknown = sorted(set(inputs) - set(self.inputs))
        if unknown:
            raise InvalidArgument(f"signature {self.name!r}: unknown input(s) {unknown}; "
                                  f"expected {sorted(self.inputs)}")
        batch, batch_of = None, None
        for name, spec in self.inputs.items():
            value = inputs[name]
            dtype = tf.as_dtype(value.dtype)
            if dtype != spec.dtype:
                raise InvalidArgument(f"input {name!r}: expected dtype {spec.dtype.name}, got {dtype.name}")
            shape = tuple(value.shape)
            want = tuple(spec.shape)
            if len(shape) != len(want) or any(w is not None and w != s for w, s in zip(want, shape)):
                raise InvalidArgument(f"input {name!r}: expected shape {_shape_str(want)}, got {list(shape)}")
            if want and want[0] is None:
                if batch is None:
                    batch, batch_of = shape[0], name
                elif shape[0] != batch:
                    raise InvalidArgument(f"input {name!r}: batch size {shape[0]} differs from {batch} of "
                                          f"input {batch_of!r}")
        return batch or 0


def _nonfinite_output(outputs):
    """The name of the first floating-point output with a NaN or an infinity, or None."""
    return next((k for k, v in outputs.items() if np.issubdtype(v.dtype, np.inexact) and not np.all(np.isfinite(v))),
                None)


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


def _shape_str(shape):
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class LoadedModel:
    """One loaded version: the SavedModel, its signatures and its SignatureDefs (for GetModelMetadata).

    Args:
        name: the served model name.
        version: the integer version.
        path: the version directory.
    """

    def __init__(self, name, version, path):
        self.name = name
        self.version = int(version)
        self.path = path
        self._loaded = tf.saved_model.load(path)
        self.signatures = {k: Signature(k, fn) for k, fn in self._loaded.signatures.items()}
        if not self.signatures:
            raise ValueError(f"SavedModel {path} has no signatures")
        self.signature_defs = _read_signature_defs(path)
        self.loaded_at = time.time()
        self.cache = {}  # per-version derived state (e.g. the ranking layout), filled by its users

    def signature(self, name):
        name = name or DEFAULT_SIGNATURE
        try:
            return self.signatures[name]
        except KeyError:
            raise NotFound(f"model {self.name!r} version {self.version} has no signature {name!r}; it has "
                           f"{sorted(self.signatures)}") from None

    def predict(self, inputs, signature_name=None, check=True):
        """`{name: np.ndarray or tf.Tensor}` → `{output name: np.ndarray}` through a signature."""
        sig = self.signature(signature_name)
        if check:
            sig.check(inputs)
        # tf.constant converts a numpy array 2-4x faster than tf.convert_to_tensor (~20 vs ~50 us an input)
        tensors = {k: tf.constant(v) if isinstance(v, np.ndarray) else tf.convert_to_tensor(v)
                   for k, v in inputs.items()}
        out = sig.fn(**tensors)
        return {k: v.numpy() for k, v in out.items()}

    @property
    def warmup_file(self):
        """The path of the version's TF Serving warm-up file (it may not exist)."""
        from mm_ads.export.warmup import WARMUP_ASSET

        return os.path.join(self.path, WARMUP_ASSET)

    def warmup(self, batch_sizes=(1,), max_decoded_bytes=None):
        """Warms the version up off the request path: replays its warm-up file when it has one
        (`warmup_from_file`), otherwise calls every signature on zero inputs of each of `batch_sizes`.

        Returns the number of warm-up calls. `ValueError` naming the signature (and the file and record) when a call
        fails or gives a non-finite output.
        """
        if os.path.exists(self.warmup_file):
            return self.warmup_from_file(self.warmup_file, max_decoded_bytes)
        return self.warmup_zeros(batch_sizes)

    def warmup_from_file(self, path, max_decoded_bytes=None):
        """Replays the `PredictionLog` records of the warm-up file `path` (TF Serving's format and limits,
        `mm_ads.export.warmup.read_warmup_logs`); returns the number of records.

        Each record's `predict_log.request` goes the way of a gRPC Predict request: its inputs decoded with the
        request decoder (at most `max_decoded_bytes` once decoded; None: no limit), checked against the signature
        `model_spec.signature_name` names (default `serving_default`) and for NaN / infinities (`check_finite`),
        and run through it; every output must be finite. `ValueError` naming the file, the record's index (from 0)
        and what is wrong otherwise; a record of another kind than `predict_log` is one too (a CTR SavedModel has no
        classify or regress signature).
        """
        from mm_ads.export.warmup import read_warmup_logs
        from mm_ads.serving.server.codec import tensor_protos_to_ndarrays
        from mm_ads.serving.server.errors import ServingError

        logs = read_warmup_logs(path)
        for index, log in enumerate(logs):
            kind = log.WhichOneof("log_type")
            if kind != "predict_log":
                raise ValueError(f"warm-up file {path}: record {index} is a {kind or 'empty'} PredictionLog; this "
                                 "server warms up with predict_log records only")
            request = log.predict_log.request
            name = request.model_spec.signature_name or DEFAULT_SIGNATURE
            try:
                limit = float("inf") if max_decoded_bytes is None else max_decoded_bytes
                inputs = tensor_protos_to_ndarrays(request.inputs, limit)
                self.signature(name).check(inputs)
                check_finite(inputs)
                out = self.predict(inputs, name, check=False)
            except (ServingError, tf.errors.InvalidArgumentError) as e:
                message = e.message if isinstance(e, tf.errors.OpError) else str(e)
                raise ValueError(f"warm-up file {path}: record {index} (signature {name!r}): {message}") from None
            bad = _nonfinite_output(out)
            if bad:
                raise ValueError(f"warm-up file {path}: record {index} (signature {name!r}): output {bad!r} is "
                                 "not finite")
        return len(logs)

    def warmup_zeros(self, batch_sizes=(1,)):
        """Calls every signature on zero inputs of each batch size (traces kernels off the request path); returns
        the number of calls."""
        calls = 0
        for sig in self.signatures.values():
            for b in batch_sizes:
                # a fixed batch dimension (the user side of `user_candidates`: 1) keeps its size
                # (strings: the empty string)
                zeros = {k: np.full((b if s.shape[0] is None else s.shape[0],) + tuple(s.shape[1:]),
                                    b"" if s.dtype == tf.string else 0, s.dtype.as_numpy_dtype)
                         for k, s in sig.inputs.items()}
                out = self.predict(zeros, sig.name)
                calls += 1
                bad = _nonfinite_output(out)
                if bad:
                    raise ValueError(f"warm-up of signature {sig.name!r}: output {bad!r} is not finite")
        return calls


def _read_signature_defs(path):
    """`{name: SignatureDef proto}` of the serving meta graph (internal `__*` entries left out)."""
    from tensorflow.core.protobuf import saved_model_pb2

    pb = os.path.join(path, "saved_model.pb")
    if not os.path.exists(pb):
        return {}
    saved = saved_model_pb2.SavedModel()
    with open(pb, "rb") as f:
        saved.ParseFromString(f.read())
    for meta in saved.meta_graphs:
        if "serve" in meta.meta_info_def.tags:
            return {k: v for k, v in meta.signature_def.items() if not k.startswith("__")}
    return {}


def vector_inputs(signature_defs, record=None):
    """`{input name: dim}` of the multimodal vector inputs of a version's signatures.

    The vector inputs are those the export recorded (`record`, see `mm_ads.export.saved_model.read_vector_record`)
    and the FeatureSpec's `item_vector` / `hist_item_vector`; their dim is the last dimension of the input.
    """
    names = set(VECTOR_FEATURES) | set((record or {}).get("inputs", {}))
    out = {}
    for sig in signature_defs.values():
        for name, info in sig.inputs.items():
            if name in names and info.tensor_shape.dim:
                out[name] = int(info.tensor_shape.dim[-1].size)
    return out


def vector_mismatch(path, signature_defs, index_table):
    """Why the version at `path` cannot rank with `index_table`'s vectors, or None when it can.

    Every vector input must take the table's dim and, where the export recorded the encoder that made the vectors
    it was trained on, come from the table's encoder version (`index_table.encoder_version`; a vector source
    without one is checked on dims only). With several modalities (`index_table` a
    `mm_ads.serving.index.modalities.ModalityIndexTables`) each input is checked against its modality's table, and a
    modality the server has no table for refuses the version. A version with vector inputs but no record (exported
    before the record existed) is checked on its dims only, with a warning.
    """
    from mm_ads.export.saved_model import read_vector_record
    from mm_ads.serving.index.modalities import tables_by_modality

    try:
        record = read_vector_record(path)
    except ValueError as e:
        return str(e)
    inputs = vector_inputs(signature_defs, record)
    if not inputs:
        return None
    tables = tables_by_modality(index_table)
    recorded = (record or {}).get("inputs", {})

    def describe(modality):
        t = tables[modality]
        name = f"the index table {getattr(t, 'uri', '')}".rstrip()
        if modality:
            name += f" of the modality {modality!r}"
        return f"{name} holds dim {int(t.dim)}, encoder {getattr(t, 'encoder_version', None)!r}"

    problems, used = [], []
    for name, dim in sorted(inputs.items()):
        modality = recorded.get(name, {}).get("modality", "")
        if modality not in tables:
            problems.append(f"input {name!r} reads the modality {modality or '(unnamed)'!r}, which has no index "
                            f"table here (the server's: {sorted(tables)})")
            continue
        table = tables[modality]
        encoder = getattr(table, "encoder_version", None)  # None: a vector source that does not say
        used.append(modality)
        if dim != int(table.dim):
            problems.append(f"input {name!r} takes vectors of dim {dim}")
        version = recorded.get(name, {}).get("encoder_version")
        if version is not None and encoder is not None and version != encoder:
            problems.append(f"input {name!r} was trained on vectors of encoder {version!r}")
    if problems:
        holds = "; ".join(describe(m) for m in sorted(set(used)) or sorted(tables))
        return (f"refused: {'; '.join(problems)}; {holds} (export the model trained on this "
                "encoder's vectors, or serve an index table of the version's encoder)")
    unrecorded = sorted(n for n in inputs if "encoder_version" not in recorded.get(n, {}))
    if unrecorded:
        logging.warning("version dir %s records no encoder version for its vector input(s) %s (exported before "
                        "the record existed): only their dim is checked against %s", path, unrecorded,
                        "; ".join(describe(m) for m in sorted(tables)))
    return None


def release_free_memory():
    """Gives the C heap's free pages back to the system (glibc's `malloc_trim(0)`); False where there is no glibc.

    After a swap the old version's memory is freed into the allocator's arenas, which keep it: in the soak, RSS
    stayed ~29 MB (3%) higher after one swap.
    """
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return False
    trim(0)
    return True


class ModelManager:
    """Watches `<base_path>` and serves its latest loadable version (see the module docstring).

    Args:
        name: the model name requests must use.
        base_path: the TF Serving base path.
        poll_interval_s: how often the watcher thread polls (`start()`).
        warmup_batch_sizes: batch sizes of the zero-input warm-up calls before a version without a warm-up file
            is swapped in (a version with one replays its records instead, see the module docstring).
        on_load: optional callable `(LoadedModel) -> None` run before the swap (more warm-up); an
            exception there rejects the version like a load failure.
        wait_log_interval_s: while no version is served, the watcher logs `waiting_message()` at INFO this
            often (and once at `start()`).
        release_memory: called once a swapped-out version has been freed (its last request done; checked at each
            poll after a swap, with a `gc.collect()`): `release_free_memory` by default, None for nothing.
        index_table: the index table ranking reads vectors from (`dim`, `encoder_version`), or None: a version
            whose vector inputs do not match it is refused (`vector_mismatch`), before it is loaded.
        max_decoded_bytes: the bytes a warm-up record's inputs may take once decoded (the server's limit on a
            Predict request), checked from their declared shapes before anything is allocated; None: no limit.
    """

    def __init__(self, name, base_path, poll_interval_s=1.0, warmup_batch_sizes=(1,), on_load=None,
                 wait_log_interval_s=10.0, index_table=None, max_decoded_bytes=None,
                 release_memory=release_free_memory):
        if wait_log_interval_s <= 0:
            raise ValueError(f"wait_log_interval_s must be > 0, got {wait_log_interval_s}")
        self.name = name
        self.base_path = os.path.abspath(base_path)
        self.poll_interval_s = float(poll_interval_s)
        self.wait_log_interval_s = float(wait_log_interval_s)
        self._last_wait_log = None
        self.warmup_batch_sizes = tuple(warmup_batch_sizes)
        self.on_load = on_load
        self.index_table = index_table
        self.max_decoded_bytes = max_decoded_bytes
        self._current = None
        self._failed = {}  # version -> {"fingerprint", "error", "code"} of its last failed load or refusal
        self._changed = {}  # failed version -> its new fingerprint, seen once (retried when seen twice in a row)
        self._incomplete = {}  # version -> the reason last logged (logged once per reason)
        self._loading = None
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self.swaps = 0
        self.release_memory = release_memory
        self._released = []  # weak references to swapped-out versions not freed yet
        self.memory_releases = 0
        self._release_polls = 0

    # -- requests ---------------------------------------------------------------------
    def get(self, name, version=None):
        """The served `LoadedModel` for a request; `NotFound` for another name or a version not served."""
        if name != self.name:
            raise NotFound(f"model {name!r} is not served here (serving {self.name!r})")
        model = self._current
        if model is None:
            raise Unavailable(f"model {self.name!r} has no loaded version yet (base path {self.base_path})")
        if version is not None and int(version) != model.version:
            raise NotFound(f"model {self.name!r} version {version} is not served (serving version {model.version})")
        return model

    @property
    def current(self):
        return self._current

    # -- versions -------------------------------------------------------------------------
    def poll(self):
        """Loads and swaps in the target version if it differs from the served one; True if it swapped."""
        with self._poll_lock:
            self._release_swapped_out()
            dirs = version_dirs(self.base_path)
            current = self._current
            for version in sorted(dirs, reverse=True):
                path = dirs[version]
                if current is not None and version == current.version:
                    return False
                failed = self._failed.get(version)
                fingerprint = dir_fingerprint(path)
                if failed is not None and not self._retry(version, path, failed, fingerprint):
                    continue
                reason = incomplete_reason(path)
                if reason is not None:
                    if self._incomplete.get(version) == reason:
                        continue
                    self._incomplete[version] = reason
                    logging.info("model %s: version dir %s is not a complete SavedModel (%s); not loaded",
                                 self.name, path, reason)
                    continue
                model = self._load(version, path, fingerprint)
                if model is None:
                    continue
                self._current = model  # the swap: one reference assignment
                self.swaps += 1
                if current is not None:
                    self._released.append(weakref.ref(current))
                logging.info("model %s: now serving version %d (%s)%s", self.name, version, path,
                                f", was {current.version}" if current is not None else "")
                return True
            return False

    def _release_swapped_out(self):
        """Once every swapped-out version is freed (in-flight requests done, cycles collected), `release_memory`."""
        if not self._released:
            return
        gc.collect()
        self._released = [ref for ref in self._released if ref() is not None]
        self._release_polls += 1
        if not self._released:
            self._release_polls = 0
            self.memory_releases += 1
            if self.release_memory is not None:
                self.release_memory()
        elif self._release_polls >= 60:  # something still holds it: stop collecting every poll
            logging.warning("model %s: a swapped-out version is still referenced after %d polls; its memory is not "
                            "released", self.name, self._release_polls)
            self._released, self._release_polls = [], 0

    def _retry(self, version, path, failed, fingerprint):
        """Whether a version that failed (or was refused) is tried again: only once its directory's content changed
        (`dir_fingerprint`) and then stayed the same for one more poll, so a repair being copied in is not loaded
        half-way and an untouched broken version costs one `os.stat` a file per poll, never a load."""
        if fingerprint == failed["fingerprint"]:
            self._changed.pop(version, None)
            return False
        if self._changed.get(version) != fingerprint:
            self._changed[version] = fingerprint
            logging.info("model %s: version dir %s changed since it failed; retried if it stays unchanged until the "
                         "next poll", self.name, path)
            return False
        self._changed.pop(version, None)
        logging.info("model %s: retrying version %d (%s): its directory changed since it failed", self.name, version,
                     path)
        return True

    def _load(self, version, path, fingerprint):
        self._loading = version
        t0 = time.perf_counter()
        try:
            if self.index_table is not None:
                refused = vector_mismatch(path, _read_signature_defs(path), self.index_table)
                if refused:
                    raise FailedPrecondition(refused)
            model = LoadedModel(self.name, version, path)
            has_file = os.path.exists(model.warmup_file)
            calls = model.warmup(self.warmup_batch_sizes, self.max_decoded_bytes)
            if self.on_load is not None:
                self.on_load(model)
        except Exception as e:  # any load/warm-up failure rejects this version only
            refused = isinstance(e, FailedPrecondition)
            message = str(e) if refused else f"{type(e).__name__}: {e}"
            self._failed[version] = {"fingerprint": fingerprint, "error": message[:2000],
                                     "code": "FAILED_PRECONDITION" if refused else "UNKNOWN"}
            current = self._current
            keeps = f"; version {current.version} keeps serving" if current is not None else ""
            logging.error("model %s: version %d at %s %s and is skipped%s: %s", self.name, version, path,
                          "was refused" if refused else "failed to load", keeps, message[:2000])
            return None
        finally:
            self._loading = None
        self._failed.pop(version, None)
        how = (f"{calls} record(s) of {model.warmup_file}" if has_file else
               f"{calls} zero-input call(s): the version has no {model.warmup_file}")
        logging.info("model %s: version %d loaded and warmed up with %s in %.2f s", self.name, version, how,
                     time.perf_counter() - t0)
        return model

    def status(self):
        """`[{version, state, error, code}]` (TF Serving's model version status): the served version AVAILABLE,
        failed or refused versions END with their error; `code` names the error (a `tensorflow.error.Code`: OK,
        UNKNOWN for a load failure, FAILED_PRECONDITION for a version refused by the index-table check)."""
        out = []
        current, loading = self._current, self._loading
        if current is not None:
            out.append({"version": current.version, "state": "AVAILABLE", "error": "", "code": "OK"})
        if loading is not None:
            out.append({"version": loading, "state": "LOADING", "error": "", "code": "OK"})
        for version, failed in sorted(self._failed.items()):
            out.append({"version": version, "state": "END", "error": failed["error"], "code": failed["code"]})
        return out

    def waiting_message(self):
        """What the watcher sees while no version is served: one line naming the base path and what it expects."""
        base = self.base_path
        expect = f"expecting {os.path.join(base, '<version>', 'saved_model.pb')} (<version> a positive integer)"
        every = f"polling every {self.poll_interval_s:g} s"
        if not os.path.exists(base):
            return (f"model {self.name}: waiting for a first version: the base path {base} does not exist (yet); "
                    f"{expect}; {every}")
        if not os.path.isdir(base):
            return f"model {self.name}: waiting for a first version: the base path {base} is not a directory; {expect}"
        dirs = version_dirs(base)
        if not dirs:
            return (f"model {self.name}: waiting for a first version: no version directory in {base} yet; "
                    f"{expect}; {every}")
        why = []
        for version in sorted(dirs, reverse=True)[:5]:
            failed = self._failed.get(version)
            if failed:
                reason = failed["error"][:300] if failed["code"] == "FAILED_PRECONDITION" else \
                    f"failed to load: {failed['error'][:200]}"
            else:
                reason = incomplete_reason(dirs[version])
            why.append(f"{version} ({reason or 'not loaded yet'})")
        more = f" and {len(dirs) - 5} more" if len(dirs) > 5 else ""
        return (f"model {self.name}: waiting for a first version: no loadable version in {base}: "
                f"{', '.join(why)}{more}; {expect}; {every}")

    def _log_waiting(self, force=False):
        """Logs `waiting_message()` at INFO when no version is served, at most once per `wait_log_interval_s`."""
        if self._current is not None:
            return
        now = time.monotonic()
        if force or self._last_wait_log is None or now - self._last_wait_log >= self.wait_log_interval_s:
            self._last_wait_log = now
            logging.info("%s", self.waiting_message())

    # -- watcher thread -------------------------------------------------------------------------
    def start(self):
        """Polls once (synchronously), then keeps polling in a daemon thread every `poll_interval_s`."""
        self.poll()
        self._log_waiting(force=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name=f"model-watcher-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll()
                self._log_waiting()
            except Exception:  # a failing poll (e.g. the base path unreadable) must not kill the watcher
                logging.exception("model %s: polling %s failed", self.name, self.base_path)

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
