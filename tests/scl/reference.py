"""NumPy reference of the SCL loss (float64), written independently of `mm_ads.scl.losses`."""

import numpy as np


def scl_loss(queries, keys, positive_ids, queue_keys, queue_ids, queue_valid, tau, negatives=None,
             negative_ids=None, margin=0.2, weight=1.0, negatives_as_candidates=False):
    """Per-example InfoNCE over [in-batch keys ; valid queue] minus same-item keys (+ weight · triplet).
    `negatives_as_candidates`: the rows' hard negatives (those that exist and are not the row's positive) are
    candidates of every query too."""
    q = np.asarray(queries, np.float64)
    cand = np.concatenate([np.asarray(keys, np.float64), np.asarray(queue_keys, np.float64).reshape(-1, q.shape[1])])
    cand_ids = np.concatenate([positive_ids, queue_ids]).astype(np.int64)
    valid = np.concatenate([np.ones(len(keys), bool), np.asarray(queue_valid, bool)])
    if negatives_as_candidates:
        cand = np.concatenate([cand, np.asarray(negatives, np.float64)])
        cand_ids = np.concatenate([cand_ids, negative_ids]).astype(np.int64)
        valid = np.concatenate([valid, (np.asarray(negative_ids) >= 0) & (negative_ids != positive_ids)])
    out = np.zeros(len(q))
    for i in range(len(q)):
        keep = [j for j in range(len(cand))
                if j == i or (valid[j] and cand_ids[j] != positive_ids[i])]
        logits = np.array([q[i] @ cand[j] / tau for j in keep])
        top = logits.max()
        log_z = top + np.log(np.sum(np.exp(logits - top)))
        out[i] = log_z - q[i] @ cand[i] / tau
        if negatives is not None and negative_ids[i] >= 0 and negative_ids[i] != positive_ids[i]:
            n = np.asarray(negatives[i], np.float64)
            out[i] += weight * max(0.0, margin - q[i] @ cand[i] + q[i] @ n)
    return out
