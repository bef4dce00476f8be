"""The ranking call: ids in, the CTR model's inputs filled from the index table and the catalogue, scores out.

A rank request holds ids only — the candidate item ids, the user's behaviour history (item ids, oldest
first, as in the datasets), and the user/context features the model reads (e.g. `user_id`,
`user_profile_<i>`, by their FeatureSpec names). The server builds one batch with one row per candidate:

  * candidate ids → the target-item id input (`item_id`); item-side id features (`category_id`,
    `brand_id`, ... every `item` feature of the FeatureSpec) → the **catalogue**, the dataset's
    `items.parquet` loaded at start-up (columns named like the features); a request may override them
    per candidate (`candidate_features`), e.g. for items newer than the loaded catalogue;
  * history ids → the last S ids, left-padded with the padding id (the datasets' layout); history-side
    features (`hist_category_id`, ...) come from the catalogue column of the item feature that shares
    their embedding table, and are the padding id on padded slots;
  * user/context features → the request value, repeated on every row;
  * multimodal vectors → the **index table** (`get_many(ids) -> (vectors, found)`, one call per request
    for the unique candidate and history ids): `item_vector` [N, D], `hist_item_vector` [N, S, D]
    (the history is fetched once; the [N, S, ...] inputs are broadcast views, copied once into tensors).

A version exported with its FeatureSpec has the `user_candidates` signature: ranking then uses it, and the
history-side and user/context inputs are given once (batch 1) and broadcast by the model — same scores, less
work.

Fallbacks (the same conventions as training, `mm_ads.data.pipeline.VectorJoin`): an item without a vector
in the index table gets a zero vector and `<vector>_missing` = 1 (the model was trained with these flags
and excludes such history items from SimTier/MAKE); padded history slots get a zero vector with the flag
0. An item not in the catalogue gets the padding id (0) for its item-side features. Each case is counted
in the server stats (`candidates_unknown`, `history_unknown`, `catalogue_unknown`).
"""

import dataclasses
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf

from mm_ads.data.spec import HIST_ITEM_ID, ITEM_ID, ITEM_VECTOR, missing_flag_name, modality_feature_names
from mm_ads.export.saved_model import USER_SIGNATURE
from mm_ads.serving.index.modalities import tables_by_modality
from mm_ads.serving.server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from mm_ads.serving.server.stats import ServingStats

RANK_SIGNATURE = "rank"


class Catalogue:
    """Item-side id features by item id (the dataset's `items.parquet`), looked up with one `searchsorted`.

    Args:
        item_ids: int64 [M], unique.
        columns: `{feature name: int64 [M]}`.
    """

    def __init__(self, item_ids, columns, path=None):
        item_ids = np.asarray(item_ids, np.int64)
        order = np.argsort(item_ids, kind="stable")
        self.item_ids = item_ids[order]
        if len(self.item_ids) > 1 and np.any(self.item_ids[1:] == self.item_ids[:-1]):
            dup = int(self.item_ids[1:][self.item_ids[1:] == self.item_ids[:-1]][0])
            raise ValueError(f"catalogue {path or ''}: item_id {dup} appears more than once")
        self.columns = {k: np.asarray(v, np.int64)[order] for k, v in columns.items()}
        self.path = path

    def __len__(self):
        return len(self.item_ids)

    @classmethod
    def load(cls, path, columns=None, id_column=ITEM_ID):
        """Reads `id_column` and the int columns `columns` (default: every integer column) of a Parquet file."""
        try:
            table = pq.read_table(path, columns=None if columns is None else [id_column] + list(columns))
        except FileNotFoundError:
            raise FileNotFoundError(f"catalogue {path} does not exist") from None
        except Exception as e:  # pyarrow raises ArrowInvalid / KeyError for absent columns
            raise ValueError(f"catalogue {path}: cannot read columns {columns} ({e})") from e
        if id_column not in table.column_names:
            raise ValueError(f"catalogue {path} has no {id_column!r} column; it has {table.column_names}")
        cols = {}
        for name in table.column_names:
            if name == id_column:
                continue
            arr = table.column(name)
            if not pa.types.is_integer(arr.type):
                if columns is not None:
                    raise ValueError(f"catalogue {path}: column {name!r} is {arr.type}, expected integers")
                continue
            if arr.null_count:
                raise ValueError(f"catalogue {path}: column {name!r} has {arr.null_count} nulls")
            cols[name] = arr.to_numpy()
        return cls(table.column(id_column).to_numpy(), cols, path)

    def lookup(self, ids, names):
        """ids int64 [...] → (`{name: int64 [...]}` with 0 for unknown ids, found bool [...])."""
        ids = np.asarray(ids, np.int64)
        if not len(self.item_ids):
            return {n: np.zeros(ids.shape, np.int64) for n in names}, np.zeros(ids.shape, bool)
        pos = np.clip(np.searchsorted(self.item_ids, ids), 0, len(self.item_ids) - 1)
        found = self.item_ids[pos] == ids
        return {n: np.where(found, self.columns[n][pos], 0) for n in names}, found


class VectorCache:
    """A read-through cache in front of an index table's `get_many`, for the vectors of found items only.

    Hits skip the index-table round trip (an SQLite `get_many` of 250 ids costs ~0.7 ms). Only found items
    are cached, so an item whose vector arrives in the table is seen on the next request; a vector rewritten
    under the same id is seen after at most `ttl_s`. When the cache holds `max_items` and needs room, the
    oldest half (by first insertion) is dropped.

    The vectors live in one `[max_items, D]` float32 array (pages are committed as slots are used) and a dict
    maps an id to its slot, so a lookup is one pass over the ids and one gather (~0.1 ms for 250 ids).

    Args:
        index_table: an object with `get_many(ids) -> (float32 [N, D], bool [N])` and `dim`.
        max_items: the cache size bound (vectors), >= 1.
        ttl_s: how long a cached vector is used.
        clock: time source (seconds), for tests.
    """

    def __init__(self, index_table, max_items=100_000, ttl_s=1.0, clock=None):
        import threading
        import time

        if int(max_items) < 1:
            raise ValueError(f"VectorCache: max_items must be >= 1, got {max_items}")
        self.index_table = index_table
        self.dim = int(index_table.dim)
        self.max_items = int(max_items)
        self.ttl_s = float(ttl_s)
        self._clock = clock or time.monotonic
        self._slots = {}  # id -> slot, in insertion order (oldest first)
        self._vectors = np.zeros((self.max_items, self.dim), np.float32)
        self._expiry = np.zeros(self.max_items)
        self._free = list(range(self.max_items - 1, -1, -1))  # free slots (pop() takes the lowest)
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self):
        return len(self._slots)

    def get_many(self, item_ids):
        ids = np.asarray(item_ids, np.int64).reshape(-1)
        n = len(ids)
        now = self._clock()
        out = np.zeros((n, self.dim), np.float32)
        with self._lock:  # a slot may be reused by a writer: map and gather under the lock
            slots = np.fromiter((self._slots.get(i, -1) for i in ids.tolist()), np.int64, count=n)
            hit = slots >= 0
            hit[hit] = self._expiry[slots[hit]] > now
            out[hit] = self._vectors[slots[hit]]
            self.hits += int(hit.sum())
            self.misses += int(n - hit.sum())
        found = hit
        todo = np.flatnonzero(~hit)
        if len(todo):
            vecs, ok = self.index_table.get_many(ids[todo])
            vecs = np.asarray(vecs, np.float32)
            ok = np.asarray(ok, bool)
            out[todo] = vecs
            found[todo] = ok
            expiry = now + self.ttl_s
            with self._lock:
                for i, v in zip(ids[todo][ok].tolist(), vecs[ok]):
                    slot = self._slots.get(i)
                    if slot is None:
                        if not self._free:
                            self._evict_oldest_half()
                        slot = self._free.pop()
                        self._slots[i] = slot
                    self._vectors[slot] = v
                    self._expiry[slot] = expiry
        return out, found

    def _evict_oldest_half(self):
        for key in list(itertools.islice(self._slots, max(1, self.max_items // 2))):
            self._free.append(self._slots.pop(key))

    def close(self):
        self.index_table.close()


@dataclasses.dataclass
class RankRequest:
    """Ids of one ranking call (see the module docstring)."""

    candidates: np.ndarray  # int64 [N]
    history: np.ndarray  # int64 [k], oldest first
    features: dict  # {user/context feature: int}
    candidate_features: dict = dataclasses.field(default_factory=dict)  # {item-side feature: int64 [N]}

    @classmethod
    def from_json(cls, body):
        """From the REST body `{"candidates": [...], "history": [...], "user_id": u, "features": {...},
        "candidate_features": {...}}` (`user_id` is shorthand for `features["user_id"]`)."""
        if not isinstance(body, dict):
            raise InvalidArgument("rank request body must be a JSON object")
        unknown = sorted(set(body) - {"candidates", "history", "user_id", "features", "candidate_features"})
        if unknown:
            raise InvalidArgument(f"rank request has unknown key(s) {unknown}; expected candidates, history, "
                                  "user_id, features, candidate_features")
        if "candidates" not in body:
            raise InvalidArgument("rank request: 'candidates' (a list of item ids) is required")
        features = body.get("features", {})
        if not isinstance(features, dict):
            raise InvalidArgument("rank request: 'features' must be an object {feature name: id}")
        features = dict(features)
        if "user_id" in body:
            features["user_id"] = body["user_id"]
        cand_feats = body.get("candidate_features", {})
        if not isinstance(cand_feats, dict):
            raise InvalidArgument("rank request: 'candidate_features' must be an object {feature name: [ids]}")
        return cls(_id_array(body["candidates"], "candidates"), _id_array(body.get("history", []), "history"),
                   {k: _id_scalar(v, f"features.{k}") for k, v in features.items()},
                   {k: _id_array(v, f"candidate_features.{k}") for k, v in cand_feats.items()})

    @classmethod
    def from_tensors(cls, arrays, layout):
        """From the inputs of a Predict call on the `rank` signature (named after the model's features)."""
        arrays = dict(arrays)
        for name, value in arrays.items():
            if value.dtype.kind not in "iu":
                raise InvalidArgument(f"rank input {name!r}: expected int64 ids, got {value.dtype}")
        if layout.candidate not in arrays:
            raise InvalidArgument(f"rank: input {layout.candidate!r} (the candidate item ids) is required")
        candidates = _squeeze(arrays.pop(layout.candidate), layout.candidate, 1)
        history = _squeeze(arrays.pop(layout.history), layout.history, 1) if layout.history in arrays else \
            np.zeros(0, np.int64)
        features, cand_feats = {}, {}
        for name, value in arrays.items():
            if name in layout.request_features:
                flat = _squeeze(value, name, 0)
                features[name] = int(flat)
            elif name in layout.item_side:
                cand_feats[name] = _squeeze(value, name, 1)
            else:
                raise InvalidArgument(f"rank: unknown input {name!r}; expected {layout.rank_input_names()}")
        return cls(candidates.astype(np.int64), history.astype(np.int64), features,
                   {k: v.astype(np.int64) for k, v in cand_feats.items()})


def _squeeze(value, name, rank):
    value = np.asarray(value)
    while value.ndim > rank and value.shape[0] == 1:
        value = value[0]
    if value.ndim != rank:
        raise InvalidArgument(f"rank input {name!r}: expected {'a scalar' if rank == 0 else 'a vector of ids'}, "
                              f"got shape {list(np.shape(value))}")
    return value


def _id_array(value, name):
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InvalidArgument(f"rank request: {name!r} must be a list of integer ids")
    try:
        return np.asarray(value, np.int64).reshape(-1)
    except OverflowError:
        raise InvalidArgument(f"rank request: {name!r} has an id outside int64") from None


def _id_scalar(value, name):
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"rank request: {name!r} must be an integer id, got {value!r}")
    return value


@dataclasses.dataclass
class RankResult:
    """Scores in candidate order, the vector-found mask, and the candidate indices by descending score."""

    version: int
    scores: np.ndarray  # float32 [N]
    found: np.ndarray  # bool [N]: the candidate's vector was in the index table
    order: np.ndarray  # int64 [N]: argsort of -scores (stable)

    def to_json(self, candidates, name):
        return {
            "model_spec": {"name": name, "version": str(self.version)},
            "model_version": str(self.version),
            "scores": self.scores.tolist(),
            "found": self.found.tolist(),
            "ranking": np.asarray(candidates)[self.order].tolist(),
        }


def signature_modalities(inputs):
    """`[(modality, target vector input, history vector input or None, dim)]` of a signature's inputs: `item_vector`
    (the single unnamed modality "") or `item_vector_<m>` per modality m (`mm_ads.data.spec.modality_feature_names`),
    with `hist_item_vector[_<m>]` when the signature takes it."""
    prefix = ITEM_VECTOR + "_"
    names = [""] if ITEM_VECTOR in inputs else []
    names += sorted(n[len(prefix):] for n in inputs if n.startswith(prefix) and not n.endswith("_missing"))
    out = []
    for m in names:
        item, hist = modality_feature_names(m)
        out.append((m, item, hist if hist in inputs else None, int(inputs[item].shape[-1])))
    return out


class RankLayout:
    """Where each input of a model's signature comes from in a ranking call.

    Args:
        spec: the dataset's `FeatureSpec` (roles, tables, padding ids).
        signature: the served `Signature`.
    """

    def __init__(self, spec, signature):
        inputs = signature.inputs
        self.inputs = inputs
        spec_modalities = [m for m in spec.modalities() if m.item is not None and m.history is not None]
        self.candidate = spec[spec_modalities[0].item].source if spec_modalities else ITEM_ID
        self.history = spec[spec_modalities[0].history].source if spec_modalities else HIST_ITEM_ID
        for name in (self.candidate, self.history):
            if name not in spec:
                raise FailedPrecondition(f"ranking: the FeatureSpec has no {name!r} feature")
        self.seq_len = spec.seq_len
        self.signature_name = signature.name
        self.shared_user = signature.name == USER_SIGNATURE  # the user side once, batch 1
        self.padding_id = spec[self.history].padding_id
        # the vector inputs by modality: `[(modality, target vector input, history vector input or None, dim)]`
        self.modalities = signature_modalities(inputs)
        self.vectors = [n for _, item, hist, _ in self.modalities for n in (item, hist) if n is not None]
        self.dim = self.modalities[0][3] if self.modalities else None
        items_by_table = {}
        for f in spec.by_role("item"):
            items_by_table.setdefault(f.table, f.name)
        self.item_side, self.history_side, self.request_features = {}, {}, []
        derived = {self.candidate, self.history} | {n for v in self.vectors for n in (v, missing_flag_name(v))}
        for name, tspec in inputs.items():
            if name in derived:
                continue
            if name not in spec:
                raise FailedPrecondition(f"ranking: model input {name!r} is not in the FeatureSpec")
            f = spec[name]
            if f.role == "item":
                self.item_side[name] = name
            elif f.role == "history":
                if f.table not in items_by_table:
                    raise FailedPrecondition(f"ranking: history input {name!r} (table {f.table!r}) has no item "
                                             "feature with the same table to look up in the catalogue")
                self.history_side[name] = items_by_table[f.table]
            elif f.role in ("user", "context"):
                self.request_features.append(name)
            else:
                raise FailedPrecondition(f"ranking: model input {name!r} has role {f.role!r}")
            if tspec.dtype != tf.int64:
                raise FailedPrecondition(f"ranking: model input {name!r} is {tspec.dtype.name}, expected int64")

    def catalogue_columns(self):
        return sorted(set(self.item_side.values()) | set(self.history_side.values()))

    def rank_input_names(self):
        return [self.candidate, self.history] + sorted(self.request_features) + sorted(self.item_side)

    def signature_def(self):
        """A `SignatureDef` describing the `rank` signature (for GetModelMetadata)."""
        from tensorflow.core.framework import tensor_shape_pb2, types_pb2
        from tensorflow.core.protobuf import meta_graph_pb2

        def info(name, dims, dtype=types_pb2.DT_INT64):
            shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d)
                                                            for d in dims])
            return meta_graph_pb2.TensorInfo(name=name, dtype=dtype, tensor_shape=shape)

        sig = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
        sig.inputs[self.candidate].CopyFrom(info(self.candidate, [-1]))
        sig.inputs[self.history].CopyFrom(info(self.history, [-1]))
        for name in self.request_features:
            sig.inputs[name].CopyFrom(info(name, []))
        for name in self.item_side:
            sig.inputs[name].CopyFrom(info(name, [-1]))
        sig.outputs["ctr"].CopyFrom(info("ctr", [-1], types_pb2.DT_FLOAT))
        sig.outputs["found"].CopyFrom(info("found", [-1], types_pb2.DT_BOOL))
        return sig


class Ranker:
    """Builds the model inputs of a `RankRequest` and scores it (see the module docstring).

    Args:
        spec: the dataset's `FeatureSpec`.
        index_table: an object with `get_many(ids) -> (float32 [N, D], bool [N])` and `dim`
            (`mm_ads.serving.index.index_table.IndexTable`), or None (then every vector is missing).
        catalogue: a `Catalogue`, or None (item-side features must then come with the request).
        max_candidates: the request size limit.
        stats: the server's `ServingStats`.
        signature_name: the model signature ranking calls.
    """

    def __init__(self, spec, index_table=None, catalogue=None, max_candidates=1000, stats=None,
                 signature_name="serving_default"):
        self.spec = spec
        self.index_table = index_table
        self.catalogue = catalogue
        self.max_candidates = int(max_candidates)
        self.stats = stats if stats is not None else ServingStats()
        self.signature_name = signature_name

    def signature_for(self, model):
        """The signature a ranking call uses on `model`: `user_candidates` (the user side once, batch 1) when
        the version has it and the ranker was not told otherwise, else `signature_name`."""
        if self.signature_name == "serving_default" and USER_SIGNATURE in model.signatures:
            return USER_SIGNATURE
        return self.signature_name

    def layout(self, model):
        """The `RankLayout` of a loaded version (built once per version, checked against the index table)."""
        layout = model.cache.get("rank_layout")
        if layout is None:
            layout = RankLayout(self.spec, model.signature(self.signature_for(model)))
            tables = tables_by_modality(self.index_table)
            for modality, _, _, dim in layout.modalities if tables else ():
                what = f" of the modality {modality!r}" if modality else ""
                if modality not in tables:
                    raise FailedPrecondition(f"ranking: model version {model.version} reads vectors{what}, but the "
                                             f"server has index tables for {sorted(tables)}")
                if int(tables[modality].dim) != dim:
                    raise FailedPrecondition(f"ranking: the index table{what} has dim {tables[modality].dim}, model "
                                             f"version {model.version} expects vectors of dim {dim}")
            missing = [c for c in layout.catalogue_columns()
                       if self.catalogue is not None and c not in self.catalogue.columns]
            if missing:
                raise FailedPrecondition(f"ranking: the catalogue {self.catalogue.path} has no column(s) {missing}")
            model.cache["rank_layout"] = layout
        return layout

    def build_inputs(self, model, request, count=True):
        """(`{input: array or tensor}` of the model's signature, candidate found mask bool [N]).

        `count`: add the request to the stats (False for warm-up calls).
        """
        layout = self.layout(model)
        cands, hist = request.candidates, request.history
        n = len(cands)
        if n == 0:
            raise InvalidArgument("rank request: 'candidates' is empty")
        if n > self.max_candidates:
            raise ResourceExhausted(f"rank request: {n} candidates, the limit is {self.max_candidates}")
        # ids are any int64 (hashed ids may be negative) except the padding id
        for what, ids in (("candidates", cands), ("history", hist)):
            if np.any(ids == layout.padding_id):
                bad = int(np.argmax(ids == layout.padding_id))
                raise InvalidArgument(f"rank request: {what}[{bad}] is {layout.padding_id}, the padding id, not an "
                                      "item id")
        missing = sorted(set(layout.request_features) - set(request.features))
        if missing:
            raise InvalidArgument(f"rank request: missing feature(s) {missing} (user/context features the model "
                                  f"reads; give them in 'features')")
        unknown = sorted(set(request.features) - set(layout.request_features))
        if unknown:
            raise InvalidArgument(f"rank request: unknown feature(s) {unknown}; the model reads "
                                  f"{sorted(layout.request_features)}")
        unknown = sorted(set(request.candidate_features) - set(layout.item_side))
        if unknown:
            raise InvalidArgument(f"rank request: unknown candidate feature(s) {unknown}; item-side features are "
                                  f"{sorted(layout.item_side)}")
        for name, values in request.candidate_features.items():
            if len(values) != n:
                raise InvalidArgument(f"rank request: candidate_features.{name} has {len(values)} values for "
                                      f"{n} candidates")
        s = layout.seq_len
        hist = hist[-s:]
        k = len(hist)
        hist_row = np.full(s, layout.padding_id, np.int64)
        hist_row[s - k:] = hist
        # user side: once (the `user_candidates` signature) or repeated on every candidate's row (read-only
        # broadcast views: converting them to tensors is the one copy)
        rows = 1 if layout.shared_user else n
        inputs = {}
        if layout.candidate in layout.inputs:
            inputs[layout.candidate] = cands
        if layout.history in layout.inputs:
            inputs[layout.history] = np.broadcast_to(hist_row, (rows, s))
        for name, value in request.features.items():
            inputs[name] = np.full(rows, value, np.int64)
        # catalogue: item-side features of candidates (unless given) and history-side features
        need_cand = [c for c in layout.item_side if c not in request.candidate_features]
        need_hist = sorted(set(layout.history_side.values()))
        cat_unknown = 0
        if need_cand or need_hist:
            if self.catalogue is None:
                raise FailedPrecondition(f"ranking: no catalogue is loaded, so item feature(s) "
                                         f"{need_cand or need_hist} must come with the request "
                                         "(candidate_features)")
            if need_cand:
                cols, found_c = self.catalogue.lookup(cands, need_cand)
                inputs.update(cols)
                cat_unknown += int(n - found_c.sum())
            if need_hist:
                cols, found_h = self.catalogue.lookup(hist, need_hist)
                cat_unknown += int(k - found_h.sum())
                for name, column in layout.history_side.items():
                    row = np.full(s, layout.padding_id, np.int64)
                    row[s - k:] = cols[column]
                    inputs[name] = np.broadcast_to(row, (rows, s))
        inputs.update(request.candidate_features)
        # multimodal vectors: one index-table call per modality for the unique ids of candidates and history
        found = np.ones(n, bool)
        cand_unknown = hist_unknown = 0
        per_modality = {}
        if layout.modalities:
            tables = tables_by_modality(self.index_table)
            uniq, inverse = np.unique(np.concatenate([cands, hist]), return_inverse=True)
            cand_rows, hist_rows = inverse[:n], inverse[n:]
            any_missing_cand, any_missing_hist = np.zeros(n, bool), np.zeros(k, bool)
            for modality, item_input, hist_input, d in layout.modalities:
                table = tables.get(modality)
                if table is not None:
                    vecs, ok = table.get_many(uniq)
                    vecs = np.asarray(vecs, np.float32)
                    ok = np.asarray(ok, bool)
                    if vecs.shape != (len(uniq), d):
                        raise FailedPrecondition(f"index table returned vectors of shape {list(vecs.shape)} for "
                                                 f"{len(uniq)} ids of dim {d}")
                    cand_vec, cand_found = vecs[cand_rows], ok[cand_rows]
                    hist_vec = np.zeros((s, d), np.float32)
                    hist_vec[s - k:] = vecs[hist_rows]
                    hist_found = ok[hist_rows]
                else:  # no index table: every vector is missing (the model's fallback)
                    cand_vec, cand_found = np.zeros((n, d), np.float32), np.zeros(n, bool)
                    hist_vec = np.zeros((s, d), np.float32)
                    hist_found = np.zeros(k, bool)
                hist_missing = np.zeros(s, np.float32)
                hist_missing[s - k:] = (~hist_found).astype(np.float32)
                found &= cand_found
                any_missing_cand |= ~cand_found
                any_missing_hist |= ~hist_found
                if modality:  # a missing modality is the fallback of that modality alone, counted on its own
                    per_modality[f"candidates_unknown_{modality}"] = int(n - cand_found.sum())
                    per_modality[f"history_unknown_{modality}"] = int(k - hist_found.sum())
                inputs[item_input] = cand_vec
                inputs[missing_flag_name(item_input)] = (~cand_found).astype(np.float32)
                if hist_input is not None:
                    # the repeated view costs one copy (~0.25 ms for 200 × 50 × 128; a tf.broadcast_to op measured
                    # 2-3× slower)
                    inputs[hist_input] = np.broadcast_to(hist_vec, (rows, s, d))  # [N or 1, S, D]
                    inputs[missing_flag_name(hist_input)] = np.broadcast_to(hist_missing, (rows, s))
            cand_unknown, hist_unknown = int(any_missing_cand.sum()), int(any_missing_hist.sum())
        else:
            found = np.zeros(n, bool)
        if count:
            self.stats.add(rank_requests=1, candidates=n, candidates_unknown=cand_unknown, history_items=k,
                           history_unknown=hist_unknown, catalogue_unknown=cat_unknown, **per_modality)
        return inputs, found

    def rank(self, model, request, count=True):
        """Scores a `RankRequest` with a `LoadedModel`; returns a `RankResult`."""
        inputs, found = self.build_inputs(model, request, count)
        out = model.predict(inputs, self.layout(model).signature_name, check=False)
        scores = np.asarray(out["ctr"], np.float32).reshape(-1)
        return RankResult(model.version, scores, found, np.argsort(-scores, kind="stable"))
