"""SimTier's tier boundaries calibrated on the training similarities (`--tier_calibration=quantile`).

The paper's SimTier splits [-1, 1] into equal tiers. An encoder whose target-to-history similarities fall in
a narrow band (MiniLM on MovieLens: about 0.2-0.6) then uses a handful of the tiers. With
`tier_calibration=quantile`, `runs.run` computes the boundaries once, before anything is written: the
cosine similarity of every valid history vector to its target over `sample` impressions of the training
split (drawn with the run's seed), split into `num_tiers` tiers of equal mass (`quantile_boundaries`). They
are stored in the run's `config.json` (`tier_boundaries`), so a resumed run, `export_checkpoint` and the
SavedModel (the SimTier layer's config) use exactly the same tiers.
"""

import numpy as np

from mm_ads.config import SIMTIER_VARIANTS
from mm_ads.data import pipeline
from mm_ads.data.dataset import Manifest, read_ctr_columns
from mm_ads.data.spec import HIST_ITEM_VECTOR, ITEM_VECTOR
from mm_ads.data.vectors import VectorTable
from mm_ads.layers.sim_tier import quantile_boundaries


def training_similarities(data_dir, vector_table, split="train", sample=20_000, seed=0):
    """Cosine similarities of valid (non-padding, with a vector) history items to their target, over
    `sample` impressions of `split` drawn without replacement with `seed` (all when fewer): a 1-D array."""
    manifest = Manifest.load(data_dir)
    spec = manifest.spec
    path = pipeline.resolve_vector_table_path(manifest, vector_table or None, option="--vector_table")
    table = VectorTable.load(path)
    full = spec.with_vectors(table.dim)
    target_id, hist_id = full[ITEM_VECTOR].source, full[HIST_ITEM_VECTOR].source
    cols = read_ctr_columns(data_dir, split, [target_id, hist_id])
    n = len(cols[target_id])
    if n == 0:
        raise ValueError(f"{data_dir}: ctr/{split} is empty: no similarities to calibrate SimTier's tiers on")
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    target, target_missing = table.lookup(cols[target_id][rows])  # [n, D]
    hist_ids = cols[hist_id][rows]  # [n, S]
    history, hist_missing = table.lookup(hist_ids)  # [n, S, D]
    valid = (hist_ids != full[hist_id].padding_id) & ~hist_missing & ~target_missing[:, None]
    t = target / np.maximum(np.linalg.norm(target, axis=-1, keepdims=True), 1e-12)
    h = history / np.maximum(np.linalg.norm(history, axis=-1, keepdims=True), 1e-12)
    scores = np.einsum("nd,nsd->ns", t, h)
    return scores[valid]


def calibrate(config):
    """`config` (an `ExperimentConfig`) with `model.tier_boundaries` filled in when it asks for quantile tiers
    and has none yet; otherwise unchanged. Returns the config."""
    model = config.model
    if model.variant not in SIMTIER_VARIANTS or model.tier_calibration != "quantile" or model.tier_boundaries:
        return config
    tables = pipeline.resolve_modality_tables(Manifest.load(config.data.data_dir), config.data.vector_table or None,
                                              option="--vector_table")
    if len(tables) > 1:
        raise ValueError(f"--tier_calibration=quantile calibrates the tiers of one modality; --vector_table="
                         f"{config.data.vector_table} gives {len(tables)} ({[m for m, _, _ in tables]}): use "
                         "--tier_calibration=equal with several modalities")
    sims = training_similarities(config.data.data_dir, config.data.vector_table, config.data.train_split,
                                 seed=config.train.seed)
    model.tier_boundaries = tuple(quantile_boundaries(sims, model.num_tiers))
    return config
