"""Image folders larger than memory: ImageDataGenerator vs tf.data, measured.

Shows: the same class-folder tree read two ways into the same small CNN: the
classic `ImageDataGenerator(rescale=1/255).flow_from_directory(...)` fed to
`fit`, and its successor, a tf.data pipeline that decodes and resizes in
parallel, optionally caches (--cache=memory or a folder) and prefetches.
Both see the same classes, class indices, target size, rescaling and steps;
--augment applies the generator's usual augmentation (rotation, shifts, zoom,
horizontal flip) to both, on the tf.data side as a Keras layer in the pipeline:
RandomAffine composes all four into one resampling pass, as the generator
does (--augment_with=layers uses the four stock Keras layers, one pass each,
about 3x slower on a CPU). --cache fills the cache with one full read before
`fit`: a tf.data cache is only kept once its input is read to the end, and
`fit` stops each epoch after its steps, so a cache filled inside `fit` served
epoch 2 only sometimes. For each loader it reports input-pipeline images/s
alone (iterating the data without training), training images/s inside `fit`,
peak RSS and validation accuracy; --compare runs both, alternating, and
reports the speedup.
Before any training every file is checked once (in threads, JPEGs decoded
at reduced scale; check() does it, and remembers the result while the folder
is unchanged): any file both loaders cannot read alike is skipped, counted and
listed with its reason (skipped_files): truncated or corrupt images, text
files named .jpg, zero-byte files, GIF/WebP/TIFF data under an image name,
the BMP and PNG variants tf.io.decode_image fails on or misreads (RLE, 1/4/16-
bit and palette BMPs, PNGs with bad checksums, 16-bit gray PNGs), names that
are not valid UTF-8, FIFOs and broken links. Hidden files (.DS_Store, macOS
._name.jpg) are ignored; grayscale, CMYK and RGBA images are converted to RGB
by both loaders and used; sub-folders of a class folder are read too.
--on_bad_image=fail stops instead, naming the first bad file. (Both stock
loaders crash mid-epoch on such files.) The `directory` dataset of the other
recipes applies the same rule (datasets/folder.py).
Run:    python main.py --recipe=stream --compare
        python main.py --recipe=stream --loader=tf_data --cache=memory --augment
        python main.py --recipe=stream --compare --data_dir=FOLDER   # any class-folder tree
        python main.py --recipe=stream --strategy=mirrored   # several GPUs; tf.data only
        python main.py --recipe=stream --compare --resume    # continue a killed run
Expect: on the default shapes data (1,000 + 200 small 150x150 JPEGs, 2 shared
        CPU cores, ~16 s) --compare measured tf.data at 3.2x the generator's
        input rate and 1.7x its training rate (2,021 vs 1,215 images/s,
        batch / median step), and validation accuracy after 5 epochs 0.945
        (tf.data) and 0.88 (generator: PIL's resize, not TensorFlow's, and
        another batch order); the model is deliberately small so that the
        input pipeline shows. With --cache=memory --augment, 6.7x in training
        (1,500 vs 223 images/s), accuracy 0.795 and 0.745 (augmented images
        are harder, and 5 epochs are few for them).
        On 2,000 cats-vs-dogs photos (benchmarks/stream.py, steps_per_execution
        4, ~4 min) tf.data trained 3.0x faster than the generator with one
        worker and 2.3x faster than with two, augmented 5.0x faster (fused
        layer; the four stock layers 2.2x), cached epochs 7.1x (the model
        alone is only ~10x), and streaming memory grew 1.3% with 4x the images.
Copy:   this file alone works in any project with tensorflow, keras, tf-keras,
        pillow, scipy and psutil installed:
        run(Config(), "logs", (train_dir, val_dir_or_None), model=your_model)
        (model= is optional: a keras.Model taking image_size x image_size RGB,
        copied, or a builder fn(input_shape, num_classes)); add
        strategy=tf.distribute.MirroredStrategy() for several GPUs (the tf.data
        loader only: ImageDataGenerator cannot be distributed; --batch_size is
        then per replica, the learning rate scales with the replica count) and,
        for MultiWorkerMirroredStrategy, fit= a loop called like
        keras.Model.fit(model, ...) (Keras 3's own fails there; the CLI passes
        one). Each worker reads and decodes every file and keeps its share of
        each batch (DATA sharding), and all run the same steps. Running it again
        on the same folder continues a killed run: a finished loader is read
        back, an unfinished one goes on from its last finished epoch.

Where ImageDataGenerator comes from: Keras 3 dropped it from
`keras.preprocessing.image`; `tensorflow.keras.preprocessing.image` resolves to
Keras 3's private legacy copy until some import (tensorflow_model_optimization
does) switches TensorFlow's keras alias to Keras 2. This recipe imports it from `tf_keras`
(the Keras 2 package the TensorFlow team maintains alongside Keras 3), which
is the same class whatever else the process imported. Its iterator is a Keras 2 Sequence,
so a five-line `keras.utils.PyDataset` adapter hands it to Keras 3's `fit`;
`workers` is set on that adapter (`fit(workers=...)` and
`flow_from_directory(workers=...)` raise TypeError in Keras 3). Its
augmentation needs scipy.
"""
import concurrent.futures
import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import math
import os
import pathlib
import shutil
import struct
import tempfile
import threading
import socket
import time
import typing
import zlib

import keras
import numpy as np
import psutil
import tensorflow as tf
from PIL import Image, UnidentifiedImageError
from tf_keras.preprocessing.image import ImageDataGenerator

# What main.py feeds this recipe: a class-folder tree of 150x150 RGB JPEGs.
DATA = {"form": "directory", "image_size": 150, "channels": 3, "examples": (1000, 200)}
HEADLINE = ("generator_input_images_per_sec", "tf_data_input_images_per_sec",
            "generator_train_images_per_sec", "tf_data_train_images_per_sec", "speedup",
            "generator_val_accuracy", "tf_data_val_accuracy", "skipped_files", "wall_time_s")

# Extensions both stock loaders read, and the formats tf.io.decode_image reads.
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
FORMATS = ("JPEG", "PNG", "BMP")
# ImageDataGenerator's usual augmentation; augmentation_layers() mirrors it.
GENERATOR_AUGMENTATION = dict(rotation_range=20, width_shift_range=0.1, height_shift_range=0.1,
                              zoom_range=0.1, horizontal_flip=True, fill_mode="nearest")
LOADERS = ("generator", "tf_data")
RESUMABLE = True  # per-epoch checkpoints: main.py's --resume continues a killed run
STRATEGIES = ("mirrored", "multi_worker")  # run(strategy=, fit=), the tf.data loader only
TAKES_MODEL = True  # run() takes model=: your keras.Model, trained behind both loaders


@dataclasses.dataclass
class Config:
    loader: typing.Literal["generator", "tf_data"] = "tf_data"  # which loader to train with
    compare: bool = False  # run both loaders (alternating) and report the speedup
    epochs: int = 5  # training epochs per loader
    batch_size: int = 32  # images per step and replica, the same for both loaders
    steps_per_epoch: int | None = None  # optional cap on steps per epoch (default: one pass)
    image_size: int = 150  # images are resized to image_size x image_size RGB
    cache: str = "none"  # tf.data cache: none (stream every epoch), memory, or a folder PATH
    augment: bool = False  # random rotation, shifts, zoom and flip on the fly in both loaders
    augment_with: typing.Literal["fused", "layers"] = "fused"  # tf.data: RandomAffine (one pass)
    # or the stock RandomRotation/Translation/Zoom/Flip layers (one pass each)
    on_bad_image: typing.Literal["skip", "fail"] = "skip"  # unreadable files: skip+list, or stop
    generator_workers: int = 1  # threads filling the generator's batches (1: the classic recipe)
    input_batches: int | None = None  # batches timed without training (default: one epoch)
    warmup_steps: int = 3  # first steps/batches left out of throughput
    steps_per_execution: int = 1  # training steps per compiled call (>1 cuts per-step overhead)
    validation_fraction: float = 0.2  # held out when the folder has no validation/ sub-tree
    learning_rate: float = 1e-3  # Adam learning rate
    scale_lr_with_replicas: bool = True  # multiply the learning rate by the replica count
    seed: int = 0  # initial weights, shuffling, augmentation and the validation split

    def __post_init__(self):
        if self.loader not in LOADERS:
            raise ValueError(f"--loader must be one of {', '.join(LOADERS)}, got {self.loader!r}")
        if self.augment_with not in ("fused", "layers"):
            raise ValueError(f"--augment_with must be fused or layers, got {self.augment_with!r}")
        if self.on_bad_image not in ("skip", "fail"):
            raise ValueError(f"--on_bad_image must be skip or fail, got {self.on_bad_image!r}")
        if self.epochs < 1 or self.batch_size < 1 or (self.steps_per_epoch or 1) < 1:
            raise ValueError("--epochs, --batch_size and --steps_per_epoch must be at least 1")
        if self.image_size < 8:
            raise ValueError(f"--image_size must be at least 8, got {self.image_size}")
        if min(self.generator_workers, self.input_batches or 1, self.steps_per_execution) < 1:
            raise ValueError("--generator_workers, --input_batches and --steps_per_execution "
                             "must be at least 1")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup_steps must be at least 0, got {self.warmup_steps}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"--validation_fraction must be between 0 and 1, "
                             f"got {self.validation_fraction}")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if not self.cache:
            raise ValueError("--cache must be none, memory or a folder path")


# --- the classic loader: ImageDataGenerator.flow_from_directory ---------------------

class SequenceDataset(keras.utils.PyDataset):
    """Hands a Keras 2 Sequence (the ImageDataGenerator iterator) to Keras 3's fit.

    `workers` threads fill batches ahead of the model, as fit(workers=...) did in Keras 2.
    """

    def __init__(self, sequence, workers=1):
        super().__init__(workers=workers, use_multiprocessing=False)
        self.sequence = sequence

    def __len__(self):
        return len(self.sequence)

    def __getitem__(self, index):
        return self.sequence[index]

    def on_epoch_end(self):
        self.sequence.on_epoch_end()


def link_tree(scan, dest):
    """dest/<class>/... holding only the scan's good files (symlinks, copies where not allowed).

    flow_from_directory reads every file with an image extension in a folder,
    so it is pointed at this clean view instead of the original folder.
    """
    dest = pathlib.Path(dest)
    for name in scan.class_names:
        (dest / name).mkdir(parents=True, exist_ok=True)
    for i, (path, label) in enumerate(zip(scan.paths, scan.labels)):
        # Named by index alone: the file's own name could push the link past 255 bytes.
        target = dest / scan.class_names[label] / f"{i:07d}{os.path.splitext(path)[1].lower()}"
        try:
            os.symlink(os.path.abspath(path), target)
        except OSError:
            shutil.copyfile(path, target)
    return dest


def generator_flow(folder, class_names, image_size, batch_size, augment=False, shuffle=True,
                   seed=0, workers=1):
    """The classic recipe: ImageDataGenerator(rescale=1/255).flow_from_directory(...)."""
    datagen = ImageDataGenerator(rescale=1 / 255, **(GENERATOR_AUGMENTATION if augment else {}))
    iterator = datagen.flow_from_directory(
        str(folder), target_size=(image_size, image_size), classes=list(class_names),
        class_mode="sparse", batch_size=batch_size, shuffle=shuffle, seed=seed,
        interpolation="bilinear")  # tf.image.resize's default; the generator's own is "nearest"
    return SequenceDataset(iterator, workers)


# --- the successor: a tf.data pipeline ------------------------------------------------

class RandomAffine(keras.layers.Layer):
    """ImageDataGenerator's augmentation in one resampling pass: rotation, shifts, zoom, flip.

    The stock layers (augmentation_layers) resample the whole batch once each;
    this layer composes the same random rotation, shift, zoom and flip into one
    matrix per image, as ImageDataGenerator.apply_transform does, and resamples
    once: about 3x cheaper on a CPU. rotation is in degrees, shift and zoom are
    fractions (zoom 0.1: scale in [0.9, 1.1] per axis).
    """

    def __init__(self, rotation=20, shift=0.1, zoom=0.1, horizontal_flip=True, seed=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.rotation, self.shift, self.zoom = rotation, shift, zoom
        self.horizontal_flip, self.seed = horizontal_flip, seed

    def call(self, images, training=True):
        if not training:
            return images
        shape = tf.shape(images)
        n, h, w = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)

        def uniform(low, high, salt):
            seed = None if self.seed is None else self.seed + salt
            return tf.random.uniform([n], low, high, seed=seed)

        angle = uniform(-1.0, 1.0, 0) * self.rotation * np.pi / 180
        zx, zy = uniform(1 - self.zoom, 1 + self.zoom, 1), uniform(1 - self.zoom, 1 + self.zoom, 2)
        tx, ty = uniform(-self.shift, self.shift, 3) * w, uniform(-self.shift, self.shift, 4) * h
        flip = (tf.where(uniform(0.0, 1.0, 5) < 0.5, -1.0, 1.0) if self.horizontal_flip
                else tf.ones([n]))
        cx, cy = (w - 1) / 2, (h - 1) / 2
        # Output pixel (x, y) reads input (a0 x + a1 y + a2, b0 x + b1 y + b2).
        a0, a1 = zx * tf.cos(angle) * flip, -zx * tf.sin(angle)
        b0, b1 = zy * tf.sin(angle) * flip, zy * tf.cos(angle)
        a2, b2 = cx - a0 * cx - a1 * cy + tx, cy - b0 * cx - b1 * cy + ty
        zeros = tf.zeros([n])
        transform = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
        return keras.ops.image.affine_transform(images, transform, interpolation="bilinear",
                                                fill_mode="nearest")


def augmentation_layers(seed=0, fused=True):
    """GENERATOR_AUGMENTATION as Keras layers: RandomAffine, or the four stock layers."""
    if fused:
        return RandomAffine(seed=seed, name="augmentation")
    return keras.Sequential([
        keras.layers.RandomRotation(20 / 360, fill_mode="nearest", seed=seed),
        keras.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest", seed=seed + 1),
        keras.layers.RandomZoom(0.1, 0.1, fill_mode="nearest", seed=seed + 2),
        keras.layers.RandomFlip("horizontal", seed=seed + 3),
    ], name="augmentation")


def decode_and_resize(path, image_size, as_uint8=False):
    """[size, size, 3] from a JPEG/PNG/BMP file; gray, CMYK and RGBA become RGB.

    float32 in [0, 1], or uint8 (4x smaller) for a cache to hold.
    """
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image = tf.image.resize(image, (image_size, image_size))  # bilinear, float32 in [0, 255]
    if as_uint8:
        return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return image / 255


def cache_prefix(cache, scan, image_size, split):
    """A cache file prefix unique to the files (paths, sizes, mtimes) and geometry."""
    digest = hashlib.sha1(str(image_size).encode())
    for path, label in zip(scan.paths, scan.labels):
        stat = os.stat(path)
        digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    folder = pathlib.Path(cache)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / f"stream-{split}-{image_size}px-{digest.hexdigest()[:12]}"
    if not pathlib.Path(f"{prefix}.index").exists():  # an interrupted run's leftovers
        for stale in folder.glob(prefix.name + "*.lockfile"):
            stale.unlink(missing_ok=True)
    return str(prefix)


def tf_data_pipeline(scan, image_size, batch_size, training, cache="none", augment=False,
                     seed=0, split="train", augment_with="fused", steps=None, repeat=True,
                     full_batches=False):
    """(dataset, cached part or None): files -> decode/resize (parallel) -> [cache] -> batch.

    A pipeline repeats forever and is read with an explicit steps_per_epoch, so
    a cache is read back every epoch; fill_cache() before fit makes even the
    first epoch read from it. steps: batches per epoch; each epoch is then the
    first `steps` batches of a freshly shuffled pass, so epochs begin where
    passes do, also with a --steps_per_epoch cap (a resumed run's first epoch
    begins as the killed run's would have). repeat=False: one epoch of `steps`
    batches (default: one pass), a known length: validation data that fit
    reads to its end every epoch, with no validation_steps.
    full_batches, for a tf.distribute strategy: a pass's last, partial batch is
    dropped (every replica gets an equal share of every batch) and the decoded
    images keep their order (under multi_worker every worker must produce the
    same batches, of which DATA sharding hands each worker its share).
    """
    # Under multi_worker each worker keeps its share of every batch (DATA sharding). The
    # source is a list of file names read by map(), not a file-reading dataset (TFRecord,
    # text lines), so FILE sharding has no files to split (AUTO falls back to DATA, with a
    # warning). Every worker decodes the whole pass, which repeats input work, but every
    # worker then runs the same number of full steps, as the gradient all-reduce needs.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(scan.paths, tf.string), tf.constant(scan.labels, tf.int32))
    ).with_options(options)
    n = len(scan.paths)
    if training and cache == "none":
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)  # file names: cheap
    as_uint8 = cache != "none"  # a cache holds uint8; streaming goes straight to float
    ds = ds.map(lambda path, label: (decode_and_resize(path, image_size, as_uint8), label),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training or full_batches)
    # ignore_errors is a safety net only (every file was checked before); streaming puts it
    # after batch, where it keeps map and batch fused (and would drop a whole batch).
    cached = None
    if cache != "none":
        ds = cached = ds.ignore_errors().cache("" if cache == "memory" else
                               cache_prefix(cache, scan, image_size, split))
        if training:  # memory: shuffle it all (tensors are shared); file: a bounded buffer
            ds = ds.shuffle(n if cache == "memory" else min(n, 1024), seed=seed,
                            reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=full_batches)
    if cache == "none":
        ds = ds.ignore_errors()
    layers = (augmentation_layers(seed, fused=augment_with == "fused")
              if augment and training else None)

    def finish(images, labels):
        if as_uint8:
            images = tf.cast(images, tf.float32) / 255
        return (layers(images, training=True) if layers else images), labels

    if as_uint8 or layers:
        ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
    if steps is None and not repeat:
        steps = n // batch_size if full_batches else math.ceil(n / batch_size)
    if steps is not None:
        ds = ds.take(steps)
    ds = ds.repeat()
    if not repeat:  # (take after repeat: a batch ignore_errors drops is made up for)
        ds = ds.take(steps)
    return ds.prefetch(tf.data.AUTOTUNE), cached


def fill_cache(cached):
    """Reads the cached stage once to the end, which completes (finalizes) the cache.

    A cache is only kept once its input is read to the end; `fit` stops each
    epoch after `steps` batches, before that, so epoch 2 is only sometimes
    served from a cache filled inside fit. Returns images/s of this pass.
    """
    start, count = time.perf_counter(), 0
    for images, _ in cached.batch(64):
        count += int(images.shape[0])
    return count / max(time.perf_counter() - start, 1e-9)


# --- finding the images, and the bad ones, before training ----------------------------
# datasets/folder.py holds the same rule for the command line's arrays (a drop-in
# file imports nothing from there): a file either reads alike in both loaders, or is
# skipped and listed with its reason; no file may crash a loader or drop a batch.

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


def check_image(path, image_size=150):
    """None when both loaders read `path` alike, else why not (one printable line).

    Decodes the whole file (a truncated JPEG only fails at the end), at reduced
    scale for JPEGs (`draft`), which is several times cheaper than a full decode.
    Any exception is a reason to skip the file, never a crash.
    """
    try:
        problem = file_problem(path)
        if problem is None:
            with open(path, "rb") as f:
                problem = decode_problem(f.read(), image_size)
    except UnidentifiedImageError:
        problem = "not an image file Pillow can identify"
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        message = str(e).strip()
        problem = f"{type(e).__name__}: {message.splitlines()[0] if message else 'unreadable'}"
    return None if problem is None else printable(problem)


def decode_problem(data, image_size):
    """format_problem() of a file's bytes, then a full decode (which raises if it fails)."""
    if not data:
        return "empty file (0 bytes)"
    with Image.open(io.BytesIO(data)) as image:
        problem = format_problem(image, data)
        if problem is None:
            if image.format in ("JPEG", "MPO"):
                image.draft("RGB", (image_size, image_size))
            image.load()
    return problem


def class_names_of(root):
    """Visible sub-folders of root, sorted: the class names, as both stock loaders order them."""
    return sorted(p.name for p in pathlib.Path(root).iterdir()
                  if p.is_dir() and not p.name.startswith("."))


def scan_folder(root, image_size=150, class_names=None, threads=None):
    """Lists and checks every image file under root/<class>/ (sub-folders included)."""
    root = pathlib.Path(root)
    class_names = list(class_names) if class_names is not None else class_names_of(root)
    candidates, hidden = [], 0
    for label, name in enumerate(class_names):
        folder = root / name
        for dirpath, dirnames, filenames in os.walk(folder):
            hidden += sum(d.startswith(".") for d in dirnames)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                if filename.startswith("."):
                    hidden += 1
                elif filename.lower().endswith(EXTENSIONS):
                    candidates.append((os.path.join(dirpath, filename), label))
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


def find_images(train_dir, val_dir, config):
    """(train Scan, validation Scan, skipped, hidden); ValueError (one line) for unusable data."""
    train_dir = pathlib.Path(train_dir)
    if not train_dir.is_dir():
        raise ValueError(f"--data_dir: {printable(train_dir)} does not exist or is not a folder")
    class_names = class_names_of(train_dir)
    if len(class_names) < 2:
        raise ValueError(f"--data_dir: {printable(train_dir)} has {len(class_names)} class "
                         f"folder(s) ({printable(', '.join(class_names)) or 'none'}); "
                         "classification needs at least two (root/<class>/<images>)")
    train = scan_folder(train_dir, config.image_size, class_names)
    skipped, hidden = list(train.skipped), train.hidden
    if val_dir is not None:
        val = scan_folder(val_dir, config.image_size, class_names)
        skipped += val.skipped
        hidden += val.hidden
    if skipped and config.on_bad_image == "fail":
        path, reason = skipped[0]
        raise ValueError(f"unreadable image {path} ({reason}); fix or remove it, or use "
                         f"--on_bad_image=skip ({len(skipped)} bad file(s) in all)")
    counts = np.bincount(np.asarray(train.labels, dtype=np.int64), minlength=len(class_names))
    empty = [name for name, count in zip(class_names, counts) if count == 0]
    if empty:
        raise ValueError(f"--data_dir: class folder {printable(train_dir / empty[0])} has no "
                         f"readable images ({', '.join(EXTENSIONS)}); add images or remove "
                         "the folder")
    if val_dir is None:
        train, val = split_scan(train, config.validation_fraction, config.seed)
    if not val.paths:
        raise ValueError(f"--data_dir: validation folder {printable(val_dir)} has no "
                         "readable images")
    return train, val, skipped, hidden


def tree_state(folder):
    """(path, size, mtime) of everything under folder: changes when any file does."""
    state = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in [""] + sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                stat = os.stat(path)
                state.append((path, stat.st_size, stat.st_mtime_ns))
            except OSError:  # a broken symbolic link
                state.append((path, None, None))
    return tuple(state)


_remembered = {}  # check()'s last result, under its folders, settings and folder state


def spreads_training(strategy):
    """Whether run() is handed a strategy to train under: any but None and TensorFlow's
    default, one-device strategy (what --strategy=default passes), which changes nothing."""
    return strategy is not None and (tf.distribute.has_strategy()
                                     or strategy is not tf.distribute.get_strategy())


def step_sizes(n_train, n_val, config, strategy=None):
    """(training batch, validation batch, steps per epoch); batches of all replicas together.

    One device: config.batch_size, and a pass's last batch holds the remainder.
    Under a strategy: config.batch_size per replica, full batches only (so every
    replica gets an equal share and every worker as many steps); the validation
    batch shrinks to fit the validation images. ValueError (one line) when the
    images cannot fill one such batch.
    """
    batch = config.batch_size * replica_count(strategy)
    if not spreads_training(strategy):
        steps = math.ceil(n_train / batch)
        return batch, batch, min(steps, config.steps_per_epoch or steps)
    replicas = replica_count(strategy)
    if n_train < batch or n_val < replicas:
        raise ValueError(f"--batch_size={config.batch_size} x {replicas} replica(s) needs at "
                         f"least {batch} training and {replicas} validation images, found "
                         f"{n_train} and {n_val}: lower --batch_size or add images")
    steps = n_train // batch
    return batch, min(batch, n_val // replicas * replicas), min(steps, config.steps_per_epoch
                                                                 or steps)


def check(config, data, model=None, strategy=None):
    """What run() needs checked before any training: find_images() on data, remembered.

    data is (train_dir, val_dir or None). Raises ValueError (one line) for unusable
    data: a missing folder, fewer than two classes, an empty class, a bad file with
    --on_bad_image=fail; a model of yours that cannot take the images or classify
    their classes; a `strategy` (see run()) with the generator loader, which cannot
    be distributed, or with more images a step than the folder has. The command
    line calls it before it makes the run folder, and run() calls it again: while
    the folders, every file in them and the settings that matter are unchanged,
    the second call returns the first one's result instead of reading every file
    again. Returns (train Scan, validation Scan, skipped, hidden), shared between
    such calls: do not change them.
    """
    if spreads_training(strategy) and (config.compare or config.loader == "generator"):
        raise ValueError(f"--strategy ({type(strategy).__name__}) trains the tf.data loader "
                         "only; ImageDataGenerator cannot be distributed: drop --compare and "
                         "use --loader=tf_data")
    train_dir, val_dir = (None if d is None else os.fspath(d) for d in data)
    key = (train_dir, val_dir, config.image_size, config.on_bad_image,
           config.validation_fraction, config.seed,
           [tree_state(d) if d is not None and os.path.isdir(d) else None
            for d in (train_dir, val_dir)])
    if _remembered.get("key") != key:
        _remembered.clear()  # a failed check leaves nothing behind
        result = find_images(train_dir, val_dir, config)
        _remembered.update(key=key, result=result)
    if isinstance(model, keras.Model):  # yours: it must take RGB images and classify these
        classifier_loss(model, len(_remembered["result"][0].class_names))
        shape = tuple(model.inputs[0].shape[1:])
        if shape[-1] != 3 or any(d not in (None, config.image_size) for d in shape[:2]):
            raise ValueError(f"the model takes inputs shaped {shape}; this recipe feeds it "
                             f"{config.image_size}x{config.image_size} RGB images "
                             "(--image_size sets the size)")
    train, val = _remembered["result"][:2]
    step_sizes(len(train.paths), len(val.paths), config, strategy)  # enough images a step
    return _remembered["result"]


def describe_skipped(skipped, hidden, limit=5):
    """What was left out, for the user: one line per shown file."""
    lines = []
    if skipped:
        lines.append(f"skipped {len(skipped)} unreadable image file(s):")
        lines += [f"  {path}: {reason}" for path, reason in skipped[:limit]]
        if len(skipped) > limit:
            lines.append(f"  ... and {len(skipped) - limit} more (all in metrics.json)")
    if hidden:
        lines.append(f"ignored {hidden} hidden file(s)/folder(s) (names starting with '.')")
    return "\n".join(lines)


# --- measuring ------------------------------------------------------------------------

class PeakRSS:
    """Highest resident memory of this process while inside `with`, sampled every 20 ms."""

    def __enter__(self):
        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def mb(self):
        return self.peak / 2**20


def input_rate(batch_seconds, batch_images, warmup):
    """images/s over the batches after the kit's warm-up: all images over all their time,
    not a median, because a loader's stalls are what this measures."""
    seconds, images = steady(batch_seconds, warmup), steady(batch_images, warmup)
    return sum(images) / max(sum(seconds), 1e-9)


def time_generator(dataset, batches, workers, warmup):
    """images/s of reading `batches` batches from a SequenceDataset, `workers` threads."""
    seconds, images = [], []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        start = time.perf_counter()
        for batch in pool.map(dataset.__getitem__, [i % len(dataset) for i in range(batches)]):
            now = time.perf_counter()
            seconds.append(now - start)
            images.append(len(batch[0]))
            start = now
    dataset.on_epoch_end()
    return input_rate(seconds, images, warmup)


def time_dataset(dataset, batches, warmup):
    """images/s of iterating `batches` batches of a tf.data pipeline, no model."""
    seconds, images = [], []
    iterator = iter(dataset)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        now = time.perf_counter()
        seconds.append(now - start)
        images.append(int(batch[0].shape[0]))
        start = now
    return input_rate(seconds, images, warmup)


class CallSizes(keras.callbacks.Callback):
    """Steps and images of each training call, per epoch, beside the kit's StepTimer.

    With steps_per_execution > 1 one call runs several steps, and an epoch's last
    batch holds the remainder, so neither is a constant.
    """

    def __init__(self, batch_size, n_images, steps):
        super().__init__()
        self.epochs, self._sizes = [], [
            min(batch_size, n_images - (i % math.ceil(n_images / batch_size)) * batch_size)
            for i in range(steps)]

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append([])

    def on_train_batch_begin(self, batch, logs=None):
        self._begin = batch

    def on_train_batch_end(self, batch, logs=None):
        self.epochs[-1].append((batch + 1 - self._begin, sum(self._sizes[self._begin:batch + 1])))


def build_model(image_size, num_classes):
    """A deliberately small CNN (a strided stem, three Conv/MaxPool blocks, softmax).

    Cheap enough that on a CPU the input pipeline, not the model, sets the pace.
    The head flattens the last feature map rather than averaging it away: where
    in the image a feature fires is what tells a star from a cross, and with
    global average pooling this model stayed at 0.6 after 10 epochs on the
    default shapes, where Flatten reaches about 0.9 in 5.
    """
    return keras.Sequential([
        keras.Input(shape=(image_size, image_size, 3)),
        keras.layers.Conv2D(8, 5, strides=4, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(num_classes, activation="softmax"),
    ])


# --- the run ---------------------------------------------------------------------------

def make_loader(name, train, val, config, view_root, strategy=None):
    """(train data, validation data, cached stages) for loader `name`, batched for the
    strategy's replicas (step_sizes); the validation data is one finite pass."""
    batch, val_batch, steps = step_sizes(len(train.paths), len(val.paths), config, strategy)
    if name == "generator":
        folders = [link_tree(s, pathlib.Path(view_root) / split)
                   for s, split in ((train, "train"), (val, "validation"))]
        return (generator_flow(folders[0], train.class_names, config.image_size,
                               config.batch_size, config.augment, True, config.seed,
                               config.generator_workers),
                generator_flow(folders[1], train.class_names, config.image_size,
                               config.batch_size, False, False, config.seed), [])
    full = spreads_training(strategy)
    train_ds, train_cached = tf_data_pipeline(train, config.image_size, batch, True,
                                              config.cache, config.augment, config.seed, "train",
                                              config.augment_with, steps=steps, full_batches=full)
    val_ds, val_cached = tf_data_pipeline(val, config.image_size, val_batch, False,
                                          config.cache, False, config.seed, "validation",
                                          repeat=False, full_batches=full)
    return train_ds, val_ds, [c for c in (train_cached, val_cached) if c is not None]


def measure_input(name, loader, config, steps):
    """{input_images_per_sec, [cache_fill_images_per_sec]} for one loader, no training."""
    train_data, _, cached = loader
    batches = config.input_batches or steps
    out = {}
    if cached:
        out["cache_fill_images_per_sec"] = fill_cache(cached[0])
        for stage in cached[1:]:
            fill_cache(stage)
    if name == "generator":
        out["input_images_per_sec"] = time_generator(train_data, batches,
                                                     config.generator_workers, config.warmup_steps)
    else:
        out["input_images_per_sec"] = time_dataset(train_data, batches, config.warmup_steps)
    return out


def input_measurements(name, loader, config, steps, saved):
    """measure_input() and the peak RSS while it ran; or, for a loader whose training a
    killed run had begun (`saved`, its checkpoint's), what was measured then (the cache
    is filled again, untimed: training reads it)."""
    if "input" in saved["state"]:
        for stage in loader[2]:
            fill_cache(stage)
        return dict(saved["state"]["input"])
    with PeakRSS() as rss:
        out = measure_input(name, loader, config, steps)
    return {**out, "peak_rss_mb": rss.mb}


def fit_loader(name, loader, make_model, config, steps, n_train, run_dir, strategy=None,
               fit=keras.Model.fit, measured=None):
    """Trains a fresh copy of the model from make_model() on one loader; returns its
    measurements, `measured` (its input's) included.

    After each epoch a checkpoint goes to run_dir/checkpoints/<name>, with the
    step timings, the input measurements and the time so far; one left by a
    killed run is continued from its last finished epoch, those kept.
    """
    train_data, val_data, _ = loader
    replicas = replica_count(strategy)
    batch = config.batch_size * replicas
    learning_rate = config.learning_rate * (replicas if config.scale_lr_with_replicas else 1)
    print(f"\n== training with --loader={name}: batch {config.batch_size} x {replicas} "
          f"replica(s), learning rate {learning_rate:.2e} ==")
    checkpoint_dir = os.path.join(run_dir, "checkpoints", name)
    checkpoint, saved = latest_checkpoint(checkpoint_dir)
    state = saved["state"]
    timer, sizes = StepTimer(), CallSizes(batch, n_train, steps)
    timer.seconds = list(state.get("step_seconds", []))  # the killed run's calls count
    sizes.epochs = [[tuple(call) for call in epoch] for epoch in state.get("call_sizes", [])]
    earlier_s, earlier_mb = state.get("train_wall_time_s", 0.0), state.get("train_peak_rss_mb", 0)
    measured = dict(measured or {})
    with distribution_scope(strategy), PeakRSS() as rss:
        model, loss, metrics = make_model()
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss,
                      metrics=metrics, steps_per_execution=config.steps_per_execution)
        if checkpoint:
            print(f"Resuming --loader={name} after epoch {saved['epochs_done']} from "
                  f"{checkpoint}")
            restore(model, checkpoint)
        start = time.perf_counter()

        def so_far():  # what a resumed run needs to go on measuring
            return {"input": measured, "step_seconds": timer.seconds, "call_sizes": sizes.epochs,
                    "train_wall_time_s": earlier_s + time.perf_counter() - start,
                    "train_peak_rss_mb": max(earlier_mb, rss.mb)}

        history = fit(model, train_data, validation_data=val_data, epochs=config.epochs,
                      initial_epoch=saved["epochs_done"], steps_per_epoch=steps,
                      shuffle=False, verbose=2,  # both loaders shuffle themselves
                      callbacks=[timer, sizes, keras.callbacks.TerminateOnNaN(),
                                 keras.callbacks.TensorBoard(log_dir=os.path.join(run_dir, name)),
                                 EpochCheckpoint(checkpoint_dir, so_far)])
        wall = earlier_s + time.perf_counter() - start
    logs = final_logs(history, saved)
    if not np.isfinite(logs["loss"]):
        raise FloatingPointError(f"training loss became {logs['loss']} with --loader={name}; "
                                 "lower --learning_rate")
    calls = [call for epoch in sizes.epochs for call in epoch]
    per_step = [seconds / n_steps for seconds, (n_steps, _) in zip(timer.seconds, calls)]
    rates = throughput(per_step, batch, config.warmup_steps)
    out = {**measured, "train_images_per_sec": rates["examples_per_sec"],
           "step_time_ms_p50": rates["step_time_ms_p50"],
           "step_time_ms_p90": rates["step_time_ms_p90"],
           "val_accuracy": float(logs["val_accuracy"]), "val_loss": float(logs["val_loss"]),
           "train_wall_time_s": wall,
           "peak_rss_mb": max(measured.get("peak_rss_mb", 0), earlier_mb, rss.mb)}
    first = 0
    for i, epoch in enumerate(sizes.epochs, 1):  # whole epochs, stalls included
        seconds = timer.seconds[first:first + len(epoch)]
        first += len(epoch)
        out[f"epoch{i}_images_per_sec"] = sum(n for _, n in epoch) / max(sum(seconds), 1e-9)
    return out


def log_tensorboard(run_dir, results, table):
    """HParams: a trial per loader (its headline numbers as `stream/<metric>`); the table
    as the Text summary; a Custom Scalars chart of images/s per epoch, a line per loader."""
    keys = ("train_images_per_sec", "input_images_per_sec", "step_time_ms_p50", "val_accuracy",
            "peak_rss_mb")
    log_hparams_trials(os.path.join(run_dir, "hparams"), "stream", {
        name: ({"loader": name}, {key: r[key] for key in keys if key in r})
        for name, r in results.items()})
    for name, r in results.items():
        epochs = sorted(int(k[len("epoch"):-len("_images_per_sec")]) for k in r
                        if k.startswith("epoch") and k.endswith("_images_per_sec"))
        log_per_epoch(os.path.join(run_dir, name), "stream/epoch_images_per_sec",
                      [r[f"epoch{i}_images_per_sec"] for i in epochs])
    log_text_summary(run_dir, table)
    log_custom_scalars(run_dir, "stream", {
        "training images/s per epoch, a line per loader": [r"^stream/epoch_images_per_sec$"]})


def format_table(results):
    keys = ("input_images_per_sec", "train_images_per_sec", "step_time_ms_p50", "peak_rss_mb",
            "val_accuracy")
    lines = [f"{'loader':<10}" + "".join(f"{k:>22}" for k in keys)]
    for name, r in results.items():
        lines.append(f"{name:<10}" + "".join(f"{r[k]:>22.4g}" for k in keys))
    return "\n".join(lines)


def takes_0_255(model):
    """Whether the model's first layer (after its input) rescales or normalizes pixels
    itself, so it wants them in 0-255 rather than the loaders' [0, 1]."""
    first = next((layer for layer in model.layers
                  if not isinstance(layer, keras.layers.InputLayer)), None)
    return isinstance(first, (keras.layers.Rescaling, keras.layers.Normalization))


def model_for_loaders(model, config, num_classes):
    """make() -> (model, loss, metrics): fresh copies from the same weights, taking the
    loaders' [0, 1] images. model: None (this recipe's CNN), a keras.Model (copied,
    never changed) or fn(input_shape, num_classes)."""
    shape = (config.image_size, config.image_size, 3)
    if model is None:
        reference, why = build_model(config.image_size, num_classes), None
    else:
        reference = model if isinstance(model, keras.Model) else model(shape, num_classes)
        why = classifier_loss(reference, num_classes)[2]
        print(f"your model: {reference.count_params():,} weights; loss: {why}; images reach it "
              + ("in 0-255 (it begins by rescaling them)" if takes_0_255(reference)
                 else "in [0, 1]"))

    def make():
        copy = fresh_model(reference, shape, num_classes)
        if why is None:
            return copy, "sparse_categorical_crossentropy", ["accuracy"]
        if takes_0_255(reference):  # the loaders give [0, 1]: scale back up in front of it
            copy = keras.Sequential([keras.Input(shape), keras.layers.Rescaling(255.0), copy])
        loss, metrics, _ = classifier_loss(reference, num_classes)
        return copy, loss, metrics
    return make, reference


def run(config, run_dir, data, strategy=None, fit=None, model=None):
    """Checks the folder, measures each loader's input and training; returns flat metrics.

    strategy: a tf.distribute strategy (MirroredStrategy, MultiWorkerMirroredStrategy)
    or None for one device; it trains the tf.data loader only, --batch_size is then
    per replica and the learning rate scales with the replica count. fit: called
    like keras.Model.fit(model, dataset, ...) (the default); the CLI passes a
    strategy.run loop for multi_worker, where Keras' fit fails. A loader that
    finished in `run_dir` (a resumed run) is read back, one with a checkpoint
    continues from its last finished epoch. model: None for this recipe's small
    CNN, your keras.Model (each loader trains a copy from its weights; yours is
    never changed) or fn(input_shape, num_classes).
    """
    start = time.perf_counter()
    train, val, skipped, hidden = check(config, data, model, strategy)
    fit = fit or keras.Model.fit
    report = describe_skipped(skipped, hidden)
    if report:
        print(report)
    names = LOADERS if config.compare else (config.loader,)
    replicas = replica_count(strategy)
    _, _, steps = step_sizes(len(train.paths), len(val.paths), config, strategy)
    print(f"{len(train.paths)} training and {len(val.paths)} validation images in "
          f"{len(train.class_names)} classes; loaders: {', '.join(names)}; {steps} steps/epoch "
          f"of {config.batch_size} x {replicas} replica(s)")
    keras.utils.set_random_seed(config.seed)
    with distribution_scope(strategy):
        make_model, reference = model_for_loaders(model, config, len(train.class_names))
    results, todo = {}, []
    for name in names:
        result_file = os.path.join(run_dir, name, "result.json")
        if os.path.exists(result_file):
            with open(result_file) as f:
                results[name] = json.load(f)
            print(f"\n== --loader={name}: finished in an earlier run, kept ==")
        else:
            todo.append(name)
    view_root = tempfile.mkdtemp(prefix="stream-view-")
    try:
        loaders = {name: make_loader(name, train, val, config, view_root, strategy)
                   for name in todo}
        measured = {}
        for name in todo:  # alternate: every loader's input pass, then every loader's training
            saved = latest_checkpoint(os.path.join(run_dir, "checkpoints", name))[1]
            measured[name] = input_measurements(name, loaders[name], config, steps, saved)
        for name in todo:
            results[name] = fit_loader(name, loaders[name], make_model, config, steps,
                                       len(train.paths), run_dir, strategy, fit, measured[name])
            os.makedirs(os.path.join(run_dir, name), exist_ok=True)
            write_atomically(os.path.join(run_dir, name, "result.json"),
                             lambda partial: save_json(partial, results[name]))
    finally:
        shutil.rmtree(view_root, ignore_errors=True)
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)  # all trained
    results = {name: results[name] for name in names}
    table = format_table(results)
    metrics = {f"{name}_{key}": value for name, r in results.items() for key, value in r.items()}
    if config.compare:
        metrics["speedup"] = (results["tf_data"]["train_images_per_sec"]
                              / results["generator"]["train_images_per_sec"])
        metrics["input_speedup"] = (results["tf_data"]["input_images_per_sec"]
                                    / results["generator"]["input_images_per_sec"])
        table += (f"\ntf.data/generator training images/s: {metrics['speedup']:.2f}x, "
                  f"input alone: {metrics['input_speedup']:.2f}x")
    print("\n" + table)
    log_tensorboard(run_dir, results, table)
    metrics.update(
        train_images=len(train.paths), val_images=len(val.paths),
        num_classes=len(train.class_names), skipped_files=len(skipped),
        skipped_file_paths=[f"{path}: {reason}" for path, reason in skipped[:20]],
        hidden_files=hidden, replicas=replicas, model_params=reference.count_params(),
        wall_time_s=time.perf_counter() - start)
    return metrics


def save_json(path, payload):
    with open(path, "w") as f:
        json.dump(payload, f)


# --- model kit: the same text in every recipe that trains the user's model -------------
# (run(model=...) takes a keras.Model, never changed, or fn(input_shape, num_classes);
# tests/test_kit.py fails if a copy differs)

def fresh_model(model, input_shape, num_classes):
    """A model to train: a clone of a keras.Model with its weights (the user's own object
    is never trained), or what the builder fn(input_shape, num_classes) returns."""
    if isinstance(model, keras.Model):
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        return clone
    return model(input_shape, num_classes)


def output_activation(model):
    """The activation of the layer that makes the model's output: softmax, sigmoid, linear..."""
    layer = model.layers[-1]
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    return getattr(getattr(layer, "activation", None), "__name__", "linear")


def classifier_loss(model, num_classes):
    """(loss, metrics, why): the model's compiled loss and metrics (accuracy first), else
    the loss its output implies. ValueError (one line) for an output that is not a
    classifier of num_classes."""
    if len(model.outputs) != 1:
        raise ValueError(f"the model has {len(model.outputs)} outputs; these recipes train "
                         "one classifier output")
    units, activation = int(model.outputs[0].shape[-1]), output_activation(model)
    if units == 1 and activation != "sigmoid":
        raise ValueError("the model ends in one linear unit, a regression output; these "
                         "recipes train classifiers: end it with Dense(classes) or a sigmoid unit")
    if units != num_classes and not (units == 1 and num_classes == 2):
        raise ValueError(f"the model has {units} output units but the data has {num_classes} "
                         "classes: they must match")
    if units > 1 and activation == "sigmoid":
        raise ValueError(f"the model ends in {units} sigmoid units (multi-label); these recipes "
                         "train one class per example: end it with softmax or logits")
    config = model.get_compile_config() or {}
    metrics = ["accuracy"] + [keras.metrics.get(m) if isinstance(m, str) else
                              keras.metrics.deserialize(m)
                              for m in config.get("metrics") or [] if m != "accuracy"]
    if getattr(model, "loss", None) is not None:
        return model.loss, metrics, "its own compiled loss"
    if units == 1:
        return keras.losses.BinaryCrossentropy(), metrics, "binary cross-entropy (a sigmoid unit)"
    if activation == "softmax":
        return (keras.losses.SparseCategoricalCrossentropy(), metrics,
                "sparse categorical cross-entropy on its softmax output")
    return (keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics,
            "sparse categorical cross-entropy from logits (its output has no softmax)")

# --- end of model kit ------------------------------------------------------------------


# --- scale-out kit: the same text in every recipe that takes --strategy and --resume -----
# (strategy: a tf.distribute strategy, a keras.distribution.Distribution on JAX, or None
# for one device. Under multi_worker every worker saves, since TensorFlow's saving runs
# collective ops that all workers must join: give each its own run_dir (main.py gives
# the others a temporary one). tests/test_kit.py fails if a copy differs)

def replica_count(strategy):
    """How many replicas split each step (batch sizes are per replica)."""
    if strategy is None:
        return 1
    if hasattr(strategy, "num_replicas_in_sync"):  # tf.distribute
        return strategy.num_replicas_in_sync
    return int(np.prod(strategy.device_mesh.shape))  # keras.distribution.DataParallel


def distribution_scope(strategy):
    """Where models are built, compiled and fit: the strategy's scope, if any."""
    return contextlib.nullcontext() if strategy is None else strategy.scope()


class EpochCheckpoint(keras.callbacks.Callback):
    """After each epoch: the model with its optimizer, and the recipe's own state, atomically.

    epoch_NNNN.json (the epoch's logs and state()) is written first, then the
    model goes to a temporary name renamed epoch_NNNN.keras, so a kill at any
    moment leaves the previous pair whole; latest_checkpoint trusts only a
    .keras that has its .json. (Keras' BackupAndRestore writes in place.) Put
    it after the TensorBoard callback: the epoch's point is flushed to disk
    before the checkpoint that makes a resumed run skip that epoch.
    """

    def __init__(self, folder, state=None):
        super().__init__()
        self.folder, self.state = folder, state or dict

    def on_epoch_end(self, epoch, logs=None):
        os.makedirs(self.folder, exist_ok=True)
        stem = os.path.join(self.folder, f"epoch_{epoch + 1:04d}")
        payload = {"epochs_done": epoch + 1, "state": self.state(),
                   "logs": {k: float(v) for k, v in (logs or {}).items()}}

        def dump(partial):
            with open(partial, "w") as f:
                json.dump(payload, f)
        write_atomically(stem + ".json", dump)
        write_atomically(stem + ".keras", self.model.save)
        for older in sorted(glob.glob(os.path.join(self.folder, "epoch_*.keras")))[:-1]:
            os.remove(older)
            os.remove(older[:-len(".keras")] + ".json")


def latest_checkpoint(folder):
    """(path, {"epochs_done", "state", "logs"}) of the newest whole checkpoint in folder,
    or (None, {"epochs_done": 0, "state": {}, "logs": {}})."""
    for path in sorted(glob.glob(os.path.join(folder, "epoch_*.keras")), reverse=True):
        try:
            with open(path[:-len(".keras")] + ".json") as f:
                return path, json.load(f)
        except (OSError, ValueError):
            continue
    return None, {"epochs_done": 0, "state": {}, "logs": {}}


def restore(model, checkpoint):
    """Loads a checkpoint's weights and optimizer state (its step count, so schedules go
    on where they were) into the same model, built and compiled afresh (under the
    strategy's scope): no custom objects to register, the run's own code rebuilds it."""
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(checkpoint)


def final_logs(history, saved):
    """The last epoch's logs: from this fit's history, or, when the killed run had finished
    every epoch already (so fit ran none), from its checkpoint."""
    return {k: v[-1] for k, v in history.history.items() if v} or saved["logs"]

# --- end of scale-out kit ----------------------------------------------------------------


# --- TensorBoard kit: the same text in every recipe that compares settings ------------
# (HParams trials, the Text summary, Custom Scalars, written with tensorboard's own
# protos: no TensorFlow needed, so a JAX run never imports it; without the tensorboard
# package they write nothing. tests/test_kit.py fails if a copy differs)

def write_events(log_dir, summaries):
    """[(step, tensorboard Summary proto), ...] as one new event file in log_dir."""
    try:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:
        return
    os.makedirs(log_dir, exist_ok=True)
    name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
            f"{os.getpid()}.{time.monotonic_ns()}")
    with open(os.path.join(log_dir, name), "wb") as f:
        writer = RecordWriter(f)
        writer.write(event_pb2.Event(wall_time=time.time(),
                                     file_version="brain.Event:2").SerializeToString())
        for step, summary in summaries:
            writer.write(event_pb2.Event(wall_time=time.time(), step=step,
                                         summary=summary).SerializeToString())


def scalar_pb(tag, value):
    from tensorboard.compat.proto import summary_pb2
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag,
                                                                simple_value=float(value))])


def log_text_summary(log_dir, table):
    """The table the run printed, in TensorBoard's Text tab under the tag `summary`
    (a fenced block: markdown that keeps the columns lined up)."""
    try:
        from tensorboard.plugins.text.summary_v2 import text_pb
    except ImportError:
        return
    write_events(log_dir, [(0, text_pb("summary", "```\n" + table.strip("\n") + "\n```"))])


def log_hparams_trials(log_dir, recipe, trials):
    """One HParams trial per compared setting: trials = {name: (hparams, metrics)}, each
    written to log_dir/<name>.

    TensorBoard's HParams tab builds one table from every trial under its
    logdir, so no experiment config is written (the tab would then show that
    one recipe's columns alone). Each trial carries a `recipe` hparam instead,
    its metrics are named `<recipe>/<metric>`, and its trial id names its run
    folder: trials of several recipes and days share the table without sharing
    a row or a metric column.
    """
    try:
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb
    except ImportError:
        return
    run = os.path.basename(os.path.dirname(os.path.abspath(log_dir)))
    for name, (hparams, metrics) in trials.items():
        write_events(os.path.join(log_dir, name), [
            (0, hparams_pb({"recipe": recipe, **hparams}, trial_id=f"{recipe} {name} ({run})")),
            *[(0, scalar_pb(f"{recipe}/{key}", value)) for key, value in metrics.items()]])


def log_custom_scalars(log_dir, recipe, charts):
    """Custom Scalars charts: {title: [tag regex, ...]}, each one chart with a line per
    run and matching tag, in a category named after the recipe (TensorBoard merges the
    layouts of all runs by category, so repeated runs add lines, not charts)."""
    try:
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, types_pb2
        from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    except ImportError:
        return
    layout = layout_pb2.Layout(category=[layout_pb2.Category(title=recipe, chart=[
        layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=tags))
        for title, tags in charts.items()])])
    # What custom_scalar.summary.pb() makes, which would import TensorFlow for it.
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING,
                                    string_val=[layout.SerializeToString()])
    write_events(log_dir, [(0, summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=metadata.CONFIG_SUMMARY_TAG, metadata=metadata.create_summary_metadata(),
        tensor=tensor)]))])


def log_per_epoch(log_dir, tag, values):
    """One point per epoch (steps 0, 1, ...) of `tag`, for a Custom Scalars chart; written
    once, when the run ends, so a resumed run's earlier epochs count once."""
    write_events(log_dir, [(epoch, scalar_pb(tag, value)) for epoch, value in enumerate(values)])

# --- end of TensorBoard kit ----------------------------------------------------------


# --- measuring kit: the same text in every recipe that times steps or writes files ----
# (drop-in files cannot import a shared module; tests/test_kit.py fails if a copy differs)

class StepTimer(keras.callbacks.Callback):
    """Seconds per call of fit's train function (steps_per_execution steps, data included).

    The loss is read back before the clock stops: an asynchronous backend (JAX, a
    GPU) hands control back before the step has run, and would be timed too short.
    """

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        keras.ops.convert_to_numpy((logs or {}).get("loss", 0.0))  # waits for the device
        self.seconds.append(time.perf_counter() - self._start)


def steady(seconds, warmup):
    """The timings after the first `warmup`, which trace and compile. When no more than
    `warmup` were taken, all but the first; a single timing is kept."""
    seconds = list(seconds)
    return seconds[warmup:] if len(seconds) > warmup else seconds[min(1, len(seconds) - 1):]


def throughput(step_seconds, examples_per_step, warmup):
    """examples/s = examples per step / median steady step time; p50 and p90 step times.

    The median, not a mean: a few stalled steps (a checkpoint, another process)
    do not move it, and the p90 beside it shows them.
    """
    p50, p90 = np.percentile(steady(step_seconds, warmup), [50, 90])
    return {"examples_per_sec": examples_per_step / float(p50),
            "step_time_ms_p50": 1000 * float(p50), "step_time_ms_p90": 1000 * float(p90)}


def write_atomically(path, write):
    """Calls write(temporary path) in `path`'s folder, then renames it to `path`.

    A crash or kill never leaves a half-written file under the final name. The
    temporary name keeps the extension, from which Keras and h5py pick the format.
    """
    folder, name = os.path.split(os.fspath(path))
    stem, ext = os.path.splitext(name)
    # Not created beforehand (as mkstemp would, private), so the file gets the usual mode.
    partial = os.path.join(folder, f".{stem}.partial-{os.getpid()}-{time.monotonic_ns()}{ext}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path

# --- end of measuring kit ---------------------------------------------------------------
