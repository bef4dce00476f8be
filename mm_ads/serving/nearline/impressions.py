"""Impression events: the record schema of the near-line trainer's stream, and the index-table vector join.

An impression event is one JSON object (a record of an `mm_ads.serving.index.events` stream) describing one ad
impression and whether it was clicked. Its fields are the FeatureSpec's stored features of one impression,
by name, plus the event's type and creation time:

| field | type | required | meaning |
|---|---|---|---|
| `type` | `"impression"` | yes | records of another type in the stream are ignored (counted) |
| `ts` | number | yes | event creation time, seconds since the epoch (finite, > 0): the stream lag is now − ts |
| `label` | `0` or `1` | yes | clicked (the spec's label feature; `label` in every built-in dataset) |
| each `user` / `item` / `context` id feature | int | yes | e.g. `user_id`, `item_id`, `category_id`, `brand_id` |
| each `history` id feature | list of int | yes | e.g. `hist_item_id`, `hist_category_id`: most recent last |
| each `meta` feature | int | no | e.g. `timestamp`, `item_created_at` (kept for analysis, not trained on) |

Ids are signed 64-bit integers (JSON numbers without a fraction; `true`/`false` are not ids); the model maps
any value to a row of its tables, or to a table's default row (`SparseEmbedding`), exactly as offline; trained
impressions count towards the admission of their ids, as offline. History lists hold at most the spec's `S`
most recent items: a shorter list is left-padded with the feature's `padding_id`, like the datasets' records,
and a longer one keeps its last `S` entries. The history features of one event must have equal lengths (they
describe the same behaviour sequence position by position). Other fields are ignored. Multimodal vectors are
never in the event: `IndexTableJoin` looks the target and history item ids up in the online index table.

Example (the synthetic world's spec, S = 4):

```json
{"type": "impression", "ts": 1767000000.25, "label": 1, "user_id": 17, "item_id": 4031, "category_id": 7,
 "brand_id": 112, "hist_item_id": [88, 4030], "hist_category_id": [7, 7], "hist_brand_id": [3, 112],
 "timestamp": 1766999990, "item_created_at": 1766990000}
```

`ImpressionSchema.parse` validates one record and raises `EventError` naming the offset and the field;
`ImpressionSchema.batch` stacks parsed events into model inputs; `ImpressionSchema.to_record` turns one row of
a dataset back into an event (for `python -m mm_ads.serving.nearline.replay`).
"""

import math

import numpy as np

from mm_ads.data.spec import missing_flag_name

IMPRESSION = "impression"
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class EventError(ValueError):
    """An impression record that does not match the schema: names the stream offset and the field."""

    def __init__(self, offset, field, message):
        super().__init__(f"impression event at offset {offset}: field {field!r}: {message}")
        self.offset = offset
        self.field = field


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


class ImpressionSchema:
    """The impression event schema of a FeatureSpec (see the module docstring).

    Args:
        spec: the model's `FeatureSpec` (its vector features are joined later, not read from events).
    """

    def __init__(self, spec):
        self.spec = spec
        self.seq_len = spec.seq_len
        self.label = spec.label
        self.scalar_ids = [f for f in spec if f.is_id and f.role != "history"]
        self.histories = [f for f in spec if f.role == "history"]
        self.meta = [f for f in spec if f.role == "meta"]

    def fields(self):
        """`{field: description}` of every field an impression event carries (for docs and `--helpfull`)."""
        out = {"type": '"impression"', "ts": "float seconds since the epoch", self.label: "0 or 1"}
        out.update({f.name: "int" for f in self.scalar_ids})
        out.update({f.name: f"list of int, at most {self.seq_len}, most recent last" for f in self.histories})
        out.update({f.name: "int (optional)" for f in self.meta})
        return out

    def is_impression(self, record):
        return isinstance(record, dict) and record.get("type") == IMPRESSION

    def parse(self, record, offset):
        """Validates one impression record; returns `{feature: int | int64 [S]}` plus `label` and `ts`.

        Raises:
            EventError: naming `offset` and the first bad field.
        """
        if not isinstance(record, dict):
            raise EventError(offset, "<record>", f"expected a JSON object, got {type(record).__name__}")
        if record.get("type") != IMPRESSION:
            raise EventError(offset, "type", f"expected {IMPRESSION!r}, got {record.get('type')!r}")
        ts = record.get("ts")
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts <= 0:
            raise EventError(offset, "ts", f"expected a finite number of seconds since the epoch > 0, got {ts!r}")
        label = record.get(self.label)
        if isinstance(label, bool) or label not in (0, 1):
            raise EventError(offset, self.label, f"expected 0 or 1, got {label!r}")
        out = {"ts": float(ts), "label": float(label)}
        for f in self.scalar_ids:
            out[f.name] = self._id(record, f.name, offset)
        length = None
        for f in self.histories:
            values = record.get(f.name)
            if not isinstance(values, list):
                what = "missing" if values is None else f"got {type(values).__name__}"
                raise EventError(offset, f.name, f"expected a list of int ids (most recent last), {what}")
            if length is None:
                length = len(values)
            elif len(values) != length:
                raise EventError(offset, f.name, f"has {len(values)} entries but {self.histories[0].name!r} has "
                                                 f"{length}: the history features must be aligned")
            try:
                # `type(v) is int` refuses bools and floats; numpy refuses ints outside int64 (OverflowError)
                if not all(type(v) is int for v in values):
                    raise OverflowError
                kept = np.array(values[-self.seq_len:], np.int64)
            except OverflowError:
                k, v = next((k, v) for k, v in enumerate(values)
                            if not _is_int(v) or not _INT64_MIN <= v <= _INT64_MAX)
                raise EventError(offset, f"{f.name}[{k}]", f"expected a 64-bit integer id, got {v!r}") from None
            row = np.full(self.seq_len, f.padding_id, np.int64)
            if len(kept):
                row[self.seq_len - len(kept):] = kept
            out[f.name] = row
        for f in self.meta:
            if f.name in record:
                out[f.name] = self._id(record, f.name, offset)
        return out

    @staticmethod
    def _id(record, name, offset):
        value = record.get(name)
        if not _is_int(value) or not _INT64_MIN <= value <= _INT64_MAX:
            what = "missing" if name not in record else f"got {value!r}"
            raise EventError(offset, name, f"expected a 64-bit integer id, {what}")
        return value

    def batch(self, events):
        """Parsed events → `(features {id feature: int64 [n] / [n, S]}, labels float32 [n])`."""
        n = len(events)
        features = {f.name: np.fromiter((e[f.name] for e in events), np.int64, n) for f in self.scalar_ids}
        for f in self.histories:
            features[f.name] = np.stack([e[f.name] for e in events]) if n else np.zeros((0, self.seq_len), np.int64)
        labels = np.fromiter((e["label"] for e in events), np.float32, n)
        return features, labels

    def to_record(self, row, ts):
        """One dataset row (`{stored feature: numpy value}`) → an impression event with creation time `ts`.

        History padding is dropped (the trainer pads again), so events carry only real history items.
        """
        out = {"type": IMPRESSION, "ts": float(ts), self.label: int(round(float(row[self.label])))}
        for f in self.scalar_ids + self.meta:
            if f.name in row:
                out[f.name] = int(row[f.name])
        if self.histories:
            rows = [np.asarray(row[f.name]).reshape(-1) for f in self.histories]
            real = rows[0] != self.histories[0].padding_id
            first = int(np.argmax(real)) if real.any() else len(real)  # left padding: real items are a suffix
            for f, values in zip(self.histories, rows):
                out[f.name] = [int(v) for v in values[first:]]
        return out


class IndexTableJoin:
    """Adds the spec's multimodal vector features to a batch from an online index table (one per modality).

    The online twin of `mm_ads.data.pipeline.VectorJoin`, with the same outputs and fallback: for every vector
    feature (`source` = the id feature it is joined from) `<name>` float32 `[n, D]` / `[n, S, D]` and
    `<name>_missing` float32 `[n]` / `[n, S]`, 1.0 where an id has no vector in its modality's table (its vector is
    zeros); history padding slots get a zero vector and flag 0 and are not counted. All ids of a batch go to
    each table in one `get_many` call (distinct ids only). With several modalities an item may miss in one table
    and not in another: each modality's flags say so, and the counts are per feature.

    Args:
        table: an `mm_ads.serving.index.index_table.IndexTable` whose dim equals the spec's `vector_dim` (one
            unnamed modality), or a `mm_ads.serving.index.modalities.ModalityIndexTables` with a table of the right
            dim for every modality of the spec.
        spec: the model's `FeatureSpec`.
    """

    def __init__(self, table, spec):
        from mm_ads.serving.index.modalities import tables_by_modality

        tables = tables_by_modality(table)
        self.table = table
        self.tables = {}
        for m in spec.modalities():
            if m.name not in tables:
                raise ValueError(f"The model reads the modality {m.name or '(unnamed)'!r} but the index table(s) "
                                 f"{table!r} hold {sorted(tables)}")
            if int(tables[m.name].dim) != m.dim:
                what = "" if not m.name else f" for the modality {m.name!r}"
                raise ValueError(f"Index table {tables[m.name]!r} holds {tables[m.name].dim}-dim vectors but the "
                                 f"model's FeatureSpec wants {m.dim}{what}")
            self.tables[m.name] = tables[m.name]
        self.vector_features = spec.by_role("vector")
        self._padding = {f.name: spec[f.source].padding_id if spec[f.source].role == "history" else None
                         for f in self.vector_features}
        self.lookups = {f.name: 0 for f in self.vector_features}
        self.missing = {f.name: 0 for f in self.vector_features}

    def __call__(self, features):
        if not self.vector_features:
            return dict(features)
        ids = {f.name: np.asarray(features[f.source], np.int64) for f in self.vector_features}
        real = {name: (v != self._padding[name]) if self._padding[name] is not None else np.ones(v.shape, bool)
                for name, v in ids.items()}
        wanted = np.unique(np.concatenate([ids[name][real[name]] for name in ids]))
        by_modality = {}
        for modality, table in self.tables.items():
            vectors, found = table.get_many(wanted)
            vectors = np.asarray(vectors, np.float32)
            # row len(wanted) is the zero vector of padding slots
            by_modality[modality] = (np.concatenate([vectors, np.zeros((1, vectors.shape[1]), np.float32)]),
                                     np.concatenate([np.asarray(found, bool), [True]]))
        out = dict(features)
        for f in self.vector_features:
            vectors, found = by_modality[f.modality]
            v, r = ids[f.name], real[f.name]
            rows = np.where(r, np.searchsorted(wanted, v), len(wanted))
            absent = ~found[rows]
            out[f.name] = vectors[rows]
            out[missing_flag_name(f.name)] = absent.astype(np.float32)
            self.lookups[f.name] += int(r.sum())
            self.missing[f.name] += int(absent.sum())
        return out

    def stats(self):
        """`{"lookups", "missing", "miss_rate", "features": {name: {"lookups", "missing"}}}` (padding excluded)."""
        lookups, missing = sum(self.lookups.values()), sum(self.missing.values())
        return {"lookups": lookups, "missing": missing, "miss_rate": missing / lookups if lookups else 0.0,
                "features": {n: {"lookups": self.lookups[n], "missing": self.missing[n]} for n in self.lookups}}
