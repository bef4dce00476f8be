"""Running one experiment config end to end: `run(config)` → checked inputs, `<model_dir>/config.json`, strategy,
task, trainer, `metrics.json` and the export. The library behind `python -m mm_ads.train` (which is only the
command line), used as well by the reports and the experiment tools.

Tasks: `ctr` (CTR models), `scl` (SCL pre-training of one encoder), `clip` (item image ↔ title alignment, the
paper's CLIP-E baseline). `TASKS`, the task registry, maps each name to its `Task`: its input checks, what runs
it and the metrics the command line prints; `mm_ads.config.TASKS` lists the same names (checked at import).
`validate_inputs` checks the data dir, its manifest and splits, the vector table of a
multimodal variant and its dim, `item_stats.parquet`, and that `model_dir` holds no other run, before anything
is written (its errors, `InputError`, name the flag to fix). The MAKE variants first pre-train MAKE in
`<model_dir>/make/` (phase A; skipped when already done), then train the ID model with it (phase B; see
`mm_ads.ctr.make`). Re-running a config resumes from the last checkpoint in `model_dir`. A multimodal run records
its vector table in `<model_dir>/vector_tables.json` (see `mm_ads.training.vector_record`).
"""

import dataclasses
import json
import os
import time
from collections.abc import Callable

from absl import logging

from mm_ads import config as config_lib
from mm_ads.errors import InputError
from mm_ads.training import model_dir as run_dir
from mm_ads.utils import io as io_utils


def validate_inputs(config):
    """Checks what `run(config)` reads, before it writes anything; returns the dataset's `Manifest`.

    The data dir and its manifest; for CTR its FeatureSpec, the `--train_split` / `--eval_split` impressions,
    `item_stats.parquet` (readable, with its columns: the evaluation's frequency slices read it) and, for a
    multimodal variant, the vector table (a name in the manifest or a path; its footer: readable, the dim the
    manifest declares and the dim of the run being resumed) and, with `--tier_calibration=quantile`,
    SimTier's boundaries computed from the training split (into `config.model.tier_boundaries`); for SCL /
    CLIP-E the tables they train on; and, when `model_dir` holds a run, that it ran the same config. Raises
    `InputError` naming the flag to fix.
    """
    from mm_ads.data.dataset import Manifest

    checks = task(config.task).check_inputs
    data = config.data
    flag = f"--data_dir={data.data_dir}"
    if not os.path.isdir(data.data_dir):
        raise InputError(f"{flag}: no such directory (create a dataset with `python -m mm_ads.data.synthetic` or "
                         "`python -m mm_ads.data.prepare`)")
    try:
        manifest = Manifest.load(data.data_dir)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise InputError(f"{flag}: {e}") from None
    checks(config, manifest)
    run_dir.check_resume(config.model_dir, config)
    return manifest


def _components(manifest):
    """`{component: [split, ...]}` of a dataset, for the errors."""
    return {c: sorted(s) for c, s in manifest.components.items()}


def _check_ctr_inputs(config, manifest):
    """`ctr`: the FeatureSpec, the ctr splits, the vector table, `item_stats.parquet`; calibrates SimTier's tiers."""
    from mm_ads.ctr import tiers
    from mm_ads.data.dataset import read_item_stats

    data, have = config.data, _components(manifest)
    flag = f"--data_dir={data.data_dir}"
    if manifest.spec is None:
        raise InputError(f"{flag}: dataset {manifest.name!r} has no FeatureSpec: it holds no CTR impressions "
                         f"(it has {have})")
    for option, split in (("--train_split", data.train_split), ("--eval_split", data.eval_split)):
        if split not in manifest.components.get("ctr", {}):
            raise InputError(f"{option}={split}: dataset {manifest.name!r} ({data.data_dir}) has no ctr/{split} "
                             f"split (it has {have.get('ctr', [])})")
    if config.model.uses_vectors:
        _validate_vector_table(config, manifest)
    try:
        read_item_stats(manifest)
    except ValueError as e:
        raise InputError(f"{flag}: {e}") from None
    try:
        tiers.calibrate(config)  # quantile SimTier tiers (fills model.tier_boundaries): compared on resume
    except ValueError as e:
        raise InputError(str(e)) from None


def _check_scl_inputs(config, manifest):
    """`scl`: the `pretrain/<modality>_pairs` table and its splits."""
    data, have = config.data, _components(manifest)
    component = f"pretrain/{config.scl.modality}_pairs"
    if component not in manifest.components:
        raise InputError(f"--data_dir={data.data_dir}: dataset {manifest.name!r} has no {component} table for "
                         f"--modality={config.scl.modality} (it has {have})")
    for option, split in (("--train_split", data.train_split), ("--eval_split", data.eval_split)):
        if split not in manifest.components[component]:
            raise InputError(f"{option}={split}: dataset {manifest.name!r} ({data.data_dir}) has no "
                             f"{component}/{split} split (it has {have[component]})")


def _check_clip_inputs(config, manifest):
    """`clip`: the item catalogue (titles and images)."""
    if "items" not in manifest.components:
        raise InputError(f"--data_dir={config.data.data_dir}: dataset {manifest.name!r} has no item catalogue "
                         f"(items.parquet; it has {_components(manifest)}): CLIP-E needs item titles and images")


def _vector_tables(config, manifest):
    """(the flag as given, `[(modality, path, the manifest's name of the table or None)]`) of a multimodal run's
    tables: one per modality (`pipeline.resolve_modality_tables`)."""
    from mm_ads.data import pipeline

    value = config.data.vector_table
    flag = f"--vector_table={value}" if value else "--vector_table (unset: the dataset's only table)"
    try:
        tables = pipeline.resolve_modality_tables(manifest, value or None, option="--vector_table")
    except ValueError as e:  # names the flag itself
        raise InputError(str(e)) from None
    return flag, tables


def _validate_vector_table(config, manifest):
    """The vector tables of a multimodal variant: resolvable, readable, of the dims they must have, and, when
    `model_dir` holds a run, the tables that run recorded (`mm_ads.training.vector_record`)."""
    from mm_ads.data.spec import FeatureSpec
    from mm_ads.data.vectors import read_table_info
    from mm_ads.training import vector_record

    flag, tables = _vector_tables(config, manifest)
    dims = {}
    for modality, path, name in tables:
        try:
            info = read_table_info(path)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"{flag}: {e}") from None
        entries = manifest.extra.get("vector_tables") or {}
        declared = entries.get(name) if isinstance(entries, dict) else None
        if isinstance(declared, dict) and declared.get("dim") is not None and int(declared["dim"]) != info["dim"]:
            raise InputError(f"{flag}: {path} has dim {info['dim']}, but the manifest of {config.data.data_dir} "
                             f"declares dim {declared['dim']} for it")
        dims[modality] = int(info["dim"])
    try:
        vector_record.check(config.model_dir, vector_record.describe_tables(tables),
                            config.train.allow_vector_table_change, "resume", option=flag)
    except ValueError as e:  # VectorTableChanged, or an unreadable record
        raise InputError(str(e)) from None
    # a resumed run (or its MAKE pre-training) was built for the vectors it trained with
    for model_dir in (config.model_dir, run_dir.path(config.model_dir, run_dir.MAKE_DIR)):
        spec_path = run_dir.path(model_dir, run_dir.SPEC)
        if not os.path.exists(spec_path):
            continue
        with open(spec_path) as f:
            trained = {m.name: m.dim for m in FeatureSpec.from_json(json.load(f)).modalities()}
        if trained and trained != dims and list(trained) == list(dims) == [""]:
            raise InputError(f"{flag}: {tables[0][1]} has dim {dims['']}, but the run in {model_dir} was trained "
                             f"with dim {trained['']} ({spec_path}): use a table of dim {trained['']}, or a new "
                             "--model_dir")
        if trained and trained != dims:
            def show(d):
                return ", ".join(f"{m or 'vectors'}: dim {n}" for m, n in d.items())
            raise InputError(f"{flag}: the tables give {show(dims)}, but the run in {model_dir} was trained with "
                             f"{show(trained)} ({spec_path}): use the tables it was trained with, or a new "
                             "--model_dir")


def run(config):
    """Trains `config` (an `ExperimentConfig`); returns the final metrics dict."""
    from mm_ads.training import distribute
    from mm_ads.training import trainer as trainer_lib

    start = time.time()
    runner = task(config.task).run
    # strategy=parameter_server: the worker and ps tasks of the cluster serve here and never return
    distribute.maybe_serve(config.train.strategy)
    validate_inputs(config)  # before anything is written to model_dir (not even the directory)
    os.makedirs(config.model_dir, exist_ok=True)
    strategy = distribute.make_strategy(config.train.strategy, config.train.num_devices)
    if config.train.deterministic:
        trainer_lib.set_global_determinism(config.train.seed)
    chief = distribute.is_chief(strategy)
    if chief:
        io_utils.write_json(run_dir.path(config.model_dir, run_dir.CONFIG), config.to_json())
    return runner(config, strategy, chief, start)


def _record_vector_table(config, chief):
    """The record entry (entries, with several modalities) of a multimodal run's vector tables, written to the model
    dir when new or allowed to change (checked by `validate_inputs`); None for a run without vectors."""
    from mm_ads.data.dataset import Manifest
    from mm_ads.training import vector_record

    if not config.model.uses_vectors:
        return None
    _, tables = _vector_tables(config, Manifest.load(config.data.data_dir))
    current = vector_record.describe_tables(tables)  # the files were hashed once already in this process
    recorded = vector_record.recorded_entries(config.model_dir)
    if recorded is None or vector_record.differences(recorded, current):  # new, or a change allowed (and warned)
        return vector_record.write(config.model_dir, current) if chief else current
    return vector_record.single_or_list(recorded)


def _pretrain_make(config, strategy, chief, vectors=None):
    """Phase A of a MAKE variant (skipped when finished); returns `(metrics, checkpoint)`."""

    from mm_ads.ctr import make as make_lib

    done = make_lib.finished_pretraining(config)
    if done is not None:
        logging.info("MAKE pre-training already done (%s): skipped", os.path.join(config.model_dir, make_lib.MAKE_DIR))
        return done
    cfg = make_lib.pretrain_config(config)
    logging.info("MAKE pre-training (phase A): %d epochs in %s", cfg.train.epochs, cfg.model_dir)
    os.makedirs(cfg.model_dir, exist_ok=True)
    run_dir.check_resume(cfg.model_dir, cfg)
    if chief:
        io_utils.write_json(run_dir.path(cfg.model_dir, run_dir.CONFIG), cfg.to_json())
    metrics = _run_ctr(cfg, strategy, chief, time.time(), vectors)
    return metrics, run_dir.latest_checkpoint(cfg.model_dir, best=bool(cfg.train.early_stopping_patience))


def _run_ctr_task(config, strategy, chief, start):
    """`ctr`: records the run's vector table (a multimodal variant), then trains (MAKE variants: both phases)."""
    return _run_ctr(config, strategy, chief, start, _record_vector_table(config, chief))


def _run_ctr(config, strategy, chief, start, vectors=None):
    from mm_ads.ctr.task import CTRTask
    from mm_ads.export import export_saved_model
    from mm_ads.training import trainer as trainer_lib
    from mm_ads.training import vector_record

    make_metrics = make_checkpoint = None
    if config.model.pretrains_make:
        make_metrics, make_checkpoint = _pretrain_make(config, strategy, chief, vectors)
        logging.info("MAKE (%s) from %s", "frozen" if config.model.make_frozen else "fine-tuned", make_checkpoint)
    task = CTRTask(config, make_checkpoint=make_checkpoint)
    if chief:
        # the model's own FeatureSpec (with the vector features it was trained with): export needs no data
        io_utils.write_json(run_dir.path(config.model_dir, run_dir.SPEC), task.spec.to_json())
    trainer = trainer_lib.Trainer(task, config.train, config.data.batch_size, config.model_dir, strategy)
    logging.info("Training %s: %s", config.model.variant, task.describe())
    metrics = trainer.train()
    metrics = dict(metrics)
    metrics["variant"] = config.model.variant
    metrics["steps"] = int(trainer.step.numpy())
    metrics["planned_steps"] = trainer.total_steps
    metrics["epochs"] = config.train.epochs
    if trainer.early_stopping:
        metrics["early_stopping"] = trainer.early_stopping
    metrics["eval_history"] = trainer.history
    metrics["wall_s"] = round(time.time() - start, 1)  # of this invocation (a resumed run: its part)
    if make_metrics is not None:
        metrics["make_pretrain"] = make_metrics
    if chief and config.train.export:
        if config.train.strategy in ("multi_worker", "parameter_server"):
            # the trained variables live in distributed containers (or on the ps tasks): export a local,
            # unsharded model restored from the final checkpoint (the checkpoint does not depend on shards)
            from mm_ads.export.saved_model import export_checkpoint

            metrics["export_path"] = export_checkpoint(
                config.model_dir, checkpoint=trainer.latest_checkpoint,
                allow_vector_table_change=config.train.allow_vector_table_change)
        else:
            metrics["export_path"] = export_saved_model(trainer.model, run_dir.path(config.model_dir, run_dir.EXPORT),
                                                        spec=task.spec, vectors=vector_record.export_vectors(vectors))
    if chief:
        io_utils.write_json(run_dir.path(config.model_dir, run_dir.METRICS), metrics)
    return metrics


def _run_scl(config, strategy, chief, start):
    from mm_ads.scl.export import export_encoder
    from mm_ads.scl.task import SCLTask
    from mm_ads.training import trainer as trainer_lib

    task = SCLTask(config)
    if chief:
        task.write_vocabulary(config.model_dir)
    trainer = trainer_lib.Trainer(task, config.train, config.data.batch_size, config.model_dir, strategy)
    logging.info("Training SCL: %s", task.describe())
    metrics = dict(trainer.train())
    metrics.update(task="scl", modality=config.scl.modality, steps=trainer.total_steps, epochs=config.train.epochs,
                   eval_history=trainer.history, wall_s=round(time.time() - start, 1))
    if chief:
        encoder = trainer.model.encoder
        io_utils.save_keras(encoder, run_dir.path(config.model_dir, run_dir.ENCODER))
        if config.train.export:
            metrics["export_path"] = export_encoder(encoder, run_dir.path(config.model_dir, run_dir.EXPORT),
                                                    config.scl.modality, config.scl.image_size)
        io_utils.write_json(run_dir.path(config.model_dir, run_dir.METRICS), metrics)
    return metrics


def _run_clip(config, strategy, chief, start):
    from mm_ads.scl.clip import CrossModalTask
    from mm_ads.training import trainer as trainer_lib

    task = CrossModalTask(config)
    trainer = trainer_lib.Trainer(task, config.train, config.data.batch_size, config.model_dir, strategy)
    logging.info("Training CLIP-E (item image <-> title): %s", task.describe())
    metrics = dict(trainer.train())
    metrics.update(task="clip", steps=trainer.total_steps, epochs=config.train.epochs, eval_history=trainer.history,
                   skipped_items=task.skipped, wall_s=round(time.time() - start, 1))
    if chief:
        metrics["encoders"] = task.save_encoders(trainer.model, config.model_dir)
        io_utils.write_json(run_dir.path(config.model_dir, run_dir.METRICS), metrics)
    return metrics


@dataclasses.dataclass(frozen=True)
class Task:
    """What `run` does for one task (`config.task`), besides what every task shares.

    Attributes:
        check_inputs: `(config, manifest)` → None; raises `InputError` naming the flag to fix (see
            `validate_inputs`).
        run: `(config, strategy, chief, start)` → the final metrics dict; builds the task and its trainer,
            trains, writes `metrics.json` and the exports (chief).
        summary: the metrics `python -m mm_ads.train` prints, headline first (the chief's metrics hold it).
    """

    check_inputs: Callable
    run: Callable
    summary: tuple


_CTR_SUMMARY = ("auc", "gauc", "logloss", "calibration", "num_examples")
_RETRIEVAL_SUMMARY = ("acc@1", "acc@5", "acc@10", "num_queries")

# The task registry: `config.task` → what runs it. `mm_ads.config.TASKS` names the same tasks (config may not
# import runs: docs/architecture.md), checked below when this module is imported.
TASKS = {
    "ctr": Task(_check_ctr_inputs, _run_ctr_task, _CTR_SUMMARY),  # CTR models (MAKE variants: two phases)
    "scl": Task(_check_scl_inputs, _run_scl, _RETRIEVAL_SUMMARY),  # SCL pre-training of one encoder
    "clip": Task(_check_clip_inputs, _run_clip, _RETRIEVAL_SUMMARY),  # CLIP-E: item image <-> title
}


def task(name):
    """The registered `Task` of a task name; a `ValueError` naming the known tasks for any other name."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: the known tasks are {', '.join(TASKS)}")
    return TASKS[name]


def check_registry(tasks, names):
    """Raises `RuntimeError` unless the registry `tasks` has exactly the task names `names` (in that order)."""
    if tuple(tasks) != tuple(names):
        raise RuntimeError(f"mm_ads.runs.TASKS registers {tuple(tasks)}, but mm_ads.config.TASKS names "
                           f"{tuple(names)}: register a task in both")


check_registry(TASKS, config_lib.TASKS)
