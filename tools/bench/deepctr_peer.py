"""The DeepCTR peer of `tools.bench.ctr_step`: its venv, its worker process and their line protocol.

DeepCTR (`deepctr.models.DIN`) is the widely used open-source DIN implementation. It is written against
`tf.keras` 2, so it needs `tf_keras` and `TF_USE_LEGACY_KERAS=1`, which cannot share a process with this
package's Keras 3 code. It therefore lives in its own venv, outside the package and never among its
dependencies, and runs as a worker subprocess (`tools/bench/deepctr_worker.py`) that `ctr_step --peer=deepctr`
drives over stdin/stdout, so that its steps are timed interleaved with ours and stock Keras's.

Create the venv (once; ~10 s, ~45 MB, no TensorFlow download) from the repository root:

```
python -m tools.bench.deepctr_peer --setup        # or: make bench-peer-venv
```

The venv (`.venv-deepctr/`, git-ignored) is made from the same base interpreter as the running one and holds
only `deepctr==0.9.4` (the newest release) and `tf_keras==2.21.0` (the release that pins
`tensorflow>=2.21,<2.22`), installed with `--no-deps`. A `.pth` file appends the running venv's
site-packages to its `sys.path`, so the peer reuses the already-installed TensorFlow 2.21.0, h5py and
requests: the same TensorFlow build as ours (same oneDNN kernels), one 600 MB download fewer, and nothing
that could drift between the two venvs. The venv's own packages come first on its path, so `tf_keras` there
is the Keras that `tf.keras` resolves to under `TF_USE_LEGACY_KERAS=1`. The `.pth` line does not process the
running venv's own `.pth` files, so the editable `mm_ads` install is not visible to the peer (it needs none of
it). `--setup` ends by importing TensorFlow, tf_keras and DeepCTR in the new venv and checking the versions.

Protocol (one JSON object per line; the worker writes its answers to the original stdout and sends
everything else it or its libraries print to stderr):

    worker → {"ok": true, "ready": true, "build_s": ..., "memory": {...}, "params": ...}   once built + warmed
    parent → {"cmd": "run", "steps": N}      worker → {"ok": true, "ms_per_step": ..., "loss": ...}
    parent → {"cmd": "quit"}                 worker exits
    worker → {"ok": false, "error": "..."}   on any failure (then exits)
"""

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time

DEEPCTR_VERSION = "0.9.4"
TF_KERAS_VERSION = "2.21.0"
TENSORFLOW_VERSION = "2.21.0"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_VENV = os.path.join(REPO, ".venv-deepctr")
SETUP_COMMAND = "python -m tools.bench.deepctr_peer --setup   (or: make bench-peer-venv)"
PTH_NAME = "zz_mm_ads_base_venv.pth"  # sorted last: the venv's own packages stay first on sys.path
MARKER = ".mm_ads_peer"
# The peer's configurations: DeepCTR's DIN as shipped (its default l2(1e-6) embedding regulariser) and tuned
# (no embedding regulariser at all; `l2_reg_embedding=0` still attaches l2(0.0), whose gradient is dense).
CONFIGS = ("shipped", "tuned")
# `import deepctr` starts a thread that asks PyPI for the newest version (and prints when that fails): this
# answers it with a non-OK status, so the peer makes no network call and prints nothing.
NO_VERSION_CHECK = "import requests, types; requests.get = lambda *a, **k: types.SimpleNamespace(status_code=0)\n"


class PeerError(RuntimeError):
    """The peer venv is missing or broken, or the worker failed or answered something unexpected."""


# -- protocol ----------------------------------------------------------------------------------------------
def encode_message(message):
    """One protocol line (JSON, no NaN/inf, newline-terminated) for the dict `message`."""
    if not isinstance(message, dict):
        raise TypeError(f"a protocol message is a dict, got {type(message).__name__}")
    return json.dumps(message, allow_nan=False, separators=(",", ":")) + "\n"


def decode_message(line):
    """The dict of one protocol line; `PeerError` for an empty line, bad JSON or a non-object."""
    text = line.strip()
    if not text:
        raise PeerError("empty protocol line (the worker exited?)")
    try:
        message = json.loads(text)
    except json.JSONDecodeError as e:
        raise PeerError(f"not a protocol line: {text[:200]!r} ({e})") from None
    if not isinstance(message, dict):
        raise PeerError(f"a protocol line is a JSON object, got {text[:200]!r}")
    return message


def run_request(steps):
    """The parent's request to run `steps` (a positive int) timed steps."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return {"cmd": "run", "steps": steps}


def parse_request(message):
    """("run", steps) or ("quit", None) from a parent's message; ValueError for anything else."""
    cmd = message.get("cmd")
    if cmd == "quit":
        return "quit", None
    if cmd == "run":
        steps = message.get("steps")
        run_request(steps)  # validates
        return "run", steps
    raise ValueError(f"unknown request {message!r}")


def check_answer(message, *keys):
    """`message` if it is an ok answer holding `keys`; else `PeerError` with the worker's error."""
    if not message.get("ok"):
        raise PeerError(f"DeepCTR worker failed: {message.get('error', message)}")
    missing = [k for k in keys if k not in message]
    if missing:
        raise PeerError(f"DeepCTR worker answer lacks {missing}: {message}")
    return message


# -- the venv ----------------------------------------------------------------------------------------------
def peer_python(venv=DEFAULT_VENV):
    return os.path.join(venv, "bin", "python")


def check_venv(venv=DEFAULT_VENV):
    """The peer's python; `PeerError` naming the setup command if the venv is missing or stale."""
    python = peer_python(venv)
    marker = os.path.join(venv, MARKER)
    if not os.path.isfile(python) or not os.path.isfile(marker):
        raise PeerError(f"no DeepCTR peer venv at {venv}: create it with `{SETUP_COMMAND}`")
    with open(marker) as f:
        info = json.load(f)
    want = {"deepctr": DEEPCTR_VERSION, "tf_keras": TF_KERAS_VERSION}
    if {k: info.get(k) for k in want} != want:
        raise PeerError(f"the DeepCTR peer venv at {venv} has {info}, expected {want}: re-create it with "
                        f"`{SETUP_COMMAND}`")
    return python


def peer_env(base=None):
    """The worker's environment: tf.keras = tf_keras, quiet TF C++ logs, the repository on the path."""
    env = dict(os.environ if base is None else base)
    env.update(TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL=env.get("TF_CPP_MIN_LOG_LEVEL", "2"), PYTHONPATH=REPO)
    return env


def setup_venv(venv=DEFAULT_VENV, base_site=None):
    """Creates (or re-creates) the peer venv; returns its python."""
    base_site = os.path.realpath(base_site or sysconfig.get_paths()["purelib"])
    if not os.path.isdir(os.path.join(base_site, "tensorflow")):
        raise PeerError(f"no TensorFlow in {base_site}: run --setup with the project venv's python "
                        "(`make setup` first)")
    print(f"creating {venv} (base interpreter of {sys.executable}; reusing {base_site})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    python = peer_python(venv)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, PTH_NAME), "w") as f:
        f.write(base_site + "\n")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", f"deepctr=={DEEPCTR_VERSION}",
                    f"tf_keras=={TF_KERAS_VERSION}"], check=True)
    probe = ("import tensorflow as tf, tf_keras, deepctr.models, json; "
             "print(json.dumps({'tensorflow': tf.__version__, 'tf_keras': tf_keras.__version__, "
             "'deepctr': deepctr.__version__, 'tf.keras': tf.keras.layers.Dense.__module__}))")
    out = subprocess.run([python, "-c", NO_VERSION_CHECK + probe], env=peer_env(),
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    info = json.loads(out)
    want = {"tensorflow": TENSORFLOW_VERSION, "tf_keras": TF_KERAS_VERSION, "deepctr": DEEPCTR_VERSION}
    if {k: info[k] for k in want} != want or not info["tf.keras"].startswith("tf_keras"):
        raise PeerError(f"the peer venv imports {info}, expected {want} with tf.keras = tf_keras")
    info["base_site"] = base_site
    with open(os.path.join(venv, MARKER), "w") as f:
        json.dump(info, f)
    print(f"peer venv ready: {python} ({info})", flush=True)
    return python


# -- the worker process, seen from the parent --------------------------------------------------------------
class PeerProcess:
    """One worker (one DeepCTR DIN configuration at one table size) and its request/answer pipe."""

    def __init__(self, args, venv=DEFAULT_VENV, timeout_s=1800):
        python = check_venv(venv)
        self.proc = subprocess.Popen([python, "-m", "tools.bench.deepctr_worker", *args], cwd=REPO,
                                     env=peer_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     bufsize=1)
        self.timeout_s = timeout_s
        self.ready = self._read("ready", "build_s", "memory")

    def _read(self, *keys):
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait(timeout=self.timeout_s)
            raise PeerError(f"the DeepCTR worker exited (code {code}) without answering; see its stderr above")
        return check_answer(decode_message(line), *keys)

    def request(self, message, *keys):
        self.proc.stdin.write(encode_message(message))
        self.proc.stdin.flush()
        return self._read(*keys)

    def run(self, steps):
        """Runs `steps` timed steps in the worker; returns its answer (ms_per_step, loss)."""
        return self.request(run_request(steps), "ms_per_step", "loss")

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(encode_message({"cmd": "quit"}))
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", action="store_true", help="create (or re-create) the DeepCTR peer venv")
    parser.add_argument("--venv", default=DEFAULT_VENV, help="where the peer venv lives")
    parser.add_argument("--check", action="store_true", help="only check that the peer venv is usable")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.setup:
        setup_venv(args.venv)
        print(f"done in {time.perf_counter() - start:.0f} s")
    elif args.check:
        print(check_venv(args.venv))
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
