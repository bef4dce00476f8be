"""MaskedPooling: the mean or sum of a list of embeddings, padding excluded."""

import keras
from keras import ops

COMBINERS = ("mean", "sum")


@keras.saving.register_keras_serializable(package="mm_ads")
class MaskedPooling(keras.layers.Layer):
    """Pools the M embeddings of each example's values (tags, an id sequence) into one vector.

    Padded positions (`mask` False) are excluded: "sum" adds the valid embeddings, "mean" divides that sum by
    the number of valid positions. An example with no valid position pools to zeros (finite, never NaN). The
    arithmetic runs in float32 and the result is cast to the layer's compute dtype.

    Args:
        combiner: "mean" or "sum" (DeepCTR `VarLenSparseFeat(combiner=...)`, EasyRec `combiner`).
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `[B, M, E]` embeddings.
        mask: optional `[B, M]` bool, True = a value; None: every position counts.

    Returns:
        `[B, E]`.

    Example:

    >>> pool = MaskedPooling("mean")
    >>> pool(np.ones((2, 3, 4)), mask=np.array([[1, 1, 0], [0, 0, 0]], bool))  # rows: ones, zeros
    """

    def __init__(self, combiner="mean", **kwargs):
        super().__init__(**kwargs)
        if combiner not in COMBINERS:
            raise ValueError(f"combiner must be one of {COMBINERS}, got {combiner!r}")
        self.combiner = combiner
        self.supports_masking = True  # consumes the Keras mask of its input (e.g. `SparseEmbedding`'s)

    def call(self, inputs, mask=None):
        x = ops.cast(inputs, "float32")  # [B, M, E]
        if mask is None:
            mask = ops.ones(ops.shape(x)[:2], "bool")
        weights = ops.cast(mask, "float32")  # [B, M]
        x = ops.where(ops.expand_dims(ops.cast(mask, "bool"), -1), x, 0.0)  # NaN/inf under padding cannot leak
        total = ops.einsum("bme,bm->be", x, weights)  # [B, E]
        if self.combiner == "mean":
            count = ops.sum(weights, axis=-1, keepdims=True)  # [B, 1]
            total = total / ops.maximum(count, 1.0)
        return ops.cast(total, self.compute_dtype)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_spec(self, inputs, mask=None):
        return keras.KerasTensor((inputs.shape[0], inputs.shape[2]), dtype=self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "combiner": self.combiner}
