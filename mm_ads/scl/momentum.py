"""Cross-replica-consistent variable updates for the MoCo key encoder (and the temperature clamp).

The updates run from the trainer's `after_apply_gradients` hook, in replica context. Variables created
under a strategy scope are mirrored with aggregation NONE, which cannot be assigned from replica context;
so every update here goes through `merge_call` + `strategy.extended.update`, which applies the same
function to every device's copy. Each replica computes identical values (its mirrored inputs are
identical), so the copies stay identical. Under the default strategy this is a plain assign.
"""

import keras
import tensorflow as tf


def _tf_variable(v):
    return v.value if isinstance(v, keras.Variable) else v


def update_variables(fn, variables, *args):
    """Calls `fn(var, *args)` for every variable on every device copy, from replica or cross-replica context.

    `args` may be tensors, per-replica values or (mirrored) variables; each device sees its own copy.
    """
    variables = [_tf_variable(v) for v in variables]
    args = tuple(_tf_variable(a) for a in args)

    def merge_fn(strategy, variables, *args):
        updates = [strategy.extended.update(v, fn, args=args, group=True) for v in variables]
        return tf.group(updates)

    if not tf.distribute.has_strategy():
        # outside any strategy scope: a mirrored variable is updated through its own strategy
        owner = getattr(variables[0], "distribute_strategy", None) if variables else None
        if owner is not None:
            with owner.scope():
                return merge_fn(owner, variables, *args)
    if tf.distribute.in_cross_replica_context():
        return merge_fn(tf.distribute.get_strategy(), variables, *args)
    return tf.distribute.get_replica_context().merge_call(merge_fn, args=(variables,) + args)


def momentum_update(key_variables, query_variables, momentum):
    """`key ← m·key + (1 − m)·query` for each pair (MoCo), identically on every replica.

    Args:
        key_variables: the key encoder's variables.
        query_variables: the query encoder's variables, same order and shapes.
        momentum: m in [0, 1].
    """
    key_variables, query_variables = list(key_variables), list(query_variables)
    if len(key_variables) != len(query_variables):
        raise ValueError(f"momentum_update: {len(key_variables)} key vs {len(query_variables)} query variables")
    m = float(momentum)
    ops = []
    for k, q in zip(key_variables, query_variables):
        if tuple(k.shape) != tuple(q.shape):
            raise ValueError(f"momentum_update: {k.path} {k.shape} vs {q.path} {q.shape}")
        ops.append(update_variables(lambda kv, qv: kv.assign(m * kv + (1.0 - m) * tf.cast(qv, kv.dtype)), [k], q))
    return tf.group(ops)


def copy_variables(key_variables, query_variables):
    """`key ← query` for each pair (initialisation of the key encoder)."""
    for k, q in zip(key_variables, query_variables):
        k.assign(q)
