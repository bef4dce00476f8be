r"""Trains a model: `python -m mm_ads.train --flagfile=configs/{ctr,scl}/<name>.flags --data_dir=DIR --model_dir=DIR`.

Tasks (`mm_ads.runs.TASKS`): `ctr` (CTR models), `scl` (SCL pre-training of one encoder), `clip` (item image ↔
title alignment, the paper's CLIP-E baseline; writes `text_encoder.keras` and `image_encoder.keras`).

Only the command line: flags → validated config → `mm_ads.runs.run` (the library the reports use too): validated
inputs (`validate_inputs`: the data dir, its manifest
and splits, the vector table of a multimodal variant and its dim, `item_stats.parquet`; nothing is written
to `--model_dir`, not even the directory, before these checks pass, and their errors name the flag to
fix) → `<model_dir>/config.json` → strategy →
task (`CTRTask`, `SCLTask` or `CrossModalTask`) → trainer → `metrics.json` and a SavedModel under
`<model_dir>/export/<version>/` (for SCL: the encoder, raw text / encoded image bytes in → vectors;
the trained encoder is also saved as `<model_dir>/encoder.keras` for `python -m mm_ads.encode`).
The MAKE variants (`make`, `simtier_make`) first pre-train MAKE in `<model_dir>/make/` for
`--make_epochs` epochs (phase A; skipped when already done), then train the ID model with it
(phase B); `metrics.json` holds phase A's metrics under `make_pretrain` (see `mm_ads.ctr.make`).
Flags given on the command line override the flagfile. Re-running the same command resumes
from the last checkpoint in `model_dir`. A multimodal run records its vector table (encoder version, dim,
content fingerprint) in `<model_dir>/vector_tables.json`; resuming with a table that differs is refused
(`--allow_vector_table_change` goes on with a warning; see `mm_ads.training.vector_record`).
"""

import json
import os
import sys

from absl import app

from mm_ads import runs
from mm_ads.errors import InputError
from mm_ads.runs import run, validate_inputs  # noqa: F401  (the library behind this command: mm_ads.runs)
from mm_ads.training import model_dir as run_dir


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from mm_ads import flags as flags_lib  # defines the flags; only the program does (see mm_ads.flags)

    config = flags_lib.config_from_flags()
    try:
        metrics = run(config)
    except InputError as e:  # raised before anything was written
        raise app.UsageError(str(e)) from None
    keys = runs.task(config.task).summary
    if keys[0] not in metrics:
        print("done: this worker is not the chief; the chief writes the metrics, checkpoints and export")
        return
    print(json.dumps({k: metrics.get(k) for k in keys}, indent=None))
    if "make_pretrain" in metrics:
        print("make_pretrain: " + json.dumps({k: metrics["make_pretrain"].get(k) for k in keys}, indent=None))
    print(f"metrics: {os.path.join(os.path.abspath(config.model_dir), run_dir.METRICS)}")
    if "export_path" in metrics:
        print(f"export: {metrics['export_path']}")


if __name__ == "__main__":
    from mm_ads import flags as _flags  # noqa: F401  (flags must exist before app.run parses argv)

    app.run(main, argv=sys.argv)
