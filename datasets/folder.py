"""`directory`: any folder of class sub-folders (root/<class>/<images>).

When the folder has `train/` and `validation/` (or `val/`) sub-trees, they are
used as given; otherwise the recipe splits off a seeded validation set.

Which files count is the stream recipe's rule (recipes/stream.py, "finding the
images"), written again here because a recipe file imports nothing from this
package: the same extensions, the same walk (sub-folders included, hidden
files and folders ignored) and the same checks, so `--dataset=directory`
trains on the same images whether a recipe asks for arrays or for the folder.
A file that breaks the rule is skipped and reported with its reason, never a
crash: a messy photo folder is not bad input.
"""
import io
import os
import pathlib
import struct
import typing
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from datasets.errors import DataError

# The extensions both of the stream recipe's loaders read (ImageDataGenerator and
# tf.io.decode_image), and the formats tf.io.decode_image reads correctly.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
FORMATS = ("JPEG", "PNG", "BMP")
_VALIDATION_NAMES = ("validation", "val")


class Skipped(typing.NamedTuple):
    """An image file left out, and why (one line); prints as `path: reason`."""
    path: str  # printable: bytes that are not UTF-8 and control characters escaped
    reason: str

    def __str__(self):
        return f"{self.path}: {self.reason}"


def printable(text):
    """text on one printable line: bytes that are not UTF-8 and control characters escaped.

    A file name may hold either; print(), a one-line error and JSON must not choke on it.
    """
    text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def class_folders(root):
    """Sorted visible sub-folders of root: the class names, as keras sorts them."""
    return sorted(p for p in pathlib.Path(root).iterdir()
                  if p.is_dir() and not p.name.startswith("."))


def image_files(folder):
    """str paths of the image files under folder, sub-folders included, in a stable order.

    Hidden files and folders (.DS_Store, macOS ._name.jpg, .git) are ignored.
    """
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        paths += [os.path.join(dirpath, name) for name in sorted(filenames)
                  if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)]
    return paths


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


def file_problem(path):
    """Why `path` is not a file both loaders can open (or None), before reading it."""
    if not os.path.isfile(path):  # a FIFO named x.jpg would block its reader forever
        return "broken symbolic link" if os.path.islink(path) else "not a regular file"
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return "file name is not valid UTF-8, which tf.data cannot take: rename the file"
    return None


def png_problem(data, mode):
    """Why tf.io.decode_image would fail on, or misread, a PNG that Pillow reads (or None).

    Pillow does not check the IDAT and IEND checksums and needs no IEND chunk;
    libpng rejects such a file. A 16-bit grayscale PNG Pillow clips to white,
    where tf.io.decode_image scales it to 8 bits.
    """
    if mode.startswith(("I", "F")):  # I;16: Pillow's 16-bit grey
        return ("16-bit grayscale PNG: Pillow (ImageDataGenerator) clips it to white; "
                "save it as 8-bit")
    position = 8
    while position + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        end = position + 12 + length
        if end > len(data) or zlib.crc32(data[position + 4:end - 4]) != int.from_bytes(
                data[end - 4:end], "big"):
            return f"PNG chunk {kind.decode('latin-1')} is truncated or corrupt (bad checksum)"
        if kind == b"IEND":
            return None
        position = end
    return "PNG file ends before its IEND chunk (truncated)"


def bmp_problem(data, mode):
    """Why tf.io.decode_image would fail on, or misread, a BMP that Pillow reads (or None).

    TensorFlow reads only the bits per pixel from the header: it fails on 1-, 4-
    and 16-bit, RLE-compressed and OS/2 files, reads an 8-bit file's palette
    indices as grey levels, and 32-bit bit fields as BGRA whatever the masks say.
    """
    header_size, = struct.unpack_from("<I", data, 14)
    bits, compression = struct.unpack_from("<HI", data, 28)
    if header_size < 40:
        return "OS/2 BMP: tf.io.decode_image cannot read it"
    if (bits, compression) in ((24, 0), (32, 0)) or ((bits, compression) == (8, 0) and mode == "L"):
        return None
    if (bits, compression) == (32, 3) and struct.unpack_from("<III", data, 54) == (
            0xFF0000, 0xFF00, 0xFF):
        return None
    if (bits, compression) == (8, 0):
        return "8-bit BMP with a colour palette: tf.io.decode_image reads its indices as grey"
    packing = {0: "", 1: ", RLE8-compressed", 2: ", RLE4-compressed", 3: ", bit fields"}
    return (f"{bits}-bit BMP{packing.get(compression, f', compression {compression}')}: "
            "tf.io.decode_image cannot read it")


def format_problem(image, data):
    """Why an image Pillow opened is not one both loaders read alike (or None)."""
    # MPO is a camera's JPEG with more frames after the first; both loaders read the first.
    image_format = "JPEG" if image.format == "MPO" else image.format
    if image_format not in FORMATS:
        return f"{image.format} data, not {'/'.join(FORMATS)}"
    if image_format == "PNG":
        return png_problem(data, image.mode)
    if image_format == "BMP":
        return bmp_problem(data, image.mode)
    return None


def to_pixels(image, image_size, channels):
    """uint8 [size, size, channels]; decoding happens here, so a broken file raises here."""
    image = image.convert("L" if channels == 1 else "RGB")
    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[..., None] if channels == 1 else pixels


def read_image(path, image_size, channels):
    """(pixels, None), or (None, why it is skipped): never raises for a bad file."""
    try:
        problem = file_problem(path)
        if problem is not None:
            return None, problem
        with open(path, "rb") as f:
            data = f.read()
        if not data:
            return None, "empty file (0 bytes)"
        with Image.open(io.BytesIO(data)) as image:
            problem = format_problem(image, data)
            if problem is not None:
                return None, problem
            return to_pixels(image, image_size, channels), None
    except UnidentifiedImageError:
        return None, "not an image file Pillow can identify"
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        message = str(e).strip()
        return None, f"{type(e).__name__}: {message.splitlines()[0] if message else 'unreadable'}"


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
