import numpy as np
import pytest
import tensorflow as tf

from mm_ads.scl.losses import Temperature, info_nce, triplet
from tests.scl.reference import scl_loss


def _unit(rng, n, d):
    v = rng.normal(size=(n, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _case(seed=0, b=6, k=9, d=5):
    rng = np.random.default_rng(seed)
    q, keys, qk, neg = _unit(rng, b, d), _unit(rng, b, d), _unit(rng, k, d), _unit(rng, b, d)
    ids = np.array([10, 11, 12, 10, 13, 14], np.int64)[:b]  # item 10 twice in the batch: a false negative
    queue_ids = np.array([11, 20, 21, 10, 22, 23, 24, -1, -1], np.int64)[:k]  # 11 and 10 again in the queue
    valid = queue_ids >= 0  # the last two slots were never written
    neg_ids = np.array([30, -1, 31, 32, 13, 33], np.int64)[:b]  # -1: none; 13 == the positive of row 4
    return q, keys, qk, neg, ids, queue_ids, valid, neg_ids


def _tf_loss(q, keys, qk, neg, ids, queue_ids, valid, neg_ids, tau, margin=0.2, weight=0.5):
    cand = tf.concat([keys, qk], 0)
    cand_ids = tf.concat([ids, queue_ids], 0)
    cand_valid = tf.concat([tf.ones(len(ids), tf.bool), valid], 0)
    loss = info_nce(q, cand, tf.range(len(ids)), ids, cand_ids, tau, cand_valid)
    has_neg = (neg_ids >= 0) & (neg_ids != ids)
    return loss + weight * triplet(q, keys, neg, margin, has_neg)


@pytest.mark.parametrize("tau", [0.05, 0.3, 1.0])
def test_loss_equals_numpy_reference(tau):
    q, keys, qk, neg, ids, queue_ids, valid, neg_ids = _case()
    got = _tf_loss(q, keys, qk, neg, ids, queue_ids, valid, neg_ids, tf.constant(tau)).numpy()
    want = scl_loss(q, keys, ids, qk, queue_ids, valid, tau, neg, neg_ids, margin=0.2, weight=0.5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_false_negatives_are_masked_by_item_id():
    q, keys, qk, neg, ids, queue_ids, valid, _ = _case()
    cand = np.concatenate([keys, qk])
    cand_ids = np.concatenate([ids, queue_ids])
    cand_valid = np.concatenate([np.ones(len(ids), bool), valid])
    masked = info_nce(q, cand, tf.range(len(ids)), ids, cand_ids, 0.1, cand_valid).numpy()
    unmasked = info_nce(q, cand, tf.range(len(ids)), ids, np.arange(100, 100 + len(cand)), 0.1).numpy()
    # rows whose item reappears (10 in the batch and queue, 11 in the queue) lose those negatives...
    for i in (0, 1, 3):
        assert masked[i] < unmasked[i]
    # ... and moving a same-item copy of the positive next to it changes nothing for that row
    cand2 = cand.copy()
    cand2[len(ids) + 3] = keys[0]  # queue slot 3 holds item 10: make it an exact copy of row 0's positive
    again = info_nce(q, cand2, tf.range(len(ids)), ids, cand_ids, 0.1, cand_valid).numpy()
    np.testing.assert_allclose(again[0], masked[0], rtol=1e-6)
    # invalid queue slots never count, whatever they hold
    cand3 = cand.copy()
    cand3[-2:] = q[:2] * 1.0
    np.testing.assert_allclose(info_nce(q, cand3, tf.range(len(ids)), ids, cand_ids, 0.1, cand_valid).numpy(),
                               masked, rtol=1e-6)


@pytest.mark.parametrize("with_queue", [False, True])
def test_keys_of_the_query_own_item_are_masked(with_queue):
    q, keys, qk, _, ids, queue_ids, valid, _ = _case()
    query_ids = np.array([20, 13, -1, 12, 30, 14], np.int64)  # 20: a queue slot; 13, 12: in-batch keys;
    # 14 equals row 5's own positive (never masked); -1 and 30: nothing to mask
    cand, cand_ids = np.concatenate([keys, qk]), np.concatenate([ids, queue_ids])
    cand_valid = np.concatenate([np.ones(len(ids), bool), valid])
    if with_queue:
        got = info_nce(q, keys, tf.range(len(ids)), ids, ids, 0.1, queue_keys=qk, queue_ids=queue_ids,
                       queue_valid=valid, query_ids=query_ids).numpy()
    else:
        got = info_nce(q, cand, tf.range(len(ids)), ids, cand_ids, 0.1, cand_valid, query_ids=query_ids).numpy()
    want = []
    for i in range(len(ids)):
        logits = q[i] @ cand.T / 0.1
        keep = cand_valid & ((cand_ids != ids[i]) | (np.arange(len(cand)) == i))
        keep &= (cand_ids != query_ids[i]) | (np.arange(len(cand)) == i)
        want.append(np.log(np.exp(logits[keep]).sum()) - logits[i])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    plain = info_nce(q, cand, tf.range(len(ids)), ids, cand_ids, 0.1, cand_valid).numpy()
    assert got[0] < plain[0] and got[1] < plain[1] and got[3] < plain[3]  # a negative fewer
    np.testing.assert_allclose(got[[2, 4, 5]], plain[[2, 4, 5]], rtol=1e-6)


def test_all_masked_row_is_finite_and_zero():
    q = np.eye(3, dtype=np.float32)
    ids = np.array([5, 5, 5], np.int64)  # every other key is the same item: only the positive remains
    loss = info_nce(q, q, tf.range(3), ids, ids, 0.01).numpy()
    np.testing.assert_allclose(loss, 0.0, atol=1e-6)


def test_triplet_margin_and_missing_negative():
    q = np.array([[1.0, 0.0]], np.float32)
    p = np.array([[0.8, 0.6]], np.float32)
    n = np.array([[0.6, 0.8]], np.float32)
    np.testing.assert_allclose(triplet(q, p, n, 0.5).numpy(), [0.5 - 0.8 + 0.6], rtol=1e-6)
    np.testing.assert_allclose(triplet(q, p, n, 0.1).numpy(), [0.0])
    np.testing.assert_allclose(triplet(q, p, n, 0.5, valid=np.array([False])).numpy(), [0.0])


@pytest.mark.parametrize("aligned", [True, False])
def test_temperature_gradient_matches_finite_difference(aligned):
    q, keys, qk, _, ids, queue_ids, valid, _ = _case(seed=3)
    if aligned:  # positives are the nearest keys: sharpening (smaller τ) lowers the loss → dL/dlogτ > 0
        keys = q.copy()
    temperature = Temperature(0.2, 0.01, 1.0)
    temperature.build()
    cand, cand_ids = np.concatenate([keys, qk]), np.concatenate([ids, queue_ids])
    cand_valid = np.concatenate([np.ones(len(ids), bool), valid])
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(info_nce(q, cand, tf.range(len(ids)), ids, cand_ids, temperature.tau(), cand_valid))
    grad = float(tape.gradient(loss, temperature.log_temperature.value))
    eps = 1e-4
    ref = [np.mean(scl_loss(q, keys, ids, qk, queue_ids, valid, np.exp(np.log(0.2) + s * eps))) for s in (1, -1)]
    numeric = (ref[0] - ref[1]) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)
    assert (grad > 0) == aligned


def test_temperature_is_clamped():
    t = Temperature(0.07, 0.05, 0.5)
    t.build()
    t.log_temperature.assign(np.log(10.0))
    np.testing.assert_allclose(float(t.tau()), 0.5, rtol=1e-6)
    t.log_temperature.assign(t.clamped_log_value(np.float32(np.log(1e-4))))
    np.testing.assert_allclose(float(t.tau()), 0.05, rtol=1e-6)
    with pytest.raises(ValueError, match="min_value <= initial_value"):
        Temperature(0.001, 0.01, 1.0)


@pytest.mark.parametrize("filling", [True, False])
def test_queue_block_equals_reference(filling):
    q, keys, qk, _, ids, queue_ids, valid, _ = _case(seed=5)
    if not filling:  # a full queue: the single-comparison branch
        valid = np.ones_like(valid)
        queue_ids = np.where(queue_ids < 0, 40, queue_ids)
    got = info_nce(q, keys, tf.range(len(ids)), ids, ids, tf.constant(0.1), queue_keys=qk, queue_ids=queue_ids,
                   queue_valid=valid).numpy()
    np.testing.assert_allclose(got, scl_loss(q, keys, ids, qk, queue_ids, valid, 0.1), rtol=1e-5, atol=1e-5)


def test_queue_block_gradient_equals_concatenated_autodiff():
    q, keys, qk, _, ids, queue_ids, valid, _ = _case(seed=6)
    qv, tau = tf.Variable(q), tf.Variable(0.15)
    cand, cand_ids = np.concatenate([keys, qk]), np.concatenate([ids, queue_ids])
    cand_valid = np.concatenate([np.ones(len(ids), bool), valid])
    weights = tf.constant(np.linspace(0.5, 1.5, len(ids)), tf.float32)  # a non-uniform upstream gradient
    grads = []
    for split in (True, False):
        with tf.GradientTape() as tape:
            if split:
                per = info_nce(qv, keys, tf.range(len(ids)), ids, ids, tau, queue_keys=qk, queue_ids=queue_ids,
                               queue_valid=valid)
            else:
                per = info_nce(qv, cand, tf.range(len(ids)), ids, cand_ids, tau, cand_valid)
            loss = tf.reduce_sum(per * weights)
        grads.append([g.numpy() for g in tape.gradient(loss, [qv, tau])])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
