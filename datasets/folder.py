"""`directory`: any folder of class sub-folders (root/<class>/<image>).

When the folder has `train/` and `validation/` (or `val/`) sub-trees, they are
used as given; otherwise the recipe splits off a seeded validation set.
"""
import pathlib

import numpy as np
from PIL import Image

from datasets.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_VALIDATION_NAMES = ("validation", "val")


def class_folders(root):
    """Sorted visible sub-folders of root: the class names, as keras sorts them."""
    return sorted(p for p in pathlib.Path(root).iterdir()
                  if p.is_dir() and not p.name.startswith("."))


def image_files(folder):
    return sorted(p for p in pathlib.Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def _check_classes(root):
    classes = class_folders(root)
    if not classes:
        raise DataError(f"--data_dir={root} has no class sub-folders "
                        "(expected root/<class name>/<images>)")
    if not any(image_files(c) for c in classes):
        raise DataError(f"--data_dir={root} has class folders but no images in them "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    if len(classes) < 2:
        raise DataError(f"--data_dir={root} has one class folder ({classes[0].name}); "
                        "classification needs at least two")
    return classes


def find_tree(data_dir):
    """(train_dir, validation_dir or None) after checking the folder is usable."""
    if not data_dir:
        raise DataError("--dataset=directory needs --data_dir=FOLDER with class sub-folders")
    root = pathlib.Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data_dir={data_dir} does not exist or is not a folder")
    if not any(root.iterdir()):
        raise DataError(f"--data_dir={data_dir} is empty")
    train = root / "train"
    validation = next((root / n for n in _VALIDATION_NAMES if (root / n).is_dir()), None)
    if train.is_dir() and validation is not None:
        train_classes = [c.name for c in _check_classes(train)]
        val_classes = [c.name for c in _check_classes(validation)]
        if train_classes != val_classes:
            raise DataError(f"{train} and {validation} hold different class folders: "
                            f"{train_classes} vs {val_classes}")
        return train, validation
    _check_classes(root)
    return root, None


def _read_image(path, image_size, channels):
    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8)
    return pixels[..., None] if channels == 1 else pixels


def read_arrays(root, image_size, channels):
    """All readable images under root's class folders; unreadable ones are counted."""
    images, labels, skipped = [], [], []
    for label, folder in enumerate(class_folders(root)):
        for path in image_files(folder):
            try:
                images.append(_read_image(path, image_size, channels))
                labels.append(label)
            except (OSError, ValueError):
                skipped.append(path)
    if not images:
        raise DataError(f"no readable images under {root}")
    return np.stack(images), np.asarray(labels, dtype=np.int64), skipped


def load(data_dir, image_size, channels, seed=0, validation_fraction=0.2):
    """((x_train, y_train), (x_val, y_val)) float32 in [0, 1], plus skipped paths."""
    train_dir, val_dir = find_tree(data_dir)
    x, y, skipped = read_arrays(train_dir, image_size, channels)
    if val_dir is not None:
        x_val, y_val, skipped_val = read_arrays(val_dir, image_size, channels)
        skipped += skipped_val
    else:
        order = np.random.default_rng(seed).permutation(len(x))
        n_val = max(1, int(len(x) * validation_fraction))
        val_idx, train_idx = order[:n_val], order[n_val:]
        x, y, x_val, y_val = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
    return ((x.astype(np.float32) / 255, y),
            (x_val.astype(np.float32) / 255, y_val)), skipped
