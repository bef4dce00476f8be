"""The SCL model: a query encoder (the exported tower), its MoCo key encoder, the queue and the temperature."""

import keras

from mm_ads.scl.losses import Temperature
from mm_ads.scl.momentum import copy_variables, momentum_update
from mm_ads.scl.queue import KeyQueue


@keras.saving.register_keras_serializable(package="mm_ads")
class SCLModel(keras.Model):
    """Holds everything SCL trains or keeps in step; forward-only (`call` = the query encoder).

    Args:
        encoder: the query/item tower (`TextTower` or `ImageTower`; one tower encodes queries and items).
        use_queue: MoCo on (a momentum key encoder + a K-key queue) or off (keys come from `encoder`
            itself, with gradients, and negatives are the global batch only — the paper's "w/o MoCo").
        queue_size: K.
        momentum: m of the key encoder update.
        temperature_init / temperature_min / temperature_max / learn_temperature: see `Temperature`.

    Call arguments:
        inputs: what the encoder takes (strings `[B]` or images `[B, H, W, 3]`).

    Returns:
        float32 `[B, D]` unit vectors of the query encoder.
    """

    def __init__(self, encoder, use_queue=True, queue_size=65536, momentum=0.999, temperature_init=0.07,
                 temperature_min=0.01, temperature_max=1.0, learn_temperature=True, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"SCLModel: momentum must be in [0, 1], got {momentum}")
        self.encoder = encoder
        self.use_queue = bool(use_queue)
        self.queue_size = int(queue_size)
        self.momentum = float(momentum)
        self.temperature_init = float(temperature_init)
        self.temperature_min = float(temperature_min)
        self.temperature_max = float(temperature_max)
        self.learn_temperature = bool(learn_temperature)
        self.temperature = Temperature(self.temperature_init, self.temperature_min, self.temperature_max,
                                       trainable=self.learn_temperature, name="temperature")
        self.key_encoder = None
        self.queue = None
        if self.use_queue:
            # the query encoder's architecture with its own variables; `build` makes it an exact copy and
            # freezes it (its weights follow the encoder's only by `update_key_encoder`)
            if hasattr(encoder, "clone_architecture"):
                self.key_encoder = encoder.clone_architecture("key_encoder")
            else:
                self.key_encoder = type(encoder).from_config(dict(encoder.get_config(), name="key_encoder"))
            self.queue = KeyQueue(self.queue_size, encoder.output_dim, name="queue")

    def build(self, input_shape=None):
        self.encoder.build(input_shape)
        self.temperature.build()
        if self.use_queue:
            self.key_encoder.build(input_shape)
            # Frozen here, after build, not when created: the towers create their sublayers in build() (a
            # residual block's GroupNorm depends on its input channels, and the text tower's Keras
            # MultiHeadAttention creates its projections in its own build()), and Keras 3 passes `trainable` on
            # only to the sublayers that exist when it is set.
            self.key_encoder.trainable = False
            self.queue.build()
            copy_variables(self.key_encoder.weights, self.encoder.weights)  # the key encoder starts as a copy

    def call(self, inputs, training=None):
        return self.encoder(inputs, training=training)

    def keys(self, inputs):
        """Key vectors `[B, D]`: the momentum encoder's (no gradient) with MoCo, else the encoder's."""
        if not self.use_queue:
            return self.encoder(inputs, training=True)
        return keras.ops.stop_gradient(self.key_encoder(inputs, training=False))

    def update_key_encoder(self):
        """MoCo momentum step (replica or cross-replica context)."""
        return momentum_update(self.key_encoder.weights, self.encoder.weights, self.momentum)

    def get_config(self):
        return {**super().get_config(), "encoder": keras.layers.serialize(self.encoder), "use_queue": self.use_queue,
                "queue_size": self.queue_size, "momentum": self.momentum, "temperature_init": self.temperature_init,
                "temperature_min": self.temperature_min, "temperature_max": self.temperature_max,
                "learn_temperature": self.learn_temperature}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.layers.deserialize(config["encoder"])
        return cls(**config)
