"""tools.bench.deepctr_peer: the line protocol with the DeepCTR worker, and the missing-venv error.

The worker itself needs the peer venv (`python -m tools.bench.deepctr_peer --setup`): its test is `large` and
skips when the venv is absent.
"""

import os

import numpy as np
import pytest

from tools.bench import deepctr_peer as peer


def test_messages_round_trip():
    for message in ({"cmd": "run", "steps": 3}, {"ok": True, "ms_per_step": 81.5, "loss": 0.3},
                    {"ok": False, "error": "ValueError: x"}):
        line = peer.encode_message(message)
        assert line.endswith("\n") and line.count("\n") == 1
        assert peer.decode_message(line) == message


def test_encode_refuses_non_finite_and_non_dicts():
    with pytest.raises(ValueError):
        peer.encode_message({"ok": True, "loss": float("nan")})
    with pytest.raises(TypeError):
        peer.encode_message([1, 2])


@pytest.mark.parametrize("line", ["", "\n", "not json\n", "[1, 2]\n", "2023-01-01 warning from a library\n"])
def test_decode_refuses_what_is_not_a_message(line):
    with pytest.raises(peer.PeerError):
        peer.decode_message(line)


def test_requests():
    assert peer.parse_request(peer.run_request(5)) == ("run", 5)
    assert peer.parse_request({"cmd": "quit"}) == ("quit", None)
    for bad in ({"cmd": "run", "steps": 0}, {"cmd": "run", "steps": 2.5}, {"cmd": "run", "steps": True},
                {"cmd": "run"}, {"cmd": "train"}, {}):
        with pytest.raises(ValueError):
            peer.parse_request(bad)


def test_answers():
    ok = {"ok": True, "ms_per_step": 1.0, "loss": 0.5}
    assert peer.check_answer(ok, "ms_per_step", "loss") is ok
    with pytest.raises(peer.PeerError, match="lacks"):
        peer.check_answer({"ok": True}, "ms_per_step")
    with pytest.raises(peer.PeerError, match="MemoryError: table"):
        peer.check_answer({"ok": False, "error": "MemoryError: table"})


def test_missing_venv_names_the_setup_command(tmp_path):
    with pytest.raises(peer.PeerError, match="deepctr_peer --setup"):
        peer.check_venv(str(tmp_path / "nowhere"))


def test_peer_env_selects_tf_keras():
    env = peer.peer_env({"PATH": "/bin"})
    assert env["TF_USE_LEGACY_KERAS"] == "1" and env["PYTHONPATH"] == peer.REPO


@pytest.mark.large
def test_worker_trains_both_configurations(tmp_path):
    """A tiny DIN in the peer venv: both configurations build, warm up and answer run requests."""
    try:
        peer.check_venv()
    except peer.PeerError as e:
        pytest.skip(str(e))
    rng = np.random.default_rng(0)
    batch, seq_len, rows = 32, 50, 1001
    data = {k: rng.integers(1, rows, batch) for k in ("user_id", "item_id", "category_id", "brand_id")}
    for k in ("hist_item_id", "hist_category_id", "hist_brand_id"):
        ids = rng.integers(1, rows, (batch, seq_len))
        ids[:, 40:] = 0
        data[k] = ids
    path = os.path.join(tmp_path, "batch.npz")
    np.savez(path, label=(rng.random(batch) < 0.2).astype(np.float32), **data)
    for config, regularised in (("shipped", 8), ("tuned", 4)):
        process = peer.PeerProcess([f"--config={config}", f"--batch={path}", f"--item_rows={rows}",
                                    f"--num_users={rows - 1}", f"--num_categories={rows - 1}",
                                    f"--num_brands={rows - 1}", "--warmup=1"])
        try:
            assert process.ready["regularisation_losses"] == regularised  # 4 tables + DeepCTR's l2(0) on 4 kernels
            assert len(process.ready["tables"]) == 4  # histories share the item, category and brand tables
            answer = process.run(2)
            assert answer["ms_per_step"] > 0 and np.isfinite(answer["loss"])
        finally:
            process.close()
        assert process.proc.returncode == 0
