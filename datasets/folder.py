"""`directory`: any folder of class sub-folders (root/<class>/<images>).

When the folder has `train/` and `validation/` (or `val/`) sub-trees, they are
used as given; otherwise the recipe splits off a seeded validation set.

Which files count is the rule in experiments/image_folder.py, which the stream
experiment scans with too: the same extensions, the same walk (sub-folders
included, hidden files and folders ignored) and the same checks, so
`--dataset=directory` trains on the same images whether a recipe asks for
arrays or for the folder. A file that breaks the rule is skipped and reported
with its reason, never a crash: a messy photo folder is not bad input.
"""
import pathlib
import typing

import numpy as np
from PIL import Image

from datasets.errors import DataError
from experiments import image_folder
# The rule's names, as this module has always offered them.
from experiments.image_folder import (FORMATS, bmp_problem, file_problem,  # noqa: F401
                                      format_problem, png_problem, printable)

# The extensions both of the stream recipe's loaders read (ImageDataGenerator and
# tf.io.decode_image).
IMAGE_EXTENSIONS = image_folder.EXTENSIONS
_VALIDATION_NAMES = ("validation", "val")


class Skipped(typing.NamedTuple):
    """An image file left out, and why (one line); prints as `path: reason`."""
    path: str  # printable: bytes that are not UTF-8 and control characters escaped
    reason: str

    def __str__(self):
        return f"{self.path}: {self.reason}"


def class_folders(root):
    """Sorted visible sub-folders of root: the class names, as keras sorts them."""
    return [pathlib.Path(root) / name for name in image_folder.class_names_of(root)]


def image_files(folder):
    """str paths of the image files under folder, sub-folders included, in a stable order.

    Hidden files and folders (.DS_Store, macOS ._name.jpg, .git) are ignored.
    """
    return image_folder.image_files(folder)[0]


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


def to_pixels(image, image_size, channels):
    """uint8 [size, size, channels]; decoding happens here, so a broken file raises here."""
    image = image.convert("L" if channels == 1 else "RGB")
    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[..., None] if channels == 1 else pixels


def read_image(path, image_size, channels):
    """(pixels, None), or (None, why it is skipped): never raises for a bad file."""
    return image_folder.read_checked(path, lambda image: to_pixels(image, image_size, channels))


def read_arrays(root, image_size, channels):
    """(images, labels, paths, skipped) of every image file under root's class folders.

    paths are the read files, in the order of images; skipped holds a Skipped
    (path, reason) for each file left out.
    """
    images, labels, paths, skipped = [], [], [], []
    for label, folder in enumerate(class_folders(root)):
        for path in image_files(folder):
            pixels, problem = read_image(path, image_size, channels)
            if problem is None:
                images.append(pixels)
                labels.append(label)
                paths.append(path)
            else:
                skipped.append(Skipped(printable(path), printable(problem)))
    if not images:
        raise DataError(f"no readable images under {printable(root)}")
    found = set(labels)
    empty = [folder for label, folder in enumerate(class_folders(root)) if label not in found]
    if empty:  # as the stream recipe rejects it: a class the model could never learn
        raise DataError(f"--data_dir: class folder {printable(empty[0])} has no readable images "
                        f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
    return np.stack(images), np.asarray(labels, dtype=np.int64), paths, skipped


def load(data_dir, image_size, channels, seed=0, validation_fraction=0.2):
    """((x_train, y_train), (x_val, y_val)) float32 in [0, 1], plus the Skipped files."""
    train_dir, val_dir = find_tree(data_dir)
    x, y, _, skipped = read_arrays(train_dir, image_size, channels)
    if val_dir is not None:
        x_val, y_val, _, skipped_val = read_arrays(val_dir, image_size, channels)
        skipped += skipped_val
    else:
        order = np.random.default_rng(seed).permutation(len(x))
        n_val = max(1, int(round(len(x) * validation_fraction)))  # as the stream recipe splits
        val_idx, train_idx = order[:n_val], order[n_val:]
        x, y, x_val, y_val = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
    return ((x.astype(np.float32) / 255, y),
            (x_val.astype(np.float32) / 255, y_val)), skipped
