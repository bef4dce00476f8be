"""Atomic file and directory writes: nothing half-written is ever visible."""

import contextlib
import json
import os
import shutil
import tempfile


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, suffix=".tmp"):
    """Yields a temporary path next to `path`; on success it is renamed to `path`.

    For writers that want a file name rather than a file object (pyarrow, numpy; Keras wants
    `suffix=".keras"`).
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=suffix, dir=parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path, mode="w", **kwargs):
    """Yields a file object; on success the file appears at `path` in one rename."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_json(path, obj):
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json_if_exists(path):
    """The JSON value in `path`, or None when the file does not exist; `ValueError` naming the file when it
    cannot be read or parsed."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({e})") from None


@contextlib.contextmanager
def atomic_directory(path, overwrite=False):
    """Yields a temporary directory next to `path`; on success it replaces `path` whole.

    If the body raises, the temporary directory is removed and `path` is untouched.
    An existing non-empty `path` is an error unless `overwrite=True`.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"Output directory {path} exists and is not empty (pass --overwrite to replace it)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".old", dir=parent)
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def save_keras(model, path):
    """`model.save(path)` (a `.keras` file), atomically."""
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)
    return path
