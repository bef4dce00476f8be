"""The CTR model builder: an ID model (sparse embeddings + DIN + MLP) and the paper's integrations.

Variants (paper section 6.1.3):
  * `id`       — the production baseline: embeddings of user/context ids, of the target item's
                 ids and of the behaviour sequence's ids; DIN target attention over the sequence;
                 an MLP on the concatenation.
  * `vector`   — multimodal vectors of the target and history items, projected by one shared
                 Dense layer, concatenated with the id embeddings of target and history (so DIN
                 attends over [ids, projected vector]).
  * `simscore` — the cosine similarity of each history item's vector to the target's, given to
                 DIN as side information.
  * `simtier`  — SimTier: the histogram of those similarities over N tiers, concatenated into the
                 MLP input (paper eq. 2).
  * `make`     — MAKE (paper section 4.3): a `mm_ads.layers.MAKE` module (DIN over the vectors, MLP to
                 a logit) whose v_MAKE, intermediate MLP outputs and logit are concatenated into the
                 ID model's MLP input. Frozen when it was pre-trained (`make_epochs > 0`, the
                 default) unless `make_trainable`; see `mm_ads.ctr.make` for the two phases.
  * `simtier_make` — SimTier and MAKE together.
  * `make_only` — MAKE alone, no id features: its logit is the model's logit (MAKE's pre-training,
                 paper eq. 5).
Every multimodal variant also feeds the target's `item_vector_missing` flag to the MLP and
excludes history items without a vector from the similarity statistics (and from MAKE's attention).

Several modalities (`FeatureSpec.modalities`, e.g. image and text vectors: `--vector_table=image,text`): each
enters through its own layers, named with the modality: a projection per modality (`vector_projection_<m>`), a
similarity side feature per modality (`sim_score_<m>`, DIN's side information `[B, S, M]`), a histogram per
modality (`sim_tier_<m>`, concatenated) and its own missing flag. MAKE runs over all of them: one module over the
concatenated vectors (`make_fusion="concat"`, the default) or one per modality (`"separate"`, `make_<m>`).

The model is forward-only: it maps the FeatureSpec's model inputs (named after the features)
to `{"ctr": [B], "logit": [B]}`; losses and metrics live in the task. `extra_block` is a seam
for more MLP inputs: a callable `(inputs, parts) -> list of [B, F] tensors` appended to the MLP
input (the MAKE variants use it for MAKE's outputs).

Features of the other kinds (`mm_ads.data.spec`) are MLP inputs too: string ids are hashed into their table
(`StringHashing`, `hash_<table>`) and embedded like int64 ids; `tags` are embedded and pooled (`MaskedPooling`,
mean or sum over the non-padding values); `numeric` values are standardised (`NumericEncoding`), or bucketised and
embedded; a `history` feature whose table no target-item feature shares (an id sequence other than the behaviour
sequence of items) is mean-pooled over its non-padding values instead of entering DIN. User-side ones broadcast over the
candidates like the user ids.

Every FeatureSpec table is one `SparseEmbedding` (`emb_<table>`) whose id mapping is the spec's declaration for
that table (or `config.id_mapping`), and whose ids read the table's default row (`config.unseen_row`) until they
have occurred `config.admit_after` times in training. With `config.id_mapping="dynamic"` each table is a
`DynamicEmbedding` instead (`mm_ads.layers.dynamic_embedding.dynamic_tables`).
"""

import collections

import keras

from mm_ads.config import MAKE_VARIANTS
from mm_ads.data.spec import HIST_ITEM_VECTOR, ITEM_VECTOR, missing_flag_name
from mm_ads.layers.cold_items import ColdItems
from mm_ads.layers.din_attention import DINAttention
from mm_ads.layers.dynamic_embedding import dynamic_tables
from mm_ads.layers.make import MAKE
from mm_ads.layers.masked_pooling import MaskedPooling
from mm_ads.layers.mlp import MLP
from mm_ads.layers.numeric_encoding import NumericEncoding
from mm_ads.layers.sim_score import SimScore
from mm_ads.layers.sim_tier import SimTier
from mm_ads.layers.sparse_embedding import SparseEmbedding
from mm_ads.layers.string_hashing import StringHashing

# Name of the MAKE layer in every model that has one: phase B restores phase A's MAKE variables by this path.
MAKE_LAYER = "make"


def _modalities(spec, variant):
    """The spec's `Modality`s for a multimodal variant (each with a target and a history vector feature)."""
    modalities = spec.modalities()
    if not modalities or any(m.item is None or m.history is None for m in modalities):
        raise ValueError(
            f"Variant {variant!r} needs the vector features {ITEM_VECTOR!r} and {HIST_ITEM_VECTOR!r} (or "
            "item_vector_<m> and hist_item_vector_<m> for every modality m) in the FeatureSpec (give the pipeline a "
            f"vector table); it has {[f.name for f in spec.by_role('vector')]}"
        )
    return modalities


def vector_input_names(spec, variant):
    """The vector inputs of a multimodal variant, modality by modality: target vector, its missing flag, history
    vectors, their missing flags."""
    names = []
    for m in _modalities(spec, variant):
        names += [m.item, missing_flag_name(m.item), m.history, missing_flag_name(m.history)]
    return names


def model_input_names(spec, variant):
    """Names of the model's inputs for a variant: every id, tags and numeric feature, plus vectors and flags when used.

    `make_only` reads no id feature but the history ids its vectors are joined from (for the padding mask).
    """
    if variant == "make_only":
        return [spec[_modalities(spec, variant)[0].history].source] + vector_input_names(spec, variant)
    names = [f.name for f in spec if f.is_model_input and f.role != "vector"]
    if variant != "id":
        names += vector_input_names(spec, variant)
    return names


def make_inputs(spec, variant):
    """`keras.Input`s named after the features (batch dimension first)."""
    inputs = {}
    names = model_input_names(spec, variant)
    for f in spec:
        if f.is_model_input and f.role != "vector" and f.name in names:
            inputs[f.name] = keras.Input(f.shape, dtype=f.dtype, name=f.name)
    if variant != "id":
        for m in _modalities(spec, variant):
            s, d = spec.seq_len, m.dim
            inputs[m.item] = keras.Input((d,), dtype="float32", name=m.item)
            inputs[m.history] = keras.Input((s, d), dtype="float32", name=m.history)
            inputs[missing_flag_name(m.item)] = keras.Input((), dtype="float32", name=missing_flag_name(m.item))
            inputs[missing_flag_name(m.history)] = keras.Input((s,), dtype="float32",
                                                               name=missing_flag_name(m.history))
    return inputs


# One modality's tensors in a model: its layers' name suffix ("" for the single unnamed modality, "_<m>" else), the
# target vector [B, D], the history vectors [B, S, D], which history slots hold a vector [B, S] (bool) and the
# target's missing flag [B].
_VectorView = collections.namedtuple("_VectorView", "suffix target history has_vector target_missing")


def _vector_views(spec, variant, inputs, mask):
    """A `_VectorView` per modality; `mask` [B, S]: the history slots that are not padding."""
    views = []
    for m in _modalities(spec, variant):
        has_vector = keras.ops.logical_and(mask, keras.ops.equal(inputs[missing_flag_name(m.history)], 0.0))
        views.append(_VectorView(f"_{m.name}" if m.name else "", inputs[m.item], inputs[m.history], has_vector,
                                 inputs[missing_flag_name(m.item)]))
    return views


def _pair_history_with_target(spec):
    """([(history feature, target item feature)] sharing a table, in history order; the other history features).

    A history feature no target id feature shares a table with is not attended by DIN: the model pools it.
    """
    items = [f for f in spec.by_role("item") if f.is_id]
    pairs, unpaired = [], []
    for h in spec.by_role("history"):
        match = [f for f in items if f.table == h.table]
        if match:
            pairs.append((h, match[0]))
        else:
            unpaired.append(h)
    if not pairs:
        raise ValueError(
            "The FeatureSpec has no history feature that shares its table with a target-item id feature: DIN "
            f"needs a behaviour sequence of items; history: {[(f.name, f.table) for f in spec.by_role('history')]}, "
            f"item features: {[(f.name, f.table) for f in items]}"
        )
    return pairs, unpaired


def build_ctr_model(spec, config, extra_block=None, name=None, embedding_shards=1):
    """Builds the CTR model of `config.variant` for `spec`.

    Args:
        spec: the dataset's `FeatureSpec` (with vector features for multimodal variants).
        config: a `mm_ads.config.CTRModelConfig`.
        extra_block: optional seam: `(inputs, parts) -> list of [B, F] tensors`, more MLP inputs (the MAKE
            variants add MAKE's outputs themselves).
        name: model name (default `ctr_<variant>`).
        embedding_shards: row partitions of each embedding table (`SparseEmbedding(num_shards=...)`, at most
            the table's rows); a placement choice that leaves the model's function and checkpoints unchanged.

    Returns:
        A functional `keras.Model` from named inputs to `{"ctr": [B], "logit": [B]}`.
    """
    config.validate()
    variant = config.variant
    inputs = make_inputs(spec, variant)
    if variant == "make_only":
        return _build_make_only(spec, config, inputs, name)
    if variant in MAKE_VARIANTS:
        user_block = extra_block

        def extra_block(inputs, parts):
            return _make_features(config, inputs, parts) + (list(user_block(inputs, parts)) if user_block else [])
    e = config.embedding_dim
    mappings = spec.id_mappings()
    padding = spec.table_padding()
    hashed = {f.embedding_table for f in spec if f.dtype == "string"}

    def table_mapping(t):
        if t in hashed or padding[t] is None:  # rows already: hashed strings, numeric buckets
            return "dense"
        return mappings[t] if config.id_mapping in ("auto", "dynamic") else config.id_mapping

    pairs, unpaired = _pair_history_with_target(spec)
    tables = {}
    if config.id_mapping == "dynamic":
        # collision-free tables for the int64 ids (DIN's item tables, users, context); the rows of hashed strings,
        # numeric buckets, tags and pooled sequences stay fixed-size tables
        fixed = {f.embedding_table for f in spec if f.embedding_table is not None and
                 (not f.is_id or f.dtype == "string" or f in unpaired)}
        tables = dynamic_tables(spec, config, embedding_shards, skip=fixed)
    tables.update({t: SparseEmbedding(n, e, padding_id=padding[t], num_shards=min(embedding_shards, n),
                                      name=f"emb_{t}", id_mapping=table_mapping(t), admit_after=config.admit_after,
                                      unseen_row=config.unseen_row)
                   for t, n in spec.tables().items() if t not in tables})
    hashers = {t: StringHashing(spec.tables()[t], name=f"hash_{t}") for t in sorted(hashed)}

    hashed_ids = {}

    def ids(feature):
        """The feature's int64 ids (strings hashed into their table's rows, once per feature; "" → 0)."""
        if spec[feature].dtype != "string":
            return inputs[feature]
        if feature not in hashed_ids:
            hashed_ids[feature] = hashers[spec[feature].table](inputs[feature])
        return hashed_ids[feature]

    def embed(feature):
        return tables[spec[feature].embedding_table](ids(feature))

    def padding_mask(feature):
        return keras.ops.not_equal(ids(feature), padding[spec[feature].embedding_table])

    def encode(f):
        """`[B, F]` MLP input of a feature that is not part of DIN."""
        if f.kind == "numeric":
            if f.boundaries is not None:
                buckets = NumericEncoding(boundaries=list(f.boundaries), name=f"bucketize_{f.name}")(inputs[f.name])
                embedded = tables[f.embedding_table](buckets)  # [B, K, E]
                return keras.ops.reshape(embedded, (-1, embedded.shape[1] * e))  # [B, K·E]
            return NumericEncoding(mean=f.mean, std=f.std, name=f"numeric_{f.name}")(inputs[f.name])  # [B, K]
        if f.kind == "tags" or f.role == "history":
            combiner = f.combiner if f.kind == "tags" else "mean"
            return MaskedPooling(combiner, name=f"pool_{f.name}")(embed(f.name), mask=padding_mask(f.name))  # [B, E]
        return embed(f.name)  # [B, E]

    hist_item = pairs[0][0].name
    mask = padding_mask(hist_item)  # [B, S]
    target, cold = {}, None  # the target's embeddings [B, E] by feature; the cold flag [B, 1]
    if config.cold_item_rate:
        # new-item training: drawn training examples, and at serving the items without an admitted row, read the
        # item table's default row and take the cold path (a flag for the MLP, no MAKE outputs)
        item = _target_item_feature(spec, pairs)
        drawn = ColdItems(config.cold_item_rate, name="cold_items")(ids(item))  # [B]
        target[item], admitted = tables[spec[item].embedding_table](ids(item), force_default=drawn,
                                                                      return_admitted=True)
        cold = keras.ops.expand_dims(keras.ops.cast(keras.ops.logical_not(admitted), "float32"), -1)  # [B, 1]
    target.update({t.name: embed(t.name) for _, t in pairs if t.name not in target})
    query = keras.ops.concatenate([target[t.name] for _, t in pairs], axis=-1)  # [B, E·k]
    keys = keras.ops.concatenate([embed(h.name) for h, _ in pairs], axis=-1)  # [B, S, E·k]
    paired = {t.name for _, t in pairs}
    other_item = [encode(f) for f in spec.by_role("item") if f.name not in paired and f.name in inputs]
    user = [encode(f) for f in spec.by_role("user") + spec.by_role("context") + unpaired if f.name in inputs]

    parts = {"query": query, "keys": keys, "mask": mask, "cold": cold}
    side = None
    mlp_inputs = [] if cold is None else [cold]
    if variant != "id":
        # every modality enters through its own layers (named with the modality), side by side
        views = _vector_views(spec, variant, inputs, mask)
        mlp_inputs += [keras.ops.expand_dims(v.target_missing, -1) for v in views]  # [B, 1] each
        if variant == "vector":
            for v in views:
                proj = keras.layers.Dense(config.vector_projection_dim, name=f"vector_projection{v.suffix}")
                query = keras.ops.concatenate([query, proj(v.target)], axis=-1)  # [B, E·k + P·M]
                keys = keras.ops.concatenate([keys, proj(v.history)], axis=-1)  # [B, S, E·k + P·M]
        elif variant == "simscore":
            side = keras.ops.concatenate([SimScore(keepdims=True, name=f"sim_score{v.suffix}")(
                v.target, v.history, mask=v.has_vector) for v in views], axis=-1)  # [B, S, M]
        elif variant in ("simtier", "simtier_make"):
            if config.tier_calibration == "quantile" and not config.tier_boundaries:
                raise ValueError("tier_calibration='quantile' needs tier_boundaries: computed from the training "
                                 "data by mm_ads.ctr.tiers.calibrate (runs.run does it)")
            if config.tier_boundaries and len(views) > 1:
                raise ValueError("tier_boundaries (tier_calibration='quantile') hold one modality's tiers; with "
                                 f"{len(views)} modalities use tier_calibration='equal'")
            boundaries = list(config.tier_boundaries) or None
            for v in views:
                mlp_inputs.append(SimTier(num_tiers=len(boundaries) + 1 if boundaries else config.num_tiers,
                                          boundaries=boundaries, count_transform=config.tier_transform,
                                          name=f"sim_tier{v.suffix}")(v.target, v.history,
                                                                      mask=v.has_vector))  # [B, N] each
        parts["vectors"] = views

    attention = DINAttention(hidden_units=config.attention_units, activation=config.activation, name="din")
    interest = attention(query, keys, side_features=side, mask=mask)  # [B, E·k (+P)]
    if extra_block is not None:
        mlp_inputs += list(extra_block(inputs, parts))
    # the user side (`FeatureSpec.user_side_inputs`) may come once for all candidates (batch 1, the
    # `user_candidates` signature): the history's layers take a sequence of batch 1 as shared by the batch;
    # user/context embeddings are broadcast to the candidates' batch here (a no-op when every input has the
    # batch of the candidates)
    candidates = keras.ops.zeros_like(query[:, :1])  # [B, 1]
    user = [u + candidates for u in user]
    features = keras.ops.concatenate(user + [query, interest] + other_item + mlp_inputs, axis=-1)  # [B, F]
    mlp = MLP(hidden_units=config.mlp_units, activation=config.activation, dropout=config.dropout, output_units=1,
              name="mlp")
    logit = keras.ops.squeeze(mlp(features), -1)  # [B]
    ctr = keras.ops.sigmoid(logit)
    return keras.Model(inputs, {"ctr": ctr, "logit": logit}, name=name or f"ctr_{variant}")


def _make_modules(config, views):
    """`[(layer name, target [B, D], history [B, S, D], has_vector [B, S], target_missing [B])]`: the MAKE modules
    over the modalities' `_VectorView`s. One modality, or `make_fusion="concat"`: one module "make" over the
    modalities' vectors concatenated (a history slot counts if any modality has its vector; the target is missing
    when every modality misses it). `"separate"`: one module `make_<m>` per modality."""
    if len(views) == 1 or config.make_fusion == "concat":
        if len(views) == 1:
            v = views[0]
            return [(MAKE_LAYER, v.target, v.history, v.has_vector, v.target_missing)]
        has_vector = views[0].has_vector
        target_missing = views[0].target_missing
        for v in views[1:]:
            has_vector = keras.ops.logical_or(has_vector, v.has_vector)
            target_missing = target_missing * v.target_missing
        return [(MAKE_LAYER, keras.ops.concatenate([v.target for v in views], axis=-1),
                 keras.ops.concatenate([v.history for v in views], axis=-1), has_vector, target_missing)]
    return [(MAKE_LAYER + v.suffix, v.target, v.history, v.has_vector, v.target_missing) for v in views]


def make_layer_names(model):
    """The names of `model`'s MAKE modules ("make", or "make_<m>" per modality with `make_fusion="separate"`)."""
    return [layer.name for layer in model.layers if isinstance(layer, MAKE)]


def _make_outputs(config, views):
    """The outputs of every MAKE module (`mm_ads.layers.MAKE`'s dict) over the modalities' views."""
    return [MAKE(mlp_units=config.make_units, attention_units=config.make_attention_units, activation=config.activation,
                 trainable=not config.make_frozen, name=layer)(target, history, mask=has_vector,
                                                               target_missing=missing)
            for layer, target, history, has_vector, missing in _make_modules(config, views)]


def _make_features(config, inputs, parts):
    """MAKE's knowledge for the ID model's MLP: [v_MAKE [B, 2D], hidden_1 [B, H1], ..., logit [B, 1]] of every MAKE
    module."""
    features = []
    for out in _make_outputs(config, parts["vectors"]):
        features += [out["v_make"]] + list(out["hidden"]) + [out["logit"]]
    if parts.get("cold") is not None:  # a new item: MAKE's outputs on a vector it never trained on are not used
        features = [f * (1.0 - parts["cold"]) for f in features]
    return features


def _target_item_feature(spec, pairs):
    """The target item's id feature (whose table decides which items are new): the vectors' source, else the
    target feature of DIN's first (history, target) pair."""
    paired = [t.name for _, t in pairs]
    modalities = [m for m in spec.modalities() if m.item is not None]
    name = spec[modalities[0].item].source if modalities else paired[0]
    if name not in paired:
        raise ValueError(f"cold_item_rate: the item feature {name!r} (source of {modalities[0].item!r}) is not a "
                         f"target feature of DIN's behaviour sequence ({paired})")
    return name


def _build_make_only(spec, config, inputs, name):
    """MAKE alone (its pre-training model): vectors in, MAKE's logit out (paper eqs. 3-5); with several MAKE modules
    (`make_fusion="separate"`) the sum of their logits."""
    source = spec[_modalities(spec, "make_only")[0].history].source
    mask = keras.ops.not_equal(inputs[source], spec[source].padding_id)  # [B, S]
    outs = _make_outputs(config, _vector_views(spec, "make_only", inputs, mask))
    logit = outs[0]["logit"]
    for out in outs[1:]:
        logit = logit + out["logit"]
    logit = keras.ops.squeeze(logit, -1)  # [B]
    return keras.Model(inputs, {"ctr": keras.ops.sigmoid(logit), "logit": logit}, name=name or "ctr_make_only")
