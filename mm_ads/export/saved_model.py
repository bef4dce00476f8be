"""Exports CTR models as SavedModels that TF Serving loads, in its versioned layout.

`<export_base>/<version>/` with `version` a positive integer (TF Serving serves the largest).
A version is written into a temporary sibling directory and renamed into place, so a server
watching `<export_base>` never sees a half-written version.

The `serving_default` signature takes the model's inputs by their FeatureSpec names — the
multimodal vectors are input features (`item_vector` [B, D], `hist_item_vector` [B, S, D],
float32, plus their `_missing` flags; with several modalities `item_vector_<m>` / `hist_item_vector_<m>` per
modality m) — and returns `{"ctr": [B]}`. Only stock TF ops are in
the graph, so a stock TF Serving loads it.

Given the FeatureSpec, a second signature, `user_candidates`, scores the B candidates of ONE user: the same
inputs, but the user-side ones (`FeatureSpec.user_side_inputs`: user/context features, the behaviour
sequence's ids, `hist_item_vector` [1, S, D] and its flags) have batch 1 and are not repeated per candidate.
Same scores as `serving_default` on the repeated inputs, with the history-only work done once (BUILD.md:
serving benchmark).

Given the vector table the model was trained with (`vectors=`), the version records it in
`<version>/assets.extra/mm_ads_vectors.json` (TF Serving's place for files next to a SavedModel, which loaders
ignore): for each vector input its dim and the encoder version (plus the table's name and content fingerprint).
The prediction server refuses a version whose record does not match its index table
(`mm_ads.serving.server.model_manager.vector_mismatch`). The file is written inside the version's temporary directory,
so it appears with the version, atomically.

Every version also carries TF Serving's warm-up file, `<version>/assets.extra/tf_serving_warmup_requests`
(`mm_ads.export.warmup`): one `PredictionLog` record per (signature, batch size of `warmup_batch_sizes`), with
valid inputs (ids 1, unit vectors, missing flags 0). TF Serving replays it before the version serves; so does the
prediction server (`mm_ads.serving.server.model_manager`). It is written inside the temporary directory too.
"""

import json
import os
import re
import shutil
import tempfile

import keras
import tensorflow as tf

from mm_ads.export import warmup as warmup_lib
from mm_ads.utils import io as io_utils


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


VECTORS_ASSET = os.path.join("assets.extra", "mm_ads_vectors.json")
VECTORS_FORMAT = 1


def vector_record(specs, vectors, spec=None):
    """The `mm_ads_vectors.json` content: `{"format_version", "inputs": {vector input: {dim, encoder_version, ...}}}`.

    Args:
        specs: `{input name: tf.TensorSpec}` of the served signature.
        vectors: `{"encoder_version", "dim", ...}` of the vector table the model was trained with (what
            `mm_ads.training.vector_record` records in the model dir); every key is copied per input. With several
            modalities, `{modality: {...}}`: each input gets its modality's (and `"modality"`).
        spec: the model's `FeatureSpec` (its `vector` features are the vector inputs; default `item_vector` and
            `hist_item_vector`).
    """
    from mm_ads.data.spec import HIST_ITEM_VECTOR, ITEM_VECTOR

    features = spec.by_role("vector") if spec is not None else []
    names = [f.name for f in features] if spec is not None else [ITEM_VECTOR, HIST_ITEM_VECTOR]
    modality_of = {f.name: f.modality for f in features}
    inputs = {}
    for name in names:
        if name not in specs:
            continue
        modality = modality_of.get(name, "")
        if modality:  # several modalities: `vectors` holds one record per modality
            if modality not in vectors:
                raise ValueError(f"input {name!r} of modality {modality!r}: the vector table records hold only "
                                 f"{sorted(vectors)}")
            inputs[name] = dict(_input_vector_record(name, specs[name], vectors[modality]), modality=modality)
        else:
            inputs[name] = _input_vector_record(name, specs[name], vectors)
    return {"format_version": VECTORS_FORMAT, "inputs": inputs}


def _input_vector_record(name, tensor_spec, vectors):
    """One vector input's entry of `vector_record`: the table's record with the input's dim (checked)."""
    dim = int(tensor_spec.shape[-1])
    if vectors.get("dim") is not None and int(vectors["dim"]) != dim:
        raise ValueError(f"input {name!r} takes vectors of dim {dim}, but the vector table "
                         f"{vectors.get('table', '')} has dim {vectors['dim']}")
    if not vectors.get("encoder_version"):
        raise ValueError(f"the vector table record {vectors} has no encoder_version")
    return dict(vectors, dim=dim)


def read_vector_record(version_dir):
    """The vector record of an exported version (`VECTORS_ASSET`), or None when it has none.

    Raises `ValueError` naming the file when it is not a record of this format.
    """
    path = os.path.join(version_dir, VECTORS_ASSET)
    record = io_utils.read_json_if_exists(path)
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("format_version") != VECTORS_FORMAT or \
            not isinstance(record.get("inputs"), dict):
        raise ValueError(f"{path} is not a vector record of format {VECTORS_FORMAT} "
                         "({\"format_version\": 1, \"inputs\": {...}})")
    return record


def export_saved_model(model, export_base, version=None, outputs=("ctr",), spec=None, vectors=None,
                       warmup_batch_sizes=warmup_lib.DEFAULT_BATCH_SIZES):
    """Writes `model` to `<export_base>/<version>/` atomically and returns that path.

    Args:
        model: a functional Keras model with named inputs and a dict output.
        export_base: the TF Serving model base path.
        version: integer version; default the latest existing + 1.
        outputs: which of the model's outputs the signatures return.
        spec: the model's `FeatureSpec`: adds the `user_candidates` signature, whose user-side inputs
            (`FeatureSpec.user_side_inputs`) have batch 1 (a model of `mm_ads.ctr.model.build_ctr_model`, or one
            that broadcasts its user-side inputs likewise).
        vectors: `{"encoder_version", "dim", ...}` of the vector table the model was trained with: recorded in
            `VECTORS_ASSET` for the server's check (see the module docstring). None: no record.
        warmup_batch_sizes: batch sizes of the warm-up requests written for each signature
            (`mm_ads.export.warmup.WARMUP_ASSET`); default the prediction server's (1 and 200). Empty: no
            warm-up file (TF Serving and the prediction server then warm up without it).
    """
    warmup_batch_sizes = warmup_lib.check_batch_sizes(warmup_batch_sizes)
    specs = serving_signature_specs(model)
    extra = None
    if vectors is not None:
        record = vector_record(specs, vectors, spec)
        if record["inputs"]:
            extra = {VECTORS_ASSET: json.dumps(record, indent=2, sort_keys=True).encode()}

    def serve(inputs):
        result = model(inputs, training=False)
        return {k: tf.identity(result[k], name=k) for k in outputs}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve, input_signature=[specs])
    signatures = {"serving_default": specs}
    if spec is not None:
        user_specs = user_candidates_specs(specs, spec.user_side_inputs(specs))
        archive.add_endpoint(USER_SIGNATURE, tf.function(serve), input_signature=[user_specs])
        signatures[USER_SIGNATURE] = user_specs
    warmup = warmup_lib.warmup_logs(signatures, warmup_batch_sizes, spec) if warmup_batch_sizes else None
    return write_archive(archive, export_base, version, extra, warmup)


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


def write_archive(archive, export_base, version=None, extra_files=None, warmup=None):
    """Writes a `keras.export.ExportArchive` to `<export_base>/<version>/` atomically; returns that path.

    `version` defaults to the latest existing + 1; an existing version is never overwritten. `extra_files`
    (`{path relative to the version: bytes}`) and the warm-up records `warmup` (`PredictionLog`s, written as
    `mm_ads.export.warmup.WARMUP_ASSET`; None: no file) are written into the version before it is renamed into
    place.
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
        for rel, data in (extra_files or {}).items():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            with open(os.path.join(tmp, rel), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if warmup is not None:
            warmup_lib.write_warmup_file(os.path.join(tmp, warmup_lib.WARMUP_ASSET), warmup)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def export_checkpoint(model_dir, export_base=None, version=None, checkpoint=None, allow_vector_table_change=False,
                      warmup_batch_sizes=warmup_lib.DEFAULT_BATCH_SIZES):
    """Rebuilds the model of `model_dir`, restores a checkpoint and exports it; returns the version path.

    The model is built unsharded and on the local device whatever the strategy it was trained with
    (checkpoints do not depend on the number of embedding shards). The vector table the run recorded
    (`mm_ads.training.vector_record`) goes into the version for the server's check; when the config's table
    is readable here and differs from the record, the export is refused (`VectorTableChanged`) unless
    `allow_vector_table_change` (then a warning). `warmup_batch_sizes`: those of the version's warm-up file
    (`export_saved_model`).
    """
    from mm_ads.ctr.model import build_ctr_model
    from mm_ads.training import model_dir as run_dir
    from mm_ads.training.checkpoint import restore_model

    config, spec = run_dir.load_ctr_run(model_dir)
    checkpoint = checkpoint or run_dir.require_checkpoint(model_dir)
    vectors = _checked_vector_table(model_dir, config, allow_vector_table_change) \
        if config.model.uses_vectors else None
    model = build_ctr_model(spec, config.model)
    restore_model(model, checkpoint)
    return export_saved_model(model, export_base or run_dir.path(model_dir, run_dir.EXPORT), version=version, spec=spec,
                              vectors=vectors, warmup_batch_sizes=warmup_batch_sizes)


def _checked_vector_table(model_dir, config, allow_change):
    """What the export records about the run's vector tables (None when the run recorded none), after comparing
    the tables its config names with the record, when they can be read here (an export reads no data)."""
    from absl import logging

    from mm_ads.data.dataset import Manifest
    from mm_ads.data.pipeline import resolve_modality_tables
    from mm_ads.training import vector_record

    recorded = vector_record.recorded_entries(model_dir)
    if recorded is None:
        logging.warning("%s records no vector table (a run from before the record): the export records no encoder "
                        "version, so a server checks only the vectors' dim", model_dir)
        return None
    recorded = vector_record.single_or_list(recorded)
    try:
        manifest = Manifest.load(config.data.data_dir)
        tables = resolve_modality_tables(manifest, config.data.vector_table or None, option="--vector_table")
        current = vector_record.describe_tables(tables)
    except (OSError, ValueError) as e:
        logging.warning("the vector table of %s cannot be read here (%s): not compared with the record %s; the "
                        "export records the recorded table", model_dir, e,
                        os.path.join(model_dir, vector_record.RECORD_FILE))
        return vector_record.export_vectors(recorded)
    option = f"data.vector_table={config.data.vector_table!r} of {os.path.join(model_dir, 'config.json')}"
    if vector_record.check(model_dir, current, allow_change, "export", option=option):
        return vector_record.export_vectors(current)  # allowed: the table the model is exported for
    return vector_record.export_vectors(recorded)
