"""tools/experiments/simtier_probe: the logistic-regression probe finds a signal exactly when there is one."""

import numpy as np

from mm_ads.metrics import auc
from tools.experiments.simtier_probe import fit_logistic


def test_probe_separates_signal_from_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 5))
    y_signal = (rng.random(20_000) < 1 / (1 + np.exp(-(2.0 * x[:, 1] - 1.0)))).astype(np.float64)
    y_noise = (rng.random(20_000) < 0.2).astype(np.float64)
    train, test = slice(0, 15_000), slice(15_000, None)
    signal = auc(y_signal[test], fit_logistic(x[train], y_signal[train])(x[test]))
    noise = auc(y_noise[test], fit_logistic(x[train], y_noise[train])(x[test]))
    assert signal > 0.8
    assert abs(noise - 0.5) < 0.03
    # a constant feature (e.g. a history length that never varies) is harmless: standardisation keeps it finite
    constant = fit_logistic(np.ones((100, 1)), y_noise[:100])(np.ones((10, 1)))
    assert np.isfinite(constant).all()
