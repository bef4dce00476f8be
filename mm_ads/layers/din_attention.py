"""DINAttention: target attention of the Deep Interest Network over a behaviour sequence."""

import keras
import ml_dtypes
import numpy as np
from keras import ops

from mm_ads.layers.mlp import MLP, check_activation
from mm_ads.layers.trainable import set_sublayers_trainable

NORMALIZATIONS = ("softmax", "none")


def mask_fill_value(dtype):
    """A large negative value representable in `dtype` (half its lowest value, so that subtracting a
    moderate maximum stays finite): fp16 -32752, bf16/fp32 about -1.7e38."""
    dtype = keras.backend.standardize_dtype(dtype)
    finfo = ml_dtypes.finfo(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.finfo(dtype)
    return float(finfo.min) / 2.0


@keras.saving.register_keras_serializable(package="mm_ads")
class DINAttention(keras.layers.Layer):
    """Target attention of DIN: pools a behaviour sequence with weights computed from the target.

    For each history position, an attention MLP reads `[q, k, q - k, q * k]` (plus optional per-position
    side information, e.g. the `SimScore` similarity of the item to the target — this is how SimScore is
    used "as side information to DIN") and outputs one score. With `normalization="softmax"` the scores
    are soft-maxed over the valid positions; with `"none"` (the DIN paper's original) the raw scores are
    the weights and padded positions get weight 0. The output is the weighted sum of the values
    (default: the keys).

    Padded positions (mask False) get weight exactly 0, so padding never changes the output; an
    all-padded history gives zeros. Mixed precision: the attention MLP runs in the compute dtype, its
    logits, the mask fill and the softmax in float32, and the pooling accumulates in float32; the output
    has the compute dtype.

    The attention MLP is an `MLP` (`attention_mlp`). Its first Dense is evaluated here from row blocks of its
    kernel, so that the query's part is computed once per example (once for all candidates with a shared
    sequence) instead of once per position; the rest of the MLP runs through `MLP.call_from_pre_activation`.
    The result is that of the MLP on the concatenated input.

    `trainable=False`, given to the constructor or set before or after build, freezes every variable.

    Args:
        hidden_units: sequence of ints, hidden widths of the attention MLP (DIN: 80, 40).
        activation: hidden activation of the attention MLP: "dice", "prelu", "sigmoid" or any Keras
            activation name.
        normalization: "softmax" (masked softmax; weights sum to 1) or "none" (DIN paper: unnormalised
            weights, sum pooling).
        dropout: dropout rate of the attention MLP's hidden layers.
        kernel_initializer: initializer of the attention MLP's kernels.
        bias_initializer: initializer of the attention MLP's biases.
        kernel_regularizer: optional regularizer of the attention MLP's kernels.

    Call arguments:
        query: `[B, E]` target item representation.
        keys: `[B, S, E]` behaviour sequence (same width as `query`), or `[1, S, E]` (static batch 1): one
            sequence for all B queries, as when the candidates of one user are ranked; the history-only terms
            are then computed once (the result equals that of the sequence repeated B times).
        value: optional `[B, S, Ev]` values to pool (`[1, S, Ev]` with a shared sequence); default `keys`.
        side_features: optional `[B, S]` or `[B, S, F]` per-position side information, concatenated to the
            attention MLP input.
        mask: optional `[B, S]` bool, True = valid position. Must be passed explicitly (a Keras mask on
            `keys` is not picked up). None: every position is valid.
        training: Python bool, for dropout and Dice statistics.
        return_attention_scores: also return the weights.

    Returns:
        `[B, Ev]` pooled history in the compute dtype; with `return_attention_scores=True` a tuple
        `(pooled [B, Ev], weights [B, S] float32)`.

    Example:

    ```python
    att = DINAttention(hidden_units=(80, 40), activation="dice")
    pooled = att(target_emb, history_emb, mask=history_mask)  # [B, E]
    # SimScore as side information:
    sim = SimScore()(target_vec, history_vec, mask=history_mask)  # [B, S]
    pooled = att(target_emb, history_emb, side_features=sim, mask=history_mask)
    ```

    References:
        - [Zhou et al. 2018, Deep Interest Network for Click-Through Rate Prediction](
          https://arxiv.org/abs/1706.06978), section 4.3 and Fig. 2.
        - Sheng et al. 2024, Enhancing Taobao Display Advertising with Multimodal Representations (SimScore
          baseline: similarity scores as side information to DIN).
    """

    def __init__(
        self,
        hidden_units=(80, 40),
        activation="dice",
        normalization="softmax",
        dropout=0.0,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        hidden_units = list(hidden_units)
        if not all(isinstance(u, int) and not isinstance(u, bool) and u > 0 for u in hidden_units):
            raise ValueError(f"`hidden_units` must be positive ints. Received: hidden_units={hidden_units}")
        check_activation(activation)
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"`normalization` must be one of {NORMALIZATIONS}. Received: normalization={normalization!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        self.hidden_units = hidden_units
        self.activation = activation
        self.normalization = normalization
        self.dropout = float(dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        # Created here, so that a `trainable` set on this layer at any time reaches it (Keras passes `trainable` on
        # only to sublayers that exist when it is set; the MLP then passes it on to the sublayers it creates in its
        # build). Its constructor creates no variable and draws no seed (its initializers are the instances above),
        # so creating it here leaves the variables' paths and initial values as they were when it was created in
        # build.
        self.attention_mlp = MLP(
            hidden_units=self.hidden_units,
            activation=self.activation,
            dropout=self.dropout,
            output_units=1,
            # softmax over positions is shift-invariant: a bias on the score would never get a gradient
            output_use_bias=self.normalization != "softmax",
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            kernel_regularizer=self.kernel_regularizer,
            dtype=self.dtype_policy,
            name="attention_mlp",
        )
        set_sublayers_trainable(self, [self.attention_mlp])

    def build(self, query_shape, keys_shape, value_shape=None, side_features_shape=None):
        if len(query_shape) != 2 or len(keys_shape) != 3:
            raise ValueError(
                f"DINAttention expects query [B, E] and keys [B, S, E]. Received: query_shape={query_shape}, "
                f"keys_shape={keys_shape}"
            )
        if query_shape[-1] != keys_shape[-1]:
            raise ValueError(
                "query and keys must have the same width (pass wider/narrower vectors as `value`). Received: "
                f"query_shape={query_shape}, keys_shape={keys_shape}"
            )
        if value_shape is not None and (len(value_shape) != 3 or value_shape[-1] is None):
            raise ValueError(f"`value` must be [B, S, Ev] with known Ev. Received: value_shape={value_shape}")
        side_width = 0
        if side_features_shape is not None:
            if len(side_features_shape) == 2:
                side_width = 1
            elif len(side_features_shape) == 3 and side_features_shape[-1] is not None:
                side_width = side_features_shape[-1]
            else:
                raise ValueError(
                    f"`side_features` must be [B, S] or [B, S, F]. Received: side_features_shape={side_features_shape}"
                )
        self.attention_mlp.build((keys_shape[0], keys_shape[1], 4 * keys_shape[-1] + side_width))

    def call(
        self,
        query,
        keys,
        value=None,
        side_features=None,
        mask=None,
        training=None,
        return_attention_scores=False,
    ):
        value_is_keys = value is None
        # One behaviour sequence for every query (static batch 1 of keys/value/mask against B queries: the
        # candidates of one user): the history-only terms are computed once instead of B times.
        shared = keys.shape[0] == 1 and (value_is_keys or value.shape[0] == 1)
        if mask is None:
            mask = ops.ones(ops.shape(keys)[:2], dtype="bool")  # [B, S]
        mask = ops.cast(mask, "bool")
        # Zero the padded positions first, so that even inf/NaN padding cannot leak into the batch statistics,
        # a 0 * inf product or a gradient.
        valid_3d = ops.expand_dims(mask, -1)  # [B, S, 1]
        keys = ops.where(valid_3d, keys, ops.zeros_like(keys))
        value = keys if value_is_keys else ops.where(valid_3d, value, ops.zeros_like(value))
        if shared:
            batch = ops.shape(query)[0]
            mask = ops.broadcast_to(mask, (batch, ops.shape(keys)[1]))  # [B, S]
            valid_3d = ops.expand_dims(mask, -1)
            if not self.attention_mlp.dense_layers:
                keys = ops.broadcast_to(keys, (batch,) + tuple(ops.shape(keys)[1:]))
                value = ops.broadcast_to(value, (batch,) + tuple(ops.shape(value)[1:]))
                shared = False
        # The first attention layer reads [q, k, q - k, q * k, side] @ W. Splitting W by rows into
        # Wq, Wk, Wd, Wp, Ws gives the same pre-activation as
        #     q @ (Wq + Wd)  +  [k, q * k, side] @ [Wk - Wd; Wp; Ws]
        # where the first term is computed once per example instead of once per position: half the
        # FLOPs and memory traffic of the widest matmul of the model (measured ~3x faster).
        width = ops.shape(query)[-1]
        side = None
        if side_features is not None:
            side = ops.cast(side_features, self.compute_dtype)
            if len(side.shape) == 2:
                side = ops.expand_dims(side, -1)  # [B, S, 1]
            side = ops.where(valid_3d, side, ops.zeros_like(side))
        if not self.attention_mlp.dense_layers:  # no hidden layer: the full input into the 1-unit output
            q = ops.expand_dims(query, 1)  # [B, 1, E]
            full = [ops.broadcast_to(q, ops.shape(keys)), keys, q - keys, q * keys]
            full += [side] if side is not None else []
            logits = self.attention_mlp(ops.concatenate(full, axis=-1), training=training, mask=mask)  # [B, S, 1]
            return self._pool(logits, mask, value, return_attention_scores)
        first_layer = self._shared_first_layer if shared else self._per_position_first_layer
        pre_activation = first_layer(query, keys, side, width)  # [B·S, H]
        # The rest of the MLP on [B·S, H] rows (2-D: a matmul and its bias add fuse into one kernel).
        batch, seq_len = ops.shape(query)[0], ops.shape(keys)[1]
        logits = self.attention_mlp.call_from_pre_activation(pre_activation, training=training,
                                                             mask=ops.reshape(mask, (-1,)))
        logits = ops.reshape(logits, (batch, seq_len, 1))
        return self._pool(logits, mask, value, return_attention_scores)

    def _first_kernel(self, width):
        """The first attention layer's kernel split by rows: `(kernel, Wq, Wk, Wd)` (see `call`)."""
        kernel = ops.cast(self.attention_mlp.dense_layers[0].kernel, self.compute_dtype)  # [4E + F, H]
        return kernel, kernel[:width], kernel[width:2 * width], kernel[2 * width:3 * width]

    def _first_bias(self):
        first = self.attention_mlp.dense_layers[0]
        return ops.cast(first.bias, self.compute_dtype) if first.use_bias else None

    def _shared_first_layer(self, query, keys, side, width):
        """The first layer's pre-activation `[B·S, H]` when all B queries share one history (keys `[1, S, E]`)."""
        kernel, w_q, w_k, w_d = self._first_kernel(width)
        batch, seq_len, units = ops.shape(query)[0], ops.shape(keys)[1], ops.shape(kernel)[1]
        # One history for all B queries: the whole first layer is ONE [B, E] x [E, S*H] matmul plus a bias.
        #   pre[b, s] = q_b @ (Wq + Wd) + (q_b * k_s) @ Wp + k_s @ (Wk - Wd) + bias
        #             = q_b @ M_s + c_s,    M_s = diag(k_s) Wp + (Wq + Wd) [E, H],  c_s = k_s @ (Wk - Wd) + bias
        # M ([E, S, H]) and c ([S, H]) are history-only (computed once); the [B, S, E] product q * k is never
        # formed. The same multiply-adds per (candidate, position) as the per-position form, in one
        # well-shaped matmul.
        w_p = kernel[3 * width:4 * width]
        pair_kernel = (ops.expand_dims(ops.transpose(keys[0]), -1) * ops.expand_dims(w_p, 1)
                       + ops.expand_dims(w_q + w_d, 1))  # [E, S, H]
        offsets = ops.matmul(keys[0], w_k - w_d)  # [S, H]
        bias = self._first_bias()
        if bias is not None:
            offsets = offsets + bias
        pre_activation = ops.matmul(query, ops.reshape(pair_kernel, (width, -1))) + ops.reshape(offsets, (-1,))
        pre_activation = ops.reshape(pre_activation, (batch * seq_len, units))  # [B·S, H]
        if side is not None:
            pre_activation = pre_activation + ops.matmul(
                ops.reshape(side, (batch * seq_len, -1)), kernel[4 * width:])
        return pre_activation

    def _per_position_first_layer(self, query, keys, side, width):
        """The first layer's pre-activation `[B·S, H]`: [k, q * k, side] @ [Wk - Wd; Wp; Ws] per position,
        q @ (Wq + Wd) + bias once per example."""
        kernel, w_q, w_k, w_d = self._first_kernel(width)
        batch, seq_len, units = ops.shape(query)[0], ops.shape(keys)[1], ops.shape(kernel)[1]
        parts = [keys, ops.expand_dims(query, 1) * keys] + ([side] if side is not None else [])
        position_inputs = ops.concatenate(parts, axis=-1)  # [B, S, 2E + F]
        w_rest = ops.concatenate([w_k - w_d, kernel[3 * width:]], axis=0)  # [2E + F, H]
        per_position = ops.matmul(ops.reshape(position_inputs, (-1, ops.shape(w_rest)[0])), w_rest)  # [B·S, H]
        per_position = ops.reshape(per_position, (batch, seq_len, units))  # [B, S, H]
        per_example = ops.matmul(query, w_q + w_d)  # [B, H]
        bias = self._first_bias()
        if bias is not None:
            per_example = per_example + bias
        return ops.reshape(per_position + ops.expand_dims(per_example, 1), (batch * seq_len, units))

    def _pool(self, logits, mask, value, return_attention_scores):
        logits = ops.squeeze(ops.cast(logits, "float32"), -1)  # [B, S]
        valid = ops.cast(mask, "float32")
        if self.normalization == "softmax":
            masked = ops.where(mask, logits, mask_fill_value("float32"))
            shifted = masked - ops.stop_gradient(ops.max(masked, axis=1, keepdims=True))
            exp = ops.exp(shifted) * valid  # [B, S]; exactly 0 at padding
            weights = exp / ops.maximum(ops.sum(exp, axis=1, keepdims=True), 1e-30)  # all-padded row -> 0
        else:
            weights = ops.where(mask, logits, 0.0)  # [B, S]
        if value.shape[0] == 1:  # one sequence for every query (or a batch of 1): [B, S] x [S, Ev]
            pooled = ops.matmul(weights, ops.cast(value[0], "float32"))  # [B, Ev]
        else:
            pooled = ops.einsum("bs,bsd->bd", weights, ops.cast(value, "float32"))  # [B, Ev]
        pooled = ops.cast(pooled, self.compute_dtype)
        if return_attention_scores:
            return pooled, weights
        return pooled

    def compute_output_spec(
        self, query, keys, value=None, side_features=None, mask=None, training=None, return_attention_scores=False
    ):
        value = keys if value is None else value
        pooled = keras.KerasTensor((query.shape[0], value.shape[-1]), dtype=self.compute_dtype)
        if return_attention_scores:
            return pooled, keras.KerasTensor(tuple(keys.shape[:2]), dtype="float32")
        return pooled

    def compute_mask(self, inputs, previous_mask=None):
        # The sequence axis is pooled away: no mask on the output.
        return None

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_units": list(self.hidden_units),
                "activation": self.activation,
                "normalization": self.normalization,
                "dropout": self.dropout,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            }
        )
        return config
