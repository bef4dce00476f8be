"""Training: sparse-aware optimizers (the custom training loop and checkpoints come with the CTR task)."""

from mm_ads.training.sparse_optimizers import SparseAdagrad, SparseAdam, SparseSGD

__all__ = ["SparseAdagrad", "SparseAdam", "SparseSGD"]
