r"""SCL train-step throughput: the K=196,800 MoCo queue vs a minimal queue vs no MoCo, text and image; queue memory.

For each modality (`--modalities`) one process builds three configurations of the real training step
(`mm_ads.training.trainer.Trainer._make_train_step`, fed through the trainer's own
`distribute_datasets_from_function` input path, one host sync per step as in `Trainer.train`):

* **queue** — MoCo with `--queue_size` keys (default the paper's K = 196,800): InfoNCE over
  `[B + K]` candidates, momentum update of the key encoder and the wrap-around enqueue after every step;
* **queue1** — the same MoCo step with a 1-slot queue (the baseline for the queue's own cost);
* **no_moco** — `use_queue=false`: keys from the query encoder (with gradients), in-batch negatives only.

All use the triplet loss. Inputs: the pair tables of a synthetic world generated once (`--num_pairs` search
pairs, 32 px images) in a temporary directory. Configurations are timed interleaved (`--repeats` rounds of
`--steps` steps after `--warmup` steps); the table reports median and best ms/step and examples/s, the ratio
queue / queue1 (target ≤ 1.3×), and the queue's memory (keys float32 K×D + ids int64 K).

```
python -m tools.bench.scl_step                       # text and image, batch 256, D=128, K=196,800
python -m tools.bench.scl_step --modalities=text --batch_size=1024
```
"""

import os
import platform
import statistics
import tempfile
import time

import keras
import tensorflow as tf
from absl import app, flags

from mm_ads.config import DataConfig, ExperimentConfig, SCLConfig, TrainConfig
from mm_ads.data import synthetic
from mm_ads.scl.task import SCLTask
from mm_ads.training.trainer import Trainer

_MODALITIES = flags.DEFINE_list("modalities", ["text", "image"], "Modalities to time.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch size.")
_QUEUE = flags.DEFINE_integer("queue_size", 196_800, "K of the large queue.")
_DIM = flags.DEFINE_integer("output_dim", 128, "D.")
_PAIRS = flags.DEFINE_integer("num_pairs", 6000, "Search pairs of the synthetic world.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per repeat.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps before timing (tracing).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Interleaved repeats.")


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _Runner:
    def __init__(self, data_dir, model_dir, modality, use_queue, queue_size):
        config = ExperimentConfig(
            task="scl", model_dir=model_dir,
            data=DataConfig(data_dir=data_dir, batch_size=_BATCH.value, shuffle_buffer=10_000),
            train=TrainConfig(seed=0, export=False),
            scl=SCLConfig(modality=modality, output_dim=_DIM.value, use_queue=use_queue, queue_size=queue_size,
                          image_widths=(32, 64, 128), momentum=0.99)).validate()
        self.task = SCLTask(config)
        rss = _rss_mb()
        self.trainer = Trainer(self.task, config.train, _BATCH.value, model_dir)
        self.build_mb = _rss_mb() - rss
        self.step = self.trainer._make_train_step()
        self.epoch = 0
        self.iterator = iter(self.trainer._dataset(0, 0))
        self.left = self.trainer.steps_per_epoch

    def run(self, n):
        for _ in range(n):
            if self.left == 0:
                self.epoch += 1
                self.iterator = iter(self.trainer._dataset(self.epoch, 0))
                self.left = self.trainer.steps_per_epoch
            float(self.step(self.iterator))
            self.left -= 1


def main(argv):
    del argv
    work = tempfile.mkdtemp(prefix="scl_bench_")
    world = synthetic.World(synthetic.WorldConfig(seed=0, num_items=5000, num_users=2000, num_impressions=2000,
                                                  num_search_pairs=_PAIRS.value, image_size=32)).generate(False)
    data_dir = os.path.join(work, "data")
    synthetic.write_world(world, data_dir, progress=False)
    k, d = _QUEUE.value, _DIM.value
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.2f}; TF {tf.__version__}, Keras {keras.__version__}; batch {_BATCH.value}, "
          f"D={d}, float32")
    print(f"queue memory at K={k:,}: keys {k * d * 4 / 2**20:.1f} MiB + ids {k * 8 / 2**20:.1f} MiB "
          f"(× 1 per replica; checkpointed with the model)")
    rows = []
    for modality in _MODALITIES.value:
        runners = {
            "queue": _Runner(data_dir, os.path.join(work, f"{modality}_q"), modality, True, k),
            "queue1": _Runner(data_dir, os.path.join(work, f"{modality}_q1"), modality, True, 1),
            "no_moco": _Runner(data_dir, os.path.join(work, f"{modality}_nm"), modality, False, 1),
        }
        times = {name: [] for name in runners}
        for r in runners.values():
            r.run(_WARMUP.value)
        for _ in range(_REPEATS.value):
            for name, r in runners.items():
                t = time.perf_counter()
                r.run(_STEPS.value)
                times[name].append((time.perf_counter() - t) / _STEPS.value * 1000)
        for name, ts in times.items():
            med, best = statistics.median(ts), min(ts)
            rows.append((modality, name, med, best, _BATCH.value / med * 1000, runners[name].build_mb))
        med = {name: statistics.median(ts) for name, ts in times.items()}
        print(f"{modality}: queue/queue1 = {med['queue'] / med['queue1']:.2f}x (target <= 1.3), "
              f"queue/no_moco = {med['queue'] / med['no_moco']:.2f}x")
    print("| modality | config | median ms/step | best ms/step | median ex/s | build RSS MiB |")
    print("|---|---|---|---|---|---|")
    for m, name, med, best, eps, mb in rows:
        print(f"| {m} | {name} | {med:.1f} | {best:.1f} | {eps:,.0f} | {mb:.0f} |")
    print(f"work dir (delete when done): {work}")


if __name__ == "__main__":
    app.run(main)
