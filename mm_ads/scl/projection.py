"""Projection head: pooled tower features → L2-normalised D-dim vectors."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="mm_ads")
class ProjectionHead(keras.layers.Layer):
    """Dense → GELU → Dense → L2 normalisation (computed in float32).

    Args:
        output_dim: D, the width of the item vector.
        hidden_dim: width of the hidden layer; 0 = a single linear projection.

    Call arguments:
        inputs: `[B, F]` pooled features.

    Returns:
        `[B, D]` float32 unit vectors (an all-zero projection stays finite: divided by max(‖x‖, 1e-6)).

    Example:

    ```python
    head = ProjectionHead(output_dim=128, hidden_dim=256)
    v = head(keras.random.normal((4, 64)))  # [4, 128], ‖v‖ = 1
    ```
    """

    def __init__(self, output_dim=128, hidden_dim=256, **kwargs):
        super().__init__(**kwargs)
        if int(output_dim) < 1:
            raise ValueError(f"ProjectionHead: output_dim must be >= 1, got {output_dim}")
        if int(hidden_dim) < 0:
            raise ValueError(f"ProjectionHead: hidden_dim must be >= 0, got {hidden_dim}")
        self.output_dim = int(output_dim)
        self.hidden_dim = int(hidden_dim)

    def build(self, input_shape):
        self.hidden = None
        if self.hidden_dim:
            self.hidden = keras.layers.Dense(self.hidden_dim, activation="gelu", dtype=self.dtype_policy,
                                             name="hidden")
            self.hidden.build(input_shape)
            input_shape = tuple(input_shape[:-1]) + (self.hidden_dim,)
        self.output_layer = keras.layers.Dense(self.output_dim, dtype=self.dtype_policy, name="output")
        self.output_layer.build(input_shape)

    def call(self, inputs):
        x = self.hidden(inputs) if self.hidden is not None else inputs
        x = ops.cast(self.output_layer(x), "float32")  # [B, D]
        norm = ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True))
        return x / ops.maximum(norm, 1e-6)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim,)

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype="float32")

    def get_config(self):
        return {**super().get_config(), "output_dim": self.output_dim, "hidden_dim": self.hidden_dim}
