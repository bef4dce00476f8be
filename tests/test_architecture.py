"""The package's import rule (docs/architecture.md): a package imports only the packages below it, and inside
`mm_ads.serving` the sub-packages `server` and `nearline` may import `index`, which imports neither.

Every `import` of the package's modules counts, also those inside functions (a lazy import is still a
dependency).
"""

import ast
import collections
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mm_ads")

BASE = {"utils", "version", "errors", "options", "config"}
# package → the packages it may import (besides itself)
ALLOWED = {
    "utils": set(), "version": set(), "errors": set(), "options": set(),
    "config": {"options", "utils", "errors"},
    "__init__": BASE,
    "data": BASE,
    "metrics": BASE,
    "layers": BASE,
    "training": BASE | {"data", "layers"},
    "ctr": BASE | {"data", "layers", "metrics", "training"},
    "export": BASE | {"data", "layers", "training", "ctr"},
    "scl": BASE | {"data", "layers", "metrics", "training", "export"},
    "runs": BASE | {"data", "layers", "metrics", "training", "ctr", "export", "scl"},
    "reports": BASE | {"data", "layers", "metrics", "training", "ctr", "export", "scl", "runs"},
    "flags": BASE,
    "serving": BASE | {"data", "layers", "metrics", "training", "ctr", "export", "scl", "runs", "flags"},
    "encode": BASE | {"scl", "data"},
    "train": BASE | {"data", "layers", "metrics", "training", "ctr", "export", "scl", "runs", "flags"},
}
# serving sub-package → the serving sub-packages it may import (besides itself)
SERVING_ALLOWED = {"__init__": {"index"}, "index": set(), "nearline": {"index"}, "server": {"index"}}


def _imports():
    """`{(module, imported module)}` over every module of mm_ads."""
    found = set()
    for root, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            module = "mm_ads." + os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                targets = []
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    targets = [node.module]
                    if node.module in ("mm_ads", "mm_ads.serving"):  # `from mm_ads import train`
                        targets = [f"{node.module}.{a.name}" for a in node.names]
                for target in targets:
                    if target.startswith("mm_ads."):
                        found.add((module, target))
    return found


def _package(module):
    return module.split(".")[1]


def test_every_package_has_a_rule():
    packages = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
    packages |= {name for name in os.listdir(ROOT) if os.path.exists(os.path.join(ROOT, name, "__init__.py"))}
    assert packages - set(ALLOWED) == set(), "add the new package to ALLOWED and to docs/architecture.md"


def test_packages_import_only_the_packages_below_them():
    imports = _imports()
    assert len(imports) > 50  # the walk found the package's imports
    bad = collections.defaultdict(set)
    for module, target in imports:
        package, target = _package(module), _package(target)
        if target != package and target not in ALLOWED[package]:
            bad[module].add(target)
    assert not bad, f"imports against docs/architecture.md: {dict(bad)}"


def test_every_serving_subpackage_has_a_rule():
    serving = os.path.join(ROOT, "serving")
    subpackages = {name for name in os.listdir(serving) if os.path.exists(os.path.join(serving, name, "__init__.py"))}
    modules = {name[:-3] for name in os.listdir(serving) if name.endswith(".py")}
    assert modules == {"__init__"}, "serving's modules live in its sub-packages"
    assert subpackages == set(SERVING_ALLOWED) - {"__init__"}, "add the sub-package to SERVING_ALLOWED and docs"


def test_serving_subpackages_import_only_index():
    bad = collections.defaultdict(set)
    for module, target in _imports():
        if module.startswith("mm_ads.serving.") and target.startswith("mm_ads.serving"):
            sub, imported = module.split(".")[2], (target.split(".") + [""])[2]
            if imported != sub and imported not in SERVING_ALLOWED[sub]:
                bad[module].add(target)
    assert not bad, f"imports against docs/architecture.md (serving's sub-packages): {dict(bad)}"


def test_the_rule_is_acyclic():
    # no package may (transitively) import itself under the rule: it is a layering, not a tangle
    for start in ALLOWED:
        seen, todo = set(), list(ALLOWED[start])
        while todo:
            p = todo.pop()
            if p not in seen:
                seen.add(p)
                todo += list(ALLOWED[p])
        assert start not in seen, start


def test_durations_are_named_with_s_or_ms():
    """docs/architecture.md, Conventions: `_s` / `_ms`, never a spelled-out unit (package, tests, tools)."""
    import re

    spelled = re.compile(r"\b\w+_(seconds|secs|sec|millis|msec|milliseconds|minutes|mins)\b")
    # `_format_seconds` formats a number of seconds; `wall_seconds` is the key older runs wrote to metrics.json,
    # still read by `model_dir.wall_s`
    allowed = {"_format_seconds", "wall_seconds"}
    repo = os.path.dirname(ROOT)
    found = []
    for top in ("mm_ads", "tests", "tools", "configs"):
        for dirpath, _, names in os.walk(os.path.join(repo, top)):
            for name in names:
                if name.endswith((".py", ".flags")):
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as f:
                        for lineno, line in enumerate(f, 1):
                            for m in spelled.finditer(line):
                                if m.group(0) not in allowed:
                                    found.append(f"{os.path.relpath(path, repo)}:{lineno}: {m.group(0)}")
    assert not found, "durations are named with _s / _ms (docs/architecture.md):\n" + "\n".join(found)
