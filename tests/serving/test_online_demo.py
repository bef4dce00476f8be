"""The one-command online demo (tools/online_demo.py) end to end on a tiny world, as a user runs it.

One run of the demo (a subprocess, every preparation stage included: world, a few SCL steps, catalogue
vectors, the initial CTR model) is shared by the assertions; the failure path then reuses its prepared work
dir with a REST port that is already taken, so the server cannot start. The demo runs its loop for a fixed time
(~40 s in all): it is a `large` test (`make test-large`); every service in it has its own tests in the default suite.
"""

import json
import math
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TINY_WORLD = """--seed=3
--num_items=200
--num_users=150
--num_categories=5
--num_impressions=1500
--num_search_pairs=200
--seq_len=6
--image_size=8
--num_shards=1
"""
TINY_RUN = ["--scl_steps=2", "--duration_s=4", "--new_item_rates=10", "--nearline_batch_size=64",
            "--nearline_export_every_s=4", "--impression_rate=100", "--settle_s=20", "--hot_swap_timeout_s=60",
            "--num_ranked_examples=2", "--startup_timeout_s=240"]


def _run_demo(work, *extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "tools.online_demo", f"--work_dir={work}",
                           f"--world_flagfile={os.path.join(work, 'tiny.flags')}", *TINY_RUN, *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    path = os.path.join(work, "online", "summary.json")
    summary = json.load(open(path)) if os.path.exists(path) else None
    return proc, summary


def _processes_mentioning(text):
    """Pids of live processes whose command line contains `text` (the demo passes its work dir to every
    service, so this finds any service it left behind)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            out.append((int(pid), cmd))
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("online_demo"))
    with open(os.path.join(work, "tiny.flags"), "w") as f:
        f.write(TINY_WORLD)
    proc, summary = _run_demo(work)
    return {"work": work, "proc": proc, "summary": summary}


@pytest.mark.large
def test_demo_runs_the_loop_and_exits_cleanly(demo):
    proc, s = demo["proc"], demo["summary"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert s is not None and s["ok"] and s["errors"] == []
    assert "OK" in proc.stdout.splitlines()
    for name in ("encoder_service", "nearline", "server"):
        assert s["services"][name]["returncode"] == 0 and s["services"][name]["failure"] is None, s["services"]
    assert _processes_mentioning(demo["work"]) == []
    for svc in s["services"].values():  # reaped by the demo, which has exited
        assert not os.path.exists(f"/proc/{svc['pid']}")


@pytest.mark.large
def test_every_new_item_found_with_finite_positive_freshness(demo):
    s = demo["summary"]
    (phase,) = s["freshness"]
    assert phase["rate"] == 10 and phase["items"] >= 30 and phase["found"] == phase["items"]
    assert phase["missing"] == []
    fresh, lower = phase["freshness_s"], phase["freshness_lower_bound_s"]
    assert fresh["n"] == phase["items"]
    for stat in (fresh, phase["encoder_s"], phase["response_s"]):
        for key in ("p50", "p99", "max"):
            assert math.isfinite(stat[key]) and stat[key] > 0, (key, stat)
    assert 0 <= lower["p50"] <= fresh["p50"] <= fresh["p99"] <= fresh["max"]
    # the split adds up: encoder + poll wait + visibility + response = freshness, item by item, so the means do
    parts = sum(phase[k]["mean"] for k in ("encoder_s", "poll_wait_s", "visibility_s", "response_s"))
    assert parts == pytest.approx(fresh["mean"], abs=1e-3)
    # the encoder service measured its own lag on the same items (+ the warm-up item)
    assert s["encoder_service_stats"]["written"] == phase["items"] + 1
    assert s["encoder_service_stats"]["skipped"] == 0


@pytest.mark.large
def test_server_swapped_in_a_nearline_version(demo):
    s = demo["summary"]
    exported = [e["version"] for e in s["nearline_exports"]]
    assert exported and min(exported) >= 2  # version 1 is the offline model
    assert s["nearline_versions_served"] and set(s["nearline_versions_served"]) <= set(exported)
    assert 1 in s["versions_seen"]  # the offline version served first
    assert s["nearline_stats"]["events"] > 0 and s["impressions_replayed"] >= s["nearline_stats"]["events"]
    ex = s["ranked_examples"]
    assert len(ex) == 2 and all(e["model_version"] in s["nearline_versions_served"] for e in ex)
    for e in ex:  # the two newest new items are ranked with their vectors; scores are probabilities
        assert all(e["found"][-2:]) and all(0 < x < 1 for x in e["scores"])
        assert sorted(e["ranking"]) == sorted(e["candidates"])
    assert ex[-1]["grpc_max_abs_diff"] < 1e-5  # TF Serving's gRPC client gets the REST scores


# large (~15 s more): the demo's failure path
@pytest.mark.large
def test_a_service_that_cannot_start_fails_the_demo_without_leftovers(demo):
    work = demo["work"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc, s = _run_demo(work, f"--rest_port={port}")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not s["ok"] and s["services"]["server"]["failure"]
    assert any("server" in e for e in s["errors"]), s["errors"]
    assert "FAILED" in proc.stdout
    assert "prepare: world" not in proc.stderr  # the prepared artifacts were reused
    assert _processes_mentioning(work) == []
    for name in ("encoder_service", "nearline"):  # stopped by the demo, not left running
        assert s["services"][name]["returncode"] is not None


def test_freshness_split_by_hand():
    from tools.online_demo import freshness_report

    created = {1: {"ts": 10.0, "phase": "5/s", "rate": 5.0}, 2: {"ts": 10.2, "phase": "5/s", "rate": 5.0},
               3: {"ts": 10.4, "phase": "5/s", "rate": 5.0}, 4: {"ts": 10.5, "phase": "5/s", "rate": 5.0}}
    sends = [10.01, 10.05, 10.09, 10.21, 10.26, 10.45, 10.50]
    found = {1: {"send": 10.09, "recv": 10.10},   # the call at 10.05 came after the commit and still missed
             2: {"send": 10.26, "recv": 10.27},   # the first call after the commit found it
             3: {"send": 10.45, "recv": 10.48}}   # sent before the write timestamp, read after the commit
    last_miss = {1: 10.05, 2: 10.21, 4: 10.50}
    commit = {1: 10.03, 2: 10.22, 3: 10.46, 4: float("nan")}
    (r,) = freshness_report(created, found, last_miss, sends, commit)
    assert (r["items"], r["found"], r["missing"], r["rate"]) == (4, 3, [4], 5.0)
    approx = lambda v: pytest.approx(v, abs=1e-9)  # noqa: E731
    assert r["freshness_s"]["max"] == approx(0.10) and r["freshness_s"]["n"] == 3
    assert r["freshness_lower_bound_s"]["max"] == approx(0.05)           # item 1: 10.05 - 10.0
    assert r["encoder_s"]["mean"] == approx((0.03 + 0.02 + 0.06) / 3)
    assert r["poll_wait_s"]["max"] == approx(0.04) and r["poll_wait_s"]["mean"] == approx((0.02 + 0.04 + 0) / 3)
    assert r["visibility_s"]["max"] == approx(0.04) and r["visibility_s"]["mean"] == approx(0.04 / 3)
    assert r["response_s"]["mean"] == approx((0.01 + 0.01 + 0.02) / 3)  # item 3 counts from the commit
    parts = ("encoder_s", "poll_wait_s", "visibility_s", "response_s")  # they add up to the freshness
    assert sum(r[k]["mean"] for k in parts) == approx(r["freshness_s"]["mean"])
