"""Which training records each parameter-server worker reads: `python -m tests.distributed.ps_input_probe DATA OUT`.

Starts an in-process cluster (2 workers + 1 ps servers in this process, the coordinator here too), builds the
trainer's per-worker input (`Trainer.per_worker_iterator`) for the `id` model on DATA, schedules STEPS closures
that each take one batch and return the index of the worker that ran it with the batch's record keys
(`user_id`, `item_id`, `timestamp`), and writes `{worker index: [[user, item, timestamp], ...]}` as JSON to OUT.
Run in its own process by tests/distributed/test_parameter_server_ctr.py (in-process servers cannot be stopped).
"""

import json
import sys

import tensorflow as tf

from mm_ads.config import config_from_flagfile
from mm_ads.ctr.task import CTRTask
from mm_ads.training.trainer import Trainer
from tools.cluster import free_ports

NUM_WORKERS, BATCH, STEPS = 2, 64, 24


def main(data_dir, out_path):
    ports = iter(free_ports(NUM_WORKERS + 1))
    spec = tf.train.ClusterSpec({"worker": [f"127.0.0.1:{next(ports)}" for _ in range(NUM_WORKERS)],
                                 "ps": [f"127.0.0.1:{next(ports)}"]})
    for job, n in (("worker", NUM_WORKERS), ("ps", 1)):
        for i in range(n):
            tf.distribute.Server(spec, job_name=job, task_index=i, protocol="grpc", start=True)
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(spec, rpc_layer="grpc")
    strategy = tf.distribute.experimental.ParameterServerStrategy(resolver)
    coordinator = tf.distribute.experimental.coordinator.ClusterCoordinator(strategy)

    config = config_from_flagfile("configs/ctr/smoke.flags", data_dir=data_dir, model_dir=out_path + ".model",
                                  batch_size=BATCH)
    trainer = Trainer(CTRTask(config), config.train, BATCH, config.model_dir, strategy=strategy)
    iterator = trainer.per_worker_iterator(coordinator)

    @tf.function
    def take(iterator):
        def keys(features, labels):
            del labels
            worker = tf.distribute.coordinator.experimental_get_current_worker_index()
            return worker, tf.stack([features["user_id"], features["item_id"], features["timestamp"]], axis=1)

        return strategy.run(keys, args=next(iterator))

    results = [coordinator.schedule(take, args=(iterator,)) for _ in range(STEPS)]
    coordinator.join()
    by_worker = {}
    for r in results:
        worker, keys = r.fetch()
        by_worker.setdefault(int(worker), []).extend(keys.tolist())
    with open(out_path, "w") as f:
        json.dump(by_worker, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
