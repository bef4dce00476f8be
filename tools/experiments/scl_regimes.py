r"""Where the paper's Table 2 order (SCL > w/o triplet > w/o triplet & MoCo) holds: SCL settings × ablations × seeds.

```
python -m tools.experiments.scl_regimes --data_dir=runs/regimes/world --output_dir=runs/regimes/size \
    --steps=400 --seeds=0,1,2 --settings="n15k:max_train_pairs=15000;n300k:max_train_pairs=300000"
```

Every setting (`;`-separated `name:flag=value,flag=value`, applied on top of `--flagfile`, the SCL text flagfile
of the paper report's demo profile by default) is trained with every method of `--methods` (the Table 2
ablations: `scl`, `scl_no_triplet`, `scl_no_triplet_no_queue`) for every seed, for the same `--steps` (the
same number of examples whatever the setting's set size: `max_train_pairs` decides how often they repeat; a
setting's flags are applied after the method's, so `use_queue=false` under `scl` is in-batch negatives with the
triplet), and
evaluated once at the end on `--eval_split`. Choices are made on `valid`: a dataset whose pairs have no `valid`
split gets one carved from its train split (the last `--valid_pairs` rows; written once, as a new dataset under
`<output_dir>/data`; the test split is left alone and not evaluated).

Runs are normal model dirs under `<output_dir>/runs/<setting>/<method>/seed<k>`; a finished one is reused.
Prints a markdown table and writes `<output_dir>/<report_name>.{md,json}`: per setting and method Acc@1 /
Acc@5 mean ± std, the fraction of hard-negative triplets violating the margin at the end, τ, the run's wall
time; and per setting the paired differences SCL − w/o triplet and w/o triplet − w/o triplet & MoCo (mean ±
std over seeds), on how many seeds the full order holds, and each method's Acc@1 against the first setting's
(paired per seed).
"""

import os
import sys

import numpy as np
from absl import app, flags

from mm_ads.reports.paper import mean_std
from mm_ads.reports.table2 import ABLATIONS
from tools.experiments import parse_overrides


def define_flags():
    """The command's flags; defined only when it runs, so that importing this module (the tests) defines none."""
    flags.DEFINE_string("data_dir", None, "A dataset with pretrain/<modality>_pairs.", required=True)
    flags.DEFINE_string("output_dir", None, "Runs, the carved dataset, the reports.", required=True)
    flags.DEFINE_string("flagfile_base", "configs/scl/text_demo.flags", "The SCL flagfile of every run.")
    flags.DEFINE_string("settings", "base:", "';'-separated name:flag=value,... settings.")
    flags.DEFINE_list("methods", list(ABLATIONS), f"Ablations of every setting, of {list(ABLATIONS)}.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
    flags.DEFINE_integer("steps", 400, "Training steps of every run.")
    flags.DEFINE_string("eval_split", "valid", "Where the runs are compared.")
    flags.DEFINE_string("report_name", "regimes", "Writes <output_dir>/<report_name>.{json,md}; studies sharing an "
                        "output_dir share their runs.")
    flags.DEFINE_integer("valid_pairs", 20000, "Rows carved from train as `valid` when there is none.")

ORDER = list(ABLATIONS)  # the paper's order, best first


def parse_settings(text):
    """`"a:x=1,y=2;b:"` → `{"a": {"x": "1", "y": "2"}, "b": {}}`; names must be unique and non-empty."""
    out = {}
    for item in (s.strip() for s in text.split(";")):
        if not item:
            continue
        name, sep, rest = item.partition(":")
        if not sep or not name.strip() or name.strip() in out:
            raise ValueError(f"--settings: {item!r} is not `name:flag=value,...` with a new, non-empty name")
        out[name.strip()] = parse_overrides(rest.strip())
    return out


def with_valid_split(data_dir, output_dir, modality, valid_pairs):
    """`data_dir` if its `pretrain/<modality>_pairs` has a `valid` split, else a dataset under
    `<output_dir>/data` whose train split is the first rows of `data_dir`'s, `valid` its last `valid_pairs`
    rows, `test` the same rows as `data_dir`'s (written once; reused when its manifest exists)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mm_ads.data.dataset import DatasetWriter, Manifest

    component = f"pretrain/{modality}_pairs"
    manifest = Manifest.load(data_dir)
    if "valid" in manifest.components.get(component, {}):
        return data_dir
    out = os.path.join(output_dir, "data")
    if os.path.exists(os.path.join(out, "manifest.json")):
        return out
    train = pa.concat_tables([pq.read_table(p) for p in manifest.files(component, "train")])
    if not 0 < valid_pairs < train.num_rows:
        raise ValueError(f"{data_dir}: {component} train has {train.num_rows} rows; cannot carve "
                         f"--valid_pairs={valid_pairs} from it")
    cut = train.num_rows - valid_pairs
    with DatasetWriter(out, name=f"{manifest.name}+valid", format="derived",
                       provenance={"from": os.path.abspath(data_dir), "valid": f"{component} train[{cut}:]"}) as w:
        w.write_parquet(component, "train", train.slice(0, cut))
        w.write_parquet(component, "valid", train.slice(cut))
        w.write_parquet(component, "test", pa.concat_tables([pq.read_table(p)
                                                             for p in manifest.files(component, "test")]))
    return out


KEYS = ("acc@1", "acc@5", "triplet_violation_rate", "temperature")


def run_study(data_dir, flagfile, settings, methods, seeds, steps, eval_split, output_dir):
    from mm_ads import config as config_lib
    from mm_ads import runs as runs_lib
    from mm_ads.reports.options import reusable_metrics
    from mm_ads.training import model_dir as run_dir

    unknown = sorted(set(methods) - set(ABLATIONS))
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; known {sorted(ABLATIONS)}")

    def one(setting, overrides, method, seed):
        values = config_lib.read_flagfile(flagfile)
        model_dir = os.path.join(output_dir, "runs", setting, method, f"seed{seed}")
        values.update(data_dir=data_dir, seed=str(seed), export="false", eval_split=eval_split, model_dir=model_dir,
                      max_steps=str(steps), epochs="1000", eval_every=str(steps), checkpoint_every=str(steps))
        values.update(ABLATIONS[method])
        values.update(overrides)  # last: a setting may change what a method leaves (use_queue=false under scl)
        config = config_lib.config_from_values(values)
        metrics = reusable_metrics(model_dir, config) or runs_lib.run(config)
        return {**{k: metrics[k] for k in KEYS if k in metrics}, "wall_s": run_dir.wall_s(metrics)}

    results = {"eval_split": eval_split, "flagfile": flagfile, "steps": steps, "seeds": list(seeds), "settings": {}}
    for name, overrides in settings.items():
        entry = {"overrides": overrides, "methods": {}}
        for method in methods:
            runs = {str(s): one(name, overrides, method, s) for s in seeds}
            entry["methods"][method] = {"runs": runs, **{k: mean_std([r[k] for r in runs.values()])
                                                         for k in KEYS + ("wall_s",)
                                                         if all(k in r for r in runs.values())}}
        entry.update(order_summary(entry["methods"], seeds))
        results["settings"][name] = entry
    first = next(iter(results["settings"].values()), None)
    for entry in list(results["settings"].values())[1:]:
        entry["vs_first_setting"] = {
            m: mean_std([e["runs"][str(s)]["acc@1"] - first["methods"][m]["runs"][str(s)]["acc@1"] for s in seeds])
            for m, e in entry["methods"].items() if m in first["methods"]}
    return results


def order_summary(methods, seeds):
    """Paired Acc@1 differences between consecutive methods of the paper's order that were run, and on how many
    seeds every run pair is in the paper's order."""
    present = [m for m in ORDER if m in methods]
    out = {"differences": {}}
    holds = np.ones(len(seeds), bool)
    for better, worse in zip(present, present[1:]):
        diff = [methods[better]["runs"][str(s)]["acc@1"] - methods[worse]["runs"][str(s)]["acc@1"] for s in seeds]
        out["differences"][f"{better} - {worse}"] = mean_std(diff)
        holds &= np.asarray(diff) > 0
    if len(present) > 1:
        out["order_holds_on_seeds"] = int(holds.sum())
    return out


def to_markdown(results):
    lines = [f"Acc@1 / Acc@5 on `{results['eval_split']}`, {results['steps']} steps per run, seeds "
             f"{results['seeds']} (mean ± std); base flagfile `{results['flagfile']}`", "",
             "| setting | method | Acc@1 | Acc@5 | triplets violating the margin | τ | wall s |",
             "|---|---|---:|---:|---:|---:|---:|"]

    def cell(entry, key, fmt):
        return f"{entry[key][0]:{fmt}} ± {entry[key][1]:{fmt}}" if key in entry else "—"

    for name, setting in results["settings"].items():
        for method, e in setting["methods"].items():
            wall = f"{e['wall_s'][0]:.0f}" if "wall_s" in e else "—"
            lines.append(f"| {name} | {method} | {cell(e, 'acc@1', '.3f')} | {cell(e, 'acc@5', '.3f')} | "
                         f"{cell(e, 'triplet_violation_rate', '.2f')} | {cell(e, 'temperature', '.3f')} | {wall} |")
    first = next(iter(results["settings"]), "")
    lines += ["", f"| setting | overrides | paired Acc@1 differences (mean ± std) | paper order holds on | Acc@1 vs "
              f"`{first}`, paired |", "|---|---|---|---:|---|"]
    for name, s in results["settings"].items():
        diffs = "; ".join(f"{k}: {v[0]:+.3f} ± {v[1]:.3f}" for k, v in s["differences"].items()) or "—"
        holds = f"{s['order_holds_on_seeds']}/{len(results['seeds'])}" if "order_holds_on_seeds" in s else "—"
        over = ", ".join(f"{k}={v}" for k, v in s["overrides"].items()) or "(base)"
        vs = "; ".join(f"{m}: {v[0]:+.3f} ± {v[1]:.3f}" for m, v in s.get("vs_first_setting", {}).items()) or "—"
        lines.append(f"| {name} | {over} | {diffs} | {holds} | {vs} |")
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from mm_ads import config as config_lib
    from mm_ads.utils import io as io_utils
    from mm_ads.utils.tf_startup import hide_retracing_warnings

    hide_retracing_warnings()
    f = flags.FLAGS
    settings = parse_settings(f.settings)
    os.makedirs(f.output_dir, exist_ok=True)
    modality = config_lib.read_flagfile(f.flagfile_base).get("modality", "text")
    data_dir = f.data_dir
    if f.eval_split == "valid":
        data_dir = with_valid_split(data_dir, f.output_dir, modality, f.valid_pairs)
    results = run_study(data_dir, f.flagfile_base, settings, f.methods, [int(s) for s in f.seeds], f.steps,
                        f.eval_split, f.output_dir)
    results["argv"] = sys.argv
    results["data_dir"] = os.path.abspath(data_dir)
    io_utils.write_json(os.path.join(f.output_dir, f"{f.report_name}.json"), results)
    text = to_markdown(results)
    with io_utils.atomic_file(os.path.join(f.output_dir, f"{f.report_name}.md")) as out:
        out.write(text)
    print(text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
