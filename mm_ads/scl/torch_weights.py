"""Reads a PyTorch state dict (`torch.save(model.state_dict(), path)`) into numpy arrays, without torch.

Both of torch's file layouts are read:

* the zip layout (torch >= 1.6): `<name>/data.pkl` (the pickled state dict) and `<name>/data/<key>` (one raw,
  little-endian storage per key);
* the legacy layout (torch < 1.6): five pickles in a row — magic number, protocol version (1001), system info,
  the state dict, the list of storage keys — then each storage as an int64 element count and its raw bytes, in
  the order of that list.

In both, a tensor is pickled as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and a
storage as a persistent id `("storage", torch.<Type>Storage, key, location, numel[, view])`.

Unpickling runs code named by the file, so the unpickler here is restricted: `find_class` resolves only the
globals a state dict of plain tensors needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
`torch._utils._rebuild_parameter`, the `torch.<Type>Storage` classes), each mapped to a function of this
module; any other global (`os.system`, a model class, ...) raises `pickle.UnpicklingError` naming it. Tensors
come out as owned, C-contiguous numpy arrays (a tensor's offset/size/stride view of its storage, copied).
"""

import collections
import io
import pickle
import struct
import zipfile

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def _bfloat16():
    import ml_dtypes  # installed with TensorFlow

    return np.dtype(ml_dtypes.bfloat16)


# torch.<name> storage class → numpy dtype (little-endian: both layouts store little-endian bytes)
STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": _bfloat16,
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}


class ForbiddenGlobalError(pickle.UnpicklingError):
    """The pickle names a global outside the state-dict allow-list."""


class _StorageType:
    """Stands for a `torch.<Type>Storage` class in the pickle: only its dtype matters."""

    def __init__(self, name):
        self.name = name

    @property
    def dtype(self):
        dtype = STORAGE_DTYPES[self.name]
        return np.dtype(dtype() if callable(dtype) else dtype)

    def __repr__(self):
        return f"torch.{self.name}"


class _Storage:
    """A storage named by a persistent id; its bytes are attached once read (`data`: 1-d numpy array)."""

    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data = None


class _StorageView:
    """A legacy storage view: `numel` elements of `root` from element `offset`."""

    def __init__(self, root, offset, numel):
        self.root, self.offset, self.numel, self.dtype = root, offset, numel, root.dtype


class _Tensor:
    """`_rebuild_tensor_v2`'s arguments, turned into a numpy array once the storages are read."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _int_tuple(value, what, source):
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise pickle.UnpicklingError(f"{source}: a tensor's {what} must be a tuple of ints >= 0, got {value!r}")
    return tuple(value)


def _make_rebuild_tensor(source):
    def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                          metadata=None):
        if not isinstance(storage, (_Storage, _StorageView)):
            raise pickle.UnpicklingError(f"{source}: _rebuild_tensor_v2 expects a storage, got {type(storage)}")
        if not isinstance(storage_offset, int) or storage_offset < 0:
            raise pickle.UnpicklingError(f"{source}: a tensor's storage offset must be an int >= 0, "
                                         f"got {storage_offset!r}")
        size, stride = _int_tuple(size, "size", source), _int_tuple(stride, "stride", source)
        if len(size) != len(stride):
            raise pickle.UnpicklingError(f"{source}: a tensor's size {size} and stride {stride} differ in rank")
        return _Tensor(storage, storage_offset, size, stride)

    return rebuild_tensor_v2


def _make_rebuild_parameter(source):
    def rebuild_parameter(data, requires_grad=False, backward_hooks=None):
        if not isinstance(data, _Tensor):
            raise pickle.UnpicklingError(f"{source}: _rebuild_parameter expects a tensor, got {type(data)}")
        return data

    return rebuild_parameter


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict's pickle: tensors as `_Tensor` placeholders, storages as `_Storage`.

    Args:
        file: the pickle stream.
        source: the file's name, for error messages.
        storages: `{key: _Storage}`, filled as storages are referenced (shared by the pickles of one file).
        legacy: storage ids carry a 6th field (the view), as in the legacy layout.
    """

    def __init__(self, file, source, storages, legacy=False):
        super().__init__(file)
        self.source = source
        self.storages = storages
        self.legacy = legacy
        self.allowed = {("collections", "OrderedDict"): collections.OrderedDict,
                        ("torch._utils", "_rebuild_tensor_v2"): _make_rebuild_tensor(source),
                        ("torch._utils", "_rebuild_parameter"): _make_rebuild_parameter(source)}
        for name in STORAGE_DTYPES:
            self.allowed[("torch", name)] = _StorageType(name)

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise ForbiddenGlobalError(
                f"{self.source}: refusing to unpickle the global {module}.{name}: a state dict of tensors needs "
                f"only {sorted(f'{m}.{n}' for m, n in self.allowed)}") from None

    def persistent_load(self, pid):
        n = 6 if self.legacy else 5
        if not isinstance(pid, tuple) or len(pid) != n or pid[0] != "storage":
            raise pickle.UnpicklingError(f"{self.source}: expected a storage id ('storage', type, key, location, "
                                         f"numel{', view' if self.legacy else ''}), got {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"{self.source}: storage {key!r} has type {storage_type!r}, "
                                         f"not a torch.<Type>Storage")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"{self.source}: malformed storage id {pid!r}")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, storage_type.dtype, numel)
        elif storage.dtype != storage_type.dtype:
            raise pickle.UnpicklingError(f"{self.source}: storage {key!r} is referenced as {storage.dtype} and "
                                         f"as {storage_type.dtype}")
        if self.legacy and pid[5] is not None:
            view = pid[5]
            if (not isinstance(view, tuple) or len(view) != 3 or not isinstance(view[1], int)
                    or not isinstance(view[2], int)):
                raise pickle.UnpicklingError(f"{self.source}: malformed storage view {view!r}")
            storage.numel = max(storage.numel, numel)
            return _StorageView(storage, view[1], view[2])
        storage.numel = max(storage.numel, numel)
        return storage


def _array(tensor, source, name):
    storage = tensor.storage
    base = storage.root.data[storage.offset:storage.offset + storage.numel] \
        if isinstance(storage, _StorageView) else storage.data
    size, stride = tensor.size, tensor.stride
    last = tensor.offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else tensor.offset - 1
    if last >= len(base):
        raise ValueError(f"{source}: tensor {name!r} (offset {tensor.offset}, size {size}, stride {stride}) reads past "
                         f"the end of its storage ({len(base)} elements)")
    if not all(size):
        return np.zeros(size, base.dtype)
    view = np.lib.stride_tricks.as_strided(base[tensor.offset:], shape=size,
                                           strides=[s * base.itemsize for s in stride], writeable=False)
    return np.array(view, order="C", copy=True)


def _resolve(obj, source, name=""):
    if isinstance(obj, _Tensor):
        return _array(obj, source, name)
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _resolve(v, source, k)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, source, name) for v in obj)
    return obj


def _load_zip(path):
    with zipfile.ZipFile(path) as z:
        pickles = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path}: a torch zip checkpoint holds exactly one <name>/data.pkl, found {pickles}")
        prefix = pickles[0][:-len("data.pkl")]
        storages = {}
        obj = RestrictedUnpickler(io.BytesIO(z.read(pickles[0])), path, storages).load()
        names = set(z.namelist())
        for key, storage in storages.items():
            entry = f"{prefix}data/{key}"
            if entry not in names:
                raise ValueError(f"{path}: storage {key!r} is referenced by {pickles[0]} but {entry} is missing")
            raw = z.read(entry)
            if len(raw) < storage.numel * storage.dtype.itemsize:
                raise ValueError(f"{path}: {entry} holds {len(raw)} bytes, expected at least "
                                 f"{storage.numel} x {storage.dtype.itemsize}")
            storage.data = np.frombuffer(raw, storage.dtype, count=len(raw) // storage.dtype.itemsize)
    return obj


def _load_legacy(path):
    storages = {}
    with open(path, "rb") as f:
        def load():
            return RestrictedUnpickler(f, path, storages, legacy=True).load()

        try:
            magic = load()
        except ForbiddenGlobalError:
            raise
        except Exception as e:  # whatever the first bytes of a file that is no pickle make the unpickler raise
            raise ValueError(f"{path}: neither a torch zip checkpoint nor a legacy torch checkpoint "
                             f"({type(e).__name__}: {e})") from None
        if magic != LEGACY_MAGIC:
            raise ValueError(f"{path}: not a torch checkpoint (magic number {magic!r}, expected {LEGACY_MAGIC:#x})")
        protocol = load()
        if protocol != LEGACY_PROTOCOL:
            raise ValueError(f"{path}: legacy torch protocol {protocol!r}, expected {LEGACY_PROTOCOL}")
        info = load()
        if not isinstance(info, dict) or not info.get("little_endian", False):
            raise ValueError(f"{path}: only little-endian checkpoints are read, system info is {info!r}")
        obj = load()
        keys = load()
        if not isinstance(keys, list) or set(keys) != set(storages):
            raise ValueError(f"{path}: the storage key list does not match the storages the state dict references")
        for key in keys:
            storage = storages[key]
            header = f.read(8)
            if len(header) != 8:
                raise ValueError(f"{path}: truncated before storage {key!r}")
            (numel,) = struct.unpack("<q", header)
            if numel < storage.numel:
                raise ValueError(f"{path}: storage {key!r} holds {numel} elements, expected at least {storage.numel}")
            raw = f.read(numel * storage.dtype.itemsize)
            if len(raw) != numel * storage.dtype.itemsize:
                raise ValueError(f"{path}: truncated inside storage {key!r}")
            storage.numel = numel
            storage.data = np.frombuffer(raw, storage.dtype)
    return obj


def load_state_dict(path):
    """`{name: numpy array}` (an `OrderedDict`, in the file's order) of a torch state dict file.

    Raises:
        ForbiddenGlobalError (a `pickle.UnpicklingError`): the pickle names a global outside the allow-list.
        pickle.UnpicklingError: a malformed storage id or tensor.
        ValueError: the file is not a torch checkpoint, or a storage is missing/truncated.
    """
    path = str(path)
    obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (a dict of tensors), got {type(obj).__name__}")
    out = _resolve(obj, path)
    bad = [k for k, v in out.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise ValueError(f"{path}: state dict entries that are not tensors: {bad[:5]}")
    return collections.OrderedDict(out)
