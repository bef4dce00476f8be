r"""The zero-shot EfficientNet-Lite0 tower at several input sizes: Acc@N on a dataset's validation pairs.

```
python -m tools.experiments.image_tower_size --data_dir=runs/clothing \
    --flagfile_base=configs/scl/clothing_effnet.flags --sizes=96,128,160,224 --split=validation
```

The tower is fully convolutional, so `--image_tower_size` trades accuracy for compute (about (size / 224)²
of the multiply-adds). This evaluates the generic tower (`--output_dim=0`, no training) at each size on the
split given (a validation split: the choice is made there, never on test) and prints a markdown table with the
wall time of each evaluation (one run each, not a benchmark). Writes `--output` (JSON) when given.
"""

import sys
import time

from absl import app, flags


def define_flags():
    flags.DEFINE_string("data_dir", None, "A dataset with pretrain/image_pairs.", required=True)
    flags.DEFINE_string("flagfile_base", "configs/scl/clothing_effnet.flags", "The pretrained SCL image flagfile.")
    flags.DEFINE_list("sizes", ["96", "128", "160", "224"], "Tower input sizes.")
    flags.DEFINE_string("split", "validation", "The split evaluated (a validation split).")
    flags.DEFINE_string("output", "", "JSON results file (optional).")


def evaluate_sizes(data_dir, flagfile, sizes, split):
    """`{size: Acc@N dict + wall_s}` of the zero-shot tower on `split`."""
    from mm_ads import config as config_lib
    from mm_ads.scl.task import SCLTask, build_encoder

    out = {}
    for size in sizes:
        values = dict(config_lib.read_flagfile(flagfile), data_dir=data_dir, model_dir="unused", output_dim="0",
                      image_tower_size=str(size), eval_split=split)
        task = SCLTask(config_lib.config_from_values(values))
        start = time.time()
        result = task.evaluate_encoder(build_encoder(task.scl), "eval")
        out[int(size)] = {**result, "wall_s": round(time.time() - start, 1)}
    return out


def to_markdown(results, split):
    lines = [f"Zero-shot EfficientNet-Lite0 on `{split}` by input size", "",
             "| size | Acc@1 | Acc@5 | Acc@10 | queries | wall s |", "|---:|---:|---:|---:|---:|---:|"]
    for size, r in results.items():
        lines.append(f"| {size} | {r['acc@1']:.4f} | {r['acc@5']:.4f} | {r['acc@10']:.4f} | {r['num_queries']} | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from mm_ads.utils import io as io_utils

    f = flags.FLAGS
    results = evaluate_sizes(f.data_dir, f.flagfile_base, [int(s) for s in f.sizes], f.split)
    if f.output:
        io_utils.write_json(f.output, {"data_dir": f.data_dir, "flagfile": f.flagfile_base, "split": f.split,
                                       "results": results})
    print(to_markdown(results, f.split))


if __name__ == "__main__":
    define_flags()
    app.run(main, argv=sys.argv)
