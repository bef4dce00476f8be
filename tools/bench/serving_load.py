r"""Load and fault test of the prediction server: sustained concurrent load (errors, memory), and SIGKILL + restart.

Builds the served world of `tools.bench.serving` (a CTR model of `--variant`, S=`--seq_len`, D=`--vector_dim`,
catalogue, SQLite index table), starts `python -m mm_ads.serving.server` as a separate process on fixed free
ports of 127.0.0.1, and runs `--concurrency` client threads for `--seconds`, alternating the official gRPC
client (Predict, `signature_name="rank"`) and REST `:rank`, `--candidates` candidates per request.

* `--mode=soak`: reports requests, errors (must be 0), requests/s, and the server's RSS (`VmRSS` of its
  process) sampled every `--sample_every_s`; memory is flat when the growth from `--settle_s` to the end is
  small against the RSS (printed as MB and MB/min).
* `--mode=kill`: after `--kill_after_s` the server process is killed with SIGKILL and started again at once
  on the same ports (`--kills` times, evenly spaced, with at least `--min_serving_s` of serving after each
  restart). Clients do not retry: each failed request is counted.
  Reports per kill: the restart time (exec → serving, the model loaded and warmed up), the error window (first
  to last failed request around the kill), failed requests, and whether every request after the window
  succeeded. gRPC channels use a short reconnect backoff (`--reconnect_backoff_ms`), as a latency-sensitive
  client would.

* `--mode=soak_mixed` (issue 19's soak): first the maximum throughput, `--probe_s` of closed-loop good `rank`
  requests from `--concurrency` threads; then `--seconds` (default 600) of open-loop requests paced at
  `--load_fraction` of that maximum (good and hostile together), `--bad_fraction` of them hostile: the fixed
  catalogue of `tools.bench.serving_mixed.hostile_catalogue` over gRPC and REST, in seeded permutations, each
  with the status it must get. At `--swap_at_s` (default: the middle) a second exported version (other weights)
  is published into the base path (a temp dir, then a rename); the load goes on until the status shows it
  AVAILABLE. The server's RSS is sampled every `--sample_every_s`. Reports (JSON, then a summary) the achieved
  vs the target rate, good requests and their errors, p50/p99, hostile requests by kind with the statuses
  received, the swap (first answer of the new version, status, old-version answers after it), the RSS at
  settle and at the end and its largest deviation from the post-settle median, and PASS / FAIL (exit code 1):
  0 good-request errors, every hostile request answered as expected (no 5xx), the swap seen, RSS within
  ±`--rss_tolerance`.

```
python -m tools.bench.serving_load --mode=soak --seconds=60
python -m tools.bench.serving_load --mode=kill --seconds=40 --kills=2
python -m tools.bench.serving_load --mode=soak_mixed --seconds=600
```
"""

import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time

import numpy as np
from absl import app, flags

from tools.bench import serving_mixed as mixed
from tools.bench import serving_world as bench

_MODE = flags.DEFINE_enum("mode", "soak", ["soak", "kill", "soak_mixed"],
                          "soak: steady load; kill: SIGKILL + restart under load; soak_mixed: paced good and hostile "
                          "requests at a fraction of the measured maximum, with a hot swap.")
_SECONDS = flags.DEFINE_float("seconds", None, "Duration of the load (default 60 s; 600 s for soak_mixed).")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 4, "Client threads (even: gRPC, odd: REST).")
_CANDIDATES = flags.DEFINE_integer("candidates", 200, "Candidates per request.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 50, "History length S.")
_VECTOR_DIM = flags.DEFINE_integer("vector_dim", 128, "Multimodal vector dim D.")
_NUM_ITEMS = flags.DEFINE_integer("num_items", 20_000, "Items in the catalogue.")
_VARIANT = flags.DEFINE_string("variant", "simtier", "CTR model variant.")
_SAMPLE_EVERY = flags.DEFINE_float("sample_every_s", 1.0, "RSS sampling period.")
_SETTLE = flags.DEFINE_float("settle_s", None, "Memory growth is measured from this time on (default 10 s; 60 s "
                                               "of the paced load for soak_mixed).")
_KILL_AFTER = flags.DEFINE_float("kill_after_s", 10.0, "First SIGKILL after this many seconds (kill mode).")
_KILLS = flags.DEFINE_integer("kills", 1, "SIGKILL + restart cycles (kill mode).")
_MIN_SERVING = flags.DEFINE_float("min_serving_s", 10.0, "Serving time after a restart before the next kill "
                                                         "or the end (kill mode).")
_BACKOFF = flags.DEFINE_integer("reconnect_backoff_ms", 50, "gRPC client reconnect backoff (initial and max).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the world and the requests.")
_PROBE = flags.DEFINE_float("probe_s", 25.0, "soak_mixed: seconds of closed-loop load measuring the maximum "
                                            "throughput (after 3 s of warm-up).")
_LOAD_FRACTION = flags.DEFINE_float("load_fraction", 0.8, "soak_mixed: the paced rate, as a fraction of the "
                                                          "measured maximum.")
_BAD_FRACTION = flags.DEFINE_float("bad_fraction", 0.1, "soak_mixed: share of hostile requests.")
_SWAP_AT = flags.DEFINE_float("swap_at_s", None, "soak_mixed: when the new version is published (default: the "
                                                 "middle of --seconds; negative: no swap, and no swap check).")
_WORKERS = flags.DEFINE_integer("workers", 0, "soak_mixed: threads sending the paced requests (0: 2 x "
                                              "--concurrency).")
_RSS_TOLERANCE = flags.DEFINE_float("rss_tolerance", 0.05, "soak_mixed: the largest RSS deviation from its "
                                                           "post-settle median that is flat.")
_REPORT = flags.DEFINE_string("report", "", "soak_mixed: also write the JSON report to this file.")


def free_port():
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


rss_mb = bench.rss_mb


class Load:
    """Client threads issuing ranking requests until stopped; every outcome is recorded with its time."""

    def __init__(self, ports, requests, concurrency, backoff_ms):
        import grpc

        self.grpc = grpc
        self.ports = ports
        self.grpc_requests = [bench.GrpcClient.request(
            {"item_id": np.asarray(r["candidates"], np.int64), "hist_item_id": np.asarray(r["history"], np.int64),
             "user_id": np.asarray(r["user_id"], np.int64),
             **{k: np.asarray(v, np.int64) for k, v in r["features"].items()}}, "rank") for r in requests]
        self.rest_bodies = [json.dumps(r).encode() for r in requests]
        self.concurrency = concurrency
        self.backoff_ms = backoff_ms
        self.events = []  # (time, thread, ok, latency s, error or None)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = []

    def _worker(self, i):
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        use_grpc = i % 2 == 0
        k = i
        if use_grpc:
            channel = self.grpc.insecure_channel(f"127.0.0.1:{self.ports['grpc_port']}", options=[
                ("grpc.initial_reconnect_backoff_ms", self.backoff_ms),
                ("grpc.min_reconnect_backoff_ms", self.backoff_ms),
                ("grpc.max_reconnect_backoff_ms", self.backoff_ms)])
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        else:
            client = bench.RestClient(self.ports["rest_port"], timeout=10)
        while not self.stop.is_set():
            k += 1
            t0 = time.perf_counter()
            try:
                if use_grpc:
                    stub.Predict(self.grpc_requests[k % len(self.grpc_requests)], timeout=10)
                else:
                    client.call("/v1/models/ctr:rank", self.rest_bodies[k % len(self.rest_bodies)])
                outcome = (time.monotonic(), i, True, time.perf_counter() - t0, None)
            except Exception as e:  # every failure is an outcome to count, not a crash of the load
                outcome = (time.monotonic(), i, False, time.perf_counter() - t0, type(e).__name__)
            with self.lock:
                self.events.append(outcome)
            if not outcome[2]:
                time.sleep(0.005)
        if use_grpc:
            channel.close()
        else:
            client.close()

    def start(self):
        for i in range(self.concurrency):
            t = threading.Thread(target=self._worker, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(30)


def soak_mixed(seconds):
    """The `soak_mixed` mode (see the module docstring); returns the report."""
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mm_ads_soak_mixed_") as root:
        world = bench.build_world(root, _NUM_ITEMS.value, _SEQ_LEN.value, _VECTOR_DIM.value, _VARIANT.value,
                                  _SEED.value)
        staged = bench.export_model(world["spec"], os.path.join(root, "staged"), 2, _VARIANT.value, _SEED.value + 1)
        requests = bench.rank_requests(32, world["num_items"], _CANDIDATES.value, _SEQ_LEN.value, _SEED.value)
        max_candidates = int(bench.server_flag("max_candidates"))
        t_exec = time.monotonic()
        proc, ports = bench.start_server(world, free_port(), free_port())
        try:
            header = {"mode": "soak_mixed", "machine": bench.machine_info(), "server_pid": ports["pid"],
                      "startup_s": round(time.monotonic() - t_exec, 2), "concurrency": _CONCURRENCY.value,
                      "candidates": _CANDIDATES.value, "seq_len": _SEQ_LEN.value, "vector_dim": _VECTOR_DIM.value,
                      "seconds": seconds, "load_fraction": _LOAD_FRACTION.value, "bad_fraction": _BAD_FRACTION.value,
                      "loadavg_before": [round(x, 2) for x in load_before]}
            print(json.dumps(header), flush=True)
            probe = mixed.measure_max(ports, requests, _CONCURRENCY.value, _PROBE.value, warmup_s=3.0)
            print(json.dumps({"max_probe": probe}), flush=True)
            if probe["errors"] or not probe["rps"]:
                raise SystemExit(f"the maximum-throughput probe failed: {probe}")
            rate = _LOAD_FRACTION.value * probe["rps"]
            hostile = mixed.hostile_catalogue(world["spec"], requests[0], max_candidates=max_candidates,
                                              num_items=world["num_items"])
            load = mixed.MixedLoad(ports, requests, hostile, rate, _BAD_FRACTION.value,
                                   _WORKERS.value or 2 * _CONCURRENCY.value, _SEED.value)
            swap = mixed.Swap(staged, world["base"], 2, ports["rest_port"])
            swap_at = seconds / 2 if _SWAP_AT.value is None else _SWAP_AT.value
            events = [(swap_at, swap)] if swap_at >= 0 else []
            result = load.run(seconds, events=events, rss=lambda: rss_mb(proc.pid),
                              sample_every_s=_SAMPLE_EVERY.value, until=lambda: not events or swap.done)
            swap.join()
            stats = mixed.rest_get(ports["rest_port"], "/v1/stats")
        finally:
            bench.stop_server(proc)
    settle = 60.0 if _SETTLE.value is None else _SETTLE.value
    report = mixed.summarize(result, hostile, rate, 1, 2 if events else None, swap.t_published, swap.t_available,
                             settle, _RSS_TOLERANCE.value)
    report["rss"]["settle_s"] = settle
    counters = stats.get("counters", {})
    server_5xx = {k: v for k, v in counters.items()
                  if k.startswith("rest_errors_5") or k in ("grpc_errors_INTERNAL", "grpc_errors_UNKNOWN")}
    report["server"] = {"swaps": stats.get("swaps"), "model_version": stats.get("model_version"),
                        "errors": {k: v for k, v in sorted(counters.items()) if "errors" in k}, "5xx": server_5xx}
    report["checks"]["server_counted_no_5xx"] = not server_5xx
    report["verdict"] = "PASS" if all(v is not False for v in report["checks"].values()) else "FAIL"
    report = {"max_probe": probe, "load_fraction": _LOAD_FRACTION.value, **report,
              "loadavg_before": [round(x, 2) for x in load_before],
              "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    return report


def main(argv):
    del argv
    seconds = _SECONDS.value if _SECONDS.value is not None else (600.0 if _MODE.value == "soak_mixed" else 60.0)
    if _MODE.value == "soak_mixed":
        report = soak_mixed(seconds)
        print(json.dumps(report, indent=1))
        if _REPORT.value:
            with open(_REPORT.value, "w") as f:
                json.dump(report, f, indent=1)
        mixed.print_summary(report)
        sys.exit(0 if report["verdict"] == "PASS" else 1)
    with tempfile.TemporaryDirectory(prefix="mm_ads_serving_load_") as root:
        world = bench.build_world(root, _NUM_ITEMS.value, _SEQ_LEN.value, _VECTOR_DIM.value, _VARIANT.value,
                                  _SEED.value)
        requests = bench.rank_requests(32, world["num_items"], _CANDIDATES.value, _SEQ_LEN.value, _SEED.value)
        grpc_port, rest_port = free_port(), free_port()
        t_exec = time.monotonic()
        proc, ports = bench.start_server(world, grpc_port, rest_port)
        print(json.dumps({"mode": _MODE.value, "machine": bench.machine_info(), "server_pid": ports["pid"],
                          "startup_s": round(time.monotonic() - t_exec, 2), "concurrency": _CONCURRENCY.value,
                          "candidates": _CANDIDATES.value, "seq_len": _SEQ_LEN.value,
                          "vector_dim": _VECTOR_DIM.value}), flush=True)
        load = Load(ports, requests, _CONCURRENCY.value, _BACKOFF.value)
        samples, kills = [], []
        t_start = time.monotonic()
        load.start()
        kill_times = [_KILL_AFTER.value + j * max(0.0, (seconds - _KILL_AFTER.value - 10) /
                                                   max(1, _KILLS.value)) for j in range(_KILLS.value)]
        try:
            next_sample = t_start
            end = t_start + seconds
            while time.monotonic() < end:
                now = time.monotonic()
                if _MODE.value == "kill" and kill_times and now - t_start >= kill_times[0]:
                    kill_times.pop(0)
                    t_kill = time.monotonic()
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    proc, ports = bench.start_server(world, grpc_port, rest_port)
                    kills.append({"t_kill": t_kill, "t_serving": time.monotonic(), "pid": ports["pid"]})
                    # at least --min_serving_s of serving after each restart, before the next kill and the end
                    floor = kills[-1]["t_serving"] - t_start + _MIN_SERVING.value
                    kill_times = [max(t, floor) for t in kill_times]
                    end = max(end, kills[-1]["t_serving"] + _MIN_SERVING.value)
                    print(f"killed at {t_kill - t_start:.1f} s, serving again after "
                          f"{kills[-1]['t_serving'] - t_kill:.2f} s (pid {ports['pid']})", flush=True)
                if now >= next_sample:
                    samples.append((now - t_start, rss_mb(proc.pid)))
                    next_sample += _SAMPLE_EVERY.value
                time.sleep(0.05)
        finally:
            load.finish()
            bench.stop_server(proc)
    events = sorted(load.events)
    ok = [e for e in events if e[2]]
    failed = [e for e in events if not e[2]]
    elapsed = events[-1][0] - t_start if events else 0.0
    lat = np.asarray([e[3] for e in ok])
    report = {"requests": len(events), "errors": len(failed), "rps": round(len(ok) / max(elapsed, 1e-9), 1),
              "p50_ms": round(1e3 * float(np.percentile(lat, 50)), 2) if len(lat) else None,
              "p99_ms": round(1e3 * float(np.percentile(lat, 99)), 2) if len(lat) else None,
              "error_types": sorted({e[4] for e in failed})}
    if _MODE.value == "soak":
        rss = [(t, m) for t, m in samples if t >= (10.0 if _SETTLE.value is None else _SETTLE.value)]
        if len(rss) >= 2:
            t = np.asarray([x[0] for x in rss])
            m = np.asarray([x[1] for x in rss])
            slope = float(np.polyfit(t, m, 1)[0]) * 60.0
            report.update({"rss_mb_at_settle": round(m[0], 1), "rss_mb_end": round(m[-1], 1),
                           "rss_mb_max": round(float(m.max()), 1), "rss_growth_mb": round(m[-1] - m[0], 1),
                           "rss_slope_mb_per_min": round(slope, 2)})
        report["rss_series_mb"] = [(round(t, 1), round(m, 1)) for t, m in samples[:: max(1, len(samples) // 12)]]
    else:
        report["kills"] = []
        bounds = [k["t_kill"] for k in kills] + [float("inf")]
        for j, k in enumerate(kills):
            # failures from this kill until the next one belong to this kill
            around = [e for e in failed if k["t_kill"] <= e[0] < bounds[j + 1]]
            end = around[-1][0] if around else k["t_serving"]
            after = [e for e in events if end < e[0] < bounds[j + 1]]
            report["kills"].append({
                "restart_s": round(k["t_serving"] - k["t_kill"], 2),
                "failed_requests": len(around),
                "error_window_s": round(around[-1][0] - around[0][0], 2) if around else 0.0,
                # (a request in flight at the kill may still complete just after it: counted from the first failure)
                "first_success_after_kill_s": round(min((e[0] for e in ok if around and e[0] > around[0][0]),
                                                        default=float("nan")) - k["t_kill"], 2),
                "requests_after_window": len(after),
                "all_ok_after_window": all(e[2] for e in after) and len(after) > 0,
            })
        report["errors_outside_kill_windows"] = len(failed) - sum(k["failed_requests"] for k in report["kills"])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
