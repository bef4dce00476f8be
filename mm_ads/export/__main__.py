r"""Exports a trained model's checkpoint for TF Serving.

`python -m mm_ads.export --model_dir=DIR [--export_base=DIR/export] [--version=N] [--checkpoint=PATH]`

Reads `config.json` and `feature_spec.json` that `python -m mm_ads.train` wrote to the model dir,
rebuilds the model, restores the latest (or the given) checkpoint and writes
`<export_base>/<version>/` atomically (see `mm_ads.export.saved_model`). No data is read.
"""

import json
import os

from absl import app, flags

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "A model dir written by python -m mm_ads.train.")
_EXPORT_BASE = flags.DEFINE_string("export_base", None, "TF Serving base path (default <model_dir>/export).")
_VERSION = flags.DEFINE_integer("version", None, "Version number (default: latest + 1).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint prefix (default: the latest in <model_dir>/ckpt).")
flags.mark_flag_as_required("model_dir")


def export_checkpoint(model_dir, export_base=None, version=None, checkpoint=None):
    """Rebuilds the model of `model_dir`, restores a checkpoint and exports it; returns the version path."""
    import tensorflow as tf

    from mm_ads.config import ExperimentConfig
    from mm_ads.ctr.model import build_ctr_model
    from mm_ads.data.spec import FeatureSpec
    from mm_ads.export.saved_model import export_saved_model
    from mm_ads.training.trainer import model_checkpoint

    paths = {name: os.path.join(model_dir, name) for name in ("config.json", "feature_spec.json")}
    for path in paths.values():
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: {model_dir} is not a model dir written by mm_ads.train")
    with open(paths["config.json"]) as f:
        config = ExperimentConfig.from_json(json.load(f))
    with open(paths["feature_spec.json"]) as f:
        spec = FeatureSpec.from_json(json.load(f))
    checkpoint = checkpoint or tf.train.latest_checkpoint(os.path.join(model_dir, "ckpt"))
    if not checkpoint:
        raise FileNotFoundError(f"No checkpoint in {os.path.join(model_dir, 'ckpt')}")
    model = build_ctr_model(spec, config.model)
    restore = tf.train.Checkpoint(model=model_checkpoint(model)).restore(checkpoint)
    restore.expect_partial().assert_existing_objects_matched()
    return export_saved_model(model, export_base or os.path.join(model_dir, "export"), version=version)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    path = export_checkpoint(_MODEL_DIR.value, _EXPORT_BASE.value, _VERSION.value, _CHECKPOINT.value)
    print(f"export: {path}")


if __name__ == "__main__":
    app.run(main)
