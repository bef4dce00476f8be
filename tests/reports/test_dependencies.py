"""The report commands check their optional dependencies before any work, write their results before the plots,
fail when no row ran, and label wall times honestly on a re-run that reuses finished runs."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from mm_ads.reports import options as options_lib
from mm_ads.reports import paper, table2


def _run_without(module, entry, flags, repo_root, tmp_path):
    """Runs `python -m mm_ads.reports.<entry>` with `module` unimportable (sys.modules[module] = None)."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from absl import app\n"
            f"from mm_ads.reports import {entry} as m\n"
            "m.define_flags()\n"
            f"app.run(m.main, argv=['{entry}'] + {flags!r})\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo_root)
    return subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=120)


def test_paper_without_matplotlib_stops_before_any_work(repo_root, tmp_path):
    out = tmp_path / "out"
    proc = _run_without("matplotlib", "paper", ["--flagfile=configs/paper/smoke.flags", f"--output_dir={out}"],
                        repo_root, tmp_path)
    assert proc.returncode != 0
    assert "matplotlib (for the plots)" in proc.stderr and 'pip install -e ".[reports]"' in proc.stderr, proc.stderr
    assert not out.exists()


def test_table2_without_keras_hub_stops_before_any_work(repo_root, tmp_path):
    out = tmp_path / "out"
    proc = _run_without("keras_hub", "table2", ["--flagfile=configs/reports/table2_smoke.flags",
                                                f"--output_dir={out}"], repo_root, tmp_path)
    assert proc.returncode != 0
    assert "keras_hub (for MiniLM" in proc.stderr and options_lib.ENCODERS_INSTALL in proc.stderr, proc.stderr
    assert "--rows=untrained" in proc.stderr  # how to do without
    assert not out.exists()


def test_required_modules_follow_the_chosen_rows(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)  # profiles name flagfiles relative to the repository
    no_minilm = table2.Table2Config(benchmarks=("synthetic_text", "synthetic_image"), rows=("untrained", "scl"))
    assert table2.required_modules(no_minilm) == ()
    zero_shot = table2.Table2Config(benchmarks=("synthetic_text",), rows=("minilm_zero_shot",))
    assert table2.required_modules(zero_shot) == options_lib.MINILM_MODULES
    pairs = table2.Table2Config(benchmarks=("pairs",), rows=("scl",))  # fine-tunes MiniLM (product_pairs.flags)
    assert table2.required_modules(pairs) == options_lib.MINILM_MODULES
    demo = paper.PaperConfig.from_values(paper.config_lib.read_flagfile("configs/paper/demo.flags"))
    assert paper.required_modules(demo) == ("matplotlib",)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow_text" else
                        real(name, *a))
    with pytest.raises(options_lib.MissingDependencyError, match="tensorflow_text") as e:
        table2.check_dependencies(zero_shot)
    assert str(e.value).count(options_lib.ENCODERS_INSTALL) == 1
    table2.check_dependencies(no_minilm)  # nothing missing for these rows


def test_no_row_applies_to_the_benchmarks():
    with pytest.raises(ValueError, match=r"none of the rows \['clip_e'\] applies to the benchmarks \['clothing'\]"):
        table2.Table2Config.from_values({"rows": "clip_e", "benchmarks": "clothing"})


def test_table2_where_every_row_was_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(table2, "minilm_available", lambda: (False, "MiniLM is not here"))
    options = table2.Table2Config(benchmarks=("synthetic_text",), rows=("minilm_zero_shot",),
                                  world_dir=str(tmp_path / "world"))
    with pytest.raises(table2.NothingRanError, match="synthetic_text / minilm_zero_shot: MiniLM is not here"):
        table2.run_table2(options, str(tmp_path / "out"))
    saved = json.load(open(tmp_path / "out" / "table2.json"))  # the reasons are on disk
    assert saved["benchmarks"]["synthetic_text"]["rows"] == {"minilm_zero_shot": {"skipped": "MiniLM is not here"}}


def test_table2_rerun_labels_reused_wall_time(tmp_path, monkeypatch, repo_root):
    from mm_ads import runs
    from mm_ads.utils.io import write_json

    monkeypatch.chdir(repo_root)
    trained = []

    def fake_run(config):  # a finished run that took 10 minutes
        trained.append(config.model_dir)
        metrics = {"acc@1": 0.5, "acc@5": 0.75, "acc@10": 0.875, "num_queries": 8, "num_candidates": 8,
                   "wall_s": 600.0}
        os.makedirs(config.model_dir, exist_ok=True)
        write_json(os.path.join(config.model_dir, "config.json"), config.to_json())
        write_json(os.path.join(config.model_dir, "metrics.json"), metrics)
        return metrics

    monkeypatch.setattr(runs, "run", fake_run)
    options = table2.Table2Config(benchmarks=("synthetic_text",), rows=("scl",), world_dir=str(tmp_path / "world"))
    out = str(tmp_path / "out")
    first = table2.run_table2(options, out)
    row = first["benchmarks"]["synthetic_text"]["rows"]["scl"]
    assert len(trained) == 1 and "reused_wall_s" not in row and row["wall_s"] < 60
    assert first["reused_runs"] == 0 and first["reused_wall_s"] == 0
    second = table2.run_table2(options, out)
    assert len(trained) == 1  # reused, not trained again
    row = second["benchmarks"]["synthetic_text"]["rows"]["scl"]
    assert row["reused_wall_s"] == 600.0 and row["wall_s"] < 60
    assert second["reused_runs"] == 1 and second["reused_wall_s"] == 600.0 and second["wall_s"] < 60
    markdown = open(os.path.join(out, "table2.md")).read()
    assert "(reused run: 600) |" in markdown
    assert "Wall time of this invocation: 0.0 min. It reused 1 finished run, which took 10.0 min when it ran." \
        in markdown


def _canned_paper(monkeypatch, tmp_path):
    """A PaperRunner whose steps return fixed results (no training)."""
    id_run = {"auc": 0.7, "gauc": 0.6, "logloss": 0.5}
    monkeypatch.setattr(paper.PaperRunner, "make_world", lambda self: str(tmp_path / "world"))
    monkeypatch.setattr(paper.PaperRunner, "run_table3", lambda self: (
        {"runs": {"id": {"0": id_run}}, "table": {"id": {k: (v, 0.0) for k, v in id_run.items()}}},
        {"id": {0: id_run}}))
    monkeypatch.setattr(paper.PaperRunner, "run_popularity", lambda self, runs: None)  # needs a real world
    monkeypatch.setattr(paper.PaperRunner, "run_fig3", lambda self, runs: {
        "id": [{"epoch": 1.0, "gauc": 0.6, "auc": 0.7}], "make_only": [{"epoch": 1.0, "gauc": 0.55, "auc": 0.65}]})
    monkeypatch.setattr(paper.PaperRunner, "run_fig6c", lambda self, runs: [{"make_epochs": 0, "gauc": 0.6,
                                                                           "auc": 0.7}])
    monkeypatch.setattr(paper.PaperRunner, "_describe_data", lambda self: {
        "data_dir": str(tmp_path / "world"), "train_impressions": 10, "test_impressions": 5, "generator": None,
        "text_pairs_train": 0, "vector_table": "given"})
    return paper.PaperConfig(vector_table="given", variants=("id",), seeds=(0,))


def test_paper_results_are_written_before_the_plots(tmp_path, monkeypatch):
    options = _canned_paper(monkeypatch, tmp_path)

    def broken_plots(results, out_dir):
        raise RuntimeError("no display")

    monkeypatch.setattr(paper, "plot_all", broken_plots)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="no display"):
        paper.run_paper(options, str(out))
    saved = json.load(open(out / "results.json"))
    assert saved["table3"]["table"]["id"]["gauc"] == [0.6, 0.0] and saved["plots"] == {}
    report = open(out / "report.md").read()
    assert "| id | 0.7000 ± 0.0000 | 0.6000 ± 0.0000 |" in report
    assert "![fig" not in report  # no link to a plot that was not drawn


def test_paper_report_labels_reused_wall_time(tmp_path, monkeypatch):
    options = _canned_paper(monkeypatch, tmp_path)
    monkeypatch.setattr(paper, "plot_all", lambda results, out_dir: {"fig3": "fig3.png"})

    def table3(self):  # one run finished before this invocation, one trained by it
        self.reused["ctr/id/seed0"] = 1200.0
        self.trained.add("ctr/id/seed1")
        id_run = {"auc": 0.7, "gauc": 0.6, "logloss": 0.5}
        return {"runs": {}, "table": {"id": {k: (v, 0.0) for k, v in id_run.items()}}}, {"id": {0: id_run}}

    monkeypatch.setattr(paper.PaperRunner, "run_table3", table3)
    results = paper.run_paper(options, str(tmp_path / "out"))
    assert results["reused"] == {"runs": 1, "wall_s": 1200.0} and results["wall_s"]["total"] < 60
    report = open(tmp_path / "out" / "report.md").read()
    assert "Wall time of this invocation: 0.0 min. It reused 1 finished run, which took 20.0 min when it ran." \
        in report
    assert "![fig3](fig3.png)" in report and "![fig6c]" not in report
