"""The image-folder rules, written once: which files of a class-folder tree count, which
are skipped (and why), and the class names.

A file either reads alike in both of the stream recipe's loaders (ImageDataGenerator
and tf.io.decode_image), or is skipped and listed with its reason; no file may crash
a loader or drop a batch. The stream experiment (experiments/stream.py) scans with
these rules, and so does the `directory` dataset of the other recipes
(datasets/folder.py), so a folder trains on the same images whether a recipe asks for
arrays or for the folder. Hidden files and folders (.DS_Store, macOS ._name.jpg,
.git) are ignored; sub-folders of a class folder are read too.

No TensorFlow or Keras at import: datasets/ reads folders without them.
"""
import concurrent.futures
import dataclasses
import io
import os
import pathlib
import struct
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError

# Extensions both stock loaders read, and the formats tf.io.decode_image reads correctly.
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
FORMATS = ("JPEG", "PNG", "BMP")


@dataclasses.dataclass
class Scan:
    """Usable image files of one class-folder tree, and what was left out."""
    paths: list  # str paths of readable images
    labels: list  # int class index of each path
    class_names: list  # sorted class folder names: index i is class i in both loaders
    skipped: list  # (path, reason) of image files that cannot be read; printable paths
    hidden: int  # hidden files and folders ignored (.DS_Store, ._name.jpg, .git)


def printable(text):
    """text on one printable line: bytes that are not UTF-8 and control characters escaped.

    A file name may hold either; print(), a one-line error and JSON must not choke on it.
    """
    text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


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


def read_checked(path, use):
    """(use(the Pillow image of path), None) when both loaders read `path` alike, else
    (None, why not: one printable line). Never raises for a bad file.

    `use` decodes the image (a truncated JPEG only fails at the end), so a file that
    fails to decode is skipped too; any exception is a reason to skip it, never a crash.
    """
    try:
        problem = file_problem(path)
        if problem is None:
            with open(path, "rb") as f:
                data = f.read()
            if not data:
                return None, "empty file (0 bytes)"
            with Image.open(io.BytesIO(data)) as image:
                problem = format_problem(image, data)
                if problem is None:
                    return use(image), None
    except UnidentifiedImageError:
        problem = "not an image file Pillow can identify"
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        message = str(e).strip()
        problem = f"{type(e).__name__}: {message.splitlines()[0] if message else 'unreadable'}"
    return None, printable(problem)


def check_image(path, image_size=150):
    """None when both loaders read `path` alike, else why not (one printable line).

    Decodes the whole file, at reduced scale for JPEGs (`draft`), which is several
    times cheaper than a full decode.
    """
    def decode(image):
        if image.format in ("JPEG", "MPO"):
            image.draft("RGB", (image_size, image_size))
        image.load()

    return read_checked(path, decode)[1]


def class_names_of(root):
    """Visible sub-folders of root, sorted: the class names, as both stock loaders order them."""
    return sorted(p.name for p in pathlib.Path(root).iterdir()
                  if p.is_dir() and not p.name.startswith("."))


def image_files(folder):
    """(str paths of the image files under folder, sub-folders included, in a stable order;
    how many hidden files and folders were ignored)."""
    paths, hidden = [], 0
    for dirpath, dirnames, filenames in os.walk(folder):
        hidden += sum(d.startswith(".") for d in dirnames)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if filename.startswith("."):
                hidden += 1
            elif filename.lower().endswith(EXTENSIONS):
                paths.append(os.path.join(dirpath, filename))
    return paths, hidden


def scan_folder(root, image_size=150, class_names=None, threads=None):
    """Lists and checks every image file under root/<class>/ (sub-folders included)."""
    root = pathlib.Path(root)
    class_names = list(class_names) if class_names is not None else class_names_of(root)
    candidates, hidden = [], 0
    for label, name in enumerate(class_names):
        paths, hidden_here = image_files(root / name)
        candidates += [(path, label) for path in paths]
        hidden += hidden_here
    threads = threads or min(16, 2 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        problems = list(pool.map(lambda c: check_image(c[0], image_size), candidates))
    scan = Scan([], [], class_names, [], hidden)
    for (path, label), problem in zip(candidates, problems):
        if problem is None:
            scan.paths.append(path)
            scan.labels.append(label)
        else:
            scan.skipped.append((printable(path), problem))
    return scan


def split_scan(scan, fraction, seed):
    """(train, validation) Scans: a seeded random `fraction` of the images is held out."""
    order = np.random.default_rng(seed).permutation(len(scan.paths))
    n_val = max(1, int(round(len(order) * fraction)))

    def part(indices):
        indices = sorted(indices)
        return Scan([scan.paths[i] for i in indices], [scan.labels[i] for i in indices],
                    scan.class_names, [], 0)

    return part(order[n_val:]), part(order[:n_val])

