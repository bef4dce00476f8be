"""mm_ads: multimodal item representations for CTR prediction in display advertising.

Subpackages:
  * `mm_ads.data`     — FeatureSpec, the canonical dataset layout, the synthetic world, real-format readers,
                        tf.data pipelines with the item → vector join.
  * `mm_ads.layers`   — public Keras layers: SparseEmbedding, DINAttention, SimTier, SimScore, MLP, Dice.
  * `mm_ads.training` — sparse-aware optimizers, the one custom training loop, tf.distribute strategies.
  * `mm_ads.ctr`      — the CTR model builder (id, vector, simscore, simtier) and the CTR task.
  * `mm_ads.scl`      — semantic-aware contrastive pre-training of text/image encoders.
  * `mm_ads.metrics`  — exact AUC, GAUC, LogLoss, slices, Acc@N.
  * `mm_ads.export`   — SavedModel export in TF Serving's versioned layout.

Entry points: `python -m mm_ads.data.synthetic`, `mm_ads.data.prepare`, `mm_ads.train`, `mm_ads.export`,
`mm_ads.encode`.
"""

from mm_ads.utils.tf_startup import import_tensorflow_quietly
from mm_ads.version import __version__

# TensorFlow's CUDA start-up notices on a CPU-only machine are dropped (mm_ads/utils/tf_startup.py)
import_tensorflow_quietly()

__all__ = ["__version__"]
