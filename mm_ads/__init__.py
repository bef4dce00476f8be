"""mm_ads: multimodal item representations for CTR prediction in display advertising.

Subpackages: `mm_ads.data` (FeatureSpec, synthetic world, real-format readers, tf.data pipelines).
"""

from mm_ads.version import __version__

__all__ = ["__version__"]
