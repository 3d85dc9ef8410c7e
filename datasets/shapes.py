"""`shapes`: the embedded default dataset, drawn with Pillow.

Ten classes of simple figures (circle, square, triangle, star, cross, ring,
hexagon, crescent, arrow, heart) at random size, position, rotation and
colour on a noisy background. The default geometry mirrors Fashion-MNIST
(28x28 gray, 10 classes) so every recipe runs on it with no network.

Each example is drawn from its own generator seeded by (seed, index), so a set
is deterministic for a seed and the first n examples do not depend on how many
are asked for. Figures are drawn on a 4x larger mask and shrunk, which gives
anti-aliased edges at small sizes.
"""
import hashlib
import math
import os
import pathlib
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ("circle", "square", "triangle", "star", "cross",
               "ring", "hexagon", "crescent", "arrow", "heart")
_SUPERSAMPLE = 4


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


def _draw_mask(label, size, rng):
    """A white figure of class `label` on black, `size` x `size` pixels."""
    big = size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    radius = rng.uniform(0.22, 0.42) * big
    margin = radius * 1.05
    center = (rng.uniform(margin, big - margin), rng.uniform(margin, big - margin))
    angle = rng.uniform(0, 2 * math.pi)
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


def draw_example(label, size, channels, rng):
    """One uint8 image (size, size, channels) of class `label`."""
    mask = np.asarray(_draw_mask(label, size, rng), dtype=np.float32)[..., None] / 255
    background = rng.uniform(0, 255, size=3)
    foreground = rng.uniform(0, 255, size=3)
    # Keep the figure visible in gray too: at least 60 levels of luminance apart.
    luma = np.array([0.299, 0.587, 0.114])
    while abs((foreground - background) @ luma) < 60:
        foreground = rng.uniform(0, 255, size=3)
    image = background * (1 - mask) + foreground * mask
    image += rng.normal(0, rng.uniform(5, 25), size=image.shape)
    image = np.clip(image, 0, 255)
    if channels == 1:
        image = image @ luma[:, None]
    return image.astype(np.uint8)


def _example(seed, index, image_size, channels):
    """(pixels, label) of example `index`: its own generator, so any prefix is stable."""
    label = index % len(CLASS_NAMES)
    return draw_example(label, image_size, channels, np.random.default_rng([seed, index])), label


def generate(n, image_size=28, channels=1, seed=0, offset=0):
    """Returns (images uint8 [n, size, size, channels], labels int64 [n]).

    Labels cycle through the classes in a seeded order so every class is
    equally represented. `offset` starts at another index: a validation set
    drawn with offset=n_train shares no example with the training set.
    """
    if channels not in (1, 3):
        raise ValueError(f"shapes draws 1 or 3 channels, not {channels}")
    images = np.empty((n, image_size, image_size, channels), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        images[i], labels[i] = _example(seed, offset + i, image_size, channels)
    return images, labels


def load(n_train=6000, n_val=1000, image_size=28, channels=1, seed=0):
    """((x_train, y_train), (x_val, y_val)) as float32 in [0, 1] and int labels."""
    x_train, y_train = generate(n_train, image_size, channels, seed)
    x_val, y_val = generate(n_val, image_size, channels, seed, offset=n_train)
    return ((x_train.astype(np.float32) / 255, y_train),
            (x_val.astype(np.float32) / 255, y_val))


def write_folder(root, n, image_size=150, channels=3, seed=0, image_format="jpeg",
                 offset=0):
    """Writes n examples as root/<class>/<index>.<ext>, atomically.

    The tree is built in a temporary sibling folder and renamed into place, so
    an interrupted run never leaves a half-written folder under `root`.
    """
    root = pathlib.Path(root)
    ext = {"jpeg": "jpg", "png": "png"}[image_format]
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        for name in CLASS_NAMES:
            (staging / name).mkdir()
        for i in range(n):
            pixels, label = _example(seed, offset + i, image_size, channels)
            image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
            image.save(staging / CLASS_NAMES[label] / f"{offset + i:06d}.{ext}")
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def cached_folder(n_train, n_val, image_size=150, channels=3, seed=0,
                  image_format="jpeg", cache_dir=None):
    """A train/ + validation/ class-folder tree, generated once and reused.

    It lives outside the repository (default ~/.cache/keras-gpu-recipes), named
    by everything that determines its content.
    """
    cache_dir = pathlib.Path(cache_dir or os.environ.get(
        "KERAS_GPU_RECIPES_CACHE", pathlib.Path.home() / ".cache" / "keras-gpu-recipes"))
    key = f"{n_train}-{n_val}-{image_size}-{channels}-{seed}-{image_format}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    root = cache_dir / f"shapes-{image_size}px-{channels}ch-{digest}"
    train, val = root / "train", root / "validation"
    if not train.is_dir():
        write_folder(train, n_train, image_size, channels, seed, image_format)
    if not val.is_dir():
        write_folder(val, n_val, image_size, channels, seed, image_format,
                     offset=n_train)
    return root
