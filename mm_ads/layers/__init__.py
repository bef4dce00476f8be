"""Public Keras layers of mm_ads (all registered under the "mm_ads" package, all `.keras`-serializable).

- `DINAttention`: DIN target attention over a behaviour sequence (optional side information).
- `SimTier`: histogram of target-to-history similarities (paper section 4.2).
- `MAKE`: Multimodal Knowledge Extractor — DIN over multimodal vectors + MLP to a logit (paper section 4.3).
- `SimScore`: per-item similarity to the target (the paper's SimScore baseline, side information to DIN).
- `MLP`: dense tower (relu/prelu/dice/any Keras activation, dropout, batch/layer norm, float32 logit).
- `Dice`: DIN's data-adaptive activation.
- `SparseEmbedding`: large id table (dense or hashed ids, row gathers, sparse gradients, a default row for
  unseen and rare ids).
- `StringHashing`: string ids → rows of a table (FarmHash fingerprint buckets, "" → padding row 0).
- `MaskedPooling`: mean or sum of a list of embeddings (tags, id sequences), padding excluded.
- `NumericEncoding`: numeric features standardised (mean/std) or bucketised by boundaries.
- `DynamicEmbedding`: collision-free id table (an id → row hash map over a bounded row pool, with eviction).
- `ColdItems`: new-item training: the training examples whose target item is treated as never seen.
"""

from mm_ads.layers.cold_items import ColdItems
from mm_ads.layers.dice import Dice
from mm_ads.layers.din_attention import DINAttention
from mm_ads.layers.dynamic_embedding import DynamicEmbedding
from mm_ads.layers.make import MAKE
from mm_ads.layers.masked_pooling import MaskedPooling
from mm_ads.layers.mlp import MLP
from mm_ads.layers.numeric_encoding import NumericEncoding
from mm_ads.layers.sim_score import SimScore
from mm_ads.layers.sim_tier import SimTier
from mm_ads.layers.sparse_embedding import SparseEmbedding
from mm_ads.layers.string_hashing import StringHashing

__all__ = [
    "ColdItems",
    "DINAttention",
    "Dice",
    "DynamicEmbedding",
    "MAKE",
    "MLP",
    "MaskedPooling",
    "NumericEncoding",
    "SimScore",
    "SimTier",
    "SparseEmbedding",
    "StringHashing",
]
