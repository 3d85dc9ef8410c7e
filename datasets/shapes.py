"""`shapes`: the embedded default dataset, drawn with Pillow.

Ten classes of simple figures (circle, square, triangle, star, cross, ring,
hexagon, crescent, arrow, heart) on a noisy background. The default geometry
mirrors Fashion-MNIST (28x28 gray, 10 classes) so every recipe runs on it
with no network.

Two variants (VARIANTS), chosen by --dataset:
  shapes       the default, made to teach: a light figure on a dark
               background, near the centre (within 5% of the side) and near
               upright (within 12 degrees), at random size, colour and noise.
               The default runs of batch, prune, device, profile and stream
               learn it (validation accuracy 0.86 to 0.99), none to 1.0, so
               their before/after numbers mean something.
  shapes_hard  the earlier default: random polarity (the figure may be
               darker than its background), anywhere in the image, at any
               rotation. MLPs stay near 0.2-0.3 on it; convolutions still
               learn it (mixed_precision's CNN to 0.995: its default).

Each example is drawn from its own generator seeded by (seed, index), so a set
is deterministic for a seed and the first n examples do not depend on how many
are asked for. Figures are drawn on a 4x larger mask and shrunk, which gives
anti-aliased edges at small sizes.
"""
import dataclasses
import hashlib
import math
import os
import pathlib
import shutil
import tempfile
import zipfile

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ("circle", "square", "triangle", "star", "cross",
               "ring", "hexagon", "crescent", "arrow", "heart")
_SUPERSAMPLE = 4
# The luminance weights of ITU-R 601, as Pillow's "L" mode uses them.
_LUMA = np.array([0.299, 0.587, 0.114])
# Bump when the drawing changes: cached sets are named by it (see _cache_path).
GENERATOR_VERSION = 2
# Sets at least this large are cached as arrays; smaller ones draw in well under a second.
CACHE_MIN_EXAMPLES = 2000
# shapes_hard: figure and background at least this many gray levels apart.
_MIN_CONTRAST = 60
# shapes: every background channel below DARK_MAX, every figure channel from
# LIGHT_MIN up, so a figure is always at least 90 gray levels lighter.
DARK_MAX, LIGHT_MIN = 80, 170


@dataclasses.dataclass(frozen=True)
class Variant:
    light_on_dark: bool  # light figure on a dark background; False: any colours, either way
    jitter: float | None  # centre offset, up to this fraction of the side; None: anywhere
    rotation_deg: float | None  # rotation within +-this many degrees; None: any angle


VARIANTS = {
    "shapes": Variant(light_on_dark=True, jitter=0.05, rotation_deg=12),
    "shapes_hard": Variant(light_on_dark=False, jitter=None, rotation_deg=None),
}


def _polygon(center, radius, angle, points):
    cx, cy = center
    return [(cx + r * math.cos(angle + a), cy + r * math.sin(angle + a))
            for r, a in ((radius * pr, pa) for pr, pa in points)]


def _regular(n):
    return [(1.0, 2 * math.pi * k / n) for k in range(n)]


def _star(n=5, inner=0.45):
    return [(1.0 if k % 2 == 0 else inner, math.pi * k / n) for k in range(2 * n)]


def _cross(width=0.35):
    w = width
    corners = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
               (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
    return [(math.hypot(x, y), math.atan2(y, x)) for x, y in corners]


def _arrow():
    corners = [(1, 0), (0.1, 0.7), (0.1, 0.3), (-1, 0.3), (-1, -0.3),
               (0.1, -0.3), (0.1, -0.7)]
    return [(math.hypot(x, y), math.atan2(y, x)) for x, y in corners]


def _heart():
    ts = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    xs = 16 * np.sin(ts) ** 3 / 17
    ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts)
           - np.cos(4 * ts)) / 17
    return [(math.hypot(x, y), math.atan2(y, x)) for x, y in zip(xs, ys)]


_OUTLINES = {"square": _regular(4), "triangle": _regular(3), "star": _star(),
             "cross": _cross(), "hexagon": _regular(6), "arrow": _arrow(),
             "heart": _heart()}


def _draw_mask(label, size, rng, variant):
    """A white figure of class `label` on black, `size` x `size` pixels."""
    big = size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    radius = rng.uniform(0.22, 0.42) * big
    if variant.jitter is None:
        margin = radius * 1.05
        center = (rng.uniform(margin, big - margin), rng.uniform(margin, big - margin))
    else:
        center = tuple(big / 2 + rng.uniform(-variant.jitter, variant.jitter, size=2) * big)
    if variant.rotation_deg is None:
        angle = rng.uniform(0, 2 * math.pi)
    else:
        angle = math.radians(rng.uniform(-variant.rotation_deg, variant.rotation_deg))
    name = CLASS_NAMES[label]
    cx, cy = center
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if name == "circle":
        draw.ellipse(box, fill=255)
    elif name == "ring":
        draw.ellipse(box, fill=255)
        inner = radius * rng.uniform(0.45, 0.65)
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif name == "crescent":
        draw.ellipse(box, fill=255)
        shift = radius * 0.55
        ox, oy = cx + shift * math.cos(angle), cy + shift * math.sin(angle)
        draw.ellipse([ox - radius, oy - radius, ox + radius, oy + radius], fill=0)
    else:
        draw.polygon(_polygon(center, radius, angle, _OUTLINES[name]), fill=255)
    return mask.resize((size, size), Image.Resampling.LANCZOS)


def _colours(rng, light_on_dark):
    """(background, foreground) RGB colours of one example."""
    if light_on_dark:
        return rng.uniform(0, DARK_MAX, size=3), rng.uniform(LIGHT_MIN, 255, size=3)
    background = rng.uniform(0, 255, size=3)
    foreground = rng.uniform(0, 255, size=3)
    while abs((foreground - background) @ _LUMA) < _MIN_CONTRAST:
        foreground = rng.uniform(0, 255, size=3)
    return background, foreground


def draw_example(label, size, channels, rng, variant=VARIANTS["shapes"]):
    """One uint8 image (size, size, channels) of class `label`."""
    mask = np.asarray(_draw_mask(label, size, rng, variant), dtype=np.float32)[..., None] / 255
    background, foreground = _colours(rng, variant.light_on_dark)
    image = background * (1 - mask) + foreground * mask
    image += rng.normal(0, rng.uniform(5, 25), size=image.shape)
    image = np.clip(image, 0, 255)
    if channels == 1:
        image = image @ _LUMA[:, None]
    return image.astype(np.uint8)


def _example(seed, index, image_size, channels, variant):
    """(pixels, label) of example `index`: its own generator, so any prefix is stable."""
    label = index % len(CLASS_NAMES)
    rng = np.random.default_rng([seed, index])
    return draw_example(label, image_size, channels, rng, variant), label


def generate(n, image_size=28, channels=1, seed=0, offset=0, variant="shapes"):
    """Returns (images uint8 [n, size, size, channels], labels int64 [n]).

    Labels cycle through the classes so every class is equally represented.
    `offset` starts at another index: a validation set drawn with
    offset=n_train shares no example with the training set. `variant` names
    one of VARIANTS.
    """
    if channels not in (1, 3):
        raise ValueError(f"shapes draws 1 or 3 channels, not {channels}")
    variant = VARIANTS[variant]
    images = np.empty((n, image_size, image_size, channels), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        images[i], labels[i] = _example(seed, offset + i, image_size, channels, variant)
    return images, labels


def load(n_train=6000, n_val=1000, image_size=28, channels=1, seed=0, variant="shapes",
         cache_dir=None):
    """((x_train, y_train), (x_val, y_val)) as float32 in [0, 1] and int labels.

    Sets of CACHE_MIN_EXAMPLES or more are drawn once and kept in the cache
    folder (see cache_root) as uint8 .npz: drawing 12,000 takes seconds, reading
    them back a few milliseconds, so every later run starts at once.
    """
    path = None
    if n_train + n_val >= CACHE_MIN_EXAMPLES:
        path = _cache_path(cache_dir, variant, "arrays", n_train, n_val, image_size, channels,
                           seed).with_suffix(".npz")
    arrays = _read_cached_arrays(path) if path is not None else None
    if arrays is None:
        arrays = (*generate(n_train, image_size, channels, seed, variant=variant),
                  *generate(n_val, image_size, channels, seed, offset=n_train, variant=variant))
        if path is not None:
            _write_cached_arrays(path, arrays)
    x_train, y_train, x_val, y_val = arrays
    return ((x_train.astype(np.float32) / 255, y_train),
            (x_val.astype(np.float32) / 255, y_val))


def _read_cached_arrays(path):
    """(x_train, y_train, x_val, y_val) from a cached .npz, or None if absent or damaged."""
    try:
        with np.load(path) as f:
            return tuple(f[name] for name in ("x_train", "y_train", "x_val", "y_val"))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _write_cached_arrays(path, arrays):
    """Temp file + os.replace: a run that reads the cache never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **dict(zip(("x_train", "y_train", "x_val", "y_val"), arrays)))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cache_root(cache_dir=None):
    """Where generated sets are kept: cache_dir, $KERAS_GPU_RECIPES_CACHE, or
    ~/.cache/keras-gpu-recipes (outside the repository)."""
    return pathlib.Path(cache_dir or os.environ.get(
        "KERAS_GPU_RECIPES_CACHE", pathlib.Path.home() / ".cache" / "keras-gpu-recipes"))


def _cache_path(cache_dir, variant, kind, *params):
    """A name for everything that decides a generated set's content. The generator's
    version and the variant's parameters are in it, so a set drawn by older code,
    or with another look, is never served."""
    key = "-".join(map(str, (GENERATOR_VERSION, kind, *params, VARIANTS[variant])))
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    image_size, channels = params[2], params[3]
    return cache_root(cache_dir) / f"{variant}-{kind}-{image_size}px-{channels}ch-{digest}"


def write_folder(root, n, image_size=150, channels=3, seed=0, image_format="jpeg",
                 offset=0, variant="shapes"):
    """Writes n examples as root/<class>/<index>.<ext>, atomically.

    The tree is built in a temporary sibling folder and renamed into place, so
    an interrupted run never leaves a half-written folder under `root`.
    """
    root = pathlib.Path(root)
    ext = {"jpeg": "jpg", "png": "png"}[image_format]
    look = VARIANTS[variant]
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        for name in CLASS_NAMES:
            (staging / name).mkdir()
        for i in range(n):
            pixels, label = _example(seed, offset + i, image_size, channels, look)
            image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
            image.save(staging / CLASS_NAMES[label] / f"{offset + i:06d}.{ext}")
        try:
            os.replace(staging, root)
        except OSError:
            if not root.is_dir():
                raise
            shutil.rmtree(staging)  # another process drew the same folder first: same pixels
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def cached_folder(n_train, n_val, image_size=150, channels=3, seed=0,
                  image_format="jpeg", cache_dir=None, variant="shapes"):
    """A train/ + validation/ class-folder tree, generated once and reused.

    It lives in the cache folder (see cache_root), named by everything that
    determines its content.
    """
    root = _cache_path(cache_dir, variant, image_format, n_train, n_val, image_size, channels,
                       seed)
    train, val = root / "train", root / "validation"
    if not train.is_dir():
        write_folder(train, n_train, image_size, channels, seed, image_format, variant=variant)
    if not val.is_dir():
        write_folder(val, n_val, image_size, channels, seed, image_format,
                     offset=n_train, variant=variant)
    return root
