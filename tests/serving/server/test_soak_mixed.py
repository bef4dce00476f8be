"""The mixed soak of `tools.bench.serving_load --mode=soak_mixed` in small (issue 19): paced good requests over
gRPC and REST, every kind of the hostile catalogue, a hot swap in the middle; a real server on the tiny model."""

import os
import shutil

import numpy as np
import pytest

from mm_ads.serving.server.prediction_server import PredictionServer, ServerConfig
from tests.serving.server import server_helpers as h
from tools.bench import serving_mixed as mixed
from tools.bench import serving_world

MAX_CANDIDATES = 64


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("soak_world")
    world = h.tiny_server_world(root)
    world["staged"] = str(root / "staged")  # the version swapped in: a copy (a new version number is what counts)
    shutil.copytree(os.path.join(world["base"], "1"), world["staged"])
    yield world
    world["table"].close()


def _good_requests(num, seed=0):
    rng = np.random.default_rng(seed)
    return [{"candidates": rng.choice(np.arange(1, h.NUM_ITEMS + 1), 8, replace=False).tolist(),
             "history": rng.integers(1, h.NUM_ITEMS + 1, h.SEQ_LEN).tolist(),
             "user_id": int(rng.integers(1, h.NUM_USERS)), "features": {"user_profile_0": int(rng.integers(1, 4))}}
            for _ in range(num)]


def test_hostile_catalogue_kinds_are_distinct_and_cover_both_transports(world):
    kinds = mixed.hostile_catalogue(world["spec"], _good_requests(1)[0], max_candidates=MAX_CANDIDATES)
    names = [k.name for k in kinds]
    assert len(set(names)) == len(names)
    assert {k.transport for k in kinds} == {"grpc", "rest"}
    for k in kinds:  # 4xx / a client-error gRPC code, except unknown ids, which are served
        if k.name.endswith("_unknown_ids"):
            assert k.expected in ("OK", 200)
        elif k.transport == "rest":
            assert 400 <= k.expected < 500, k
        else:
            assert k.expected in ("INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"), k


def test_mixed_load_with_a_hot_swap_answers_good_requests_and_every_hostile_kind_as_expected(world):
    config = ServerConfig(model_base_path=world["base"], grpc_port=0, rest_port=0, max_candidates=MAX_CANDIDATES,
                          poll_interval_s=0.05, warmup_batch_sizes=(1,), vector_cache_items=1000)
    server = PredictionServer(config, world["table"], world["catalogue"], world["spec"]).start()
    try:
        ports = {"grpc_port": server.grpc_port, "rest_port": server.rest_port}
        requests = _good_requests(8)
        hostile = mixed.hostile_catalogue(world["spec"], requests[0], max_candidates=MAX_CANDIDATES)
        load = mixed.MixedLoad(ports, requests, hostile, rate=40, bad_fraction=0.5, workers=4, seed=3)
        swap = mixed.Swap(world["staged"], world["base"], 2, server.rest_port)
        # 2 passes over the catalogue (its kinds in a seeded order each pass), the swap after a quarter of them; the
        # load goes on until the status shows the new version, then for 20 more requests
        count = 4 * len(hostile)
        result = load.run(max_requests=count, events=[(count / 4 / 40, swap)],
                          rss=lambda: serving_world.rss_mb(os.getpid()),
                          until=lambda: swap.t_available is not None and len(load.outcomes) >= count + 20)
        swap.join()
    finally:
        server.stop()
    report = mixed.summarize(result, hostile, 40, 1, 2, swap.t_published, swap.t_available, settle_s=0)
    assert report["good_errors"] == 0, report["good_error_samples"]
    assert report["good_requests"] >= count // 2
    assert report["hostile_kinds_sent"] == len(hostile)
    for name, entry in report["hostile_by_kind"].items():
        assert entry["sent"] >= 1 and entry["received"] == {str(entry["expected"]): entry["sent"]}, (name, entry)
    assert report["hostile_5xx_or_internal"] == 0
    swap_report = report["swap"]
    assert swap.t_available is not None and server.manager.swaps == 2  # the first load, then version 2
    assert set(swap_report["answers_by_version"]) == {"1", "2"}
    assert swap_report["old_version_answers_after_first_new"] == 0
    assert report["checks"]["swapped"] and report["checks"]["good_errors_0"]
    assert report["checks"]["hostile_all_expected"] and report["checks"]["all_hostile_kinds_sent"]
    counters = server.stats.snapshot()
    assert not any(k.startswith(("rest_errors_5", "grpc_errors_INTERNAL", "grpc_errors_UNKNOWN")) for k in counters)
