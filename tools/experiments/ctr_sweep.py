r"""Settings of one CTR variant compared on the validation split, over seeds: how the defaults were chosen.

```
python -m tools.experiments.ctr_sweep --data_dir=runs/ml100k/data --vector_table=runs/ml100k/vectors.parquet \
    --variant=simtier --seeds=0,1,2 --output_dir=runs/sweeps/simtier \
    --settings="tier_transform=none;tier_transform=fraction;tier_transform=fraction,tier_calibration=quantile"
```

Every setting (`;`-separated; each a `,`-separated list of `flag=value` applied on top of
`configs/ctr/<variant>.flags`) and the `id` reference run for every seed, evaluated on `--eval_split` (default
`valid`: choices are made there, never on test). Runs are normal model dirs under `--output_dir` and a finished
one is reused. Prints a markdown table (GAUC, AUC, LogLoss mean ± std; GAUC vs id per seed, mean ± std) and
writes `sweep.json`. `--vector_table=random` replaces every item's vector by a random unit vector (dim
`--random_dim`, seed 0): the control where vectors carry nothing. `--id_settings` trains the id reference with its own
settings (e.g. `epochs=12,early_stopping_patience=1`: every run, id included, at its best epoch on the eval split;
the column "chosen epoch per seed" lists those epochs).
"""

import os
import sys

import numpy as np
from absl import app, flags

from mm_ads.reports.paper import mean_std
from tools.experiments import parse_overrides

_DATA_DIR = flags.DEFINE_string("data_dir", None, "A prepared dataset.")
_VECTOR_TABLE = flags.DEFINE_string("vector_table", "", "Vector table (path or manifest name) or `random`.")
_RANDOM_DIM = flags.DEFINE_integer("random_dim", 384, "Dim of the random vectors of --vector_table=random.")
_VARIANT = flags.DEFINE_string("variant", "simtier", "The CTR variant (configs/ctr/<variant>.flags).")
_SETTINGS = flags.DEFINE_string("settings", "", "';'-separated settings, each ','-separated flag=value.")
_ID_SETTINGS = flags.DEFINE_string("id_settings", "", "','-separated flag=value of the id reference runs (e.g. "
                                   "epochs=12,early_stopping_patience=1: id trained to its best epoch).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_EVAL_SPLIT = flags.DEFINE_string("eval_split", "valid", "Where the settings are compared.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Runs, sweep.json.")
flags.mark_flags_as_required(["data_dir", "output_dir"])


def _random_table(data_dir, dim, path):
    import pyarrow.parquet as pq

    from mm_ads.data.dataset import Manifest
    from mm_ads.data.vectors import random_unit_vectors, write_vector_table

    if not os.path.exists(path):
        items = Manifest.load(data_dir).files("items", "all")[0]
        ids = pq.read_table(items, columns=["item_id"]).column("item_id").to_numpy().astype(np.int64)
        write_vector_table(path, ids, random_unit_vectors(len(ids), dim), "random-unit-vectors-seed0")
    return path


def _summary(metrics):
    out = {k: metrics[k] for k in ("auc", "gauc", "logloss")}
    if "early_stopping" in metrics:
        out["best_epoch"] = metrics["early_stopping"]["best_epoch"]
    return out


def run_sweep(data_dir, vector_table, variant, settings, seeds, eval_split, output_dir, id_setting=""):
    from mm_ads import config as config_lib
    from mm_ads import runs as runs_lib
    from mm_ads.reports.options import reusable_metrics

    def one(name, variant, overrides, seed):
        values = config_lib.read_flagfile(f"configs/ctr/{variant}.flags")
        values.update(data_dir=data_dir, seed=str(seed), export="false", eval_split=eval_split,
                      model_dir=os.path.join(output_dir, name, f"seed{seed}"))
        if variant != "id":
            values["vector_table"] = vector_table
        values.update(overrides)
        config = config_lib.config_from_values(values)
        return reusable_metrics(config.model_dir, config) or runs_lib.run(config)

    results = {"variant": variant, "eval_split": eval_split, "vector_table": vector_table, "id_settings": id_setting,
               "settings": {}}
    id_overrides = parse_overrides(id_setting)
    id_name = "_".join(["id"] + [f"{k}-{v}" for k, v in id_overrides.items()])
    ids = {s: one(id_name, "id", id_overrides, s) for s in seeds}
    results["settings"][id_name] = {"runs": {str(s): _summary(ids[s]) for s in seeds}}
    for setting in settings:
        overrides = parse_overrides(setting)
        name = "_".join(f"{k}-{v}" for k, v in overrides.items()) or "default"
        runs = {s: one(f"{variant}_{name}", variant, overrides, s) for s in seeds}
        results["settings"][setting or "default"] = {
            "runs": {str(s): _summary(runs[s]) for s in seeds},
            "gauc_vs_id": mean_std([(runs[s]["gauc"] - ids[s]["gauc"]) / ids[s]["gauc"] for s in seeds]),
        }
    for entry in results["settings"].values():
        for key in ("auc", "gauc", "logloss"):
            entry[key] = mean_std([r[key] for r in entry["runs"].values()])
    return results


def to_markdown(results):
    lines = [f"{results['variant']} on `{results['eval_split']}` (vectors: {results['vector_table']})", "",
             "| setting | GAUC | AUC | LogLoss | GAUC vs id | chosen epoch per seed |", "|---|---:|---:|---:|---:|---|"]
    for name, e in results["settings"].items():
        rel = f"{e['gauc_vs_id'][0]:+.2%} ± {e['gauc_vs_id'][1]:.2%}" if "gauc_vs_id" in e else "—"
        epochs = ", ".join(str(r["best_epoch"]) for r in e["runs"].values() if "best_epoch" in r) or "—"
        lines.append(f"| {name} | {e['gauc'][0]:.4f} ± {e['gauc'][1]:.4f} | {e['auc'][0]:.4f} ± {e['auc'][1]:.4f} | "
                     f"{e['logloss'][0]:.4f} ± {e['logloss'][1]:.4f} | {rel} | {epochs} |")
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from mm_ads.utils import io as io_utils
    from mm_ads.utils.tf_startup import hide_retracing_warnings

    hide_retracing_warnings()
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    table = _VECTOR_TABLE.value
    if table == "random":
        table = _random_table(_DATA_DIR.value, _RANDOM_DIM.value, os.path.join(_OUTPUT_DIR.value, "random.parquet"))
    settings = [s.strip() for s in _SETTINGS.value.split(";")] if _SETTINGS.value else [""]
    results = run_sweep(_DATA_DIR.value, table, _VARIANT.value, settings, [int(s) for s in _SEEDS.value],
                        _EVAL_SPLIT.value, _OUTPUT_DIR.value, _ID_SETTINGS.value)
    results["argv"] = sys.argv
    io_utils.write_json(os.path.join(_OUTPUT_DIR.value, "sweep.json"), results)
    print(to_markdown(results))


if __name__ == "__main__":
    app.run(main)
