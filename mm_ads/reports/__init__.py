"""Reports that reproduce the paper's tables and figures from runs of this package.

  * `table2` — pre-training ablations (Acc@1/Acc@5): `python -m mm_ads.reports.table2`.
"""
