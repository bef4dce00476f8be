"""What both training loops share (the synchronous loop and the parameter-server coordinator's)."""

import types

import pytest

from mm_ads.training.trainer import Trainer


def test_a_non_finite_loss_names_the_step_and_the_intact_checkpoint():
    trainer = types.SimpleNamespace(latest_checkpoint="/m/ckpt/ckpt-200")
    Trainer._check_finite(trainer, [0.3, 0.2], "at step 7")  # finite: nothing happens
    with pytest.raises(FloatingPointError, match=r"^Loss became nan by step 250; the last checkpoint "
                                                 r"\(/m/ckpt/ckpt-200\) is intact$"):
        Trainer._check_finite(trainer, [0.3, float("nan"), float("inf")], "by step 250")
