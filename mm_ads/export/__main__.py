r"""Exports a trained model's checkpoint for TF Serving.

`python -m mm_ads.export --model_dir=DIR [--export_base=DIR/export] [--version=N] [--checkpoint=PATH]
[--warmup_batch_sizes=1,200]`

Reads `config.json` and `feature_spec.json` that `python -m mm_ads.train` wrote to the model dir,
rebuilds the model, restores the latest (or the given) checkpoint and writes
`<export_base>/<version>/` atomically (see `mm_ads.export.saved_model`). No data is read, except the vector
table of a multimodal run, compared with the one the run recorded (`vector_tables.json`): a table that differs
refuses the export unless `--allow_vector_table_change`. The version carries TF Serving's warm-up file
`assets.extra/tf_serving_warmup_requests` (one request per signature and `--warmup_batch_sizes` entry).
"""

from absl import app, flags

from mm_ads.export.saved_model import export_checkpoint
from mm_ads.export.warmup import DEFAULT_BATCH_SIZES, check_batch_sizes

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "A model dir written by python -m mm_ads.train.")
_EXPORT_BASE = flags.DEFINE_string("export_base", None, "TF Serving base path (default <model_dir>/export).")
_VERSION = flags.DEFINE_integer("version", None, "Version number (default: latest + 1).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint prefix (default: the latest in <model_dir>/ckpt).")
_ALLOW = flags.DEFINE_bool("allow_vector_table_change", False,
                           "Export although the vector table the run's config names differs from the one the run "
                           "recorded in <model_dir>/vector_tables.json (a warning instead of an error).")
_WARMUP = flags.DEFINE_list("warmup_batch_sizes", [str(b) for b in DEFAULT_BATCH_SIZES],
                            "Batch sizes of the warm-up requests written for each signature into "
                            "<version>/assets.extra/tf_serving_warmup_requests (TF Serving's warm-up file, also read "
                            "by python -m mm_ads.serving.server). Empty: no warm-up file.")
flags.mark_flag_as_required("model_dir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from mm_ads.training.vector_record import VectorTableChanged

    try:
        sizes = check_batch_sizes(int(b) for b in _WARMUP.value)
    except ValueError:
        raise app.UsageError(f"--warmup_batch_sizes must be distinct positive integers, got "
                             f"{','.join(_WARMUP.value)!r}") from None
    try:
        path = export_checkpoint(_MODEL_DIR.value, _EXPORT_BASE.value, _VERSION.value, _CHECKPOINT.value,
                                 allow_vector_table_change=_ALLOW.value, warmup_batch_sizes=sizes)
    except VectorTableChanged as e:
        raise app.UsageError(str(e)) from None
    print(f"export: {path}")


if __name__ == "__main__":
    app.run(main)
