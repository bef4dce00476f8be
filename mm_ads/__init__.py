"""mm_ads: multimodal item representations for CTR prediction in display advertising.

Subpackages (docs/architecture.md: what each owns and may import):
  * `mm_ads.data`     — FeatureSpec, the canonical dataset layout, the synthetic world, real-format readers,
                        tf.data pipelines with the item → vector join, vector tables.
  * `mm_ads.layers`   — public Keras layers: SparseEmbedding, DINAttention, SimTier, SimScore, MAKE, MLP, Dice.
  * `mm_ads.training` — the one custom training loop and its Task interface, sparse-aware optimizers,
                        tf.distribute strategies, the run directory, vector-table records.
  * `mm_ads.ctr`      — the CTR model builder (id, vector, simscore, simtier, make, simtier_make, make_only),
                        MAKE's two-phase training, SimTier's calibrated tiers and the CTR task.
  * `mm_ads.scl`      — semantic-aware contrastive pre-training of text/image encoders (and CLIP-E), encoding.
  * `mm_ads.metrics`  — exact AUC, GAUC, LogLoss, slices, Acc@N.
  * `mm_ads.export`   — SavedModel export in TF Serving's versioned layout.
  * `mm_ads.reports`  — the paper's experiments: Table 2, the whole report (Tables 2–3, Figs 3, 6a–c),
                        popularity baselines.
  * `mm_ads.serving`  — the online system: index table, event log, encoder service, near-line trainer,
                        prediction server (TF Serving's gRPC and REST APIs).
  * `mm_ads.utils`    — atomic file writes, progress lines, TensorFlow's quiet start-up.

Modules:
  * `mm_ads.config`   — the training config (`ExperimentConfig`), its validation and flagfiles.
  * `mm_ads.options`  — the one way between option dataclasses and flags / flagfile values.
  * `mm_ads.runs`     — one experiment config end to end (`run(config)`) and the task registry (`TASKS`).
  * `mm_ads.errors`   — `InputError`, the entry points' error naming the flag to fix.
  * `mm_ads.flags`, `mm_ads.train`, `mm_ads.encode` — command lines only (wiring).
  * `mm_ads.version`  — `__version__`.

Entry points: `python -m mm_ads.data.synthetic`, `mm_ads.data.prepare`, `mm_ads.train`, `mm_ads.export`,
`mm_ads.encode`, `mm_ads.reports.table2`, `mm_ads.reports.paper`, `mm_ads.serving.index.{encoder_service,
load_index_table}`, `mm_ads.serving.nearline`, `mm_ads.serving.nearline.replay`, `mm_ads.serving.server`.
"""

import os

from mm_ads.utils.tf_startup import import_tensorflow_quietly
from mm_ads.version import __version__

# TensorFlow's C++ INFO and WARNING lines (e.g. grappler's "Error in PredictCost()" debug notes) are hidden unless
# the user sets TF_CPP_MIN_LOG_LEVEL; its errors stay visible. The CUDA start-up notices on a CPU-only machine
# are dropped (mm_ads/utils/tf_startup.py).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import_tensorflow_quietly()

__all__ = ["__version__"]
