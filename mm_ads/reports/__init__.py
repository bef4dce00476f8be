"""Reports that reproduce the paper's tables and figures from runs of this package.

  * `table2` — pre-training ablations (Acc@1/Acc@5): `python -m mm_ads.reports.table2`.
  * `paper` — the paper's experiments end to end (Tables 2–3, Figures 3, 6a–c): `python -m mm_ads.reports.paper`.
  * `popularity` — the non-learned popularity baselines of Table 3.
  * `options` — what the reports share: reusing finished runs, their optional dependencies.
"""
