"""The README's code must run as written."""

import os
import re

import numpy as np


def _python_block(readme, heading):
    text = readme[readme.index(heading):]
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_layers_snippet_builds_trains_and_saves(repo_root, tmp_path):
    import keras

    readme = open(os.path.join(repo_root, "README.md")).read()
    code = _python_block(readme, "## Our layers in your Keras model")  # as written: a 100k-row table
    scope = {}
    exec(code, scope)
    model = scope["model"]
    assert scope["items"].num_buckets == 100_000
    rng = np.random.default_rng(0)
    x = [rng.integers(1, 5000, (8,)), np.where(rng.random((8, 50)) < 0.2, 0, rng.integers(1, 5000, (8, 50))),
         rng.normal(size=(8, 128)).astype("float32"), rng.normal(size=(8, 50, 128)).astype("float32")]
    model.compile(optimizer="adam", loss=keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(x, rng.integers(0, 2, (8, 1)).astype("float32"), epochs=1, verbose=0)
    path = str(tmp_path / "user_model.keras")
    model.save(path)
    np.testing.assert_allclose(keras.models.load_model(path).predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5)
