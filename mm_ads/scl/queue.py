"""The MoCo queue: a ring buffer of K keys and their item ids, any K, any batch size."""

import keras
import tensorflow as tf

from mm_ads.scl.momentum import update_variables


@keras.saving.register_keras_serializable(package="mm_ads")
class KeyQueue(keras.layers.Layer):
    """Ring buffer of the last K keys (+ item ids) produced by the key encoder.

    Writes wrap around: `n` new keys go to slots `(pointer + arange(n)) mod K`, so K need not be a multiple
    of the batch size (the reference MoCo code requires K % batch == 0). A batch larger than K keeps its last
    K keys, written oldest first from the pointer on; the pointer advances by what was written (`min(n, K)`,
    modulo K), so it always points at the oldest key and the next write evicts that one. Slots never written
    are invalid (`valid()` is False) and are masked out of the loss.

    The variables are non-trainable; `enqueue` updates every replica's copy with the same all-gathered keys
    (see `mm_ads.scl.momentum.update_variables`), so all replicas hold identical queues.

    Args:
        size: K.
        dim: D.

    Call arguments: none; use `keys`, `ids`, `valid()` and `enqueue(keys, ids)`.
    """

    def __init__(self, size, dim, **kwargs):
        super().__init__(**kwargs)
        if int(size) < 1 or int(dim) < 1:
            raise ValueError(f"KeyQueue: size and dim must be >= 1, got {size}, {dim}")
        self.size = int(size)
        self.dim = int(dim)

    def build(self, input_shape=None):
        self.keys = self.add_weight(shape=(self.size, self.dim), initializer="zeros", dtype="float32",
                                    trainable=False, name="keys")
        self.ids = self.add_weight(shape=(self.size,), initializer=keras.initializers.Constant(-1), dtype="int64",
                                   trainable=False, name="ids")
        self.pointer = self.add_weight(shape=(), initializer="zeros", dtype="int64", trainable=False,
                                       name="pointer")
        self.count = self.add_weight(shape=(), initializer="zeros", dtype="int64", trainable=False, name="count")

    def valid(self):
        """bool `[K]`: slots that hold a key."""
        return tf.range(self.size, dtype=tf.int64) < tf.convert_to_tensor(self.count)

    def enqueue(self, keys, ids):
        """Writes `keys` `[n, D]` and `ids` `[n]` (identical on every replica: all-gathered) after the pointer."""
        size = self.size

        def slots(pointer, n):
            return (pointer + tf.range(n, dtype=tf.int64)) % size  # [n]

        def write_keys(var, pointer, keys):
            keys = tf.cast(keys, var.dtype)[-size:]
            return var.scatter_nd_update(slots(pointer, tf.shape(keys, tf.int64)[0])[:, None], keys)

        def write_ids(var, pointer, ids):
            ids = tf.cast(ids, tf.int64)[-size:]
            return var.scatter_nd_update(slots(pointer, tf.shape(ids, tf.int64)[0])[:, None], ids)

        def advance(var, ids):  # by the number of keys written: the pointer stays on the oldest key
            return var.assign((var + tf.minimum(tf.shape(ids, tf.int64)[0], size)) % size)

        def fill(var, ids):
            return var.assign(tf.minimum(var + tf.shape(ids, tf.int64)[0], size))

        with tf.control_dependencies([update_variables(write_keys, [self.keys], self.pointer, keys),
                                      update_variables(write_ids, [self.ids], self.pointer, ids)]):
            return tf.group(update_variables(advance, [self.pointer], ids), update_variables(fill, [self.count], ids))

    def get_config(self):
        return {**super().get_config(), "size": self.size, "dim": self.dim}
