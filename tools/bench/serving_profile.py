r"""Where the prediction server's CPU goes under load: `perf record` of the server process, by shared object.

Builds the served world of `tools/bench/serving.py` (a `simtier` model of the default sizes, 20k items, an SQLite
index table), starts the server as its own process with `configs/serving/server.flags`, keeps it busy with
`--concurrency` threads of gRPC `rank` calls (200 candidates, S=50, D=128), and after `--warmup_s` records the
server with Linux `perf record -F <hz> -g` for `--seconds`. It prints the requests answered meanwhile and
`perf report --sort dso` and `--sort sym` (the `--top` rows of each): the share of samples in oneDNN's JIT kernels
(`[JIT]`), TF's kernels and executor (`libtensorflow_cc`, `libtensorflow_framework`), the Python interpreter,
numpy, gRPC, protobuf, libc and the kernel. Needs `perf` (linux-tools) and a `perf_event_paranoid` setting that
allows profiling your own processes.

```
python -m tools.bench.serving_profile                      # ~1 minute
python -m tools.bench.serving_profile --concurrency=1 --seconds=8
```
"""

import os
import shutil
import subprocess
import tempfile
import threading
import time

import numpy as np
from absl import app, flags

from tools.bench.serving_world import GrpcClient, build_world, machine_info, rank_requests, start_server, stop_server

_CONCURRENCY = flags.DEFINE_integer("concurrency", 4, "Client threads calling rank.")
_SECONDS = flags.DEFINE_float("seconds", 8.0, "Seconds recorded by perf.")
_WARMUP = flags.DEFINE_float("warmup_s", 3.0, "Seconds of load before recording.")
_HZ = flags.DEFINE_integer("hz", 499, "perf's sampling frequency.")
_TOP = flags.DEFINE_integer("top", 12, "Shared objects listed.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if shutil.which("perf") is None:
        raise app.UsageError("`perf` is not installed (linux-tools): it records the server process")
    print({"machine": machine_info(), "concurrency": _CONCURRENCY.value}, flush=True)
    root = tempfile.mkdtemp(prefix="mm_ads_serving_profile_")
    try:
        world = build_world(root, 20_000, 50, 128, variant="simtier")
        proc, ports = start_server(world, extra=["--intra_op_threads=1"])
        try:
            requests = [GrpcClient.request(
                {"item_id": np.asarray(r["candidates"], np.int64), "hist_item_id": np.asarray(r["history"], np.int64),
                 "user_id": np.asarray(r["user_id"], np.int64),
                 **{k: np.asarray(v, np.int64) for k, v in r["features"].items()}}, "rank")
                for r in rank_requests(64, 20_000, 200, 50)]
            stop, answered, errors = threading.Event(), [0] * _CONCURRENCY.value, []

            def worker(i):
                client = GrpcClient(ports["grpc_port"])
                try:
                    k = i
                    while not stop.is_set():
                        client.call(requests[k % len(requests)])
                        k += 1
                        answered[i] += 1
                except Exception as e:  # a failed request ends the run with an error
                    errors.append(e)
                    stop.set()
                finally:
                    client.close()

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(_CONCURRENCY.value)]
            for t in threads:
                t.start()
            time.sleep(_WARMUP.value)
            before = sum(answered)
            data = os.path.join(root, "perf.data")
            rec = subprocess.run(["perf", "record", "-F", str(_HZ.value), "-g", "-p", str(ports["pid"]), "-o", data,
                                  "--", "sleep", str(_SECONDS.value)], capture_output=True, text=True)
            during = sum(answered) - before
            stop.set()
            for t in threads:
                t.join()
            if errors:
                raise RuntimeError(f"request failed: {errors[0]!r}")
            if rec.returncode != 0 or not os.path.exists(data):
                raise RuntimeError(f"perf record failed ({rec.returncode}): {rec.stderr.strip()[-500:]}")
        finally:
            stop_server(proc)
        print(f"\n{during} rank requests answered in the {_SECONDS.value:g} s recorded "
              f"({during / _SECONDS.value:.0f} req/s)")
        for sort, title in (("dso", "shared object"), ("sym", "symbol")):
            report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", sort, "--stdio", "-g",
                                     "none"], capture_output=True, text=True, check=True).stdout
            rows = [line.strip() for line in report.splitlines() if line.strip() and not line.startswith("#")]
            print(f"\n| share of the server's samples | {title} |\n|---:|---|")
            for row in rows[:_TOP.value]:
                share, name = row.split(None, 1)
                print(f"| {share} | {name[:120]} |")
        print({"load_after": machine_info()["load"]})
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
