"""The served world and the clients shared by `tools.bench.serving` and `tools.bench.serving_load` (no flags).

`build_world` exports a randomly initialised CTR model as version 1 of a TF Serving base path, writes a dataset
dir (manifest with the FeatureSpec, `items.parquet` catalogue) and an SQLite index table with vectors of 95%
of the items; `start_server` runs `python -m mm_ads.serving.server` on it as a separate process.
"""

import http.client
import json
import os
import signal
import subprocess
import sys

import numpy as np

from tools.bench import machine as bench_machine


# -- the served world ------------------------------------------------------------------------------------------
def build_world(root, num_items, seq_len, vector_dim, variant="simtier", seed=0, with_vector=0.95):
    """Exports a CTR model to `<root>/export/1`, writes `<root>/data` (manifest + catalogue) and `<root>/index.db`.

    Returns `{"spec", "base", "data_dir", "index_uri", "users"}`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mm_ads.data.dataset import Manifest
    from mm_ads.data.spec import FeatureSpec
    from mm_ads.serving.index.index_table import open_index_table
    from mm_ads.utils import io as io_utils

    num_categories, num_brands, num_users = 100, 1000, 10_000
    spec = FeatureSpec.default(seq_len=seq_len, vector_dim=vector_dim, num_items=num_items,
                               num_categories=num_categories, num_brands=num_brands, num_users=num_users,
                               profile_buckets=(7, 2, 5))
    base = os.path.join(root, "export")
    export_model(spec, base, 1, variant, seed)
    rng = np.random.default_rng(seed)
    ids = np.arange(1, num_items + 1, dtype=np.int64)
    data_dir = os.path.join(root, "data")
    os.makedirs(data_dir)
    pq.write_table(pa.table({"item_id": ids, "category_id": rng.integers(1, num_categories + 1, num_items),
                             "brand_id": rng.integers(1, num_brands + 1, num_items)}),
                   os.path.join(data_dir, "items.parquet"))
    io_utils.write_json(os.path.join(data_dir, "manifest.json"), Manifest("bench", "synthetic", spec).to_json())
    index_uri = os.path.join(root, "index.db")
    table = open_index_table(index_uri, dim=vector_dim, encoder_version="bench", create=True)
    have = ids[rng.random(num_items) < with_vector]
    vecs = rng.normal(size=(len(have), vector_dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    for start in range(0, len(have), 5000):
        table.put_many(have[start:start + 5000], vecs[start:start + 5000], "bench")
    table.close()
    return {"spec": spec, "base": base, "data_dir": data_dir, "index_uri": index_uri, "num_items": num_items}


def export_model(spec, base, version, variant="simtier", seed=0):
    """Exports a randomly initialised (`seed`) CTR model of `variant` as `<base>/<version>/`; returns its path."""
    import keras

    from mm_ads.config import CTRModelConfig
    from mm_ads.ctr.model import build_ctr_model
    from mm_ads.export.saved_model import export_saved_model

    keras.utils.set_random_seed(seed)
    model = build_ctr_model(spec, CTRModelConfig(variant=variant))
    return export_saved_model(model, base, version=version, spec=spec)


def server_flag(name, flagfile="configs/serving/server.flags"):
    """The value (a string) of `--<name>` in the server's flagfile (relative to the repository root)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(repo, flagfile)) as f:
        for line in f:
            if line.startswith(f"--{name}="):
                return line.strip().split("=", 1)[1]
    raise KeyError(f"--{name} is not set in {flagfile}")


def rank_requests(num, num_items, candidates, seq_len, seed=0):
    """`num` ranking requests: distinct candidate ids, a full history, user features."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for _ in range(num):
        out.append({"candidates": rng.choice(np.arange(1, num_items + 1), candidates, replace=False).tolist(),
                    "history": rng.integers(1, num_items + 1, seq_len).tolist(),
                    "user_id": int(rng.integers(1, 10_000)),
                    "features": {f"user_profile_{i}": int(rng.integers(1, n + 1)) for i, n in enumerate((7, 2, 5))}})
    return out


def start_server(world, grpc_port=0, rest_port=0, extra=()):
    """Starts `python -m mm_ads.serving.server` on the world; returns (Popen, {"grpc_port", "rest_port", "pid"})."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo)
    cmd = [sys.executable, "-m", "mm_ads.serving.server", "--flagfile=configs/serving/server.flags",
           f"--model_base_path={world['base']}", f"--grpc_port={grpc_port}", f"--rest_port={rest_port}",
           f"--data_dir={world['data_dir']}", f"--index_table={world['index_uri']}", *extra]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"the server exited with {proc.returncode} before it printed its ports")
    return proc, json.loads(line)


def stop_server(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- clients ------------------------------------------------------------------------------------------------------
class GrpcClient:
    """The official TF Serving client: one channel per thread, requests prebuilt with `tf.make_tensor_proto`."""

    def __init__(self, port, timeout=30.0):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.timeout = timeout

    @staticmethod
    def request(arrays, signature="serving_default"):
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        request.model_spec.name = "ctr"
        request.model_spec.signature_name = signature
        for k, v in arrays.items():
            request.inputs[k].CopyFrom(tf.make_tensor_proto(v))
        return request

    def call(self, request):
        response = self.stub.Predict(request, timeout=self.timeout)
        return response.model_spec.version.value

    def close(self):
        self.channel.close()


class RestClient:
    """A keep-alive HTTP/1.1 connection posting JSON."""

    def __init__(self, port, timeout=30.0):
        self.port, self.timeout = port, timeout
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def call(self, path, body):
        try:
            self.conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            resp = self.conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            raise
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        return json.loads(data)

    def close(self):
        self.conn.close()


def rss_mb(pid):
    """`VmRSS` of process `pid` in MB (NaN when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return float("nan")
    return float("nan")


def machine_info():
    import tensorflow  # noqa: F401  (its version is reported)

    return bench_machine.machine_info()
