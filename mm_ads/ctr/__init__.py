"""CTR prediction: the model builder and what trains it.

* `model` — the CTR model builder: the ID model and the paper's variants (id, vector, simscore, simtier, make,
  simtier_make, make_only).
* `task` — `CTRTask`: inputs from the canonical dataset, binary cross-entropy, exact evaluation with slices.
* `make` — MAKE's two phases: the pre-training config and model dir, then the ID model with MAKE.
* `tiers` — SimTier's tier boundaries calibrated on the training similarities.
"""
