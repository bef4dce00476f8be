"""Exports CTR models as SavedModels that TF Serving loads, in its versioned layout.

`<export_base>/<version>/` with `version` a positive integer (TF Serving serves the largest).
A version is written into a temporary sibling directory and renamed into place, so a server
watching `<export_base>` never sees a half-written version.

The `serving_default` signature takes the model's inputs by their FeatureSpec names — the
multimodal vectors are input features (`item_vector` [B, D], `hist_item_vector` [B, S, D],
float32, plus their `_missing` flags) — and returns `{"ctr": [B]}`. Only stock TF ops are in
the graph, so a stock TF Serving loads it.

Given the FeatureSpec, a second signature, `user_candidates`, scores the B candidates of ONE user: the same
inputs, but the user-side ones (user/context features, the behaviour sequence's ids, `hist_item_vector`
[1, S, D] and its flags) have batch 1 and are not repeated per candidate. Same scores as `serving_default`
on the repeated inputs, with the history-only work done once (BUILD.md: serving benchmark).
"""

import json
import os
import re
import shutil
import tempfile

import keras
import tensorflow as tf


def serving_signature_specs(model):
    """`{input name: tf.TensorSpec}` of a functional model's inputs (batch dimension None)."""
    specs = {}
    for t in model.inputs:
        name = t.name.split(":")[0]
        specs[name] = tf.TensorSpec((None,) + tuple(t.shape[1:]), tf.as_dtype(t.dtype), name=name)
    return specs


def latest_version(export_base):
    """The largest integer version under `export_base`, or 0."""
    if not os.path.isdir(export_base):
        return 0
    versions = [int(d) for d in os.listdir(export_base) if d.isdigit()]
    return max(versions, default=0)


USER_SIGNATURE = "user_candidates"


def user_candidates_specs(specs, user_inputs):
    """`specs` with the batch dimension of every input in `user_inputs` fixed to 1."""
    unknown = sorted(set(user_inputs) - set(specs))
    if unknown:
        raise ValueError(f"user-side input(s) {unknown} are not inputs of the model ({sorted(specs)})")
    return {name: tf.TensorSpec((1,) + tuple(s.shape[1:]), s.dtype, name=name) if name in user_inputs else s
            for name, s in specs.items()}


def export_saved_model(model, export_base, version=None, outputs=("ctr",), spec=None):
    """Writes `model` to `<export_base>/<version>/` atomically and returns that path.

    Args:
        model: a functional Keras model with named inputs and a dict output.
        export_base: the TF Serving model base path.
        version: integer version; default the latest existing + 1.
        outputs: which of the model's outputs the signatures return.
        spec: the model's `FeatureSpec`: adds the `user_candidates` signature (a model of
            `mm_ads.ctr.model.build_ctr_model`, or one that broadcasts its user-side inputs likewise).
    """
    specs = serving_signature_specs(model)

    def serve(inputs):
        result = model(inputs, training=False)
        return {k: tf.identity(result[k], name=k) for k in outputs}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve, input_signature=[specs])
    if spec is not None:
        from mm_ads.ctr.model import user_side_inputs

        user_specs = user_candidates_specs(specs, user_side_inputs(spec, specs))
        archive.add_endpoint(USER_SIGNATURE, tf.function(serve), input_signature=[user_specs])
    return write_archive(archive, export_base, version)


_TEMPORARY = re.compile(r"^\.\d+\..*\.tmp$")


def remove_stale_temporaries(export_base):
    """Deletes the `.<version>.*.tmp` directories that interrupted exports (a process killed in `write_archive`)
    left in `export_base`; returns their names. Only for the one process that writes versions there, before it
    writes: a concurrent writer's directory in progress would be deleted too."""
    if not os.path.isdir(export_base):
        return []
    stale = sorted(d for d in os.listdir(export_base)
                   if _TEMPORARY.match(d) and os.path.isdir(os.path.join(export_base, d)))
    for d in stale:
        shutil.rmtree(os.path.join(export_base, d), ignore_errors=True)
    return stale


def write_archive(archive, export_base, version=None):
    """Writes a `keras.export.ExportArchive` to `<export_base>/<version>/` atomically; returns that path.

    `version` defaults to the latest existing + 1; an existing version is never overwritten.
    """
    version = latest_version(export_base) + 1 if version is None else int(version)
    if version < 1:
        raise ValueError(f"version must be a positive integer, got {version}")
    final = os.path.join(export_base, str(version))
    if os.path.exists(final):
        raise FileExistsError(f"Export version {final} already exists")
    os.makedirs(export_base, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=export_base)
    try:
        archive.write_out(tmp, verbose=False)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def export_checkpoint(model_dir, export_base=None, version=None, checkpoint=None):
    """Rebuilds the model of `model_dir`, restores a checkpoint and exports it; returns the version path.

    The model is built unsharded and on the local device whatever the strategy it was trained with
    (checkpoints do not depend on the number of embedding shards).
    """
    from mm_ads.config import ExperimentConfig
    from mm_ads.ctr.model import build_ctr_model
    from mm_ads.data.spec import FeatureSpec
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
    return export_saved_model(model, export_base or os.path.join(model_dir, "export"), version=version, spec=spec)
