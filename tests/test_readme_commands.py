"""Every command block of README.md runs as written on a fresh clone, in order.

Each ```bash / ```python block is preceded by a marker comment that says how the large test runs it:

  <!-- readme-test: run -->                        as written
  <!-- readme-test: smoke s|old|new| [s|..|..|] -->  with every `old` replaced by `new` (any delimiter after `s`)
  <!-- readme-test: background until "TEXT" -->     in the background until TEXT appears in its output; stopped
                                                    (SIGINT) after the last block
  <!-- readme-test: skip REASON -->                 not run
  <!-- readme-test: stand-in NAME -->               not run (it downloads); STAND_INS[NAME] writes a small stand-in
                                                    of what it creates

The default-suite test checks every block in seconds: markers, no placeholders, flagfiles, modules, every
`--flag` of a `python -m mm_ads…`/`tools…` command against the flags its entry point defines, and make
targets. The large test (`--run_large`) copies the tracked files into a scratch dir and runs every block there.
"""

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLACEHOLDER = re.compile(r"\bDIR\b|\bNAME_OR_PATH\b|\bPATH\b|\bURI\b|\.\.\.|…|<[A-Za-z_]+>|\bNAME\b")
COMMAND_LANGS = ("bash", "python")


@dataclasses.dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str  # "" when missing

    @property
    def kind(self):
        return self.marker.split(" ", 1)[0] if self.marker else ""

    @property
    def arg(self):
        return self.marker.split(" ", 1)[1].strip() if " " in self.marker else ""


def parse_blocks(readme):
    """Every fenced block of `readme` with the marker on the line right above it (or a pending one)."""
    lines = readme.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        text = "\n".join(lines[start + 1:j]) + "\n"
        above = lines[start - 1] if start else ""
        mk = re.match(r"^<!-- readme-test: (.*?) -->$", above.strip())
        marker = mk.group(1).strip() if mk else ""
        blocks.append(Block(start + 1, m.group(1), text, marker))
        i = j + 1
    return blocks


def substitutions(arg):
    """[(old, new)] of a smoke marker's `s|old|new|` list; ValueError if malformed."""
    out, rest = [], arg.strip()
    while rest:
        m = re.match(r"^s(.)(.*?)\1(.*?)\1\s*", rest)
        if not m:
            raise ValueError(f"bad substitution list {arg!r} (expected s|old|new| ...)")
        out.append((m.group(2), m.group(3)))
        rest = rest[m.end():]
    if not out:
        raise ValueError("a smoke marker needs at least one s|old|new|")
    return out


def runnable_text(block):
    """The text the large test runs (smoke substitutions applied)."""
    text = block.text
    if block.kind == "smoke":
        for old, new in substitutions(block.arg):
            text = text.replace(old, new)
    return text


def commands(bash):
    """The block's commands as argv lists: continuation lines and multi-line quotes joined, comments dropped."""
    out, line = [], ""
    for raw in bash.splitlines():
        line += raw.rstrip()
        if line.endswith("\\"):
            line = line[:-1] + " "
            continue
        try:
            argv = shlex.split(line, comments=True)
        except ValueError:  # a quoted string spanning lines
            line += "\n"
            continue
        if argv:
            out.append(argv)
        line = ""
    return out


def entry_points(argv):
    """[(module, args)] of the `python -m module args` commands in `argv` (also after `tools.cluster ... --`)."""
    out = []
    while "-m" in argv:
        k = argv.index("-m")
        if k == 0 or not os.path.basename(argv[k - 1]).startswith("python"):
            break
        module, rest = argv[k + 1], argv[k + 2:]
        inner = rest.index("--") if "--" in rest else len(rest)
        out.append((module, rest[:inner]))
        argv = rest[inner + 1:]
    return out


def make_targets():
    with open(os.path.join(REPO, "Makefile")) as f:
        return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", f.read(), re.M))


# The flags of each entry point: the module runs as __main__ with absl's app.run (and argparse's parse_args)
# replaced by a stop, so its module-level and main-block definitions happen; one process for all modules.
_LIST_FLAGS = r"""
import argparse, json, os, runpy, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from absl import app, flags

class Stop(Exception):
    pass

found = {}
def stop_app(*args, **kwargs):
    raise Stop()
def stop_parse(self, *args, **kwargs):
    found["argparse"] = sorted(s for s in self._option_string_actions if s.startswith("--"))
    raise Stop()
app.run = stop_app
argparse.ArgumentParser.parse_args = stop_parse
baseline = set(flags.FLAGS)
kept = set(sys.modules)
result = {}
for module in sys.argv[1:]:
    found.clear()
    argv = sys.argv
    sys.argv = [module]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        error = "the module did not call absl.app.run or argparse"
    except Stop:
        error = None
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
    sys.argv = argv
    names = set(flags.FLAGS) - baseline
    if "argparse" in found:
        result[module] = {"flags": [n[2:] for n in found["argparse"]], "argparse": True, "error": None}
    else:
        result[module] = {"flags": sorted(set(flags.FLAGS)), "argparse": False, "error": error}
    for name in names:
        delattr(flags.FLAGS, name)
    for name in list(sys.modules):
        if name not in kept and (name.startswith("mm_ads") or name.startswith("tools")):
            del sys.modules[name]
print(json.dumps(result))
"""


def list_flags(modules):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", _LIST_FLAGS, *sorted(modules)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_readme(readme, known_flags=None):
    """Problems of `readme`'s command blocks (a list of strings; empty = fine)."""
    problems, modules, uses = [], set(), []
    targets = make_targets()
    for b in parse_blocks(readme):
        where = f"README.md:{b.line} ({b.lang or 'no language'})"
        if b.lang not in COMMAND_LANGS:
            if not b.lang:
                problems.append(f"{where}: a fenced block needs a language (bash, python, or text)")
            elif b.marker:
                problems.append(f"{where}: a readme-test marker on a non-command block")
            continue
        if not b.kind:  # reported, and the block is still checked as if it ran as written
            problems.append(f"{where}: no <!-- readme-test: ... --> marker right above the block")
        elif b.kind not in ("run", "smoke", "background", "skip", "stand-in"):
            problems.append(f"{where}: unknown marker {b.marker!r}")
            continue
        if b.kind == "smoke":
            try:
                for old, _ in substitutions(b.arg):
                    if old not in b.text:
                        problems.append(f"{where}: smoke substitution {old!r} does not occur in the block")
            except ValueError as e:
                problems.append(f"{where}: {e}")
                continue
        if b.kind == "background" and not re.fullmatch(r'until "[^"]+"', b.arg):
            problems.append(f'{where}: a background marker is `background until "TEXT"`, got {b.marker!r}')
        if b.kind == "skip" and not b.arg:
            problems.append(f"{where}: a skip marker needs its reason")
        if b.kind == "stand-in" and b.arg not in STAND_INS:
            problems.append(f"{where}: unknown stand-in {b.arg!r} (known: {sorted(STAND_INS)})")
        if b.lang == "python":
            try:
                compile(runnable_text(b), where, "exec")
            except SyntaxError as e:
                problems.append(f"{where}: {e}")
            continue
        for text in {b.text, runnable_text(b)}:
            syntax = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
            if syntax.returncode:
                problems.append(f"{where}: bash syntax: {syntax.stderr.strip()}")
                continue
            for argv in commands(text):
                code = " ".join(argv)
                for m in PLACEHOLDER.finditer(code):
                    problems.append(f"{where}: placeholder {m.group(0)!r} in `{code[:100]}`")
                for arg in argv:
                    if arg.startswith("--flagfile=") and not os.path.isfile(os.path.join(REPO, arg.split("=", 1)[1])):
                        problems.append(f"{where}: {arg}: no such flagfile")
                if argv[0] == "make":
                    for t in (a for a in argv[1:] if not a.startswith("-") and "=" not in a):
                        if t not in targets:
                            problems.append(f"{where}: `make {t}`: no such Makefile target")
                for module, args in entry_points(argv):
                    path = os.path.join(REPO, *module.split("."))
                    if not (os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__main__.py"))):
                        problems.append(f"{where}: `python -m {module}`: no such module in the repository")
                        continue
                    modules.add(module)
                    uses.append((where, module, [a for a in args if a.startswith("--")]))
    if known_flags is None:
        known_flags = list_flags(modules)
    for where, module, args in uses:
        info = known_flags[module]
        if info["error"]:
            problems.append(f"{where}: could not list the flags of {module}: {info['error']}")
            continue
        names = set(info["flags"]) | ({"flagfile", "helpfull", "help", "undefok"} if not info["argparse"] else set())
        for arg in args:
            name = arg[2:].split("=", 1)[0]
            if name not in names and not (name.startswith("no") and name[2:] in names):
                problems.append(f"{where}: {module} has no flag --{name}")
    return problems


def _movielens_stand_in(root):
    """ml-latest-small/ in the MovieLens CSV layout, small (what the download block would unzip)."""
    import pathlib

    from tests.reports.test_paper_other_data import _movielens

    _movielens(pathlib.Path(root) / "ml-latest-small")


STAND_INS = {"ml-latest-small": _movielens_stand_in}

# what the output of a block must hold (the block found by a line of its text): answers, not only exit codes
EXPECTED_OUTPUT = {
    "curl -s -X POST localhost:8501/v1/models/ctr:rank": ['"state": "AVAILABLE"', '"ranking": ['],
    "python -m tools.online_demo ": ["\nOK\n"],
    "print(json.load(urllib.request.urlopen(request)))": ["{'predictions': [", "'model_version': '1'"],
    "saved_model_cli show": ["outputs['ctr']"],
}


def _readme():
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def test_every_readme_block_has_a_marker_and_valid_commands():
    problems = check_readme(_readme())
    assert not problems, "\n".join(problems)


def test_check_finds_placeholders_bad_flags_and_missing_markers():
    known = {"mm_ads.train": {"flags": ["data_dir", "model_dir", "export"], "argparse": False, "error": None}}
    readme = "\n".join([
        "```bash", "python -m mm_ads.train --flagfile=configs/ctr/id.flags --data_dir=DIR", "```",
        "<!-- readme-test: run -->", "```bash",
        "python -m mm_ads.train --flagfile=configs/ctr/nope.flags --model_dir=runs/x --bogus=1 --noexport",
        "make nosuchtarget", "```",
        "<!-- readme-test: smoke s|absent|x| -->", "```bash", "python -m mm_ads.train --data_dir=runs/x", "```",
        "<!-- readme-test: background until -->", "```python", "print(1)", "```",
        "```", "layout", "```", ""])
    problems = "\n".join(check_readme(readme, known_flags=known))
    assert "README.md:1 (bash): no <!-- readme-test" in problems
    assert "no such flagfile" in problems and "configs/ctr/nope.flags" in problems
    assert "has no flag --bogus" in problems and "--noexport" not in problems and "--model_dir" not in problems
    assert "`make nosuchtarget`: no such Makefile target" in problems
    assert "smoke substitution 'absent' does not occur" in problems
    assert "a background marker is" in problems
    assert "a fenced block needs a language" in problems
    assert "placeholder 'DIR'" in problems
    assert len(check_readme(readme, known_flags=known)) == 8, problems
    # placeholders are found even in a block whose marker is valid
    marked = "<!-- readme-test: run -->\n```bash\npython -m mm_ads.train --data_dir=PATH/x ...\n```\n"
    found = "\n".join(check_readme(marked, known_flags=known))
    assert "placeholder 'PATH'" in found and "placeholder '...'" in found


def test_substitutions_and_entry_points():
    assert substitutions("s|a b|c| s#x/y#z#") == [("a b", "c"), ("x/y", "z")]
    with pytest.raises(ValueError):
        substitutions("s|a|b")
    argv = shlex.split("python -m tools.cluster --workers=2 -- python -m mm_ads.train --data_dir=runs/d")
    assert entry_points(argv) == [("tools.cluster", ["--workers=2"]), ("mm_ads.train", ["--data_dir=runs/d"])]
    assert commands("a \\\n  --b=1  # note\n# only a comment\nc\n") == [["a", "--b=1"], ["c"]]


# -- the large test: every block, in order, in a fresh copy of the repository ------------------------------------
def _fresh_clone(root):
    """The tracked files (as they are in the working tree) under `root`/repo; ../shared/data next to it."""
    import shutil

    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    repo = os.path.join(root, "repo")
    for name in files.decode().split("\0"):
        if name and os.path.isfile(os.path.join(REPO, name)):
            os.makedirs(os.path.dirname(os.path.join(repo, name)), exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), os.path.join(repo, name))
    return repo


def _venv_for_make(repo):
    """`.venv` for make: the running interpreter's venv through symlinks, marked installed (no new venv, no pip)."""
    prefix = sys.prefix
    venv = os.path.join(repo, ".venv")
    os.makedirs(venv)
    for name in os.listdir(prefix):
        if name != ".installed":
            os.symlink(os.path.join(prefix, name), os.path.join(venv, name))
    with open(os.path.join(venv, ".installed"), "w"):
        pass
    later = time.time() + 60  # newer than setup.py, pyproject.toml and the Makefile: make does not rebuild it
    os.utime(os.path.join(venv, ".installed"), (later, later))


def _tail(path, n=60):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


@pytest.mark.large
def test_readme_blocks_run_in_order_in_a_fresh_clone(tmp_path, shared_data):
    blocks = [b for b in parse_blocks(_readme()) if b.lang in COMMAND_LANGS]
    assert blocks and all(b.kind for b in blocks)
    repo = _fresh_clone(str(tmp_path))
    os.makedirs(os.path.join(tmp_path, "shared"))
    os.symlink(shared_data, os.path.join(tmp_path, "shared", "data"))
    _venv_for_make(repo)
    assert not os.path.exists(os.path.join(repo, "runs"))
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"], PYTHONPATH=repo,
               TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env.pop("PYTEST_ADDOPTS", None)
    logs = os.path.join(tmp_path, "logs")
    os.makedirs(logs)
    background, timings, checked = [], [], set()
    try:
        for n, b in enumerate(blocks):
            log = os.path.join(logs, f"{n:02d}-line{b.line}.log")
            started = time.monotonic()
            if b.kind == "skip":
                continue
            if b.kind == "stand-in":
                STAND_INS[b.arg](repo)
                continue
            text = runnable_text(b)
            argv = ["bash", "-e", "-c", text] if b.lang == "bash" else [sys.executable, "-"]
            with open(log, "w") as out:
                if b.kind == "background":
                    proc = subprocess.Popen(argv, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True, stdin=subprocess.DEVNULL)
                    background.append((b, proc, log))
                    until = re.fullmatch(r'until "(.*)"', b.arg).group(1)
                    deadline = time.monotonic() + 900
                    while until not in open(log, errors="replace").read():
                        assert proc.poll() is None, f"README.md:{b.line} exited ({proc.returncode}):\n{_tail(log)}"
                        assert time.monotonic() < deadline, f"README.md:{b.line}: no {until!r}:\n{_tail(log)}"
                        time.sleep(0.5)
                else:
                    proc = subprocess.run(argv, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          input=text if b.lang == "python" else None, text=True, timeout=2400)
                    assert proc.returncode == 0, f"README.md:{b.line} failed ({proc.returncode}):\n{_tail(log)}"
            with open(log, errors="replace") as f:
                output = f.read()
            for key, wanted in EXPECTED_OUTPUT.items():
                for w in wanted if key in b.text else ():
                    assert w in output, f"README.md:{b.line}: {w!r} not in its output:\n{_tail(log)}"
                    checked.add(key)
            timings.append((b.line, round(time.monotonic() - started, 1)))
        assert checked == set(EXPECTED_OUTPUT), set(EXPECTED_OUTPUT) - checked
        for b, proc, log in background:
            assert proc.poll() is None, f"README.md:{b.line} died before the last block:\n{_tail(log)}"
    finally:
        for _, proc, _ in background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        print("block wall seconds (README line, s):", timings)
    # what the blocks promise to create
    runs = os.path.join(repo, "runs")
    for path in ["demo/vectors/scl.parquet", "smoke_world/manifest.json", "demo_simtier/export/1/saved_model.pb",
                 "demo_simtier/export/2/saved_model.pb", "demo_make/make/metrics.json", "demo_make/metrics.json",
                 "id_mw/metrics.json", "id_ps/metrics.json", "scl_text/metrics.json", "simtier/export/1",
                 "demo/data/vectors/scl_text.parquet", "table2_smoke/table2.md", "ml/report.md",
                 "online_demo/online/summary.json", "online_demo_scl/online/summary.json", "online/index.db",
                 "online/nearline/nearline_stats.json", "real/movielens/manifest.json",
                 "real/taobao_mm/manifest.json", "real/abt_buy/manifest.json", "real/clothing/manifest.json"]:
        assert os.path.exists(os.path.join(runs, path)), path
    with open(os.path.join(repo, "runs", "demo", "data", "manifest.json")) as f:
        assert "scl_text" in json.load(f)["extra"]["vector_tables"]  # encode --register
    assert os.listdir(os.path.join(runs, "scl_text", "encoder"))
