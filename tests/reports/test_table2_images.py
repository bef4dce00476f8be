"""Table 2's image rows: the photo → catalogue benchmark cut from a photo collection, the EfficientNet-Lite0 rows
(zero-shot and SCL fine-tuned from it) and several seeds reported as mean ± std. A tiny generated photo tree and
tiny runs; the rows that need the EfficientNet-Lite0 weights skip without them."""

import json
import os

import numpy as np
import pytest

from mm_ads.data.readers import image_folder
from mm_ads.reports import options as options_lib
from mm_ads.reports import table2
from mm_ads.scl import pretrained_image_tower as pit
from tests.data.test_prepare_image_folder import _photo, _write_tree

CLASSES = ("coat", "hat", "shoe")
SPLITS = {"train": 8, "validation": 2, "test": 2}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    files = {f"{split}/{cls}/{cls}{i}.png": _photo(100 * k + 10 * j + i, "PNG")
             for k, cls in enumerate(CLASSES) for j, (split, n) in enumerate(SPLITS.items()) for i in range(n)}
    return str(_write_tree(tmp_path_factory.mktemp("photos") / "clothes", files))


def test_split_shop_takes_the_first_train_photos_of_each_class(photos, tmp_path):
    shop = image_folder.split_shop(photos, str(tmp_path / "shop"), 2)
    catalogue = sorted(os.path.relpath(os.path.join(d, f), os.path.join(shop, "catalogue"))
                       for d, _, fs in os.walk(os.path.join(shop, "catalogue")) for f in fs)
    assert catalogue == [f"{c}/{c}{i}.png" for c in CLASSES for i in range(2)]
    users = [os.path.relpath(os.path.join(d, f), os.path.join(shop, "photos"))
             for d, _, fs in os.walk(os.path.join(shop, "photos")) for f in fs]
    assert len(users) == len(CLASSES) * (sum(SPLITS.values()) - 2) and "train/coat/coat2.png" in users
    assert not {"train/coat/coat0.png", "train/coat/coat1.png"} & set(users) and "test/coat/coat0.png" in users
    assert not os.path.exists(str(tmp_path / "shop") + ".tmp")


def test_split_shop_refuses_a_tree_without_train_class_folders(tmp_path):
    flat = str(_write_tree(tmp_path / "flat", {"a.png": _photo(1, "PNG")}))
    with pytest.raises(ValueError, match=r"flat: a.png is not <split>/<class>/<file>"):
        image_folder.split_shop(flat, str(tmp_path / "shop"), 2)
    no_train = str(_write_tree(tmp_path / "nt", {"test/a/x.png": _photo(1, "PNG")}))
    with pytest.raises(ValueError, match="no train/<class>/ photos"):
        image_folder.split_shop(no_train, str(tmp_path / "shop2"), 2)
    assert not os.path.exists(tmp_path / "shop") and not os.path.exists(tmp_path / "shop2")


def test_pretrained_rows_need_the_weights_package(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)  # the profiles name flagfiles relative to the repository
    with_effnet = table2.Table2Config(benchmarks=("catalogue",), rows=("effnet_zero_shot",),
                                      catalogue_pretrained_flagfile="configs/scl/catalogue_effnet.flags")
    assert table2.required_modules(with_effnet) == options_lib.EFFNET_MODULES
    # no pretrained flagfile for the benchmark: the row does not apply, nothing is needed
    no_flagfile = table2.Table2Config(benchmarks=("catalogue",), rows=("effnet_zero_shot", "scl"))
    assert table2.required_modules(no_flagfile) == ()
    images = table2.Table2Config.from_values(table2.read_profile("configs/reports/table2_images.flags"))
    assert table2.required_modules(images) == options_lib.EFFNET_MODULES
    with_clip = table2.Table2Config.from_values({**table2.read_profile("configs/reports/table2_images.flags"),
                                                 "rows": "clip_e_pretrained"})  # MiniLM's side of CLIP-E
    assert set(table2.required_modules(with_clip)) == set(options_lib.MINILM_MODULES + options_lib.EFFNET_MODULES)
    assert images.seeds == (0, 1, 2)
    with pytest.raises(ValueError, match="seeds must be distinct"):
        table2.Table2Config(seeds=(1, 1)).validate()


def test_aggregate_seeds_is_mean_and_sample_std():
    def one(a1, a5, wall, skipped=False):
        row = {"skipped": "no"} if skipped else {"acc@1": a1, "acc@5": a5, "num_queries": 10, "wall_s": wall}
        return {"benchmarks": {"b": {"modality": "image", "rows": {"scl": row}}}, "wall_s": wall}

    out = table2.aggregate_seeds({0: one(0.2, 0.5, 3.0), 1: one(0.4, 0.7, 5.0), 2: one(0, 0, 0, skipped=True)},
                                 table2.Table2Config())
    row = out["benchmarks"]["b"]["rows"]["scl"]
    assert row["acc@1"] == pytest.approx(0.3) and row["acc@1_std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert row["num_seeds"] == 2 and row["wall_s"] == 8.0 and set(row["seeds"]) == {"0", "1", "2"}
    assert "0.3000 ± 0.1414" in table2.to_markdown(out)


@pytest.fixture(scope="module")
def catalogue_run(photos, tmp_path_factory, repo_root):
    if not pit.default_pretrained_path():
        pytest.skip("the EfficientNet-Lite0 weights are not installed (make setup)")
    tmp = tmp_path_factory.mktemp("t2img")
    effnet = tmp / "catalogue_effnet.flags"  # the smoke catalogue run, starting from EfficientNet-Lite0 at 32 px
    effnet.write_text("--flagfile=configs/scl/smoke_catalogue.flags\n--image_encoder=efficientnet_lite0\n"
                      "--output_dim=0\n--image_tower_size=32\n--dense_learning_rate=0.0001\n")
    options = table2.Table2Config(
        benchmarks=("catalogue",), images_path=photos, catalogue_flagfile="configs/scl/smoke_catalogue.flags",
        catalogue_pretrained_flagfile=str(effnet), catalogue_per_class=2,
        rows=("untrained", "effnet_zero_shot", "scl", "scl_effnet"), max_steps=2, seeds=(0, 1))
    cwd = os.getcwd()
    os.chdir(repo_root)  # flagfiles are relative to the repository
    try:
        results = table2.run_table2(options, str(tmp / "out"))
    finally:
        os.chdir(cwd)
    return str(tmp / "out"), results, str(effnet)


def test_catalogue_rows_over_two_seeds(catalogue_run):
    out, results, _ = catalogue_run
    assert json.load(open(os.path.join(out, "table2.json"))) == json.loads(json.dumps(results))
    rows = results["benchmarks"]["catalogue"]["rows"]
    assert set(rows) == {"untrained", "effnet_zero_shot", "scl", "scl_effnet"} and results["seeds"] == [0, 1]
    for name, row in rows.items():
        per_seed = [row["seeds"][s]["acc@1"] for s in ("0", "1")]
        assert row["acc@1"] == pytest.approx(np.mean(per_seed)), name
        assert row["acc@1_std"] == pytest.approx(np.std(per_seed, ddof=1)), name
        assert row["num_candidates"] == len(CLASSES) * 2 and row["num_queries"] == len(CLASSES) * SPLITS["test"]
        assert "valid" in row and row["valid"]["num_queries"] == len(CLASSES) * SPLITS["validation"]
    assert rows["effnet_zero_shot"]["acc@1_std"] == 0.0  # no training: the same tower whatever the seed
    for seed in (0, 1):  # every seed's runs are their own model dirs; the data are shared
        assert os.path.exists(os.path.join(out, f"seed{seed}", "runs", "catalogue", "scl_effnet", "metrics.json"))
    assert sorted(os.listdir(os.path.join(out, "data"))) == ["clothing_catalogue2", "clothing_shop2"]
    md = open(os.path.join(out, "table2.md")).read()
    assert "mean ± std over seeds [0, 1]" in md and "| SCL (tower from scratch) |" in md
    assert "| SCL fine-tuned from EfficientNet-Lite0 |" in md


def test_zero_shot_row_is_the_untrained_pretrained_tower(catalogue_run, repo_root):
    from tools.experiments.image_tower_size import evaluate_sizes

    out, results, effnet = catalogue_run
    cwd = os.getcwd()
    os.chdir(repo_root)
    try:
        direct = evaluate_sizes(os.path.join(out, "data", "clothing_catalogue2"), effnet, [32], "test")[32]
    finally:
        os.chdir(cwd)
    row = results["benchmarks"]["catalogue"]["rows"]["effnet_zero_shot"]
    assert row["acc@1"] == pytest.approx(direct["acc@1"]) and row["acc@5"] == pytest.approx(direct["acc@5"])


@pytest.mark.large  # MiniLM and EfficientNet-Lite0 together: ~40 s
def test_clip_e_pretrained_and_the_ablations_on_the_smoke_world(tmp_path, repo_root, monkeypatch):
    """The rows not in the shipped profile's measurement run too: CLIP-E from EfficientNet-Lite0 + MiniLM and an
    ablation of SCL fine-tuned from the tower, on the synthetic images (one step each)."""
    if not pit.default_pretrained_path():
        pytest.skip("the EfficientNet-Lite0 weights are not installed (make setup)")
    if not table2.minilm_available()[0]:
        pytest.skip(table2.minilm_available()[1])
    monkeypatch.chdir(repo_root)
    effnet = tmp_path / "image_effnet.flags"
    effnet.write_text("--flagfile=configs/scl/smoke_image.flags\n--image_encoder=efficientnet_lite0\n--output_dim=0\n"
                      "--image_tower_size=32\n--dense_learning_rate=0.0001\n")
    clip = tmp_path / "clip_pretrained.flags"
    clip.write_text("--flagfile=configs/scl/clip_pretrained.flags\n--image_tower_size=32\n--max_tokens=16\n"
                    "--batch_size=16\n--eval_batch_size=64\n")
    options = table2.Table2Config(
        benchmarks=("synthetic_image",), world_flagfile="configs/data/smoke.flags",
        image_flagfile="configs/scl/smoke_image.flags", image_pretrained_flagfile=str(effnet),
        clip_pretrained_flagfile=str(clip), rows=("clip_e_pretrained", "scl_effnet_no_triplet"), max_steps=1)
    results = table2.run_table2(options, str(tmp_path / "out"))
    rows = results["benchmarks"]["synthetic_image"]["rows"]
    assert set(rows) == {"clip_e_pretrained", "scl_effnet_no_triplet"}
    for row in rows.values():
        assert 0.0 <= row["acc@1"] <= row["acc@5"] <= 1.0 and row["num_queries"] > 0
    clip_run = json.load(open(os.path.join(rows["clip_e_pretrained"]["model_dir"], "config.json")))
    assert clip_run["scl"]["text_encoder"] == "minilm" and clip_run["scl"]["image_encoder"] == "efficientnet_lite0"
    ablation = json.load(open(os.path.join(rows["scl_effnet_no_triplet"]["model_dir"], "config.json")))
    assert ablation["scl"]["use_triplet"] is False and ablation["scl"]["image_encoder"] == "efficientnet_lite0"
