"""Evaluation metrics: exact AUC / GAUC / LogLoss / calibration, frequency and item-age slices, Acc@N.

CTR metrics (`mm_ads.metrics.ctr`) run on host NumPy arrays collected from the model: exact,
vectorised, O(n log n). `CTRMetrics` accumulates an evaluation set chunk by chunk and reports
everything (including the paper's Fig. 6b frequency slices) at the end. `acc_at_n`
(`mm_ads.metrics.retrieval`) is the pre-training metric of the paper's eq. 6.
"""

from mm_ads.metrics.ctr import (
    DEFAULT_AGE_EDGES,
    NEW_SLICE,
    CTRMetrics,
    GAUCResult,
    age_bucket_names,
    auc,
    calibration,
    frequency_groups,
    frequency_slice_names,
    gauc,
    gauc_details,
    item_age_buckets,
    item_counts,
    logloss,
    sliced_metrics,
)
from mm_ads.metrics.retrieval import acc_at_n, dedupe_by_id

__all__ = [
    "CTRMetrics",
    "DEFAULT_AGE_EDGES",
    "GAUCResult",
    "NEW_SLICE",
    "acc_at_n",
    "age_bucket_names",
    "auc",
    "calibration",
    "dedupe_by_id",
    "frequency_groups",
    "frequency_slice_names",
    "gauc",
    "gauc_details",
    "item_age_buckets",
    "item_counts",
    "logloss",
    "sliced_metrics",
]
