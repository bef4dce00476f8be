"""Readers that turn public data layouts into the canonical dataset layout (`mm_ads.data.dataset`).

One module per input format; each exposes `prepare(input_path, output_dir, ...)` with plain Python
arguments (the command-line wrapper is `python -m mm_ads.data.prepare`) and documents its input
layout in its module docstring:

  * `taobao_mm`     — the public Taobao-MM parquet files (CTR samples, user sequences, SCL int8 vectors).
  * `movielens`     — GroupLens `ratings.csv` / `movies.csv` / `tags.csv`, or ml-100k's `u.data` / `u.item` /
                      `u.user` (implicit-feedback CTR + tag or co-liked text pairs).
  * `product_pairs` — the ER-Magellan product-matching benchmark (text pre-training pairs).
  * `image_folder`  — class-per-subfolder photos, a directory or a `.tar(.gz)` (image pre-training pairs); with
                      a catalogue tree, users' photos → their product's catalogue image (`image_catalogue`).

Malformed input raises `DataFormatError` naming the file, the line/row/member, the field and what was
expected; the output directory is then left untouched (the `DatasetWriter` is atomic).
"""

from mm_ads.data.readers.common import DataFormatError

FORMATS = ("taobao_mm", "movielens", "product_pairs", "image_folder")

__all__ = ["DataFormatError", "FORMATS", "prepare"]


def prepare(fmt, input_path, output_dir, options, name=None, seed=0, overwrite=False, provenance=None):
    """Runs the reader of `fmt` with `options` (its keyword arguments); returns the Manifest."""
    import importlib

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    reader = importlib.import_module(f"mm_ads.data.readers.{fmt}")
    return reader.prepare(input_path, output_dir, name=name, seed=seed, overwrite=overwrite,
                          provenance=provenance, **options)
