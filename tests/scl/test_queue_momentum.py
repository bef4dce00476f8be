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


def test_batch_larger_than_queue_keeps_the_newest_keys_and_the_next_write_evicts_the_oldest():
    q = _queue(4, 1)
    q.enqueue(tf.zeros((1, 1)), tf.constant([100], tf.int64))  # pointer at 1
    ids = np.arange(10, dtype=np.int64)
    q.enqueue(tf.constant(ids[:, None].astype(np.float32)), tf.constant(ids))
    # the K = 4 newest (6..9) are written oldest first from slot 1 on, wrapping: slots 1,2,3,0
    np.testing.assert_array_equal(q.ids.numpy(), [9, 6, 7, 8])
    np.testing.assert_array_equal(q.keys.numpy()[:, 0], [9, 6, 7, 8])
    # the pointer advanced by what was written (4 keys, modulo 4): it still points at the oldest key, 6
    assert int(q.pointer.numpy()) == 1
    assert int(q.count.numpy()) == 4
    q.enqueue(tf.constant([[20.0], [21.0]]), tf.constant([20, 21], tf.int64))
    # the next write evicts the two oldest (6, 7), never a newer key
    np.testing.assert_array_equal(q.ids.numpy(), [9, 20, 21, 8])
    assert int(q.pointer.numpy()) == 3


def test_writes_larger_than_the_queue_equal_one_key_at_a_time():
    # any sequence of writes leaves the queue holding the K newest keys, exactly as writing them one by one
    K = 5
    rng = np.random.default_rng(0)
    batched, single = _queue(K, 1), _queue(K, 1)
    next_id = 0
    for n in rng.integers(1, 3 * K, size=12):
        ids = np.arange(next_id, next_id + n, dtype=np.int64)
        next_id += n
        batched.enqueue(tf.constant(ids[:, None].astype(np.float32)), tf.constant(ids))
        for i in ids:
            single.enqueue(tf.constant([[float(i)]]), tf.constant([i], tf.int64))
        held = batched.ids.numpy()
        assert sorted(held.tolist()) == list(range(next_id - K, next_id))
        # the pointer is at the oldest key in both
        assert held[int(batched.pointer.numpy())] == next_id - K
        assert single.ids.numpy()[int(single.pointer.numpy())] == next_id - K


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
