"""FeatureSpec: the single source of truth for feature names, dtypes and shapes.

Every dataset directory carries its spec inside `manifest.json`; readers write it,
tf.data pipelines parse records with it, models build their inputs from it and
exported SavedModels name their serving inputs after it.

Roles:
  * `user`    — user-side ids (user id, profile ids), scalar int64.
  * `item`    — target-item ids (item id, category, brand), scalar int64.
  * `history` — behaviour-sequence ids, int64 `[S]`, padded with `padding_id`.
  * `context` — other scalar ids (e.g. hour of day), scalar int64.
  * `meta`    — values kept for slicing/evaluation, never fed to a model
                (impression time, item creation time), scalar int64.
  * `label`   — the click label, scalar float32.
  * `vector`  — multimodal vectors joined from an item→vector table at input
                time (not stored in the records): `[D]` for the target item,
                `[S, D]` for the history; `source` names the id feature joined.

Id features name an embedding `table`; features that share a table share their
embedding rows (target item and history items share the item table). A table's
`id_mapping` says how its ids become rows: "dense" (the ids are row numbers `[0, num_buckets)`,
e.g. `1..N` with 0 for padding: the synthetic world, MovieLens) or "hash" (raw ids of any
value, hashed into the rows by the model: Taobao-MM).
"""

import dataclasses
import json
from typing import Any

ROLES = ("user", "item", "history", "context", "meta", "label", "vector")
# Roles of the features that describe the user (and the request), not a candidate: `FeatureSpec.user_side_inputs`.
USER_SIDE_ROLES = ("user", "context", "history")
DTYPES = ("int64", "float32", "int8")
ID_MAPPINGS = ("dense", "hash")  # the values of `mm_ads.layers.SparseEmbedding(id_mapping=...)`

# Conventional names used by the built-in readers and the synthetic world.
ITEM_ID = "item_id"
HIST_ITEM_ID = "hist_item_id"
LABEL = "label"
TIMESTAMP = "timestamp"
ITEM_CREATED_AT = "item_created_at"
ITEM_VECTOR = "item_vector"
HIST_ITEM_VECTOR = "hist_item_vector"


def missing_flag_name(vector_feature_name):
    """Name of the float32 flag (1.0 = no vector found) that goes with a vector feature."""
    return vector_feature_name + "_missing"


@dataclasses.dataclass(frozen=True)
class Feature:
    """One feature of a dataset.

    Args:
        name: feature name, also the serving-signature input name.
        role: one of `ROLES`.
        dtype: one of `DTYPES`.
        shape: per-example shape: `()` scalar, `(S,)` history, `(D,)` / `(S, D)` vectors.
        table: embedding table of an id feature (`user`/`item`/`history`/`context`).
        num_buckets: number of rows of that table (ids are bucketed into it).
        padding_id: for `history` features, the id that marks an empty slot.
        source: for `vector` features, the id feature whose vectors are joined.
        id_mapping: for id features, how ids become rows of the table (`ID_MAPPINGS`): "dense" (ids are
            rows; the default, left out of the JSON) or "hash" (raw ids, hashed by the model).
    """

    name: str
    role: str
    dtype: str = "int64"
    shape: tuple = ()
    table: str | None = None
    num_buckets: int | None = None
    padding_id: int = 0
    source: str | None = None
    id_mapping: str = "dense"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"Feature name must be a non-empty identifier, got {self.name!r}")
        if self.id_mapping not in ID_MAPPINGS:
            raise ValueError(f"Feature {self.name!r}: id_mapping must be one of {ID_MAPPINGS}, got {self.id_mapping!r}")
        if self.role not in ROLES:
            raise ValueError(f"Feature {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Feature {self.name!r}: dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.is_id:
            if self.dtype != "int64":
                raise ValueError(f"Id feature {self.name!r} must be int64, got {self.dtype!r}")
            if not self.table:
                raise ValueError(f"Id feature {self.name!r} needs a `table`")
            if self.num_buckets is None or self.num_buckets < 1:
                raise ValueError(
                    f"Id feature {self.name!r} needs num_buckets >= 1, got {self.num_buckets!r}"
                )
        expected_rank = {"history": 1, "label": 0, "meta": 0, "user": 0, "item": 0, "context": 0}
        if self.role in expected_rank and len(self.shape) != expected_rank[self.role]:
            raise ValueError(
                f"Feature {self.name!r} with role {self.role!r} must have rank "
                f"{expected_rank[self.role]}, got shape {self.shape}"
            )
        if self.role == "vector":
            if not self.source:
                raise ValueError(f"Vector feature {self.name!r} needs a `source` id feature")
            if len(self.shape) not in (1, 2):
                raise ValueError(f"Vector feature {self.name!r} must be [D] or [S, D], got {self.shape}")
        if self.role == "label" and self.dtype != "float32":
            raise ValueError(f"Label {self.name!r} must be float32, got {self.dtype!r}")

    @property
    def is_id(self):
        return self.role in ("user", "item", "history", "context")

    @property
    def stored(self):
        """Whether the feature is stored in the records (vectors are joined at input time)."""
        return self.role != "vector"

    def to_json(self):
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape)
        if self.id_mapping == "dense":  # the default: specs written before the field existed read the same
            del out["id_mapping"]
        return {k: v for k, v in out.items() if v is not None}


class FeatureSpec:
    """An ordered, validated set of `Feature`s with the sequence length and vector dim.

    Args:
        features: the features, in a fixed order.
        seq_len: behaviour-sequence length S (history features have shape `[S]`).
        vector_dim: multimodal vector dimension D (0 when the dataset has no vectors).

    Example:

    >>> spec = FeatureSpec.default(seq_len=4, vector_dim=8, num_items=100,
    ...                            num_categories=5, num_brands=7, num_users=10)
    >>> spec[ITEM_ID].table
    'item'
    >>> spec.to_json() == FeatureSpec.from_json(spec.to_json()).to_json()
    True
    """

    def __init__(self, features, seq_len, vector_dim):
        self.features = tuple(features)
        self.seq_len = int(seq_len)
        self.vector_dim = int(vector_dim)
        self._by_name = {}
        for f in self.features:
            if f.name in self._by_name:
                raise ValueError(f"Duplicate feature name {f.name!r} in FeatureSpec")
            self._by_name[f.name] = f
        self.validate()

    # -- validation -------------------------------------------------------------
    def validate(self):
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.vector_dim < 0:
            raise ValueError(f"vector_dim must be >= 0, got {self.vector_dim}")
        labels = [f for f in self.features if f.role == "label"]
        if len(labels) != 1:
            raise ValueError(f"FeatureSpec needs exactly one label feature, got {[f.name for f in labels]}")
        table_rows, table_mappings = {}, {}
        for f in self.features:
            if f.role == "history" and f.shape != (self.seq_len,):
                raise ValueError(f"History feature {f.name!r} has shape {f.shape}, expected ({self.seq_len},)")
            if f.is_id:
                rows = table_rows.setdefault(f.table, f.num_buckets)
                if rows != f.num_buckets:
                    raise ValueError(
                        f"Features sharing table {f.table!r} disagree on num_buckets: {rows} vs "
                        f"{f.num_buckets} ({f.name!r})"
                    )
                mapping = table_mappings.setdefault(f.table, f.id_mapping)
                if mapping != f.id_mapping:
                    raise ValueError(
                        f"Features sharing table {f.table!r} disagree on id_mapping: {mapping!r} vs "
                        f"{f.id_mapping!r} ({f.name!r})"
                    )
            if f.role == "vector":
                src = self._by_name.get(f.source)
                if src is None or src.role not in ("item", "history"):
                    raise ValueError(f"Vector {f.name!r}: source {f.source!r} must be an item or history id")
                want = (self.vector_dim,) if src.role == "item" else (self.seq_len, self.vector_dim)
                if f.shape != want:
                    raise ValueError(f"Vector {f.name!r} has shape {f.shape}, expected {want}")

    # -- access -----------------------------------------------------------------
    def __getitem__(self, name):
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"No feature {name!r} in FeatureSpec; have {list(self._by_name)}") from None

    def __contains__(self, name):
        return name in self._by_name

    def __iter__(self):
        return iter(self.features)

    def __len__(self):
        return len(self.features)

    def __eq__(self, other):
        return isinstance(other, FeatureSpec) and self.to_json() == other.to_json()

    def __repr__(self):
        return f"FeatureSpec(seq_len={self.seq_len}, vector_dim={self.vector_dim}, features={self.names()})"

    def names(self, role=None):
        return [f.name for f in self.features if role is None or f.role == role]

    def by_role(self, role):
        return [f for f in self.features if f.role == role]

    @property
    def label(self):
        return self.by_role("label")[0].name

    @property
    def stored_features(self):
        return [f for f in self.features if f.stored]

    @property
    def model_features(self):
        """Features a model consumes: ids and vectors (plus their missing flags are implied)."""
        return [f for f in self.features if f.is_id or f.role == "vector"]

    def user_side_inputs(self, input_names):
        """The names among `input_names` (model inputs) that describe the user rather than a candidate, in order:
        user and context features, the behaviour sequence's features, the vectors joined from the sequence and
        their missing flags (`missing_flag_name`). They are the same for every candidate of one request: the
        `user_candidates` signature of `mm_ads.export` takes them once (batch 1). Other names (the target item's
        features and vector, names that are not features) are candidate side."""

        def user_side(name):
            f = self._by_name.get(name)
            if f is None:
                return False
            if f.role == "vector":
                return self[f.source].role in USER_SIDE_ROLES
            return f.role in USER_SIDE_ROLES

        flags = {missing_flag_name(f.name): f.name for f in self.by_role("vector")}
        return [n for n in input_names if user_side(flags.get(n, n))]

    def tables(self):
        """`{table: num_buckets}` of every embedding table."""
        out = {}
        for f in self.features:
            if f.is_id:
                out[f.table] = f.num_buckets
        return out

    def id_mappings(self):
        """`{table: id_mapping}` of every embedding table ("dense" or "hash")."""
        return {f.table: f.id_mapping for f in self.features if f.is_id}

    def with_vectors(self, vector_dim, item_feature=ITEM_ID, history_feature=HIST_ITEM_ID):
        """A copy with `item_vector` [D] and `hist_item_vector` [S, D] joined from the item ids."""
        feats = [f for f in self.features if f.role != "vector"]
        if item_feature in self:
            feats.append(Feature(ITEM_VECTOR, "vector", "float32", (vector_dim,), source=item_feature))
        if history_feature in self:
            feats.append(
                Feature(HIST_ITEM_VECTOR, "vector", "float32", (self.seq_len, vector_dim), source=history_feature)
            )
        return FeatureSpec(feats, self.seq_len, vector_dim)

    # -- serialisation -------------------------------------------------------------
    def to_json(self):
        return {
            "seq_len": self.seq_len,
            "vector_dim": self.vector_dim,
            "features": [f.to_json() for f in self.features],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]):
        try:
            feats = [Feature(**{**f, "shape": tuple(f.get("shape", ()))}) for f in obj["features"]]
            return cls(feats, obj["seq_len"], obj["vector_dim"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"Malformed FeatureSpec JSON: {e!r}") from e

    def dumps(self):
        return json.dumps(self.to_json(), indent=2, sort_keys=True)

    @classmethod
    def loads(cls, text):
        return cls.from_json(json.loads(text))

    # -- TensorFlow views -----------------------------------------------------------
    def parse_spec(self):
        """`tf.io.parse_example` feature dict for the stored features."""
        import tensorflow as tf

        out = {}
        for f in self.stored_features:
            dtype = tf.int64 if f.dtype in ("int64", "int8") else tf.float32
            out[f.name] = tf.io.FixedLenFeature(f.shape, dtype)
        return out

    def tensor_specs(self, features=None, batch=None):
        """Named `tf.TensorSpec`s (batch dim first) for serving signatures."""
        import tensorflow as tf

        dtypes = {"int64": tf.int64, "float32": tf.float32, "int8": tf.int8}
        feats = self.model_features if features is None else [self[n] for n in features]
        return {f.name: tf.TensorSpec((batch,) + f.shape, dtypes[f.dtype], name=f.name) for f in feats}

    # -- the default CTR layout ---------------------------------------------------------
    @classmethod
    def default(
        cls,
        seq_len,
        vector_dim,
        num_items,
        num_categories,
        num_brands,
        num_users,
        profile_buckets=(),
        with_history_side=True,
    ):
        """The layout used by the synthetic world and the MovieLens reader.

        Ids are dense in `[1, num_*]` with 0 reserved for padding, so tables have `num_* + 1` rows.
        `profile_buckets` adds one `user_profile_<i>` feature per entry.
        """
        feats = [Feature("user_id", "user", table="user", num_buckets=num_users + 1)]
        for i, n in enumerate(profile_buckets):
            feats.append(Feature(f"user_profile_{i}", "user", table=f"user_profile_{i}", num_buckets=n + 1))
        feats += [
            Feature(ITEM_ID, "item", table="item", num_buckets=num_items + 1),
            Feature("category_id", "item", table="category", num_buckets=num_categories + 1),
            Feature("brand_id", "item", table="brand", num_buckets=num_brands + 1),
            Feature(HIST_ITEM_ID, "history", shape=(seq_len,), table="item", num_buckets=num_items + 1),
        ]
        if with_history_side:
            feats += [
                Feature("hist_category_id", "history", shape=(seq_len,), table="category",
                        num_buckets=num_categories + 1),
                Feature("hist_brand_id", "history", shape=(seq_len,), table="brand", num_buckets=num_brands + 1),
            ]
        feats += [
            Feature(TIMESTAMP, "meta"),
            Feature(ITEM_CREATED_AT, "meta"),
            Feature(LABEL, "label", dtype="float32"),
        ]
        spec = cls(feats, seq_len, 0)
        return spec.with_vectors(vector_dim) if vector_dim else spec
