"""The paper report's smoke profile: every table, figure and file, with the right shapes and keys."""

import json
import os

import pytest

from mm_ads.reports import paper


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, repo_root):
    options = paper.PaperConfig.from_values(
        paper.config_lib.read_flagfile(os.path.join(repo_root, "configs", "paper", "smoke.flags")))
    output_dir = str(tmp_path_factory.mktemp("paper"))
    cwd = os.getcwd()
    os.chdir(repo_root)  # profiles name flagfiles relative to the repository
    try:
        results = paper.run_paper(options, output_dir)
    finally:
        os.chdir(cwd)
    return options, output_dir, results


def test_files(smoke):
    _, out, results = smoke
    for name in ("report.md", "results.json", "fig3.png", "fig6a.png", "fig6b.png", "fig6c.png", "table2/table2.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    for name in ("fig3", "fig6a", "fig6b", "fig6c"):
        with open(os.path.join(out, f"{name}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(os.path.join(out, "results.json")))["table3"] == json.loads(json.dumps(results["table3"]))


def test_table3(smoke):
    options, out, results = smoke
    t3 = results["table3"]
    assert set(t3["table"]) == set(paper.TABLE3_VARIANTS)
    for variant, row in t3["table"].items():
        assert {k for k in row if not k.endswith("_rel")} == {"auc", "gauc", "logloss"}
        assert ("auc_rel" in row) == (variant != "id")
        runs = t3["runs"][variant]
        assert sorted(runs) == [str(s) for s in options.seeds]
        mean = sum(r["gauc"] for r in runs.values()) / len(runs)
        assert row["gauc"][0] == pytest.approx(mean)
        for seed, r in runs.items():
            model_dir = os.path.join(out, "ctr", variant, f"seed{seed}")
            assert json.load(open(os.path.join(model_dir, "metrics.json")))["gauc"] == r["gauc"]
    rel = t3["table"]["simtier"]["gauc_rel"][0]
    expected = [(t3["runs"]["simtier"][s]["gauc"] - t3["runs"]["id"][s]["gauc"]) / t3["runs"]["id"][s]["gauc"]
                for s in t3["runs"]["id"]]
    assert rel == pytest.approx(sum(expected) / len(expected))
    # simtier_make reused make's MAKE pre-training (the same computation) instead of re-running it
    for seed in options.seeds:
        a = json.load(open(os.path.join(out, "ctr", "make", f"seed{seed}", "make", "metrics.json")))
        b = json.load(open(os.path.join(out, "ctr", "simtier_make", f"seed{seed}", "make", "metrics.json")))
        assert a == b
    markdown = open(os.path.join(out, "report.md")).read()
    for variant in paper.TABLE3_VARIANTS:
        assert f"| {variant} |" in markdown


def test_figures(smoke):
    options, out, results = smoke
    fig3 = results["fig3"]
    assert [p["epoch"] for p in fig3["id"]] == [p["epoch"] for p in fig3["make_only"]] == [1.0, 2.0]
    # Fig 3's id curve continues Table 3's seed-0 id run: its first epoch is that run
    assert fig3["id"][0]["gauc"] == results["table3"]["runs"]["id"][str(options.seeds[0])]["gauc"]
    assert [p["row"] for p in results["fig6a"]] == list(options.fig6a_rows)
    t2 = results["table2"]["synthetic_text"]["rows"]
    for p in results["fig6a"]:
        assert p["acc@1"] == t2[p["row"]]["acc@1"] and 0.0 < p["gauc"] < 1.0
    assert set(results["fig6b"]) <= set(paper.FREQ_SLICES) and "freq_1" in results["fig6b"]
    for b in results["fig6b"].values():
        assert set(b) == {"auc_rel", "logloss_rel", "num_examples"} and len(b["auc_rel"]) == 2
    assert [p["make_epochs"] for p in results["fig6c"]] == list(options.fig6c_epochs)
    assert not os.path.exists(os.path.join(out, "fig6c", "make_epochs0", "make"))  # 0 = joint, no pre-training
    assert os.path.exists(os.path.join(out, "fig6c", "make_epochs1", "make", "metrics.json"))
    assert results["findings"] and all(isinstance(f, str) for f in results["findings"])


def test_new_items(smoke):
    options, out, results = smoke
    new_items = results["new_items"]
    assert list(new_items) == list(options.new_item_slices) == ["new", "age_<1d"]
    rows = {(r["variant"], r["default_row"]): r for r in new_items["new"]}
    assert set(rows) == {(v, "on") for v in paper.TABLE3_VARIANTS} | {("id", "off")}
    assert rows[("id", "on")]["auc_rel"] is None  # the reference itself
    # the default-row-off id run: admission off, and its change against Table 3's id on the new items, per seed
    off = {s: json.load(open(os.path.join(out, "default_row_off", "id", f"seed{s}", "metrics.json")))
           for s in options.seeds}
    on = {s: json.load(open(os.path.join(out, "ctr", "id", f"seed{s}", "metrics.json"))) for s in options.seeds}
    config = json.load(open(os.path.join(out, "default_row_off", "id", f"seed{options.seeds[0]}", "config.json")))
    assert config["model"]["admit_after"] == 0
    new_off = [off[s]["slices"]["new"]["auc"] for s in options.seeds]
    new_on = [on[s]["slices"]["new"]["auc"] for s in options.seeds]
    assert rows[("id", "off")]["auc"][0] == pytest.approx(sum(new_off) / len(new_off))
    rel = [(a - b) / b for a, b in zip(new_off, new_on)]
    assert rows[("id", "off")]["auc_rel"][0] == pytest.approx(sum(rel) / len(rel))
    assert rows[("id", "on")]["num_examples"] == on[options.seeds[0]]["slices"]["new"]["num_examples"] > 0
    markdown = open(os.path.join(out, "report.md")).read()
    assert "## New items (paper section 6.4)" in markdown and "| id | off |" in markdown


def test_new_item_table_values():
    def run(new_auc, new_gauc, age_gauc=0.5, n=10, users=3):
        return {"slices": {"new": {"auc": new_auc, "gauc": new_gauc, "num_examples": n, "gauc_num_users": users},
                           "age_<1d": {"auc": 0.6, "gauc": age_gauc, "num_examples": 4}}}

    table3 = {"id": {0: run(0.50, 0.60), 1: run(0.60, 0.50, users=2)},
              "simtier": {0: run(0.55, 0.66), 1: run(0.66, float("nan"))}}
    off = {"id": {0: run(0.40, 0.30), 1: run(0.30, 0.25)}}
    out = paper.new_item_table(table3, off, ("new", "age_<1d", "absent"))
    assert list(out) == ["new", "age_<1d"]  # a slice no run reported is left out
    rows = {(r["variant"], r["default_row"]): r for r in out["new"]}
    assert rows[("simtier", "on")]["auc_rel"][0] == pytest.approx(0.10)  # +10% on both seeds
    assert rows[("simtier", "on")]["auc_rel"][1] == pytest.approx(0.0, abs=1e-12)
    assert rows[("simtier", "on")]["gauc"] is None  # undefined on one seed
    assert rows[("id", "off")]["auc"] == pytest.approx((0.35, 0.0707106781))
    assert rows[("id", "off")]["gauc_rel"][0] == pytest.approx(((0.3 - 0.6) / 0.6 + (0.25 - 0.5) / 0.5) / 2)
    assert rows[("id", "on")]["gauc_rel"] is None and rows[("id", "on")]["num_examples"] == 10
    assert rows[("id", "on")]["gauc_users"] == 2 and rows[("id", "off")]["gauc_users"] == 3
    assert out["age_<1d"][0]["gauc_users"] is None  # slices of older runs: no user count
    markdown = "\n".join(paper.new_items_markdown(out))
    assert "### `new` (10 test examples)" in markdown and "| simtier | on | 0.6050 ± 0.0778 | — | 3 |" in markdown
    assert paper.new_items_markdown({}) == []
    findings = paper.new_item_findings(out)
    assert findings[0].startswith("New items (`new`, 10 test examples): AUC vs id simtier +10.00% ± 0.00%")
    assert findings[1].endswith("AUC -35.00% ± 21.21% — the default row helps")
    assert paper.new_item_findings({}) == []


def test_multi_epoch_id_rows_and_the_best_id_row():
    def row(gauc, rel=None):
        r = {"auc": (0.6, 0.01), "gauc": (gauc, 0.01), "logloss": (0.2, 0.001)}
        return r if rel is None else dict(r, auc_rel=(0.0, 0.01), gauc_rel=(rel, 0.02))

    table = {"id": row(0.64), "make": row(0.672, 0.05), "simtier": row(0.608, -0.05)}
    falls = {"table": table, "id_epochs": {"4": row(0.60, -0.0625), "2": row(0.62, -0.031)}}
    findings = paper.id_epochs_findings(falls)
    assert findings[:3] == ["Table 3: id trained 2 epochs: GAUC vs one epoch -3.10% ± 2.00%",
                            "Table 3: id trained 4 epochs: GAUC vs one epoch -6.25% ± 2.00%",
                            "Table 3: the best id row is 1 epoch (GAUC 0.6400)"]
    assert findings[3] == "Table 3: simtier GAUC vs the best id row -5.00% — NOT better than the best id row"
    assert findings[4].startswith("Table 3: make GAUC vs the best id row +5.00% — better, so its gain is not just")
    rises = {"table": table, "id_epochs": {"2": row(0.68, 0.0625)}}
    assert "the best id row is 2 epochs (GAUC 0.6800)" in paper.id_epochs_findings(rises)[1]
    assert paper.id_epochs_findings(rises)[-1].startswith("Table 3: make GAUC vs the best id row -1.18% — NOT")
    assert paper.id_epochs_findings({"table": table}) == []
    lines = paper.table3_markdown({"table3": falls}).splitlines()
    assert lines[-2:] == ["| id, 2 epochs | 0.6000 ± 0.0100 | 0.6200 ± 0.0100 | 0.2000 ± 0.0010 | +0.00% ± 1.00% | "
                          "-3.10% ± 2.00% |",
                          "| id, 4 epochs | 0.6000 ± 0.0100 | 0.6000 ± 0.0100 | 0.2000 ± 0.0010 | +0.00% ± 1.00% | "
                          "-6.25% ± 2.00% |"]
    with pytest.raises(ValueError, match="id_epochs entries are epochs >= 2"):
        paper.PaperConfig.from_values({"id_epochs": "1,2"})


def test_bad_options():
    with pytest.raises(ValueError, match="variants must include 'id'"):
        paper.PaperConfig.from_values({"variants": "simtier"})
    with pytest.raises(ValueError, match="not a Table 2 row"):
        paper.PaperConfig.from_values({"fig6a_rows": "scl,bogus"})
    with pytest.raises(ValueError, match="ctr_overrides entries are name=value"):
        paper.PaperConfig.from_values({"ctr_overrides": "batch_size"})
    with pytest.raises(ValueError, match="default_row_off_variants must be variants"):
        paper.PaperConfig.from_values({"variants": "id,simtier", "default_row_off_variants": "make"})
    with pytest.raises(ValueError, match=r"Unknown paper report options: \['epochs'\]"):
        paper.PaperConfig.from_values({"epochs": "3"})



def test_quick_profile_skips_figures_that_cost_extra_training(smoke, repo_root, tmp_path):
    quick = paper.PaperConfig.from_values(
        paper.config_lib.read_flagfile(os.path.join(repo_root, "configs", "paper", "quick.flags")))
    assert (quick.fig3_epochs, quick.fig6a_rows, quick.fig6c_epochs) == (0, (), ())
    assert len(quick.seeds) >= 3 and set(quick.variants) == set(paper.TABLE3_VARIANTS)
    with pytest.raises(ValueError, match="fig3_epochs must be >= 0"):
        paper.PaperConfig.from_values({"fig3_epochs": "-1"})
    # the smoke report's results without the three figures: no heading, no plot, and a line saying so
    _, _, results = smoke
    skipped = dict(results, fig3={}, fig6a=[], fig6c=[])
    plots = paper.plot_all(skipped, str(tmp_path))
    assert sorted(plots) == ["fig6b"] and sorted(os.listdir(tmp_path)) == ["fig6b.png"]
    markdown = paper.to_markdown(dict(skipped, plots=plots), str(tmp_path))
    for heading in ("## Fig 3", "## Fig 6a", "## Fig 6c"):
        assert heading not in markdown
    assert "## Fig 6b" in markdown and "![fig6b](fig6b.png)" in markdown
    assert "Not run in this profile: Fig 3, Fig 6a, Fig 6c" in markdown


def test_table3_by_modality_runs_image_and_image_plus_text(tmp_path, repo_root):
    """`modality_variants`: the variant on image vectors and on image + text in one model, against Table 3's id."""
    options = paper.PaperConfig.from_values(paper.config_lib.read_flagfile(
        os.path.join(repo_root, "configs", "paper", "smoke_modalities.flags")))
    cwd = os.getcwd()
    os.chdir(repo_root)
    try:
        results = paper.run_paper(options, str(tmp_path))
    finally:
        os.chdir(cwd)
    rows = results["modalities"]["rows"]["simtier"]
    assert list(rows) == ["text", "image", "image+text"]
    assert rows["text"] == results["table3"]["table"]["simtier"]
    both = json.load(open(tmp_path / "modalities" / "image_text" / "simtier" / "seed0" / "metrics.json"))
    assert rows["image+text"]["gauc"][0] == both["gauc"] and set(both["vector_join"]) == {"image", "text"}
    spec = json.load(open(tmp_path / "modalities" / "image_text" / "simtier" / "seed0" / "feature_spec.json"))
    dims = {f["modality"]: f["shape"][-1] for f in spec["features"] if f.get("modality")}
    assert dims["image"] == 32  # configs/scl/smoke_image.flags: --output_dim=32
    assert set(dims) == {"image", "text"}
    id_gauc = results["table3"]["runs"]["id"]["0"]["gauc"]
    assert rows["image"]["gauc_rel"][0] == pytest.approx(
        (results["modalities"]["runs"]["image"]["simtier"]["0"]["gauc"] - id_gauc) / id_gauc)
    markdown = open(tmp_path / "report.md").read()
    assert "## Table 3 by modality" in markdown and "| simtier | image+text |" in markdown
    assert any(f.startswith("Modalities: simtier on image + text") for f in results["findings"])
    assert results["modalities"]["fusion_choice"]["chosen"] is None  # one fusion: nothing to choose
    with pytest.raises(ValueError, match="modality_variants must be multimodal variants"):
        paper.PaperConfig.from_values({"modality_variants": "id"}).validate()
    with pytest.raises(ValueError, match="make_fusions must be one or more of"):
        paper.PaperConfig.from_values({"make_fusions": "sum"}).validate()


def _fusion_runs(valid_gauc, split="valid"):
    """`{variant: {seed: metrics}}` of one fusion's image + text runs, with `valid_gauc[variant][seed]` as the
    validation GAUC early stopping recorded (and a test GAUC that would choose the other way)."""
    return {v: {s: {"gauc": 1.0 - g, "early_stopping": {"split": split, "metric": "gauc", "best_value": g}}
                for s, g in enumerate(by_seed)} for v, by_seed in valid_gauc.items()}


def test_make_fusion_is_chosen_on_validation_gauc_of_the_make_variants():
    concat = _fusion_runs({"make": [0.70, 0.72], "simtier_make": [0.71, 0.73], "simtier": [0.99, 0.99]})
    separate = _fusion_runs({"make": [0.71, 0.73], "simtier_make": [0.72, 0.74]})
    choice = paper.choose_make_fusion({"concat": concat, "separate": separate})
    assert choice["chosen"] == "separate"  # simtier is not a MAKE variant: its 0.99 does not count
    assert choice["valid"] == pytest.approx({"concat": 0.715, "separate": 0.725})
    assert "separate has the best mean validation GAUC" in choice["reason"] and "concat 0.7150" in choice["reason"]
    tie = paper.choose_make_fusion({"separate": concat, "concat": concat})
    assert tie["chosen"] == "separate"  # ties go to the first fusion listed
    # without a validation score (no valid split, or early stopping off) nothing is chosen: test never decides
    on_test = paper.choose_make_fusion({"concat": concat, "separate": _fusion_runs({"make": [0.9]}, split="eval")})
    assert on_test["chosen"] is None and "separate/make/seed0" in on_test["reason"]
    no_stop = paper.choose_make_fusion({"concat": concat, "separate": {"make": {0: {"gauc": 0.9}}}})
    assert no_stop["chosen"] is None and "valid split" in no_stop["reason"]
    single = paper.choose_make_fusion({"concat": concat})
    assert single["chosen"] is None and "one fusion" in single["reason"]
    md = paper.modalities_markdown({"rows": {}, "image_row": "scl", "fusion_choice": choice},
                                   {"options": {"seeds": [0, 1]}})
    assert any("chosen on validation: **separate**" in line for line in md)
    assert paper.modality_findings({"rows": {}, "fusion_choice": choice}) == [
        "Modalities: MAKE fusion chosen on validation: " + choice["reason"]]


@pytest.mark.large
def test_make_fusion_choice_from_real_runs_on_a_world_with_a_valid_split(tmp_path, repo_root):
    """End to end (~1 min): both fusions trained on the smoke world with a valid day; every run stopped on valid,
    and the report's choice is the better mean validation GAUC of the runs it read."""
    values = paper.config_lib.read_flagfile(os.path.join(repo_root, "configs", "paper", "smoke_modalities.flags"))
    values.update(world_flagfile="configs/data/smoke_valid.flags", variants="id,make", modality_variants="make",
                  make_fusions="concat,separate", make_epochs="1",
                  ctr_overrides="embedding_dim=4,batch_size=128,eval_batch_size=512,checkpoint_every=50,"
                                "early_stopping_patience=1")
    cwd = os.getcwd()
    os.chdir(repo_root)
    try:
        results = paper.run_paper(paper.PaperConfig.from_values(values), str(tmp_path))
    finally:
        os.chdir(cwd)
    choice = results["modalities"]["fusion_choice"]
    valid = {}
    for fusion, folder in (("concat", "image_text"), ("separate", "image_text_separate_MAKE")):
        m = json.load(open(tmp_path / "modalities" / folder / "make" / "seed0" / "metrics.json"))
        assert m["early_stopping"]["split"] == "valid"
        valid[fusion] = m["early_stopping"]["best_value"]
    assert choice["valid"] == pytest.approx(valid)
    assert choice["chosen"] == max(valid, key=valid.get)
    assert f"chosen on validation: **{choice['chosen']}**" in open(tmp_path / "report.md").read()
