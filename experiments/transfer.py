"""VGG16 transfer learning: frozen base, cached features, fine-tuning.

Shows: the classic recipe, VGG16(include_top=False) as a frozen base under a
new head (GlobalAveragePooling2D -> Dense(1024, relu) -> Dense(classes,
softmax)), done right: VGG16's own preprocessing (not 1/255) inside the
model, so the saved model takes [0, 1] images and preprocessing happens once;
the base frozen (`trainable = False`, called with `training=False`) while the
head learns; optionally (--cache_features) the frozen base run once over the
data and the head trained on the stored features, which makes each head epoch
many times faster; optionally (--fine_tune_epochs) the last block (block5_*)
unfrozen and trained on at a 10x-100x lower learning rate, both phases on one
TensorBoard timeline. The best model by val accuracy (best.keras) and the
final model (final.keras) are written atomically to the run folder;
--export=saved_model also exports a TF SavedModel for serving.
Before each long pass the recipe prints its estimated duration from the first
timed steps. Both phases run under --strategy=mirrored (all local GPUs) or
multi_worker (TF_CONFIG's workers), with --batch_size per replica and the
learning rate times the replica count (--noscale_lr_with_replicas keeps it);
every epoch (and every N steps, and a SIGTERM's step) is checkpointed, so --resume
continues a stopped run at that step, in phase 1 or 2, reading back the cached features it had
written instead of running the base again.
Run:    python main.py --recipe=transfer --weights=none --cache_features
        python main.py --recipe=transfer --data_dir=../shared/data/hymenoptera \\
            --image_size=150 --cache_features --epochs=10 --fine_tune_epochs=2
        python main.py --recipe=transfer --weights=none --strategy=mirrored
        (killed?) the same command with --resume
Weights: --weights=imagenet uses keras' cache (~/.keras/models, or
        $KERAS_HOME/models) and downloads there when it can; offline, put
        vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 there or pass
        --weights=PATH. --weights=none starts from random weights: it shows
        the mechanics and the speed, not what transfer learning achieves.
Size:   --image_size defaults to 64 so the default run on the generated shapes
        set (320 + 80 images) stays short on a CPU; 150 is the usual size for
        photos (the minimum VGG16 accepts is 32). On 2 CPU cores a frozen-base
        step of 32 images at 150x150 takes about 3.5 s when the machine is
        quiet, 8-9 s measured here with other jobs running.
Expect: measured on a shared 2-core CPU, default shapes run at 64x64 with
        --weights=none --cache_features --fine_tune_epochs=1: base_epoch_s
        1.7 (3.9-4.1 on a busier machine), head_epoch_s 0.03-0.07
        (cache_speedup 55-68), phase 2 2.1 s per epoch (4.7-5.3), 9-24 s in
        all. Accuracy stays near chance (0.10 after phase 1, 0.30-0.33 after
        one fine-tuning epoch) because the weights
        are random, and the run says so after training: accuracy needs
        pretrained weights. What ImageNet weights reach on photos was not
        measured here (no network to fetch them). Two local workers
        (--strategy=multi_worker, 32x32, --steps_per_epoch=3, both on the same
        2 cores) train both phases at 2 replicas and twice the learning rate
        in about 30 s, slower than one process: they share the cores, so this
        shows the mechanics, not a speedup. A run killed in either phase and
        started again with --resume prints only the epochs it had left and
        keeps one TensorBoard point per epoch.
Metrics: val_accuracy_phase1/_phase2, best_val_accuracy (best.keras),
        base_epoch_s (seconds per training epoch through the frozen base; with
        --cache_features, from the timed extraction pass, which is the same
        forward work), head_epoch_s and cache_speedup (with --cache_features),
        trainable_params (phase 1) / trainable_params_phase2, total_params,
        replicas.
Copy:   the technique alone (base, head, preprocessing, cached features, block5
        unfrozen) is recipes/transfer.py, a drop-in file. This experiment around it is
        called from this repository:
        experiments.transfer.run(Config(weights="none"), "logs", ((x_train, y_train), (x_val, y_val)))
        with x float32 in [0, 1], shaped (n, size, size, 3) (gray is repeated);
        add strategy=tf.distribute.MirroredStrategy() for several GPUs (batch
        size per replica), and fit=your_fit, called like keras.Model.fit(model,
        ...), to train through your own loop (main.py's strategy.run loop for
        multi_worker). Running it again on the same folder continues a stopped
        run at the step of its last checkpoint.
"""
import dataclasses
import hashlib
import os
import shutil
import socket
import tempfile
import time
import typing

import keras
import numpy as np
import tensorflow as tf

from experiments.files import write_atomically
from experiments.scale_out import (NOTHING_SAVED, EpochCheckpoint, array_batches,
                                   distribution_scope, final_logs, fit_from, latest_checkpoint,
                                   by_data, position, replica_count, restore,
                                   validation_batches)
from experiments.tensorboard import log_text_summary
from recipes import transfer
from recipes.step_timer import StepTimer, steady

# What main.py feeds this recipe: a few hundred 64x64 RGB images by default
# (Config.image_size overrides the size main.py loads them at).
DATA = {"form": "arrays", "image_size": 64, "channels": 3, "examples": (320, 80)}
RESUMABLE = True  # checkpoints in both phases (epoch ends, every N steps, on SIGTERM): --resume
STRATEGIES = ("mirrored", "multi_worker")  # run(strategy=, fit=), both phases
HEADLINE = ("val_accuracy_phase1", "val_accuracy_phase2", "best_val_accuracy", "base_epoch_s",
            "head_epoch_s", "cache_speedup", "trainable_params", "total_params", "wall_time_s")

WEIGHTS_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"  # what keras downloads
LAST_BLOCK = transfer.LAST_BLOCK
MIN_IMAGE_SIZE = 32
# Printed before and after a --weights=none run, whose accuracy stays near chance.
PRETRAINED_NOTE = ("Accuracy needs pretrained weights: --weights=imagenet (downloaded once), "
                   "or --weights=FILE.h5 offline.")


@dataclasses.dataclass
class Config:
    weights: str = "imagenet"  # imagenet (keras cache/download), none (random: mechanics only)
    # or PATH to a no-top VGG16 weights file (.h5)
    image_size: int = 64  # image side in pixels, at least 32; 150 is usual for photos
    epochs: int = 3  # phase 1: head epochs with the base frozen
    fine_tune_epochs: int = 0  # phase 2: epochs with block5 unfrozen (0 skips it; slow on CPU)
    batch_size: int = 32  # examples per step (per replica under --strategy)
    learning_rate: float = 1e-3  # phase 1 Adam learning rate
    fine_tune_lr_divisor: float = 30.0  # phase 2 learning rate = learning_rate / this (10-100)
    scale_lr_with_replicas: bool = True  # multiply the learning rate by the replica count
    dense_units: int = 1024  # width of the head's Dense(relu) layer
    cache_features: bool = False  # run the frozen base once, train the head on stored features
    cache_file: str | None = None  # with --cache_features: keep features in this .npz file and
    # reuse them while images, weights and size match (default: memory only)
    augment: bool = False  # random flip, rotation and zoom of training images
    export: typing.Literal["none", "saved_model"] = "none"  # also export for serving
    warmup_steps: int = 1  # first steps left out of step timing (they trace and compile)
    steps_per_epoch: int | None = None  # optional cap on training steps per epoch
    checkpoint_every_steps: int = 0  # also checkpoint every N steps within an epoch (0: auto)
    seed: int = 0  # initial weights, augmentation and shuffling

    def __post_init__(self):
        if self.weights not in ("imagenet", "none") and not os.path.isfile(self.weights):
            raise ValueError(f"--weights={self.weights} is not a file; use imagenet, none or "
                             f"the path to a no-top VGG16 weights file ({WEIGHTS_FILE})")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"--image_size must be at least {MIN_IMAGE_SIZE} for VGG16, "
                             f"got {self.image_size}")
        if self.epochs < 1 or self.fine_tune_epochs < 0 or self.batch_size < 1:
            raise ValueError("--epochs and --batch_size must be >= 1, --fine_tune_epochs >= 0")
        if self.learning_rate <= 0 or self.fine_tune_lr_divisor < 1:
            raise ValueError("--learning_rate must be > 0 and --fine_tune_lr_divisor >= 1 "
                             "(10 to 100 is usual)")
        if self.dense_units < 1 or self.warmup_steps < 0:
            raise ValueError("--dense_units must be >= 1 and --warmup_steps >= 0")
        if self.cache_features and self.augment:
            raise ValueError("--cache_features cannot be used with --augment: cached features "
                             "are computed once, so every epoch would see the same un-augmented "
                             "images; drop one of the two flags")
        if self.cache_file and not self.cache_features:
            raise ValueError("--cache_file needs --cache_features")


# --- the base ------------------------------------------------------------------

def keras_weights_path():
    """Where keras looks for (and downloads) the no-top VGG16 ImageNet weights."""
    home = os.path.expanduser(os.environ.get("KERAS_HOME") or os.path.join("~", ".keras"))
    if not os.access(home, os.W_OK):  # keras.utils.get_file's own fallback
        home = os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), ".keras")
    return os.path.join(home, "models", WEIGHTS_FILE)


def load_vgg16(weights, image_size, download_timeout_s=60):
    """VGG16 without its top for (image_size, image_size, 3) inputs.

    weights: "imagenet" (keras cache, downloaded when missing), "none" or a
    weights file path. Raises ValueError, one line, when ImageNet weights are
    neither cached nor downloadable, before any training starts.
    """
    shape = (image_size, image_size, 3)
    if weights != "imagenet":
        return keras.applications.VGG16(include_top=False, input_shape=shape,
                                        weights=None if weights == "none" else weights)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(download_timeout_s)  # keras' download has no timeout of its own
    try:
        return keras.applications.VGG16(include_top=False, input_shape=shape, weights="imagenet")
    except Exception as e:  # keras raises a bare Exception("URL fetch failure ...")
        if "fetch failure" not in str(e):
            raise
        reason = str(e).strip().splitlines()[-1].split(" -- ")[-1]
        cached = ("are not cached" if not os.path.isfile(keras_weights_path())
                  else "in the cache fail keras' hash check (partial or corrupt file)")
        raise ValueError(
            f"--weights=imagenet: VGG16 weights {cached} and could not be downloaded "
            f"({reason}); put {WEIGHTS_FILE} at {keras_weights_path()}, or pass "
            f"--weights=PATH to a local copy, or --weights=none to see the mechanics only"
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def count_params(weights):
    return int(sum(np.prod(w.shape) for w in weights))


# --- data and timing -----------------------------------------------------------

def make_dataset(x, y, batch_size, seed):
    """In-memory (x, y) as shuffled, full training batches, so steps compare (the tests'
    and benchmarks/transfer.py's; run() reads array_batches, resumable at a step)."""
    ds = by_data(tf.data.Dataset.from_tensor_slices((x, y)))
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(min(batch_size, len(x)), drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def epoch_seconds(step_seconds, warmup_steps, steps):
    """Seconds per epoch of `steps` steps at the median steady step time."""
    return float(np.median(steady(step_seconds, warmup_steps))) * steps


class EstimatePrinter(keras.callbacks.Callback):
    """Prints the phase's estimated duration once the StepTimer before it has a few steps."""

    def __init__(self, timer, label, total_steps, warmup_steps):
        super().__init__()
        self.timer, self.label = timer, label
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.first = 0

    def on_train_begin(self, logs=None):
        self.first = len(self.timer.seconds)  # a resumed phase: the killed run's steps are kept

    def on_train_batch_end(self, batch, logs=None):
        seconds = self.timer.seconds[self.first:]
        if len(seconds) == self.warmup_steps + 2 and self.total_steps > len(seconds):
            print_estimate(self.label, steady(seconds, self.warmup_steps), self.total_steps)


def print_estimate(label, step_seconds, total_steps):
    per_step = float(np.median(step_seconds))
    print(f"\n[{label}] estimated {per_step * total_steps:.0f} s for {total_steps} steps "
          f"({1000 * per_step:.0f} ms/step, from the first timed steps)", flush=True)


def timed_extraction(extractor, x, batch_size, warmup_steps=1, label="feature extraction"):
    """transfer.extract_features -> (features float32, seconds per batch), printing the
    pass's estimated duration after its first timed batches.

    On one device, even when the extractor was built under a strategy: its own
    predict_on_batch would, under MultiWorkerMirroredStrategy, gather every
    worker's copy of the batch into its result.
    """
    forward = tf.function(lambda batch: extractor(batch, training=False), reduce_retracing=True)
    seconds, steps = [], -(-len(x) // batch_size)

    def timed(batch_seconds):
        seconds.append(batch_seconds)
        if len(seconds) == warmup_steps + 2 and steps > len(seconds):
            print_estimate(label, steady(seconds, warmup_steps), steps)
    return transfer.extract_features(extractor, x, batch_size, forward, timed), seconds

def cached_features(extractor, x_train, x_val, batch_size, config):
    """(train features, val features, seconds per batch or None when read from cache_file)."""
    key = None
    if config.cache_file:
        digest = hashlib.sha1(repr((config.weights, config.image_size, x_train.shape,
                                    x_val.shape)).encode())
        if config.weights == "none":
            digest.update(str(config.seed).encode())
        elif config.weights != "imagenet":
            stat = os.stat(config.weights)
            digest.update(repr((os.path.abspath(config.weights), stat.st_size,
                                stat.st_mtime)).encode())
        digest.update(np.ascontiguousarray(x_train).data)
        digest.update(np.ascontiguousarray(x_val).data)
        key = digest.hexdigest()
        if os.path.isfile(config.cache_file):
            with np.load(config.cache_file) as stored:
                if str(stored["key"]) == key:
                    print(f"features read from {config.cache_file}")
                    return stored["train"], stored["val"], None
            print(f"{config.cache_file} was made from other images or weights: recomputing")
    train, seconds = timed_extraction(extractor, x_train, batch_size, config.warmup_steps)
    val, _ = timed_extraction(extractor, x_val, batch_size, config.warmup_steps,
                              label="feature extraction (validation)")
    if key is not None:
        save_npz(config.cache_file, key=key, train=train, val=val)
    return train, val, seconds


def kept_features(extractor, x_train, x_val, batch_size, config, path):
    """cached_features, also written whole to `path` (in the run folder) with the
    extraction's timings: a resumed run reads them back instead of running the base again.
    Returns (train features, val features, seconds per batch or None)."""
    if os.path.isfile(path):  # written atomically: there means whole
        with np.load(path) as stored:
            train, val, seconds = stored["train"], stored["val"], stored["seconds"].tolist()
        print(f"features read back from {path} (extracted before the run stopped; "
              "not recomputed)")
        return train, val, seconds or None
    train, val, seconds = cached_features(extractor, x_train, x_val, batch_size, config)
    save_npz(path, train=train, val=val, seconds=np.asarray(seconds or [], np.float64))
    return train, val, seconds


def save_npz(path, **arrays):
    """np.savez(path, **arrays) written atomically, its folder made if missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def save(partial):  # through a file object: np.savez would add .npz to a bare name
        with open(partial, "wb") as f:
            np.savez(f, **arrays)
    write_atomically(path, save)


# --- saving --------------------------------------------------------------------

def export_saved_model(model, path):
    """A TF SavedModel for serving (its `serve` signature), written to a temp dir then moved."""
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        model.export(tmp, format="tf_saved_model", verbose=False)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class SaveBest(keras.callbacks.Callback):
    """Saves `model` (the full image model, even while only its head trains) whenever
    val accuracy improves; one instance spans both phases."""

    def __init__(self, model_to_save, path):
        super().__init__()
        self.model_to_save, self.path = model_to_save, path
        self.best, self.best_epoch = -np.inf, None

    def on_epoch_end(self, epoch, logs=None):
        accuracy = (logs or {}).get("val_accuracy")
        if accuracy is not None and accuracy > self.best:
            self.best, self.best_epoch = float(accuracy), epoch
            write_atomically(self.path, self.model_to_save.save)


# --- training ------------------------------------------------------------------

def fit_phase(model, train, val, label, epochs, initial_epoch, learning_rate, steps, config,
              callbacks, fit=None, resume=None, timer=None, frozen=()):
    """Compiles `model` at `learning_rate` (a new Adam) and trains it up to `epochs`;
    returns (the last epoch's logs, StepTimer).

    train: a dataset, or data_at(epoch, step) -> {"x": the batches from there on}
    (fit_from). fit: called like keras.Model.fit(model, ...), its default. resume:
    (checkpoint, saved) from latest_checkpoint: its weights and optimizer state are
    restored after the compile and training goes on at its step (none left: its logs
    are returned). frozen: weights that must not change.
    """
    fit = fit or keras.Model.fit
    checkpoint, saved = resume or (None, dict(NOTHING_SAVED))
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    if checkpoint:
        print(f"Resuming {label} at {position(saved['epochs_done'], saved['step'], steps)} "
              f"from {checkpoint}")
        restore(model, checkpoint)
    if saved["epochs_done"] < initial_epoch:  # this phase starts where the last one ended
        saved = {**saved, "epochs_done": initial_epoch, "step": 0, "partial": {}}
    before = [w.numpy() for w in frozen]
    timer = timer or StepTimer()
    estimate = EstimatePrinter(timer, label, steps * (epochs - saved["epochs_done"])
                               - saved["step"], config.warmup_steps)
    history = fit_from(fit, model, train if callable(train) else lambda e, s: {"x": train},
                       epochs, steps, saved, validation_data=val, verbose=2,
                       shuffle=False,  # array_batches shuffles
                       callbacks=[timer, estimate, keras.callbacks.TerminateOnNaN(),
                                  *callbacks])
    logs = final_logs(history, saved)
    if not np.isfinite(logs["loss"]):
        raise FloatingPointError(f"{label}: training loss became {logs['loss']}; lower "
                                 "--learning_rate (or raise --fine_tune_lr_divisor)")
    if not all(np.array_equal(a, w.numpy()) for a, w in zip(before, frozen)):
        raise RuntimeError(f"{label}: frozen weights changed")  # a recipe bug, not input
    return logs, timer


def phase_state(timer, save_best, metrics):
    """What a checkpoint carries besides the model: the phase's step times so far, the
    best model's accuracy and epoch, the metrics measured before (EpochCheckpoint's state)."""
    return lambda: {"step_seconds": timer.seconds, "best": save_best.best,
                    "best_epoch": save_best.best_epoch, "metrics": dict(metrics)}


def continue_state(saved, timer, save_best, metrics):
    """Puts phase_state's record from a checkpoint back (a fresh start has none)."""
    state = saved["state"]
    timer.seconds = list(state.get("step_seconds", []))
    save_best.best = state.get("best", save_best.best)
    save_best.best_epoch = state.get("best_epoch", save_best.best_epoch)
    metrics.update(state.get("metrics", {}))


def as_rgb(x, image_size):
    """float32 (n, image_size, image_size, 3): gray repeated, other sizes resized."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be shaped (n, size, size, 1 or 3), got {x.shape}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (image_size, image_size):
        x = tf.image.resize(x, (image_size, image_size)).numpy()
    return x


def check_weights(weights):
    """ValueError (one line) unless VGG16 loads `weights`: ImageNet's (cached or downloaded
    now) or a file's. Loaded into a 32x32 VGG16, which has the same kernels as any size."""
    if weights == "none":
        return
    if weights == "imagenet":
        load_vgg16(weights, MIN_IMAGE_SIZE)  # its own one-line ValueError when offline
        return
    try:
        load_vgg16(weights, MIN_IMAGE_SIZE)
    except Exception as e:  # h5py's OSError for a file that is not HDF5, a layer mismatch...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--weights={weights} cannot be loaded into VGG16 (no top): {first}; "
                         "pass keras' vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5, "
                         "imagenet or none") from None


def check(config, data):
    """ValueError (one line) for input that cannot run: images, classes, the weights."""
    (x_train, y_train), (x_val, y_val) = data
    for x in (x_train, x_val):
        shape = np.shape(x)
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
            raise ValueError(f"images must be shaped (n, size, size, 1 or 3), got {shape}")
    labels = np.concatenate([np.ravel(y_train), np.ravel(y_val)])
    if len(x_val) == 0 or len(np.unique(labels)) < 2:
        raise ValueError("transfer needs at least two classes and some validation images")
    check_weights(config.weights)


def run(config, run_dir, data, strategy=None, fit=None):
    """Phase 1 (frozen base, maybe cached), phase 2 (block5); returns flat metrics.

    `strategy`: a tf.distribute strategy (MirroredStrategy,
    MultiWorkerMirroredStrategy) or None for one device; --batch_size is then
    per replica and the learning rate scales with the replica count. `fit`:
    called like keras.Model.fit(model, dataset, ...) (the default); the CLI
    passes a strategy.run loop for MultiWorkerMirroredStrategy, where Keras'
    fit fails. Each epoch (and every N steps, and a SIGTERM's step) is checkpointed
    under run_dir/checkpoints: running again on the same run_dir continues a stopped
    run at that step, in either phase, and reads back the cached features it had written.
    """
    start = time.perf_counter()
    check(config, data)
    replicas = replica_count(strategy)
    (x_train, y_train), (x_val, y_val) = data
    x_train, x_val = as_rgb(x_train, config.image_size), as_rgb(x_val, config.image_size)
    y_train, y_val = np.asarray(y_train, np.int64).ravel(), np.asarray(y_val, np.int64).ravel()
    num_classes = int(max(y_train.max(), y_val.max())) + 1
    if config.weights == "none":
        print("\n*** --weights=none: VGG16 starts from RANDOM weights. This run only shows the "
              "mechanics and speed\n*** (freezing, caching, fine-tuning); its accuracy says "
              f"nothing about transfer learning. ***\n{PRETRAINED_NOTE}\n", flush=True)
    keras.utils.set_random_seed(config.seed)
    with distribution_scope(strategy):  # every model is built, compiled and fit in it
        base = load_vgg16(config.weights, config.image_size)
        model, head, extractor = transfer.build_model(base, num_classes, config.dense_units,
                                                      config.augment, config.seed)
    replica_batch = min(config.batch_size, len(x_train))  # also the extraction's batch
    batch_size = min(config.batch_size * replicas, len(x_train))  # one step, all replicas
    lr = config.learning_rate * (replicas if config.scale_lr_with_replicas else 1)
    steps = config.steps_per_epoch or len(x_train) // batch_size
    log_dir = os.path.join(run_dir, "train_log")  # both phases: one TensorBoard timeline
    checkpoints = os.path.join(run_dir, "checkpoints")
    save_best = SaveBest(model, os.path.join(run_dir, "best.keras"))
    metrics = {"total_params": count_params(model.weights),
               "trainable_params": count_params(model.trainable_weights), "replicas": replicas}

    def batches(x, y):  # fit_from's data_at: the same batches at every step, in every run
        return lambda epoch, step: {"x": array_batches(x, y, batch_size, config.seed,
                                                       epoch * steps + step)}

    train_images = batches(x_train, y_train)
    val_images = validation_batches(x_val, y_val, batch_size)
    phase2 = latest_checkpoint(os.path.join(checkpoints, "phase2"))

    if phase2[0] is None:
        print(f"\n== phase 1: head on the frozen base, batch {replica_batch} x {replicas} "
              f"replica(s), learning rate {lr:.2e} ({metrics['trainable_params']:,} of "
              f"{metrics['total_params']:,} parameters train) ==")
        phase1_dir = os.path.join(checkpoints, "phase1")
        resume = latest_checkpoint(phase1_dir)
        timer = StepTimer()
        continue_state(resume[1], timer, save_best, metrics)
        callbacks = [keras.callbacks.TensorBoard(log_dir), save_best,
                     EpochCheckpoint(phase1_dir, phase_state(timer, save_best, metrics),
                                     config.checkpoint_every_steps)]
        if config.cache_features:
            f_train, f_val, extract_seconds = kept_features(
                extractor, x_train, x_val, replica_batch, config,
                os.path.join(checkpoints, "features.npz"))
            if extract_seconds is not None:  # one pass of the base = the cost of an epoch
                metrics["base_epoch_s"] = epoch_seconds(extract_seconds, config.warmup_steps,
                                                        steps)
                metrics["feature_extraction_s"] = float(np.sum(extract_seconds))
            with distribution_scope(strategy):
                logs, timer = fit_phase(
                    head, batches(f_train, y_train),
                    validation_batches(f_val, y_val, batch_size),
                    "phase 1, head on cached features", config.epochs, 0, lr, steps, config,
                    callbacks, fit=fit, resume=resume, timer=timer)
            metrics["head_epoch_s"] = epoch_seconds(timer.seconds, config.warmup_steps, steps)
            if "base_epoch_s" in metrics:
                metrics["cache_speedup"] = metrics["base_epoch_s"] / metrics["head_epoch_s"]
        else:
            with distribution_scope(strategy):
                logs, timer = fit_phase(
                    model, train_images, val_images, "phase 1, head through the frozen base",
                    config.epochs, 0, lr, steps, config, callbacks, fit=fit, resume=resume,
                    timer=timer, frozen=base.weights)
            metrics["base_epoch_s"] = epoch_seconds(timer.seconds, config.warmup_steps, steps)
        metrics["val_accuracy_phase1"] = float(logs["val_accuracy"])
    else:
        print("\n== phase 1: finished in an earlier run ==")

    if config.fine_tune_epochs:
        transfer.unfreeze_last_block(base)
        metrics["trainable_params_phase2"] = count_params(model.trainable_weights)
        fine_lr = lr / config.fine_tune_lr_divisor
        print(f"\n== phase 2: fine-tuning {LAST_BLOCK}* at learning rate {fine_lr:.2e}, batch "
              f"{replica_batch} x {replicas} replica(s) "
              f"({metrics['trainable_params_phase2']:,} parameters train) ==")
        phase2_dir = os.path.join(checkpoints, "phase2")
        timer = StepTimer()
        continue_state(phase2[1], timer, save_best, metrics)
        with distribution_scope(strategy):
            logs, timer = fit_phase(
                model, train_images, val_images, "phase 2, fine-tuning block5",
                config.epochs + config.fine_tune_epochs, config.epochs, fine_lr, steps, config,
                [keras.callbacks.TensorBoard(log_dir), save_best,
                 EpochCheckpoint(phase2_dir, phase_state(timer, save_best, metrics),
                                 config.checkpoint_every_steps)],
                fit=fit, resume=phase2, timer=timer)
        metrics["val_accuracy_phase2"] = float(logs["val_accuracy"])
        metrics["fine_tune_epoch_s"] = epoch_seconds(timer.seconds, config.warmup_steps, steps)

    write_atomically(os.path.join(run_dir, "final.keras"), model.save)
    if config.export == "saved_model":
        export_saved_model(model, os.path.join(run_dir, "saved_model"))
    shutil.rmtree(checkpoints, ignore_errors=True)  # done: final.keras holds the result
    metrics.update(val_accuracy=metrics.get("val_accuracy_phase2", metrics["val_accuracy_phase1"]),
                   best_val_accuracy=save_best.best, best_epoch=save_best.best_epoch,
                   pretrained=int(config.weights != "none"),
                   wall_time_s=time.perf_counter() - start)
    table = format_table(metrics, config)
    if config.weights == "none":  # again at the end, beside the numbers it qualifies
        table += (f"\nval_accuracy {metrics['val_accuracy']:.3f} is from random VGG16 weights: "
                  f"not a result. {PRETRAINED_NOTE}")
    print("\n" + table)
    log_text_summary(log_dir, table)
    return metrics


def format_table(metrics, config):
    """Both phases side by side: what trained, for how long, and how well."""
    def number(key, spec):
        return format(metrics[key], spec) if key in metrics else "-"

    lines = [f"{'phase':<28} {'epochs':>6} {'trainable':>10} {'s/epoch':>8} {'val_acc':>8}",
             f"{'1: head, base frozen' + (' (cached)' if config.cache_features else ''):<28} "
             f"{config.epochs:>6} {metrics['trainable_params']:>10,} "
             f"{number('head_epoch_s' if config.cache_features else 'base_epoch_s', '.2f'):>8} "
             f"{number('val_accuracy_phase1', '.4f'):>8}"]
    if config.fine_tune_epochs:
        lines.append(f"{'2: fine-tuning ' + LAST_BLOCK + '*':<28} {config.fine_tune_epochs:>6} "
                     f"{metrics['trainable_params_phase2']:>10,} "
                     f"{number('fine_tune_epoch_s', '.2f'):>8} "
                     f"{number('val_accuracy_phase2', '.4f'):>8}")
    if "cache_speedup" in metrics:
        lines.append(f"cached features: a head epoch {metrics['cache_speedup']:.0f}x faster than "
                     f"one through the base ({metrics['base_epoch_s']:.2f} s)")
    if metrics["best_epoch"] is not None:
        lines.append(f"best val accuracy {metrics['best_val_accuracy']:.4f} after epoch "
                     f"{metrics['best_epoch'] + 1}, saved as best.keras")
    return "\n".join(lines)
