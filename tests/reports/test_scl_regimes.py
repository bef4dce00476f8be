"""The SCL regime study tool: settings parsing, the carved validation split, the order summary, and one tiny
end-to-end study whose runs are reused by a second invocation."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mm_ads.data.dataset import Manifest
from tests.scl.tiny_data import write_tiny_text_pairs
from tools.experiments import scl_regimes


def test_parse_settings():
    assert scl_regimes.parse_settings("a:x=1,y=2; b:") == {"a": {"x": "1", "y": "2"}, "b": {}}
    for bad in ("x=1", "a:x=1;a:y=2", ":x=1"):
        with pytest.raises(ValueError, match="name:flag=value"):
            scl_regimes.parse_settings(bad)


def _read(data_dir, split):
    m = Manifest.load(data_dir)
    return pa.concat_tables([pq.read_table(p) for p in m.files("pretrain/text_pairs", split)])


def test_valid_split_is_carved_from_the_end_of_train(tmp_path):
    src = str(tmp_path / "src")
    write_tiny_text_pairs(src)
    out = scl_regimes.with_valid_split(src, str(tmp_path / "study"), "text", 10)
    train, valid, test = (_read(out, s) for s in ("train", "valid", "test"))
    original = _read(src, "train")
    assert (train.num_rows, valid.num_rows) == (38, 10)
    assert pa.concat_tables([train, valid]).equals(original)
    assert test.equals(_read(src, "test"))
    assert scl_regimes.with_valid_split(src, str(tmp_path / "study"), "text", 10) == out  # written once
    assert scl_regimes.with_valid_split(out, str(tmp_path / "other"), "text", 10) == out  # it has valid already
    assert not os.path.exists(tmp_path / "other")
    with pytest.raises(ValueError, match="train has 48 rows"):
        scl_regimes.with_valid_split(src, str(tmp_path / "too_many"), "text", 48)
    assert not os.path.exists(tmp_path / "too_many" / "data")


def test_order_summary_counts_the_seeds_in_the_paper_order():
    acc = {"scl": [0.5, 0.4, 0.6], "scl_no_triplet": [0.4, 0.45, 0.5], "scl_no_triplet_no_queue": [0.3, 0.3, 0.6]}
    methods = {m: {"runs": {str(s): {"acc@1": v} for s, v in enumerate(vals)}} for m, vals in acc.items()}
    out = scl_regimes.order_summary(methods, [0, 1, 2])
    assert out["order_holds_on_seeds"] == 1  # seed 1: scl < no_triplet; seed 2: no_triplet < no_queue
    mean, std = out["differences"]["scl - scl_no_triplet"]
    assert mean == pytest.approx(np.mean([0.1, -0.05, 0.1])) and std == pytest.approx(np.std([0.1, -0.05, 0.1],
                                                                                              ddof=1))
    assert "order_holds_on_seeds" not in scl_regimes.order_summary({"scl": methods["scl"]}, [0, 1, 2])


def test_a_tiny_study_runs_every_method_and_reuses_finished_runs(tmp_path):
    src = str(tmp_path / "src")
    write_tiny_text_pairs(src)
    flagfile = tmp_path / "tiny.flags"
    flagfile.write_text("--task=scl\n--modality=text\n--output_dim=8\n--projection_hidden=16\n--text_width=8\n"
                        "--text_layers=1\n--text_heads=2\n--max_tokens=8\n--num_oov_buckets=4\n--queue_size=13\n"
                        "--batch_size=8\n--eval_batch_size=16\n--shuffle_buffer=0\n")
    data = scl_regimes.with_valid_split(src, str(tmp_path / "study"), "text", 16)
    args = (data, str(flagfile), {"small": {"max_train_pairs": "16"}}, list(scl_regimes.ORDER), [0], 2, "valid",
            str(tmp_path / "study"))
    first = scl_regimes.run_study(*args)
    runs = first["settings"]["small"]["methods"]
    assert set(runs) == set(scl_regimes.ORDER)
    for method, entry in runs.items():
        run = entry["runs"]["0"]
        assert 0.0 <= run["acc@1"] <= run["acc@5"] <= 1.0 and run["wall_s"] > 0
        saved = os.path.join(str(tmp_path / "study"), "runs", "small", method, "seed0", "config.json")
        with open(saved) as f:  # the run holds its method's ablation flags and the setting
            text = f.read()
        assert '"max_train_pairs": 16' in text and ('"use_queue": false' in text) == (method.endswith("no_queue"))
    second = scl_regimes.run_study(*args)
    assert second["settings"]["small"]["methods"]["scl"]["runs"] == runs["scl"]["runs"]  # reused, not retrained
    holds = second["settings"]["small"]["order_holds_on_seeds"]
    assert "| small | max_train_pairs=16 | scl - scl_no_triplet: " in scl_regimes.to_markdown(second)
    assert f"| {holds}/1 |" in scl_regimes.to_markdown(second)
    # a setting's flags win over its method's: in-batch negatives with the triplet, under `scl`
    inb = scl_regimes.run_study(data, str(flagfile), {"inb": {"max_train_pairs": "16", "use_queue": "false"}},
                                ["scl"], [0], 2, "valid", str(tmp_path / "study"))
    assert "order_holds_on_seeds" not in inb["settings"]["inb"]
    two = scl_regimes.run_study(data, str(flagfile), {"small": {"max_train_pairs": "16"},
                                                      "inb": {"max_train_pairs": "16", "use_queue": "false"}},
                                ["scl"], [0], 2, "valid", str(tmp_path / "study"))  # both reused
    diff = two["settings"]["inb"]["methods"]["scl"]["runs"]["0"]["acc@1"] - runs["scl"]["runs"]["0"]["acc@1"]
    assert two["settings"]["inb"]["vs_first_setting"] == {"scl": (pytest.approx(diff), 0.0)}
    assert "vs_first_setting" not in two["settings"]["small"]
    assert f"scl: {diff:+.3f} ± 0.000 |" in scl_regimes.to_markdown(two)
    with open(os.path.join(str(tmp_path / "study"), "runs", "inb", "scl", "seed0", "config.json")) as f:
        text = f.read()
    assert '"use_queue": false' in text and '"use_triplet": true' in text
