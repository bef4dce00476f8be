"""tf.distribute strategies for the one training loop."""

import json
import os

import tensorflow as tf
from absl import logging


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


def make_strategy(name, num_devices=1):
    """`default` | `mirrored` (local devices; on CPU, `num_devices` logical CPUs) | `multi_worker` (TF_CONFIG)."""
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
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy=multi_worker needs the TF_CONFIG environment variable (cluster and task)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"Unknown strategy {name!r}; expected default, mirrored or multi_worker")


def is_chief(strategy):
    """True on the process that writes checkpoints, summaries and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not os.environ.get("TF_CONFIG"):
        return True
    task = json.loads(os.environ["TF_CONFIG"]).get("task", {})
    task_type, task_id = task.get("type"), task.get("index", 0)
    cluster = json.loads(os.environ["TF_CONFIG"]).get("cluster", {})
    if "chief" in cluster:
        return task_type == "chief"
    return task_type == "worker" and task_id == 0
