"""The vector table a run trains with, recorded in its model dir: a resume or an export against another is refused.

A multimodal run reads one item → vector table. Its encoder version, dim and content fingerprint
(`mm_ads.data.vectors.table_fingerprint`, a SHA-256 of the file) are written to `<model_dir>/vector_tables.json`
when the run starts. A later run in the same model dir (a resume) and `python -m mm_ads.export` compare the table
they would use with the record: a table replaced by another encoder's output, of another dim, or with other
content raises `VectorTableChanged` naming the table and every field that differs. `allow_change=True` (the
`--allow_vector_table_change` flag of both programs) continues with a warning and records the new table (the
replaced entries are kept under `"replaced"`). A dim change still fails later: a model's shapes follow the dim.

The export copies the record into the version (`mm_ads.export.saved_model.VECTORS_ASSET`), so the prediction
server can refuse a version trained on other vectors than its index table's.

Format: `{"format_version": 1, "tables": {name: {"name", "path", "encoder_version", "dim", "dtype", "num_rows",
"fingerprint", "recorded_utc"}}, "replaced": [entries]}`.
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


def describe_table(path, name=None):
    """The record entry of the vector table at `path` (reads its footer and hashes the file)."""
    from mm_ads.data.vectors import read_table_info, table_fingerprint

    info = read_table_info(path)
    return {"name": name or os.path.splitext(os.path.basename(path))[0], "path": os.path.abspath(path),
            "encoder_version": info["encoder_version"], "dim": int(info["dim"]), "dtype": info["dtype"],
            "num_rows": int(info["num_rows"]), "fingerprint": table_fingerprint(path)}


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


def recorded_entry(model_dir):
    """The one table entry recorded in `model_dir`, or None."""
    record = read_record(model_dir)
    return None if record is None else next(iter(record["tables"].values()))


def differences(recorded, current):
    """`["encoder version 'a' → 'b'", ...]`: the compared fields that differ."""
    return [f"{label} {recorded.get(key)!r} → {current.get(key)!r}" for key, label in COMPARED
            if recorded.get(key) != current.get(key)]


def check(model_dir, current, allow_change=False, what="resume", option="--vector_table"):
    """Compares `current` (a `describe_table` entry) with the record of `model_dir`.

    Returns True when the record must be (re)written: none yet, or a change allowed by `allow_change`.
    Raises `VectorTableChanged` when the table differs and `allow_change` is False.
    """
    recorded = recorded_entry(model_dir)
    if recorded is None:
        return True
    diff = differences(recorded, current)
    if not diff:
        return False
    where = os.path.join(model_dir, RECORD_FILE)
    message = (f"{option}: the vector table {current['name']!r} ({current['path']}) is not the one the run in "
               f"{model_dir} was trained with ({recorded['name']!r}, {recorded['path']}, recorded in {where}): "
               f"{'; '.join(diff)}")
    if not allow_change:
        raise VectorTableChanged(f"{message}. Refusing to {what}: use the table the run was trained with, a new "
                                 "--model_dir, or --allow_vector_table_change to go on with this table anyway")
    logging.warning("%s. Going on with this table (--allow_vector_table_change): the model was trained on other "
                    "vectors", message)
    return True


def write(model_dir, current):
    """Records `current` as the run's table (atomically); an entry it replaces is kept under `"replaced"`."""
    try:
        old = read_record(model_dir)
    except ValueError:
        old = None
    replaced = list((old or {}).get("replaced", []))
    if old is not None:
        replaced += [e for e in old["tables"].values() if differences(e, current)]
    entry = dict(current, recorded_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    record = {"format_version": FORMAT_VERSION, "tables": {current["name"]: entry}}
    if replaced:
        record["replaced"] = replaced
    io_utils.write_json(os.path.join(model_dir, RECORD_FILE), record)
    return entry


def export_vectors(entry):
    """What an export records for the server (`export_saved_model(vectors=...)`) from a record entry."""
    if entry is None:
        return None
    return {k: entry[k] for k in ("encoder_version", "dim", "name", "fingerprint") if k in entry}
