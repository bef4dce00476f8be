"""The README's online-system snippet runs as written."""

import os
import re

import numpy as np


def test_online_snippet_runs(repo_root, tmp_path, monkeypatch, capsys):
    readme = open(os.path.join(repo_root, "README.md")).read()
    text = readme[readme.index("## Online system: index table, event log, encoder service"):]
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(code, scope)
    np.testing.assert_array_equal(scope["found"], [True, False, True])
    np.testing.assert_array_equal(scope["vectors"], [[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    assert capsys.readouterr().out == "0 13\n"
    assert os.path.exists(tmp_path / "runs" / "example" / "index.db")
    assert os.path.exists(tmp_path / "runs" / "example" / "items.log")
    scope["table"].close()
    scope["log"].close()
