"""Flags of `python -m mm_ads.train`, one per config field (see `mm_ads.config`).

Flag names equal the dataclass field names (`--batch_size` → `DataConfig.batch_size`,
`--variant` → `CTRModelConfig.variant`, ...); defaults equal the dataclass defaults, so a
flagfile only lists what differs. Nothing below `main` reads FLAGS: `config_from_flags()`
turns the holders into a validated `ExperimentConfig`.
"""

import dataclasses

from absl import flags

from mm_ads import config as config_lib

TASK = flags.DEFINE_enum("task", "ctr", list(config_lib.TASKS),
                         "Which task to train: ctr, scl or clip (item image <-> title alignment, CLIP-E).")
MODEL_DIR = flags.DEFINE_string("model_dir", None, "Checkpoints, summaries, config.json, metrics.json, export.")

_SECTIONS = config_lib._SECTION_KINDS
_HOLDERS = {}


def _define(section, field, default):
    help_text = f"{section}.{field.name} (see mm_ads.config)."
    if isinstance(default, bool):
        return flags.DEFINE_bool(field.name, default, help_text)
    if isinstance(default, int):
        return flags.DEFINE_integer(field.name, default, help_text)
    if isinstance(default, float):
        return flags.DEFINE_float(field.name, default, help_text)
    if isinstance(default, tuple):
        kind = "floats" if field.name in config_lib.FLOAT_SEQUENCES else "ints"
        return flags.DEFINE_list(field.name, [str(v) for v in default], help_text + f" Comma-separated {kind}.")
    return flags.DEFINE_string(field.name, default, help_text)


for _section, _kind in _SECTIONS:
    _defaults = _kind()
    for _field in dataclasses.fields(_kind):
        _HOLDERS[(_section, _field.name)] = _define(_section, _field, getattr(_defaults, _field.name))


def config_from_flags():
    """The validated `ExperimentConfig` described by the parsed flags (`config_lib.config_from_values`)."""
    values = {name: holder.value for (_, name), holder in _HOLDERS.items()}
    return config_lib.config_from_values(dict(values, task=TASK.value, model_dir=MODEL_DIR.value or ""))
