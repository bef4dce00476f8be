"""The vector table a run trains with, recorded in its model dir: a resume or an export against another is refused.

A multimodal run reads one item → vector table per modality (one for a single modality; several, e.g. image and
text, with `--vector_table=image,text`). Each table's encoder version, dim and content fingerprint
(`mm_ads.data.vectors.table_fingerprint`, a SHA-256 of the file) are written to `<model_dir>/vector_tables.json`
when the run starts. A later run in the same model dir (a resume) and `python -m mm_ads.export` compare the table
they would use with the record: a table replaced by another encoder's output, of another dim, or with other
content raises `VectorTableChanged` naming the table and every field that differs. `allow_change=True` (the
`--allow_vector_table_change` flag of both programs) continues with a warning and records the new table (the
replaced entries are kept under `"replaced"`). A dim change still fails later: a model's shapes follow the dim.

The export copies the record into the version (`mm_ads.export.saved_model.VECTORS_ASSET`), so the prediction
server can refuse a version trained on other vectors than its index table's.

Format: `{"format_version": 1, "tables": {name: {"name", "path", "encoder_version", "dim", "dtype", "num_rows",
"fingerprint", "recorded_utc"[, "modality"]}}, "replaced": [entries]}`; with several modalities there is one entry per
modality, each naming its `modality`, and a run is compared modality by modality (a modality added or dropped is a
change too).
"""

import datetime
import os

from absl import logging

from mm_ads.utils import io as io_utils

RECORD_FILE = "vector_tables.json"
FORMAT_VERSION = 1
COMPARED = (("encoder_version", "encoder version"), ("dim", "dim"), ("fingerprint", "content fingerprint"))


class VectorTableChanged(ValueError):
    """The vector table differs from the one recorded in the model dir."""


def describe_table(path, name=None, modality=""):
    """The record entry of the vector table at `path` (reads its footer and hashes the file); `modality`: the
    modality it fills in a run with several (left out for a single modality)."""
    from mm_ads.data.vectors import read_table_info, table_fingerprint

    info = read_table_info(path)
    entry = {"name": name or os.path.splitext(os.path.basename(path))[0], "path": os.path.abspath(path),
             "encoder_version": info["encoder_version"], "dim": int(info["dim"]), "dtype": info["dtype"],
             "num_rows": int(info["num_rows"]), "fingerprint": table_fingerprint(path)}
    if modality:
        entry["modality"] = modality
    return entry


def describe_tables(tables):
    """The record of a run's tables, `[(modality, path, manifest name or None)]` (what
    `mm_ads.data.pipeline.resolve_modality_tables` gives): one entry for the single unnamed modality, else a list of
    entries, one per modality."""
    entries = [describe_table(path, name, modality) for modality, path, name in tables]
    return entries[0] if len(entries) == 1 and not tables[0][0] else entries


def single_or_list(entries):
    """Recorded entries in the form `describe_tables` gives: the one entry of an unnamed modality, else the list."""
    return entries[0] if len(entries) == 1 and not entries[0].get("modality") else entries


def read_record(model_dir):
    """The record of `model_dir`, or None (no multimodal run started there yet, or one started before records)."""
    path = os.path.join(model_dir, RECORD_FILE)
    record = io_utils.read_json_if_exists(path)
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION or \
            not isinstance(record.get("tables"), dict) or not record["tables"]:
        raise ValueError(f"{path} is not a vector table record of format {FORMAT_VERSION}")
    return record


def recorded_entries(model_dir):
    """The table entries recorded in `model_dir` (one per modality), or None."""
    record = read_record(model_dir)
    return None if record is None else list(record["tables"].values())


def recorded_entry(model_dir):
    """The first (for a single modality: the one) table entry recorded in `model_dir`, or None."""
    entries = recorded_entries(model_dir)
    return None if entries is None else entries[0]


def _entries(current):
    return list(current) if isinstance(current, (list, tuple)) else [current]


def differences(recorded, current):
    """`["encoder version 'a' → 'b'", ...]`: the compared fields that differ between two entries; between two lists
    of entries (several modalities), the modalities added or dropped and each modality's differences."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        return [f"{label} {recorded.get(key)!r} → {current.get(key)!r}" for key, label in COMPARED
                if recorded.get(key) != current.get(key)]
    recorded, current = _entries(recorded), _entries(current)
    if len(recorded) == len(current) == 1:
        return differences(recorded[0], current[0])
    old = {e.get("modality", ""): e for e in recorded}
    new = {e.get("modality", ""): e for e in current}
    diff = [f"modality {m!r} dropped" for m in old if m not in new] + \
        [f"modality {m!r} added" for m in new if m not in old]
    for m in new:
        if m in old:
            diff += [f"{m}: {d}" for d in differences(old[m], new[m])]
    return diff


def _describe(entries):
    return ", ".join(f"{e['name']!r} ({e['path']})" for e in entries)


def check(model_dir, current, allow_change=False, what="resume", option="--vector_table"):
    """Compares `current` (a `describe_table` entry, or a list of them, one per modality) with the record of
    `model_dir`.

    Returns True when the record must be (re)written: none yet, or a change allowed by `allow_change`.
    Raises `VectorTableChanged` when a table differs and `allow_change` is False.
    """
    recorded = recorded_entries(model_dir)
    if recorded is None:
        return True
    diff = differences(recorded, current)
    if not diff:
        return False
    where = os.path.join(model_dir, RECORD_FILE)
    current = _entries(current)
    tables = "vector table" if len(current) == 1 else "vector tables"
    message = (f"{option}: the {tables} {_describe(current)} are not the ones the run in {model_dir} was trained "
               f"with ({_describe(recorded)}, recorded in {where}): {'; '.join(diff)}")
    if len(current) == len(recorded) == 1:
        message = message.replace(" are not the ones ", " is not the one ")
    if not allow_change:
        raise VectorTableChanged(f"{message}. Refusing to {what}: use the table the run was trained with, a new "
                                 "--model_dir, or --allow_vector_table_change to go on with this table anyway")
    logging.warning("%s. Going on with this table (--allow_vector_table_change): the model was trained on other "
                    "vectors", message)
    return True


def write(model_dir, current):
    """Records `current` (an entry, or a list of entries) as the run's tables (atomically); entries it replaces are
    kept under `"replaced"`. Returns what it recorded, in the form given."""
    try:
        old = read_record(model_dir)
    except ValueError:
        old = None
    entries = _entries(current)
    replaced = list((old or {}).get("replaced", []))
    if old is not None:
        replaced += [e for e in old["tables"].values() if all(differences(e, c) for c in entries)]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    written = [dict(e, recorded_utc=stamp) for e in entries]
    record = {"format_version": FORMAT_VERSION,
              "tables": {e.get("modality") or e["name"]: e for e in written}}
    if replaced:
        record["replaced"] = replaced
    io_utils.write_json(os.path.join(model_dir, RECORD_FILE), record)
    return written if isinstance(current, (list, tuple)) else written[0]


def export_vectors(entry):
    """What an export records for the server (`export_saved_model(vectors=...)`) from a record entry; from a list of
    entries of several modalities, `{modality: what it records}`."""
    if entry is None:
        return None
    if isinstance(entry, (list, tuple)):
        if len(entry) == 1 and not entry[0].get("modality"):
            return export_vectors(entry[0])
        return {e["modality"]: export_vectors(e) for e in entry}
    return {k: entry[k] for k in ("encoder_version", "dim", "name", "fingerprint") if k in entry}
