"""MNIST and Fashion-MNIST from the four published idx `.gz` files.

Where the files are looked for, in order: `--data_dir`, the keras cache
(~/.keras/datasets/<name>/, or mnist.npz there), Debian's
`dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist), and last
keras' own download. Every file is checked (magic number, shape, count) and a
bad one is named in the error.
"""
import gzip
import pathlib
import struct
import zlib

import numpy as np

from datasets.errors import DataError

FILES = {"x_train": "train-images-idx3-ubyte.gz", "y_train": "train-labels-idx1-ubyte.gz",
         "x_test": "t10k-images-idx3-ubyte.gz", "y_test": "t10k-labels-idx1-ubyte.gz"}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049
_KERAS_CACHE = pathlib.Path.home() / ".keras" / "datasets"
_DEBIAN_DIRS = {"fashion_mnist": pathlib.Path("/usr/share/datasets/fashion-mnist")}
_KERAS_CACHE_DIRS = {"mnist": "mnist", "fashion_mnist": "fashion-mnist"}


def read_idx(path):
    """One idx file as a uint8 array: images (n, rows, cols) or labels (n,)."""
    path = pathlib.Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a readable idx file ({e}); download it again") from None
    if len(raw) < 8:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, no idx header")
    magic, count = struct.unpack(">II", raw[:8])
    if magic == _IMAGES_MAGIC:
        if len(raw) < 16:
            raise DataError(f"{path} is truncated: no image dimensions in its header")
        rows, cols = struct.unpack(">II", raw[8:16])
        shape, header = (count, rows, cols), 16
    elif magic == _LABELS_MAGIC:
        shape, header = (count,), 8
    else:
        raise DataError(f"{path} is not an idx image or label file (magic number {magic})")
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(f"{path} is truncated or padded: header says {expected} bytes "
                        f"of data, file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_folder(folder):
    """The four files in `folder`, checked against each other."""
    folder = pathlib.Path(folder)
    arrays = {key: read_idx(folder / name) for key, name in FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1:
            raise DataError(f"{folder / FILES['x_' + split]} and {FILES['y_' + split]} "
                            "are swapped or not image/label files")
        if len(x) != len(y):
            raise DataError(f"{folder / FILES['x_' + split]} has {len(x)} images but "
                            f"{FILES['y_' + split]} has {len(y)} labels")
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def has_idx_files(folder):
    return all((pathlib.Path(folder) / name).is_file() for name in FILES.values())


def _candidates(name, data_dir):
    if data_dir:
        return [pathlib.Path(data_dir)]
    folders = [_KERAS_CACHE / _KERAS_CACHE_DIRS[name]]
    if name in _DEBIAN_DIRS:
        folders.append(_DEBIAN_DIRS[name])
    return folders


def load(name, data_dir=None):
    """((x_train, y_train), (x_test, y_test)) as uint8 images and labels."""
    if name not in _KERAS_CACHE_DIRS:
        raise DataError(f"no idx dataset named {name!r}")
    for folder in _candidates(name, data_dir):
        if has_idx_files(folder):
            return read_idx_folder(folder)
    if data_dir:
        missing = [f for f in FILES.values() if not (pathlib.Path(data_dir) / f).is_file()]
        raise DataError(f"--data_dir={data_dir} lacks {', '.join(missing)} "
                        f"(the four {name} idx .gz files)")
    if name == "mnist" and (_KERAS_CACHE / "mnist.npz").is_file():
        with np.load(_KERAS_CACHE / "mnist.npz") as f:
            return (f["x_train"], f["y_train"]), (f["x_test"], f["y_test"])
    return _download(name)


def _download(name):
    """keras' own download, the last resort; offline it fails in one line."""
    import keras  # Deferred: only this last resort needs it.

    try:
        return getattr(keras.datasets, name).load_data()
    except Exception:  # keras raises several types for a failed fetch
        package = (" or `apt-get install dataset-fashion-mnist`"
                   if name == "fashion_mnist" else "")
        raise DataError(f"could not find or download {name}: pass --data_dir=FOLDER with "
                        f"its four idx .gz files{package}") from None
