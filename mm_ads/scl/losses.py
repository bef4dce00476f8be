"""SCL losses (paper §3.3, §6.1.2): InfoNCE over in-batch keys ∪ queue with a learnable temperature, and triplet.

`info_nce` scores each query against `keys = [global in-batch positives (all replicas) ; queue]`; the
positive of query i is column `labels[i]`. A key that is the **same item** as query i's positive (same
item id) but is not its own column is a false negative and is masked out, whether it sits elsewhere in the
batch or in the queue; so are invalid (not yet filled) queue slots. Logits, softmax and the temperature are
float32; masked logits get the dtype's lowest finite value, so a row is finite even if everything but the
positive is masked.

The temperature τ = exp(log τ) is learnable, clamped to [τ_min, τ_max] (`Temperature`).
"""

import keras
import tensorflow as tf
from keras import ops


@keras.saving.register_keras_serializable(package="mm_ads")
class Temperature(keras.layers.Layer):
    """A learnable softmax temperature, parameterised by its logarithm and clamped to [min_value, max_value].

    Args:
        initial_value: τ at initialisation (paper-style 0.07).
        min_value / max_value: clamp of τ (the forward pass clips; after each optimizer step the SCL task
            assigns `clamped_log_value(log_temperature)` to the variable, so the optimizer cannot drift past
            the bounds).
        trainable: False keeps τ fixed.

    Not called: `layer.tau()` returns the float32 scalar τ.
    """

    def __init__(self, initial_value=0.07, min_value=0.01, max_value=1.0, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < float(min_value) <= float(initial_value) <= float(max_value):
            raise ValueError(f"Temperature: need 0 < min_value <= initial_value <= max_value, got "
                             f"{min_value}, {initial_value}, {max_value}")
        self.initial_value = float(initial_value)
        self.min_value = float(min_value)
        self.max_value = float(max_value)

    def build(self, input_shape=None):
        self.log_temperature = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(float(tf.math.log(self.initial_value))),
            dtype="float32", trainable=self.trainable, name="log_temperature")

    def tau(self):
        """float32 scalar τ = exp(clip(log τ))."""
        log_t = ops.clip(ops.convert_to_tensor(self.log_temperature), tf.math.log(self.min_value),
                         tf.math.log(self.max_value))
        return ops.exp(log_t)

    def clamped_log_value(self, value):
        return tf.clip_by_value(value, tf.math.log(self.min_value), tf.math.log(self.max_value))

    def get_config(self):
        return {**super().get_config(), "initial_value": self.initial_value, "min_value": self.min_value,
                "max_value": self.max_value}


def info_nce(queries, keys, labels, positive_ids, key_ids, temperature, key_valid=None, queue_keys=None,
             queue_ids=None, queue_valid=None, query_ids=None):
    """Per-example InfoNCE (eq. 1) with false negatives masked by item id.

    The candidates are `keys` (the in-batch positives of every replica), then optionally a queue. The queue
    block is the large one (`[B, K]`), so it gets the fewest passes: 1/τ is folded into the queries, and once
    the queue is full one id comparison is the whole mask.

    Args:
        queries: `[B, D]` query vectors (unit norm).
        keys: `[N, D]` candidate keys (in-batch positives of every replica, or any candidate set).
        labels: int `[B]`: column of query i's own positive in `keys`.
        positive_ids: int64 `[B]`: item id of query i's positive.
        key_ids: int64 `[N]`: item id of every key.
        temperature: float32 scalar τ.
        key_valid: optional bool `[N]`; False columns are ignored.
        queue_keys / queue_ids / queue_valid: optional queue `[K, D]`, `[K]`, bool `[K]` (empty slots False).
        query_ids: optional int64 `[B]`: item id of query i itself, when queries are catalogue items (ids < 0:
            none). A key of that item is masked too: it is the query's own item, not a negative (its text is
            the query, so it would be the hardest "negative" of all and teach the encoder to push a thing away
            from itself).

    Returns:
        float32 `[B]` losses.
    """
    scaled = tf.cast(queries, tf.float32) / temperature  # [B, D]
    positive_ids = tf.cast(positive_ids, tf.int64)
    logits = tf.matmul(scaled, tf.cast(keys, tf.float32), transpose_b=True)  # [B, N]
    n = tf.shape(logits)[1]
    own = tf.equal(tf.range(n, dtype=labels.dtype)[None, :], labels[:, None])  # [B, N]
    same_item = _same_item(key_ids, positive_ids, query_ids)
    masked = tf.logical_and(same_item, tf.logical_not(own))  # [B, N]
    if key_valid is not None:
        masked = tf.logical_or(masked, tf.logical_not(key_valid)[None, :])
    logits = tf.where(masked, tf.float32.min, logits)
    if queue_keys is None:
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(labels, tf.int32), logits=logits)
    same = _same_item(queue_ids, positive_ids, query_ids)  # [B, K]
    if queue_valid is not None:
        same = tf.cond(tf.reduce_all(queue_valid), lambda: same,
                       lambda: tf.logical_or(same, tf.logical_not(queue_valid)[None, :]))
    log_z = tf.reduce_logsumexp(tf.stack([tf.reduce_logsumexp(logits, axis=1),
                                          _masked_logsumexp(scaled, tf.cast(queue_keys, tf.float32), same)], 1), 1)
    positive = tf.gather(logits, tf.cast(labels, tf.int32), axis=1, batch_dims=1)  # [B]
    return log_z - positive


def _same_item(key_ids, positive_ids, query_ids):
    """bool `[B, N]`: key j is query i's positive item, or (with `query_ids`) query i's own item."""
    key_ids = tf.cast(key_ids, tf.int64)[None, :]
    same = tf.equal(key_ids, positive_ids[:, None])
    if query_ids is not None:
        query_ids = tf.cast(query_ids, tf.int64)[:, None]
        same = tf.logical_or(same, tf.logical_and(tf.equal(key_ids, query_ids), query_ids >= 0))
    return same


@tf.custom_gradient
def _masked_logsumexp(scaled, keys, masked):
    """`logsumexp_j(scaled · keys_j)` over the unmasked j, `[B]`, keeping one `[B, K]` tensor for the backward.

    Autodiff of matmul → where → concat → softmax cross-entropy keeps ~6 `[B, K]` tensors alive; with
    K = 196,800 each is 200 MB per 256 queries, and allocating them dominated the step.
    """
    logits = tf.where(masked, tf.float32.min, tf.matmul(scaled, keys, transpose_b=True))  # [B, K]
    lse = tf.reduce_logsumexp(logits, axis=1)  # [B]

    def grad(upstream):
        weights = tf.exp(logits - lse[:, None]) * upstream[:, None]  # softmax · upstream, [B, K]
        return tf.matmul(weights, keys), None, None

    return lse, grad


def triplet(queries, positives, negatives, margin, valid=None):
    """Per-example triplet loss `max(0, margin − q·p + q·n)` (cosine similarities; `valid` False → 0).

    Args:
        queries / positives / negatives: `[B, D]` unit vectors.
        margin: float.
        valid: optional bool `[B]` (rows without a hard negative).

    Returns:
        float32 `[B]`.
    """
    q = tf.cast(queries, tf.float32)
    pos = tf.reduce_sum(q * tf.cast(positives, tf.float32), axis=-1)
    neg = tf.reduce_sum(q * tf.cast(negatives, tf.float32), axis=-1)
    loss = tf.nn.relu(margin - pos + neg)  # [B]
    if valid is not None:
        loss = tf.where(valid, loss, tf.zeros_like(loss))
    return loss
