"""The README's "Online serving: the prediction server" commands, run as written on a tiny synthetic world.

The world is laid out under a scratch dir as the README's paths expect (`runs/demo/data` with the vector table
`scl_text`, a simtier model of `configs/ctr/simtier.flags` exported to `runs/simtier/export/1` with its
`feature_spec.json`); the README's `load_index_table` and server commands run verbatim in that dir (the server
on free ports instead of 8500/8501), then the `curl` bodies and the `:predict` snippet are sent to it.
"""

import ast
import json
import os
import re
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from tests.serving.nearline import nearline_world as nw
from tests.test_readme_commands import commands as readme_commands

SECTION = "## Online serving: the prediction server"


def _section(repo_root):
    readme = open(os.path.join(repo_root, "README.md")).read()
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    return readme[start:end if end > 0 else None]


def _commands(bash):
    """The block's `python …` commands as argv lists (parsed as the README test parses every block)."""
    return [argv for argv in readme_commands(bash) if argv[0] == "python"]


def _world(root, repo_root):
    """runs/demo/data (+ vectors/scl_text.parquet) and runs/simtier (feature_spec.json, export/1) under `root`."""
    import keras

    from mm_ads.config import config_from_flagfile
    from mm_ads.ctr.model import build_ctr_model
    from mm_ads.data import synthetic
    from mm_ads.data.dataset import Manifest
    from mm_ads.data.spec import FeatureSpec
    from mm_ads.data.vectors import write_vector_table
    from mm_ads.export.saved_model import export_saved_model

    data = os.path.join(root, "runs", "demo", "data")
    world = synthetic.World(synthetic.WorldConfig(**nw.TINY)).generate(progress=False)
    synthetic.write_world(world, data, progress=False)
    items = pq.read_table(os.path.join(data, "items.parquet")).to_pydict()
    write_vector_table(os.path.join(data, "vectors", "scl_text.parquet"), np.asarray(items["item_id"]),
                       nw.attribute_vectors(items), encoder_version=nw.ENCODER)
    with open(os.path.join(data, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["extra"]["vector_tables"] = {"scl_text": "vectors/scl_text.parquet"}
    with open(os.path.join(data, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    base = Manifest.load(data).spec
    spec = FeatureSpec([f for f in base if f.role != "vector"], base.seq_len, 0).with_vectors(nw.DIM)
    model_dir = os.path.join(root, "runs", "simtier")
    config = config_from_flagfile(os.path.join(repo_root, "configs", "ctr", "simtier.flags"), data_dir=data,
                                  model_dir=model_dir)
    keras.utils.set_random_seed(0)
    export_saved_model(build_ctr_model(spec, config.model), os.path.join(model_dir, "export"), version=1, spec=spec)
    with open(os.path.join(model_dir, "feature_spec.json"), "w") as f:
        json.dump(spec.to_json(), f)
    return {"num_items": len(items["item_id"]), "export": os.path.join(model_dir, "export", "1")}


@pytest.fixture(scope="module")
def served(tmp_path_factory, repo_root):
    """The README's commands run in a scratch dir; yields the section, the world and the server's REST port."""
    root = str(tmp_path_factory.mktemp("readme_serving"))
    os.symlink(os.path.join(repo_root, "configs"), os.path.join(root, "configs"))  # the flagfile's relative path
    world = _world(root, repo_root)
    section = _section(repo_root)
    bash = "".join(re.findall(r"```bash\n(.*?)```", section, re.S))  # the server block, then the curl block
    commands = {argv[2]: argv for argv in _commands(bash)}
    assert sorted(commands) == ["mm_ads.serving.index.load_index_table", "mm_ads.serving.server"], commands
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo_root)
    load = subprocess.run([sys.executable, *commands["mm_ads.serving.index.load_index_table"][1:]], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert load.returncode == 0, load.stderr[-3000:]
    assert json.loads(load.stdout)["items"] == world["num_items"]
    proc = subprocess.Popen([sys.executable, *commands["mm_ads.serving.server"][1:], "--grpc_port=0", "--rest_port=0",
                             "--warmup_batch_sizes=1"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stderr = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        line = proc.stdout.readline()
        assert line, "".join(stderr[-30:])
        yield {"root": root, "section": section, "bash": bash, "world": world,
               "rest_port": json.loads(line)["rest_port"]}
        proc.terminate()
        assert proc.wait(timeout=60) == 0, "".join(stderr[-30:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _call(port, path, body=None):
    data = None if body is None else body.encode()
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", data), timeout=60) as r:
        return r.status, json.load(r)


def test_readme_curl_commands_are_complete_and_answer(served):
    bash, port = served["bash"], served["rest_port"]
    code_lines = [x for x in bash.splitlines() if not x.lstrip().startswith("#")]
    assert not any("..." in x or "…" in x for x in code_lines), code_lines  # every request is literal
    assert re.search(r"^curl -s localhost:8501/v1/models/ctr +#", bash, re.M)
    status, body = _call(port, "/v1/models/ctr")
    assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"

    rank = re.search(r"curl -s -X POST localhost:8501/v1/models/ctr:rank -d '(.*?)'", bash, re.S).group(1)
    request = json.loads(rank)
    status, body = _call(port, "/v1/models/ctr:rank", rank)
    assert status == 200, body
    candidates = request["candidates"]
    assert body["model_version"] == "1" and len(body["scores"]) == len(candidates)
    assert all(0.0 < s < 1.0 for s in body["scores"])
    # the tiny world has 200 items: 256 has no vector (and no catalogue row); it is still scored
    assert body["found"] == [c <= served["world"]["num_items"] for c in candidates] == [True, True, False]
    assert body["ranking"] == [candidates[i] for i in np.argsort(-np.asarray(body["scores"]), kind="stable")]
    assert sorted(body) == ["found", "model_spec", "model_version", "ranking", "scores"]


def test_readme_predict_snippet_runs_and_equals_the_saved_model(served, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", served["section"], re.S)
    code = [b for b in blocks if ":predict" in b]
    assert len(code) == 1, blocks
    code = code[0].replace("localhost:8501", f"localhost:{served['rest_port']}")
    monkeypatch.chdir(served["root"])
    scope = {}
    exec(code, scope)
    printed = ast.literal_eval(capsys.readouterr().out.strip())
    assert sorted(printed) == ["model_version", "predictions"] and printed["model_version"] == "1"
    assert len(printed["predictions"]) == 2 and all(0.0 < p < 1.0 for p in printed["predictions"])
    # every input of serving_default is sent, and the server's answer is the SavedModel's on those rows
    reference = tf.saved_model.load(served["world"]["export"]).signatures["serving_default"]
    assert sorted(scope["inputs"]) == sorted(reference.structured_input_signature[1])
    assert {"item_vector", "hist_item_vector", "item_vector_missing", "hist_item_vector_missing"} <= set(
        scope["inputs"])
    x = {name: tf.constant(scope["features"][name]) for name in scope["inputs"]}
    np.testing.assert_allclose(printed["predictions"], reference(**x)["ctr"].numpy(), rtol=1e-5, atol=1e-6)


def test_readme_nearline_section_builds_the_index_table_with_the_same_command(repo_root):
    readme = open(os.path.join(repo_root, "README.md")).read()
    start = readme.index("## Online system: near-line trainer")
    nearline = readme[start:readme.index("\n## ", start + 1)]
    bash = re.search(r"```bash\n(.*?)```", nearline, re.S).group(1)
    loads = [argv for argv in _commands(bash) if argv[2] == "mm_ads.serving.index.load_index_table"]
    served = [argv for argv in _commands(re.search(r"```bash\n(.*?)```", _section(repo_root), re.S).group(1))
              if argv[2] == "mm_ads.serving.index.load_index_table"]
    assert loads == served and len(loads) == 1  # the command the fixture above runs
    assert "python -c" not in bash
