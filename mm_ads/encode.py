r"""Encodes a dataset's item catalogue with a trained SCL encoder → item → vector table.

`python -m mm_ads.encode --model_dir=DIR --data_dir=DIR [--output=PATH] [--dtype=float32|int8] [--register]
[--name=NAME] [--export_base=DIR]`

Reads `<model_dir>/config.json` and `<model_dir>/encoder.keras` (written by `python -m mm_ads.train
--task=scl`), encodes `items.parquet` (`title` for text, `image` for image), and writes the table with
`encoder_version` = a content hash of the encoder. Default output: `<model_dir>/vectors/<name>.parquet`
(the dataset is not modified); with `--register`, default `<data_dir>/vectors/<name>.parquet`, added to
the dataset manifest's `extra["vector_tables"]` atomically. `--export_base` also writes the encoder as a
versioned SavedModel (raw text / image bytes in → vectors).

This module is the command line only (it defines flags on import); from Python call
`mm_ads.scl.encode.encode_model_dir`.
"""

import json

from absl import app, flags

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "A model dir written by python -m mm_ads.train --task=scl.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "The dataset whose items.parquet is encoded.")
_OUTPUT = flags.DEFINE_string("output", None, "Output .parquet (default: see the module docstring).")
_NAME = flags.DEFINE_string("name", None, "Table name (default scl_<modality>).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "int8"], "Storage dtype of the vectors.")
_REGISTER = flags.DEFINE_bool("register", False, "Add the table to the dataset manifest's vector_tables.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Items per encoder call.")
_EXPORT_BASE = flags.DEFINE_string("export_base", None, "Also export the encoder SavedModel under this base path.")
flags.mark_flags_as_required(["model_dir", "data_dir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from mm_ads.scl.encode import encode_model_dir

    result = encode_model_dir(_MODEL_DIR.value, _DATA_DIR.value, _OUTPUT.value, _NAME.value, _DTYPE.value,
                              _REGISTER.value, _BATCH_SIZE.value, _EXPORT_BASE.value)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
