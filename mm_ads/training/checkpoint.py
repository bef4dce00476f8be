"""The checkpoint layout: what a model's and a training run's `tf.train.Checkpoint` hold, and how they are keyed.

* `model_checkpoint(model)`: every variable of a Keras-3 model keyed by its path; a sharded table saved whole.
* `training_checkpoint(model, sparse_optimizer, dense_optimizer, step, **extra)`: a training run's checkpoint
  (`model`, `sparse_optimizer`, `dense_optimizer`, `step`, plus a task's extra state), what
  `mm_ads.training.trainer.Trainer` saves under `<model_dir>/ckpt/` (`mm_ads.training.model_dir`).
* `restore_model(model, checkpoint)`: the model's variables from a training run's (or a model's) checkpoint,
  the optimizers' slots left out (export, MAKE's phase B, the near-line trainer's start).
"""

import collections

import keras
import tensorflow as tf


def model_checkpoint(model):
    """A `tf.train.Checkpoint` of every variable of a Keras-3 model, keyed by the variable's path.

    A Keras-3 functional model is not itself a checkpoint dependency graph of its variables, so a
    `tf.train.Checkpoint(model=model)` saves nothing of it; keying by path (`emb_item/embeddings`,
    `din/attention_mlp/dense_0/kernel`, ...) makes a checkpoint restorable into a freshly built model.
    Paths are not always unique: layers built outside a parent's scope (e.g. a keras-hub backbone and its
    copy, the MoCo key encoder) keep bare paths. Such variables are keyed by `<child>.<path>`, where
    `<child>` is the name of the model's direct sub-layer that owns them (stable for a given architecture).

    A sharded table (`SparseTables.checkpoint_slices`, e.g. a `SparseEmbedding` with `num_shards > 1`) is saved
    under the key of the unsharded table (`emb_item.embeddings`) as slices of one `[num_buckets, E]` tensor, so
    the model's checkpoint does not depend on the number of shards: it restores into any number of shards, or
    none (e.g. for export).

    A layer's lookup tables (`lookup_tables()`, e.g. the id → row map of a `DynamicEmbedding`) are saved under
    the keys it gives (`emb_item.id_to_row`), contents included.
    """
    from mm_ads.layers.sparse_embedding import SparseTables

    shard_of = {}  # id(shard variable) -> (key of the whole table, its shards)
    for layer in model._flatten_layers(include_self=False):
        slices = layer.checkpoint_slices() if isinstance(layer, SparseTables) else None
        if slices:
            key, shards = slices
            for v in shards:
                shard_of[id(v)] = (key, shards)
    owner = {}
    for child in model._flatten_layers(include_self=False, recursive=False):
        for v in child.variables:
            owner.setdefault(id(v), child.name)
    counts = collections.Counter(v.path for v in model.variables)
    variables = {}
    for v in model.variables:
        if id(v) in shard_of:
            key, shards = shard_of[id(v)]
            if key not in variables:
                variables[key] = tf.__internal__.distribute.ShardedVariable([s.value for s in shards], name=key)
            continue
        key = v.path.replace("/", ".")
        if counts[v.path] > 1 and id(v) in owner:
            key = f"{owner[id(v)]}.{key}"
        if key in variables:
            raise ValueError(f"Two variables of model {model.name!r} share the path {v.path!r}")
        variables[key] = v.value if isinstance(v, keras.Variable) else v
    for layer in model._flatten_layers(include_self=False):
        for key, table in (layer.lookup_tables() if hasattr(layer, "lookup_tables") else {}).items():
            if key in variables:
                raise ValueError(f"The lookup table key {key!r} of model {model.name!r} is also a variable's key")
            variables[key] = table
    return tf.train.Checkpoint(**variables)


def training_checkpoint(model, sparse_optimizer, dense_optimizer, step, **extra):
    """The `tf.train.Checkpoint` of a training run: the model (`model_checkpoint`), both optimizers, the step
    counter, and any `extra` trackables of the task."""
    return tf.train.Checkpoint(model=model_checkpoint(model), sparse_optimizer=sparse_optimizer,
                               dense_optimizer=dense_optimizer, step=step, **extra)


def restore_model(model, checkpoint):
    """Restores every variable of `model` (a model or a layer) from the checkpoint path `checkpoint`, which may hold
    more (optimizer slots, other layers); raises if one of `model`'s variables is absent from it."""
    status = tf.train.Checkpoint(model=model_checkpoint(model)).restore(checkpoint)
    status.expect_partial().assert_existing_objects_matched()
    return status
