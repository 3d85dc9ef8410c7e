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
recipes applies the same rule (both scan with experiments/image_folder.py).
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
Copy:   the technique is recipes/stream.py (tf_data_pipeline, RandomAffine,
        fill_cache, generator_flow), a file that stands alone; this experiment
        around it is called from this repository:
        experiments.stream.run(Config(), run_dir, (train_dir, val_dir_or_None),
                               model=your_model)
        (model= is optional: a keras.Model taking image_size x image_size RGB,
        copied, or a builder fn(input_shape, num_classes)); add
        strategy=tf.distribute.MirroredStrategy() for several GPUs (the tf.data
        loader only: ImageDataGenerator cannot be distributed; --batch_size is
        then per replica, the learning rate scales with the replica count) and,
        for MultiWorkerMirroredStrategy, fit= a loop called like
        keras.Model.fit(model, ...) (Keras 3's own fails there; the CLI passes
        one). Each worker reads and decodes every file and keeps its share of
        each batch (DATA sharding), and all run the same steps. Running it again
        on the same folder continues a stopped run: a finished loader is read
        back, an unfinished one goes on at the step of its last checkpoint.

Where ImageDataGenerator comes from: Keras 3 dropped it from
`keras.preprocessing.image`; `tensorflow.keras.preprocessing.image` resolves to
Keras 3's private legacy copy until some import (tensorflow_model_optimization
does) switches TensorFlow's keras alias to Keras 2. The recipe imports it from
`tf_keras` (the Keras 2 package the TensorFlow team maintains alongside Keras 3)
inside generator_flow: the same class whatever else the process imported. Its
iterator is a Keras 2 Sequence, so a five-line `keras.utils.PyDataset` adapter
hands it to Keras 3's `fit`; `workers` is set on that adapter (`fit(workers=...)`
and `flow_from_directory(workers=...)` raise TypeError in Keras 3). Its
augmentation needs scipy.
"""
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shutil
import tempfile
import threading
import time
import typing

import keras
import numpy as np
import psutil
import tensorflow as tf

from experiments.files import save_json
from experiments.image_folder import (EXTENSIONS, class_names_of, printable, scan_folder,
                                      split_scan)
from experiments.scale_out import (EpochCheckpoint, distribution_scope, final_logs, fit_from,
                                   latest_checkpoint, position, replica_count, restore)
from experiments.tensorboard import (log_custom_scalars, log_hparams_trials, log_per_epoch,
                                     log_text_summary)
from experiments.pixels import PIXEL_RANGES, pixel_range
from experiments.user_model import classifier_loss, fresh_model, users_settings
from recipes import stream
from recipes.step_timer import StepTimer, steady, throughput


# What main.py feeds this recipe: a class-folder tree of 150x150 RGB JPEGs.
DATA = {"form": "directory", "image_size": 150, "channels": 3, "examples": (1000, 200)}
FOLDER_CHANNELS = (1, 3)  # --model's channels it feeds: gray models get rgb_to_gray in front
HEADLINE = ("generator_input_images_per_sec", "tf_data_input_images_per_sec",
            "generator_train_images_per_sec", "tf_data_train_images_per_sec", "speedup",
            "generator_val_accuracy", "tf_data_val_accuracy", "skipped_files", "wall_time_s")

LOADERS = ("generator", "tf_data")
RESUMABLE = True  # checkpoints (epoch ends, every N steps, on SIGTERM): --resume continues
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
    checkpoint_every_steps: int = 0  # also checkpoint every N steps within an epoch (0: auto)
    validation_fraction: float = 0.2  # held out when the folder has no validation/ sub-tree
    learning_rate: float = 1e-3  # Adam learning rate
    scale_lr_with_replicas: bool = True  # multiply the learning rate by the replica count
    seed: int = 0  # initial weights, shuffling, augmentation and the validation split
    pixel_range: str = "auto"  # auto, 0_255, 0_1 or -1_1: the range images reach your model in

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


# --- the two loaders, over a checked Scan -------------------------------------------

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


def tf_data_loader(scan, config, batch_size, training, split, steps=None, full_batches=False):
    """(dataset, cached stage or None): the drop-in's pipeline over a Scan, as fit reads it
    here, with the settings that are this experiment's, not the technique's.

    training: the pipeline repeats forever and is read with an explicit
    steps_per_epoch, so a cache is read back every epoch (fill_cache() before fit
    makes even the first epoch read from it); each epoch is the first `steps`
    batches of a freshly shuffled pass, so epochs begin where passes do, also
    with a --steps_per_epoch cap (a resumed run's first epoch begins as the
    killed run's would have). Otherwise: one epoch of one pass, a known length:
    validation data that fit reads to its end every epoch, with no
    validation_steps (a batch ignore_errors dropped is made up for).
    full_batches, for a tf.distribute strategy: a pass's last, partial batch is
    dropped (every replica gets an equal share of every batch) and the decoded
    images keep their order (under multi_worker every worker must produce the
    same batches, of which DATA sharding hands each worker its share).
    """
    cache = config.cache
    if cache not in ("none", "memory"):
        cache = cache_prefix(cache, scan, config.image_size, split)
    ds, cached = stream.tf_data_pipeline(scan.paths, scan.labels, config.image_size, batch_size,
                                         training, cache, config.augment and training,
                                         config.augment_with, config.seed)
    # Under multi_worker each worker keeps its share of every batch (DATA sharding). The
    # source is a list of file names read by map(), not a file-reading dataset (TFRecord,
    # text lines), so FILE sharding has no files to split (AUTO falls back to DATA, with a
    # warning). Every worker decodes the whole pass, which repeats input work, but every
    # worker then runs the same number of full steps, as the gradient all-reduce needs.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    if full_batches:
        options.deterministic = True  # also for the cache's fill: the same order everywhere
        ds = ds.rebatch(batch_size, drop_remainder=True)
        cached = cached.with_options(options) if cached is not None else None
    n = len(scan.paths)
    if training:
        ds = (ds if steps is None else ds.take(steps)).repeat()
    else:
        ds = ds.repeat().take(n // batch_size if full_batches else math.ceil(n / batch_size))
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options), cached


# --- finding the images, and the bad ones, before training ----------------------------
# (the rules are experiments/image_folder.py's, shared with the `directory` dataset)

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
    if isinstance(model, keras.Model):  # yours: it must take images and classify these
        classifier_loss(model, len(_remembered["result"][0].class_names))
        shape = tuple(model.inputs[0].shape[1:])
        sizes = (d not in (None, config.image_size) for d in shape[:2])
        if shape[-1] not in FOLDER_CHANNELS or any(sizes):
            raise ValueError(f"the model takes inputs shaped {shape}; this recipe feeds it "
                             f"{config.image_size}x{config.image_size} RGB or gray images "
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
    """images/s over the batches after the warm-up (step_timer.steady): all images over all
    their time, not a median, because a loader's stalls are what this measures."""
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
    """Steps and images of each training call, per epoch, beside the StepTimer.

    With steps_per_execution > 1 one call runs several steps, and an epoch's last
    batch holds the remainder, so neither is a constant.
    """

    def __init__(self, batch_size, n_images, steps):
        super().__init__()
        self.epochs, self._sizes = [], [
            min(batch_size, n_images - (i % math.ceil(n_images / batch_size)) * batch_size)
            for i in range(steps)]

    def on_epoch_begin(self, epoch, logs=None):
        if len(self.epochs) <= epoch:  # not the epoch a resumed run goes on with
            self.epochs.append([])

    def on_train_batch_begin(self, batch, logs=None):
        self._begin = batch

    def on_train_batch_end(self, batch, logs=None):
        done = sum(n for n, _ in self.epochs[-1])  # steps of this epoch before this call
        n = batch + 1 - self._begin
        self.epochs[-1].append((n, sum(self._sizes[done:done + n])))


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
        return (stream.generator_flow(folders[0], train.class_names, config.image_size,
                                      config.batch_size, config.augment, True, config.seed,
                                      config.generator_workers),
                stream.generator_flow(folders[1], train.class_names, config.image_size,
                                      config.batch_size, False, False, config.seed), [])
    full = spreads_training(strategy)
    train_ds, train_cached = tf_data_loader(train, config, batch, True, "train", steps, full)
    val_ds, val_cached = tf_data_loader(val, config, val_batch, False, "validation",
                                        full_batches=full)
    return train_ds, val_ds, [c for c in (train_cached, val_cached) if c is not None]


def measure_input(name, loader, config, steps):
    """{input_images_per_sec, [cache_fill_images_per_sec]} for one loader, no training."""
    train_data, _, cached = loader
    batches = config.input_batches or steps
    out = {}
    if cached:
        out["cache_fill_images_per_sec"] = stream.fill_cache(cached[0])
        for stage in cached[1:]:
            stream.fill_cache(stage)
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
            stream.fill_cache(stage)
        return dict(saved["state"]["input"])
    with PeakRSS() as rss:
        out = measure_input(name, loader, config, steps)
    return {**out, "peak_rss_mb": rss.mb}


def fit_loader(name, loader, make_model, config, steps, n_train, run_dir, strategy=None,
               fit=keras.Model.fit, measured=None):
    """Trains a fresh copy of the model from make_model() on one loader; returns its
    measurements, `measured` (its input's) included.

    After each epoch (and every --checkpoint_every_steps, and on SIGTERM) a checkpoint
    goes to run_dir/checkpoints/<name>, with the step timings, the input measurements
    and the time so far; one left by a stopped run is continued at its step, those kept.
    The loaders take images as they are ready, so a batch order cannot be replayed: the
    rest of a resumed epoch is its remaining steps on a pass shuffled anew, and the next
    epoch begins a pass, as in an unbroken run.
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
                      metrics=metrics, steps_per_execution=config.steps_per_execution,
                      **users_settings(model, ("steps_per_execution",)))
        if checkpoint:
            print(f"Resuming --loader={name} at "
                  f"{position(saved['epochs_done'], saved['step'], steps)} from {checkpoint}")
            restore(model, checkpoint)
        start = time.perf_counter()

        def so_far():  # what a resumed run needs to go on measuring
            return {"input": measured, "step_seconds": timer.seconds, "call_sizes": sizes.epochs,
                    "train_wall_time_s": earlier_s + time.perf_counter() - start,
                    "train_peak_rss_mb": max(earlier_mb, rss.mb)}

        history = fit_from(
            fit, model, lambda epoch, step: {"x": train_data}, config.epochs, steps, saved,
            validation_data=val_data, shuffle=False, verbose=2,  # the loaders shuffle
            callbacks=[timer, sizes, keras.callbacks.TerminateOnNaN(),
                       keras.callbacks.TensorBoard(log_dir=os.path.join(run_dir, name)),
                       EpochCheckpoint(checkpoint_dir, so_far, config.checkpoint_every_steps)])
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


def model_for_loaders(model, config, num_classes):
    """make() -> (model, loss, metrics): fresh copies from the same weights, taking the
    loaders' [0, 1] images, scaled in front of it to the range it wants (pixel_range()).
    model: None (this recipe's CNN), a keras.Model (copied, never changed) or
    fn(input_shape, num_classes)."""
    shape = (config.image_size, config.image_size, 3)
    if model is None:
        reference, why, wanted = build_model(config.image_size, num_classes), None, "0_1"
    else:
        reference = model if isinstance(model, keras.Model) else model(shape, num_classes)
        why = classifier_loss(reference, num_classes)[2]
        wanted, _, reason = pixel_range(reference, config.pixel_range)
        print(f"your model: {reference.count_params():,} weights; loss: {why}; images reach it "
              f"in {PIXEL_RANGES[wanted][0]} ({reason})")

    def make():
        copy = fresh_model(reference, shape, num_classes)
        if why is None:
            return copy, "sparse_categorical_crossentropy", ["accuracy"]
        front = []  # the loaders give RGB in [0, 1]: what the model takes, in front of it
        if reference.inputs[0].shape[-1] == 1:
            front.append(rgb_to_gray())
        if wanted != "0_1":  # x * 255 or x * 2 - 1
            _, low, high = PIXEL_RANGES[wanted]
            front.append(keras.layers.Rescaling(high - low, offset=low))
        if front:
            settings = copy.users_compile_settings
            copy = keras.Sequential([keras.Input(shape), *front, copy])
            copy.users_compile_settings = settings
        loss, metrics, _ = classifier_loss(reference, num_classes)
        return copy, loss, metrics
    return make, reference


def rgb_to_gray():
    """A frozen 1x1 convolution from RGB to luma (ITU-R 601, as PIL's convert("L")): the
    loaders decode RGB, and a model of gray images gets one channel."""
    layer = keras.layers.Conv2D(1, 1, use_bias=False, trainable=False, name="rgb_to_gray")
    layer.build((None, None, None, 3))
    layer.set_weights([np.array([0.299, 0.587, 0.114], "float32").reshape(1, 1, 3, 1)])
    return layer


def run(config, run_dir, data, strategy=None, fit=None, model=None):
    """Checks the folder, measures each loader's input and training; returns flat metrics.

    strategy: a tf.distribute strategy (MirroredStrategy, MultiWorkerMirroredStrategy)
    or None for one device; it trains the tf.data loader only, --batch_size is then
    per replica and the learning rate scales with the replica count. fit: called
    like keras.Model.fit(model, dataset, ...) (the default); the CLI passes a
    strategy.run loop for multi_worker, where Keras' fit fails. A loader that
    finished in `run_dir` (a resumed run) is read back, one with a checkpoint
    continues at its step. model: None for this recipe's small
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
            save_json(os.path.join(run_dir, name, "result.json"), results[name])
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


