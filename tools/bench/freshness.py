"""Freshness of the online loop under steady new-item event rates, split into its parts, vs the bare encoder call.

Runs the loop of `tools/online_demo.py` (the same preparation, services, producers and measuring client; see its
docstring for the definitions) once, with one phase of `--phase_s` seconds per rate of `--rates` new-item
events/s (default 5, 20, 50), impressions replayed to the near-line trainer meanwhile, and prints per rate:

* freshness p50/p99/max — new-item event → first ids-only rank response whose `found` mask shows the item —
  and its lower bound (the last rank call that still missed the item);
* the split: **encoder** (the vector's index-table write timestamp − event), **poll wait** (the measuring
  client's resolution: the first rank call after that timestamp − the timestamp), **visibility** (rank calls
  sent after it that still missed the item: the table's commit, an fsync of SQLite's WAL, and the read),
  **response** (the finding call's round trip);
* the **baseline** of the same run: the bare work per item — one `encode([title])` of the encoder SavedModel
  + one `put_many` into an SQLite index table, in this process, nothing else running — and the ratio of the
  loop's encoder lag p50 to it.

Goal (issue 6): freshness p99 <= 1 s.

```
python -m tools.bench.freshness                               # rates 5, 20, 50 /s, 30 s each
python -m tools.bench.freshness --rates=5,50 --phase_s=20 --poll_interval_ms=20
```
"""

import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags, logging

from tools import online_demo

_RATES = flags.DEFINE_list("rates", ["5", "20", "50"], "New-item events per second, one phase each.")
_PHASE_S = flags.DEFINE_float("phase_s", 30.0, "Seconds of events per rate.")
_WORK_DIR = flags.DEFINE_string("work_dir", "runs/bench_freshness", "Prepared artifacts and the run (reused).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "An existing dataset (default: generate the demo's world).")
_POLL_MS = flags.DEFINE_float("poll_interval_ms", 50.0, "Period of the measuring client's rank calls.")
_POLL_CLIENTS = flags.DEFINE_integer("poll_clients", 2, "Measuring client threads, calling in turn.")
_MAX_WAIT = flags.DEFINE_integer("encoder_max_wait_ms", -1, "The encoder service's micro-batch window (-1: its "
                                 "flagfile's, 20 ms).")
_IMPRESSION_RATE = flags.DEFINE_float("impression_rate", 100.0, "Impression events/s to the near-line trainer.")
_BASELINE_CALLS = flags.DEFINE_integer("baseline_calls", 200, "Single-item encode + put_many calls timed.")


def bare_encode_and_put(prep, calls, seed=0):
    """Seconds of one `encode([title])` + `put_many` of one new item, `calls` times: the work the encoder
    service must do per item when nothing waits (no stream, no batching window, no polling)."""
    from mm_ads.serving.index.encoder_service import ExportedEncoder
    from mm_ads.serving.index.index_table import open_index_table

    encoder = ExportedEncoder(prep["encoder"])
    world = online_demo.World(prep["data_dir"], seed)
    items = world.new_items(calls + 5)
    times = []
    with tempfile.TemporaryDirectory() as tmp, open_index_table(
            os.path.join(tmp, "index.db"), dim=encoder.dim, encoder_version=encoder.encoder_version,
            create=True) as table:
        for k, it in enumerate(items):
            start = time.perf_counter()
            vec = encoder.encode([it["title"].encode("utf-8")])
            table.put_many(np.asarray([it["item_id"]], np.int64), vec, encoder.encoder_version)
            if k >= 5:  # the first calls warm up the graph
                times.append(time.perf_counter() - start)
    return online_demo._percentiles(times)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from tools.bench.serving_world import machine_info

    rates = tuple(float(r) for r in _RATES.value)
    cfg = online_demo.DemoConfig(work_dir=_WORK_DIR.value, data_dir=_DATA_DIR.value, duration_s=_PHASE_S.value,
                                 new_item_rates=rates, poll_interval_ms=_POLL_MS.value,
                                 poll_clients=_POLL_CLIENTS.value, encoder_max_wait_ms=_MAX_WAIT.value,
                                 impression_rate=_IMPRESSION_RATE.value, num_ranked_examples=1).validate()
    summary = online_demo.run(cfg)
    if not summary["ok"]:
        online_demo.print_summary(summary)
        sys.exit(1)
    base = bare_encode_and_put(summary["prepare"], _BASELINE_CALLS.value)
    ms = online_demo._ms
    info = machine_info()
    print(f"\nmachine: {info['cpu_model']}, {info['cpus']} cpus, load {info['load'][0]:.2f}, nice {info['nice']}; "
          f"tensorflow {info['tensorflow']}; encoder {summary['prepare']['encoder_version']} "
          f"(dim {summary['prepare']['dim']}); {_PHASE_S.value:g} s per rate, rank call every "
          f"{_POLL_MS.value:g} ms (jittered x0.5-1.5, {_POLL_CLIENTS.value} clients in turn), impressions "
          f"{_IMPRESSION_RATE.value:g}/s to the near-line trainer; encoder --max_wait_ms "
          f"{'from its flagfile' if _MAX_WAIT.value < 0 else _MAX_WAIT.value}; near-line versions exported "
          f"{[e['version'] for e in summary['nearline_exports']]}, served "
          f"{summary['nearline_versions_served']}\n")
    print("| rate | items | freshness p50 | p99 | max | lower bound p50 / p99 | encoder p50 / p99 "
          "| poll wait p50 / p99 | visibility p50 / p99 | response p50 / p99 | encoder p50 / bare |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in summary["freshness"]:
        f, lb, enc = r["freshness_s"], r["freshness_lower_bound_s"], r["encoder_s"]
        pw, vis, resp = r["poll_wait_s"], r["visibility_s"], r["response_s"]
        print(f"| {r['rate']:g}/s | {r['found']}/{r['items']} | {ms(f['p50'])} | {ms(f['p99'])} | {ms(f['max'])} | "
              f"{ms(lb['p50'])} / {ms(lb['p99'])} | {ms(enc['p50'])} / {ms(enc['p99'])} | {ms(pw['p50'])} / "
              f"{ms(pw['p99'])} | {ms(vis['p50'])} / {ms(vis['p99'])} | {ms(resp['p50'])} / {ms(resp['p99'])} | "
              f"{enc['p50'] / base['p50']:.1f}x |")
    print(f"\nbaseline (same run, after the loop stopped): bare encode([title]) + put_many of one item: p50 "
          f"{1000 * base['p50']:.1f} ms, p99 {1000 * base['p99']:.1f} ms over {base['n']} calls")
    worst = max(r["freshness_s"]["p99"] for r in summary["freshness"])
    print(f"goal p99 <= 1 s: {'met' if worst <= 1.0 else 'NOT met'} (worst p99 {1000 * worst:.0f} ms)")


if __name__ == "__main__":
    app.run(main)
