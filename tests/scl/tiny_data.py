"""A tiny text-pair dataset (48 pairs over 12 items, repeated items and hard negatives) for the distributed tests."""

import numpy as np
import pyarrow as pa

from mm_ads.data.dataset import DatasetWriter


def write_tiny_text_pairs(data_dir, seed=0, n=48):
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(30)]
    ids = rng.integers(0, 12, n)  # repeated items: in-batch and queue false negatives happen
    texts = [" ".join(rng.choice(words, 4)) for _ in range(n)]
    titles = [f"item{i} " + " ".join(words[i:i + 3]) for i in ids]
    neg_ids = np.where(rng.random(n) < 0.7, (ids + 1) % 12, -1)
    table = pa.table({"query": texts, "positive": titles,
                      "negative": [f"item{j} " + " ".join(words[j:j + 3]) if j >= 0 else "" for j in neg_ids],
                      "positive_id": ids.astype(np.int64), "negative_id": neg_ids.astype(np.int64)})
    with DatasetWriter(data_dir, name="tiny-pairs", format="test") as w:
        for split in ("train", "test"):
            w.write_parquet("pretrain/text_pairs", split, table)
    return ids
