import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_ads.layers.sparse_embedding import SparseEmbedding
from mm_ads.training import SparseAdagrad, SparseAdam, SparseSGD

ROWS, DIM = 20, 4


def _pairs():
    return [
        (lambda: SparseSGD(0.1), lambda: keras.optimizers.SGD(0.1)),
        (lambda: SparseAdagrad(0.1), lambda: keras.optimizers.Adagrad(0.1)),
        (lambda: SparseAdam(0.05), lambda: keras.optimizers.Adam(0.05)),
    ]


def _sparse_grad(table, ids, weights):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(weights * tf.nn.embedding_lookup(table, ids) ** 2)
    return tape.gradient(loss, table)


def _run(make_opt, id_batches, sparse, seed=0):
    init = np.random.default_rng(seed).normal(size=(ROWS, DIM)).astype(np.float32)
    table = keras.Variable(init, name="table")
    opt = make_opt()
    for step, ids in enumerate(id_batches):
        w = tf.constant(np.random.default_rng(100 + step).normal(size=(len(ids), DIM)), tf.float32)
        g = _sparse_grad(table.value, tf.constant(ids), w)
        assert isinstance(g, tf.IndexedSlices)
        opt.apply_gradients([(g if sparse else tf.convert_to_tensor(g), table)])
    return table.numpy(), init


# ids repeat within a batch; some rows are never touched
REPEATED = [[3, 3, 7, 3, 11], [3, 7, 7, 11, 11], [11, 3, 7, 7, 7]]
VARYING = [[3, 3, 7, 0], [5, 5, 5, 9], [3, 9, 12, 12]]


@pytest.mark.parametrize("make_sparse,make_dense", _pairs())
def test_matches_dense_math_with_repeated_ids(make_sparse, make_dense):
    ours, init = _run(make_sparse, REPEATED, sparse=True)
    dense, _ = _run(make_dense, REPEATED, sparse=False)
    np.testing.assert_allclose(ours, dense, rtol=1e-5, atol=1e-6)
    untouched = np.setdiff1d(np.arange(ROWS), [3, 7, 11])
    np.testing.assert_array_equal(ours[untouched], init[untouched])
    assert not np.allclose(ours[[3, 7, 11]], init[[3, 7, 11]])


@pytest.mark.parametrize("make_sparse,make_dense", _pairs()[:2])
def test_sgd_adagrad_exact_when_rows_skip_steps(make_sparse, make_dense):
    ours, _ = _run(make_sparse, VARYING, sparse=True)
    dense, _ = _run(make_dense, VARYING, sparse=False)
    np.testing.assert_allclose(ours, dense, rtol=1e-5, atol=1e-6)


def test_adam_is_lazy_for_rows_that_skip_steps():
    ours, init = _run(lambda: SparseAdam(0.05), VARYING, sparse=True)
    dense, _ = _run(lambda: keras.optimizers.Adam(0.05), VARYING, sparse=False)
    # row 0 is seen only at step 1: dense Adam keeps moving it, lazy Adam does not
    first_only, _ = _run(lambda: SparseAdam(0.05), VARYING[:1], sparse=True)
    np.testing.assert_array_equal(ours[0], first_only[0])
    assert not np.allclose(dense[0], first_only[0])
    # rows never seen stay exactly as initialised
    np.testing.assert_array_equal(ours[1], init[1])


def test_only_touched_rows_are_written():
    # with a gradient touching 2 rows of a big table, the update reads/writes 2 rows: every other row is bitwise
    # unchanged even in the optimizer slots
    table = keras.Variable(np.ones((1000, 8), np.float32))
    opt = SparseAdam(0.1)
    g = tf.IndexedSlices(tf.ones((3, 8)), tf.constant([5, 900, 5], tf.int64), tf.constant([1000, 8], tf.int64))
    opt.apply_gradients([(g, table)])
    changed = np.flatnonzero((table.numpy() != 1.0).any(axis=1))
    assert changed.tolist() == [5, 900]
    m = opt._momentums[0].numpy()
    np.testing.assert_allclose(m[5], 0.2)  # summed gradient 2 for the repeated id
    np.testing.assert_allclose(m[900], 0.1)
    assert np.count_nonzero(m.any(axis=1)) == 2


def test_rejects_whole_table_options():
    with pytest.raises(ValueError, match="weight_decay"):
        SparseAdam(weight_decay=0.01)
    with pytest.raises(ValueError, match="clipnorm"):
        SparseAdagrad(clipnorm=1.0)


def test_config_round_trip():
    opt = SparseAdam(0.01, beta_1=0.8, epsilon=1e-6)
    again = SparseAdam.from_config(opt.get_config())
    assert again.get_config() == opt.get_config()
    again = keras.optimizers.deserialize(keras.optimizers.serialize(SparseAdagrad(0.2)))
    assert isinstance(again, SparseAdagrad) and float(again.learning_rate) == pytest.approx(0.2)


def test_trains_an_embedding_inside_a_keras_model():
    emb = SparseEmbedding(50, 4)
    ids = keras.Input((3,), dtype="int64")
    out = keras.layers.Dense(1)(keras.layers.Reshape((12,))(emb(ids)))
    model = keras.Model(ids, out)
    x = tf.constant([[1, 2, 2], [4, 0, 1]], tf.int64)
    y = tf.constant([[1.0], [0.0]])
    table_opt, dense_opt = SparseAdagrad(0.5), keras.optimizers.Adam(0.01)
    before = emb.embeddings.numpy().copy()
    losses = []
    for _ in range(20):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        grads = tape.gradient(loss, [emb.embeddings] + model.layers[-1].trainable_variables)
        table_opt.apply_gradients([(grads[0], emb.embeddings)])
        dense_opt.apply_gradients(zip(grads[1:], model.layers[-1].trainable_variables))
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    after = emb.embeddings.numpy()
    moved = np.flatnonzero((after != before).any(axis=1)).tolist()
    assert moved == [1, 2, 4]  # id 0 is padding: masked, no gradient


_MIRRORED = textwrap.dedent("""
    import numpy as np, tensorflow as tf, keras
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from mm_ads.layers.sparse_embedding import SparseEmbedding
    from mm_ads.training import SparseAdam

    def train(strategy):
        with strategy.scope():
            emb = SparseEmbedding(64, 4, embeddings_initializer="ones")
            emb.build()
            opt = SparseAdam(0.1)
            opt.build([emb.embeddings])
        ids = tf.constant([[1, 2, 2, 5], [2, 7, 7, 7]], tf.int64)
        w = tf.constant(np.random.default_rng(0).normal(size=(2, 4, 4)), tf.float32)
        ds = tf.data.Dataset.from_tensor_slices((ids, w)).batch(2)
        dist = strategy.experimental_distribute_dataset(ds)

        @tf.function
        def step(batch):
            def fn(i, ww):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_sum(ww * emb(i) ** 2) / strategy.num_replicas_in_sync
                    loss = loss * 1.0
                g = tape.gradient(loss, emb.embeddings.value)
                opt.apply_gradients([(g, emb.embeddings)])
            strategy.run(fn, args=batch)

        for _ in range(3):
            for batch in dist:
                step(batch)
        values = strategy.experimental_local_results(emb.embeddings.value)
        return [v.numpy() for v in values]

    two = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    one = train(tf.distribute.OneDeviceStrategy("/cpu:0"))
    np.testing.assert_array_equal(two[0], two[1])
    # per replica loss is divided by the replica count: the summed gradient equals the 1-device gradient / 2
    print("MAXDIFF", float(np.abs(two[0] - one[0]).max()))
    print("CHANGED", sorted(np.flatnonzero((two[0] != 1).any(axis=1)).tolist()))
""")


def test_replicas_stay_identical_under_mirrored_strategy(repo_root):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo_root)
    proc = subprocess.run([sys.executable, "-c", _MIRRORED], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    changed = [line for line in proc.stdout.splitlines() if line.startswith("CHANGED")][0]
    assert changed == "CHANGED [1, 2, 5, 7]"
