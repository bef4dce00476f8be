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
                A spec holds one modality (`item_vector` / `hist_item_vector`, dim
                `vector_dim`) or several named ones (`modality`: e.g. "image" and
                "text", features `item_vector_image`, `hist_item_vector_image`, ...,
                each modality with its own table and dim: `FeatureSpec.modalities`).

Every feature also has a `kind` (how a model reads it; `Feature` lists each kind's fields):
  * `id`      — the default: one id (scalar) or an id sequence (`history`), looked up in `table`.
                int64 ids, or `dtype="string"` ids hashed into the table's `num_buckets` rows by the model
                (`mm_ads.layers.StringHashing`; "" is padding).
  * `tags`    — a multi-valued id feature (`user`/`item`/`context`): int64 or string `[M]`, padded with
                `padding_id` / "", embedded in `table` and pooled (`combiner` "mean" or "sum", padding masked;
                `mm_ads.layers.MaskedPooling`). Also the kind for id sequences other than the behaviour
                sequence (e.g. a user's last searched categories).
  * `numeric` — float32 scalar or `[K]` (`user`/`item`/`context`): standardised with `mean`/`std` when given,
                or bucketised by `boundaries` into an embedding table (`mm_ads.layers.NumericEncoding`).
Prepared data is checked against the kinds before records are written (`mm_ads.data.dataset.conform_columns`):
a string in an int64 column, a NaN in a numeric one or more than M tags is an error naming the feature and the
row, unless the feature declares a fallback (`nan_value`, `truncate`), whose uses are counted.

Id features name an embedding `table`; features that share a table share their
embedding rows (target item and history items share the item table). A table's
`id_mapping` says how its ids become rows: "dense" (the ids are row numbers `[0, num_buckets)`,
e.g. `1..N` with 0 for padding: the synthetic world, MovieLens) or "hash" (raw ids of any
value, hashed into the rows by the model: Taobao-MM).
"""

import collections
import dataclasses
import json
import math
import re
from typing import Any

ROLES = ("user", "item", "history", "context", "meta", "label", "vector")
# Roles of the features that describe the user (and the request), not a candidate: `FeatureSpec.user_side_inputs`.
USER_SIDE_ROLES = ("user", "context", "history")
DTYPES = ("int64", "float32", "int8", "string")
KINDS = ("id", "tags", "numeric")
COMBINERS = ("mean", "sum")
ID_ROLES = ("user", "item", "history", "context")
# Roles of the features of the kinds `tags` and `numeric`: one value (list) per example, not a sequence.
VALUE_ROLES = ("user", "item", "context")
ID_MAPPINGS = ("dense", "hash")  # the values of `mm_ads.layers.SparseEmbedding(id_mapping=...)`

# Conventional names used by the built-in readers and the synthetic world.
ITEM_ID = "item_id"
HIST_ITEM_ID = "hist_item_id"
LABEL = "label"
TIMESTAMP = "timestamp"
ITEM_CREATED_AT = "item_created_at"
ITEM_VECTOR = "item_vector"
HIST_ITEM_VECTOR = "hist_item_vector"


# One modality of a spec's vectors: its name ("" for a spec's single unnamed modality), the names of its
# target-item and history vector features (None when absent) and its dim.
Modality = collections.namedtuple("Modality", "name item history dim")


def modality_feature_names(modality=""):
    """`(target item vector, history vector)` feature names of a modality: `item_vector` / `hist_item_vector` for
    the unnamed one, `item_vector_<m>` / `hist_item_vector_<m>` for modality m."""
    if not modality:
        return ITEM_VECTOR, HIST_ITEM_VECTOR
    return f"{ITEM_VECTOR}_{modality}", f"{HIST_ITEM_VECTOR}_{modality}"


def check_modality_name(name, what="modality"):
    """A modality name: a short identifier of lowercase letters, digits and "_" (it becomes part of feature, layer
    and serving-input names)."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name):
        raise ValueError(f"{what} {name!r} is not a valid modality name: lowercase letters, digits and '_', starting "
                         "with a letter, at most 32 characters (e.g. 'image', 'text')")
    return name


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
        padding_id: for `history` and int64 `tags` features, the id that marks an empty slot (string ones: "").
        source: for `vector` features, the id feature whose vectors are joined.
        id_mapping: for id features, how ids become rows of the table (`ID_MAPPINGS`): "dense" (ids are
            rows; the default, left out of the JSON) or "hash" (raw ids, hashed by the model). String ids are
            always hashed (`mm_ads.layers.StringHashing`) and leave it "dense".
        kind: `KINDS`: "id" (the default, left out of the JSON), "tags" or "numeric" (see the module docstring).
        combiner: for `tags`, how the embeddings of one example's tags are pooled: "mean" (the default) or "sum".
        mean: for `numeric`, the value(s) subtracted before dividing by `std` (a float, or K floats).
        std: for `numeric`, the scale(s) (> 0); `mean` and `std` come together.
        boundaries: for `numeric`, increasing bucket boundaries: the value's bucket (0..len(boundaries)) is
            embedded in `table` (default: the feature's name) of `len(boundaries) + 1` rows.
        nan_value: for `numeric`, the value a NaN is replaced by when data are prepared (counted); None: a NaN is
            an error.
        truncate: for `tags`, keep the first M values of a longer list (counted) instead of raising an error.
        modality: for `vector` features of a spec with several modalities, the modality's name (e.g. "image");
            "" (the default, left out of the JSON) for a spec's single modality.

    Example (the JSON of a spec's features):

    ```json
    {"name": "occupation", "role": "user", "dtype": "string", "table": "occupation", "num_buckets": 64}
    {"name": "genres", "role": "item", "kind": "tags", "shape": [6], "table": "genre", "num_buckets": 20}
    {"name": "age", "role": "user", "kind": "numeric", "dtype": "float32", "mean": 34.1, "std": 12.2}
    ```
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
    kind: str = "id"
    combiner: str = "mean"
    mean: Any = None
    std: Any = None
    boundaries: Any = None
    nan_value: float | None = None
    truncate: bool = False
    modality: str = ""

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        for field in ("mean", "std", "boundaries"):  # lists (JSON) → tuples: the Feature stays hashable
            value = getattr(self, field)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, field, tuple(float(v) for v in value))
            elif value is not None:
                object.__setattr__(self, field, float(value))
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"Feature name must be a non-empty identifier, got {self.name!r}")
        if self.id_mapping not in ID_MAPPINGS:
            raise ValueError(f"Feature {self.name!r}: id_mapping must be one of {ID_MAPPINGS}, got {self.id_mapping!r}")
        if self.role not in ROLES:
            raise ValueError(f"Feature {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Feature {self.name!r}: dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.kind not in KINDS:
            raise ValueError(f"Feature {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind != "id" and self.role not in VALUE_ROLES:
            raise ValueError(f"Feature {self.name!r} of kind {self.kind!r} must have a role in {VALUE_ROLES}, got "
                             f"{self.role!r} (a behaviour sequence of ids is kind 'id', role 'history')")
        if self.dtype == "string" and not (self.is_id or self.kind == "tags"):
            raise ValueError(f"Feature {self.name!r}: only id and tags features can be strings")
        if self.is_id or self.kind == "tags":
            if self.dtype not in ("int64", "string"):
                raise ValueError(f"Id feature {self.name!r} must be int64 or string, got {self.dtype!r}")
            if not self.table:
                raise ValueError(f"Id feature {self.name!r} needs a `table`")
            if self.num_buckets is None or self.num_buckets < 1:
                raise ValueError(
                    f"Id feature {self.name!r} needs num_buckets >= 1, got {self.num_buckets!r}"
                )
            if self.dtype == "string" and self.id_mapping != "dense":
                raise ValueError(f"String feature {self.name!r}: strings are always hashed into num_buckets; leave "
                                 f"id_mapping unset, got {self.id_mapping!r}")
            if self.dtype == "string" and self.num_buckets < 2:
                raise ValueError(f"String feature {self.name!r} needs num_buckets >= 2 (row 0 is padding), got "
                                 f"{self.num_buckets}")
        if self.kind == "tags":
            if len(self.shape) != 1 or self.shape[0] < 1:
                raise ValueError(f"Tags feature {self.name!r} must have shape [M] (M >= 1 values), got {self.shape}")
            if self.combiner not in COMBINERS:
                raise ValueError(f"Tags feature {self.name!r}: combiner must be one of {COMBINERS}, got "
                                 f"{self.combiner!r}")
        elif self.combiner != "mean":
            raise ValueError(f"Feature {self.name!r}: combiner is for tags features, got {self.combiner!r}")
        if self.truncate and self.kind != "tags":
            raise ValueError(f"Feature {self.name!r}: truncate is for tags features")
        if self.kind == "numeric":
            self._check_numeric()
        elif any(getattr(self, k) is not None for k in ("mean", "std", "boundaries", "nan_value")):
            raise ValueError(f"Feature {self.name!r}: mean, std, boundaries and nan_value are for numeric features")
        expected_rank = {"history": 1, "label": 0, "meta": 0, "user": 0, "item": 0, "context": 0}
        if self.kind == "id" and self.role in expected_rank and len(self.shape) != expected_rank[self.role]:
            raise ValueError(
                f"Feature {self.name!r} with role {self.role!r} must have rank "
                f"{expected_rank[self.role]}, got shape {self.shape}"
            )
        if self.role == "vector":
            if not self.source:
                raise ValueError(f"Vector feature {self.name!r} needs a `source` id feature")
            if len(self.shape) not in (1, 2):
                raise ValueError(f"Vector feature {self.name!r} must be [D] or [S, D], got {self.shape}")
            if self.modality:
                check_modality_name(self.modality, f"Vector feature {self.name!r}: modality")
        elif self.modality:
            raise ValueError(f"Feature {self.name!r}: modality is for vector features, got {self.modality!r}")
        if self.role == "label" and self.dtype != "float32":
            raise ValueError(f"Label {self.name!r} must be float32, got {self.dtype!r}")
        if self.dtype == "string" and self.role in ("meta", "label", "vector"):
            raise ValueError(f"Feature {self.name!r} with role {self.role!r} cannot be a string")

    def _check_numeric(self):
        if self.dtype != "float32":
            raise ValueError(f"Numeric feature {self.name!r} must be float32, got {self.dtype!r}")
        if len(self.shape) > 1:
            raise ValueError(f"Numeric feature {self.name!r} must be a scalar or [K], got shape {self.shape}")
        width = self.shape[0] if self.shape else 1
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"Numeric feature {self.name!r}: give mean and std together, got mean={self.mean!r}, "
                             f"std={self.std!r}")
        for field in ("mean", "std"):
            value = getattr(self, field)
            if isinstance(value, tuple) and len(value) != width:
                raise ValueError(f"Numeric feature {self.name!r}: {field} has {len(value)} values for {width} "
                                 f"per example")
        if self.std is not None and min(self.std if isinstance(self.std, tuple) else (self.std,)) <= 0:
            raise ValueError(f"Numeric feature {self.name!r}: std must be > 0, got {self.std!r}")
        if self.boundaries is not None:
            b = self.boundaries if isinstance(self.boundaries, tuple) else (self.boundaries,)
            if not b or any(x >= y for x, y in zip(b, b[1:])):
                raise ValueError(f"Numeric feature {self.name!r}: boundaries must be strictly increasing, got {b}")
            object.__setattr__(self, "boundaries", b)
        if self.table and self.boundaries is None:
            raise ValueError(f"Numeric feature {self.name!r} has a table but no boundaries to bucketise into it")
        if self.num_buckets is not None:
            raise ValueError(f"Numeric feature {self.name!r}: num_buckets is len(boundaries) + 1, leave it unset")
        if self.nan_value is not None and not math.isfinite(self.nan_value):
            raise ValueError(f"Numeric feature {self.name!r}: nan_value must be finite, got {self.nan_value!r}")

    def with_normalization(self, values):
        """A copy of this numeric feature with `mean`/`std` of `values` ([n] or [n, K], NaN ignored): the
        standardisation computed from training data when it is prepared (a std of 0 becomes 1)."""
        import numpy as np

        if self.kind != "numeric" or self.boundaries is not None:
            raise ValueError(f"Feature {self.name!r}: only a numeric feature without boundaries is standardised")
        values = np.asarray(values, np.float64).reshape(len(values), -1)  # [n, K]
        if values.shape[1] != (self.shape[0] if self.shape else 1) or not np.isfinite(values).any(axis=0).all():
            raise ValueError(f"Feature {self.name!r}: need [n] or [n, K] values with a finite value per column, "
                             f"got shape {values.shape}")
        mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
        std = np.where(std > 0, std, 1.0)
        mean, std = ([round(float(v), 6) for v in x] for x in (mean, std))
        return dataclasses.replace(self, mean=mean if self.shape else mean[0], std=std if self.shape else std[0])

    @property
    def is_id(self):
        """An id feature of kind "id": one id, or the ids of a behaviour sequence."""
        return self.role in ID_ROLES and self.kind == "id"

    @property
    def embedding_table(self):
        """The embedding table the feature is looked up in (None for plain numeric values)."""
        if self.is_id or self.kind == "tags":
            return self.table
        if self.kind == "numeric" and self.boundaries is not None:
            return self.table or self.name
        return None

    @property
    def table_rows(self):
        """Rows of `embedding_table`."""
        if self.kind == "numeric":
            return len(self.boundaries) + 1 if self.boundaries is not None else None
        return self.num_buckets

    @property
    def is_model_input(self):
        """Whether a CTR model reads the feature (ids, tags, numeric values and vectors)."""
        return self.is_id or self.kind in ("tags", "numeric") or self.role == "vector"

    @property
    def stored(self):
        """Whether the feature is stored in the records (vectors are joined at input time)."""
        return self.role != "vector"

    def to_json(self):
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape)
        # the defaults are left out: specs written before a field existed read (and write) the same
        for field, default in (("id_mapping", "dense"), ("kind", "id"), ("combiner", "mean"), ("truncate", False),
                               ("modality", "")):
            if out[field] == default:
                del out[field]
        for field in ("mean", "std", "boundaries"):
            if isinstance(out[field], tuple):
                out[field] = list(out[field])
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
        table_rows, table_mappings, table_kinds, modality_dims = {}, {}, {}, {}
        for f in self.features:
            if f.role == "history" and f.shape != (self.seq_len,):
                raise ValueError(f"History feature {f.name!r} has shape {f.shape}, expected ({self.seq_len},)")
            table = f.embedding_table
            if table is not None:
                rows = table_rows.setdefault(table, f.table_rows)
                if rows != f.table_rows:
                    raise ValueError(
                        f"Features sharing table {table!r} disagree on num_buckets: {rows} vs "
                        f"{f.table_rows} ({f.name!r})"
                    )
                mapping = table_mappings.setdefault(table, f.id_mapping)
                if mapping != f.id_mapping:
                    raise ValueError(
                        f"Features sharing table {table!r} disagree on id_mapping: {mapping!r} vs "
                        f"{f.id_mapping!r} ({f.name!r})"
                    )
                values = "bucket" if f.kind == "numeric" else f.dtype
                seen = table_kinds.setdefault(table, values)
                if seen != values:
                    raise ValueError(f"Features sharing table {table!r} disagree on their values: {seen} ids vs "
                                     f"{values} ids ({f.name!r})")
            if f.role == "vector":
                src = self._by_name.get(f.source)
                if src is None or src.role not in ("item", "history"):
                    raise ValueError(f"Vector {f.name!r}: source {f.source!r} must be an item or history id")
                dim = self.vector_dim if not f.modality else modality_dims.setdefault(f.modality, f.shape[-1])
                want = (dim,) if src.role == "item" else (self.seq_len, dim)
                if f.shape != want:
                    what = "" if not f.modality else f" (modality {f.modality!r} has dim {dim})"
                    raise ValueError(f"Vector {f.name!r} has shape {f.shape}, expected {want}{what}")
        named = {f.modality for f in self.by_role("vector")}
        if len(named) > 1 and "" in named:
            raise ValueError("FeatureSpec: vector features either all belong to the single unnamed modality or all "
                             f"name their modality; got {sorted(named)}")
        if modality_dims and self.vector_dim:
            raise ValueError(f"FeatureSpec: vector_dim must be 0 when the modalities are named (each has its own dim "
                             f"{modality_dims}), got {self.vector_dim}")

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
        """Features a model consumes: ids, tags, numeric values and vectors (plus their missing flags are implied)."""
        return [f for f in self.features if f.is_model_input]

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
            if f.embedding_table is not None:
                out[f.embedding_table] = f.table_rows
        return out

    def id_mappings(self):
        """`{table: id_mapping}` of every embedding table ("dense" or "hash")."""
        return {f.embedding_table: f.id_mapping for f in self.features if f.embedding_table is not None}

    def table_padding(self):
        """`{table: padding id}`: the id of an empty slot (0; hashed strings: "" → row 0), None for bucket tables."""
        return {f.embedding_table: (None if f.kind == "numeric" else 0 if f.dtype == "string" else f.padding_id)
                for f in self.features if f.embedding_table is not None}

    def modalities(self):
        """The `Modality`s of the spec's vectors, in the order of their features (empty without vectors).

        Example:

        >>> spec = FeatureSpec.default(4, 0, 100, 5, 7, 10).with_modalities({"image": 8, "text": 16})
        >>> [(m.name, m.item, m.dim) for m in spec.modalities()]
        [('image', 'item_vector_image', 8), ('text', 'item_vector_text', 16)]
        """
        out = {}
        for f in self.by_role("vector"):
            m = out.setdefault(f.modality, {"item": None, "history": None, "dim": f.shape[-1]})
            side = "item" if self[f.source].role == "item" else "history"
            if m[side] is None:
                m[side] = f.name
        return [Modality(name, m["item"], m["history"], m["dim"]) for name, m in out.items()]

    def modality(self, name=""):
        """The `Modality` called `name` ("" is the single unnamed one)."""
        for m in self.modalities():
            if m.name == name:
                return m
        raise KeyError(f"No vector modality {name!r} in FeatureSpec; have {[m.name for m in self.modalities()]}")

    def with_modalities(self, dims, item_feature=ITEM_ID, history_feature=HIST_ITEM_ID):
        """A copy whose vectors are `dims` (`{modality: D}`, in order): `{"": D}` is `with_vectors(D)`; named
        modalities get `item_vector_<m>` [D_m] and `hist_item_vector_<m>` [S, D_m] joined from the item ids."""
        dims = dict(dims)
        if not dims:
            raise ValueError("with_modalities needs at least one modality")
        if "" in dims:
            if len(dims) > 1:
                raise ValueError(f"with_modalities: the unnamed modality '' cannot be combined with others: {dims}")
            return self.with_vectors(dims[""], item_feature, history_feature)
        feats = [f for f in self.features if f.role != "vector"]
        for name, dim in dims.items():
            check_modality_name(name)
            item_name, hist_name = modality_feature_names(name)
            if item_feature in self:
                feats.append(Feature(item_name, "vector", "float32", (int(dim),), source=item_feature, modality=name))
            if history_feature in self:
                feats.append(Feature(hist_name, "vector", "float32", (self.seq_len, int(dim)), source=history_feature,
                                     modality=name))
        return FeatureSpec(feats, self.seq_len, 0)

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

        dtypes = {"int64": tf.int64, "int8": tf.int64, "float32": tf.float32, "string": tf.string}
        return {f.name: tf.io.FixedLenFeature(f.shape, dtypes[f.dtype]) for f in self.stored_features}

    def tensor_specs(self, features=None, batch=None):
        """Named `tf.TensorSpec`s (batch dim first) for serving signatures."""
        import tensorflow as tf

        dtypes = {"int64": tf.int64, "float32": tf.float32, "int8": tf.int8, "string": tf.string}
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
