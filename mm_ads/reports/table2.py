r"""The paper's Table 2 (pre-training ablations), one command: Acc@1/Acc@5 of every encoder on every benchmark.

`python -m mm_ads.reports.table2 --flagfile=configs/reports/table2_<profile>.flags --output_dir=DIR`

Benchmarks (each selectable with `--benchmarks`):
  * `synthetic_text`, `synthetic_image` — the synthetic world's search logs (`pretrain/{text,image}_pairs`,
    test split): <query, purchased item> with hard negatives. A world is generated from `world_flagfile`
    into `DIR/data/synthetic` unless `world_dir` names an existing one.
  * `pairs:<name>` — each ER-Magellan product-matching benchmark under `pairs_dir` (Abt-Buy, Amazon-Google,
    Walmart-Amazon; test split): left offer = query, matching right offer = positive.
  * `clothing` — the clothing photos (`images_path`, test split): two augmented views of one photo are
    query and positive, another photo of the same class is the hard negative.
  * `catalogue` — the same photos as users' photos against a shop catalogue (image search): the first
    `catalogue_per_class` train photos of each class are its reference images, every other photo is a user's
    (`prepare --format=image_folder --catalogue=...`); each test photo is ranked against the whole catalogue,
    acc@N = an image of the right product (class) in the top N.

Rows (the paper's Table 2 plus references; a row that does not apply to a benchmark is left out):
  * `untrained` — the tower with its seeded random initialisation (a from-scratch generic encoder);
  * `minilm_zero_shot` — all-MiniLM-L6-v2 as shipped (the paper's CLIP-O: a generic pretrained encoder);
  * `clip_e` — towers aligned on item image ↔ item title (synthetic only: the other sets have one modality);
  * `effnet_zero_shot` — EfficientNet-Lite0 with its ImageNet weights as shipped, 1280-d pooled feature (the
    image side of the paper's CLIP-O), at the pretrained flagfile's `image_tower_size`;
  * `clip_e_pretrained` — CLIP-E starting from EfficientNet-Lite0 and MiniLM (`clip_pretrained_flagfile`);
  * `scl_effnet`, `scl_effnet_no_triplet`, `scl_effnet_no_triplet_no_queue` — SCL and its ablations
    fine-tuning EfficientNet-Lite0 (`image_pretrained_flagfile`, `clothing_pretrained_flagfile`,
    `catalogue_pretrained_flagfile`; "" = no such rows). On the image benchmarks the plain `scl` rows are
    the tower trained from scratch, the reference;
  * `scl`, `scl_no_triplet`, `scl_no_triplet_no_queue` — SCL and its ablations ("w/o Triplet Loss",
    "w/o Triplet Loss & MoCo": in-batch negatives only), all from the same flagfile and seed;
  * `scl_minilm` — on the world's (or a prepared dataset's) text pairs, SCL fine-tuning MiniLM
    (`text_minilm_flagfile`): the paper's recipe, SCL starting from a generic pretrained encoder;
  * `scl_scratch` — on product pairs, SCL with the from-scratch text tower (the main rows fine-tune MiniLM).

Every run lives in `DIR/runs/<benchmark>/<row>/` (a normal model dir); a finished run (its `metrics.json`
exists) is reused, so re-running the command after an interruption continues where it stopped. With
`seeds` (e.g. `--seeds=0,1,2`) every row runs once per seed into `DIR/seed<k>/` (the data in `DIR/data` is
shared), and `DIR/table2.{md,json}` give each row's mean ± std over the seeds (`acc@1` the mean, `acc@1_std`,
per-seed rows under `seeds`). Output:
`DIR/table2.md` and `DIR/table2.json` (per benchmark and row: acc@1/5/10 on the test split and, when the
dataset has a `valid` split of its pairs, the same on it under `valid` — what choices are made on —, queries,
candidates, model dir and
`wall_s`, the time this invocation spent on the row; a row that reused a finished run also has
`reused_wall_s`, the time that run took when it ran). The totals are labelled the same way:
`wall_s` of this invocation, and `reused_wall_s` summed over the finished runs it reused.

The command checks the optional dependencies of the chosen rows before any work (MiniLM rows: keras-hub,
tensorflow-text and the weights package) and exits non-zero with the install command when one is missing.
From Python (`run_table2`), rows needing a missing MiniLM are reported as skipped, with the reason. A run in
which no requested row produced a result raises `NothingRanError` (the command exits non-zero) after writing
the outputs with the reasons.
"""

import dataclasses
import os
import sys
import time

from absl import logging

from mm_ads import config as config_lib
from mm_ads import options as mm_options
from mm_ads.reports import options as options_lib
from mm_ads.training import model_dir as run_dir
from mm_ads.utils import io as io_utils

ROWS = {
    "untrained": "Generic encoder, untrained (random init)",
    "minilm_zero_shot": "Generic pretrained encoder: all-MiniLM-L6-v2 zero-shot (CLIP-O)",
    "effnet_zero_shot": "Generic pretrained encoder: EfficientNet-Lite0 zero-shot (CLIP-O)",
    "clip_e": "CLIP-E: item image <-> item title alignment",
    "clip_e_pretrained": "CLIP-E fine-tuned from EfficientNet-Lite0 + all-MiniLM-L6-v2",
    "scl": "SCL",
    "scl_no_triplet": "SCL w/o triplet loss",
    "scl_no_triplet_no_queue": "SCL w/o triplet loss & MoCo (in-batch negatives)",
    "scl_scratch": "SCL, text tower from scratch",
    "scl_minilm": "SCL fine-tuned from all-MiniLM-L6-v2",
    "scl_effnet": "SCL fine-tuned from EfficientNet-Lite0",
    "scl_effnet_no_triplet": "SCL fine-tuned from EfficientNet-Lite0 w/o triplet loss",
    "scl_effnet_no_triplet_no_queue": "SCL fine-tuned from EfficientNet-Lite0 w/o triplet loss & MoCo",
}
# the pretrained image rows: each is an `ABLATIONS` row on the benchmark's pretrained flagfile
EFFNET_ROWS = {"scl_effnet": "scl", "scl_effnet_no_triplet": "scl_no_triplet",
               "scl_effnet_no_triplet_no_queue": "scl_no_triplet_no_queue"}
ABLATIONS = {"scl": {}, "scl_no_triplet": {"use_triplet": "false"},
             "scl_no_triplet_no_queue": {"use_triplet": "false", "use_queue": "false"}}
PAIR_BENCHMARKS = ("Abt-Buy", "Amazon-Google", "Walmart-Amazon")
BENCHMARKS = ("synthetic_text", "synthetic_image", "pairs", "clothing", "catalogue")
IMAGE_BENCHMARKS = ("synthetic_image", "clothing", "catalogue")
# the benchmarks each row applies to
ROW_BENCHMARKS = {"untrained": ("synthetic_text",) + IMAGE_BENCHMARKS,
                  "minilm_zero_shot": ("synthetic_text", "pairs"), "clip_e": ("synthetic_text", "synthetic_image"),
                  "scl": BENCHMARKS, "scl_no_triplet": BENCHMARKS, "scl_no_triplet_no_queue": BENCHMARKS,
                  "scl_scratch": ("pairs",), "scl_minilm": ("synthetic_text",),
                  "effnet_zero_shot": IMAGE_BENCHMARKS, "clip_e_pretrained": ("synthetic_text", "synthetic_image"),
                  **{row: IMAGE_BENCHMARKS for row in EFFNET_ROWS}}


@dataclasses.dataclass
class Table2Config:
    """What `run_table2` runs (flag names = field names; see `configs/reports/table2_*.flags`).

    Args:
        benchmarks: any of synthetic_text, synthetic_image, pairs, clothing, catalogue ("pairs" = every name
            in `pair_benchmarks`).
        world_dir: an existing synthetic world; "" = generate one from `world_flagfile`.
        world_flagfile: the synthetic world's profile (`configs/data/*.flags`).
        text_flagfile / image_flagfile / clip_flagfile: SCL text, SCL image and CLIP-E runs on the world.
        text_minilm_flagfile: the `scl_minilm` row (SCL fine-tuning MiniLM on the world's text pairs).
        pairs_dir: the ER-Magellan directory; pair_benchmarks: which of its benchmarks.
        pairs_flagfile: SCL on product pairs (fine-tuning MiniLM); pairs_scratch_flagfile: the from-scratch
            reference row ("" = no such row).
        images_path: the clothing photos (directory or .tar.gz); clothing_flagfile: SCL on them.
        catalogue_flagfile: SCL on the photo → catalogue pairs built from `images_path`;
            catalogue_per_class: reference images per class (the first train photos of each class).
        image_pretrained_flagfile / clothing_pretrained_flagfile / catalogue_pretrained_flagfile: SCL fine-tuning
            EfficientNet-Lite0 on synthetic_image / clothing / catalogue ("" = no pretrained rows there); the
            zero-shot row uses their `image_tower_size`, `image_size` and `image_pretrained_path`.
        clip_pretrained_flagfile: CLIP-E from EfficientNet-Lite0 + MiniLM ("" = no such row).
        rows: which rows to run (default all of `ROWS`; a row that does not apply to a benchmark is left out).
        max_steps: caps every training run (0 = the flagfiles' epochs; the smoke profile uses it).
        seed: training seed of every run (one seed; the layout and results of before).
        seeds: several seeds (overrides `seed`): every row once per seed, reported as mean ± std.
    """

    benchmarks: tuple = ("synthetic_text", "synthetic_image", "pairs", "clothing")
    world_dir: str = ""
    world_flagfile: str = "configs/data/demo.flags"
    text_flagfile: str = "configs/scl/text.flags"
    image_flagfile: str = "configs/scl/image.flags"
    clip_flagfile: str = "configs/scl/clip.flags"
    text_minilm_flagfile: str = "configs/scl/text_minilm.flags"
    pairs_dir: str = "../shared/data/product_matching"
    pair_benchmarks: tuple = PAIR_BENCHMARKS
    pairs_flagfile: str = "configs/scl/product_pairs.flags"
    pairs_scratch_flagfile: str = "configs/scl/product_pairs_scratch.flags"
    images_path: str = "../shared/data/images/clothing-small-96px.tar.gz"
    clothing_flagfile: str = "configs/scl/clothing.flags"
    catalogue_flagfile: str = "configs/scl/catalogue.flags"
    catalogue_per_class: int = 5
    image_pretrained_flagfile: str = ""
    clothing_pretrained_flagfile: str = ""
    catalogue_pretrained_flagfile: str = ""
    clip_pretrained_flagfile: str = ""
    rows: tuple = tuple(ROWS)
    max_steps: int = 0
    seed: int = 0
    seeds: tuple = ()

    def validate(self):
        known = BENCHMARKS
        unknown = [b for b in self.benchmarks if b not in known]
        if unknown or not self.benchmarks:
            raise ValueError(f"benchmarks must be a non-empty subset of {known}, got {list(self.benchmarks)}")
        bad_rows = [r for r in self.rows if r not in ROWS]
        if bad_rows or not self.rows:
            raise ValueError(f"rows must be a non-empty subset of {list(ROWS)}, got {list(self.rows)}")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.catalogue_per_class < 1:
            raise ValueError(f"catalogue_per_class must be >= 1, got {self.catalogue_per_class}")
        self.seeds = tuple(int(s) for s in self.seeds)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {list(self.seeds)}")
        if not any(b in ROW_BENCHMARKS[r] for r in self.rows for b in self.benchmarks):
            raise ValueError(f"none of the rows {list(self.rows)} applies to the benchmarks {list(self.benchmarks)} "
                             f"(rows apply to: {ROW_BENCHMARKS})")
        return self

    @classmethod
    def from_values(cls, values):
        """From `{field: value}` (flagfile strings or typed values); unknown names are an error."""
        return mm_options.options_from_values(cls, values, "Table 2")


def read_profile(path):
    """A `configs/reports/table2_*.flags` profile → `{option: value string}`."""
    return config_lib.read_flagfile(path)


def minilm_available():
    """(True, "") when keras-hub, tensorflow-text and the MiniLM weights are installed, else (False, why)."""
    missing = options_lib.missing_modules(options_lib.MINILM_MODULES)
    if missing:
        return False, f"{', '.join(missing)} not installed ({options_lib.ENCODERS_INSTALL})"
    from mm_ads.scl.pretrained_tower import default_pretrained_path

    if not default_pretrained_path():
        return False, f"the MiniLM weights are not installed ({options_lib.ENCODERS_INSTALL})"
    return True, ""


def _needs_minilm(flagfile):
    return config_lib.read_flagfile(flagfile).get("text_encoder") == "minilm"


def _needs_effnet(flagfile):
    return config_lib.read_flagfile(flagfile).get("image_encoder") == "efficientnet_lite0"


def pretrained_image_flagfiles(options):
    """`{benchmark: flagfile}` of the image benchmarks with pretrained (EfficientNet-Lite0) rows."""
    o = options
    files = {"synthetic_image": o.image_pretrained_flagfile, "clothing": o.clothing_pretrained_flagfile,
             "catalogue": o.catalogue_pretrained_flagfile}
    return {b: f for b, f in files.items() if f and b in o.benchmarks}


def effnet_available():
    """(True, "") when the EfficientNet-Lite0 weights are installed, else (False, why)."""
    from mm_ads.scl.pretrained_image_tower import default_pretrained_path

    if not default_pretrained_path():
        return False, f"the EfficientNet-Lite0 weights are not installed ({options_lib.EFFNET_INSTALL})"
    return True, ""


def _applies(options, row):
    return row in options.rows and any(b in options.benchmarks for b in ROW_BENCHMARKS[row])


def required_modules(options):
    """The optional modules the chosen rows and benchmarks need (see `options_lib.DEPENDENCIES`)."""
    o = options
    pretrained = pretrained_image_flagfiles(o)
    effnet_rows = ("effnet_zero_shot",) + tuple(EFFNET_ROWS)
    needs_effnet = any(r in o.rows for r in effnet_rows) and bool(pretrained)
    needs_clip = _applies(o, "clip_e_pretrained") and bool(o.clip_pretrained_flagfile)
    if needs_clip:
        needs_effnet |= _needs_effnet(o.clip_pretrained_flagfile)
    needs_minilm = any(_applies(o, r) for r in ("minilm_zero_shot", "scl_minilm"))
    needs_minilm |= needs_clip and _needs_minilm(o.clip_pretrained_flagfile)
    needs_minilm |= any(r in o.rows for r in EFFNET_ROWS) and any(_needs_minilm(f) for f in pretrained.values())
    scl_rows = [r for r in ABLATIONS if r in o.rows]
    flagfiles = {"synthetic_text": [o.text_flagfile], "synthetic_image": [o.image_flagfile],
                 "pairs": [o.pairs_flagfile], "clothing": [o.clothing_flagfile], "catalogue": [o.catalogue_flagfile]}
    for b in o.benchmarks:
        needs_minilm |= bool(scl_rows) and any(_needs_minilm(f) for f in flagfiles[b])
    if "pairs" in o.benchmarks and "scl_scratch" in o.rows and o.pairs_scratch_flagfile:
        needs_minilm |= _needs_minilm(o.pairs_scratch_flagfile)
    return (options_lib.MINILM_MODULES if needs_minilm else ()) + (options_lib.EFFNET_MODULES if needs_effnet else ())


def check_dependencies(options):
    """`MissingDependencyError` (with the install command) when a module the chosen rows need is missing."""
    pretrained = ("minilm_zero_shot", "scl_scratch", "scl_minilm", "effnet_zero_shot", "clip_e_pretrained",
                  *EFFNET_ROWS)
    without = [r for r in options.rows if r not in pretrained]
    options_lib.check_dependencies(
        required_modules(options), f"Table 2 (rows {','.join(options.rows)} on {','.join(options.benchmarks)})",
        hint="or leave out the pretrained rows (and the pairs benchmarks, whose SCL rows fine-tune MiniLM): e.g. "
             f"--rows={','.join(without)} --benchmarks=synthetic_text,synthetic_image,clothing")


class NothingRanError(RuntimeError):
    """No requested row of Table 2 produced a result (every one was skipped or does not apply)."""


def _scl_task(flagfile, data_dir, options, **overrides):
    from mm_ads.scl.task import SCLTask

    values = dict(config_lib.read_flagfile(flagfile), data_dir=data_dir, model_dir="unused", seed=str(options.seed),
                  **overrides)
    return SCLTask(config_lib.config_from_values(values))


def _evaluate_tower(task, encoder):
    return task.evaluate_encoder(encoder, "eval")


VALID_SPLITS = ("valid", "validation")  # ours, and the name of image folders' own split folders
_ACC_KEYS = ("acc@1", "acc@5", "acc@10", "num_queries", "num_candidates")


def _valid_split(flagfile, data_dir):
    """The dataset's validation split of the flagfile's pairs ("valid" or "validation"), or None."""
    from mm_ads.data.dataset import Manifest

    component = f"pretrain/{_modality(flagfile)}_pairs"
    try:
        manifest = Manifest.load(data_dir)
    except FileNotFoundError:  # no dataset (a run that never reads one): nothing to validate on
        return None
    return next((s for s in VALID_SPLITS if s in manifest.components.get(component, {})), None)


def _row(result, model_dir, seconds, reused_s=None, valid=None):
    out = {k: result[k] for k in _ACC_KEYS if k in result}
    if valid is not None:
        out["valid"] = {k: valid[k] for k in _ACC_KEYS if k in valid}
    out.update(wall_s=round(seconds, 1), model_dir=model_dir)  # of this invocation
    if reused_s is not None:  # the finished run it reused took this long when it ran
        out["reused_wall_s"] = round(reused_s, 1)
    return out


class Table2Runner:
    """Runs `Table2Config` into `output_dir`; `run()` returns the results dict also written to table2.json."""

    def __init__(self, options, output_dir, data_root=None, zero_shot_cache=None):
        self.options = options.validate()
        # seed-independent results (the zero-shot tower) shared by the runners of several seeds
        self.zero_shot_cache = {} if zero_shot_cache is None else zero_shot_cache
        self.output_dir = os.path.abspath(output_dir)
        self.data_root = os.path.abspath(data_root or os.path.join(self.output_dir, "data"))
        self.results = {"benchmarks": {}, "options": dataclasses.asdict(options)}
        self.minilm, self.minilm_reason = minilm_available()
        self.effnet, self.effnet_reason = effnet_available()
        self.trained = set()  # model dirs trained by this invocation
        self.reused = {}  # model dir of a run finished before this invocation → its recorded wall seconds
        self._row_reused = None

    def _train(self, flagfile, data_dir, model_dir, **overrides):
        """`mm_ads.runs.run` of `flagfile` on `data_dir` (reused when already finished); returns its metrics."""
        from mm_ads import runs

        options = self.options
        values = dict(config_lib.read_flagfile(flagfile), data_dir=data_dir, model_dir=model_dir, export="false",
                      seed=str(options.seed), **overrides)
        if options.max_steps:
            values["max_steps"] = str(options.max_steps)
        config = config_lib.config_from_values(values)
        done = options_lib.reusable_metrics(model_dir, config)
        if done is None:
            self.trained.add(model_dir)
            return runs.run(config)
        if model_dir not in self.trained:  # finished before this invocation
            logging.info("Table 2: reusing %s", model_dir)
            self.reused[model_dir] = run_dir.wall_s(done)
            self._row_reused = self.reused[model_dir]
        return done

    # -- data --------------------------------------------------------------------------------
    def world_dir(self):
        if self.options.world_dir:
            return self.options.world_dir
        path = os.path.join(self.data_root, "synthetic")
        if not os.path.exists(os.path.join(path, "manifest.json")):
            from mm_ads.data import synthetic

            synthetic.generate(synthetic.world_config_from_flagfile(self.options.world_flagfile), path,
                               provenance={"generator": "mm_ads.reports.table2",
                                           "world_flagfile": self.options.world_flagfile})
        return path

    def prepared(self, fmt, input_path, name, **reader_options):
        from mm_ads.data import readers

        path = os.path.join(self.data_root, name)
        if not os.path.exists(os.path.join(path, "manifest.json")):
            if not os.path.exists(input_path):
                raise FileNotFoundError(f"{input_path} not found (needed for the {name} benchmark)")
            readers.prepare(fmt, input_path, path, reader_options, seed=self.options.seed)
        return path

    def catalogue_data(self):
        """The photo → catalogue dataset built from the clothing photos (see `image_folder.split_shop`)."""
        o = self.options
        if not os.path.exists(o.images_path):
            raise FileNotFoundError(f"{o.images_path} not found (needed for the catalogue benchmark)")
        from mm_ads.data.readers import image_folder

        shop = image_folder.split_shop(o.images_path,
                                       os.path.join(self.data_root, f"clothing_shop{o.catalogue_per_class}"),
                                       o.catalogue_per_class)
        return self.prepared("image_folder", os.path.join(shop, "photos"), f"clothing_catalogue{o.catalogue_per_class}",
                             catalogue=os.path.join(shop, "catalogue"))

    # -- rows --------------------------------------------------------------------------------
    def _run_dir(self, benchmark, row):
        return os.path.join(self.output_dir, "runs", benchmark.replace(":", "_"), row)

    def _record(self, benchmark, modality, row, fn):
        if row not in self.options.rows:
            return
        bench = self.results["benchmarks"].setdefault(benchmark, {"modality": modality, "rows": {}})
        start = time.time()
        self._row_reused = None
        try:
            result, model_dir, *valid = fn()
        except _Skip as e:
            bench["rows"][row] = {"skipped": str(e)}
            logging.warning("Table 2 %s / %s skipped: %s", benchmark, row, e)
            return
        bench["rows"][row] = _row(result, model_dir, time.time() - start, self._row_reused,
                                  valid[0] if valid else None)
        logging.info("Table 2 %s / %s: %s", benchmark, row, bench["rows"][row])
        self._write()  # results so far are on disk after every row

    def untrained(self, benchmark, flagfile, data_dir, **overrides):
        import keras

        def fn():
            task = _scl_task(flagfile, data_dir, self.options, **overrides)
            keras.utils.set_random_seed(self.options.seed)
            encoder = task.build_model().encoder
            return (_evaluate_tower(task, encoder), None,
                    self._valid(flagfile, data_dir, encoder, **overrides))

        self._record(benchmark, _modality(flagfile), "untrained", fn)

    def _valid(self, flagfile, data_dir, encoder, **overrides):
        """Acc@N of `encoder` on the dataset's valid pairs (None without them)."""
        split = _valid_split(flagfile, data_dir)
        if split is None:
            return None
        task = _scl_task(flagfile, data_dir, self.options, eval_split=split, **overrides)
        return _evaluate_tower(task, encoder)

    def effnet_zero_shot(self, benchmark, flagfile, data_dir):
        """EfficientNet-Lite0 as shipped (1280-d pooled feature) at `flagfile`'s image sizes."""
        def fn():
            if not self.effnet:
                raise _Skip(self.effnet_reason)
            from mm_ads.scl.task import build_encoder

            key = (benchmark, os.path.abspath(flagfile), data_dir)
            if key not in self.zero_shot_cache:  # no training, no randomness: the same for every seed
                overrides = {"output_dim": "0"}
                task = _scl_task(flagfile, data_dir, self.options, **overrides)
                tower = build_encoder(task.scl)
                self.zero_shot_cache[key] = (_evaluate_tower(task, tower), None,
                                             self._valid(flagfile, data_dir, tower, **overrides))
            return self.zero_shot_cache[key]

        self._record(benchmark, "image", "effnet_zero_shot", fn)

    def minilm_zero_shot(self, benchmark, flagfile, data_dir):
        def fn():
            if not self.minilm:
                raise _Skip(self.minilm_reason)
            from mm_ads.scl.pretrained_tower import PretrainedTextTower

            overrides = {"text_encoder": "minilm", "output_dim": "0"}
            task = _scl_task(flagfile, data_dir, self.options, **overrides)
            tower = PretrainedTextTower(task.scl.pretrained_path, task.scl.max_tokens, 0, name="minilm")
            return _evaluate_tower(task, tower), None, self._valid(flagfile, data_dir, tower, **overrides)

        self._record(benchmark, "text", "minilm_zero_shot", fn)

    def scl_rows(self, benchmark, flagfile, data_dir, rows=tuple(ABLATIONS), row_names=None):
        for row in rows:
            name = (row_names or {}).get(row, row)

            def fn(row=row, name=name):
                if _needs_minilm(flagfile) and not self.minilm:
                    raise _Skip(self.minilm_reason)
                if _needs_effnet(flagfile) and not self.effnet:
                    raise _Skip(self.effnet_reason)
                from mm_ads.scl.encode import load_encoder

                model_dir = self._run_dir(benchmark, name)
                metrics = self._train(flagfile, data_dir, model_dir, **ABLATIONS[row])
                valid = None
                if _valid_split(flagfile, data_dir):
                    # computed once per trained encoder (a reused run keeps its file): `valid.json` records the
                    # step it was computed at, so a run trained further is evaluated again
                    cache = os.path.join(model_dir, "valid.json")
                    valid = (io_utils.read_json_if_exists(cache) or {}).get(str(metrics.get("steps")))
                    if valid is None:
                        encoder = load_encoder(run_dir.path(model_dir, run_dir.ENCODER))
                        valid = self._valid(flagfile, data_dir, encoder, **ABLATIONS[row])
                        io_utils.write_json(cache, {str(metrics.get("steps")): valid})
                return metrics, model_dir, valid

            self._record(benchmark, _modality(flagfile), name, fn)

    def clip_e(self, world, benchmarks, row="clip_e", clip_flagfile=None):
        """Trains CLIP-E once on the world's items; evaluates its text/image towers on the SCL pairs."""
        from mm_ads.scl.encode import load_encoder

        clip_flagfile = clip_flagfile or self.options.clip_flagfile
        model_dir = self._run_dir("synthetic", row)
        for benchmark, modality, flagfile in benchmarks:
            def fn(modality=modality, flagfile=flagfile):
                if _needs_minilm(clip_flagfile) and not self.minilm:
                    raise _Skip(self.minilm_reason)
                if _needs_effnet(clip_flagfile) and not self.effnet:
                    raise _Skip(self.effnet_reason)
                clip_metrics = self._train(clip_flagfile, world, model_dir)
                encoder = load_encoder(clip_metrics["encoders"][modality])
                result = _evaluate_tower(_scl_task(flagfile, world, self.options), encoder)
                return result, model_dir, self._valid(flagfile, world, encoder)

            self._record(benchmark, modality, row, fn)

    # -- driver ------------------------------------------------------------------------------
    def run(self):
        o = self.options
        os.makedirs(self.output_dir, exist_ok=True)
        start = time.time()
        synthetic = [b for b in ("synthetic_text", "synthetic_image") if b in o.benchmarks]
        pretrained = pretrained_image_flagfiles(o)
        if synthetic:
            world = self.world_dir()
            flagfiles = {"synthetic_text": o.text_flagfile, "synthetic_image": o.image_flagfile}
            for b in synthetic:
                self.untrained(b, flagfiles[b], world)
                if b == "synthetic_text":
                    self.minilm_zero_shot(b, flagfiles[b], world)
                if b in pretrained:
                    self.effnet_zero_shot(b, pretrained[b], world)
            self.clip_e(world, [(b, _modality(flagfiles[b]), flagfiles[b]) for b in synthetic])
            if o.clip_pretrained_flagfile:
                # evaluated on each benchmark's pairs as the pretrained towers decode them
                self.clip_e(world, [(b, _modality(flagfiles[b]), pretrained.get(b, flagfiles[b])) for b in synthetic],
                            row="clip_e_pretrained", clip_flagfile=o.clip_pretrained_flagfile)
            for b in synthetic:
                self.scl_rows(b, flagfiles[b], world)
                if b in pretrained:
                    self.effnet_rows(b, pretrained[b], world)
            if "synthetic_text" in synthetic:
                self.scl_rows("synthetic_text", o.text_minilm_flagfile, world, rows=("scl",),
                              row_names={"scl": "scl_minilm"})
        if "pairs" in o.benchmarks:
            for name in o.pair_benchmarks:
                benchmark = f"pairs:{name}"
                data = self.prepared("product_pairs", os.path.join(o.pairs_dir, name), f"pairs_{name}")
                self.minilm_zero_shot(benchmark, o.pairs_flagfile, data)
                self.scl_rows(benchmark, o.pairs_flagfile, data)
                if o.pairs_scratch_flagfile:
                    self.scl_rows(benchmark, o.pairs_scratch_flagfile, data, rows=("scl",),
                                  row_names={"scl": "scl_scratch"})
        for benchmark, flagfile in (("clothing", o.clothing_flagfile), ("catalogue", o.catalogue_flagfile)):
            if benchmark not in o.benchmarks:
                continue
            data = (self.prepared("image_folder", o.images_path, "clothing") if benchmark == "clothing"
                    else self.catalogue_data())
            self.untrained(benchmark, flagfile, data)
            if benchmark in pretrained:
                self.effnet_zero_shot(benchmark, pretrained[benchmark], data)
            self.scl_rows(benchmark, flagfile, data)
            if benchmark in pretrained:
                self.effnet_rows(benchmark, pretrained[benchmark], data)
        self.results["wall_s"] = round(time.time() - start, 1)
        self.results["reused_runs"] = len(self.reused)
        self.results["reused_wall_s"] = round(sum(self.reused.values()), 1)
        self._write()
        rows = [(b, r, v) for b, bench in self.results["benchmarks"].items() for r, v in bench["rows"].items()]
        if not any("skipped" not in v for _, _, v in rows):
            reasons = "; ".join(f"{b} / {r}: {v['skipped']}" for b, r, v in rows) or \
                f"none of the rows {list(o.rows)} applies to the benchmarks {list(o.benchmarks)}"
            raise NothingRanError(f"Table 2: no requested row produced a result ({reasons}); see "
                                  f"{os.path.join(self.output_dir, 'table2.md')}")
        return self.results

    def effnet_rows(self, benchmark, flagfile, data_dir):
        """The SCL rows fine-tuning EfficientNet-Lite0 (`EFFNET_ROWS`) on `flagfile`."""
        self.scl_rows(benchmark, flagfile, data_dir, rows=tuple(EFFNET_ROWS.values()),
                      row_names={ablation: row for row, ablation in EFFNET_ROWS.items()})

    def _write(self):
        io_utils.write_json(os.path.join(self.output_dir, "table2.json"), self.results)
        with io_utils.atomic_file(os.path.join(self.output_dir, "table2.md")) as f:
            f.write(to_markdown(self.results))


class _Skip(Exception):
    pass


def _modality(flagfile):
    return config_lib.read_flagfile(flagfile).get("modality", "text")


def to_markdown(results):
    """Table 2 as markdown: one table per benchmark (rows in the paper's order), then a summary."""
    seeds = results.get("seeds")
    title = "# Table 2: pre-training ablations (Acc@N on the test split, exact"
    lines = [title + (f"; mean ± std over seeds {seeds})" if seeds else ")"), ""]

    def cell(r, key):
        return f"{r[key]:.4f}" + (f" ± {r[key + '_std']:.4f}" if f"{key}_std" in r else "")

    for benchmark, bench in results["benchmarks"].items():
        from_scratch = bench["modality"] == "image" and any(r in bench["rows"] for r in EFFNET_ROWS)
        has_valid = any("valid" in r for r in bench["rows"].values())
        extra = " valid Acc@1 | valid Acc@5 |" if has_valid else ""
        lines += [f"## {benchmark} ({bench['modality']})", "", f"| method | Acc@1 | Acc@5 |{extra} queries | wall s |",
                  "|---|---:|---:|" + ("---:|---:|" if has_valid else "") + "---:|---:|"]
        for row in ROWS:
            if row not in bench["rows"]:
                continue
            r = bench["rows"][row]
            label = ROWS[row] + (" (tower from scratch)" if from_scratch and row in ABLATIONS else "")
            if "skipped" in r:
                lines.append(f"| {label} | skipped: {r['skipped']} | |" + (" | |" if has_valid else "") + " | |")
            else:
                wall = f"{r['wall_s']:.0f}"
                if "reused_wall_s" in r:
                    wall += f" (reused run: {r['reused_wall_s']:.0f})"
                valid = ""
                if has_valid:
                    v = r.get("valid") or {}
                    valid = " " + " | ".join(cell(v, k) if k in v else "—" for k in ("acc@1", "acc@5")) + " |"
                lines.append(f"| {label} | {cell(r, 'acc@1')} | {cell(r, 'acc@5')} |{valid} {r['num_queries']} | "
                             f"{wall} |")
        lines.append("")
    if "wall_s" in results:
        lines.append(wall_time_line(results["wall_s"], results.get("reused_runs", 0),
                                    results.get("reused_wall_s", 0.0)))
    return "\n".join(lines) + "\n"


def wall_time_line(seconds, reused_runs, reused_s):
    """'Wall time of this invocation ...', with the finished runs it reused and what they took when they ran."""
    line = f"Wall time of this invocation: {seconds / 60:.1f} min."
    if reused_runs:
        line += (f" It reused {reused_runs} finished run{'s' if reused_runs > 1 else ''}, which took "
                 f"{reused_s / 60:.1f} min when {'they' if reused_runs > 1 else 'it'} ran.")
    return line


def run_table2(options, output_dir):
    """Library entry point: runs `options` (a `Table2Config`) into `output_dir`; returns the results (with
    `seeds`: each seed into `output_dir/seed<k>`, then `aggregate_seeds` of them)."""
    options.validate()
    if not options.seeds:
        return Table2Runner(options, output_dir).run()
    output_dir = os.path.abspath(output_dir)
    per_seed, zero_shot = {}, {}
    for seed in options.seeds:
        one = dataclasses.replace(options, seed=int(seed), seeds=())
        per_seed[int(seed)] = Table2Runner(one, os.path.join(output_dir, f"seed{seed}"),
                                           data_root=os.path.join(output_dir, "data"), zero_shot_cache=zero_shot).run()
        results = aggregate_seeds(per_seed, options)
        io_utils.write_json(os.path.join(output_dir, "table2.json"), results)
        with io_utils.atomic_file(os.path.join(output_dir, "table2.md")) as f:
            f.write(to_markdown(results))
    return results


def _mean_std_fields(entries, keys):
    from mm_ads.reports.paper import mean_std

    out = {}
    for key in keys:
        values = [e[key] for e in entries if key in e]
        if values:
            out[key], out[f"{key}_std"] = mean_std(values)
    return out


def aggregate_seeds(per_seed, options):
    """`{seed: run_table2 results}` → the same layout with each row's Acc@N as the mean over the seeds where it
    ran, `<key>_std` their sample std, `num_seeds`, `wall_s` summed and the per-seed rows under `seeds`."""
    benchmarks = {}
    for seed, results in per_seed.items():
        for name, bench in results["benchmarks"].items():
            agg = benchmarks.setdefault(name, {"modality": bench["modality"], "rows": {}})
            for row, entry in bench["rows"].items():
                agg["rows"].setdefault(row, {"seeds": {}})["seeds"][str(seed)] = entry
    acc = ("acc@1", "acc@5", "acc@10")
    for bench in benchmarks.values():
        for row, agg in list(bench["rows"].items()):
            ran = [e for e in agg["seeds"].values() if "skipped" not in e]
            if not ran:
                bench["rows"][row] = {"skipped": next(iter(agg["seeds"].values()))["skipped"], "seeds": agg["seeds"]}
                continue
            out = _mean_std_fields(ran, acc)
            out.update({k: ran[0][k] for k in ("num_queries", "num_candidates") if k in ran[0]})
            valid = [e["valid"] for e in ran if e.get("valid")]
            if valid:
                out["valid"] = {**_mean_std_fields(valid, acc), "num_queries": valid[0].get("num_queries")}
            out.update(num_seeds=len(ran), wall_s=round(sum(e["wall_s"] for e in ran), 1), seeds=agg["seeds"])
            reused = [e["reused_wall_s"] for e in ran if "reused_wall_s" in e]
            if reused:
                out["reused_wall_s"] = round(sum(reused), 1)
            bench["rows"][row] = out
    return {"benchmarks": benchmarks, "options": dataclasses.asdict(options), "seeds": [int(s) for s in per_seed],
            "wall_s": round(sum(r.get("wall_s", 0.0) for r in per_seed.values()), 1),
            "reused_runs": sum(r.get("reused_runs", 0) for r in per_seed.values()),
            "reused_wall_s": round(sum(r.get("reused_wall_s", 0.0) for r in per_seed.values()), 1)}


def main(argv):
    from absl import app, flags

    from mm_ads.utils.tf_startup import hide_retracing_warnings

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    hide_retracing_warnings()  # dozens of runs in one process: see the function's docstring
    options = mm_options.options_from_flags(Table2Config)
    try:
        check_dependencies(options)  # before any work
        results = run_table2(options, flags.FLAGS.output_dir)
    except (options_lib.MissingDependencyError, NothingRanError) as e:
        sys.exit(f"table2: {e}")
    print(to_markdown(results))
    print(f"table: {os.path.join(os.path.abspath(flags.FLAGS.output_dir), 'table2.md')}")


def define_flags():
    mm_options.define_flags(Table2Config, "Table 2", "Where runs, table2.md and table2.json go.")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main, argv=sys.argv)
