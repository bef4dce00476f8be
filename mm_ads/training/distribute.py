"""tf.distribute strategies for the one training loop.

* `default` — one device.
* `mirrored` — synchronous data parallelism over the local devices (on CPU: `num_devices` logical CPUs).
* `multi_worker` — synchronous data parallelism over processes/hosts (`MultiWorkerMirroredStrategy`): every
  worker runs the same command with its own `TF_CONFIG`, holds a full copy of every variable and reads its
  own shard of the input; gradients (dense and `IndexedSlices`) are summed across replicas every step.
  Worker 0 (or the `chief` task, if the cluster has one) writes checkpoints, summaries, metrics and exports.
* `parameter_server` — asynchronous training with `ParameterServerStrategy` + `ClusterCoordinator`: the
  chief task is the coordinator (it runs the loop, schedules steps on the workers, writes checkpoints and
  exports), `ps` tasks hold the variables (embedding tables row-partitioned across them, see
  `mm_ads.layers.SparseEmbedding(num_shards=...)`), `worker` tasks run the steps. ps and worker tasks run
  the same command: `maybe_serve` turns them into `tf.distribute.Server`s that serve until stopped.

Every process of a cluster gets the same flags and its own `TF_CONFIG`; `tools/cluster.py` starts such a
cluster on one machine, BUILD.md shows TF_CONFIG for real hosts.
"""

import json
import os

import tensorflow as tf
from absl import logging

SERVER_TASKS = ("worker", "ps")


def split_cpu(num_devices):
    """Splits the CPU into `num_devices` logical devices (call before TF initialises its devices)."""
    if num_devices <= 1:
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices)
    except RuntimeError as e:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != num_devices:
            raise RuntimeError(
                f"Cannot split the CPU into {num_devices} logical devices: TF is already initialised with {have}"
            ) from e


def tf_config():
    """The parsed `TF_CONFIG` (`{}` when unset); a clear error when it is not valid JSON."""
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e}): {raw[:200]!r}") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict) or "task" not in config:
        raise ValueError(f"TF_CONFIG must be {{'cluster': {{...}}, 'task': {{'type': ..., 'index': ...}}}}, "
                         f"got {raw[:200]!r}")
    return config


def _check_cluster(name, config):
    if not config:
        raise ValueError(f"strategy={name} needs the TF_CONFIG environment variable (cluster and task); "
                         "tools/cluster.py sets it for a local cluster")
    cluster, task = config["cluster"], config["task"]
    task_type, index = task.get("type"), task.get("index", 0)
    if task_type not in cluster or not 0 <= int(index) < len(cluster[task_type]):
        raise ValueError(f"TF_CONFIG task {task_type}:{index} is not in its cluster {sorted(cluster)}")
    if name == "parameter_server":
        missing = [job for job in ("chief", "worker", "ps") if not cluster.get(job)]
        if missing:
            raise ValueError(f"strategy=parameter_server needs chief, worker and ps tasks in TF_CONFIG; "
                             f"missing {missing}")
    elif "ps" in cluster:
        raise ValueError("TF_CONFIG has ps tasks: use strategy=parameter_server (multi_worker has no ps)")


# inter-op threads of a worker or ps task: at least this many, whatever the host's cores
MIN_INTER_OP_THREADS = 16


def server_config():
    """The `ConfigProto` of a worker or ps task's server: at least `MIN_INTER_OP_THREADS` inter-op threads.

    A step that admits ids into a `mm_ads.layers.DynamicEmbedding` runs several partitions on the map's ps task
    (lookup, allocation, insert, pool writes), and the steps of all workers run there at once; with the default
    pool (one thread per core) they can starve it (measured in a one-process cluster on 2 cores: 3 concurrent
    steps of one table never finished with the default pool, and finished with 32 threads).
    """
    return tf.compat.v1.ConfigProto(inter_op_parallelism_threads=inter_op_threads())


def inter_op_threads():
    return max(MIN_INTER_OP_THREADS, os.cpu_count() or 1)


def maybe_serve(name):
    """Under `parameter_server`, a `worker` or `ps` task serves the cluster and never returns.

    Those tasks run no training code of their own: the coordinator (chief) places variables on the ps and
    schedules steps on the workers. They serve until the launcher (or the cluster manager) stops them.
    Returns normally in every other case.
    """
    if name != "parameter_server":
        return
    config = tf_config()
    _check_cluster(name, config)
    task = config["task"]
    if task["type"] not in SERVER_TASKS:
        return
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    server = tf.distribute.Server(resolver.cluster_spec(), job_name=resolver.task_type,
                                  task_index=resolver.task_id, protocol=resolver.rpc_layer or "grpc",
                                  config=server_config(), start=True)
    logging.info("%s:%d serving the parameter-server cluster at %s", task["type"], task.get("index", 0),
                 server.target)
    server.join()
    raise SystemExit(0)


def make_strategy(name, num_devices=1):
    """`default` | `mirrored` | `multi_worker` | `parameter_server` (see the module docstring)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_physical_devices("GPU"):  # physical: listing logical devices would initialise TF
            return tf.distribute.MirroredStrategy()
        split_cpu(num_devices)
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][:num_devices]
        logging.info("MirroredStrategy over %s", devices)
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        _check_cluster(name, tf_config())
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "parameter_server":
        config = tf_config()
        _check_cluster(name, config)
        if config["task"]["type"] != "chief":
            raise ValueError("strategy=parameter_server: only the chief task builds the strategy (worker and ps "
                             "tasks serve: call maybe_serve first)")
        # the coordinator learns of a lost worker at once (TF's recommended setting) instead of hanging
        os.environ.setdefault("GRPC_FAIL_FAST", "use_caller")
        # the remote tasks' eager contexts take the coordinator's thread settings (see `server_config`)
        if tf.config.threading.get_inter_op_parallelism_threads() < inter_op_threads():
            try:
                tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads())
            except RuntimeError as e:  # TF already initialised in this process (e.g. a caller's own setup)
                logging.warning("Keeping TensorFlow's inter-op threads: %s", e)
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        strategy = tf.distribute.experimental.ParameterServerStrategy(resolver)
        logging.info("ParameterServerStrategy: %d workers, %d ps", len(config["cluster"]["worker"]),
                     len(config["cluster"]["ps"]))
        return strategy
    raise ValueError(f"Unknown strategy {name!r}; expected default, mirrored, multi_worker or parameter_server")


def is_parameter_server(strategy):
    return isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy)


def is_chief(strategy):
    """True on the process that writes checkpoints, summaries, metrics and exports.

    Without a cluster: always. In a cluster: the `chief` task if the cluster has one, else worker 0.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not os.environ.get("TF_CONFIG"):
        return True
    config = tf_config()
    task = config.get("task", {})
    task_type, task_id = task.get("type"), int(task.get("index", 0))
    if "chief" in config.get("cluster", {}):
        return task_type == "chief"
    return task_type == "worker" and task_id == 0
