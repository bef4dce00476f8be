"""The near-line trainer: impression events in, a continuously trained CTR model and exported versions out.

* `trainer` — `NearlineTrainer` and its options (`python -m mm_ads.serving.nearline`).
* `impressions` — the impression event schema and the index-table join of a batch's vectors.
* `replay` — a dataset's impressions → impression events on a stream (`python -m mm_ads.serving.nearline.replay`).

May import `mm_ads.serving.index`, not `mm_ads.serving.server` (docs/architecture.md).
"""
