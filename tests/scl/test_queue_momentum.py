import numpy as np
import pytest
import tensorflow as tf

from mm_ads.scl.momentum import momentum_update
from mm_ads.scl.queue import KeyQueue


def _queue(size, dim):
    q = KeyQueue(size, dim)
    q.build()
    return q


def test_queue_wraps_around_when_size_is_not_a_multiple_of_the_batch():
    K, D, b = 7, 2, 3
    q = _queue(K, D)
    assert not q.valid().numpy().any()
    written = []
    for step in range(4):  # 12 keys into 7 slots
        ids = np.arange(step * b, step * b + b, dtype=np.int64)
        keys = np.stack([ids, -ids], axis=1).astype(np.float32)
        q.enqueue(tf.constant(keys), tf.constant(ids))
        written.extend(ids.tolist())
        assert int(q.count.numpy()) == min(len(written), K)
    # slot s holds the last key written to it: key n goes to slot n mod K
    expected = np.full(K, -1)
    for n, key_id in enumerate(written):
        expected[n % K] = key_id
    np.testing.assert_array_equal(q.ids.numpy(), expected)
    np.testing.assert_array_equal(q.keys.numpy()[:, 0], expected.astype(np.float32))
    assert int(q.pointer.numpy()) == len(written) % K
    assert q.valid().numpy().all()


def test_partially_filled_queue_is_valid_only_where_written():
    q = _queue(5, 1)
    q.enqueue(tf.ones((2, 1)), tf.constant([4, 9], tf.int64))
    np.testing.assert_array_equal(q.valid().numpy(), [True, True, False, False, False])


def test_batch_larger_than_queue_keeps_the_last_keys():
    q = _queue(4, 1)
    q.enqueue(tf.zeros((1, 1)), tf.constant([100], tf.int64))  # pointer at 1
    ids = np.arange(10, dtype=np.int64)
    q.enqueue(tf.constant(ids[:, None].astype(np.float32)), tf.constant(ids))
    # the last 4 (6..9) are written from slot 1 on, wrapping: slots 1,2,3,0
    np.testing.assert_array_equal(q.ids.numpy(), [9, 6, 7, 8])
    assert int(q.pointer.numpy()) == (1 + 10) % 4
    assert int(q.count.numpy()) == 4


def test_queue_rejects_bad_sizes():
    with pytest.raises(ValueError, match="size and dim"):
        KeyQueue(0, 4)


def test_momentum_update_math():
    rng = np.random.default_rng(0)
    k0, q0 = rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(3, 2)).astype(np.float32)
    key, query = tf.Variable(k0), tf.Variable(q0)
    momentum_update([key], [query], 0.9)
    np.testing.assert_allclose(key.numpy(), 0.9 * k0 + 0.1 * q0, rtol=1e-6)
    momentum_update([key], [query], 0.9)
    np.testing.assert_allclose(key.numpy(), 0.81 * k0 + 0.19 * q0, rtol=1e-5)
    np.testing.assert_array_equal(query.numpy(), q0)
    with pytest.raises(ValueError, match="key vs"):
        momentum_update([key], [], 0.9)


def test_momentum_update_inside_tf_function():
    key, query = tf.Variable([1.0, 2.0]), tf.Variable([3.0, 6.0])

    @tf.function
    def step():
        momentum_update([key], [query], 0.5)

    step()
    np.testing.assert_allclose(key.numpy(), [2.0, 4.0])
