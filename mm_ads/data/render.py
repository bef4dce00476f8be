"""Renders synthetic items into small RGB images and titles, and user queries into photos and text.

Everything here is a pure function of attribute arrays and a seeded `np.random.Generator`.

Image anatomy (H = W = `image_size`, default 32):
  * background: light grey; query photos get a random tinted background, clutter blobs,
    a viewpoint change (shift, scale, small rotation), lighting (brightness/contrast) and pixel noise;
  * the object: a silhouette chosen by the category (circle, square, triangle, ...; categories
    beyond the number of silhouettes add an inner hole / a frame), scaled by the size attribute;
  * fill colour from the colour attribute, modulated by the pattern (stripes, dots, checks, ...);
  * the material as a texture (gloss highlight, knit noise, metal rim, wood grain, ...);
  * a small brand mark in the top-left corner (a 4×4 patch whose colour encodes the brand).
"""

import io

import numpy as np

COLOURS = (
    ("red", (200, 30, 30), ("crimson", "scarlet")),
    ("orange", (235, 130, 20), ("tangerine", "amber")),
    ("yellow", (230, 210, 40), ("lemon", "golden")),
    ("green", (40, 160, 60), ("emerald", "leaf")),
    ("teal", (20, 140, 140), ("cyan", "aqua")),
    ("blue", (40, 70, 200), ("navy", "cobalt")),
    ("purple", (120, 50, 170), ("violet", "lilac")),
    ("pink", (235, 120, 170), ("rose", "blush")),
    ("brown", (120, 75, 40), ("chocolate", "coffee")),
    ("black", (25, 25, 25), ("jet", "ebony")),
    ("white", (245, 245, 245), ("ivory", "snow")),
    ("grey", (128, 128, 128), ("gray", "silver")),
)
PATTERNS = (
    ("solid", ("plain", "solid-colour")),
    ("striped", ("stripes", "banded")),
    ("vertical-striped", ("pinstripe", "vertical-stripes")),
    ("dotted", ("polka-dot", "spotted")),
    ("checked", ("plaid", "checkered")),
    ("diagonal", ("twill", "slanted")),
)
MATERIALS = (
    ("cotton", ("cotton-blend", "soft")),
    ("silk", ("glossy", "satin")),
    ("wool", ("knit", "knitted")),
    ("metal", ("steel", "metallic")),
    ("wood", ("wooden", "timber")),
)
SIZES = (("small", ("mini", "compact")), ("medium", ("regular", "standard")),
         ("large", ("big", "oversized")), ("wide", ("broad", "extra-wide")))
CATEGORY_NOUNS = (
    ("pillow", ("cushion", "throw-pillow")), ("mug", ("cup", "tumbler")), ("lamp", ("light", "lantern")),
    ("bag", ("handbag", "tote")), ("hat", ("cap", "beanie")), ("shoe", ("sneaker", "trainer")),
    ("dress", ("gown", "frock")), ("rug", ("carpet", "mat")), ("vase", ("jar", "urn")),
    ("clock", ("timepiece", "wall-clock")), ("plate", ("dish", "platter")), ("towel", ("cloth", "napkin")),
    ("chair", ("seat", "stool")), ("scarf", ("shawl", "wrap")), ("basket", ("hamper", "bin")),
    ("bottle", ("flask", "canteen")), ("blanket", ("throw", "quilt")), ("wallet", ("purse", "billfold")),
    ("candle", ("taper", "tealight")), ("mirror", ("looking-glass", "vanity")),
)
FILLERS = ("new", "hot", "sale", "2024", "free-shipping", "premium", "quality", "gift", "official",
           "best", "genuine", "deal", "trendy", "classic", "home", "fashion")
NUM_SILHOUETTES = 10


def category_words(num_categories):
    """(name, synonyms) per category id 1..C (index 0 unused)."""
    out = [("<pad>", ())]
    for c in range(num_categories):
        name, syn = CATEGORY_NOUNS[c % len(CATEGORY_NOUNS)]
        if c >= len(CATEGORY_NOUNS):
            k = c // len(CATEGORY_NOUNS)
            name, syn = f"{name}-{k}", tuple(f"{s}-{k}" for s in syn)
        out.append((name, syn))
    return out


def brand_name(brand_id):
    """A pronounceable, deterministic brand word for a brand id."""
    cons, vows = "bdfgklmnprstvz", "aeiou"
    x, word = int(brand_id) * 2654435761 % (1 << 32), []
    for _i in range(3):
        word.append(cons[x % len(cons)])
        x //= len(cons)
        word.append(vows[x % len(vows)])
        x //= len(vows)
    return "".join(word) + str(brand_id % 10)


def _brand_rgb(brand_ids):
    h = (np.asarray(brand_ids, np.int64) * 2654435761) % (1 << 24)
    return np.stack([(h >> 16) & 255, (h >> 8) & 255, h & 255], -1).astype(np.float32)


def _silhouette(kind, u, v):
    """Mask of silhouette `kind` [n] on centred coordinates u, v in [-1, 1] ([n, H, W])."""
    r = np.sqrt(u * u + v * v)
    shapes = [
        r < 0.8,  # circle
        (np.abs(u) < 0.7) & (np.abs(v) < 0.7),  # square
        (v > -0.7) & (v < 0.7) & (np.abs(u) < (0.7 - v) * 0.55),  # triangle
        np.abs(u) + np.abs(v) < 0.85,  # diamond
        (r < 0.85) & (r > 0.45),  # ring
        ((np.abs(u) < 0.25) & (np.abs(v) < 0.8)) | ((np.abs(v) < 0.25) & (np.abs(u) < 0.8)),  # cross
        (np.abs(u) < 0.85) & (np.abs(v) < 0.4),  # horizontal bar
        (np.abs(u) < 0.4) & (np.abs(v) < 0.85),  # vertical bar
        (u * u / 0.7 + v * v / 0.25) < 1.0,  # ellipse
        (np.abs(u) < 0.75) & (np.abs(v) < 0.75) & ~((u > 0) & (v < 0)),  # L-shape
    ]
    k = kind[:, None, None]
    return np.select([k == i for i in range(len(shapes))], shapes, default=shapes[0])


def render_images(category, colour, pattern, material, size, brand, image_size=32, rng=None, query=False):
    """Renders items (all arrays [n], attribute ids 0-based except category/brand 1-based) → uint8 [n, H, W, 3].

    With `query=True` each image is a user's photo of the item: random viewpoint, lighting,
    background and noise from `rng`.
    """
    n = len(category)
    h = int(image_size)
    grid = (np.arange(h, dtype=np.float32) + 0.5) / h * 2.0 - 1.0
    yy, xx = np.meshgrid(grid, grid, indexing="ij")  # [H, W]
    scale = np.array([0.75, 0.9, 1.05, 1.0], np.float32)[size]  # [n]
    stretch = np.where(size == 3, 0.75, 1.0).astype(np.float32)  # wide items are squashed vertically
    dx = np.zeros(n, np.float32)
    dy = np.zeros(n, np.float32)
    rot = np.zeros(n, np.float32)
    if query:
        dx, dy = rng.uniform(-0.15, 0.15, (2, n)).astype(np.float32)
        scale = scale * rng.uniform(0.85, 1.15, n).astype(np.float32)
        rot = rng.uniform(-0.3, 0.3, n).astype(np.float32)
    cx = xx[None] - dx[:, None, None]
    cy = yy[None] - dy[:, None, None]
    cr, sr = np.cos(rot)[:, None, None], np.sin(rot)[:, None, None]
    u = (cr * cx + sr * cy) / scale[:, None, None]  # [n, H, W]
    v = (-sr * cx + cr * cy) / (scale * stretch)[:, None, None]
    cat0 = np.asarray(category) - 1
    mask = _silhouette(cat0 % NUM_SILHOUETTES, u, v)
    variant = (cat0 // NUM_SILHOUETTES) % 3  # categories beyond the silhouettes get a hole or a frame
    mask &= ~((variant == 1)[:, None, None] & (np.abs(u) < 0.2) & (np.abs(v) < 0.2))
    frame = (variant == 2)[:, None, None] & ~mask & (np.abs(u) < 0.95) & (np.abs(v) < 0.95) & (
        (np.abs(u) > 0.88) | (np.abs(v) > 0.88))

    base = np.array([c[1] for c in COLOURS], np.float32)[colour]  # [n, 3]
    p = pattern[:, None, None]
    stripes_h = np.floor((v + 1) * 4) % 2 == 0
    stripes_v = np.floor((u + 1) * 4) % 2 == 0
    dots = ((np.mod((u + 1) * 4, 1.0) - 0.5) ** 2 + (np.mod((v + 1) * 4, 1.0) - 0.5) ** 2) < 0.07
    checks = stripes_h ^ stripes_v
    diag = np.floor((u + v + 2) * 3) % 2 == 0
    dark = np.select([p == 1, p == 2, p == 3, p == 4, p == 5], [stripes_h, stripes_v, dots, checks, diag], False)
    shade = np.where(dark, 0.55, 1.0)  # [n, H, W]
    m = material[:, None, None]
    gloss = 1.0 + 0.35 * np.exp(-((u + 0.35) ** 2 + (v + 0.35) ** 2) / 0.08)
    knit = 1.0 + 0.12 * np.sign(np.sin(u * 25.0) * np.sin(v * 25.0))
    rim = np.where((np.sqrt(u * u + v * v) > 0.65) | (np.maximum(np.abs(u), np.abs(v)) > 0.6), 0.6, 1.1)
    grain = 1.0 + 0.15 * np.sin(v * 18.0 + 3.0 * np.sin(u * 4.0))
    texture = np.select([m == 1, m == 2, m == 3, m == 4], [gloss, knit, rim, grain], 1.0)
    obj = base[:, None, None, :] * (shade * texture)[..., None]  # [n, H, W, 3]

    if query:
        bg = rng.uniform(150, 240, (n, 1, 1, 3)).astype(np.float32)
        bg = bg + rng.normal(0, 12, (n, h, h, 1)).astype(np.float32)
        blob_x, blob_y = rng.uniform(-1, 1, (2, n, 1, 1)).astype(np.float32)
        blob = ((xx[None] - blob_x) ** 2 + (yy[None] - blob_y) ** 2) < 0.05
        bg = np.where(blob[..., None], rng.uniform(60, 200, (n, 1, 1, 3)).astype(np.float32), bg)
    else:
        bg = np.full((n, h, h, 3), 225.0, np.float32)
    img = np.where(mask[..., None], obj, bg)
    img = np.where(frame[..., None], 60.0, img)
    mark = max(2, h // 8)
    img[:, :mark, :mark, :] = _brand_rgb(brand)[:, None, None, :]
    if query:
        gain = rng.uniform(0.7, 1.3, (n, 1, 1, 1)).astype(np.float32)
        bias = rng.uniform(-25, 25, (n, 1, 1, 1)).astype(np.float32)
        img = img * gain + bias + rng.normal(0, 8, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def encode_png(images):
    """uint8 [n, H, W, 3] → list of PNG bytes."""
    from PIL import Image

    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
        out.append(buf.getvalue())
    return out


def _pick(rng, name, synonyms, p_synonym):
    if synonyms and rng.random() < p_synonym:
        return synonyms[rng.integers(len(synonyms))]
    return name


def make_titles(category, colour, pattern, material, size, brand, rng):
    """Seller titles: brand, attribute words (sometimes a synonym), the category noun and filler words."""
    cats = category_words(int(np.max(category)) if len(category) else 1)
    titles = []
    for c, col, pat, mat, sz, b in zip(category, colour, pattern, material, size, brand):
        words = [
            _pick(rng, COLOURS[col][0], COLOURS[col][2], 0.3),
            _pick(rng, PATTERNS[pat][0], PATTERNS[pat][1], 0.3),
            _pick(rng, MATERIALS[mat][0], MATERIALS[mat][1], 0.3),
            _pick(rng, SIZES[sz][0], SIZES[sz][1], 0.3),
        ]
        rng.shuffle(words)
        fill = list(rng.choice(FILLERS, size=rng.integers(1, 4), replace=False))
        noun = _pick(rng, cats[c][0], cats[c][1], 0.3)
        titles.append(" ".join([brand_name(b)] + fill[:1] + words + [noun] + fill[1:]))
    return titles


def make_queries(category, colour, pattern, material, size, brand, rng):
    """Users' search text: a few of the item's attributes, often as synonyms, in any order, plus the noun."""
    cats = category_words(int(np.max(category)) if len(category) else 1)
    out = []
    for c, col, pat, mat, sz, b in zip(category, colour, pattern, material, size, brand):
        attrs = [
            (_pick(rng, COLOURS[col][0], COLOURS[col][2], 0.5), 0.9),
            (_pick(rng, PATTERNS[pat][0], PATTERNS[pat][1], 0.5), 0.7),
            (_pick(rng, MATERIALS[mat][0], MATERIALS[mat][1], 0.5), 0.6),
            (_pick(rng, SIZES[sz][0], SIZES[sz][1], 0.5), 0.4),
        ]
        words = [w for w, keep in attrs if rng.random() < keep]
        if rng.random() < 0.15:
            words.append(brand_name(b))
        words.append(_pick(rng, cats[c][0], cats[c][1], 0.5))
        rng.shuffle(words)
        out.append(" ".join(words))
    return out
