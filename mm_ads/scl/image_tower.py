"""The image tower: a small residual conv net trained from scratch (32–96 px), GroupNorm instead of BatchNorm.

GroupNorm normalises each example on its own, so replicas never disagree on statistics (BatchNorm's running
statistics diverge across replicas unless synchronised) and a batch of 1 at serving time behaves like training.
"""

import keras
from keras import ops

from mm_ads.scl.projection import ProjectionHead


def _groups(channels, groups):
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


@keras.saving.register_keras_serializable(package="mm_ads")
class ResidualBlock(keras.layers.Layer):
    """GroupNorm → ReLU → Conv3x3 (stride) → GroupNorm → ReLU → Conv3x3, plus a (1x1 strided) shortcut.

    Args:
        filters: output channels C.
        strides: 1 or 2 (downsampling).
        groups: GroupNorm groups (reduced to a divisor of the channels).

    Call arguments:
        inputs: `[B, H, W, C_in]`.

    Returns:
        `[B, H / strides, W / strides, C]`.
    """

    def __init__(self, filters, strides=1, groups=8, **kwargs):
        super().__init__(**kwargs)
        if int(filters) < 1 or int(strides) not in (1, 2):
            raise ValueError(f"ResidualBlock: filters must be >= 1 and strides 1 or 2, got {filters}, {strides}")
        self.filters = int(filters)
        self.strides = int(strides)
        self.groups = int(groups)

    def build(self, input_shape):
        c_in = int(input_shape[-1])
        kw = dict(dtype=self.dtype_policy)
        self.norm1 = keras.layers.GroupNormalization(_groups(c_in, self.groups), name="norm1", **kw)
        self.conv1 = keras.layers.Conv2D(self.filters, 3, self.strides, padding="same", use_bias=False,
                                         name="conv1", **kw)
        self.norm2 = keras.layers.GroupNormalization(_groups(self.filters, self.groups), name="norm2", **kw)
        self.conv2 = keras.layers.Conv2D(self.filters, 3, padding="same", use_bias=False, name="conv2", **kw)
        self.shortcut = None
        if c_in != self.filters or self.strides != 1:
            self.shortcut = keras.layers.Conv2D(self.filters, 1, self.strides, use_bias=False, name="shortcut", **kw)
            self.shortcut.build(input_shape)
        self.norm1.build(input_shape)
        self.conv1.build(input_shape)
        out = self.conv1.compute_output_shape(input_shape)
        self.norm2.build(out)
        self.conv2.build(out)

    def call(self, inputs):
        h = ops.relu(self.norm1(inputs))
        skip = self.shortcut(h) if self.shortcut is not None else inputs
        h = self.conv1(h)  # [B, H / s, W / s, C]
        h = self.conv2(ops.relu(self.norm2(h)))
        return skip + h

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        s = self.strides
        return (b, None if h is None else -(-h // s), None if w is None else -(-w // s), self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "strides": self.strides, "groups": self.groups}


@keras.saving.register_keras_serializable(package="mm_ads")
class ImageTower(keras.Model):
    """RGB images → L2-normalised D-dim vector: conv stem, residual stages, global average pool, head.

    Args:
        widths: channels of each stage; every stage after the first halves the resolution.
        blocks_per_stage: residual blocks per stage.
        groups: GroupNorm groups.
        output_dim: D.
        projection_hidden: hidden width of the projection head (0 = linear).

    Call arguments:
        inputs: `[B, H, W, 3]` float images in [0, 1] (uint8 in [0, 255] is rescaled). Any H, W.

    Returns:
        float32 `[B, D]` unit vectors.

    Example:

    ```python
    tower = ImageTower(widths=(32, 64, 128), output_dim=128)
    v = tower(keras.random.uniform((2, 32, 32, 3)))  # [2, 128]
    ```

    References:
        He et al. 2016 (pre-activation residual blocks); Wu & He 2018 (GroupNorm).
    """

    def __init__(self, widths=(32, 64, 128), blocks_per_stage=1, groups=8, output_dim=128, projection_hidden=256,
                 **kwargs):
        super().__init__(**kwargs)
        self.widths = tuple(int(w) for w in widths)
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"ImageTower: widths must be a non-empty list of positive ints, got {widths}")
        self.blocks_per_stage = int(blocks_per_stage)
        self.groups = int(groups)
        self.output_dim = int(output_dim)
        self.projection_hidden = int(projection_hidden)

    def build(self, input_shape=None):
        shape = (None, None, None, 3)
        self.stem = keras.layers.Conv2D(self.widths[0], 3, padding="same", use_bias=False, name="stem")
        self.stem.build(shape)
        shape = (None, None, None, self.widths[0])
        self.blocks = []
        for s, width in enumerate(self.widths):
            for b in range(self.blocks_per_stage):
                block = ResidualBlock(width, 2 if (s > 0 and b == 0) else 1, self.groups, name=f"stage{s}_block{b}")
                block.build(shape)
                shape = (None, None, None, width)
                self.blocks.append(block)
        self.final_norm = keras.layers.GroupNormalization(_groups(self.widths[-1], self.groups), name="final_norm")
        self.final_norm.build(shape)
        self.head = ProjectionHead(self.output_dim, self.projection_hidden, name="projection")
        self.head.build((None, self.widths[-1]))

    def call(self, inputs, training=None):
        x = ops.cast(inputs, "float32")
        if keras.backend.standardize_dtype(inputs.dtype) == "uint8":
            x = x / 255.0
        x = self.stem(x * 2.0 - 1.0)  # [B, H, W, C0]
        for block in self.blocks:
            x = block(x)
        x = ops.relu(self.final_norm(x))
        return self.head(ops.mean(x, axis=(1, 2)))  # [B, D]

    def compute_output_spec(self, inputs, training=None):
        return keras.KerasTensor((inputs.shape[0], self.output_dim), dtype="float32")

    def get_config(self):
        return {**super().get_config(), "widths": list(self.widths), "blocks_per_stage": self.blocks_per_stage,
                "groups": self.groups, "output_dim": self.output_dim, "projection_hidden": self.projection_hidden}
