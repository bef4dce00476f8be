"""The run directory (`--model_dir`): the one place that names its files and decides whether a run in it may be
resumed or reused.

```
<model_dir>/
  config.json          the run's ExperimentConfig (CONFIG), written before training starts
  feature_spec.json    the FeatureSpec the model was built for (SPEC; CTR runs)
  eval_history.json    one entry per evaluation, with its split (EVAL_HISTORY; early stopping reads it on resume)
  ckpt/                rolling training checkpoints (CKPT)
  ckpt_best/           the best evaluation's checkpoint under early stopping (CKPT_BEST)
  encoder.keras        the trained encoder of an SCL run (ENCODER)
  export/<version>/    SavedModels (EXPORT)
  make/                MAKE's pre-training, itself a run directory (MAKE_DIR; the MAKE variants)
  metrics.json         written last: the run is finished (METRICS)
```

Resume rule: a run continues in a directory that holds a run of the same data and model config (and SCL config
for the encoder tasks); the number of epochs or steps may grow. Reuse rule (reports): a finished run is reused
when data, model, training and SCL configs all equal the planned run's, except how it was checkpointed, logged
or exported.
"""

import json
import os

from mm_ads import config as config_lib
from mm_ads.errors import InputError

CONFIG = "config.json"
SPEC = "feature_spec.json"
METRICS = "metrics.json"
EVAL_HISTORY = "eval_history.json"
CKPT = "ckpt"
CKPT_BEST = "ckpt_best"
ENCODER = "encoder.keras"
EXPORT = "export"
MAKE_DIR = "make"

# training settings that do not change what a finished run computed
_NOT_RESULT_SETTINGS = ("checkpoint_every", "log_every", "export")


def path(model_dir, name):
    """`<model_dir>/<name>` for one of this module's names."""
    return os.path.join(model_dir, name)


def latest_checkpoint(model_dir, best=False):
    """The newest checkpoint of `ckpt/` (or `ckpt_best/` with `best`), None when there is none."""
    import tensorflow as tf

    return tf.train.latest_checkpoint(path(model_dir, CKPT_BEST if best else CKPT))


def saved_config(model_dir, strict=False):
    """The JSON of the run config saved in `model_dir` (None when there is none), with the fields added since that
    run at their defaults, as when it was trained. A saved config this release cannot parse is returned as
    stored, or raises ValueError with `strict`."""
    file = path(model_dir, CONFIG)
    if not os.path.exists(file):
        return None
    with open(file) as f:
        saved = json.load(f)
    try:
        saved = config_lib.ExperimentConfig.from_json(saved).to_json()
    except (ValueError, TypeError):
        if strict:
            raise
    return json.loads(json.dumps(saved))


def config_difference(saved, config, sections, ignore_train=False):
    """The first of `sections` where a saved config JSON differs from `config`: `(section, saved, planned)` dicts,
    or None. Model options the CTR variant never reads (`CTRModelConfig.unused_fields`) are left out;
    `ignore_train` also leaves out the training settings that do not change results (checkpointing, logging,
    export)."""
    planned = json.loads(json.dumps(config.to_json()))
    for section in sections:
        a, b = saved.get(section), planned[section]
        if section == "model" and config.task == "ctr" and a is not None:  # options the variant never reads
            a, b = dict(a), dict(b)
            for key in config.model.unused_fields():
                a.pop(key, None)
                b.pop(key, None)
        if ignore_train and section == "train":
            a, b = dict(a or {}), dict(b)
            for key in _NOT_RESULT_SETTINGS:
                a.pop(key, None)
                b.pop(key, None)
        if a != b:
            return section, a, b
    return None


def check_resume(model_dir, config):
    """Raises `InputError` when `model_dir` holds a run of another data, model (or, for SCL / CLIP-E, SCL) config
    than `config`: continuing it would mix two models. Nothing to check in an empty directory."""
    saved = saved_config(model_dir)
    if saved is None:
        return
    sections = ("data", "model", "scl") if config.task in ("scl", "clip") else ("data", "model")
    diff = config_difference(saved, config, sections)
    if diff:
        section, old, new = diff
        raise InputError(f"{path(model_dir, CONFIG)} holds a different {section} config than this run ({old} vs "
                         f"{new}): use a new --model_dir, or the same flags to resume")


def wall_s(metrics):
    """Seconds the run's last invocation took, from its `metrics.json` (`wall_s`; `wall_seconds` in runs written
    before durations were named with `_s`)."""
    return float(metrics.get("wall_s", metrics.get("wall_seconds", 0.0)))


def finished_metrics(model_dir):
    """The `metrics.json` of a finished run in `model_dir`, or None."""
    file = path(model_dir, METRICS)
    if os.path.exists(file):
        with open(file) as f:
            return json.load(f)
    return None


def reusable_metrics(model_dir, config):
    """The metrics of a finished run in `model_dir` if it ran `config`, None if no run finished there; ValueError
    when the finished run had another config (its results would be wrong for `config`)."""
    metrics = finished_metrics(model_dir)
    if metrics is None:
        return None
    diff = config_difference(saved_config(model_dir, strict=True), config, ("data", "model", "train", "scl"),
                             ignore_train=True)
    if diff:
        section, a, b = diff
        raise ValueError(f"{model_dir} holds a finished run of another {section} config ({a} vs {b}): use a new "
                         "--output_dir, or delete that run")
    return metrics


def load_ctr_run(model_dir, name=None):
    """`(ExperimentConfig, FeatureSpec)` of a CTR run directory; FileNotFoundError naming the missing file when
    `model_dir` (shown as `name`, e.g. the flag that gave it) is not one."""
    from mm_ads.data.spec import FeatureSpec

    files = {n: path(model_dir, n) for n in (CONFIG, SPEC)}
    for file in files.values():
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file} not found: {name or model_dir} is not a model dir written by "
                                    "python -m mm_ads.train")
    with open(files[CONFIG]) as f:
        config = config_lib.ExperimentConfig.from_json(json.load(f))
    with open(files[SPEC]) as f:
        spec = FeatureSpec.from_json(json.load(f))
    return config, spec


def require_checkpoint(model_dir, name=None):
    """The newest checkpoint of `ckpt/`; FileNotFoundError when there is none."""
    checkpoint = latest_checkpoint(model_dir)
    if not checkpoint:
        where = f"{name}: no checkpoint" if name else "No checkpoint"
        raise FileNotFoundError(f"{where} in {path(model_dir, CKPT)}")
    return checkpoint
