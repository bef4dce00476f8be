"""MLP: the dense tower shared by DIN's attention unit, the CTR head and MAKE."""

import keras

from mm_ads.layers.dice import Dice
from mm_ads.layers.trainable import set_sublayers_trainable

NORMALIZATIONS = (None, "batch", "layer")
# Activations that are layers with weights, not functions.
LAYER_ACTIVATIONS = ("dice", "prelu")


def check_activation(activation):
    """Raises ValueError unless `activation` is "dice", "prelu" or a Keras activation name."""
    if not isinstance(activation, str):
        raise ValueError(f"`activation` must be a string name. Received: activation={activation!r}")
    if activation in LAYER_ACTIVATIONS:
        return
    try:
        keras.activations.get(activation)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"`activation` must be 'dice', 'prelu' or a Keras activation name. Received: activation={activation!r}"
        ) from e


def _float32_policy_if_mixed(policy):
    """The policy of a layer that must compute in float32 (a logit) inside a mixed-precision model."""
    if policy.compute_dtype in ("float16", "bfloat16"):
        return "float32"
    return policy


@keras.saving.register_keras_serializable(package="mm_ads")
class MLP(keras.layers.Layer):
    """Multi-layer perceptron: `hidden_units` blocks of Dense → [normalization] → activation → [dropout],
    then an optional linear output layer.

    The output layer (the logit) computes in float32 under a mixed-precision policy. Layers with batch
    statistics (Dice, BatchNormalization) take `mask`, so padded positions of a `[B, S, H]` input never
    enter the statistics and padding does not change the output, in training as in inference.

    `trainable=False`, given to the constructor or set before or after build, freezes every sublayer and variable.

    Args:
        hidden_units: sequence of positive ints, widths of the hidden layers (may be empty when
            `output_units` is set).
        activation: hidden activation: "relu", "prelu" (learnable slope per unit, init 0.25), "dice"
            (`mm_ads.layers.Dice`) or any Keras activation name ("sigmoid", "gelu", ...).
        dropout: dropout rate in [0, 1) after every hidden activation.
        normalization: None, "batch" (BatchNormalization) or "layer" (LayerNormalization), between each
            hidden Dense and its activation.
        synchronized: with `normalization="batch"`, synchronise the batch statistics across replicas under
            `tf.distribute` (otherwise each replica normalises with its own statistics).
        output_units: optional int, width of a final linear layer (e.g. 1 for a CTR logit). None: the
            output is the last hidden layer.
        use_bias: whether the Dense layers have a bias.
        output_use_bias: whether the output layer has a bias (None: as `use_bias`). A logit that only ever
            enters a softmax over positions (DIN's attention scores) must not have one: softmax is invariant
            to a shift of all its inputs, so that bias would get an exactly-zero gradient and never learn.
        kernel_initializer: initializer of the Dense kernels.
        bias_initializer: initializer of the Dense biases.
        kernel_regularizer: optional regularizer of the Dense kernels.
        bias_regularizer: optional regularizer of the Dense biases.
        return_hidden: also return the list of hidden-layer outputs (post-activation, before dropout), e.g.
            the intermediate MLP outputs that MAKE hands to the ID model.

    Call arguments:
        inputs: `[B, ..., F]` float tensor (e.g. `[B, F]` or `[B, S, F]`).
        training: Python bool; dropout and batch statistics are active when True.
        mask: optional `[B, ...]` bool (inputs rank - 1), True = valid; only used for batch statistics.

    Returns:
        `[B, ..., U]` with `U = output_units` or the last hidden width (float32 when `output_units` is set
        under a mixed-precision policy, else the compute dtype). With `return_hidden=True` a tuple
        `(outputs, [h_1 [B, ..., hidden_units[0]], ..., h_L])`.

    `call_from_pre_activation` runs the MLP from the first hidden layer's pre-activation, for a caller that
    computes the first Dense (`dense_layers[0]`) itself (`DINAttention` does).

    Example:

    ```python
    mlp = MLP(hidden_units=[200, 80], activation="dice", output_units=1)
    logits = mlp(keras.ops.ones((32, 64)))  # [32, 1]
    ```

    References:
        - [Zhou et al. 2018, Deep Interest Network](https://arxiv.org/abs/1706.06978) (Dice, PReLU towers).
    """

    def __init__(
        self,
        hidden_units=(256, 128),
        activation="relu",
        dropout=0.0,
        normalization=None,
        synchronized=False,
        output_units=None,
        use_bias=True,
        output_use_bias=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        return_hidden=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        hidden_units = list(hidden_units)
        if not all(isinstance(u, int) and not isinstance(u, bool) and u > 0 for u in hidden_units):
            raise ValueError(f"`hidden_units` must be positive ints. Received: hidden_units={hidden_units}")
        if output_units is not None and (not isinstance(output_units, int) or output_units <= 0):
            raise ValueError(f"`output_units` must be a positive int or None. Received: output_units={output_units}")
        if not hidden_units and output_units is None:
            raise ValueError("`hidden_units` is empty and `output_units` is None: the MLP would have no layer.")
        check_activation(activation)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"`normalization` must be one of {NORMALIZATIONS}. Received: normalization={normalization!r}"
            )
        self.hidden_units = hidden_units
        self.activation = activation
        self.dropout = float(dropout)
        self.normalization = normalization
        self.synchronized = bool(synchronized)
        self.output_units = output_units
        self.use_bias = bool(use_bias)
        self.output_use_bias = None if output_use_bias is None else bool(output_use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.return_hidden = bool(return_hidden)

    def _dense(self, units, name, dtype, use_bias=None):
        return keras.layers.Dense(
            units,
            use_bias=self.use_bias if use_bias is None else use_bias,
            kernel_initializer=keras.initializers.get(keras.initializers.serialize(self.kernel_initializer)),
            bias_initializer=keras.initializers.get(keras.initializers.serialize(self.bias_initializer)),
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            dtype=dtype,
            name=name,
        )

    def _activation_layer(self, rank, name):
        if self.activation == "dice":
            return Dice(dtype=self.dtype_policy, name=name)
        if self.activation == "prelu":
            # One slope per unit, shared over batch and sequence positions.
            return keras.layers.PReLU(
                alpha_initializer=keras.initializers.Constant(0.25),
                shared_axes=list(range(1, rank - 1)) or None,
                dtype=self.dtype_policy,
                name=name,
            )
        return keras.layers.Activation(self.activation, dtype=self.dtype_policy, name=name)

    def build(self, input_shape):
        # The sublayers are created here, not in __init__: a PReLU's slope shape depends on the input's rank, a
        # Dropout's seed-generator state takes its path (a checkpoint key) from the scope it is created in, and
        # every initializer and seed generator draws its seed from Keras's global RNG when it is created, so
        # creating them in __init__ would change the variable paths or initial values of existing models. They
        # get this layer's `trainable` at the end (Keras passes it on only to sublayers that exist when it is set).
        input_shape = tuple(input_shape)
        rank = len(input_shape)
        self.dense_layers, self.norm_layers, self.activation_layers, self.dropout_layers = [], [], [], []
        shape = input_shape
        for i, units in enumerate(self.hidden_units):
            dense = self._dense(units, f"dense_{i}", self.dtype_policy)
            dense.build(shape)
            shape = (*shape[:-1], units)  # [B, ..., units]
            self.dense_layers.append(dense)
            if self.normalization == "batch":
                norm = keras.layers.BatchNormalization(
                    synchronized=self.synchronized, dtype=self.dtype_policy, name=f"batch_norm_{i}"
                )
            elif self.normalization == "layer":
                norm = keras.layers.LayerNormalization(dtype=self.dtype_policy, name=f"layer_norm_{i}")
            else:
                norm = None
            if norm is not None:
                norm.build(shape)
                self.norm_layers.append(norm)
            act = self._activation_layer(rank, f"activation_{i}")
            act.build(shape)
            # PReLU's slopes (one per unit) broadcast over any leading axes; its input spec would pin the rank
            # it was built with, and DINAttention runs its [B, S, H] attention MLP on [B·S, H] rows.
            act.input_spec = None
            self.activation_layers.append(act)
            if self.dropout > 0.0:
                self.dropout_layers.append(keras.layers.Dropout(self.dropout, name=f"dropout_{i}"))
        self.output_layer = None
        if self.output_units is not None:
            self.output_layer = self._dense(
                self.output_units, "output", _float32_policy_if_mixed(self.dtype_policy), self.output_use_bias
            )
            self.output_layer.build(shape)
        set_sublayers_trainable(
            self, [*self.dense_layers, *self.norm_layers, *self.activation_layers, *self.dropout_layers,
                   self.output_layer]
        )

    def call(self, inputs, training=None, mask=None):
        if not self.dense_layers:  # no hidden layer: only the output layer
            return self._output(inputs, [])
        return self.call_from_pre_activation(self.dense_layers[0](inputs), training=training, mask=mask)

    def call_from_pre_activation(self, pre_activation, training=None, mask=None):
        """The MLP's output from the first hidden layer's pre-activation (its Dense's output).

        `mlp.call_from_pre_activation(mlp.dense_layers[0](x))` equals `mlp(x)`. For a caller that computes
        the first Dense's `x @ kernel + bias` from `mlp.dense_layers[0].kernel` and `.bias` in a cheaper way
        than on the concatenated input, e.g. `DINAttention` (the query's part once per example, or once for
        all candidates of one user). Call it from inside a layer's `call`, on a built MLP with hidden layers.

        Args:
            pre_activation: `[B, ..., hidden_units[0]]` in the compute dtype.
            training: as in `call`.
            mask: as in `call` (`[B, ...]`, rank of `pre_activation` - 1).

        Returns:
            As `call`.
        """
        if not self.dense_layers:
            raise ValueError("call_from_pre_activation needs a built MLP with at least one hidden layer "
                             f"(hidden_units={self.hidden_units})")
        x = pre_activation
        hidden = []
        for i in range(len(self.dense_layers)):
            if i > 0:
                x = self.dense_layers[i](x)  # [B, ..., hidden_units[i]]
            if self.norm_layers:
                norm = self.norm_layers[i]
                if isinstance(norm, keras.layers.BatchNormalization):
                    x = norm(x, training=training, mask=mask)
                else:
                    x = norm(x)
            if isinstance(self.activation_layers[i], Dice):
                x = self.activation_layers[i](x, training=training, mask=mask)
            else:
                x = self.activation_layers[i](x)
            hidden.append(x)
            if self.dropout_layers:
                x = self.dropout_layers[i](x, training=training)
        return self._output(x, hidden)

    def _output(self, x, hidden):
        if self.output_layer is not None:
            x = self.output_layer(x)  # [B, ..., output_units]
        if self.return_hidden:
            return x, hidden
        return x

    def compute_output_spec(self, inputs, training=None, mask=None):
        lead = tuple(inputs.shape[:-1])
        hidden = [keras.KerasTensor((*lead, u), dtype=self.compute_dtype) for u in self.hidden_units]
        if self.output_units is None:
            out = hidden[-1]
        else:
            out_dtype = "float32" if self.compute_dtype in ("float16", "bfloat16") else self.compute_dtype
            out = keras.KerasTensor((*lead, self.output_units), dtype=out_dtype)
        if self.return_hidden:
            return out, hidden
        return out

    def compute_mask(self, inputs, previous_mask=None):
        # Positions stay positions: a [B, S] mask still describes the [B, S, U] output.
        return None if self.return_hidden else previous_mask

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_units": list(self.hidden_units),
                "activation": self.activation,
                "dropout": self.dropout,
                "normalization": self.normalization,
                "synchronized": self.synchronized,
                "output_units": self.output_units,
                "use_bias": self.use_bias,
                "output_use_bias": self.output_use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "return_hidden": self.return_hidden,
            }
        )
        return config
