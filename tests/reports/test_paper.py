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


def test_bad_options():
    with pytest.raises(ValueError, match="variants must include 'id'"):
        paper.PaperConfig.from_values({"variants": "simtier"})
    with pytest.raises(ValueError, match="not a Table 2 row"):
        paper.PaperConfig.from_values({"fig6a_rows": "scl,bogus"})
    with pytest.raises(ValueError, match="ctr_overrides entries are name=value"):
        paper.PaperConfig.from_values({"ctr_overrides": "batch_size"})
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
