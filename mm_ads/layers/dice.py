"""Dice: the data-adaptive activation of the Deep Interest Network."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="mm_ads")
class Dice(keras.layers.Layer):
    """Dice activation (Zhou et al. 2018), a PReLU whose rectifier point adapts to the data.

    `p = sigmoid((x - E[x]) / sqrt(Var[x] + epsilon))` and `f(x) = p * x + (1 - p) * alpha * x`, with one
    learnable `alpha` per feature (last axis). In training, `E[x]` and `Var[x]` are the statistics of the
    current batch over every axis but the last (only positions where `mask` is True count, so padding never
    shifts them) and moving averages are updated with `momentum`; in inference the moving averages are used,
    so a prediction does not depend on the rest of its batch. Statistics are per replica under
    `tf.distribute` (like an unsynchronised BatchNormalization).

    Mixed precision: `alpha` and the moving statistics are float32 and the activation is computed in
    float32; the output has the layer's compute dtype.

    Args:
        momentum: float in [0, 1), momentum of the moving mean/variance.
        epsilon: float > 0 added to the variance (the paper uses 1e-8).
        alpha_initializer: initializer of `alpha` (zeros: Dice starts as `x * p`).

    Call arguments:
        inputs: `[B, ..., H]` float tensor.
        training: Python bool; batch statistics (and moving-average updates) when True.
        mask: optional `[B, ...]` bool (inputs rank - 1), True = valid position; only used for the
            batch statistics.

    Returns:
        `[B, ..., H]`, same shape as `inputs`.

    Example:

    ```python
    x = keras.ops.ones((8, 5, 16))
    y = Dice()(x, training=True)  # [8, 5, 16]
    ```

    References:
        - [Zhou et al. 2018, Deep Interest Network for Click-Through Rate Prediction](
          https://arxiv.org/abs/1706.06978), section 4.3.
    """

    def __init__(self, momentum=0.99, epsilon=1e-8, alpha_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1). Received: momentum={momentum}")
        if not epsilon > 0.0:
            raise ValueError(f"`epsilon` must be > 0. Received: epsilon={epsilon}")
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.alpha_initializer = keras.initializers.get(alpha_initializer)

    def build(self, input_shape):
        units = input_shape[-1]
        if units is None:
            raise ValueError(f"The last axis of the Dice input must be known. Received: input_shape={input_shape}")
        # float32 state, read without autocasting to bf16/fp16 inside a mixed-precision call.
        self.alpha = self.add_weight(
            shape=(units,), initializer=self.alpha_initializer, dtype="float32", autocast=False, name="alpha"
        )
        self.moving_mean = self.add_weight(
            shape=(units,), initializer="zeros", dtype="float32", autocast=False, trainable=False,
            name="moving_mean",
        )
        self.moving_variance = self.add_weight(
            shape=(units,), initializer="ones", dtype="float32", autocast=False, trainable=False,
            name="moving_variance",
        )

    def call(self, inputs, training=None, mask=None):
        x = ops.cast(inputs, "float32")
        if training:
            axes = tuple(range(len(x.shape) - 1))
            if mask is None:
                valid = ops.ones_like(x[..., :1], dtype="bool")  # [B, ..., 1]
            else:
                valid = ops.expand_dims(ops.cast(mask, "bool"), -1)  # [B, ..., 1]
            count = ops.sum(ops.cast(valid, "float32"), axis=axes)  # [1]
            safe_count = ops.maximum(count, 1.0)
            # `where`, not a multiply by the mask: inf/NaN at padded positions must not leak in.
            mean = ops.sum(ops.where(valid, x, 0.0), axis=axes) / safe_count  # [H]
            variance = ops.sum(ops.where(valid, ops.square(x - mean), 0.0), axis=axes) / safe_count  # [H]
            # An all-padded batch carries no statistics: keep the moving averages as they are.
            seen = count > 0.0
            self.moving_mean.assign(
                ops.where(seen, self.moving_mean * self.momentum + mean * (1.0 - self.momentum), self.moving_mean)
            )
            self.moving_variance.assign(
                ops.where(
                    seen,
                    self.moving_variance * self.momentum + variance * (1.0 - self.momentum),
                    self.moving_variance,
                )
            )
        else:
            mean = ops.convert_to_tensor(self.moving_mean)
            variance = ops.convert_to_tensor(self.moving_variance)
        p = ops.sigmoid((x - mean) * ops.rsqrt(variance + self.epsilon))
        outputs = p * x + (1.0 - p) * self.alpha * x
        return ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_mask(self, inputs, previous_mask=None):
        return previous_mask

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "alpha_initializer": keras.initializers.serialize(self.alpha_initializer),
            }
        )
        return config
