r"""The synthetic world: the built-in default data of mm_ads.

`python -m mm_ads.data.synthetic --flagfile=configs/data/<profile>.flags --output_dir=DIR`

The generative story (every draw comes from one `np.random.Generator` seeded by `--seed`,
so a seed and a flagfile define the dataset exactly):

1. **Items.** `num_items` items, dense ids 1..N (0 is padding). Items come in *prototype
   families*: a prototype draws a category (1..C), a colour, a pattern, a material and a
   size; each item copies its prototype and, with probability `mutation_prob`, changes exactly
   one of those attributes. So one category holds near-identical items that differ in one
   detail (the paper's three pillows). Each category owns `brands_per_category` brands
   (shops); an item's brand is drawn Zipf-like among its category's brands.
2. **Popularity** is Zipf-like: item at popularity rank r gets weight r^-`zipf_exponent`,
   ranks a random permutation, so a few items take most impressions (the long tail).
   Each item also has a hidden *quality* effect ~ N(0, `item_effect_std`) that no image or
   title shows — only an id embedding can learn it.
3. **Time.** The log spans `train_days` + `test_days` days from a fixed epoch. Creation
   times: most items exist before the log starts; `new_item_fraction` of the items are
   created during the test window (cold start: never seen in training). An item is never
   shown before it exists; items younger than a day get a retrieval boost (`new_item_boost`).
4. **Users** have profile ids (age group, gender, city level) and latent interests: a
   distribution over categories (sparse Dirichlet, tilted towards their profile group's
   taste) and over colours, patterns and materials. The semantic affinity of user u and
   item i is `a(u,i) = Σ_k β_k · clip(log(K_k · p_uk[attr_k(i)]), -3, log K_k)` over
   k ∈ {category, colour, pattern, material}, standardised over random pairs.
5. **Behaviour.** Each user has a prior history (0..S items, some users none) drawn with
   probability ∝ popularity · exp(`history_temperature`·a(u,i)) among the items that
   already exist (sampling-importance-resampling over `candidates_per_draw` popularity draws).
6. **Impressions.** `num_impressions` (user, time, candidate): users drawn by a mildly
   skewed activity, times uniform over the log, candidates drawn ∝ popularity ·
   exp(`retrieval_temperature`·a) · new-item boost among existing items (an ads retrieval
   stage: relevant but imperfect). Click ~ Bernoulli(σ(b0 + `semantic_weight`·a(u,i) +
   quality_i + user_effect_u + N(0, `noise_std`))); b0 is solved so that the train CTR
   equals `target_ctr`. The history of an impression is the user's S most recent clicks
   before it (prior history, then clicks in the log), most recent last, left-padded with 0.
   Train = impressions before the end of day `train_days`, test = after (time-ordered). With
   `valid_days` > 0, the last `valid_days` of those days are a `valid` split instead of train
   (the same log and clicks; choices are made there, never on test).
7. **Content.** Each item gets a `image_size`² RGB image rendered from its attributes and
   brand, and a title (brand, attribute words or synonyms, the category noun, filler words);
   see `mm_ads.data.render`.
8. **Search logs** (pre-training pairs): a user searches, then buys item i (drawn like a
   history item). The text query names some of i's attributes (often by synonyms); the image
   query is the user's photo of i (new viewpoint, lighting, background, noise). The hard
   negative is an item clicked but not bought in the same search: same category, differing
   from i in the fewest attributes (at least one, or only the brand).

Nothing in the story refers to any model: multimodal vectors help only because images and
titles show the attributes that interests are made of, and ids help because of quality and
user effects and because popular items have many impressions.

`--no_content` skips images, titles and search logs (the ≥10M-item benchmark profile).
"""

import dataclasses
import os
import sys
import time

import numpy as np
import pyarrow as pa
from absl import app, logging

from mm_ads.data import render
from mm_ads.data.dataset import DatasetWriter
from mm_ads.data.spec import FeatureSpec
from mm_ads.utils.progress import Progress

DAY = 86400
EPOCH = 1_700_000_000  # fixed start of the log, seconds


@dataclasses.dataclass
class WorldConfig:
    """Sizes and knobs of the synthetic world (see the module docstring for their meaning)."""

    seed: int = 0
    num_items: int = 2000
    num_users: int = 1000
    num_categories: int = 20
    brands_per_category: int = 8
    mutation_prob: float = 0.7
    items_per_prototype: float = 4.0
    zipf_exponent: float = 1.0
    item_effect_std: float = 0.6
    user_effect_std: float = 0.4
    noise_std: float = 0.3
    semantic_weight: float = 1.0
    target_ctr: float = 0.06
    seq_len: int = 50
    num_impressions: int = 20000
    train_days: int = 6
    test_days: int = 1
    valid_days: int = 0
    new_item_fraction: float = 0.03
    new_item_boost: float = 1.0
    history_temperature: float = 2.0
    retrieval_temperature: float = 0.5
    candidates_per_draw: int = 32
    num_search_pairs: int = 2000
    search_test_fraction: float = 0.2
    image_size: int = 32
    content: bool = True
    num_shards: int = 2

    @classmethod
    def from_values(cls, values):
        """A validated `WorldConfig` from `{field: value}` (flagfile strings or typed); unknown names: ValueError."""
        from mm_ads.options import options_from_values

        return options_from_values(cls, values, "world")

    def validate(self):
        positive = ("num_items", "num_users", "num_categories", "brands_per_category", "seq_len",
                    "num_impressions", "train_days", "test_days", "candidates_per_draw", "image_size",
                    "num_shards")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"WorldConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("mutation_prob", "new_item_fraction", "search_test_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"WorldConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.target_ctr < 0.5:
            raise ValueError(f"WorldConfig.target_ctr must be in (0, 0.5), got {self.target_ctr}")
        if self.image_size < 8:
            raise ValueError(f"WorldConfig.image_size must be >= 8, got {self.image_size}")
        if not 0 <= self.valid_days < self.train_days:
            raise ValueError(f"WorldConfig.valid_days must be in [0, train_days={self.train_days}), got "
                             f"{self.valid_days}")
        if self.items_per_prototype < 1:
            raise ValueError(f"WorldConfig.items_per_prototype must be >= 1, got {self.items_per_prototype}")
        return self


ATTRS = ("category", "colour", "pattern", "material")
BETAS = {"category": 1.0, "colour": 0.6, "pattern": 0.4, "material": 0.4}


class World:
    """The generated world held in memory: items, users, impressions, search logs."""

    def __init__(self, config):
        self.config = config.validate()
        self.rng = np.random.default_rng(config.seed)
        self.t_start = EPOCH
        self.t_split = EPOCH + config.train_days * DAY
        self.t_valid = self.t_split - config.valid_days * DAY
        self.t_end = self.t_split + config.test_days * DAY
        self.num_colours = len(render.COLOURS)
        self.num_patterns = len(render.PATTERNS)
        self.num_materials = len(render.MATERIALS)
        self.num_sizes = len(render.SIZES)
        self.num_brands = config.num_categories * config.brands_per_category

    # -- 1-3: items ------------------------------------------------------------------
    def make_items(self):
        c, rng = self.config, self.rng
        n = c.num_items
        num_proto = max(1, int(round(n / c.items_per_prototype)))
        proto = {
            "category": rng.integers(1, c.num_categories + 1, num_proto),
            "colour": rng.integers(0, self.num_colours, num_proto),
            "pattern": rng.integers(0, self.num_patterns, num_proto),
            "material": rng.integers(0, self.num_materials, num_proto),
            "size": rng.integers(0, self.num_sizes, num_proto),
        }
        proto_of = rng.integers(0, num_proto, n)
        attrs = {k: v[proto_of].copy() for k, v in proto.items()}
        mutate = rng.random(n) < c.mutation_prob
        which = rng.integers(0, 5, n)
        sizes = {"category": None, "colour": self.num_colours, "pattern": self.num_patterns,
                 "material": self.num_materials, "size": self.num_sizes}
        for j, key in enumerate(("category", "colour", "pattern", "material", "size")):
            sel = mutate & (which == j)
            if key == "category":
                # a different category keeps the other attributes: the same "look" in another product type
                attrs[key][sel] = rng.integers(1, c.num_categories + 1, sel.sum())
            else:
                attrs[key][sel] = (attrs[key][sel] + rng.integers(1, sizes[key], sel.sum())) % sizes[key]
        # brands: each category owns brands_per_category brands, picked Zipf-like
        brand_rank = np.minimum(rng.zipf(1.5, n), c.brands_per_category) - 1
        attrs["brand"] = (attrs["category"] - 1) * c.brands_per_category + brand_rank + 1
        self.items = {k: v.astype(np.int64) for k, v in attrs.items()}
        self.items["item_id"] = np.arange(1, n + 1, dtype=np.int64)
        self.items["prototype_id"] = proto_of.astype(np.int64) + 1
        ranks = rng.permutation(n) + 1
        self.popularity = ranks.astype(np.float64) ** -c.zipf_exponent
        self.popularity /= self.popularity.sum()
        self.quality = rng.normal(0.0, c.item_effect_std, n)
        # creation: most items before the log (up to 60 days earlier), a fraction during the test window
        created = self.t_start - rng.integers(0, 60 * DAY, n)
        is_new = rng.random(n) < c.new_item_fraction
        created[is_new] = rng.integers(self.t_split, self.t_end - DAY // 4, is_new.sum())
        # a few items also appear during the training window
        during = (~is_new) & (rng.random(n) < 0.02)
        created[during] = rng.integers(self.t_start, self.t_split, during.sum())
        self.items["created_at"] = created.astype(np.int64)

    # -- 4: users ----------------------------------------------------------------------
    def make_users(self):
        c, rng = self.config, self.rng
        u = c.num_users
        age = rng.integers(1, 8, u)
        gender = rng.integers(1, 3, u)
        city = rng.integers(1, 6, u)
        group = (age - 1) * 2 + (gender - 1)  # 14 profile groups with their own category taste
        group_taste = rng.dirichlet(np.ones(c.num_categories), 14)
        base = 0.5 * group_taste[group] + 0.5 / c.num_categories
        self.p = {
            "category": np.stack([rng.dirichlet(0.3 * c.num_categories * b) for b in base]),
            "colour": rng.dirichlet(np.full(self.num_colours, 0.4), u),
            "pattern": rng.dirichlet(np.full(self.num_patterns, 0.5), u),
            "material": rng.dirichlet(np.full(self.num_materials, 0.5), u),
        }
        self.users = {"user_id": np.arange(1, u + 1, dtype=np.int64), "age": age, "gender": gender, "city": city}
        self.user_effect = rng.normal(0.0, c.user_effect_std, u)
        self.activity = rng.pareto(2.0, u) + 1.0
        self.activity /= self.activity.sum()
        # standardise the affinity over random pairs
        uu = rng.integers(0, u, 20000)
        ii = rng.integers(0, c.num_items, 20000)
        raw = self._raw_affinity(uu, ii)
        self.aff_mean, self.aff_std = float(raw.mean()), float(raw.std() + 1e-9)

    def _raw_affinity(self, users, items):
        """users, items: 0-based index arrays of one shape → raw affinity."""
        out = np.zeros(np.shape(users), np.float64)
        for k in ATTRS:
            attr = self.items[k][items] - (1 if k == "category" else 0)
            p = self.p[k]
            kk = p.shape[1]
            out += BETAS[k] * np.clip(np.log(kk * p[users, attr] + 1e-12), -3.0, np.log(kk))
        return out

    def affinity(self, users, items):
        return (self._raw_affinity(users, items) - self.aff_mean) / self.aff_std

    def _sample_items(self, users, times, temperature, boost_new=False):
        """For each (user, time) draws one existing item ∝ popularity·exp(temperature·a) (SIR). 0-based."""
        c, rng = self.config, self.rng
        n, m = len(users), c.candidates_per_draw
        cdf = np.cumsum(self.popularity)
        out = np.empty(n, np.int64)
        created = self.items["created_at"]
        new_idx = np.flatnonzero(created >= self.t_start)
        for s in range(0, n, 8192):
            u = users[s:s + 8192]
            t = times[s:s + 8192]
            k = len(u)
            needles = rng.random(k * m) * cdf[-1]
            order = np.argsort(needles)  # sorted needles: the same result, ~6x faster on a 10M-item cdf
            cand = np.empty(k * m, np.int64)
            cand[order] = np.searchsorted(cdf, needles[order])
            cand = np.minimum(cand, c.num_items - 1).reshape(k, m)
            if boost_new and len(new_idx):
                # the retrieval stage also proposes items created recently (within a day)
                extra = new_idx[rng.integers(0, len(new_idx), (k, 1))]
                cand = np.concatenate([cand, extra], axis=1)
            logw = temperature * self.affinity(np.repeat(u[:, None], cand.shape[1], 1), cand)
            exists = created[cand] <= t[:, None]
            if boost_new:
                age = t[:, None] - created[cand]
                young = exists & (age < DAY)
                # proposed fresh items carry their own prior; a boost lifts them to the head of the log
                logw = logw + np.where(young, np.log(c.new_item_boost), 0.0)
                if len(new_idx):
                    logw[:, m:] += np.where(young[:, m:], np.log(self.popularity[cand[:, m:]] * c.num_items), -np.inf)
            logw = np.where(exists, logw, -np.inf)
            gumbel = -np.log(-np.log(rng.random(logw.shape)))
            pick = np.argmax(logw + gumbel, axis=1)
            ok = np.isfinite(logw[np.arange(k), pick])
            chosen = cand[np.arange(k), pick]
            # no existing candidate: fall back to the most popular item that existed
            if not ok.all():
                oldest = np.argmin(created)
                chosen[~ok] = oldest
            out[s:s + k] = chosen
        return out

    # -- 5-6: behaviour and impressions --------------------------------------------------
    def make_logs(self, progress=True):
        c, rng = self.config, self.rng
        s = c.seq_len
        # prior histories: length ~ uniform 0..S with 5% of users empty
        lengths = rng.integers(1, s + 1, c.num_users)
        lengths[rng.random(c.num_users) < 0.05] = 0
        hist_users = np.repeat(np.arange(c.num_users), lengths)
        hist_times = np.full(len(hist_users), self.t_start - 1, np.int64)
        hist_items = self._sample_items(hist_users, hist_times, c.history_temperature)
        prior = np.split(hist_items, np.cumsum(lengths)[:-1])

        n = c.num_impressions
        users = rng.choice(c.num_users, n, p=self.activity)
        times = np.sort(rng.integers(self.t_start, self.t_end, n))
        users = users[rng.permutation(n)]  # times sorted, users shuffled
        items = self._sample_items(users, times, c.retrieval_temperature, boost_new=True)
        a = self.affinity(users, items)
        z = c.semantic_weight * a + self.quality[items] + self.user_effect[users] + rng.normal(0, c.noise_std, n)
        train = times < self.t_split
        b0 = _solve_bias(z[train] if train.any() else z, c.target_ctr)
        clicks = (rng.random(n) < 1.0 / (1.0 + np.exp(-(b0 + z)))).astype(np.float32)

        # histories in time order: prior history, then the user's earlier clicks
        hist = np.zeros((n, s), np.int64)
        buffers = [list(p + 1) for p in prior]  # 1-based item ids
        bar = Progress("histories", n, enabled=progress and n >= 200_000)
        for j in range(n):
            buf = buffers[users[j]]
            k = min(len(buf), s)
            if k:
                hist[j, s - k:] = buf[-k:]
            if clicks[j]:
                buf.append(items[j] + 1)
                if len(buf) > 2 * s:
                    del buf[:-s]
            if (j + 1) % 100_000 == 0 or j + 1 == n:
                bar.add((j % 100_000) + 1)
        self.impressions = {
            "user": users, "item": items, "time": times.astype(np.int64), "label": clicks, "hist": hist,
            "affinity": a, "train": train,
        }
        self.bias = float(b0)

    def split_masks(self):
        """`{split: impression mask}`: `train` before the split time, `test` after; with `valid_days`, the last
        `valid_days` days before the split time are the `valid` split instead of train. The clicks are the same
        either way (the click bias is solved on all impressions before the split time)."""
        imp = self.impressions
        before = imp["train"]
        valid = before & (imp["time"] >= self.t_valid)
        masks = {"train": before & ~valid}
        if self.config.valid_days:
            masks["valid"] = valid
        masks["test"] = ~before
        return masks

    def ctr_columns(self, mask):
        imp, items, users = self.impressions, self.items, self.users
        it, us, hist = imp["item"][mask], imp["user"][mask], imp["hist"][mask]
        hist0 = np.maximum(hist - 1, 0)
        pad = hist == 0
        return {
            "user_id": users["user_id"][us],
            "user_profile_0": users["age"][us],
            "user_profile_1": users["gender"][us],
            "user_profile_2": users["city"][us],
            "item_id": items["item_id"][it],
            "category_id": items["category"][it],
            "brand_id": items["brand"][it],
            "hist_item_id": hist,
            "hist_category_id": np.where(pad, 0, items["category"][hist0]),
            "hist_brand_id": np.where(pad, 0, items["brand"][hist0]),
            "timestamp": imp["time"][mask],
            "item_created_at": items["created_at"][it],
            "label": imp["label"][mask],
        }

    def spec(self, vector_dim=0):
        c = self.config
        return FeatureSpec.default(
            seq_len=c.seq_len, vector_dim=vector_dim, num_items=c.num_items, num_categories=c.num_categories,
            num_brands=self.num_brands, num_users=c.num_users, profile_buckets=(7, 2, 5),
        )

    # -- 7-8: content and search logs ------------------------------------------------------
    def make_content(self, progress=True):
        c = self.config
        it = self.items
        args = [it["category"], it["colour"], it["pattern"], it["material"], it["size"], it["brand"]]
        self.titles = render.make_titles(*args, self.rng)
        self.images = []
        bar = Progress("item images", c.num_items, enabled=progress and c.num_items >= 20000)
        for s in range(0, c.num_items, 2048):
            chunk = [a[s:s + 2048] for a in args]
            self.images += render.encode_png(render.render_images(*chunk, image_size=c.image_size))
            bar.add(len(chunk[0]))

    def hard_negatives(self, items):
        """0-based purchased items → 0-based hard negatives: same category, fewest differing attributes."""
        it, rng = self.items, self.rng
        keys = ("colour", "pattern", "material", "size", "brand")
        by_cat = {}
        order = np.argsort(it["category"], kind="stable")
        bounds = np.flatnonzero(np.r_[True, np.diff(it["category"][order]) != 0, True])
        for a, b in zip(bounds[:-1], bounds[1:]):
            by_cat[int(it["category"][order[a]])] = order[a:b]
        out = np.full(len(items), -1, np.int64)
        for j, i in enumerate(items):
            pool = by_cat[int(it["category"][i])]
            if len(pool) > 256:
                pool = pool[rng.integers(0, len(pool), 256)]
            pool = pool[pool != i]
            if not len(pool):
                continue
            diff = sum((it[k][pool] != it[k][i]).astype(np.int64) for k in keys)
            diff = np.where(diff == 0, 99, diff)  # an exact twin is not a "clicked but not bought" item
            best = np.flatnonzero(diff == diff.min())
            out[j] = pool[best[rng.integers(len(best))]]
        return out

    def make_search_logs(self, progress=True):
        c, rng = self.config, self.rng
        n = c.num_search_pairs
        users = rng.choice(c.num_users, n, p=self.activity)
        times = rng.integers(self.t_start, self.t_split, n)
        bought = self._sample_items(users, times, c.history_temperature)
        neg = self.hard_negatives(bought)
        it = self.items
        args = [it[k][bought] for k in ("category", "colour", "pattern", "material", "size", "brand")]
        text_q = render.make_queries(*args, rng)
        photos = []
        bar = Progress("query photos", n, enabled=progress and n >= 20000)
        for s in range(0, n, 2048):
            chunk = [a[s:s + 2048] for a in args]
            photos += render.encode_png(render.render_images(*chunk, image_size=c.image_size, rng=rng, query=True))
            bar.add(len(chunk[0]))
        is_test = rng.random(n) < c.search_test_fraction
        self.search = {"user": users, "bought": bought, "negative": neg, "text_query": text_q, "photo": photos,
                       "test": is_test}

    # -- all -----------------------------------------------------------------------
    def generate(self, progress=True):
        t0 = time.time()
        self.make_items()
        self.make_users()
        self.make_logs(progress)
        if self.config.content:
            self.make_content(progress)
            self.make_search_logs(progress)
        self.generation_s = time.time() - t0
        return self

    def stats(self):
        imp, c = self.impressions, self.config
        masks = self.split_masks()
        train = masks["train"]
        counts = np.bincount(imp["item"][train], minlength=c.num_items)
        top = np.sort(counts)[::-1]
        top1 = top[: max(1, c.num_items // 100)].sum() / max(top.sum(), 1)
        seen = counts > 0
        test_items = imp["item"][masks["test"]]
        cold = ~seen[test_items] if len(test_items) else np.zeros(0, bool)
        hist_len = (imp["hist"] != 0).sum(axis=1)
        return {
            "ctr_train": round(float(imp["label"][train].mean()), 4) if train.any() else None,
            "ctr_test": round(float(imp["label"][masks["test"]].mean()), 4) if masks["test"].any() else None,
            "impressions_train": int(train.sum()),
            **({"impressions_valid": int(masks["valid"].sum())} if "valid" in masks else {}),
            "impressions_test": int(masks["test"].sum()),
            "items_seen_in_train": int(seen.sum()),
            "top1pct_items_share_of_train_impressions": round(float(top1), 4),
            "test_impressions_of_unseen_items": int(cold.sum()),
            "test_unseen_items": int(len(np.unique(test_items[cold]))) if len(test_items) else 0,
            "mean_history_length": round(float(hist_len.mean()), 2),
            "empty_history_fraction": round(float((hist_len == 0).mean()), 4),
            "click_bias_b0": round(self.bias, 4),
            "generation_s": round(self.generation_s, 1),
        }


def _solve_bias(z, target):
    """b0 such that mean σ(b0 + z) = target (bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if np.mean(1.0 / (1.0 + np.exp(-(mid + z)))) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def write_world(world, output_dir, overwrite=False, progress=True, provenance=None):
    """Writes a generated `World` in the canonical dataset layout (atomically)."""
    c = world.config
    spec = world.spec()
    imp = world.impressions
    extra = {
        "config": dataclasses.asdict(c),
        "time": {"start": world.t_start, "train_end": world.t_valid, "test_start": world.t_split,
                 "end": world.t_end},
        "attributes": {
            "colour": [x[0] for x in render.COLOURS], "pattern": [x[0] for x in render.PATTERNS],
            "material": [x[0] for x in render.MATERIALS], "size": [x[0] for x in render.SIZES],
            "category": [x[0] for x in render.category_words(c.num_categories)[1:]],
        },
        "image_shape": [c.image_size, c.image_size, 3] if c.content else None,
        "stats": world.stats(),
    }
    with DatasetWriter(output_dir, name=f"synthetic-seed{c.seed}", format="synthetic", spec=spec, seed=c.seed,
                       provenance=provenance, overwrite=overwrite) as w:
        w.manifest.extra.update(extra)
        n = len(imp["label"])
        bar = Progress("impressions", n, enabled=progress and n >= 200_000)
        masks = world.split_masks()
        for split, mask in masks.items():
            shards = c.num_shards if split == "train" else max(1, c.num_shards // 2)
            w.write_ctr(split, world.ctr_columns(mask), num_shards=shards, progress=bar)
        w.write_item_stats(world.items["item_id"][imp["item"][masks["train"]]], imp["time"][masks["train"]])
        items = {k: world.items[k] for k in ("item_id", "category", "brand", "colour", "pattern", "material",
                                             "size", "prototype_id", "created_at")}
        items = {"category_id" if k == "category" else "brand_id" if k == "brand" else k: v
                 for k, v in items.items()}
        if c.content:
            items["title"] = world.titles
            items["image"] = pa.array(world.images, pa.binary())
        w.write_parquet("items", None, pa.table(items))
        users = dict(world.users)
        w.write_parquet("users", None, pa.table(users))
        if c.content:
            s = world.search
            ids = world.items["item_id"]
            for split, mask in (("train", ~s["test"]), ("test", s["test"])):
                idx = np.flatnonzero(mask)
                pos, neg = s["bought"][idx], s["negative"][idx]
                has_neg = neg >= 0
                neg_safe = np.maximum(neg, 0)
                w.write_parquet("pretrain/text_pairs", split, pa.table({
                    "query": [s["text_query"][j] for j in idx],
                    "positive": [world.titles[i] for i in pos],
                    "negative": [world.titles[i] if ok else "" for i, ok in zip(neg_safe, has_neg)],
                    "positive_id": ids[pos],
                    "negative_id": np.where(has_neg, ids[neg_safe], -1),
                }))
                w.write_parquet("pretrain/image_pairs", split, pa.table({
                    "query": pa.array([s["photo"][j] for j in idx], pa.binary()),
                    "positive": pa.array([world.images[i] for i in pos], pa.binary()),
                    "negative": pa.array([world.images[i] if ok else b"" for i, ok in zip(neg_safe, has_neg)],
                                         pa.binary()),
                    "positive_id": ids[pos],
                    "negative_id": np.where(has_neg, ids[neg_safe], -1),
                }))
    return output_dir


def world_config_from_flagfile(path, **overrides):
    """A validated `WorldConfig` from a `configs/data/*.flags` profile (plus overrides), without absl."""
    from mm_ads.config import read_flagfile

    values = {**read_flagfile(path), **overrides}
    values.pop("output_dir", None)
    values.pop("overwrite", None)
    try:
        return WorldConfig.from_values(values)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def generate(config, output_dir, overwrite=False, progress=True, provenance=None):
    """Generates the world of `config` and writes it to `output_dir`; returns the `Manifest`."""
    from mm_ads.data.dataset import Manifest

    logging.info("Generating the synthetic world: %s", config)
    write_world(World(config).generate(progress), output_dir, overwrite=overwrite, progress=progress,
                provenance=provenance or {"generator": "mm_ads.data.synthetic"})
    return Manifest.load(output_dir)


# -- entry point ---------------------------------------------------------------------------
# Flags are defined only when this module runs as the program, so that importing the library above
# (tests, other tools) never collides with another entry point's flags.


def _define_flags():
    """`--output_dir`, `--overwrite` and one flag per `WorldConfig` field (`mm_ads.options.define_flags`)."""
    from absl import flags

    from mm_ads.options import define_flags

    define_flags(WorldConfig, "Synthetic world")
    return {"output_dir": flags.DEFINE_string("output_dir", None, "Directory to write the dataset to (atomically)."),
            "overwrite": flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")}


def main(argv, holders):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    output_dir = holders["output_dir"].value
    if not output_dir:
        raise app.UsageError("--output_dir is required")
    from mm_ads.options import options_from_flags

    config = options_from_flags(WorldConfig)
    manifest = generate(config, output_dir, overwrite=holders["overwrite"].value,
                        provenance={"command": " ".join(sys.argv), "generator": "mm_ads.data.synthetic"})
    print(manifest.summary())
    print(f"written to {os.path.abspath(output_dir)}")


if __name__ == "__main__":
    _holders = _define_flags()
    app.run(lambda argv: main(argv, _holders))
