r"""Does SimTier's histogram predict clicks by itself? A logistic regression on it alone, scored on validation.

```
python -m tools.experiments.simtier_probe --data_dir=runs/ml100k/data --vector_table=random
python -m tools.experiments.simtier_probe --data_dir=runs/ml100k/data --vector_table=runs/ml100k/vectors.parquet
```

For every impression of `--train_split` and `--eval_split`: SimTier's features as the CTR model computes them
(`mm_ads.layers.SimTier`, equal tiers over [−1, 1], `--tier_transform`, history items without a vector and
padding left out), then a logistic regression (Newton's method on standardised features, a small ridge) fitted on
the training rows and its AUC on the evaluation rows. Also the history length alone, for reference. An AUC of
0.5 means the histogram carries no signal on its own: a CTR variant that gains with it then gains from something
else. `--vector_table=random` replaces every item's vector by a random unit vector (dim `--random_dim`, seed 0),
the report's control. Deterministic.
"""

import numpy as np
from absl import app, flags


def define_flags():
    """The command line's flags (defined by the program only: importing this module defines none)."""
    flags.DEFINE_string("data_dir", None, "A prepared dataset.", required=True)
    flags.DEFINE_string("vector_table", "random", "Vector table path, or `random`.")
    flags.DEFINE_integer("random_dim", 384, "Dim of the random vectors of --vector_table=random.")
    flags.DEFINE_integer("num_tiers", 20, "SimTier's tiers.")
    flags.DEFINE_string("tier_transform", "fraction", "SimTier's count transform.")
    flags.DEFINE_string("train_split", "train", "Where the regression is fitted.")
    flags.DEFINE_string("eval_split", "valid", "Where it is scored.")


def vector_lookup(data_dir, vector_table, random_dim):
    """`ids → (vectors, missing)` of a vector table, or of random unit vectors for every catalogue item."""
    import pyarrow.parquet as pq

    from mm_ads.data.dataset import Manifest
    from mm_ads.data.vectors import VectorTable, random_unit_vectors

    if vector_table != "random":
        return VectorTable.load(vector_table).lookup
    path = Manifest.load(data_dir).files("items", "all")[0]
    ids = pq.read_table(path, columns=["item_id"]).column("item_id").to_numpy().astype(np.int64)
    return VectorTable(ids, random_unit_vectors(len(ids), random_dim), "float32", None, "random").lookup


def simtier_features(data_dir, split, lookup, num_tiers, transform, chunk=4096):
    """`(features [n, num_tiers], history length [n], labels [n])` of a split's impressions."""
    from mm_ads.data.dataset import read_ctr_columns
    from mm_ads.layers import SimTier

    cols = read_ctr_columns(data_dir, split, ["item_id", "hist_item_id", "label"])
    layer = SimTier(num_tiers=num_tiers, count_transform=transform)
    out = []
    for s in range(0, len(cols["label"]), chunk):
        target, target_missing = lookup(cols["item_id"][s:s + chunk])
        history, history_missing = lookup(cols["hist_item_id"][s:s + chunk])
        mask = (cols["hist_item_id"][s:s + chunk] != 0) & ~history_missing
        out.append(np.asarray(layer(target, history, mask=mask)))
    length = (cols["hist_item_id"] != 0).sum(1).astype(np.float32)
    return np.concatenate(out), length, cols["label"].astype(np.float64)


def fit_logistic(x, y, ridge=1e-6, steps=50):
    """Weights of a logistic regression on standardised `x` (Newton's method); returns a scoring function."""
    mu, sd = x.mean(0), x.std(0) + 1e-9

    def design(a):
        return np.c_[(a - mu) / sd, np.ones(len(a))]

    d = design(x)
    w = np.zeros(d.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-d @ w))
        hessian = (d * (p * (1 - p))[:, None]).T @ d / len(y) + ridge * np.eye(len(w))
        step = np.linalg.solve(hessian, d.T @ (p - y) / len(y))
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return lambda a: design(a) @ w


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from mm_ads.metrics import auc

    f = flags.FLAGS
    lookup = vector_lookup(f.data_dir, f.vector_table, f.random_dim)
    train = simtier_features(f.data_dir, f.train_split, lookup, f.num_tiers, f.tier_transform)
    valid = simtier_features(f.data_dir, f.eval_split, lookup, f.num_tiers, f.tier_transform)
    print(f"vectors: {f.vector_table}; SimTier {f.num_tiers} tiers, {f.tier_transform}; fitted on "
          f"{f.train_split} ({len(train[2]):,} rows), scored on {f.eval_split} ({len(valid[2]):,} rows)")
    for name, column in (("SimTier histogram", 0), ("history length", 1)):
        x_train, x_valid = (np.atleast_2d(part[column].T).T for part in (train, valid))
        score = fit_logistic(x_train, train[2])
        print(f"{name}: AUC {auc(valid[2], score(x_valid)):.4f}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
