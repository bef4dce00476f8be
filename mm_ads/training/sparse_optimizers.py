"""Sparse-aware optimizers for large embedding tables.

Stock Keras-3 optimizers, given the `tf.IndexedSlices` gradient of an embedding lookup,
(a) run dense math over the whole table and (b) for Adam/Adagrad square each occurrence of
a repeated id before the duplicates are summed, which is not the gradient of the loss.
These optimizers first sum the gradient rows of each distinct id (`tf.unique` +
`unsorted_segment_sum`), then read and scatter-update only those rows of the variable and
of its slots.

Exactness against the dense math of the same optimizer on the summed (dense) gradient:
  * `SparseSGD`, `SparseAdagrad`: identical on every row, at every step (rows without
    gradient don't move and their accumulators don't change in the dense math either).
  * `SparseAdam`: "lazy" Adam. Identical at every step for rows that receive a gradient
    in every step so far (and for every row on the first step). For a row that skipped
    steps, dense Adam keeps moving it with decayed moments; lazy Adam leaves it alone until
    its id is seen again — the standard choice for embedding tables (TF1 sparse Adam,
    tfa LazyAdam), because the dense update would touch all N rows every step.

Dense gradients (plain tensors) take the dense path with the same formulas as the stock
Keras optimizer, so one of these can also drive non-embedding variables, but the intended
use is one optimizer for the embedding tables and a stock one for the dense layers.
All three work under `tf.distribute` (updates go through Keras's TF optimizer, which
all-reduces the gradients and updates every replica's copy).
"""

import keras
import tensorflow as tf


def _dedupe(gradient):
    """IndexedSlices → (unique row ids [U], summed gradient rows [U, ...])."""
    unique, position = tf.unique(gradient.indices)
    summed = tf.math.unsorted_segment_sum(gradient.values, position, tf.shape(unique)[0])
    return unique, summed


def combine_rows(gradient):
    """An `IndexedSlices` gradient with one row per distinct index (the rows of a repeated index summed).

    The sum the optimizers do anyway, done earlier: the trainer applies it on each replica before gradients
    leave it (all-gathered across workers, or sent to a parameter server), which shrinks them from one row
    per lookup (B·S for a history) to one per distinct id. Other gradients are returned as they are.
    """
    if not isinstance(gradient, tf.IndexedSlices):
        return gradient
    rows, summed = _dedupe(gradient)
    return tf.IndexedSlices(summed, rows, gradient.dense_shape)


def _as_tf_variable(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


class _SparseOptimizer(keras.optimizers.Optimizer):
    def __init__(self, learning_rate, name, **kwargs):
        for arg in ("weight_decay", "clipnorm", "global_clipnorm", "use_ema"):
            if kwargs.get(arg):
                raise ValueError(
                    f"{type(self).__name__} does not support {arg}={kwargs[arg]!r}: it would read or write "
                    "the whole table every step"
                )
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)

    def _scatter(self, variable, rows, values, op):
        var = _as_tf_variable(variable)
        values = tf.cast(values, var.dtype)
        getattr(var, op)(tf.IndexedSlices(values, rows))

    def _slots(self, variable):
        """`[(slot variable, initial value)]` of `variable`."""
        return []

    def reset_rows(self, variable, rows):
        """Sets the slots of `rows` of `variable` back to their initial values (a table row handed to a new id,
        `mm_ads.layers.DynamicEmbedding`): the new id's updates do not start from the previous id's statistics."""
        for slot, value in self._slots(variable):
            width = tf.shape(_as_tf_variable(slot))[1:]
            fill = tf.fill(tf.concat([tf.shape(rows), width], 0), tf.constant(value, slot.dtype))
            self._scatter(slot, rows, fill, "scatter_update")


@keras.saving.register_keras_serializable(package="mm_ads")
class SparseSGD(_SparseOptimizer):
    """Plain SGD that updates only the rows touched by an `IndexedSlices` gradient.

    Args:
        learning_rate: float or schedule.
        name: optimizer name.
        **kwargs: base `keras.optimizers.Optimizer` arguments (no weight decay / clipnorm).
    """

    def __init__(self, learning_rate=0.01, name="sparse_sgd", **kwargs):
        super().__init__(learning_rate, name, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        lr = tf.cast(learning_rate, variable.dtype)
        if isinstance(gradient, tf.IndexedSlices):
            rows, g = _dedupe(gradient)
            self._scatter(variable, rows, -lr * g, "scatter_add")
        else:
            self.assign_sub(variable, lr * gradient)


@keras.saving.register_keras_serializable(package="mm_ads")
class SparseAdagrad(_SparseOptimizer):
    """Adagrad (Keras-3 formulas) with row-sparse updates of the variable and accumulator.

    `acc += g²; var -= lr · g / sqrt(acc + ε)`, with `g` the summed gradient of each row.

    Args:
        learning_rate: float or schedule.
        initial_accumulator_value: starting value of the accumulator.
        epsilon: small constant for numerical stability.
        name: optimizer name.
        **kwargs: base `keras.optimizers.Optimizer` arguments (no weight decay / clipnorm).
    """

    def __init__(self, learning_rate=0.05, initial_accumulator_value=0.1, epsilon=1e-7, name="sparse_adagrad",
                 **kwargs):
        super().__init__(learning_rate, name, **kwargs)
        self.initial_accumulator_value = initial_accumulator_value
        self.epsilon = epsilon

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        init = keras.initializers.Constant(self.initial_accumulator_value)
        self._accumulators = [
            self.add_variable_from_reference(v, name="accumulator", initializer=init) for v in var_list
        ]

    def _slots(self, variable):
        return [(self._accumulators[self._get_variable_index(variable)], self.initial_accumulator_value)]

    def update_step(self, gradient, variable, learning_rate):
        lr = tf.cast(learning_rate, variable.dtype)
        acc = self._accumulators[self._get_variable_index(variable)]
        if isinstance(gradient, tf.IndexedSlices):
            rows, g = _dedupe(gradient)
            acc_rows = tf.gather(_as_tf_variable(acc), rows) + tf.square(g)
            self._scatter(acc, rows, acc_rows, "scatter_update")
            self._scatter(variable, rows, -lr * g / tf.sqrt(acc_rows + self.epsilon), "scatter_add")
        else:
            self.assign_add(acc, tf.square(gradient))
            self.assign_sub(variable, lr * gradient / tf.sqrt(acc + self.epsilon))

    def get_config(self):
        config = super().get_config()
        config.update({"initial_accumulator_value": self.initial_accumulator_value, "epsilon": self.epsilon})
        return config


@keras.saving.register_keras_serializable(package="mm_ads")
class SparseAdam(_SparseOptimizer):
    """Lazy Adam (Keras-3 formulas) that updates only the rows present in the gradient.

    `m ← m + (1-β1)(g - m); v ← v + (1-β2)(g² - v); var -= α·m / (sqrt(v) + ε)` with
    `α = lr·sqrt(1-β2^t)/(1-β1^t)` and `g` the summed gradient of each distinct row.

    Args:
        learning_rate: float or schedule.
        beta_1: decay of the first moment.
        beta_2: decay of the second moment.
        epsilon: small constant for numerical stability.
        name: optimizer name.
        **kwargs: base `keras.optimizers.Optimizer` arguments (no weight decay / clipnorm).
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, name="sparse_adam", **kwargs):
        super().__init__(learning_rate, name, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._momentums = [self.add_variable_from_reference(v, name="momentum") for v in var_list]
        self._velocities = [self.add_variable_from_reference(v, name="velocity") for v in var_list]

    def _slots(self, variable):
        index = self._get_variable_index(variable)
        return [(self._momentums[index], 0.0), (self._velocities[index], 0.0)]

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        step = tf.cast(self.iterations + 1, dtype)
        alpha = lr * tf.sqrt(1.0 - tf.pow(tf.cast(self.beta_2, dtype), step)) / (
            1.0 - tf.pow(tf.cast(self.beta_1, dtype), step))
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        if isinstance(gradient, tf.IndexedSlices):
            rows, g = _dedupe(gradient)
            m_rows = tf.gather(_as_tf_variable(m), rows)
            v_rows = tf.gather(_as_tf_variable(v), rows)
            m_rows = m_rows + (g - m_rows) * (1.0 - self.beta_1)
            v_rows = v_rows + (tf.square(g) - v_rows) * (1.0 - self.beta_2)
            self._scatter(m, rows, m_rows, "scatter_update")
            self._scatter(v, rows, v_rows, "scatter_update")
            self._scatter(variable, rows, -alpha * m_rows / (tf.sqrt(v_rows) + self.epsilon), "scatter_add")
        else:
            self.assign_add(m, (gradient - m) * (1.0 - self.beta_1))
            self.assign_add(v, (tf.square(gradient) - v) * (1.0 - self.beta_2))
            self.assign_sub(variable, alpha * m / (tf.sqrt(v) + self.epsilon))

    def get_config(self):
        config = super().get_config()
        config.update({"beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon})
        return config
