"""NumericEncoding: numeric features → standardised values or bucket ids."""

import keras
import numpy as np
from keras import ops


def _floats(value, name):
    if value is None:
        return None
    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if not values or not all(np.isfinite(values)):
        raise ValueError(f"{name} must be finite floats, got {value!r}")
    return values


@keras.saving.register_keras_serializable(package="mm_ads")
class NumericEncoding(keras.layers.Layer):
    """Standardises numeric features, or bucketises them for an embedding table.

    Without `boundaries`: `(x - mean) / std` in float32 (the identity when `mean`/`std` are None), EasyRec's
    raw feature with a normaliser, DeepCTR's `DenseFeat`. With `boundaries` `b_0 < ... < b_{n-1}`: the bucket
    of each raw value, `i` for `b_{i-1} <= x < b_i` (0 below `b_0`, n from `b_{n-1}` on), an int64 row of a
    table of n + 1 rows (EasyRec's `boundaries`); `mean`/`std` do not apply to bucketised values.

    Args:
        mean: a float, or K floats (one per value of a `[B, K]` feature).
        std: like `mean`, every value > 0; `mean` and `std` come together.
        boundaries: strictly increasing floats, or None.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `[B]` or `[B, K]` numbers.

    Returns:
        `[B, K]` (K = 1 for `[B]` input): float32 standardised values, or int64 buckets in `[0, n]`.

    Example:

    >>> NumericEncoding(mean=30.0, std=10.0)(np.array([20.0, 45.0]))  # [[-1.0], [1.5]]
    >>> NumericEncoding(boundaries=[18.0, 25.0])(np.array([17.0, 18.0, 60.0]))  # [[0], [1], [2]]
    """

    def __init__(self, mean=None, std=None, boundaries=None, **kwargs):
        super().__init__(**kwargs)
        self.mean = _floats(mean, "mean")
        self.std = _floats(std, "std")
        self.boundaries = _floats(boundaries, "boundaries")
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"mean and std come together, got mean={mean!r}, std={std!r}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be > 0, got {std!r}")
        if self.boundaries is not None and any(a >= b for a, b in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError(f"boundaries must be strictly increasing, got {boundaries!r}")
        if self.boundaries is not None and self.mean is not None:
            raise ValueError("boundaries bucketise the raw values: give either mean/std or boundaries")

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        if len(x.shape) == 1:
            x = ops.expand_dims(x, -1)  # [B, 1]
        if self.boundaries is not None:
            edges = ops.convert_to_tensor(np.asarray(self.boundaries, np.float32))  # [n]
            # bucket = number of boundaries <= x
            return ops.sum(ops.cast(ops.expand_dims(x, -1) >= edges, "int64"), axis=-1)  # [B, K]
        if self.mean is not None:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return x  # [B, K]

    def compute_output_spec(self, inputs):
        shape = tuple(inputs.shape) if len(inputs.shape) == 2 else (inputs.shape[0], 1)
        return keras.KerasTensor(shape, dtype="int64" if self.boundaries is not None else "float32")

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std, "boundaries": self.boundaries}
