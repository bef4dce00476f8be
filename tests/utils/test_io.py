import os

import pytest

from mm_ads.utils import io as io_utils


def test_atomic_file_writes_whole_or_nothing(tmp_path):
    path = tmp_path / "a.json"
    io_utils.write_json(str(path), {"x": 1})
    assert path.read_text().strip().startswith("{")
    with pytest.raises(RuntimeError):
        with io_utils.atomic_file(str(path)) as f:
            f.write("partial")
            raise RuntimeError("crash")
    assert '"x": 1' in path.read_text()  # the old content survives
    assert sorted(os.listdir(tmp_path)) == ["a.json"]  # no temporary left behind


def test_atomic_directory_replaces_only_on_success(tmp_path):
    out = tmp_path / "d"
    with io_utils.atomic_directory(str(out)) as tmp:
        open(os.path.join(tmp, "f"), "w").write("1")
    assert (out / "f").read_text() == "1"
    with pytest.raises(FileExistsError, match="--overwrite"):
        with io_utils.atomic_directory(str(out)):
            pass
    with pytest.raises(RuntimeError):
        with io_utils.atomic_directory(str(out), overwrite=True) as tmp:
            open(os.path.join(tmp, "g"), "w").write("2")
            raise RuntimeError("crash")
    assert sorted(os.listdir(out)) == ["f"]
    with io_utils.atomic_directory(str(out), overwrite=True) as tmp:
        open(os.path.join(tmp, "g"), "w").write("2")
    assert sorted(os.listdir(out)) == ["g"]
    assert sorted(os.listdir(tmp_path)) == ["d"]
