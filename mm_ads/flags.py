"""Flags of `python -m mm_ads.train`, one per config field (see `mm_ads.config`).

Flag names equal the dataclass field names (`--batch_size` → `DataConfig.batch_size`,
`--variant` → `CTRModelConfig.variant`, ...); defaults equal the dataclass defaults, so a
flagfile only lists what differs. Nothing below `main` reads FLAGS: `config_from_flags()`
turns the holders into a validated `ExperimentConfig`.
"""

import dataclasses

from absl import flags

from mm_ads import config as config_lib
from mm_ads.options import define_flag, field_help

TASK = flags.DEFINE_enum("task", "ctr", list(config_lib.TASKS),
                         "Which task to train: ctr, scl or clip (item image <-> title alignment, CLIP-E).")
MODEL_DIR = flags.DEFINE_string("model_dir", None, "Checkpoints, summaries, config.json, metrics.json, export.")

_SECTIONS = config_lib.SECTION_KINDS
_HOLDERS = {}


for _section, _kind in _SECTIONS:
    _defaults, _helps = _kind(), field_help(_kind)
    for _field in dataclasses.fields(_kind):
        _help = _helps.get(_field.name)
        _HOLDERS[(_section, _field.name)] = define_flag(
            _field.name, getattr(_defaults, _field.name),
            f"{_help} ({_section}.{_field.name})" if _help else f"{_section}.{_field.name} (see mm_ads.config).",
            float_sequence=_field.name in config_lib.FLOAT_SEQUENCES)


def config_from_flags():
    """The validated `ExperimentConfig` described by the parsed flags (`config_lib.config_from_values`); an
    `app.UsageError` with the reason when they describe none."""
    from absl import app

    values = {name: holder.value for (_, name), holder in _HOLDERS.items()}
    try:
        return config_lib.config_from_values(dict(values, task=TASK.value, model_dir=MODEL_DIR.value or ""))
    except ValueError as e:
        raise app.UsageError(str(e)) from None
