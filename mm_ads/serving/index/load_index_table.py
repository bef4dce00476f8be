r"""Creates an index table from a vector table, or loads a vector table into it again.

`python -m mm_ads.serving.index.load_index_table --index_table=runs/online/index.db \
    --vectors=runs/demo/data/vectors/scl_text.parquet`

Bulk-loads the item → vector table `--vectors` (an `mm_ads.data.vectors` Parquet table, e.g. what
`python -m mm_ads.encode --register` writes under `<data_dir>/vectors/`) into the index table `--index_table`
(a path, `sqlite:///abs/path.db` or `redis://HOST:PORT/DB?prefix=NAME`; see `mm_ads.serving.index.index_table`).

  * No table at `--index_table`: it is created with the vector table's dim and encoder version
    (`--dtype=float32`, or `int8` with the vector table's scale), then loaded.
  * A table of the same encoder version and dim: the rows are written again (an id already there is
    overwritten, none is duplicated), so re-running the command is safe; items the encoder service added
    stay.
  * A table of another encoder version or dim: refused with an error naming both; vectors of two encoders
    are never mixed (load into a new `--index_table`, or delete the old table).

Prints one JSON line: `{"index_table", "vectors", "encoder_version", "dim", "loaded", "items_before", "items"}`.
From Python: `load_index_table(index_table, vectors)` (the same dict), or `open_index_table` +
`load_vector_table_into`.
"""

import json
import sys

from absl import app, flags, logging

from mm_ads.data.vectors import VectorTable
from mm_ads.serving.index.index_table import IndexTableError, load_vector_table_into, open_index_table
from mm_ads.serving.index.redis_local import redact_uri

COMMAND = "python -m mm_ads.serving.index.load_index_table"


def load_index_table(index_table, vectors, dtype="float32"):
    """Creates (if needed) the index table `index_table` and loads the vector table `vectors` into it.

    Returns `{"index_table", "vectors", "encoder_version", "dim", "loaded", "items_before", "items"}`.

    Raises:
        FileNotFoundError: `vectors` does not exist.
        ValueError: `vectors` is not a vector table, or `dtype` is not float32/int8.
        IndexTableError: `index_table` holds vectors of another encoder version or dim (or is not an index
            table).
    """
    if dtype not in ("float32", "int8"):
        raise ValueError(f"--dtype must be float32 or int8, got {dtype!r}")
    source = VectorTable.load(vectors)  # FileNotFoundError / ValueError name the file
    scale = source.scale if dtype == "int8" and source.dtype == "int8" else None
    try:
        table = open_index_table(index_table, dim=source.dim, encoder_version=source.encoder_version, dtype=dtype,
                                 create=True, scale=scale)
    except IndexTableError as e:
        raise IndexTableError(f"--index_table={index_table} cannot take --vectors={vectors} (encoder "
                              f"{source.encoder_version!r}, dim {source.dim}): {e}. Load into a new --index_table, "
                              "or delete the old table first.") from e
    with table:
        before = len(table)
        loaded = load_vector_table_into(table, vectors)
        after = len(table)
    return {"index_table": redact_uri(index_table), "vectors": vectors, "encoder_version": source.encoder_version,
            "dim": source.dim, "loaded": loaded, "items_before": before, "items": after}


def define_flags():
    flags.DEFINE_string("index_table", None, "The index table to create or fill: a path, sqlite:///abs/path.db "
                                             "or redis://HOST:PORT/DB?prefix=NAME.")
    flags.DEFINE_string("vectors", None, "The item → vector table (Parquet, mm_ads.data.vectors), e.g. "
                                         "<data_dir>/vectors/<name>.parquet written by mm_ads.encode.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "int8"],
                      "Storage of a new index table (an existing table keeps its own).")
    flags.mark_flags_as_required(["index_table", "vectors"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        result = load_index_table(f.index_table, f.vectors, f.dtype)
    except (OSError, ValueError) as e:  # IndexTableError is a ValueError
        sys.exit(f"load_index_table: {e}")
    logging.info("loaded %d vectors of encoder %r (dim %d) from %s into %s: %d items before, %d now",
                 result["loaded"], result["encoder_version"], result["dim"], f.vectors, result["index_table"],
                 result["items_before"], result["items"])
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main, argv=sys.argv)
