"""Several modalities' index tables behind one interface: a model trained on image and text vectors reads both.

A model trained with several vector tables (`--vector_table=image=...,text=...`, one modality each; see
`mm_ads.data.spec.FeatureSpec.modalities`) is served and trained near-line from one index table per modality. Each
table keeps the guarantees of `mm_ads.serving.index.index_table` (one encoder version and dim per table, atomic
writes); `ModalityIndexTables` only groups them by modality name, so the encoder service, the near-line trainer and
the prediction server take one `--index_table` value for all of them:

    --index_table=image=runs/online/image.db,text=runs/online/text.db

(each entry `<modality>=<URI>`; a value without such entries is one table, the single unnamed modality ""). An item
may be in one modality's table and not in another's (its image not encoded yet): readers treat each modality's miss
on its own (zero vector, missing flag 1, counted per modality), never as an error.

Example:

```python
tables = open_index_tables("image=runs/online/image.db,text=runs/online/text.db")
tables.dims                               # {"image": 128, "text": 384}
by_modality = tables.get_many([11, 12])   # {"image": (vectors [2, 128], found [2]), "text": (...)}
```
"""

import re

from mm_ads.serving.index.index_table import IndexTableError, open_index_table
from mm_ads.serving.index.redis_local import redact_uri

_ENTRY = re.compile(r"^([a-z][a-z0-9_]{0,31})=(.+)$")


def parse_index_tables(value, option="--index_table"):
    """`[(modality, URI)]` of an `--index_table` value: `[("", value)]` for one table, else one per
    `<modality>=<URI>` entry of the comma-separated list. Raises `IndexTableError` naming the bad entry."""
    value = (value or "").strip()
    if not value:
        raise IndexTableError(f"{option} is empty")
    entries = [e.strip() for e in value.split(",")]
    matches = [_ENTRY.match(e) for e in entries]
    if len(entries) == 1 and matches[0] is None:
        return [("", value)]
    out, seen = [], set()
    for entry, match in zip(entries, matches):
        if match is None:
            raise IndexTableError(f"{option}: {redact_uri(entry)!r} is not '<modality>=<value>' (several "
                                  "modalities are given as image=...,text=...; modality names are lowercase letters, "
                                  "digits and '_')")
        if match.group(1) in seen:
            raise IndexTableError(f"{option}: the modality {match.group(1)!r} is given twice")
        seen.add(match.group(1))
        out.append((match.group(1), match.group(2)))
    return out


class ModalityIndexTables:
    """One open index table per modality (`{modality: IndexTable}`, in order), read and closed together.

    Args:
        tables: `{modality name: IndexTable}` (non-empty; names as in the model's FeatureSpec).
    """

    def __init__(self, tables):
        if not tables:
            raise IndexTableError("ModalityIndexTables needs at least one table")
        self.tables = dict(tables)

    @property
    def modalities(self):
        return list(self.tables)

    @property
    def dims(self):
        """`{modality: dim}`."""
        return {m: int(t.dim) for m, t in self.tables.items()}

    @property
    def encoder_versions(self):
        """`{modality: encoder version}`."""
        return {m: getattr(t, "encoder_version", None) for m, t in self.tables.items()}

    @property
    def uri(self):
        return ",".join(f"{m}={redact_uri(getattr(t, 'uri', '?'))}" for m, t in self.tables.items())

    def __getitem__(self, modality):
        try:
            return self.tables[modality]
        except KeyError:
            raise KeyError(f"no index table for the modality {modality!r} (have {self.modalities})") from None

    def __contains__(self, modality):
        return modality in self.tables

    def items(self):
        return self.tables.items()

    def get_many(self, item_ids):
        """`{modality: (float32 [N, D_m], bool [N])}`: every table's `get_many` of the same ids."""
        return {m: t.get_many(item_ids) for m, t in self.tables.items()}

    def close(self):
        for t in self.tables.values():
            t.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"ModalityIndexTables({self.uri})"


def open_index_tables(value, **kwargs):
    """Opens an `--index_table` value: one `IndexTable` (a single URI), or a `ModalityIndexTables` of
    `<modality>=<URI>` entries. `kwargs` go to every `open_index_table` (e.g. `create=False`). A table that fails
    to open closes the ones already open."""
    entries = parse_index_tables(value)
    if entries == [("", value.strip())]:
        return open_index_table(entries[0][1], **kwargs)
    opened = {}
    try:
        for modality, uri in entries:
            try:
                opened[modality] = open_index_table(uri, **kwargs)
            except IndexTableError as e:
                raise IndexTableError(f"--index_table, modality {modality!r}: {e}") from None
    except BaseException:
        for t in opened.values():
            t.close()
        raise
    return ModalityIndexTables(opened)


def tables_by_modality(index_table):
    """`{modality: table}` of an `IndexTable` (`{"": table}`) or a `ModalityIndexTables`; `{}` for None."""
    if index_table is None:
        return {}
    if isinstance(index_table, ModalityIndexTables):
        return dict(index_table.tables)
    return {"": index_table}
