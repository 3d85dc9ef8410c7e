"""Data for the CLI: turns --dataset/--data_dir into what a recipe asks for.

Recipes never import this package (they stay drop-in); main.py calls `load`
and hands the result to `recipe.run`. A recipe states what it wants with a
module-level `DATA` dict:

    form:        "arrays"    -> ((x_train, y_train), (x_val, y_val)), x float32
                                in [0, 1] shaped (n, size, size, channels),
                                y integer class ids
                 "directory" -> (train_dir, validation_dir or None): a
                                class-folder tree of image files
    (--dataset=npz gives arrays of any shape, as stored in the file)
    image_size, channels: the geometry it trains on (generated sets are drawn
                 at it; real images are resized to it)
    examples:    (n_train, n_val) for the generated shapes set (default 6000, 1000)

Every problem with the data raises DataError with a one-line message.
"""
import zipfile

import numpy as np

from datasets import folder, idx, shapes
from datasets.errors import DataError

NAMES = ("shapes", "shapes_hard", "mnist", "fashion_mnist", "directory", "threshold", "npz")
SHAPES_TRAIN, SHAPES_VAL = 6000, 1000


def threshold():
    """The four-point toy: X = [.1, .3, .6, .9], y = x > .5 (validated on itself)."""
    x = np.array([[0.1], [0.3], [0.6], [0.9]], dtype=np.float32)
    y = (x[:, 0] > 0.5).astype(np.float32)
    return (x, y), (x, y)


def npz(path):
    """((x_train, y_train), (x_val, y_val)) from a .npz of those four arrays, any shape."""
    if not path:
        raise DataError("--dataset=npz needs --data_dir=FILE.npz (arrays x_train, y_train, "
                        "x_val, y_val)")
    names = ("x_train", "y_train", "x_val", "y_val")
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in names if k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"--data_dir={path} is not a readable .npz file "
                        f"({type(e).__name__})") from None
    missing = [k for k in names if k not in arrays]
    if missing:
        raise DataError(f"--data_dir={path} lacks the array(s) {', '.join(missing)} "
                        "(expected x_train, y_train, x_val, y_val)")
    x_train, y_train, x_val, y_val = (arrays[k] for k in names)
    for x, y, split in ((x_train, y_train, "train"), (x_val, y_val, "val")):
        if len(x) != len(y) or len(x) == 0:
            raise DataError(f"--data_dir={path}: x_{split} has {len(x)} rows but y_{split} has "
                            f"{len(y)}; each needs one label per row, and some rows")
    return ((x_train.astype(np.float32), y_train.astype(np.int64)),
            (x_val.astype(np.float32), y_val.astype(np.int64)))


def _idx_arrays(name, data_dir, image_size, channels):
    (x_train, y_train), (x_test, y_test) = idx.load(name, data_dir)

    def prepare(images):
        images = images[..., None].astype(np.float32) / 255
        if channels == 3:
            images = np.repeat(images, 3, axis=-1)
        if image_size != images.shape[1]:
            import tensorflow as tf  # Deferred: only resizing needs it.
            images = tf.image.resize(images, (image_size, image_size)).numpy()
        return images

    return (prepare(x_train), y_train.astype(np.int64)), (prepare(x_test), y_test.astype(np.int64))


def load(name, data_dir=None, form="arrays", image_size=28, channels=1, seed=0,
         examples=(SHAPES_TRAIN, SHAPES_VAL)):
    """The data a recipe asked for; see the module docstring for the forms."""
    n_train, n_val = examples
    if name not in NAMES:
        raise DataError(f"unknown --dataset={name}; choose one of {', '.join(NAMES)}")
    if form == "directory":
        if name == "npz":
            raise DataError("this recipe reads image folders; --dataset=npz holds arrays")
        if name in shapes.VARIANTS:
            root = shapes.cached_folder(n_train, n_val, image_size, channels, seed, variant=name)
            return root / "train", root / "validation"
        if name != "directory":
            raise DataError(f"this recipe reads image folders; --dataset={name} is not one "
                            "(use --dataset=directory --data_dir=FOLDER, shapes or shapes_hard)")
        return folder.find_tree(data_dir)
    if name in shapes.VARIANTS:
        return shapes.load(n_train, n_val, image_size, channels, seed, variant=name)
    if name == "threshold":
        return threshold()
    if name == "npz":
        return npz(data_dir)
    if name == "directory":
        data, skipped = folder.load(data_dir, image_size, channels, seed)
        if skipped:
            print(f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}")
        return data
    return _idx_arrays(name, data_dir, image_size, channels)
