"""The paper report's choices made on validation (encoder_row=auto), its random-vector control, and its
prepare_flagfile — unit checks on hand-made results, plus (large) the whole report on a MovieLens-layout dataset
with a validation split."""

import json
import os

import numpy as np
import pytest

from mm_ads.data.readers import prepare as prepare_dataset
from mm_ads.reports import paper
from tests.reports.test_paper_other_data import _movielens, _run


def _runner(tmp_path, rows, **options):
    runner = paper.PaperRunner(paper.PaperConfig(encoder_row="auto", **options), str(tmp_path))
    runner.table2 = {"benchmarks": {"synthetic_text": {"rows": rows}}}
    return runner


def _row(acc5):
    return {"acc@1": 0.0, "acc@5": 0.0, "valid": {"acc@1": acc5 / 2, "acc@5": acc5}}


def test_auto_picks_the_best_validation_score_and_never_below_the_generic_encoder(tmp_path):
    r = _runner(tmp_path, {"minilm_zero_shot": _row(0.30), "scl_minilm": _row(0.35), "scl": _row(0.10)})
    choice = r.choose_encoder()
    assert choice["row"] == r.encoder_row == "scl_minilm" and choice["valid"]["scl"] == 0.10
    assert "beats the generic encoder minilm_zero_shot (0.3000)" in choice["reason"]
    # a tie with the generic encoder goes to the generic one (listed first)
    r = _runner(tmp_path, {"minilm_zero_shot": _row(0.30), "scl_minilm": _row(0.30), "scl": _row(0.10)})
    assert r.choose_encoder()["row"] == "minilm_zero_shot"
    # the test split plays no part: a row better on test but worse on validation is not chosen
    rows = {"minilm_zero_shot": _row(0.30), "scl_minilm": dict(_row(0.20), **{"acc@5": 0.99})}
    r = _runner(tmp_path, rows)
    assert r.choose_encoder()["row"] == "minilm_zero_shot"
    # acc@1 as the metric; a skipped candidate is named
    r = _runner(tmp_path, {"minilm_zero_shot": _row(0.30), "scl": _row(0.50), "scl_minilm": {"skipped": "no weights"}},
                encoder_metric="acc@1")
    choice = r.choose_encoder()
    assert choice["row"] == "scl" and "not available: scl_minilm" in choice["reason"]


def test_auto_without_validation_pairs_is_a_clear_error(tmp_path):
    r = _runner(tmp_path, {"minilm_zero_shot": {"acc@1": 0.1, "acc@5": 0.2}, "scl": {"acc@1": 0.3, "acc@5": 0.4}})
    with pytest.raises(ValueError, match="no candidate .* has a validation acc@5"):
        r.choose_encoder()


@pytest.mark.parametrize("values, match", [
    ({"encoder_candidates": "scl,bogus"}, "'bogus' is not a Table 2 row"),
    ({"encoder_metric": "acc@3"}, "encoder_metric"),
    ({"control_variants": "id"}, "control_variants"),
    ({"control_variants": "simtier", "variants": "id,make"}, "control_variants"),
    ({"prepare_flagfile": "a.flags", "world_dir": "/w"}, "not both"),
])
def test_bad_options(values, match):
    with pytest.raises(ValueError, match=match):
        paper.PaperConfig.from_values(values)


def _metrics(gauc):
    return {"gauc": gauc, "auc": gauc, "logloss": 0.4}


def test_control_within_seed_spread(tmp_path, monkeypatch):
    r = paper.PaperRunner(paper.PaperConfig(seeds=(0, 1, 2), control_variants=("simtier", "make")), str(tmp_path))
    ids = {0: _metrics(0.800), 1: _metrics(0.802), 2: _metrics(0.798)}  # relative std 0.25%
    fake = {"simtier": {0: 0.801, 1: 0.801, 2: 0.799}, "make": {0: 0.780, 1: 0.781, 2: 0.779}}
    monkeypatch.setattr(r, "ctr", lambda variant, seed, model_dir, vector_row=None: _metrics(fake[variant][seed]))
    table3 = {"id": ids, "simtier": {s: _metrics(g) for s, g in {0: 0.801, 1: 0.803, 2: 0.799}.items()},
              "make": {s: _metrics(g) for s, g in {0: 0.820, 1: 0.821, 2: 0.819}.items()}}
    control = r.run_control(table3)
    assert control["within_seed_spread"] == {"simtier": True, "make": False}
    # the vectors' content: Table 3's run against the same variant and seed on random vectors
    assert control["content_gauc_rel"]["simtier"][0] == pytest.approx(np.mean([0.0, 0.002 / 0.801, 0.0]))
    assert control["content_gauc_rel"]["make"][0] == pytest.approx(np.mean([0.04 / 0.78, 0.04 / 0.781,
                                                                            0.04 / 0.779]))
    assert control["table"]["make"]["gauc_rel"][0] == pytest.approx(np.mean([-0.02 / 0.8, -0.021 / 0.802,
                                                                             -0.019 / 0.798]))
    results = {"table3": {"table": {}}, "table2": {}, "control": control}
    found = paper.findings(results)
    assert any("NOT every variant stays within the seed spread" in f for f in found)
    assert any("more than one std for make" in f for f in found)  # simtier: +0.08% ± 0.14%, not semantic


def test_training_epochs_chosen_by_early_stopping_are_reported_per_variant_and_seed():
    def es(epoch, split="valid"):
        return dict(_metrics(0.8), early_stopping={"best_epoch": epoch, "max_epochs": 4, "patience": 1,
                                                   "split": split})

    runs = {"id": {0: es(2), 1: es(3)}, "simtier": {0: es(1), 1: es(2)}, "vector": {0: _metrics(0.8)}}
    epochs = paper.PaperRunner.training_epochs(runs)
    assert epochs == {"id": {"by_seed": {"0": 2, "1": 3}, "max_epochs": 4, "patience": 1, "split": "valid"},
                      "simtier": {"by_seed": {"0": 1, "1": 2}, "max_epochs": 4, "patience": 1, "split": "valid"}}
    text = "\n".join(paper.training_epochs_markdown(epochs))
    assert "| id | 0: 2, 1: 3 |" in text and "at most 4 epochs" in text and "validation split" in text
    # chosen on the test split (no validation split): said so
    on_test = paper.PaperRunner.training_epochs({"id": {0: es(2, "eval")}})
    assert "TEST split" in "\n".join(paper.training_epochs_markdown(on_test))
    assert paper.PaperRunner.training_epochs({"id": {0: _metrics(0.8)}}) == {}
    assert paper.training_epochs_markdown({}) == []


def test_prepare_dataset_reports_the_prepare_error(tmp_path):
    flags = tmp_path / "bad.flags"
    flags.write_text("--format=movielens\n--input=/no/such/dir\n")
    with pytest.raises(RuntimeError, match="/no/such/dir"):
        paper.prepare_dataset(str(flags), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="prepare_flagfile"):
        paper.prepare_dataset(str(tmp_path / "missing.flags"), str(tmp_path / "out"))


@pytest.mark.large
def test_report_on_a_dataset_with_validation_splits(tmp_path, repo_root):
    """encoder_row=auto on the valid pairs, MAKE stopped on the valid impressions, the random-vector control."""
    data = str(tmp_path / "ml_data")
    prepare_dataset("movielens", str(_movielens(tmp_path / "ml")), data,
                    {"seq_len": 10, "negatives_per_positive": 2, "split": "per_user", "valid_fraction": 0.15,
                     "test_fraction": 0.15}, seed=0)
    out = str(tmp_path / "report")
    results = _run(repo_root, out, world_dir=data, encoder_row="auto", encoder_candidates="untrained,scl",
                   control_variants="simtier,make", make_epochs="3", fig6c_epochs="", fig6a_rows="", fig3_epochs="0")
    rows = results["table2"]["synthetic_text"]["rows"]
    choice = results["encoder_choice"]
    scores = {r: rows[r]["valid"]["acc@5"] for r in ("untrained", "scl")}
    assert choice["valid"] == scores and choice["row"] == max(scores, key=lambda r: (scores[r], r == "untrained"))
    assert results["data"]["encoder_row"] == choice["row"] and results["data"]["valid_impressions"] > 0
    mv = results["make_validation"]
    gaucs = [p["gauc"] for p in mv["curve"]]
    assert mv["chosen_epoch"] == int(np.argmax(gaucs)) + 1 and len(gaucs) <= 3
    control = results["control"]
    assert set(control["table"]) == {"id", "simtier", "make"} and set(control["within_seed_spread"]) == {"simtier",
                                                                                                         "make"}
    report = open(os.path.join(out, "report.md")).read()
    assert "chosen on validation" in report and "Random-vector control" in report
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["encoder_choice"]["row"] == choice["row"]
