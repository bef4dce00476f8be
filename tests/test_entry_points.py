"""Every entry point answers --helpfull with its own flags (absl prints the help and exits 1)."""

import os
import subprocess
import sys

import pytest

ENTRY_POINTS = {
    "mm_ads.data.synthetic": "--num_items",
    "mm_ads.data.prepare": ("--format", "--catalogue", "--class_depth", "--on_unmatched"),
    "mm_ads.train": ("--variant", "--make_epochs", "--[no]make_trainable", "--make_learning_rate", "--make_units",
                     "--image_tower_size"),
    "mm_ads.export": ("--export_base", "--warmup_batch_sizes"),
    "mm_ads.encode": "--register",
    "mm_ads.serving.server": ("--model_base_path", "--index_table", "--max_candidates"),
    "mm_ads.reports.table2": ("--pair_benchmarks", "--seeds", "--catalogue_per_class", "--clip_pretrained_flagfile"),
    "mm_ads.reports.paper": "--fig6c_epochs",
    "mm_ads.serving.index.encoder_service": ("--max_wait_ms", "--index_table"),
    "tools.bench.scl_step": "--modalities",
    "tools.bench.input_pipeline": "--num_vectors",
    "tools.bench.ctr_step": "--big_rows",
    "tools.bench.serving": ("--candidates", "--rest_predict"),
    "tools.bench.serving_load": ("--kills", "--settle_s"),
    "tools.bench.index_table": "--get_sizes",
    "tools.bench.encoder_lag": "--max_wait_ms",
    "mm_ads.serving.nearline": ("--stream", "--export_every_events", "--variant", "--init_model_dir"),
    "mm_ads.serving.nearline.replay": "--rate",
    "mm_ads.serving.index.load_index_table": ("--index_table", "--vectors"),
    "tools.bench.nearline": "--flagfile_ctr",
    "tools.online_demo": ("--new_item_rates", "--encoder_export", "--hot_swap_timeout_s"),
    "tools.bench.freshness": ("--rates", "--phase_s"),
}


@pytest.fixture(scope="module")
def helpfull(repo_root):
    """`{module: CompletedProcess}` of `python -m <module> --helpfull` for every entry point, two at a time (each
    start imports TensorFlow, ~4 s of one core: two in flight halve the wall time on the CI's two cores)."""
    from concurrent.futures import ThreadPoolExecutor

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo_root)

    def call(module):
        return subprocess.run([sys.executable, "-m", module, "--helpfull"], cwd=repo_root, env=env,
                              capture_output=True, text=True, timeout=240)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(sorted(ENTRY_POINTS), pool.map(call, sorted(ENTRY_POINTS))))


@pytest.mark.parametrize("module,flags", sorted(ENTRY_POINTS.items()))
def test_helpfull(module, flags, helpfull):
    proc = helpfull[module]
    for flag in (flags,) if isinstance(flags, str) else flags:
        assert flag in proc.stdout, (flag, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
