"""`python -m mm_ads.serving.server`: the prediction server (`prediction_server.main`)."""

from absl import app, flags

from mm_ads import options
from mm_ads.serving.server import prediction_server

if __name__ == "__main__":
    __doc__ = prediction_server.__doc__  # what `--help` prints first
    prediction_server.define_flags()
    flags.adopt_module_key_flags(options)  # `--help` lists the server's flags (mm_ads.options defines them)
    app.run(prediction_server.main)
