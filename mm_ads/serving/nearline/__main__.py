"""`python -m mm_ads.serving.nearline`: the near-line trainer (`trainer.main`)."""

import sys

from absl import app

from mm_ads.serving.nearline import trainer

if __name__ == "__main__":
    __doc__ = trainer.__doc__  # what `--help` prints first
    trainer.define_flags()
    app.run(trainer.main, argv=sys.argv)
