"""StringHashing: string ids → int64 rows of an embedding table, "" → the padding row 0."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="mm_ads")
class StringHashing(keras.layers.Layer):
    """Hashes string ids into the rows `[1, num_buckets)` of a table; the padding string goes to row 0.

    A non-padding string `s` goes to row `tf.strings.to_hash_bucket_fast(s, num_buckets - 1) + 1` (FarmHash
    Fingerprint64: the same row on every machine and in every TensorFlow version, and in the SavedModel a
    stock TF Serving runs). Row 0 is left to padding, so a `SparseEmbedding(num_buckets, ..., padding_id=0)`
    after this layer gives zero vectors for empty slots. Distinct strings may share a row (a fixed-size table
    holds no vocabulary), as in EasyRec's `hash_bucket_size` and DeepCTR's `use_hash`.

    Args:
        num_buckets: rows of the table, >= 2.
        padding_value: the string of an empty slot.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: string tensor of any shape, e.g. `[B]` or `[B, M]`.

    Returns:
        int64 tensor of the same shape, values in `[0, num_buckets)`, 0 exactly where `inputs == padding_value`.

    Example:

    >>> layer = StringHashing(num_buckets=100)
    >>> rows = layer(tf.constant([["doctor", ""]]))  # [[1 + hash("doctor") % 99, 0]]
    """

    def __init__(self, num_buckets, padding_value="", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_buckets, int) or num_buckets < 2:
            raise ValueError(f"num_buckets must be an int >= 2 (row 0 is padding), got {num_buckets!r}")
        if not isinstance(padding_value, str):
            raise ValueError(f"padding_value must be a string, got {padding_value!r}")
        self.num_buckets = num_buckets
        self.padding_value = padding_value

    def call(self, inputs):
        rows = tf.strings.to_hash_bucket_fast(inputs, self.num_buckets - 1) + 1  # same shape as inputs
        return tf.where(tf.equal(inputs, self.padding_value), tf.zeros_like(rows), rows)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(inputs.shape, dtype="int64")

    def get_config(self):
        return {**super().get_config(), "num_buckets": self.num_buckets, "padding_value": self.padding_value}
