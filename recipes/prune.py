"""Magnitude pruning with tfmot that really shrinks the saved model.

Shows: train a small dense baseline, prune a copy of it to a target sparsity
with tfmot's prune_low_magnitude (polynomial or constant schedule, optional
block or 2:4 structured sparsity, only some layers if asked), strip the pruning
wrappers, then measure what a user cares about: the fraction of exact zeros in
each kernel beside the target, accuracy before and after, and the gzip size of
the saved .h5, of a TFLite file and of a dynamic-range quantized TFLite file.
The exported pruned model is reloaded and must predict like the in-memory one.
The traps it handles: tfmot 0.8 only prunes tf_keras (Keras 2) models;
prune_low_magnitude wraps the *same* layer objects, so the baseline is cloned
first (else fine-tuning prunes the baseline too); PruningSummaries logs at the
start of each epoch, so the final sparsity is logged here after fit; the
default pruning frequency (100 steps) prunes nothing in a short run, so it is
derived from the fine-tuning span; layers tfmot refuses (tf_keras Rescaling,
RandomFlip, ...) are left dense and listed instead of failing the model.
Optional: --clusters=8 then shares 8 values per kernel (tfmot's sparsity-
preserving clustering), which gzip and int8 TFLite compress further.
Run:    python main.py --recipe=prune
        python main.py --recipe=prune --sweep=0.5,0.7,0.8,0.9,0.95
        python main.py --recipe=prune --model=conv --dataset=mnist --data_dir=DIR
Expect: on the default shapes data (6,000 28x28 images, 2 CPU cores) the run
        takes about 20 s: the baseline MLP reaches 0.982 validation accuracy,
        the pruned copy 0.973 (0.9 points lower) with every pruned kernel
        exactly 80% zeros; the gzipped .h5 is 3.3x smaller (406 KB -> 122 KB)
        and the int8 TFLite file 10x smaller (39 KB). --sweep=0.5,0.7,0.8,0.9,0.95
        (~30 s) shows where pruning starts to cost: accuracy 0.991, 0.981,
        0.973, 0.955, 0.856 for gzip ratios 1.7x, 2.5x, 3.3x, 5.2x, 7.8x (at
        50% the pruned copy beats the baseline: its 4 fine-tuning epochs are
        training too). For real digits, use --model=conv on MNIST: the benchmark
        (benchmarks/prune.py, pruning only the Dense kernel) gets test accuracy
        0.9783 -> 0.9792 at 80% sparsity (.h5 gzip 3.2x smaller) and 0.9724 at
        90% (4.9x); its int8 TFLite file is 9.7x smaller than the dense .h5 at
        80%, 13.7x with --clusters=8 and 14.6x at 90%. TensorBoard shows
        loss/accuracy of the baseline and pruned runs, per-layer sparsity and
        thresholds under pruned/metrics, and the sweep against sparsity.
Copy:   this file alone works in any project with tensorflow, tf-keras and
        tensorflow-model-optimization installed: build your model with
        `import tf_keras`, then prune_model(...) / train(...) / strip_and_measure(...),
        or run(Config(), "logs", ((x_train, y_train), (x_val, y_val))).
"""
import dataclasses
import gzip
import math
import os
import time
import typing
import warnings

import keras  # Keras 3: only the measuring kit's StepTimer, at the end of this file
import numpy as np
import tensorflow as tf

# tfmot 0.8 prunes only tf_keras (Keras 2) models: every model in this file is
# built with `tf_keras`, never with Keras 3's `keras` (or TensorFlow's keras alias, whose
# meaning tfmot flips). Importing tfmot also sets TF_USE_LEGACY_KERAS=1 for the
# whole process; it is put back so other code in the process keeps Keras 3.
_LEGACY_KERAS_ENV = os.environ.get("TF_USE_LEGACY_KERAS")
import tf_keras  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402

if _LEGACY_KERAS_ENV is None:
    os.environ.pop("TF_USE_LEGACY_KERAS", None)
else:
    os.environ["TF_USE_LEGACY_KERAS"] = _LEGACY_KERAS_ENV
sparsity = tfmot.sparsity.keras

# What main.py feeds this recipe: arrays of 28x28 gray images by default.
DATA = {"form": "arrays", "image_size": 28, "channels": 1}
TAKES_MODEL = True  # --model=FILE is taken, and check() says why it cannot be pruned yet
HEADLINE = ("baseline_accuracy", "pruned_accuracy", "accuracy_drop", "sparsity_target",
            "sparsity_measured", "baseline_gzip_bytes", "pruned_gzip_bytes",
            "compression_ratio", "tflite_gzip_bytes", "tflite_quant_gzip_bytes",
            "tflite_quant_compression_ratio", "wall_time_s")


@dataclasses.dataclass
class Config:
    model: typing.Literal["dense", "conv"] = "dense"  # dense: Flatten-Dense(128)-Dense(64)-out; conv: the tfmot guide's MNIST model
    baseline_epochs: int = 10  # epochs to train the unpruned baseline
    epochs: int = 4  # fine-tuning epochs of the pruned copy (the pruning schedule runs in them)
    batch_size: int = 64  # examples per training step
    learning_rate: float = 1e-3  # Adam learning rate of the baseline
    finetune_learning_rate: float = 1e-3  # Adam learning rate while pruning
    schedule: typing.Literal["polynomial", "constant"] = "polynomial"  # polynomial: initial -> final sparsity; constant: final from begin_step
    initial_sparsity: float = 0.5  # sparsity at begin_step (polynomial schedule)
    final_sparsity: float = 0.8  # target fraction of zeros in each pruned kernel
    begin_step: int = 0  # fine-tuning step where pruning starts
    end_step: int | None = None  # step where the target is reached; default: the last fine-tuning step
    frequency: int | None = None  # prune every N steps; default: about 10 times between begin and end
    block_size: tuple[int, ...] | None = None  # e.g. 1,4: prune 2-D kernels in blocks of this shape
    sparsity_m_by_n: tuple[int, ...] | None = None  # e.g. 2,4: structured m zeros in every n weights
    prune_layers: tuple[str, ...] | None = None  # names of layers to prune (default: all that tfmot can wrap)
    clusters: int = 0  # after pruning, share N distinct values per kernel, zeros kept (tfmot clustering); 0: off
    sweep: tuple[float, ...] | None = None  # e.g. 0.5,0.7,0.8,0.9,0.95: also prune to each and compare
    steps_per_epoch: int | None = None  # optional cap on training steps per epoch
    seed: int = 0  # initial weights and shuffling

    def __post_init__(self):
        for name in ("initial_sparsity", "final_sparsity"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {value}")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"--initial_sparsity ({self.initial_sparsity}) must not exceed "
                             f"--final_sparsity ({self.final_sparsity})")
        if self.sweep is not None and not all(0 < s < 1 for s in self.sweep):
            raise ValueError(f"--sweep values must be sparsities in (0, 1), got {self.sweep}")
        if self.baseline_epochs < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("--baseline_epochs, --epochs and --batch_size must be >= 1")
        if self.learning_rate <= 0 or self.finetune_learning_rate <= 0:
            raise ValueError("--learning_rate and --finetune_learning_rate must be > 0")
        if self.begin_step < 0 or (self.end_step is not None and self.end_step <= self.begin_step):
            raise ValueError(f"--end_step must be after --begin_step (>= 0), got "
                             f"{self.begin_step}..{self.end_step}")
        if self.clusters < 0 or self.clusters == 1:
            raise ValueError(f"--clusters must be 0 (off) or >= 2, got {self.clusters}")
        if self.frequency is not None and self.frequency < 1:
            raise ValueError(f"--frequency must be >= 1, got {self.frequency}")
        if self.block_size is not None and (len(self.block_size) != 2 or min(self.block_size) < 1):
            raise ValueError(f"--block_size must be two positive integers like 1,4, "
                             f"got {','.join(map(str, self.block_size))}")
        if self.sparsity_m_by_n is not None:
            m_by_n = self.sparsity_m_by_n
            if len(m_by_n) != 2 or not 0 < m_by_n[0] < m_by_n[1]:
                raise ValueError(f"--sparsity_m_by_n must be m,n with 0 < m < n (m zeros in "
                                 f"every n weights), like 2,4; got {','.join(map(str, m_by_n))}")
            if self.block_size is not None or self.sweep is not None:
                raise ValueError("--sparsity_m_by_n fixes the sparsity at m/n: it cannot be "
                                 "combined with --block_size or --sweep")


# --- the model -----------------------------------------------------------------

def build_model(input_shape, num_classes, kind="dense"):
    """A tf_keras classifier and its loss: logits for >2 classes, a sigmoid unit for 2.

    dense: Flatten -> Dense(128) -> Dense(64) -> output (the classic recipe);
    conv:  Conv2D(12, 3) -> MaxPool -> Flatten -> output (the tfmot guide's MNIST model).
    """
    binary = num_classes <= 2
    if kind == "dense":
        body = [tf_keras.layers.Flatten(name="flatten"),
                tf_keras.layers.Dense(128, activation="relu", name="dense_128"),
                tf_keras.layers.Dense(64, activation="relu", name="dense_64")]
    else:
        body = [tf_keras.layers.Conv2D(12, 3, activation="relu", name="conv"),
                tf_keras.layers.MaxPooling2D(2, name="pool"),
                tf_keras.layers.Flatten(name="flatten")]
    head = (tf_keras.layers.Dense(1, activation="sigmoid", name="output") if binary
            else tf_keras.layers.Dense(num_classes, name="output"))
    model = tf_keras.Sequential([tf_keras.Input(shape=input_shape), *body, head], name=kind)
    loss = (tf_keras.losses.BinaryCrossentropy() if binary
            else tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, loss


def check_tf_keras_model(model):
    """Raises TypeError with the fix when `model` is not a tf_keras Sequential/functional model."""
    if isinstance(model, tf_keras.Model):
        return
    kind = f"{type(model).__module__}.{type(model).__name__}"
    if type(model).__module__.startswith("keras"):
        raise TypeError(
            f"prune_model needs a tf_keras (Keras 2) model, got a Keras 3 model ({kind}): "
            "tfmot 0.8 cannot prune Keras 3 models. Build it with `import tf_keras` "
            "(tf_keras.Sequential / tf_keras.layers.*) instead of `import keras`.")
    raise TypeError(f"prune_model needs a tf_keras model, got {kind}")


# --- pruning -------------------------------------------------------------------

def make_schedule(kind, initial_sparsity, final_sparsity, begin_step, end_step, frequency):
    """tfmot's PolynomialDecay (initial -> final over begin..end) or ConstantSparsity."""
    if kind == "constant":
        return sparsity.ConstantSparsity(final_sparsity, begin_step=begin_step,
                                         end_step=end_step, frequency=frequency)
    return sparsity.PolynomialDecay(initial_sparsity=initial_sparsity,
                                    final_sparsity=final_sparsity, begin_step=begin_step,
                                    end_step=end_step, frequency=frequency)


def default_frequency(begin_step, end_step, times=10):
    """The largest divisor of the span that still prunes ~`times` times.

    tfmot prunes only when (step - begin_step) % frequency == 0, so a span that
    is not a multiple of the frequency never applies the final sparsity.
    """
    span = end_step - begin_step
    return max(f for f in range(1, max(1, span // times) + 1) if span % f == 0)


def _m_by_n_fits(layer, m_by_n):
    """tfmot groups m:n along a kernel's input channels; it silently skips other shapes."""
    kernel = getattr(layer, "kernel", None)
    if kernel is None:
        return True
    shape = kernel.shape
    channels_in = shape[0] if len(shape) == 2 else shape[-2] if len(shape) == 4 else None
    return channels_in is not None and channels_in % m_by_n[1] == 0


def check_layer_names(model, layer_names):
    """Raises ValueError naming the unknown layers and the model's own."""
    names = [layer.name for layer in model.layers]
    unknown = sorted(set(layer_names or ()) - set(names))
    if unknown:
        raise ValueError(f"--prune_layers: no layer named {', '.join(unknown)}; "
                         f"the model has {', '.join(names)}")


def prune_model(model, schedule, block_size=None, sparsity_m_by_n=None, layer_names=None):
    """Wraps a *copy* of `model` for pruning; the model passed in is never changed.

    Returns (pruned_model, pruned_layer_names, left_dense) where left_dense maps
    a layer name to why it stays dense (tfmot refused it, or m:n does not fit
    its shape). tfmot's prune_low_magnitude(model) would wrap the same layer
    objects, so fine-tuning would prune the original too: hence the clone.
    """
    check_tf_keras_model(model)
    check_layer_names(model, layer_names)
    copy = tf_keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    params = {"pruning_schedule": schedule}
    if block_size is not None:
        params["block_size"] = tuple(block_size)
    if sparsity_m_by_n is not None:
        params["sparsity_m_by_n"] = tuple(sparsity_m_by_n)
    pruned, left_dense = [], {}

    def wrap(layer):
        if isinstance(layer, tf_keras.layers.InputLayer):
            return layer.__class__.from_config(layer.get_config())
        if layer_names is not None and layer.name not in layer_names:
            return layer
        if sparsity_m_by_n is not None and not _m_by_n_fits(layer, sparsity_m_by_n):
            left_dense[layer.name] = (f"{sparsity_m_by_n[0]}:{sparsity_m_by_n[1]} does not fit "
                                      f"its kernel {tuple(layer.kernel.shape)}")
            return layer
        try:
            wrapped = sparsity.prune_low_magnitude(layer, **params)
        except ValueError as e:  # a layer tfmot cannot wrap (Rescaling, RandomFlip, custom...)
            left_dense[layer.name] = f"tfmot cannot wrap {type(layer).__name__}: {str(e)[:60]}..."
            return layer
        if layer.weights:
            pruned.append(layer.name)
        return wrapped

    # The wrappers hold the copy's layers, trained weights included.
    return tf_keras.models.clone_model(copy, clone_function=wrap), pruned, left_dense


def strip_and_measure(pruned_model, layer_names):
    """strip_pruning, then the fraction of exact zeros in each pruned layer's kernel.

    Returns (stripped_model, {layer: sparsity}, overall sparsity of those kernels).
    """
    stripped = sparsity.strip_pruning(pruned_model)
    return (stripped, *measure_sparsity(stripped, layer_names))


def measure_sparsity(model, layer_names):
    """({layer: fraction of exact zeros in its kernel}, the same over all those kernels)."""
    per_layer, zeros, total = {}, 0, 0
    for layer in model.layers:
        if layer.name in layer_names:
            kernel = layer.get_weights()[0]
            per_layer[layer.name] = float(np.mean(kernel == 0))
            zeros += int(np.sum(kernel == 0))
            total += kernel.size
    return per_layer, zeros / max(total, 1)


def cluster_model(model, layer_names, clusters):
    """Wraps a copy of `model` for sparsity-preserving weight clustering (tfmot).

    Each kernel in `layer_names` keeps its zeros and shares `clusters` distinct
    non-zero values after fine-tuning and strip_clustering: gzip and TFLite's
    int8 weights then need a few bits per kept weight instead of a full byte.
    """
    check_tf_keras_model(model)
    clustering = tfmot.clustering.keras
    copy = tf_keras.models.clone_model(model)
    copy.set_weights(model.get_weights())

    def wrap(layer):
        if layer.name not in layer_names:
            return layer
        return clustering.cluster_weights(
            layer, number_of_clusters=clusters, preserve_sparsity=True,
            cluster_centroids_init=clustering.CentroidInitialization.KMEANS_PLUS_PLUS)

    return tf_keras.models.clone_model(copy, clone_function=wrap)


# --- training ------------------------------------------------------------------

def make_dataset(x, y, batch_size, seed, training):
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True).repeat()
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def train(model, loss, data, epochs, batch_size, learning_rate, steps_per_epoch, seed,
          callbacks):
    """Compiles and fits `model`; raises FloatingPointError when the loss is not finite."""
    (x_train, y_train), (x_val, y_val) = data
    steps_per_epoch = steps_per_epoch or math.ceil(len(x_train) / batch_size)
    model.compile(optimizer=tf_keras.optimizers.Adam(learning_rate), loss=loss,
                  metrics=["accuracy"])
    history = model.fit(make_dataset(x_train, y_train, batch_size, seed, training=True),
                        validation_data=make_dataset(x_val, y_val, batch_size, seed, False),
                        epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=2,
                        callbacks=[tf_keras.callbacks.TerminateOnNaN(), *callbacks])
    final_loss = history.history["loss"][-1]
    if not np.isfinite(final_loss) or len(history.history["loss"]) < epochs:
        raise FloatingPointError(f"training loss became {final_loss}; lower --learning_rate "
                                 "or --finetune_learning_rate")
    return history


def accuracy(model, x, y, batch_size=512):
    """Fraction of correct predictions (argmax of logits, or sigmoid > 0.5)."""
    out = model.predict(x, batch_size=batch_size, verbose=0)
    predicted = (out[:, 0] > 0.5).astype(np.int64) if out.shape[-1] == 1 else out.argmax(-1)
    return float(np.mean(predicted == np.asarray(y).astype(np.int64)))


def log_final_sparsity(log_dir, pruned_model, step):
    """What PruningSummaries misses: it writes at epoch starts, never after the last step."""
    writer = tf.summary.create_file_writer(os.path.join(log_dir, "metrics"))
    with writer.as_default():
        for layer in pruned_model.layers:
            for _, mask, threshold in getattr(layer, "pruning_vars", ()):
                tf.summary.scalar(mask.name + "/sparsity", 1 - float(np.mean(mask.numpy())),
                                  step=step)
                tf.summary.scalar(threshold.name + "/threshold", float(threshold.numpy()),
                                  step=step)
    writer.close()


# --- export --------------------------------------------------------------------

def gzip_bytes(path_or_bytes):
    """Size after gzip -9: what a zipped download of the model costs."""
    raw = path_or_bytes if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb").read()
    return len(gzip.compress(raw, compresslevel=9, mtime=0))


def save_h5(model, path):
    """tf_keras .h5 without the optimizer (whose slots are dense and would hide the zeros)."""
    with warnings.catch_warnings():  # "HDF5 is legacy": it is what the tfmot guide measures
        warnings.simplefilter("ignore", UserWarning)
        write_atomically(path, lambda partial: model.save(partial, include_optimizer=False))
    return gzip_bytes(path)


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def to_tflite(model, quantize):
    """A TFLite flatbuffer; quantize=True adds dynamic-range (int8 weight) quantization."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


def reload_matches(path, model, x, atol=1e-5):
    """Reloads the exported .h5 and compares its predictions with the in-memory model."""
    reloaded = tf_keras.models.load_model(path, compile=False)
    expected = model.predict(x, verbose=0)
    got = reloaded.predict(x, verbose=0)
    max_diff = float(np.max(np.abs(expected - got)))
    return max_diff <= atol, max_diff


# --- the run -------------------------------------------------------------------

def pruning_steps(config, n_train):
    """(steps per epoch, end_step, frequency) of the fine-tuning; ValueError if they clash."""
    steps = config.steps_per_epoch or math.ceil(n_train / config.batch_size)
    end_step = config.end_step or steps * config.epochs
    if end_step <= config.begin_step:
        raise ValueError(f"--begin_step ({config.begin_step}) must be before the end of "
                         f"pruning (step {end_step}); lower it or raise --epochs")
    frequency = config.frequency or default_frequency(config.begin_step, end_step)
    if config.schedule == "polynomial" and (end_step - config.begin_step) % frequency:
        raise ValueError(f"--end_step - --begin_step ({end_step - config.begin_step}) must be a "
                         f"multiple of --frequency ({frequency}), or the final sparsity is "
                         "never applied")
    return steps, end_step, frequency


def prune_and_finetune(baseline, loss, data, config, final_sparsity, log_dir):
    """Prunes a copy of `baseline` to `final_sparsity`, fine-tunes, strips; returns results."""
    (x_train, _), (x_val, y_val) = data
    steps, end_step, frequency = pruning_steps(config, len(x_train))
    schedule = make_schedule(config.schedule, min(config.initial_sparsity, final_sparsity),
                             final_sparsity, config.begin_step, end_step, frequency)
    model, pruned_names, left_dense = prune_model(
        baseline, schedule, config.block_size, config.sparsity_m_by_n, config.prune_layers)
    for name, why in left_dense.items():
        print(f"left dense: {name} ({why})")
    if not pruned_names:
        raise ValueError("no layer was pruned: check --prune_layers and the layers listed above")
    amount = (f"{config.sparsity_m_by_n[0]}:{config.sparsity_m_by_n[1]}" if config.sparsity_m_by_n
              else f"{final_sparsity:.0%}")
    print(f"pruning {', '.join(pruned_names)} to {amount} "
          f"({config.schedule}, steps {config.begin_step}..{end_step} every {frequency})")
    train(model, loss, data, config.epochs, config.batch_size, config.finetune_learning_rate,
          steps, config.seed,
          [sparsity.UpdatePruningStep(), sparsity.PruningSummaries(log_dir=log_dir)])
    log_final_sparsity(log_dir, model, step=int(model.optimizer.iterations.numpy()))
    stripped, per_layer, measured = strip_and_measure(model, pruned_names)
    if config.clusters:
        print(f"clustering {', '.join(pruned_names)} to {config.clusters} shared values "
              "(zeros kept), 1 epoch")
        clustered = cluster_model(stripped, pruned_names, config.clusters)
        train(clustered, loss, data, 1, config.batch_size, config.finetune_learning_rate / 10,
              steps, config.seed, [])
        stripped = tfmot.clustering.keras.strip_clustering(clustered)
        per_layer, measured = measure_sparsity(stripped, pruned_names)
    return {"model": stripped, "accuracy": accuracy(stripped, x_val, y_val),
            "per_layer": per_layer, "sparsity_measured": measured,
            "left_dense": left_dense, "end_step": end_step, "frequency": frequency}


def log_sweep(log_dir, rows):
    """One TensorBoard run whose x axis is the target sparsity in percent."""
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        for target, row in rows.items():
            step = round(100 * target)
            tf.summary.scalar("sweep/pruned_accuracy", row["accuracy"], step=step)
            tf.summary.scalar("sweep/gzip_bytes", row["gzip_bytes"], step=step)
            tf.summary.scalar("sweep/sparsity_measured", row["sparsity_measured"], step=step)
    writer.close()


def format_table(m, per_layer, targets):
    lines = [f"{'':<22} {'baseline':>10} {'pruned':>10}",
             f"{'accuracy':<22} {m['baseline_accuracy']:>10.4f} {m['pruned_accuracy']:>10.4f}"
             f"   drop {100 * m['accuracy_drop']:.2f} points",
             f"{'sparsity':<22} {0.0:>10.3f} {m['sparsity_measured']:>10.3f}"
             f"   target {m['sparsity_target']:.3f}",
             f"{'.h5 gzip bytes':<22} {m['baseline_gzip_bytes']:>10,} {m['pruned_gzip_bytes']:>10,}"
             f"   {m['compression_ratio']:.2f}x smaller",
             f"{'TFLite gzip bytes':<22} {'':>10} {m['tflite_gzip_bytes']:>10,}",
             f"{'TFLite int8 gzip bytes':<22} {'':>10} {m['tflite_quant_gzip_bytes']:>10,}"
             f"   {m['tflite_quant_compression_ratio']:.2f}x smaller than the baseline .h5",
             "per-layer kernel sparsity: " + ", ".join(
                 f"{name} {value:.3f} (target {targets[name]:.3f})"
                 for name, value in per_layer.items())]
    return "\n".join(lines)


def check(config, data, model=None):
    """ValueError (one line) for input that cannot run: layer names, the pruning span, a
    model of yours (tfmot prunes tf_keras models; prune_model() takes yours directly)."""
    if model is not None:
        raise ValueError("--model=FILE: tfmot, which this recipe prunes with, needs a tf_keras "
                         "(Keras 2) model and cannot prune a Keras 3 one; --model=dense or conv "
                         "picks the recipe's own, and prune_model(your_tf_keras_model, ...) "
                         "prunes yours in Python")
    (x_train, y_train), _ = data
    model, _ = build_model(np.shape(x_train)[1:], int(np.max(y_train)) + 1, config.model)
    check_layer_names(model, config.prune_layers)
    pruning_steps(config, len(x_train))


def run(config, run_dir, data, model=None):
    """Trains a baseline, prunes a copy, exports both; returns flat metrics for metrics.json."""
    start = time.perf_counter()
    check(config, data, model)
    tf_keras.utils.set_random_seed(config.seed)
    (x_train, y_train), (x_val, y_val) = data
    num_classes = int(np.max(y_train)) + 1
    baseline, loss = build_model(x_train.shape[1:], num_classes, config.model)
    steps, _, _ = pruning_steps(config, len(x_train))
    print(f"== baseline: {config.model} model, {baseline.count_params():,} weights ==")
    train(baseline, loss, data, config.baseline_epochs, config.batch_size, config.learning_rate,
          steps, config.seed,
          [tf_keras.callbacks.TensorBoard(log_dir=os.path.join(run_dir, "baseline"))])
    baseline_accuracy = accuracy(baseline, x_val, y_val)
    baseline_path = os.path.join(run_dir, "baseline.h5")
    baseline_gzip = save_h5(baseline, baseline_path)

    print(f"\n== pruning to {config.final_sparsity:.0%} ==")
    result = prune_and_finetune(baseline, loss, data, config, config.final_sparsity,
                                os.path.join(run_dir, "pruned"))
    stripped = result["model"]
    pruned_path = os.path.join(run_dir, "pruned.h5")
    pruned_gzip = save_h5(stripped, pruned_path)
    reload_ok, reload_diff = reload_matches(pruned_path, stripped, x_val[:256])
    if not reload_ok:
        print(f"warning: the reloaded pruned.h5 differs from the in-memory model by {reload_diff}")
    tflite = {}
    for name, quantize in (("tflite", False), ("tflite_quant", True)):
        flatbuffer = to_tflite(stripped, quantize)
        write_atomically(os.path.join(run_dir, f"pruned{'_quant' if quantize else ''}.tflite"),
                         lambda partial: write_bytes(partial, flatbuffer))
        tflite[name] = gzip_bytes(flatbuffer)

    if config.sparsity_m_by_n is not None:
        target = config.sparsity_m_by_n[0] / config.sparsity_m_by_n[1]
    else:
        target = config.final_sparsity
    targets = {name: target for name in result["per_layer"]}
    metrics = {
        "baseline_accuracy": baseline_accuracy,
        "pruned_accuracy": result["accuracy"],
        "accuracy_drop": baseline_accuracy - result["accuracy"],
        "sparsity_target": target,
        "sparsity_measured": result["sparsity_measured"],
        "baseline_gzip_bytes": baseline_gzip,
        "pruned_gzip_bytes": pruned_gzip,
        "compression_ratio": baseline_gzip / pruned_gzip,
        "tflite_gzip_bytes": tflite["tflite"],
        "tflite_quant_gzip_bytes": tflite["tflite_quant"],
        "tflite_quant_compression_ratio": baseline_gzip / tflite["tflite_quant"],
        "reload_matches": reload_ok,
        "reload_max_abs_diff": reload_diff,
        "layers_pruned": len(result["per_layer"]),
        "layers_left_dense": len(result["left_dense"]),
        "pruning_end_step": result["end_step"],
        "pruning_frequency": result["frequency"],
        "clusters": config.clusters,
    }
    metrics.update({f"sparsity_{name}": value for name, value in result["per_layer"].items()})
    writer = tf.summary.create_file_writer(os.path.join(run_dir, "summary"))
    with writer.as_default():
        for key in ("baseline_accuracy", "pruned_accuracy", "sparsity_measured",
                    "baseline_gzip_bytes", "pruned_gzip_bytes", "tflite_quant_gzip_bytes"):
            tf.summary.scalar(f"summary/{key}", metrics[key], step=0)
    writer.close()
    print("\n" + format_table(metrics, result["per_layer"], targets))

    if config.sweep:
        rows = {}
        for target in config.sweep:
            if math.isclose(target, config.final_sparsity) and config.sparsity_m_by_n is None:
                rows[target] = {**result, "gzip_bytes": pruned_gzip}
                continue
            print(f"\n== sweep: pruning to {target:.0%} ==")
            row = prune_and_finetune(baseline, loss, data, config, target,
                                     os.path.join(run_dir, f"sweep_{round(100 * target)}"))
            row["gzip_bytes"] = save_h5(row["model"], os.path.join(
                run_dir, f"sweep_{round(100 * target)}.h5"))
            rows[target] = row
        log_sweep(os.path.join(run_dir, "sweep"), rows)
        print(f"\n{'target':>7} {'measured':>9} {'accuracy':>9} {'drop pts':>9} "
              f"{'gzip bytes':>11} {'ratio':>6}")
        for target, row in rows.items():
            print(f"{target:>7.2f} {row['sparsity_measured']:>9.3f} {row['accuracy']:>9.4f} "
                  f"{100 * (baseline_accuracy - row['accuracy']):>9.2f} "
                  f"{row['gzip_bytes']:>11,} {baseline_gzip / row['gzip_bytes']:>6.2f}")
            key = round(100 * target)
            metrics[f"sweep_accuracy_s{key}"] = row["accuracy"]
            metrics[f"sweep_gzip_bytes_s{key}"] = row["gzip_bytes"]
            metrics[f"sweep_sparsity_measured_s{key}"] = row["sparsity_measured"]
    metrics["wall_time_s"] = time.perf_counter() - start
    return metrics


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
