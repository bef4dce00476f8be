"""tools/cluster.py: per-task TF_CONFIG, completion rules, failure propagation, Ctrl-C; every process reaped.

The tasks here are tiny Python programs (no TensorFlow), so the whole file takes a few seconds."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tools.cluster import LocalCluster, cluster_spec, main

# Prints its TF_CONFIG task; then does what $BEHAVIOUR_<type>_<index> says: "exit:N", "sleep" (forever), or
# writes its pid to $PID_DIR first when set.
TASK = """
import json, os, sys, time
c = json.loads(os.environ["TF_CONFIG"]); t = c["task"]
if os.environ.get("PID_DIR"):
    open(os.path.join(os.environ["PID_DIR"], f"{t['type']}-{t['index']}"), "w").write(str(os.getpid()))
print("task", json.dumps(c), flush=True)
what = os.environ.get(f"BEHAVIOUR_{t['type']}_{t['index']}", "exit:0")
if what == "sleep":
    time.sleep(600)
time.sleep(float(os.environ.get("DELAY", "0")))
sys.exit(int(what.split(":")[1]))
"""
CMD = [sys.executable, "-c", TASK]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_every_task_gets_its_tf_config_on_distinct_free_ports():
    with LocalCluster(CMD, num_workers=2, stream=None) as cluster:
        assert cluster.wait(timeout=60) == 0
    configs = {t.name: json.loads(t.output.split("task ", 1)[1]) for t in cluster.tasks}
    assert sorted(configs) == ["worker:0", "worker:1"]
    spec = configs["worker:0"]["cluster"]
    assert all(c["cluster"] == spec for c in configs.values())
    assert configs["worker:1"]["task"] == {"type": "worker", "index": 1}
    ports = [int(a.rsplit(":", 1)[1]) for a in spec["worker"]]
    assert len(set(ports)) == 2 and all(a.startswith("127.0.0.1:") for a in spec["worker"])
    spec = cluster_spec(2, 2, chief=True)
    assert [len(spec[j]) for j in ("chief", "worker", "ps")] == [1, 2, 2]
    with pytest.raises(ValueError, match="at least one worker"):
        cluster_spec(0)


def test_a_failing_worker_stops_the_cluster_with_its_status():
    env = dict(os.environ, BEHAVIOUR_worker_0="sleep", BEHAVIOUR_worker_1="exit:3")
    start = time.time()
    with LocalCluster(CMD, num_workers=2, env=env, stream=None, grace_s=2) as cluster:
        status = cluster.wait(timeout=60)
    assert status == 3 and cluster.failed.name == "worker:1"
    assert time.time() - start < 30  # worker 0 was stopped, not waited for
    assert cluster.task("worker", 0).popen.returncode is not None


def test_parameter_server_cluster_ends_with_the_chief_and_stops_the_servers():
    env = dict(os.environ, BEHAVIOUR_ps_0="sleep", BEHAVIOUR_ps_1="sleep", BEHAVIOUR_worker_0="sleep",
               BEHAVIOUR_worker_1="sleep", DELAY="0.5")
    with LocalCluster(CMD, num_workers=2, num_ps=2, chief=True, env=env, stream=None, grace_s=2) as cluster:
        assert cluster.wait(timeout=60) == 0
    assert sorted(t.name for t in cluster.tasks) == ["chief:0", "ps:0", "ps:1", "worker:0", "worker:1"]
    assert all(t.popen.returncode is not None for t in cluster.tasks)
    # a server task that ends while the chief runs is a failure
    env = dict(env, BEHAVIOUR_chief_0="sleep", BEHAVIOUR_ps_1="exit:0")
    with LocalCluster(CMD, num_workers=1, num_ps=2, chief=True, env=env, stream=None, grace_s=2) as cluster:
        assert cluster.wait(timeout=60) == 1
    assert cluster.failed.name == "ps:1"


def test_timeout_stops_everything():
    env = dict(os.environ, BEHAVIOUR_worker_0="sleep")
    with LocalCluster(CMD, num_workers=1, env=env, stream=None, grace_s=1) as cluster:
        with pytest.raises(TimeoutError):
            cluster.wait(timeout=1)
        assert cluster.task("worker", 0).popen.returncode is not None


def test_cli_streams_prefixed_lines_and_propagates_failure(capsys):
    env_before = os.environ.copy()
    os.environ["BEHAVIOUR_worker_1"] = "exit:5"
    try:
        status = main(["--workers=2", "--grace_s=1", "--", *CMD])
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    out = capsys.readouterr()
    assert status == 5
    assert "[worker:0] task " in out.out and "[worker:1] task " in out.out
    assert "task worker:1 failed with status 5" in out.err


def test_cli_ctrl_c_reaps_every_task(tmp_path, repo_root):
    env = dict(os.environ, PYTHONPATH=repo_root, PID_DIR=str(tmp_path), BEHAVIOUR_worker_0="sleep",
               BEHAVIOUR_worker_1="sleep")
    launcher = subprocess.Popen([sys.executable, "-m", "tools.cluster", "--workers=2", "--grace_s=2", "--",
                                 *CMD], cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        deadline = time.time() + 60
        while len(os.listdir(tmp_path)) < 2:
            assert time.time() < deadline and launcher.poll() is None
            time.sleep(0.05)
        pids = [int(open(tmp_path / name).read()) for name in os.listdir(tmp_path)]
        launcher.send_signal(signal.SIGINT)
        _, err = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == 128 + signal.SIGINT and "interrupted" in err
    assert not any(_alive(p) for p in pids)
