r"""Scaling of CTR training: 1 process vs 2 workers (MultiWorkerMirroredStrategy) vs parameter servers; table size;
memory per process.

The driver runs every configuration as separate processes (a local cluster started by `tools.cluster`,
per-task `TF_CONFIG` on 127.0.0.1) and samples each process's resident memory (`VmRSS`, every 0.2 s) from
`/proc/<pid>/status`. In every process the model is the `id` CTR model of `mm_ads.ctr.model` (E=16, S=50,
the default FeatureSpec tables, the item table of `--rows` rows), trained by the real `Trainer` step
(`_make_train_step`: SparseAdagrad on the tables, Adam on the rest) on one in-memory synthetic batch per
worker (`tools.bench.ctr_step.synthetic_batch`: Zipf ids that repeat within the batch), as in
`tools.bench.ctr_step`. Each measurement: `--warmup_steps` untimed steps, then `--timed_repeats` ×
`--timed_steps` timed steps; median and best.

Configurations (`--configs`, in this order, the whole list repeated `--rounds` times so that a load change
on the shared machine hits every configuration):

* `single` — one process, batch `--batch` (the baseline);
* `mw2_same_global` — 2 workers × `--batch / 2` per replica: the same global batch, i.e. the same work per
  step as `single` split over two processes (strong scaling);
* `mw2_uncombined` — `mw2_same_global` with `Trainer(combine_sparse_gradients=False)`: every lookup's
  gradient row is all-gathered, instead of one summed row per distinct id (the default across workers);
* `mw2_same_local` — 2 workers × `--batch`: twice the global batch (weak scaling);
* `ps2` — a coordinator + 2 workers + 2 ps, tables in 2 shards (one per ps), each step `--batch` examples
  on one worker, asynchronous; examples/s counts every worker; `ps2_uncombined` the same without combining;
* `table_10m`, `table_50m` — one process with a 10M- / 50M-row item table (`--table_rows`); skipped, and
  said so, when `MemAvailable` is below what the table needs (table + Adagrad slot + initialisation copy).
* `ps_table_10m` — a coordinator + 1 worker + 2 ps with the 10M-row table in 2 shards: memory per ps task.

Run from the repository root (about 10 minutes on 2 cores):

```
python -m tools.bench.scale
python -m tools.bench.scale --configs=single,mw2_same_global --rounds=3
```

A process of a configuration runs this module with `--role=task` (not meant to be run by hand).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

from tools.bench import ctr_step  # its flags are defined too (none is used here)

_ROLE = flags.DEFINE_enum("role", "driver", ["driver", "task"], "driver (default) or one task of a configuration.")
_CONFIGS = flags.DEFINE_list("configs", ["single", "mw2_same_global", "mw2_uncombined", "mw2_same_local", "ps2",
                                         "ps2_uncombined", "table_10m", "table_50m", "ps_table_10m"],
                             "Configurations to run.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds over the throughput configurations (single, mw2_*, ps2).")
_ROWS = flags.DEFINE_integer("rows", 1_000_000, "Item-table rows of the throughput configurations.")
_BIG_ROWS = flags.DEFINE_list("table_rows", ["10000000", "50000000"], "Rows of table_10m, table_50m.")
_BATCH = flags.DEFINE_integer("batch", 1024, "Examples per step of one process (see the configurations).")
_STEPS = flags.DEFINE_integer("timed_steps", 30, "Timed steps per repeat.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 10, "Untimed steps first.")
_REPEATS = flags.DEFINE_integer("timed_repeats", 3, "Timed repeats per configuration run.")
_TIMEOUT = flags.DEFINE_integer("timeout", 900, "Seconds before a configuration's cluster is stopped.")
_OUTPUT = flags.DEFINE_string("output", "", "Also write the results as JSON here.")
# task role
_STRATEGY = flags.DEFINE_string("strategy", "default", "task: strategy of mm_ads.training.distribute.")
_TASK_ROWS = flags.DEFINE_integer("task_rows", 1_000_000, "task: item-table rows.")
_PER_REPLICA = flags.DEFINE_integer("per_replica", 1024, "task: examples per replica and step.")
_SHARDS = flags.DEFINE_integer("shards", 1, "task: embedding shards.")
_COMBINE = flags.DEFINE_enum("combine", "auto", ["auto", "yes", "no"],
                             "task: Trainer(combine_sparse_gradients=None | True | False).")

_SEQ_LEN, _EMBEDDING_DIM = 50, 16
_GIB = 1 << 30


# -- one task ----------------------------------------------------------------------------------------------
def _task():
    import numpy as np
    import tensorflow as tf

    from mm_ads.config import CTRModelConfig, TrainConfig
    from mm_ads.ctr.model import build_ctr_model
    from mm_ads.training import distribute
    from mm_ads.training.trainer import Trainer
    distribute.maybe_serve(_STRATEGY.value)  # ps / worker tasks of a parameter-server cluster serve here
    strategy = distribute.make_strategy(_STRATEGY.value)
    index = distribute.tf_config().get("task", {}).get("index", 0)
    spec = ctr_step.make_spec(_TASK_ROWS.value, _SEQ_LEN, 128)  # the id model reads no vector
    rng = np.random.default_rng(index)  # each worker its own batch
    features, labels, _ = ctr_step.synthetic_batch(spec, "id", _PER_REPLICA.value, rng, 1.2, 0.1)
    model_config = CTRModelConfig(variant="id", embedding_dim=_EMBEDDING_DIM)
    shards = _SHARDS.value

    class Task(ctr_step.InMemoryCTRTask):
        supports_parameter_server = True

        def build_model(self):
            return build_ctr_model(self.spec, self.model_config, embedding_shards=shards)

    task = Task(spec, model_config, features, labels)
    config = TrainConfig(sparse_optimizer="adagrad", dense_optimizer="adam", strategy=_STRATEGY.value,
                         embedding_shards=shards)
    config.validate()
    global_batch = _PER_REPLICA.value * strategy.num_replicas_in_sync
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="mm_ads-scale-") as model_dir:
        combine = {"auto": None, "yes": True, "no": False}[_COMBINE.value]
        trainer = Trainer(task, config, global_batch, model_dir, strategy, combine_sparse_gradients=combine)
        build_s = time.time() - t0
        step_fn = trainer._make_train_step()
        times = []
        if distribute.is_parameter_server(strategy):
            coordinator = tf.distribute.experimental.coordinator.ClusterCoordinator(strategy)
            iterator = trainer.per_worker_iterator(coordinator)

            def run(n):
                for _ in range(n):
                    coordinator.schedule(step_fn, args=(iterator,))
                coordinator.join()
            workers = len(distribute.tf_config()["cluster"]["worker"])
        else:
            iterator = iter(trainer._dataset(0, 0))

            def run(n):
                for _ in range(n):
                    float(step_fn(iterator))  # one host sync per step, as Trainer.train
            workers = 1
        run(_WARMUP.value)
        for _ in range(_REPEATS.value):
            start = time.perf_counter()
            run(_STEPS.value)
            times.append((time.perf_counter() - start) / _STEPS.value)
    result = {"strategy": _STRATEGY.value, "rows": _TASK_ROWS.value, "per_replica": _PER_REPLICA.value,
              "global_batch": global_batch, "replicas": strategy.num_replicas_in_sync, "workers": workers,
              "shards": shards, "combined": trainer.combine_sparse_gradients, "build_s": round(build_s, 1),
              "ms_per_step": [round(t * 1000, 2) for t in times],
              "examples_per_second": [round(global_batch / t) for t in times]}
    if distribute.is_chief(strategy):
        print("RESULT " + json.dumps(result), flush=True)


# -- the driver --------------------------------------------------------------------------------------------
def _rss_kb(pid, field="VmRSS"):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def mem_available_gib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / (1 << 20)
    return 0.0


def _run_config(name, args, num_workers, num_ps=0, chief=False):
    """Runs one configuration as a cluster (or a single process); returns its result with peak RSS per task."""
    from tools.cluster import LocalCluster

    cmd = [sys.executable, "-m", "tools.bench.scale", "--role=task", f"--warmup_steps={_WARMUP.value}",
           f"--timed_steps={_STEPS.value}", f"--timed_repeats={_REPEATS.value}", *args]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    peaks = {}
    if num_workers == 1 and not chief:  # one process: no cluster, no TF_CONFIG
        popen = subprocess.Popen(cmd, env={k: v for k, v in env.items() if k != "TF_CONFIG"},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = {}

        def pump():
            out["process"] = popen.stdout.read()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            deadline = time.time() + _TIMEOUT.value
            while popen.poll() is None and time.time() < deadline:
                peaks["process"] = max(peaks.get("process", 0), _rss_kb(popen.pid))
                time.sleep(0.2)
        finally:
            if popen.poll() is None:
                popen.kill()
            popen.wait()
        reader.join()
        status = popen.returncode
    else:
        with LocalCluster(cmd, num_workers, num_ps, chief, env=env, stream=None) as cluster:
            deadline = time.time() + _TIMEOUT.value
            status = None
            while status is None:
                for t in cluster.tasks:
                    if t.popen.poll() is None:
                        peaks[t.name] = max(peaks.get(t.name, 0), _rss_kb(t.popen.pid))
                status = cluster.poll()
                if time.time() > deadline:
                    status = 124
                time.sleep(0.2)
        out = {t.name: t.output for t in cluster.tasks}
    text = "".join(out.values())
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if status != 0 or not lines:
        print(text[-3000:], file=sys.stderr)
        return {"config": name, "error": f"status {status}"}
    result = json.loads(lines[-1][len("RESULT "):])
    result.update(config=name, peak_rss_mib={k: round(v / 1024) for k, v in peaks.items()})
    return result


def _configs(name):
    b, rows = _BATCH.value, _ROWS.value
    big = {"table_10m": int(_BIG_ROWS.value[0]), "table_50m": int(_BIG_ROWS.value[-1])}
    if name == "single":
        return [f"--task_rows={rows}", f"--per_replica={b}"], dict(num_workers=1)
    if name == "mw2_same_global":
        return ["--strategy=multi_worker", f"--task_rows={rows}", f"--per_replica={b // 2}"], dict(num_workers=2)
    if name == "mw2_uncombined":
        return (["--strategy=multi_worker", f"--task_rows={rows}", f"--per_replica={b // 2}", "--combine=no"],
                dict(num_workers=2))
    if name == "ps2_uncombined":
        return (["--strategy=parameter_server", f"--task_rows={rows}", f"--per_replica={b}", "--shards=2",
                 "--combine=no"], dict(num_workers=2, num_ps=2, chief=True))
    if name == "mw2_same_local":
        return ["--strategy=multi_worker", f"--task_rows={rows}", f"--per_replica={b}"], dict(num_workers=2)
    if name == "ps2":
        return (["--strategy=parameter_server", f"--task_rows={rows}", f"--per_replica={b}", "--shards=2"],
                dict(num_workers=2, num_ps=2, chief=True))
    if name in big:
        return [f"--task_rows={big[name]}", f"--per_replica={b}"], dict(num_workers=1)
    if name == "ps_table_10m":
        return (["--strategy=parameter_server", f"--task_rows={big['table_10m']}", f"--per_replica={b}",
                 "--shards=2"], dict(num_workers=1, num_ps=2, chief=True))
    raise ValueError(f"unknown configuration {name!r}")


def _needed_gib(rows):
    """Table + Adagrad accumulator + one initialisation copy, float32, E=16."""
    return 3 * rows * _EMBEDDING_DIM * 4 / _GIB


def _driver():
    import platform

    throughput = [c for c in _CONFIGS.value if not c.startswith(("table_", "ps_table_"))]
    others = [c for c in _CONFIGS.value if c not in throughput]
    machine = {"cpus": os.cpu_count(), "load_before": os.getloadavg(), "mem_available_gib": round(
        mem_available_gib(), 1), "python": platform.python_version()}
    print(f"machine: {machine}", flush=True)
    results = []
    for r in range(_ROUNDS.value):
        for name in throughput:
            args, kw = _configs(name)
            res = _run_config(name, args, **kw)
            res["round"] = r
            print(json.dumps(res), flush=True)
            results.append(res)
    for name in others:
        args, kw = _configs(name)
        rows = int([a for a in args if a.startswith("--task_rows=")][0].split("=")[1])
        avail = mem_available_gib()
        if name.startswith("table_") and avail < _needed_gib(rows) + 2:
            res = {"config": name, "skipped": f"MemAvailable {avail:.1f} GiB < {_needed_gib(rows) + 2:.1f} GiB"}
        else:
            res = _run_config(name, args, **kw)
        print(json.dumps(res), flush=True)
        results.append(res)
    machine["load_after"] = os.getloadavg()
    _report(results)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=1)


def _report(results):
    by = {}
    for r in results:
        by.setdefault(r["config"], []).append(r)
    print("\n| configuration | processes | global batch / step | median ms/step | median examples/s | best examples/s "
          "| peak RSS per process (MiB) |")
    print("|---|---|---|---|---|---|---|")
    medians = {}
    for name, runs in by.items():
        ok = [r for r in runs if "examples_per_second" in r]
        if not ok:
            print(f"| {name} | | | {runs[0].get('skipped') or runs[0].get('error')} | | | |")
            continue
        eps = [x for r in ok for x in r["examples_per_second"]]
        ms = [x for r in ok for x in r["ms_per_step"]]
        medians[name] = statistics.median(eps)
        rss = ", ".join(f"{k} {v}" for k, v in ok[-1]["peak_rss_mib"].items())
        print(f"| {name} | {len(ok[-1]['peak_rss_mib'])} | {ok[-1]['global_batch']} | {statistics.median(ms):.1f} "
              f"| {medians[name]:,.0f} | {max(eps):,.0f} | {rss} |")
    if "single" in medians:
        print("\n| ratio (median examples/s) | value |\n|---|---|")
        for name in ("mw2_same_global", "mw2_uncombined", "mw2_same_local", "ps2", "ps2_uncombined"):
            if name in medians:
                print(f"| {name} / single | {medians[name] / medians['single']:.2f} |")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signum)  # unwinds through LocalCluster, which stops and reaps its tasks


def main(argv):
    del argv
    if _ROLE.value == "task":
        _task()
    else:
        import signal

        signal.signal(signal.SIGTERM, _interrupt)
        _driver()


if __name__ == "__main__":
    app.run(main)
