"""MAKE: the Multimodal Knowledge Extractor (paper section 4.3, eqs. 3-5)."""

import keras
from keras import ops

from mm_ads.layers.din_attention import NORMALIZATIONS, DINAttention
from mm_ads.layers.mlp import MLP, check_activation
from mm_ads.layers.sim_score import to_float32_vectors
from mm_ads.layers.trainable import set_sublayers_trainable


@keras.saving.register_keras_serializable(package="mm_ads")
class MAKE(keras.layers.Layer):
    """Multimodal Knowledge Extractor: DIN over multimodal vectors, then an MLP to a CTR logit.

    The module whose parameters are pre-trained for several epochs on the CTR label (paper §4.3), then
    handed to an ID-based model as features:

    - eq. 3: `v_MAKE = DIN({v_i}, v_c)`. Here `v_MAKE = [v_c, u]` (`[B, 2D]`): the target vector `v_c`
      concatenated with `u`, the history vectors `v_i` pooled by DIN target attention with `v_c` as query
      (`DINAttention`, attention MLP on `[v_c, v_i, v_c - v_i, v_c * v_i]`). The paper does not say what the
      DIN module outputs; a DIN user representation without the target it attended with would leave the
      MLP blind to the target item itself, so both are kept — as in DIN's own head, which concatenates
      the target embedding and the pooled interest.
    - eq. 4: the logit `MLP_MAKE(v_MAKE)`: hidden layers `mlp_units` (default four, 256-128-64-32: the paper
      says "four-layer MLP" but publishes no sizes) then a linear 1-unit layer. The MLP also reads one
      indicator column, 1.0 when the target has no vector (the missing-vector convention of the other
      multimodal features: a cold item without a vector must not look like an item with a zero vector).
    - eq. 5 (binary cross-entropy on `sigmoid(logit)`) is the caller's loss.

    Validity: a history position is attended to only where `mask` is True and its vector is not all zeros
    (the vector join gives absent items and padding a zero vector); padded or missing positions get
    attention weight exactly 0, so garbage under them never changes the output, and a history without any
    valid vector gives `u = 0`. The target counts as missing when its vector is all zeros or, if given,
    `target_missing` is 1; a missing target's `v_c` is zeroed.

    A frozen MAKE (`trainable=False`, e.g. the knowledge-utilisation phase) always runs in inference mode,
    like a frozen BatchNormalization: no dropout, Dice uses its moving statistics and never updates them, so
    its weights stay bit-identical while the surrounding model trains.

    Args:
        mlp_units: hidden widths of MLP_MAKE (their outputs are the intermediate outputs handed on).
        attention_units: hidden widths of DIN's attention MLP.
        activation: activation of both MLPs: "prelu", "dice", "relu" or any Keras activation name.
        attention_normalization: "softmax" (weights sum to 1 over valid positions) or "none" (DIN's sum
            pooling).
        dropout: dropout of MLP_MAKE's hidden layers.
        scale: multiplier applied to integer (int8-quantised) vectors after the cast to float32 (a vector
            table's `scale`); float vectors are used as given.

    Call arguments:
        target: `[B, D]` float or int8 target-item vectors `v_c`.
        history: `[B, S, D]` float or int8 history vectors `v_i`.
        mask: optional `[B, S]` bool, True = valid history position (e.g. not padding, vector present).
        target_missing: optional `[B]` float, 1.0 = the target has no vector (the join's `*_missing` flag).
        training: Python bool (dropout, Dice statistics); ignored (inference) when the layer is frozen.

    Returns:
        A dict:
        - `"v_make"`: `[B, 2D]` `[v_c, u]` in the compute dtype;
        - `"hidden"`: list of `[B, mlp_units[i]]`, MLP_MAKE's hidden outputs (post-activation);
        - `"logit"`: `[B, 1]` float32 MAKE logit.

    Example:

    ```python
    make = MAKE(mlp_units=(256, 128, 64, 32))
    out = make(target_vec, hist_vec, mask=hist_mask)                        # pre-train on out["logit"]
    make.trainable = False                                                   # then freeze it and
    extra = [out["v_make"], *out["hidden"], out["logit"]]                    # feed the ID model's MLP
    ```

    References:
        - Sheng et al. 2024, Enhancing Taobao Display Advertising with Multimodal Representations:
          Challenges, Approaches and Insights (CIKM 2024), section 4.3, eqs. 3-5, Fig. 2(b).
        - [Zhou et al. 2018, Deep Interest Network](https://arxiv.org/abs/1706.06978).
    """

    def __init__(
        self,
        mlp_units=(256, 128, 64, 32),
        attention_units=(80, 40),
        activation="prelu",
        attention_normalization="softmax",
        dropout=0.0,
        scale=1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        mlp_units, attention_units = list(mlp_units), list(attention_units)
        for name, units in (("mlp_units", mlp_units), ("attention_units", attention_units)):
            if not all(isinstance(u, int) and not isinstance(u, bool) and u > 0 for u in units):
                raise ValueError(f"`{name}` must be positive ints. Received: {name}={units}")
        if not mlp_units:
            raise ValueError("`mlp_units` must not be empty: MAKE hands its hidden outputs on.")
        check_activation(activation)
        if attention_normalization not in NORMALIZATIONS:
            raise ValueError(
                f"`attention_normalization` must be one of {NORMALIZATIONS}. "
                f"Received: attention_normalization={attention_normalization!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        if not scale > 0:
            raise ValueError(f"`scale` must be > 0. Received: scale={scale}")
        self.mlp_units = mlp_units
        self.attention_units = attention_units
        self.activation = activation
        self.attention_normalization = attention_normalization
        self.dropout = float(dropout)
        self.scale = float(scale)

    def build(self, target_shape, history_shape, target_missing_shape=None):
        if len(target_shape) != 2 or len(history_shape) != 3 or target_shape[-1] != history_shape[-1]:
            raise ValueError(
                "MAKE expects target [B, D] and history [B, S, D]. Received: "
                f"target_shape={target_shape}, history_shape={history_shape}"
            )
        dim = target_shape[-1]
        # The sublayers are created here, not in __init__ (unlike DINAttention's attention MLP): the MLP's
        # constructor draws an initializer seed from Keras's global RNG, and drawing it before the attention MLP's
        # Dense layers draw theirs (in its build) would change the initial weights of existing models. They get
        # this layer's `trainable` at the end; MLP and DINAttention pass it on to their own sublayers.
        self.attention = DINAttention(
            hidden_units=self.attention_units,
            activation=self.activation,
            normalization=self.attention_normalization,
            dtype=self.dtype_policy,
            name="attention",
        )
        self.attention.build((target_shape[0], dim), tuple(history_shape))
        self.mlp = MLP(
            hidden_units=self.mlp_units,
            activation=self.activation,
            dropout=self.dropout,
            output_units=1,
            return_hidden=True,
            dtype=self.dtype_policy,
            name="mlp",
        )
        self.mlp.build((target_shape[0], 2 * dim + 1))
        set_sublayers_trainable(self, [self.attention, self.mlp])

    def call(self, target, history, mask=None, target_missing=None, training=None):
        if not self.trainable:
            training = False
        target = to_float32_vectors(target, self.scale)  # [B, D]
        history = to_float32_vectors(history, self.scale)  # [B, S, D]
        target_valid = ops.sum(ops.square(target), axis=-1) > 0.0  # [B]
        if target_missing is not None:
            target_valid = ops.logical_and(target_valid, ops.equal(ops.cast(target_missing, "float32"), 0.0))
        valid = ops.sum(ops.square(history), axis=-1) > 0.0  # [B, S]
        if mask is not None:
            valid = ops.logical_and(valid, ops.cast(mask, "bool"))
        target = ops.where(ops.expand_dims(target_valid, -1), target, 0.0)
        target = ops.cast(target, self.compute_dtype)
        history = ops.cast(history, self.compute_dtype)
        pooled = self.attention(target, history, mask=valid, training=training)  # [B, D]
        v_make = ops.concatenate([target, pooled], axis=-1)  # [B, 2D]
        missing = ops.cast(ops.expand_dims(ops.logical_not(target_valid), -1), self.compute_dtype)  # [B, 1]
        logit, hidden = self.mlp(ops.concatenate([v_make, missing], axis=-1), training=training)  # [B, 1]
        return {"v_make": v_make, "hidden": list(hidden), "logit": logit}

    def compute_output_spec(self, target, history, mask=None, target_missing=None, training=None):
        batch, dim = target.shape[0], target.shape[-1]
        out_dtype = "float32" if self.compute_dtype in ("float16", "bfloat16") else self.compute_dtype
        return {
            "v_make": keras.KerasTensor((batch, 2 * dim), dtype=self.compute_dtype),
            "hidden": [keras.KerasTensor((batch, u), dtype=self.compute_dtype) for u in self.mlp_units],
            "logit": keras.KerasTensor((batch, 1), dtype=out_dtype),
        }

    def compute_mask(self, inputs, previous_mask=None):
        # The sequence axis is pooled away: no mask on the outputs.
        return None

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "mlp_units": list(self.mlp_units),
                "attention_units": list(self.attention_units),
                "activation": self.activation,
                "attention_normalization": self.attention_normalization,
                "dropout": self.dropout,
                "scale": self.scale,
            }
        )
        return config
