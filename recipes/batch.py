"""Batch size vs throughput and accuracy.

Shows: the same classifier trained from the same initial weights at each batch
size in a sweep. Bigger batches keep an accelerator busy (more examples per
second) but take fewer optimizer steps per epoch, so accuracy after a fixed
number of epochs can fall; scaling the learning rate linearly with the batch
size (--scale_lr) is the usual remedy. The recipe measures both sides and
picks the fastest batch size whose accuracy stays within a tolerance of the
best.
Run:    python main.py --recipe=batch --batch_sizes=32,64,128,256,512
Expect: on the default shapes data (6,000 28x28 images, 2 CPU cores), examples/s
        rises several-fold from batch 32 to 512 while validation accuracy after
        5 epochs drops a few points; with --scale_lr the large batches recover
        most of it. TensorBoard shows one run per batch size and a `sweep` run
        with throughput and accuracy plotted against batch size.
Copy:   this file alone works in any project with tensorflow and keras:
        run(Config(), "logs", ((x_train, y_train), (x_val, y_val))).
"""
import dataclasses
import os
import time

import keras
import numpy as np
import tensorflow as tf

# What main.py feeds this recipe: arrays of 28x28 gray images by default.
DATA = {"form": "arrays", "image_size": 28, "channels": 1}
DEFAULT_DATASET = "shapes"
HEADLINE = ("best_batch_size", "best_examples_per_sec", "best_val_accuracy",
            "throughput_ratio_largest_vs_smallest", "wall_time_s")


@dataclasses.dataclass
class Config:
    batch_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # batch sizes to sweep, in order
    epochs: int = 5  # epochs per batch size (the same for all, as a user would compare)
    learning_rate: float = 1e-3  # Adam learning rate at base_batch_size
    scale_lr: bool = False  # scale the learning rate linearly: lr * batch / base_batch_size
    base_batch_size: int = 32  # the batch size that learning_rate is tuned for
    warmup_steps: int = 5  # first steps left out of throughput (they trace and compile)
    accuracy_tolerance: float = 0.01  # best batch: the fastest within this of the best val accuracy
    steps_per_epoch: int | None = None  # optional cap on steps per epoch
    seed: int = 0  # initial weights and shuffling

    def __post_init__(self):
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"--batch_sizes must be positive integers, got {self.batch_sizes}")
        if self.epochs < 1 or self.base_batch_size < 1 or self.warmup_steps < 0:
            raise ValueError("--epochs and --base_batch_size must be >= 1, --warmup_steps >= 0")
        if self.learning_rate <= 0 or not 0 <= self.accuracy_tolerance <= 1:
            raise ValueError("--learning_rate must be > 0 and --accuracy_tolerance in [0, 1]")


def build_model(input_shape, num_classes):
    """Flatten -> Dense(128, relu) -> Dense(1, sigmoid) for two classes, else Dense(classes)."""
    binary = num_classes <= 2
    model = keras.Sequential([
        keras.Input(shape=input_shape),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(1, activation="sigmoid") if binary else keras.layers.Dense(num_classes),
    ])
    loss = (keras.losses.BinaryCrossentropy() if binary
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, loss


def make_dataset(x, y, batch_size, seed, shuffle=True, repeat=False):
    """An in-memory tf.data pipeline; full batches only, so every step is comparable."""
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    batch_size = min(batch_size, len(x))
    ds = ds.batch(batch_size, drop_remainder=True)
    if repeat:
        ds = ds.repeat()
    return ds.prefetch(tf.data.AUTOTUNE)


class StepTimer(keras.callbacks.Callback):
    """Seconds per training step, as seen from fit (data fetch included)."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def throughput(step_seconds, batch_size, warmup_steps):
    """examples/s and step-time percentiles, skipping warm-up steps when enough remain."""
    steady = step_seconds[warmup_steps:] if len(step_seconds) > warmup_steps else step_seconds[1:]
    steady = np.asarray(steady or step_seconds)
    return {"examples_per_sec": batch_size * len(steady) / steady.sum(),
            "step_time_ms_p50": 1000 * float(np.percentile(steady, 50)),
            "step_time_ms_p90": 1000 * float(np.percentile(steady, 90))}


def train_at_batch_size(initial_weights, input_shape, num_classes, data, batch_size,
                        learning_rate, config, log_dir):
    """Trains a fresh copy of the model from `initial_weights`; returns its measurements."""
    (x_train, y_train), (x_val, y_val) = data
    model, loss = build_model(input_shape, num_classes)
    model.set_weights(initial_weights)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=["accuracy"])
    timer = StepTimer()
    start = time.perf_counter()
    history = model.fit(
        make_dataset(x_train, y_train, batch_size, config.seed,
                     repeat=config.steps_per_epoch is not None),
        validation_data=make_dataset(x_val, y_val, batch_size, config.seed, shuffle=False),
        epochs=config.epochs, steps_per_epoch=config.steps_per_epoch, verbose=2,
        callbacks=[timer, keras.callbacks.TerminateOnNaN(),
                   keras.callbacks.TensorBoard(log_dir=log_dir)])
    wall = time.perf_counter() - start
    final_loss = history.history["loss"][-1]
    if not np.isfinite(final_loss):
        raise FloatingPointError(f"training loss became {final_loss} at batch size {batch_size} "
                                 f"(learning rate {learning_rate:g}); lower --learning_rate")
    return {**throughput(timer.seconds, min(batch_size, len(x_train)), config.warmup_steps),
            "val_loss": history.history["val_loss"][-1],
            "val_accuracy": history.history["val_accuracy"][-1],
            "learning_rate": learning_rate, "wall_time_s": wall}


def pick_best(results, tolerance):
    """The fastest batch size whose val accuracy is within `tolerance` of the best."""
    top = max(r["val_accuracy"] for r in results.values())
    good = [b for b, r in results.items() if r["val_accuracy"] >= top - tolerance]
    return max(good, key=lambda b: results[b]["examples_per_sec"])


def log_sweep(log_dir, results):
    """One TensorBoard run whose x axis is the batch size."""
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        for batch_size, r in results.items():
            for key in ("examples_per_sec", "val_accuracy", "val_loss", "step_time_ms_p50"):
                tf.summary.scalar(f"sweep/{key}", r[key], step=batch_size)
    writer.close()


def format_table(results, best):
    lines = [f"{'batch':>6} {'lr':>9} {'examples/s':>11} {'p50 ms':>8} {'p90 ms':>8} "
             f"{'val_acc':>8} {'val_loss':>9} {'wall s':>7}"]
    for b, r in results.items():
        lines.append(f"{b:>6} {r['learning_rate']:>9.2e} {r['examples_per_sec']:>11.0f} "
                     f"{r['step_time_ms_p50']:>8.2f} {r['step_time_ms_p90']:>8.2f} "
                     f"{r['val_accuracy']:>8.4f} {r['val_loss']:>9.4f} {r['wall_time_s']:>7.1f}"
                     + ("  <- best" if b == best else ""))
    return "\n".join(lines)


def run(config, run_dir, data):
    """Sweeps the batch sizes; returns flat metrics for metrics.json."""
    start = time.perf_counter()
    keras.utils.set_random_seed(config.seed)
    (x_train, y_train), _ = data
    num_classes = int(np.max(y_train)) + 1
    model, _ = build_model(x_train.shape[1:], num_classes)
    initial_weights = model.get_weights()
    results = {}
    for batch_size in config.batch_sizes:
        lr = config.learning_rate * (batch_size / config.base_batch_size if config.scale_lr else 1)
        print(f"\n== batch size {batch_size} (learning rate {lr:.2e}) ==")
        results[batch_size] = train_at_batch_size(
            initial_weights, x_train.shape[1:], num_classes, data, batch_size, lr, config,
            os.path.join(run_dir, f"batch_{batch_size}"))
    best = pick_best(results, config.accuracy_tolerance)
    log_sweep(os.path.join(run_dir, "sweep"), results)
    print("\n" + format_table(results, best))
    metrics = {f"{key}_b{b}": value for b, r in results.items() for key, value in r.items()}
    smallest, largest = min(results), max(results)
    metrics.update(
        best_batch_size=best,
        best_examples_per_sec=results[best]["examples_per_sec"],
        best_val_accuracy=results[best]["val_accuracy"],
        throughput_ratio_largest_vs_smallest=(results[largest]["examples_per_sec"]
                                              / results[smallest]["examples_per_sec"]),
        wall_time_s=time.perf_counter() - start)
    return metrics
