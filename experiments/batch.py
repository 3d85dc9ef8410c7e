"""Batch size vs throughput and accuracy.

Shows: the same classifier trained from the same initial weights at each batch
size in a sweep. Bigger batches keep an accelerator busy (more examples per
second) but take fewer optimizer steps per epoch, so accuracy after a fixed
number of epochs can fall; scaling the learning rate linearly with the batch
size (--scale_lr) is the usual remedy. The recipe measures both sides and
picks the fastest batch size whose accuracy stays within a tolerance of the
best.
Run:    python main.py --recipe=batch --batch_sizes=32,64,128,256,512
Expect: on the default shapes data (6,000 28x28 images, 2 CPU cores, ~9 s), measured:
          batch   examples/s  val_acc        with --scale_lr: lr    val_acc
             32       31,000   0.963                         1e-3   0.963
             64       56,600   0.967                         2e-3   0.971
            128       95,900   0.926                         4e-3   0.929
            256      147,200   0.921                         8e-3   0.922
            512      202,400   0.873                       1.6e-2   0.807
        (examples/s = batch / median step, which moves by 10-20% between
        runs on shared cores; batches are gathered whole from the arrays in an
        order drawn per pass, array_batches, ~2-3x the rate of tf.data's
        per-example shuffle it replaced.) Throughput rises 6.5x from 32 to 512
        while accuracy after 5 epochs falls 9 points (fewer optimizer steps),
        so the pick is 64 (the fastest within 1 point of the best). Linear
        scaling wins back less than a point here (the pick stays 64, at
        0.971), and past 4e-3 Adam overshoots on this MLP (0.807 at 1.6e-2):
        the rule needs a warm-up or a cap with Adam, which is why it is off by
        default. TensorBoard shows one run per
        batch size and a `sweep` run with throughput and accuracy plotted
        against batch size.
Copy:   recipes/batch.py is the drop-in file (sweep, pick_best, format_table: your
        compiled model, any backend, no tf.data). This experiment is called from this
        repository: experiments.batch.run(Config(), run_dir, ((x_train, y_train),
        (x_val, y_val)), model=your_model) sweeps your keras.Model (copies of it, from
        its weights; a builder fn(input_shape, num_classes) works too; leave it out for
        the experiment's classifier); add strategy=tf.distribute.MirroredStrategy() for
        several GPUs (batch sizes are then per replica). Running it again on the same
        folder continues a stopped sweep at the step its checkpoint holds.
"""
import dataclasses
import json
import os
import shutil
import time

import keras
import numpy as np

from experiments.files import save_json, write_atomically
from experiments.scale_out import (EpochCheckpoint, array_batches, distribution_scope,
                                   final_logs, fit_from, latest_checkpoint, position,
                                   replica_count, restore, validation_batches)
from experiments.tensorboard import (log_custom_scalars, log_hparams_trials, log_per_epoch,
                                     log_text_summary, scalar_pb, write_events)
from experiments.user_model import (classifier_loss, fresh_model, num_classes_of,
                                     save_with_users_loss, users_settings)
from recipes import batch
from recipes.step_timer import StepTimer, throughput

# What main.py feeds this recipe: arrays of 28x28 gray images by default.
DATA = {"form": "arrays", "image_size": 28, "channels": 1}
RESUMABLE = True  # checkpoints (epoch ends, every N steps, on SIGTERM): --resume continues
STRATEGIES = ("mirrored", "multi_worker", "data_parallel", "tpu")  # run(strategy=, fit=)
TAKES_MODEL = True  # run() takes model=: your keras.Model, swept instead of the classifier
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
    scale_lr_with_replicas: bool = True  # multiply the learning rate by the replica count
    steps_per_epoch: int | None = None  # optional cap on steps per epoch
    checkpoint_every_steps: int = 0  # also checkpoint every N steps within an epoch (0: auto)
    seed: int = 0  # initial weights and shuffling

    def __post_init__(self):
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"--batch_sizes must be positive integers, got {self.batch_sizes}")
        if self.epochs < 1 or self.base_batch_size < 1 or self.warmup_steps < 0:
            raise ValueError("--epochs and --base_batch_size must be >= 1, --warmup_steps >= 0")
        if self.learning_rate <= 0 or not 0 <= self.accuracy_tolerance <= 1:
            raise ValueError("--learning_rate must be > 0 and --accuracy_tolerance in [0, 1]")


# --- the sweep ---------------------------------------------------------------------------

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


def check_finite(loss, batch_size, learning_rate):
    if not np.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss} at batch size {batch_size} "
                                 f"(learning rate {learning_rate:g}); lower --learning_rate")


def model_maker(model, input_shape, num_classes):
    """(make, reference): make() returns (a fresh copy of the model, starting from the
    same weights at every call, its loss, its metrics); reference is the model copied.

    model: None (this recipe's classifier), a keras.Model (copied, never trained)
    or a builder fn(input_shape, num_classes), called once.
    """
    if model is None:
        reference, loss = build_model(input_shape, num_classes)
        return (lambda: (fresh_model(reference, input_shape, num_classes), loss,
                         ["accuracy"])), reference
    reference = model if isinstance(model, keras.Model) else model(input_shape, num_classes)
    print(f"your model: {reference.count_params():,} weights; loss: "
          f"{classifier_loss(reference, num_classes)[2]}")

    def make():  # metrics are stateful: new ones for every copy
        loss, metrics, _ = classifier_loss(reference, num_classes)
        return fresh_model(reference, input_shape, num_classes), loss, metrics
    return make, reference


def train_at_batch_size(make_model, data, batch_size, learning_rate, config, run_dir, strategy,
                        fit):
    """Trains a fresh copy of the model from make_model(); returns its measurements.

    `batch_size` is per replica; each step takes batch_size * replicas examples.
    A checkpoint left by a stopped or killed run of the same folder is continued at
    its step, with the batches that run would have read next (array_batches).
    """
    (x_train, y_train), (x_val, y_val) = data
    global_batch = min(batch_size * replica_count(strategy), len(x_train))
    steps = config.steps_per_epoch or len(x_train) // global_batch
    log_dir = os.path.join(run_dir, f"batch_{batch_size}")
    checkpoint_dir = os.path.join(run_dir, "checkpoints", f"batch_{batch_size}")
    checkpoint, saved = latest_checkpoint(checkpoint_dir)
    start = time.perf_counter()
    timer = StepTimer()
    timer.seconds = list(saved["state"].get("step_seconds", []))  # the killed run's steps count
    with distribution_scope(strategy):
        model, loss, metrics = make_model()
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss,
                      metrics=metrics, **users_settings(model, ("steps_per_execution",)))
        if checkpoint:
            print(f"Resuming batch size {batch_size} at "
                  f"{position(saved['epochs_done'], saved['step'], steps)} from {checkpoint}")
            restore(model, checkpoint)
        history = fit_from(
            fit, model, lambda epoch, step: {"x": array_batches(
                x_train, y_train, global_batch, config.seed, epoch * steps + step)},
            config.epochs, steps, saved, validation_data=validation_batches(
                x_val, y_val, global_batch),
            shuffle=False,  # array_batches shuffles; fit's own flag only warns for tf.data
            verbose=2, callbacks=[
                timer, keras.callbacks.TerminateOnNaN(),
                keras.callbacks.TensorBoard(log_dir=log_dir),
                EpochCheckpoint(checkpoint_dir, lambda: {"step_seconds": timer.seconds},
                                config.checkpoint_every_steps)])
    logs = final_logs(history, saved)
    check_finite(logs["loss"], batch_size, learning_rate)
    write_atomically(os.path.join(log_dir, "model.keras"),
                     lambda partial: save_with_users_loss(model, partial))
    # Custom Scalars: examples/s per epoch, a line per batch size
    log_per_epoch(log_dir, "batch/epoch_examples_per_sec", [
        global_batch / float(np.median(timer.seconds[i:i + steps]))
        for i in range(0, len(timer.seconds), steps)])
    return {**throughput(timer.seconds, global_batch, config.warmup_steps),
            "val_loss": logs["val_loss"], "val_accuracy": logs["val_accuracy"],
            "learning_rate": learning_rate, "wall_time_s": time.perf_counter() - start}


def log_sweep(log_dir, results):
    """One TensorBoard run whose x axis is the batch size."""
    write_events(log_dir, [
        (batch_size, scalar_pb(f"sweep/{key}", r[key])) for batch_size, r in results.items()
        for key in ("examples_per_sec", "val_accuracy", "val_loss", "step_time_ms_p50")])


def log_tensorboard(run_dir, results, table):
    """HParams: a trial per batch size; the table as the Text summary; a Custom Scalars
    chart of examples/s per epoch with a line per batch size."""
    log_hparams_trials(os.path.join(run_dir, "hparams"), "batch", {
        f"batch_{b}": ({"batch_size": b, "learning_rate": r["learning_rate"]},
                       {key: r[key] for key in ("examples_per_sec", "step_time_ms_p90",
                                                "val_accuracy")})
        for b, r in results.items()})
    log_text_summary(run_dir, table)
    log_custom_scalars(run_dir, "batch", {"examples/s per epoch, a line per batch size":
                                          [r"^batch/epoch_examples_per_sec$"]})


# The drop-in's table with the step-time percentiles after examples/s.
TABLE_COLUMNS = (*batch.COLUMNS[:2], ("step_time_ms_p50", "p50 ms", ">8.2f"),
                 ("step_time_ms_p90", "p90 ms", ">8.2f"), *batch.COLUMNS[2:])


def check(config, data, model=None):
    """ValueError (one line) when `model` cannot be trained on data's classes."""
    if isinstance(model, keras.Model):
        classifier_loss(model, num_classes_of(data))


def run(config, run_dir, data, strategy=None, fit=None, model=None):
    """Sweeps the batch sizes; returns flat metrics for metrics.json.

    `strategy`: a tf.distribute strategy, or on JAX a keras.distribution
    (DataParallel), or None for one device; batch sizes are per replica.
    `fit`: called like keras.Model.fit(model, dataset, ...) (the default); the
    CLI passes a strategy.run loop for MultiWorkerMirroredStrategy, where
    Keras' fit fails. Batch sizes already finished in `run_dir`
    (a resumed run) are read back instead of trained again. `model`: None for
    this recipe's classifier, your keras.Model (each batch size trains a copy
    from its weights; yours is never changed) or fn(input_shape, num_classes).
    """
    start = time.perf_counter()
    check(config, data, model)
    fit = fit or keras.Model.fit
    replicas = replica_count(strategy)
    keras.utils.set_random_seed(config.seed)
    (x_train, _), _ = data
    with distribution_scope(strategy):
        make_model, reference = model_maker(model, x_train.shape[1:], num_classes_of(data))
    results = {}
    for batch_size in config.batch_sizes:
        result_file = os.path.join(run_dir, f"batch_{batch_size}", "result.json")
        if os.path.exists(result_file):
            with open(result_file) as f:
                results[batch_size] = json.load(f)
            print(f"\n== batch size {batch_size}: finished in an earlier run, kept ==")
            continue
        lr = batch.scaled_learning_rate(config.learning_rate, batch_size, config.base_batch_size,
                                        config.scale_lr)
        lr *= replicas if config.scale_lr_with_replicas else 1
        print(f"\n== batch size {batch_size} x {replicas} replica(s) (learning rate {lr:.2e}) ==")
        results[batch_size] = train_at_batch_size(make_model, data, batch_size, lr, config,
                                                  run_dir, strategy, fit)
        os.makedirs(os.path.dirname(result_file), exist_ok=True)
        save_json(result_file, results[batch_size])
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)  # the sweep is done
    best = batch.pick_best(results, config.accuracy_tolerance)
    log_sweep(os.path.join(run_dir, "sweep"), results)
    table = batch.format_table(results, best, TABLE_COLUMNS)
    print("\n" + table)
    log_tensorboard(run_dir, results, table)
    metrics = {f"{key}_b{b}": value for b, r in results.items() for key, value in r.items()}
    smallest, largest = min(results), max(results)
    metrics.update(
        best_batch_size=best,
        best_model_file=os.path.join(run_dir, f"batch_{best}", "model.keras"),
        replicas=replicas,
        model_params=reference.count_params(),
        best_examples_per_sec=results[best]["examples_per_sec"],
        best_val_accuracy=results[best]["val_accuracy"],
        throughput_ratio_largest_vs_smallest=(results[largest]["examples_per_sec"]
                                              / results[smallest]["examples_per_sec"]),
        wall_time_s=time.perf_counter() - start)
    return metrics
