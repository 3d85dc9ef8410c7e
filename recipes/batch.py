"""Batch size vs throughput and accuracy.

Shows: the same classifier trained from the same initial weights at each batch
size in a sweep. Bigger batches keep an accelerator busy (more examples per
second) but take fewer optimizer steps per epoch, so accuracy after a fixed
number of epochs can fall; scaling the learning rate linearly with the batch
size (--scale_lr) is the usual remedy. The recipe measures both sides and
picks the fastest batch size whose accuracy stays within a tolerance of the
best.
Run:    python main.py --recipe=batch --batch_sizes=32,64,128,256,512
Expect: on the default shapes data (6,000 28x28 images, 2 CPU cores, ~20 s), measured:
          batch   examples/s  val_acc        with --scale_lr: lr    val_acc
             32       10,200   0.956                         1e-3   0.956
             64       25,100   0.955                         2e-3   0.962
            128       34,600   0.891                         4e-3   0.972
            256       57,100   0.876                         8e-3   0.941
            512       76,000   0.857                       1.6e-2   0.865
        (examples/s = batch / median step, which moves by 10-20% between
        runs on shared cores.) Throughput rises 7x from 32 to 512 while
        accuracy after 5 epochs falls 10 points (fewer optimizer steps), so
        the pick is 64 (the
        fastest within 1 point of the best). Linear scaling wins those points
        back up to 128 (the pick becomes 128 at 0.972), but past 4e-3 Adam
        overshoots on this MLP: the rule needs a warm-up or a cap with Adam,
        which is why it is off by default. TensorBoard shows one run per
        batch size and a `sweep` run with throughput and accuracy plotted
        against batch size.
Copy:   this file alone works in any project with tensorflow and keras:
        run(Config(), "logs", ((x_train, y_train), (x_val, y_val)),
        model=your_model) sweeps your keras.Model (copies of it, from its
        weights; a builder fn(input_shape, num_classes) works too; leave it
        out for the recipe's classifier); add
        strategy=tf.distribute.MirroredStrategy() for several GPUs (batch
        sizes are then per replica). Running it again on the same folder
        continues a killed sweep from its last finished epoch.
"""
import contextlib
import dataclasses
import glob
import json
import os
import shutil
import socket
import time

import keras
import numpy as np
import tensorflow as tf

# What main.py feeds this recipe: arrays of 28x28 gray images by default.
DATA = {"form": "arrays", "image_size": 28, "channels": 1}
RESUMABLE = True  # per-epoch checkpoints: main.py's --resume continues a killed sweep
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


def make_dataset(x, y, batch_size, seed, shuffle=True, repeat=False):
    """An in-memory tf.data pipeline; full batches only, so every step is comparable.

    Under a multi-worker strategy each worker takes its share of every batch
    (sharding by data: an in-memory source has no files to shard by).
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    ds = tf.data.Dataset.from_tensor_slices((x, y)).with_options(options)
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    batch_size = min(batch_size, len(x))
    ds = ds.batch(batch_size, drop_remainder=True)
    if repeat:
        ds = ds.repeat()
    return ds.prefetch(tf.data.AUTOTUNE)


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
    A checkpoint left by a killed run of the same folder is continued.
    """
    (x_train, y_train), (x_val, y_val) = data
    global_batch = min(batch_size * replica_count(strategy), len(x_train))
    log_dir = os.path.join(run_dir, f"batch_{batch_size}")
    train_ds = make_dataset(x_train, y_train, global_batch, config.seed,
                            repeat=config.steps_per_epoch is not None)
    val_ds = make_dataset(x_val, y_val, global_batch, config.seed, shuffle=False)
    checkpoint_dir = os.path.join(run_dir, "checkpoints", f"batch_{batch_size}")
    checkpoint, saved = latest_checkpoint(checkpoint_dir)
    start = time.perf_counter()
    timer = StepTimer()
    timer.seconds = list(saved["state"].get("step_seconds", []))  # the killed run's steps count
    with distribution_scope(strategy):
        model, loss, metrics = make_model()
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss,
                      metrics=metrics)
        if checkpoint:
            print(f"Resuming batch size {batch_size} after epoch {saved['epochs_done']} "
                  f"from {checkpoint}")
            restore(model, checkpoint)
        history = fit(
            model, train_ds, validation_data=val_ds, epochs=config.epochs,
            initial_epoch=saved["epochs_done"], steps_per_epoch=config.steps_per_epoch,
            shuffle=False,  # make_dataset shuffles; fit's own flag only warns for tf.data
            verbose=2, callbacks=[
                timer, keras.callbacks.TerminateOnNaN(),
                keras.callbacks.TensorBoard(log_dir=log_dir),
                EpochCheckpoint(checkpoint_dir, lambda: {"step_seconds": timer.seconds})])
    logs = final_logs(history, saved)
    check_finite(logs["loss"], batch_size, learning_rate)
    write_atomically(os.path.join(log_dir, "model.keras"), model.save)
    steps = config.steps_per_epoch or len(x_train) // global_batch
    # Custom Scalars: examples/s per epoch, a line per batch size
    log_per_epoch(log_dir, "batch/epoch_examples_per_sec", [
        global_batch / float(np.median(timer.seconds[i:i + steps]))
        for i in range(0, len(timer.seconds), steps)])
    return {**throughput(timer.seconds, global_batch, config.warmup_steps),
            "val_loss": logs["val_loss"], "val_accuracy": logs["val_accuracy"],
            "learning_rate": learning_rate, "wall_time_s": time.perf_counter() - start}


def pick_best(results, tolerance):
    """The fastest batch size whose val accuracy is within `tolerance` of the best."""
    top = max(r["val_accuracy"] for r in results.values())
    good = [b for b, r in results.items() if r["val_accuracy"] >= top - tolerance]
    return max(good, key=lambda b: results[b]["examples_per_sec"])


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


def format_table(results, best):
    lines = [f"{'batch':>6} {'lr':>9} {'examples/s':>11} {'p50 ms':>8} {'p90 ms':>8} "
             f"{'val_acc':>8} {'val_loss':>9} {'wall s':>7}"]
    for b, r in results.items():
        lines.append(f"{b:>6} {r['learning_rate']:>9.2e} {r['examples_per_sec']:>11.0f} "
                     f"{r['step_time_ms_p50']:>8.2f} {r['step_time_ms_p90']:>8.2f} "
                     f"{r['val_accuracy']:>8.4f} {r['val_loss']:>9.4f} {r['wall_time_s']:>7.1f}"
                     + ("  <- best" if b == best else ""))
    return "\n".join(lines)


def num_classes_of(data):
    (_, y_train), (_, y_val) = data
    return int(max(np.max(y_train), np.max(y_val))) + 1


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
        lr = config.learning_rate * (batch_size / config.base_batch_size if config.scale_lr else 1)
        lr *= replicas if config.scale_lr_with_replicas else 1
        print(f"\n== batch size {batch_size} x {replicas} replica(s) (learning rate {lr:.2e}) ==")
        results[batch_size] = train_at_batch_size(make_model, data, batch_size, lr, config,
                                                  run_dir, strategy, fit)
        os.makedirs(os.path.dirname(result_file), exist_ok=True)
        write_atomically(result_file, lambda partial: save_json(partial, results[batch_size]))
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)  # the sweep is done
    best = pick_best(results, config.accuracy_tolerance)
    log_sweep(os.path.join(run_dir, "sweep"), results)
    table = format_table(results, best)
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
