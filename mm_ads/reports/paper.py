r"""The paper's experiments end to end: Tables 2–3 and Figures 3, 6a, 6b, 6c in one command.

`python -m mm_ads.reports.paper --flagfile=configs/paper/<profile>.flags --output_dir=DIR`

Profiles: `smoke` (tests: tiny world, a few steps), `demo` (the README's main job, ≤ 30 minutes on 2
cores) and `full` (the demo world and every Table 2 benchmark). Steps, all under `DIR`:

1. `data/` — the synthetic world of `world_flagfile`, or the real dataset `prepare_flagfile` prepares (e.g.
   `configs/data/movielens100k.flags`), or `world_dir`, an existing dataset.
2. `table2/` — Table 2 with the Table 2 profile `table2_flagfile` on that world (`mm_ads.reports.table2`).
3. `vectors/<row>.parquet` — the catalogue encoded by the text encoder of each Table 2 row that a CTR run
   needs: `encoder_row` (the vectors of Table 3) and every row of `fig6a_rows`. `encoder_row=auto` picks it
   on the validation pairs: among `encoder_candidates` (the generic pretrained encoder, SCL fine-tuned from
   it, the from-scratch SCL tower) the one with the best validation `encoder_metric`; ties go to the earlier
   candidate, so an encoder no better than the generic one (listed first) is never chosen. The report states
   the choice and the numbers it was made on.
4. `ctr/<variant>/seed<k>/` — Table 3: every variant of `variants` × `seeds`, flagfile
   `configs/ctr/<variant>.flags` plus `ctr_overrides`. A `simtier_make` run starts from the `make` run's
   MAKE pre-training of the same seed when the two are the same computation (copied, not re-run).
   `control/<variant>/seed<k>/` — the random-vector control: each of `control_variants` with every item's
   vector replaced by a random unit vector (`vectors/random.parquet`, the chosen encoder's dim), same seeds:
   vectors that carry nothing must leave every variant within the seed spread of `id`.
5. `fig3/` — test GAUC per epoch for 1..`fig3_epochs`: the id model (seed 0 run continued), and MAKE alone
   (the `make_only` variant: the multimodal-only model).
6. `fig6a/` — the simtier model (seed 0) on the vectors of each row of `fig6a_rows`: Acc@1 vs GAUC.
7. Fig 6b — from Table 3: relative AUC and LogLoss improvement of `simtier_make` over `id` per item-frequency
   group (freq_1 = rarest … freq_8) and new items, mean ± std over seeds.
8. New items (paper section 6.4) — from Table 3: AUC and GAUC of every variant on the `new_item_slices` (`new` =
   items without a training impression, `age_<1d` = impressions of items created less than a day before), against
   id. `default_row_off/<variant>/seed<k>/` — each of `default_row_off_variants` re-run with admission off
   (`admit_after=0`: an id never seen in training reads its randomly initialised row instead of the table's
   default row), the same seeds: what the default row is worth on new items.
9. `fig6c/` — the `make` model (seed 0) with MAKE pre-trained for each of `fig6c_epochs` epochs (0 = joint),
   early stopping off; with a validation split, also MAKE's validation GAUC per pre-training epoch of the
   Table 3 `make` run (seed 0) and the epoch early stopping chose.

Every run is a normal model dir and a finished one (its `metrics.json` exists) is reused, so an
interrupted report continues where it stopped. Output: `report.md`, `results.json` and `fig3.png`,
`fig6a.png`, `fig6b.png`, `fig6c.png`. The report states sizes, seeds and wall times, and whether each of the
paper's orderings holds here — a finding either way, not something tuned away. Wall times are this
invocation's (`results.json`: `wall_s` per step and `total`); the finished runs it reused are counted
apart (`reused`: how many, and the wall time they took when they ran).

Before any work, the optional dependencies are checked (matplotlib for the plots; keras-hub,
tensorflow-text and the MiniLM weights when a chosen row needs MiniLM): a missing one stops the report with
the install command. `report.md` and `results.json` are written before the plots are drawn, so a plotting
failure loses no result.
"""

import dataclasses
import json
import math
import os
import shutil
import sys
import time

import numpy as np
from absl import logging

from mm_ads import config as config_lib
from mm_ads import options as mm_options
from mm_ads.reports import options as options_lib
from mm_ads.reports import popularity as popularity_lib
from mm_ads.reports import table2 as table2_lib
from mm_ads.training import model_dir as run_dir
from mm_ads.training.model_dir import finished_metrics
from mm_ads.utils import io as io_utils

TABLE3_VARIANTS = ("id", "vector", "simscore", "simtier", "make", "simtier_make")
FREQ_SLICES = tuple(f"freq_{g}" for g in range(1, 9)) + ("new",)


@dataclasses.dataclass
class PaperConfig:
    """What `run_paper` runs (flag names = field names; see `configs/paper/*.flags`).

    Args:
        world_flagfile: the synthetic world's profile; world_dir: use this existing dataset instead.
        prepare_flagfile: flags of `python -m mm_ads.data.prepare` (format, input, options; e.g.
            `configs/data/movielens100k.flags`): prepare that dataset into `DIR/data` instead of a synthetic world.
        table2_flagfile: the Table 2 profile (`configs/reports/table2_*.flags`); its world is this report's.
        encoder_row: the Table 2 text row whose encoder gives the vectors of Table 3 and Figs 3, 6b, 6c, or
            "auto": the best of `encoder_candidates` by validation `encoder_metric` (needs valid pairs).
        encoder_candidates / encoder_metric: what "auto" chooses among (generic pretrained encoder first) and on.
        control_variants: variants re-run on random unit vectors (the control); empty = no control.
        vector_table: use this item → vector table (a path or a name in the dataset's manifest, e.g. the
            Taobao-MM reader's `scl`) instead: Table 2 and Fig 6a are then skipped (data without pre-training
            pairs).
        ctr_config_dir: where `<variant>.flags` are; ctr_overrides: `name=value` applied to every CTR run.
        make_epochs: MAKE pre-training epochs of the MAKE variants (0 = their flagfiles').
        variants / seeds: Table 3.
        id_epochs: Table 3's multi-epoch control: the id model also trained this many epochs (each ≥ 2; its last
            epoch is scored), one row per entry, so that a variant's gain over id is not just a gain of more epochs.
        new_item_slices: the evaluation slices of the new-item table (`mm_ads.metrics.CTRMetrics`' slice names).
        default_row_off_variants: variants re-run with `admit_after=0` for the new-item table; empty = none.
        modality_variants: Table 3 by modality (the paper's case study is images; it says several modalities can be
            used at once): these variants also trained on image vectors and on image + text vectors
            (`--vector_table=image=...,text=...`), each against Table 3's id runs; the text rows are Table 3's. The
            image vectors are the catalogue's images encoded by the Table 2 row `image_row` of the synthetic_image
            benchmark, which the Table 2 profile must run. Empty = skipped.
        image_row: the synthetic_image Table 2 row whose encoder gives the image vectors of `modality_variants`.
        make_fusions: how the MAKE variants of `modality_variants` combine image and text (`make_fusion`): one row
            "image+text" for the first, one "image+text, <fusion> MAKE" for each other.
        fig3_epochs: epochs of Fig 3. fig6a_rows: Table 2 rows of Fig 6a. fig6c_epochs: MAKE pre-training epochs.
            `fig3_epochs=0` or an empty `fig6a_rows` / `fig6c_epochs` skips that figure (the quick profile).
    """

    world_flagfile: str = "configs/data/demo.flags"
    world_dir: str = ""
    prepare_flagfile: str = ""
    table2_flagfile: str = "configs/reports/table2_demo.flags"
    encoder_row: str = "scl"
    encoder_candidates: tuple = ("minilm_zero_shot", "scl_minilm", "scl")
    encoder_metric: str = "acc@5"
    control_variants: tuple = ()
    vector_table: str = ""
    ctr_config_dir: str = "configs/ctr"
    ctr_overrides: tuple = ()
    make_epochs: int = 0
    variants: tuple = TABLE3_VARIANTS
    seeds: tuple = (0, 1, 2)
    id_epochs: tuple = ()
    new_item_slices: tuple = ("new", "age_<1d")
    default_row_off_variants: tuple = ()
    fig3_epochs: int = 4
    fig6a_rows: tuple = ("untrained", "scl_no_triplet_no_queue", "scl_no_triplet", "scl")
    fig6c_epochs: tuple = (0, 1, 2, 4)
    modality_variants: tuple = ()
    image_row: str = "scl"
    make_fusions: tuple = ("concat",)

    def validate(self):
        bad = [v for v in self.variants if v not in config_lib.CTR_VARIANTS]
        if bad or "id" not in self.variants:
            raise ValueError(f"variants must include 'id' and be CTR variants {config_lib.CTR_VARIANTS}, got "
                             f"{list(self.variants)}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if self.make_epochs < 0:
            raise ValueError(f"make_epochs must be >= 0, got {self.make_epochs}")
        if any(int(e) < 2 for e in self.id_epochs):
            raise ValueError(f"id_epochs entries are epochs >= 2 (one epoch is Table 3's id row), got "
                             f"{list(self.id_epochs)}")
        if self.fig3_epochs < 0:
            raise ValueError(f"fig3_epochs must be >= 0 (0 = no Fig 3), got {self.fig3_epochs}")
        if any(e < 0 for e in self.fig6c_epochs):
            raise ValueError(f"fig6c_epochs must be >= 0, got {list(self.fig6c_epochs)}")
        for item in self.ctr_overrides:
            if "=" not in item:
                raise ValueError(f"ctr_overrides entries are name=value, got {item!r}")
        for row in (*([] if self.encoder_row == "auto" else [self.encoder_row]), *self.fig6a_rows,
                    *self.encoder_candidates):
            if row not in table2_lib.ROWS:
                raise ValueError(f"{row!r} is not a Table 2 row ({sorted(table2_lib.ROWS)}) or 'auto'")
        if self.encoder_row == "auto" and not self.encoder_candidates:
            raise ValueError("encoder_row=auto needs encoder_candidates")
        if self.encoder_metric not in ("acc@1", "acc@5", "acc@10"):
            raise ValueError(f"encoder_metric must be acc@1, acc@5 or acc@10, got {self.encoder_metric!r}")
        bad = [v for v in self.control_variants if v == "id" or v not in self.variants]
        if bad:
            raise ValueError(f"control_variants must be multimodal variants of `variants`, got {bad}")
        bad = [v for v in self.default_row_off_variants if v not in self.variants]
        if bad:
            raise ValueError(f"default_row_off_variants must be variants of `variants`, got {bad}")
        if self.prepare_flagfile and self.world_dir:
            raise ValueError("give prepare_flagfile or world_dir, not both")
        bad = [f for f in self.make_fusions if f not in config_lib.MAKE_FUSIONS]
        if bad or not self.make_fusions:
            raise ValueError(f"make_fusions must be one or more of {config_lib.MAKE_FUSIONS}, got "
                             f"{list(self.make_fusions)}")
        bad = [v for v in self.modality_variants if v == "id" or v not in self.variants]
        if bad:
            raise ValueError(f"modality_variants must be multimodal variants of `variants`, got {bad}")
        if self.modality_variants and self.vector_table:
            raise ValueError("modality_variants encodes the world's images with a Table 2 encoder: it cannot be used "
                             "with vector_table")
        if "synthetic_image" not in table2_lib.ROW_BENCHMARKS.get(self.image_row, ()):
            raise ValueError(f"image_row must be a Table 2 row of the synthetic_image benchmark, got "
                             f"{self.image_row!r}")
        return self

    @classmethod
    def from_values(cls, values):
        """From `{field: value}` (flagfile strings or typed values); unknown names are an error."""
        return mm_options.options_from_values(cls, values, "paper report")


def _table_row(by_seed, id_by_seed=None):
    """A Table 3 row from `{seed: metrics}`: AUC, GAUC and LogLoss (mean, std over the seeds) and, against
    `id_by_seed` (the id run of the same seeds), each one's relative difference seed by seed."""
    row = {}
    for key in ("auc", "gauc", "logloss"):
        row[key] = mean_std([m[key] for m in by_seed.values()])
        if id_by_seed is not None:
            row[f"{key}_rel"] = mean_std([(by_seed[s][key] - id_by_seed[s][key]) / id_by_seed[s][key]
                                           for s in by_seed])
    return row


def mean_std(values):
    """(mean, sample std) of `values`; std 0 for one value."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


class PaperRunner:
    def __init__(self, options, output_dir):
        self.o = options.validate()
        self.out = os.path.abspath(output_dir)
        self.results = {"options": dataclasses.asdict(options), "wall_s": {}}
        self.world = None
        self.tables = {}
        self.trained = set()  # CTR model dirs trained by this invocation
        self.reused = {}  # CTR model dir finished before this invocation → its recorded wall seconds
        self.encoder_row = None if options.encoder_row == "auto" else options.encoder_row  # set by choose_encoder

    # -- building blocks ---------------------------------------------------------------------
    def _timed(self, name, fn):
        start = time.time()
        value = fn()
        self.results["wall_s"][name] = round(time.time() - start, 1)
        logging.info("paper report: %s done in %.0f s", name, time.time() - start)
        return value

    def ctr_values(self, variant):
        """Flag values of a CTR run of `variant` (`make_only`: MAKE's pre-training run, from make.flags)."""
        flagfile = "make" if variant == "make_only" else variant
        values = config_lib.read_flagfile(os.path.join(self.o.ctr_config_dir, f"{flagfile}.flags"))
        values.update(item.split("=", 1) for item in self.o.ctr_overrides)
        if self.o.make_epochs and variant in ("make", "simtier_make", "make_only"):
            values["make_epochs"] = str(self.o.make_epochs)
        if variant == "make_only":
            values["variant"] = "make_only"
            if float(values.get("make_learning_rate", 0) or 0) > 0:  # as in MAKE's pre-training (phase A)
                values["dense_learning_rate"] = values["make_learning_rate"]
        return values

    def ctr(self, variant, seed, model_dir, vector_row=None, **overrides):
        """A CTR run (reused when finished); returns its metrics."""
        from mm_ads import runs

        values = self.ctr_values(variant)
        values.update(data_dir=self.world, model_dir=model_dir, seed=str(seed), export="false")
        if variant != "id":
            values["vector_table"] = self.vector_table(vector_row or self.encoder_row)
        values.update({k: str(v) for k, v in overrides.items()})
        config = config_lib.config_from_values(values)
        done = options_lib.reusable_metrics(model_dir, config)
        if done is None:
            self.trained.add(model_dir)
            return runs.run(config)
        if model_dir not in self.trained:
            self.reused[model_dir] = run_dir.wall_s(done)
        return done

    def vector_table(self, row):
        """`vectors/<row>.parquet`: the catalogue encoded by Table 2 row `row`'s text encoder (or the
        `vector_table` option when set)."""
        if row == RANDOM_ROW:
            return self.random_vectors()
        if self.o.vector_table:
            return self.o.vector_table
        path = os.path.join(self.out, "vectors", f"{row}.parquet")
        if row in self.tables:
            return self.tables[row]
        if not os.path.exists(path):
            from mm_ads.scl.encode import encode_catalogue

            encode_catalogue(self.encoder(row), self.world, "text", path)
        self.tables[row] = path
        return path

    def random_vectors(self):
        """`vectors/random.parquet`: a random unit vector per catalogue item (seed 0), of the Table 3 vectors' dim."""
        from mm_ads.data.vectors import VectorTable, random_unit_vectors, read_table_info, write_vector_table

        path = os.path.join(self.out, "vectors", f"{RANDOM_ROW}.parquet")
        if not os.path.exists(path):
            real = VectorTable.load(self.vector_table(self.encoder_row))
            write_vector_table(path, real.item_ids, random_unit_vectors(len(real.item_ids), real.dim),
                               "random-unit-vectors-seed0", source="mm_ads.reports.paper")
        read_table_info(path)
        return path

    def choose_encoder(self):
        """`encoder_row=auto`: the candidate with the best validation `encoder_metric` (see the module docstring)."""
        rows = self.table2["benchmarks"]["synthetic_text"]["rows"]
        metric = self.o.encoder_metric
        scores = {r: rows[r]["valid"][metric] for r in self.o.encoder_candidates
                  if metric in (rows.get(r, {}).get("valid") or {})}
        if not scores:
            raise ValueError(f"encoder_row=auto: no candidate of {list(self.o.encoder_candidates)} has a validation "
                             f"{metric} (the dataset needs pretrain/text_pairs valid; Table 2 rows: "
                             f"{ {r: sorted(v) for r, v in rows.items()} })")
        best = max(scores.values())
        chosen = next(r for r in self.o.encoder_candidates if scores.get(r) == best)
        generic = next((r for r in self.o.encoder_candidates if r in scores), None)
        reason = (f"{chosen} has the best validation {metric} ({best:.4f}) among " +
                  ", ".join(f"{r} {v:.4f}" for r, v in scores.items()))
        if chosen != generic:
            reason += f"; it beats the generic encoder {generic} ({scores[generic]:.4f})"
        skipped = [r for r in self.o.encoder_candidates if r not in scores]
        if skipped:
            reason += f"; not available: {', '.join(skipped)}"
        logging.info("paper report: encoder for Table 3: %s", reason)
        self.encoder_row = chosen
        return {"row": chosen, "metric": metric, "valid": scores, "reason": reason}

    def encoder(self, row, benchmark="synthetic_text"):
        import keras

        from mm_ads.scl.encode import load_encoder

        info = self.table2["benchmarks"].get(benchmark, {}).get("rows", {}).get(row)
        if info is None or "skipped" in info:
            raise ValueError(f"Table 2 has no usable {benchmark} row {row!r}: {info}")
        t2 = table2_lib.Table2Config.from_values(table2_lib.read_profile(self.o.table2_flagfile))
        if row == "untrained":
            flagfile = t2.image_flagfile if benchmark == "synthetic_image" else t2.text_flagfile
            task = table2_lib._scl_task(flagfile, self.world, t2)
            keras.utils.set_random_seed(t2.seed)
            return task.build_model().encoder
        if row == "minilm_zero_shot":
            from mm_ads.scl.pretrained_tower import PretrainedTextTower

            return PretrainedTextTower(name="minilm")
        metrics = finished_metrics(info["model_dir"])
        if row == "clip_e":
            return load_encoder(metrics["encoders"]["image" if benchmark == "synthetic_image" else "text"])
        return load_encoder(run_dir.path(info["model_dir"], run_dir.ENCODER))

    # -- steps -------------------------------------------------------------------------------
    def make_world(self):
        if self.o.world_dir:
            return os.path.abspath(self.o.world_dir)
        path = os.path.join(self.out, "data")
        if self.o.prepare_flagfile and not os.path.exists(os.path.join(path, "manifest.json")):
            prepare_dataset(self.o.prepare_flagfile, path)
        elif not os.path.exists(os.path.join(path, "manifest.json")):
            from mm_ads.data import synthetic

            synthetic.generate(synthetic.world_config_from_flagfile(self.o.world_flagfile), path,
                               provenance={"generator": "mm_ads.reports.paper",
                                           "world_flagfile": self.o.world_flagfile})
        return path

    def run_table2(self):
        values = dict(table2_lib.read_profile(self.o.table2_flagfile), world_dir=self.world)
        options = table2_lib.Table2Config.from_values(values)
        if "synthetic_text" not in options.benchmarks:
            raise ValueError(f"{self.o.table2_flagfile}: the paper report needs the synthetic_text benchmark")
        if self.o.modality_variants and ("synthetic_image" not in options.benchmarks or
                                         self.o.image_row not in options.rows):
            raise ValueError(f"modality_variants needs image vectors from the Table 2 row {self.o.image_row!r} of "
                             f"the synthetic_image benchmark: {self.o.table2_flagfile} runs the benchmarks "
                             f"{list(options.benchmarks)} and rows {list(options.rows)}")
        return table2_lib.run_table2(options, os.path.join(self.out, "table2"))

    def run_table3(self):
        return self._run_variants("ctr", self.o.variants, self.encoder_row)

    def image_vector_table(self):
        """`vectors/image_<image_row>.parquet`: the catalogue's images encoded by Table 2's synthetic_image row
        `image_row` (at the image size of the Table 2 profile's image flagfile)."""
        path = os.path.join(self.out, "vectors", f"image_{self.o.image_row}.parquet")
        if not os.path.exists(path):
            from mm_ads.scl.encode import encode_catalogue

            t2 = table2_lib.Table2Config.from_values(table2_lib.read_profile(self.o.table2_flagfile))
            size = int(config_lib.read_flagfile(t2.image_flagfile).get("image_size", 32))
            encode_catalogue(self.encoder(self.o.image_row, "synthetic_image"), self.world, "image", path,
                             image_size=size)
        return path

    def run_modalities(self, table3_runs):
        """Table 3 by modality: `modality_variants` on the text vectors (Table 3's runs), on image vectors and on
        image + text (one model over both modalities), each relative to Table 3's id runs of the same seed."""
        text = self.vector_table(self.encoder_row)
        image = self.image_vector_table()
        both = f"image={image},text={text}"
        sets = [("image", image, {}), *[("image+text" if i == 0 else f"image+text, {fusion} MAKE", both,
                                        {"make_fusion": fusion}) for i, fusion in enumerate(self.o.make_fusions)]]
        rows, runs = {}, {}
        for name, table, overrides in sets:
            for seed in self.o.seeds:
                for variant in self.o.modality_variants:
                    if overrides and variant not in config_lib.MAKE_VARIANTS and name != "image+text":
                        continue  # the fusion rows are for the MAKE variants
                    folder = name.replace("+", "_").replace(", ", "_").replace(" ", "_")
                    model_dir = os.path.join(self.out, "modalities", folder, variant, f"seed{seed}")
                    if variant == "simtier_make" and "make" in self.o.modality_variants:  # the same phase A
                        self._share_make_pretraining(os.path.join(self.out, "modalities", folder, "make",
                                                                  f"seed{seed}"), model_dir, self.encoder_row,
                                                     vector_table=table, **overrides)
                    runs.setdefault(name, {}).setdefault(variant, {})[seed] = self.ctr(
                        variant, seed, model_dir, vector_table=table, **overrides)
        for variant in self.o.modality_variants:
            rows[variant] = {"text": _table_row(table3_runs[variant], table3_runs["id"])}
            for name, _, _ in sets:
                if variant in runs.get(name, {}):
                    rows[variant][name] = _table_row(runs[name][variant], table3_runs["id"])
        by_seed = {name: {v: {str(s): {k: m[k] for k in ("auc", "gauc", "logloss")} for s, m in r.items()}
                          for v, r in by_variant.items()} for name, by_variant in runs.items()}
        # image + text against the better single modality (by mean GAUC), seed by seed: the GAUC change
        both = {}
        for variant in self.o.modality_variants:
            singles = {"text": table3_runs[variant], "image": runs["image"][variant]}
            best = max(singles, key=lambda k: sum(m["gauc"] for m in singles[k].values()))
            change = [(runs["image+text"][variant][s]["gauc"] - singles[best][s]["gauc"]) / singles[best][s]["gauc"]
                      for s in self.o.seeds]
            both[variant] = {"best_single": best, "gauc_rel": mean_std(change)}
        fusions = {fusion: runs[name] for name, fusion in zip(
            [n for n, _, _ in sets[1:]], self.o.make_fusions)}
        return {"rows": rows, "runs": by_seed, "image_vectors": os.path.relpath(image, self.out),
                "image_row": self.o.image_row, "both_vs_best_single": both,
                "fusion_choice": choose_make_fusion(fusions)}

    def run_id_epochs(self, table3_runs):
        """Table 3's multi-epoch id rows: `{epochs: row}` with GAUC/AUC/LogLoss and each relative to the one-epoch
        id run of the same seed."""
        rows = {}
        for epochs in self.o.id_epochs:
            by_seed = {seed: self.ctr("id", seed, os.path.join(self.out, "ctr", f"id_epochs{epochs}", f"seed{seed}"),
                                      epochs=epochs) for seed in self.o.seeds}
            rows[str(epochs)] = _table_row(by_seed, table3_runs["id"])
        return rows

    def run_control(self, table3_runs):
        """The random-vector control: `control_variants` on random unit vectors, relative to Table 3's id runs."""
        summary, runs = self._run_variants("control", self.o.control_variants, RANDOM_ROW,
                                           id_runs=table3_runs["id"])
        table = summary["table"]
        within = {v: abs(r["gauc_rel"][0]) <= max(r["gauc_rel"][1], table3_std(table3_runs, "id")) for v, r in
                  table.items() if v != "id"}
        # what the vectors' content adds: each variant on the report's vectors against itself on random vectors,
        # seed by seed (the part of a variant's gain over id that random per-item vectors also give is not
        # semantic)
        content = {v: mean_std([(table3_runs[v][s]["gauc"] - runs[v][s]["gauc"]) / runs[v][s]["gauc"]
                                 for s in runs[v]]) for v in runs if v != "id" and v in table3_runs}
        return dict(summary, within_seed_spread=within, content_gauc_rel=content)

    def _run_variants(self, root, variants, vector_row, id_runs=None):
        runs = {} if id_runs is None else {"id": id_runs}
        for seed in self.o.seeds:
            for variant in variants:
                model_dir = os.path.join(self.out, root, variant, f"seed{seed}")
                if variant == "simtier_make" and "make" in variants:
                    self._share_make_pretraining(os.path.join(self.out, root, "make", f"seed{seed}"), model_dir,
                                                 vector_row)
                runs.setdefault(variant, {})[seed] = self.ctr(variant, seed, model_dir, vector_row=vector_row)
        table = {variant: _table_row(by_seed, None if variant == "id" else runs["id"])
                 for variant, by_seed in runs.items()}
        return {"runs": {v: {str(s): {k: m[k] for k in ("auc", "gauc", "logloss")} for s, m in r.items()}
                         for v, r in runs.items()}, "table": table}, runs

    def run_popularity(self, table3_runs):
        """Table 3's non-learned popularity rows on the CTR runs' eval split (`mm_ads.reports.popularity`)."""
        values = self.ctr_values("id")
        base = popularity_lib.popularity_baselines(self.world, eval_split=values.get("eval_split", "test"),
                                                   train_split=values.get("train_split", "train"))
        return popularity_rows(base, table3_runs.get("id", {}))

    def _share_make_pretraining(self, make_dir, target_dir, vector_row, variant="simtier_make", **overrides):
        """Copies `make`'s MAKE pre-training into a run of `variant` (with `overrides`) when it is the same
        computation."""
        from mm_ads.ctr import make as make_lib

        src = os.path.join(make_dir, make_lib.MAKE_DIR)
        dst = os.path.join(target_dir, make_lib.MAKE_DIR)
        if os.path.exists(dst) or finished_metrics(src) is None:
            return
        with open(run_dir.path(src, run_dir.CONFIG)) as f:
            done = json.load(f)
        values = self.ctr_values(variant)
        values.update(data_dir=self.world, model_dir=target_dir, seed=done["train"]["seed"], export="false",
                      vector_table=self.vector_table(vector_row))
        values.update({k: str(v) for k, v in overrides.items()})
        planned = make_lib.pretrain_config(config_lib.config_from_values(values)).to_json()
        planned = json.loads(json.dumps(planned))
        same = all(planned[k] == done[k] for k in ("data", "model", "train"))
        if same:
            shutil.copytree(src, dst)
            # the copy's own model dir
            io_utils.write_json(run_dir.path(dst, run_dir.CONFIG), dict(done, model_dir=planned["model_dir"]))
            logging.info("%s seed %s: MAKE pre-training shared with %s", variant, done["train"]["seed"], src)

    def run_fig3(self, table3_runs):
        seed = self.o.seeds[0]
        id_dir = os.path.join(self.out, "fig3", "id")
        source = os.path.join(self.out, "ctr", "id", f"seed{seed}")
        if finished_metrics(id_dir) is None and not os.path.exists(id_dir) and os.path.exists(source):
            shutil.copytree(source, id_dir, ignore=shutil.ignore_patterns(run_dir.METRICS, run_dir.EXPORT))
        id_metrics = self.ctr("id", seed, id_dir, epochs=self.o.fig3_epochs)
        mm_dir = os.path.join(self.out, "fig3", "make_only")
        pretrained = os.path.join(self.out, "ctr", "make", f"seed{seed}", run_dir.MAKE_DIR)  # the same run when as long
        if not os.path.exists(mm_dir) and finished_metrics(pretrained) is not None and \
                finished_metrics(pretrained).get("epochs") == self.o.fig3_epochs:
            shutil.copytree(pretrained, mm_dir)
        mm_metrics = self.ctr("make_only", seed, os.path.join(self.out, "fig3", "make_only"),
                              epochs=self.o.fig3_epochs)
        return {name: [{"epoch": h["epoch"], "gauc": h["gauc"], "auc": h["auc"]} for h in m["eval_history"]]
                for name, m in (("id", id_metrics), ("make_only", mm_metrics))}

    def run_fig6a(self, table3_runs, table2):
        seed = self.o.seeds[0]
        points = []
        for row in self.o.fig6a_rows:
            info = table2["benchmarks"]["synthetic_text"]["rows"].get(row, {})
            if "acc@1" not in info:
                continue
            if row == self.encoder_row and "simtier" in table3_runs:
                m = table3_runs["simtier"][seed]
            else:
                m = self.ctr("simtier", seed, os.path.join(self.out, "fig6a", row), vector_row=row)
            points.append({"row": row, "acc@1": info["acc@1"], "gauc": m["gauc"], "auc": m["auc"]})
        return points

    def run_fig6b(self, table3_runs):
        if "simtier_make" not in table3_runs:
            return None
        out = {}
        for name in FREQ_SLICES:
            auc, loss = [], []
            for seed, mm in table3_runs["simtier_make"].items():
                a, b = table3_runs["id"][seed]["slices"].get(name), mm["slices"].get(name)
                if not a or not b or a.get("auc") is None or b.get("auc") is None:
                    continue
                auc.append((b["auc"] - a["auc"]) / a["auc"])
                loss.append((a["logloss"] - b["logloss"]) / a["logloss"])
            if auc:
                out[name] = {"auc_rel": mean_std(auc), "logloss_rel": mean_std(loss),
                             "num_examples": table3_runs["id"][self.o.seeds[0]]["slices"][name]["num_examples"]}
        return out

    def run_default_row_off(self, table3_runs):
        """`default_row_off_variants` with admission off (`admit_after=0`), Table 3's seeds and vectors."""
        runs = {}
        for seed in self.o.seeds:
            for variant in self.o.default_row_off_variants:
                model_dir = os.path.join(self.out, "default_row_off", variant, f"seed{seed}")
                if variant in config_lib.MAKE_VARIANTS and "make" in table3_runs:
                    self._share_make_pretraining(os.path.join(self.out, "ctr", "make", f"seed{seed}"), model_dir,
                                                 self.encoder_row, variant=variant, admit_after=0, cold_item_rate=0)
                # no admission counts: no new-item path either (it needs them)
                runs.setdefault(variant, {})[seed] = self.ctr(variant, seed, model_dir, admit_after=0,
                                                              cold_item_rate=0)
        return runs

    def run_new_items(self, table3_runs, default_row_off):
        return new_item_table(table3_runs, default_row_off, self.o.new_item_slices)

    def run_fig6c(self, table3_runs):
        seed = self.o.seeds[0]
        base = self.ctr_values("make")
        default_epochs = int(base.get("make_epochs", 4))
        points = []
        for epochs in self.o.fig6c_epochs:
            same = "make" in table3_runs and "early_stopping" not in table3_runs["make"][seed].get("make_pretrain", {})
            if epochs == default_epochs and same:  # the Table 3 run is this point (no early stopping there)
                m = table3_runs["make"][seed]
            else:
                m = self.ctr("make", seed, os.path.join(self.out, "fig6c", f"make_epochs{epochs}"), make_epochs=epochs,
                             make_patience=0)
            points.append({"make_epochs": epochs, "gauc": m["gauc"], "auc": m["auc"]})
        return points

    def make_validation_curve(self, table3_runs):
        """MAKE's validation GAUC per pre-training epoch of the Table 3 `make` run (first seed) and the epoch
        early stopping chose; None without early stopping (no validation split)."""
        pre = (table3_runs.get("make", {}).get(self.o.seeds[0]) or {}).get("make_pretrain") or {}
        if "early_stopping" not in pre:
            return None
        es = pre["early_stopping"]
        return {"curve": [{"epoch": round(h["epoch"]), "gauc": h["gauc"]} for h in pre["eval_history"]],
                "chosen_epoch": es["best_epoch"], "max_epochs": es["max_epochs"], "patience": es["patience"],
                "chosen_by_seed": {str(s): m["make_pretrain"]["early_stopping"]["best_epoch"]
                                   for s, m in table3_runs["make"].items()
                                   if "early_stopping" in m.get("make_pretrain", {})}}

    @staticmethod
    def training_epochs(table3_runs):
        """`{variant: {"by_seed": {seed: epoch}, "max_epochs", "patience", "split"}}`: the training epoch early
        stopping chose for every Table 3 run that trained with it (`--ctr_overrides=epochs=N,
        early_stopping_patience=P`); {} when none did."""
        out = {}
        for variant, by_seed in table3_runs.items():
            stops = {str(s): m["early_stopping"] for s, m in by_seed.items() if "early_stopping" in m}
            if stops:
                first = next(iter(stops.values()))
                out[variant] = {"by_seed": {s: es["best_epoch"] for s, es in stops.items()},
                                "max_epochs": first["max_epochs"], "patience": first["patience"],
                                "split": first.get("split", "eval")}
        return out

    def run(self):
        check_dependencies(self.o)  # before any work
        start = time.time()
        os.makedirs(self.out, exist_ok=True)
        self.world = self._timed("data", self.make_world)
        self.table2 = {"benchmarks": {}}
        if not self.o.vector_table:
            self.table2 = self._timed("table2", self.run_table2)
            rows = self.table2["benchmarks"]["synthetic_text"]["rows"]
            if self.encoder_row is None:
                self.results["encoder_choice"] = self.choose_encoder()
            self._timed("vectors", lambda: [self.vector_table(r) for r in {self.encoder_row, *self.o.fig6a_rows}
                                            if "acc@1" in rows.get(r, {})])
        elif self.encoder_row is None:
            raise ValueError("encoder_row=auto chooses among Table 2 rows: it cannot be used with vector_table")
        self.results["table2"] = self.table2["benchmarks"]
        self.results["table3"], runs = self._timed("table3", self.run_table3)
        self.results["table3"]["baselines"] = self._timed("popularity", lambda: self.run_popularity(runs))
        self.results["table3"]["id_epochs"] = (self._timed("id_epochs", lambda: self.run_id_epochs(runs))
                                               if self.o.id_epochs else {})
        self.results["control"] = (self._timed("control", lambda: self.run_control(runs))
                                   if self.o.control_variants else None)
        self.results["make_validation"] = self.make_validation_curve(runs)
        self.results["training_epochs"] = self.training_epochs(runs)
        self.results["fig3"] = self._timed("fig3", lambda: self.run_fig3(runs)) if self.o.fig3_epochs else {}
        self.results["fig6a"] = [] if self.o.vector_table or not self.o.fig6a_rows else self._timed(
            "fig6a", lambda: self.run_fig6a(runs, self.table2))
        self.results["fig6b"] = self.run_fig6b(runs)
        rows_off = (self._timed("default_row_off", lambda: self.run_default_row_off(runs))
                    if self.o.default_row_off_variants else {})
        self.results["new_items"] = self.run_new_items(runs, rows_off)
        self.results["fig6c"] = self._timed("fig6c", lambda: self.run_fig6c(runs)) if self.o.fig6c_epochs else []
        self.results["modalities"] = (self._timed("modalities", lambda: self.run_modalities(runs))
                                      if self.o.modality_variants else {})
        self.results["data"] = self._describe_data()
        self.results["findings"] = findings(self.results)
        self.results["wall_s"]["total"] = round(time.time() - start, 1)
        t2 = self.table2
        self.results["reused"] = {"runs": len(self.reused) + t2.get("reused_runs", 0),
                                  "wall_s": round(sum(self.reused.values()) + t2.get("reused_wall_s", 0),
                                                        1)}
        self.results["plots"] = {}
        self._write()  # the results are on disk before anything is plotted
        try:
            self.results["plots"] = plot_all(self.results, self.out)
        except Exception:
            logging.error("paper report: plotting failed; the results are in %s and %s",
                          os.path.join(self.out, "results.json"), os.path.join(self.out, "report.md"))
            raise
        self._write()
        return self.results

    def _write(self):
        io_utils.write_json(os.path.join(self.out, "results.json"), self.results)
        with io_utils.atomic_file(os.path.join(self.out, "report.md")) as f:
            f.write(to_markdown(self.results, self.out))

    def _describe_data(self):
        from mm_ads.data.dataset import Manifest

        m = Manifest.load(self.world)
        pairs = m.num_rows("pretrain/text_pairs", "train") if "pretrain/text_pairs" in m.components else 0
        ctr = m.components.get("ctr", {})
        return {"data_dir": self.world, "name": m.name, "train_impressions": m.num_rows("ctr", "train"),
                "valid_impressions": m.num_rows("ctr", "valid") if "valid" in ctr else 0,
                "test_impressions": m.num_rows("ctr", "test"), "generator": m.extra.get("config"),
                "text_pairs_train": pairs, "vector_table": self.o.vector_table or None,
                "encoder_row": self.encoder_row}


RANDOM_ROW = "random"


def new_item_table(table3_runs, default_row_off, slice_names):
    """The new-item table (paper section 6.4): for each slice of `slice_names`, one row per Table 3 variant and
    per default-row-off run, with AUC and GAUC (mean ± std over seeds) and their per-seed change against Table 3's
    id (default row on) of the same seed. A slice that a run did not report, or that is empty, is left out; a
    metric that is undefined on a seed (e.g. no user with both classes on the slice) is None."""
    out = {}
    for name in slice_names:
        rows = []
        for default_row, runs in (("on", table3_runs), ("off", default_row_off)):
            for variant, by_seed in runs.items():
                entries = {s: (m.get("slices") or {}).get(name) for s, m in by_seed.items()}
                if not entries or any(not e or not e.get("num_examples") for e in entries.values()):
                    continue
                users = [e.get("gauc_num_users") for e in entries.values()]
                row = {"variant": variant, "default_row": default_row,
                       "num_examples": next(iter(entries.values()))["num_examples"],
                       "gauc_users": min(users) if None not in users else None}
                for key in ("auc", "gauc"):
                    values = {s: e.get(key) for s, e in entries.items()}
                    if any(v is None or math.isnan(v) for v in values.values()):
                        row[key] = row[f"{key}_rel"] = None
                        continue
                    row[key] = mean_std(list(values.values()))
                    ref = {s: ((table3_runs["id"].get(s) or {}).get("slices") or {}).get(name, {}).get(key)
                           for s in values}
                    comparable = all(r is not None and not math.isnan(r) for r in ref.values())
                    row[f"{key}_rel"] = (None if (variant == "id" and default_row == "on") or not comparable else
                                         mean_std([(values[s] - ref[s]) / ref[s] for s in values]))
                rows.append(row)
        if rows:
            out[name] = rows
    return out


def new_items_markdown(new_items):
    """The report's new-item section; [] when no slice was reported."""
    if not new_items:
        return []

    def cell(value, percent=False):
        return "—" if value is None else _pm(value, percent)

    lines = ["", "## New items (paper section 6.4)", "",
             "`new`: test impressions of items with no training impression; `age_<1d`: items created less than a "
             "day before the impression. Default row on: an id never seen in training reads its table's default "
             "row (`admit_after` ≥ 1, the default); off: `admit_after=0`, it reads its randomly initialised row. "
             "Changes are against id with the default row on, seed by seed. GAUC counts only users with a click "
             "and a non-click on the slice: with few such users it says little.", ""]
    for name, rows in new_items.items():
        lines += [f"### `{name}` ({rows[0]['num_examples']:,} test examples)", "",
                  "| variant | default row | AUC | GAUC | users in GAUC (fewest over seeds) | AUC vs id | GAUC vs id |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['variant']} | {r['default_row']} | {cell(r['auc'])} | {cell(r['gauc'])} | "
                  f"{'—' if r.get('gauc_users') is None else r['gauc_users']} | "
                  f"{cell(r['auc_rel'], True)} | {cell(r['gauc_rel'], True)} |" for r in rows]
        lines.append("")
    return lines


def table3_std(runs, variant, key="gauc"):
    """The seed std of `variant`'s `key` in a `{variant: {seed: metrics}}` mapping, relative to its mean."""
    values = [m[key] for m in runs[variant].values()]
    mean, std = mean_std(values)
    return std / mean


def prepare_dataset(flagfile, output_dir):
    """Runs `python -m mm_ads.data.prepare --flagfile=FLAGFILE --output_dir=OUTPUT_DIR` (its own flag parsing and
    errors); raises RuntimeError with the command's error output when it fails."""
    import subprocess

    if not os.path.exists(flagfile):
        raise FileNotFoundError(f"prepare_flagfile {flagfile} not found")
    cmd = [sys.executable, "-m", "mm_ads.data.prepare", f"--flagfile={flagfile}", f"--output_dir={output_dir}"]
    logging.info("paper report: %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"preparing the dataset failed ({' '.join(cmd)}): {done.stderr.strip()[-2000:]}")


# -- findings, plots, markdown -----------------------------------------------------------------
def _spearman(x, y):
    if len(x) < 3:
        return None
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def findings(results):
    """Whether each ordering the paper reports holds in these results (plain statements)."""
    out = []
    t3 = results["table3"]["table"]
    order = [v for v in ("simtier_make", "simtier", "make", "simscore", "vector") if v in t3]
    for v in order:
        gain = t3[v]["gauc_rel"][0]
        out.append(f"Table 3: {v} GAUC vs id {gain:+.2%} — " + ("better than id, as in the paper" if gain > 0 else
                                                                 "NOT better than id (the paper: better)"))
    out += id_epochs_findings(results["table3"])
    if "simtier_make" in t3 and "simtier" in t3 and "make" in t3:
        best = t3["simtier_make"]["gauc"][0] >= max(t3["simtier"]["gauc"][0], t3["make"]["gauc"][0])
        out.append("Table 3: simtier_make is " + ("the best variant, as in the paper" if best else
                                                  "NOT above both simtier and make (the paper: best)"))
    rows = results["table2"].get("synthetic_text", {}).get("rows", {})
    chain = [r for r in ("scl", "scl_no_triplet", "scl_no_triplet_no_queue") if "acc@1" in rows.get(r, {})]
    accs = [rows[r]["acc@1"] for r in chain]
    if len(chain) == 3:
        holds = accs[0] >= accs[1] >= accs[2]
        out.append("Table 2 (synthetic text): SCL ≥ w/o triplet ≥ w/o triplet & MoCo in Acc@1 " +
                   ("holds" if holds else "does NOT hold") + f" ({', '.join(f'{a:.3f}' for a in accs)})")
    generic = [rows[r]["acc@1"] for r in ("untrained", "minilm_zero_shot", "clip_e") if "acc@1" in rows.get(r, {})]
    if generic and "acc@1" in rows.get("scl", {}):
        out.append("Table 2 (synthetic text): SCL beats every generic/cross-modal encoder: " +
                   ("yes" if rows["scl"]["acc@1"] > max(generic) else "NO"))
    pts = results.get("fig6a") or []
    rho = _spearman([p["acc@1"] for p in pts], [p["gauc"] for p in pts])
    if rho is not None:
        out.append(f"Fig 6a: Spearman correlation of Acc@1 and simtier GAUC over {len(pts)} encoders = {rho:+.2f} "
                   + ("(positive, as in the paper)" if rho > 0 else "(NOT positive; the paper: positive)"))
    c = results.get("fig6c") or []
    if len(c) >= 2:
        g = [p["gauc"] for p in sorted(c, key=lambda p: p["make_epochs"])]
        mono = all(b >= a for a, b in zip(g, g[1:]))
        out.append("Fig 6c: GAUC " + ("rises" if mono else "does NOT rise monotonically") +
                   " with MAKE pre-training epochs (" + ", ".join(f"{p['make_epochs']}: {p['gauc']:.4f}" for p in
                                                           sorted(c, key=lambda p: p["make_epochs"])) + ")")
    b = results.get("fig6b") or {}
    if "freq_1" in b and "freq_8" in b:
        low, high = b["freq_1"]["auc_rel"][0], b["freq_8"]["auc_rel"][0]
        out.append(f"Fig 6b: relative AUC gain on the rarest items {low:+.2%} vs the most frequent {high:+.2%} — " +
                   ("larger on rare items, as in the paper" if low > high else "NOT larger on rare items"))
    control = results.get("control")
    if control:
        table = control["table"]
        parts = [f"{v} {table[v]['gauc_rel'][0]:+.2%} ± {table[v]['gauc_rel'][1]:.2%}" for v in table if v != "id"]
        ok = all(control["within_seed_spread"].values())
        out.append("Random-vector control: " + ("every variant stays within the seed spread of id" if ok else
                   "NOT every variant stays within the seed spread of id") + f" (GAUC vs id: {', '.join(parts)})")
        content = control.get("content_gauc_rel") or {}
        if content:
            semantic = [v for v, (m, sd) in content.items() if m > sd]
            out.append("Random-vector control: the vectors' content (Table 3 vectors vs random, GAUC) adds " +
                       ", ".join(f"{v} {m:+.2%} ± {sd:.2%}" for v, (m, sd) in content.items()) +
                       f" — more than one std for {', '.join(semantic) if semantic else 'no variant'}")
    return out + modality_findings(results.get("modalities")) + new_item_findings(results.get("new_items")) + \
        popularity_findings(results)


def choose_make_fusion(runs_by_fusion):
    """MAKE's fusion of image + text chosen on validation: `{fusion: {variant: {seed: metrics}}}` (the image + text
    runs of each `make_fusions` entry) → `{"chosen", "valid": {fusion: mean validation GAUC}, "reason"}`. A fusion
    scores the mean, over its MAKE variants and seeds, of the validation GAUC at the epoch early stopping chose
    (`metrics["early_stopping"]`, split `valid`); ties go to the first fusion. `chosen` is None, with the reason,
    for a single fusion or when a run has no validation score (a dataset without a valid split, or early
    stopping off): the test split never chooses."""
    if len(runs_by_fusion) < 2:
        return {"chosen": None, "valid": {}, "reason": "one fusion measured: nothing to choose"}
    valid, missing = {}, []
    for fusion, by_variant in runs_by_fusion.items():
        scores = []
        for variant, by_seed in by_variant.items():
            if variant not in config_lib.MAKE_VARIANTS:
                continue
            for seed, m in by_seed.items():
                es = m.get("early_stopping") or {}
                if es.get("split") != "valid" or es.get("metric") != "gauc":
                    missing.append(f"{fusion}/{variant}/seed{seed}")
                else:
                    scores.append(es["best_value"])
        valid[fusion] = float(np.mean(scores)) if scores else None
    if missing or any(v is None for v in valid.values()):
        return {"chosen": None, "valid": {}, "reason": (
            "no validation GAUC for " + ", ".join(missing[:4] or list(valid)) + " (the choice needs a dataset with "
            "a valid split and --ctr_overrides=early_stopping_patience=P): not chosen, the test split never chooses")}
    chosen = max(valid, key=lambda f: (valid[f], -list(valid).index(f)))
    others = ", ".join(f"{f} {v:.4f}" for f, v in valid.items() if f != chosen)
    return {"chosen": chosen, "valid": valid,
            "reason": f"{chosen} has the best mean validation GAUC of the MAKE variants on image + text "
                      f"({valid[chosen]:.4f}; {others})"}


def modality_findings(modalities):
    """Per `modality_variants` variant: whether image + text is at least the better single modality (GAUC)."""
    out = []
    versus = (modalities or {}).get("both_vs_best_single") or {}
    for variant, rows in ((modalities or {}).get("rows") or {}).items():
        both, text, image = (rows[k]["gauc"][0] for k in ("image+text", "text", "image"))
        line = f"Modalities: {variant} on image + text GAUC {both:.4f} vs text {text:.4f}, image {image:.4f} — "
        if variant in versus:
            m, sd = versus[variant]["gauc_rel"]
            best = versus[variant]["best_single"]
            verdict = ("above the better single modality" if m > sd else
                       "level with the better single modality (within one std)" if m >= -sd else
                       "BELOW the better single modality")
            line += f"{verdict}: {m:+.2%} ± {sd:.2%} GAUC vs {best}, seed by seed"
        else:
            line += ("at least the better single modality" if both >= max(text, image) else
                     "BELOW the better single modality")
        out.append(line)
    choice = (modalities or {}).get("fusion_choice")
    if choice and choice["chosen"]:
        out.append(f"Modalities: MAKE fusion chosen on validation: {choice['reason']}")
    return out


def new_item_findings(new_items):
    """The paper's section 6.4 claims on the first new-item slice: the multimodal variants gain more on new items
    than overall, and (ours) what the default row is worth there."""
    if not new_items:
        return []
    name, rows = next(iter(new_items.items()))
    by = {(r["variant"], r["default_row"]): r for r in rows}
    out = []
    gains = [f"{v} {r['auc_rel'][0]:+.2%} ± {r['auc_rel'][1]:.2%}" for (v, on), r in by.items()
             if on == "on" and r["auc_rel"] is not None]
    if gains:
        out.append(f"New items (`{name}`, {rows[0]['num_examples']:,} test examples): AUC vs id " + ", ".join(gains))
    off = by.get(("id", "off"))
    if off and off["auc_rel"] is not None:
        m, sd = off["auc_rel"]
        out.append(f"New items (`{name}`): id with the default row off (random rows) vs on: AUC {m:+.2%} ± {sd:.2%} "
                   "— " + ("the default row helps" if m + sd < 0 else "within one std" if abs(m) <= sd else
                           "the default row hurts"))
    return out


def id_epochs_findings(table3):
    """Statements on Table 3's multi-epoch id rows: whether more epochs help the ID model, and each variant's GAUC
    against the best id row (mean GAUC over the seeds)."""
    extra = table3.get("id_epochs") or {}
    if not extra:
        return []
    t3 = table3["table"]
    ids = {1: t3["id"]["gauc"][0], **{int(e): r["gauc"][0] for e, r in extra.items()}}
    best = max(ids, key=ids.get)
    out = [f"Table 3: id trained {e} epochs: GAUC vs one epoch {r['gauc_rel'][0]:+.2%} ± {r['gauc_rel'][1]:.2%}"
           for e, r in sorted(extra.items(), key=lambda kv: int(kv[0]))]
    out.append(f"Table 3: the best id row is {best} epoch{'s' if best > 1 else ''} (GAUC {ids[best]:.4f})")
    for v in [v for v in ("simtier_make", "simtier", "make") if v in t3]:
        rel = (t3[v]["gauc"][0] - ids[best]) / ids[best]
        out.append(f"Table 3: {v} GAUC vs the best id row {rel:+.2%} — " +
                   ("better, so its gain is not just more epochs" if rel > 0 else "NOT better than the best id row"))
    return out


def popularity_rows(base, id_runs):
    """Table 3 rows of the popularity baselines: deterministic (one computation: std 0 over the seeds), with
    their relative AUC/GAUC vs each seed's id run (mean ± std over those seeds)."""
    rows = {}
    for name in popularity_lib.BASELINES:
        b = base[name]
        row = {k: None if b[k] is None else (float(b[k]), 0.0) for k in ("auc", "gauc", "logloss")}
        for key in ("auc", "gauc"):
            if id_runs:
                row[f"{key}_rel"] = mean_std([(b[key] - m[key]) / m[key] for m in id_runs.values()])
        rows[name] = row
    info = {k: base["pop_ctr"][k] for k in ("smoothing", "smoothing_from")}
    return {"rows": rows, "prior": base["prior"], "eval_split": base["eval_split"], **info}


def popularity_findings(results):
    """Whether each Table 3 variant beats both popularity rows in AUC and GAUC (plain statements)."""
    t3 = results["table3"]
    rows = (t3.get("baselines") or {}).get("rows") or {}
    if not rows:
        return []
    out = []
    for v in [v for v in TABLE3_VARIANTS if v in t3["table"]]:
        lost = [f"{p} {k.upper()}" for p in popularity_lib.BASELINES for k in ("auc", "gauc")
                if t3["table"][v][k][0] <= rows[p][k][0]]
        out.append(f"Table 3: {v} " + ("beats both popularity baselines (pop_count, pop_ctr) in AUC and GAUC" if not
                                       lost else "does NOT beat " + ", ".join(lost)))
    return out


def plot_all(results, out_dir):
    """Writes fig3.png, fig6a.png, fig6b.png, fig6c.png; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}

    def save(fig, name):
        path = os.path.join(out_dir, name)
        with io_utils.atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written[name.split(".")[0]] = name

    if results["fig3"]:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, label in (("id", "ID-based model"), ("make_only", "multimodal only (MAKE)")):
            h = results["fig3"][name]
            ax.plot([p["epoch"] for p in h], [p["gauc"] for p in h], marker="o", label=label)
        ax.set(xlabel="epoch", ylabel="test GAUC", title="Fig 3: GAUC per training epoch")
        ax.legend()
        save(fig, "fig3.png")

    pts = results["fig6a"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter([p["acc@1"] for p in pts], [p["gauc"] for p in pts])
    for p in pts:
        ax.annotate(p["row"], (p["acc@1"], p["gauc"]), fontsize=7)
    ax.set(xlabel="pre-training Acc@1", ylabel="simtier test GAUC", title="Fig 6a: Acc@1 vs GAUC")
    if pts:
        save(fig, "fig6a.png")
    else:
        plt.close(fig)

    b = results.get("fig6b") or {}
    if b:
        names = [n for n in FREQ_SLICES if n in b]
        x = np.arange(len(names))
        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        for k, (key, label) in enumerate((("auc_rel", "AUC"), ("logloss_rel", "LogLoss"))):
            ax.bar(x + (k - 0.5) * 0.4, [100 * b[n][key][0] for n in names], 0.4,
                   yerr=[100 * b[n][key][1] for n in names], label=label)
        ax.set_xticks(x, [n.replace("freq_", "G") for n in names])
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set(ylabel="relative improvement (%)", title="Fig 6b: simtier_make vs id by item frequency")
        ax.legend()
        save(fig, "fig6b.png")

    mv = results.get("make_validation")
    if results["fig6c"] or mv:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        c = sorted(results["fig6c"], key=lambda p: p["make_epochs"])
        if c:
            ax.plot([p["make_epochs"] for p in c], [p["gauc"] for p in c], marker="o",
                    label="make model, test GAUC (fixed epochs)")
        if mv:
            ax.plot([p["epoch"] for p in mv["curve"]], [p["gauc"] for p in mv["curve"]], marker="s",
                    label="MAKE alone, validation GAUC")
            best = next(p for p in mv["curve"] if p["epoch"] == mv["chosen_epoch"])
            ax.scatter([best["epoch"]], [best["gauc"]], s=120, facecolors="none", edgecolors="red",
                       label=f"chosen: epoch {mv['chosen_epoch']}")
        ax.set(xlabel="MAKE pre-training epochs (0 = joint)", ylabel="GAUC", title="Fig 6c: MAKE epochs")
        ax.legend(fontsize=7)
        save(fig, "fig6c.png")
    return written


def _pm(value, percent=False):
    mean, std = value
    return f"{mean:+.2%} ± {std:.2%}" if percent else f"{mean:.4f} ± {std:.4f}"


def table3_markdown(results):
    t3 = results["table3"]["table"]
    lines = ["| variant | AUC | GAUC | LogLoss | AUC vs id | GAUC vs id |", "|---|---:|---:|---:|---:|---:|"]
    for v in TABLE3_VARIANTS:
        if v not in t3:
            continue
        r = t3[v]
        rel = ("—", "—") if v == "id" else (_pm(r["auc_rel"], True), _pm(r["gauc_rel"], True))
        lines.append(f"| {v} | {_pm(r['auc'])} | {_pm(r['gauc'])} | {_pm(r['logloss'])} | {rel[0]} | {rel[1]} |")
    for epochs, r in sorted((results["table3"].get("id_epochs") or {}).items(), key=lambda kv: int(kv[0])):
        lines.append(f"| id, {epochs} epochs | {_pm(r['auc'])} | {_pm(r['gauc'])} | {_pm(r['logloss'])} | "
                     f"{_pm(r['auc_rel'], True)} | {_pm(r['gauc_rel'], True)} |")
    return "\n".join(lines + _popularity_lines(results["table3"].get("baselines")))


def modalities_markdown(modalities, results):
    """The "Table 3 by modality" section (empty without `modality_variants`)."""
    if not modalities:
        return []
    t2 = (results.get("table2") or {}).get("synthetic_image", {}).get("rows", {}).get(modalities["image_row"], {})
    acc = f" (image Acc@1 {t2['acc@1']:.3f} in Table 2)" if "acc@1" in t2 else ""
    lines = [f"## Table 3 by modality (mean ± std over {len(results['options']['seeds'])} seeds)", "",
             "Each variant on the text vectors (Table 3's runs), on image vectors (the catalogue's images encoded by "
             f"the `{modalities['image_row']}` image encoder of Table 2{acc}) and on both at once (one model, "
             "`--vector_table=image=...,text=...`), against Table 3's id runs of the same seeds.", "",
             "| variant | vectors | AUC | GAUC | LogLoss | GAUC vs id |", "|---|---|---:|---:|---:|---:|"]
    for variant, by_set in modalities["rows"].items():
        for name, r in by_set.items():
            lines.append(f"| {variant} | {name} | {_pm(r['auc'])} | {_pm(r['gauc'])} | {_pm(r['logloss'])} | "
                         f"{_pm(r['gauc_rel'], True)} |")
    choice = modalities.get("fusion_choice")
    if choice:
        lines += ["", f"MAKE fusion on image + text, chosen on validation: **{choice['chosen']}** — {choice['reason']}."
                  if choice["chosen"] else f"MAKE fusion on image + text: {choice['reason']}."]
    return lines + [""]


def _popularity_lines(baselines):
    """The popularity rows under Table 3 and a note on what they are (none when not computed)."""
    if not baselines:
        return []
    lines = []
    for name, r in baselines["rows"].items():
        cells = [_pm(r[k]) if r[k] is not None else "—" for k in ("auc", "gauc", "logloss")]
        cells += [_pm(r[k], True) if k in r else "—" for k in ("auc_rel", "gauc_rel")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    source = (f"chosen on the `{baselines['smoothing_from']}` split" if baselines["smoothing_from"] != "default"
              else "the default; no valid split")
    lines += ["", f"pop_count / pop_ctr: no training, scored on the same `{baselines['eval_split']}` split: the item's "
              f"train clicks (not a probability: no LogLoss) and its smoothed train CTR (clicks + a·prior) / "
              f"(impressions + a), prior = train CTR {baselines['prior']:.4f}, a = {baselines['smoothing']:g} "
              f"({source}). Deterministic: ± 0."]
    return lines


def training_epochs_markdown(epochs):
    """The report's section on the training epochs early stopping chose (`PaperRunner.training_epochs`);
    [] when no run trained with it."""
    if not epochs:
        return []
    first = next(iter(epochs.values()))
    on = ("GAUC on the validation split" if first["split"] == "valid" else
          "GAUC on the TEST split (the dataset has no validation split: these epochs are chosen on test)")
    lines = ["", "## Training epochs, chosen on validation", "",
             f"Every Table 3 run trained at most {first['max_epochs']} epochs and kept its best epoch by {on} "
             f"(early stopping, patience {first['patience']}); Table 3 reports that epoch on the test split.", "",
             "| variant | chosen epoch per seed |", "|---|---|"]
    return lines + [f"| {v} | " + ", ".join(f"{s}: {e}" for s, e in r["by_seed"].items()) + " |"
                    for v, r in epochs.items()]


def to_markdown(results, out_dir):
    o, d, w = results["options"], results["data"], results["wall_s"]
    vectors = (f"the table `{o['vector_table']}`" if o["vector_table"] else
               f"the `{o['encoder_row']}` text encoder of Table 2")
    times = ", ".join(f"{k} {v / 60:.1f}" for k, v in w.items() if k != "total")
    reused = results.get("reused") or {}
    plots = results.get("plots") or {}

    def image(name):
        return [f"![{name}]({plots[name]})", ""] if name in plots else []

    valid = f" / {d['valid_impressions']:,} valid" if d.get("valid_impressions") else ""
    if results.get("encoder_choice"):
        vectors = f"the `{results['encoder_choice']['row']}` text encoder of Table 2, chosen on validation (below)"
    lines = ["# The paper's experiments on this data", "",
             f"Data: `{d.get('name') or d['data_dir']}` — {d['train_impressions']:,} train{valid} / "
             f"{d['test_impressions']:,} test impressions, {d['text_pairs_train']:,} text pre-training pairs. "
             f"Seeds {list(o['seeds'])} (Table 3; "
             f"the figures use seed {o['seeds'][0]}). Vectors of Table 3: {vectors}. " +
             table2_lib.wall_time_line(w["total"], reused.get("runs", 0), reused.get("wall_s", 0.0)) +
             f" Steps of this invocation: {times} min.", "",
             "## Findings (does the paper's ordering hold here?)", ""]
    lines += [f"- {f}" for f in results["findings"]] + [""]
    lines += [f"## Table 3: CTR variants (mean ± std over {len(o['seeds'])} seeds)", "", table3_markdown(results), ""]
    choice = results.get("encoder_choice")
    if choice:
        lines += ["## The encoder of Table 3, chosen on validation", "",
                  f"Candidates in order (generic pretrained encoder first; a tie goes to the earlier one), scored by "
                  f"{choice['metric']} on the validation pre-training pairs — the test split plays no part: "
                  f"{choice['reason']}.", ""]
    control = results.get("control")
    if control:
        lines += ["## Random-vector control (every item's vector replaced by a random unit vector)", "",
                  "The same variants, seeds and flagfiles as Table 3 on vectors that carry no information: the "
                  "integration must not let them hurt. Within the seed spread = |mean GAUC change| ≤ the larger of "
                  "the change's std over seeds and id's relative GAUC std.", "",
                  "The last column is what the vectors' content adds: the variant's GAUC on the report's vectors "
                  "against the same variant, seed and flags on random vectors (mean ± std of the per-seed change).",
                  "", "| variant | GAUC | GAUC vs id | within seed spread | Table 3 vectors vs random |",
                  "|---|---:|---:|---|---:|"]
        content = control.get("content_gauc_rel") or {}
        for v, r in control["table"].items():
            if v == "id":
                continue
            ok = "yes" if control["within_seed_spread"][v] else "NO"
            gain = _pm(content[v], True) if v in content else "—"
            lines.append(f"| {v} | {_pm(r['gauc'])} | {_pm(r['gauc_rel'], True)} | {ok} | {gain} |")
        lines.append("")
    lines += modalities_markdown(results.get("modalities"), results)
    if results["table2"]:
        lines += [table2_lib.to_markdown({"benchmarks": results["table2"]}).replace("# Table 2", "## Table 2", 1)
                  .replace("\n## ", "\n### ")]
    else:
        lines += ["## Table 2 and Fig 6a: skipped (vectors from `vector_table`, no pre-training here)", ""]
    if results["fig3"]:
        lines += ["## Fig 3: GAUC per epoch", "", *image("fig3"),
                  "| epoch | " + " | ".join(results["fig3"]) + " |", "|---|" + "---:|" * len(results["fig3"])]
        epochs = max(len(h) for h in results["fig3"].values())
        for i in range(epochs):
            cells = [f"{h[i]['gauc']:.4f}" if i < len(h) else "" for h in results["fig3"].values()]
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    if results["fig6a"]:
        lines += ["", "## Fig 6a: pre-training Acc@1 vs simtier GAUC", "", *image("fig6a"),
                  "| encoder | Acc@1 | GAUC |", "|---|---:|---:|"]
        lines += [f"| {p['row']} | {p['acc@1']:.4f} | {p['gauc']:.4f} |" for p in results["fig6a"]]
    if results.get("fig6b"):
        lines += ["", "## Fig 6b: simtier_make vs id by item frequency (freq_1 = rarest)", "",
                  *image("fig6b"),
                  "| group | test examples | AUC improvement | LogLoss improvement |", "|---|---:|---:|---:|"]
        lines += [f"| {n} | {b['num_examples']:,} | {_pm(b['auc_rel'], True)} | {_pm(b['logloss_rel'], True)} |"
                  for n, b in results["fig6b"].items()]
    lines += new_items_markdown(results.get("new_items"))
    if results["fig6c"] or (results.get("make_validation") and "fig6c" in plots):
        lines += ["", "## Fig 6c: MAKE pre-training epochs", "", *image("fig6c")]
    if results["fig6c"]:
        lines += ["Test GAUC of the make model, MAKE pre-trained a fixed number of epochs (no early stopping):", "",
                  "| MAKE epochs | GAUC |", "|---:|---:|"]
        lines += [f"| {p['make_epochs']} | {p['gauc']:.4f} |" for p in results["fig6c"]]
    lines += training_epochs_markdown(results.get("training_epochs"))
    mv = results.get("make_validation")
    if mv:
        lines += ["", "## MAKE's pre-training epochs, chosen on validation", "",
                  f"Early stopping (patience {mv['patience']}, at most {mv['max_epochs']} epochs) on MAKE's GAUC on "
                  f"the validation split; the Table 3 make/simtier_make runs use the chosen epoch. Seed "
                  f"{o['seeds'][0]}: chose epoch {mv['chosen_epoch']}; chosen epoch per seed: "
                  + ", ".join(f"{s}: {e}" for s, e in mv["chosen_by_seed"].items()) + ".", "",
                  "| MAKE epoch | validation GAUC (MAKE alone) |", "|---:|---:|"]
        lines += [f"| {p['epoch']}{' (chosen)' if p['epoch'] == mv['chosen_epoch'] else ''} | {p['gauc']:.4f} |"
                  for p in mv["curve"]]
    skipped = [name for name, key in (("Fig 3", "fig3"), ("Fig 6a", "fig6a"), ("Fig 6c", "fig6c"))
               if not results[key]]
    if skipped:
        lines += ["", f"Not run in this profile: {', '.join(skipped)} (`configs/paper/demo.flags` runs every figure)."]
    return "\n".join(lines) + "\n"


def required_modules(options):
    """The optional modules a report of `options` needs (see `options_lib.DEPENDENCIES`)."""
    modules = ["matplotlib"]
    if "minilm_zero_shot" in (options.encoder_row, *options.fig6a_rows) and not options.vector_table:
        modules += options_lib.MINILM_MODULES
    if not options.vector_table:
        t2 = table2_lib.Table2Config.from_values(table2_lib.read_profile(options.table2_flagfile))
        modules += table2_lib.required_modules(t2)
    return tuple(dict.fromkeys(modules))


def check_dependencies(options):
    """`MissingDependencyError` (with the install command) when a module the report needs is missing."""
    options_lib.check_dependencies(required_modules(options), "The paper report")


def run_paper(options, output_dir):
    """Library entry point: runs `options` (a `PaperConfig`) into `output_dir`; returns the results."""
    return PaperRunner(options, output_dir).run()


def main(argv):
    from absl import app, flags

    from mm_ads.utils.tf_startup import hide_retracing_warnings

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    hide_retracing_warnings()  # dozens of runs in one process: see the function's docstring
    options = mm_options.options_from_flags(PaperConfig)
    try:
        check_dependencies(options)  # before any work
    except options_lib.MissingDependencyError as e:
        sys.exit(f"paper: {e}")
    results = run_paper(options, flags.FLAGS.output_dir)
    out = os.path.abspath(flags.FLAGS.output_dir)
    print(f"Table 3 (mean ± std over {len(options.seeds)} seeds):\n")
    print(table3_markdown(results))
    print("\n" + "\n".join(f"- {f}" for f in results["findings"]))
    print(f"\nreport: {os.path.join(out, 'report.md')}")


def define_flags():
    mm_options.define_flags(PaperConfig, "paper report", "Where runs, report.md, results.json and the plots go.")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main, argv=sys.argv)
