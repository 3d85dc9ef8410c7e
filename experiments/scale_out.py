"""Scale-out and resume for every experiment that takes --strategy and --resume.

strategy: a tf.distribute strategy, a keras.distribution.Distribution on JAX, or
None for one device. Under multi_worker every worker saves, since TensorFlow's
saving runs collective ops that all workers must join: give each its own run_dir
(main.py gives the others a temporary one).
"""
import contextlib
import functools
import glob
import json
import os
import signal
import sys
import time
import zipfile

import keras
import numpy as np

from experiments.errors import named_line, one_line
from experiments.files import save_json, write_atomically


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


# --- checkpoints, preemption and resuming at the exact step --------------------------------
#
# Spot machines, Kubernetes evictions and Slurm preemption send SIGTERM, then SIGKILL after a
# grace period. The CLI's handler (cli/runs.py) only sets STOP; the EpochCheckpoint in the
# running fit sees it at the end of the step in progress, saves there and raises Preempted,
# which main.py turns into exit 143 (130 for Ctrl-C). A SIGKILL loses the steps since the last
# checkpoint: one at each epoch's end, and one every --checkpoint_every_steps within an epoch
# (by default about every AUTO_EVERY_S seconds, never so often that saving takes more than
# COST_SHARE of the time: by default an epoch shorter than that spacing skips its save, the
# run's last epoch aside).

AUTO_EVERY_S = 30.0
COST_SHARE = 0.05
KEEP = 2  # checkpoints kept: the newest, and the one before it in case the newest is damaged
NOTHING_SAVED = {"epochs_done": 0, "step": 0, "partial": {}, "state": {}, "logs": {}}
SAVE_SECONDS = []  # what each checkpoint of this process took (benchmarks/preempt.py reads it)


class Stop:
    """What a signal asked for (set by the CLI's handler), read between two steps."""

    def __init__(self):
        self.signum = None  # the signal that asked for a stop, once one has
        self.training = 0  # fit_from calls running now: their checkpoint saves at the step's end


STOP = Stop()


class Preempted(BaseException):
    """A signal stopped training, and a checkpoint of where it stopped is saved.

    A BaseException, as KeyboardInterrupt is: no `except Exception` takes it for a failure.
    """

    def __init__(self, signum, where, checkpoint):
        super().__init__(f"{signal.Signals(signum).name} at {where}")
        self.signum, self.where, self.checkpoint = signum, where, checkpoint


def position(epochs_done, step, steps):
    """`epoch 3, step 412 of 1500`: where training stands, epochs counted from 1."""
    return f"epoch {epochs_done + 1}, step {step} of {steps}"


def checkpoint_name(epochs_done, step):
    """epoch_0002 after two epochs; epoch_0002_step_0000412 at step 412 of the third
    (names sort as the progress they hold)."""
    return f"epoch_{epochs_done:04d}" + (f"_step_{step:07d}" if step else "")


class EpochCheckpoint(keras.callbacks.Callback):
    """Checkpoints of a fit: the model with its optimizer, the position (epochs done and
    steps done in the next), the running means of that epoch's logs, and state(), the
    recipe's own (step timings, where a comparison stands, ...).

    Saved at each epoch's end; within an epoch every `every_steps` steps (0: about every
    AUTO_EVERY_S seconds, spaced at least 1/COST_SHARE times a save's own time apart, and
    an epoch's end that comes sooner than that after the last save is passed over);
    and at the end of the step in progress once STOP asks, after which it raises
    Preempted. The .json goes first, then the model to a temporary name renamed .keras,
    so a kill or a full disk at any moment leaves the previous pair whole (Keras'
    BackupAndRestore writes in place); the newest KEEP are kept. A failed write raises
    OSError saying the previous one is kept. Put it after the TensorBoard callback: the
    epoch's point is flushed to disk before the checkpoint that makes a resumed run skip
    that epoch. fit_from tells it where each fit starts, and which TensorBoard to flush.
    """

    def __init__(self, folder, state=None, every_steps=0):
        super().__init__()
        self.folder, self.state, self.every_steps = folder, state or dict, every_steps
        self.cost, self.epoch_logs = 0.0, {}
        self.tensorboards = []  # flushed before each save (fit_from gives them)
        self.saved_step, self.saved_at = None, time.monotonic()  # the last save's
        self.saved_path = None
        self.start(0, 0, None)

    def start(self, epoch, step, steps, partial=None, logs=None):
        """The next fit begins at `step` of `epoch` (from 0), `steps` steps per epoch;
        partial: the means of that epoch's logs over its first `step` steps."""
        self.epoch, self.first, self.step, self.steps = epoch, step, step, steps
        self.partial = dict(partial or {})
        self.epoch_logs = dict(logs or self.epoch_logs)
        if self.saved_step is None:  # the first fit: where it starts is saved already
            self.saved_step = self.global_step()

    def global_step(self):
        return self.epoch * (self.steps or 0) + self.step

    def on_epoch_begin(self, epoch, logs=None):
        if epoch != self.epoch:
            self.start(epoch, 0, self.steps)

    def on_train_batch_end(self, batch, logs=None):
        self.steps = self.steps or (self.params or {}).get("steps")
        self.step = self.first + batch + 1  # batch: the last of steps_per_execution
        if self.steps and self.step >= self.steps:
            return  # the epoch's end saves, after validation
        if self.every_steps:
            due = self.global_step() - self.saved_step >= self.every_steps
        else:
            due = time.monotonic() - self.saved_at >= max(AUTO_EVERY_S, self.cost / COST_SHARE)
        if due or STOP.signum is not None:
            path = self.save(self.epoch, self.step, self.means(logs))
            if STOP.signum is not None:
                raise Preempted(STOP.signum, position(self.epoch, self.step, self.steps), path)

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_logs = {k: float(v) for k, v in (logs or {}).items()}
        self.steps = self.steps or (self.params or {}).get("steps")
        path = None
        if STOP.signum is not None or self.epoch_end_due(epoch):
            path = self.save(epoch + 1, 0, {})
        self.start(epoch + 1, 0, self.steps)
        if STOP.signum is not None:
            raise Preempted(STOP.signum, position(epoch + 1, 0, self.steps), path)

    def epoch_end_due(self, epoch):
        """Every epoch's end saves, the run's last always; on the auto interval, an epoch
        ending less than a save's time / COST_SHARE after the last save is passed over
        (epochs of a fraction of a second: saving would take more than COST_SHARE)."""
        last = epoch + 1 >= (self.params or {}).get("epochs", epoch + 1)
        return (last or self.every_steps
                or time.monotonic() - self.saved_at >= self.cost / COST_SHARE)

    def means(self, logs):
        """The epoch's running means so far: this fit's steps joined to a resumed epoch's."""
        logs = {k: float(v) for k, v in (logs or {}).items()}
        if not self.first:
            return logs
        done = self.step - self.first
        return {k: (self.partial.get(k, v) * self.first + v * done) / self.step
                for k, v in logs.items()}

    def saved_at_epoch_end(self, epochs_done):
        """The checkpoint after `epochs_done` epochs: the last one saved, or saved now where
        that epoch's end passed its save over."""
        if self.saved_step != epochs_done * (self.steps or 0) or self.saved_path is None:
            return self.save(epochs_done, 0, {})
        return self.saved_path

    def save(self, epochs_done, step, partial):
        stem = os.path.join(self.folder, checkpoint_name(epochs_done, step))
        global_step = epochs_done * (self.steps or 0) + step
        payload = {"epochs_done": epochs_done, "step": step, "steps_per_epoch": self.steps,
                   "global_step": global_step, "partial": partial,
                   "state": self.state(), "logs": self.epoch_logs}
        getattr(self.model, "jax_state_sync", lambda: None)()  # JAX: the step's weights
        for board in self.tensorboards:  # what the checkpoint counts as done is on disk
            flush(board)
        start = time.perf_counter()
        try:
            os.makedirs(self.folder, exist_ok=True)
            save_json(stem + ".json", payload)
            write_atomically(stem + ".keras", self.model.save)
        except Exception as e:
            with contextlib.suppress(OSError):
                os.remove(stem + ".json")  # its model never made it
            kept = sorted(glob.glob(os.path.join(self.folder, "epoch_*.keras")))
            raise OSError(f"could not write the checkpoint {stem}.keras ({one_line(e)}); "
                          + (f"the previous one is kept ({kept[-1]})" if kept else
                             "no earlier checkpoint") + ": free space or make the folder "
                          "writable, then run the same command with --resume") from e
        self.cost = time.perf_counter() - start
        SAVE_SECONDS.append(self.cost)
        self.saved_step, self.saved_at = global_step, time.monotonic()
        self.saved_path = stem + ".keras"
        models = sorted(glob.glob(os.path.join(self.folder, "epoch_*.keras")))
        for older in models[:-KEEP]:
            os.remove(older)
        kept = {path[:-len(".keras")] for path in models[-KEEP:]} | {stem}
        for record in glob.glob(os.path.join(self.folder, "epoch_*.json")):
            if record[:-len(".json")] not in kept and record < stem + ".json":
                os.remove(record)  # an older pair's, or one whose model never made it
        return stem + ".keras"


def latest_checkpoint(folder):
    """(path, saved) of the newest whole checkpoint in folder, or (None, NOTHING_SAVED).

    saved: epochs_done, step (steps done in the next epoch), partial (that epoch's log
    means so far), state, logs (the last finished epoch's). A .keras whose .json is
    missing was cut short and is passed over; one whose .json or zip is damaged (a
    truncated copy, a bad disk) is renamed .damaged, with a one-line warning, and the
    one before it is taken. RuntimeError (one line) when every checkpoint is damaged.
    """
    damaged = []
    for path in sorted(glob.glob(os.path.join(folder, "epoch_*.keras")), reverse=True):
        stem = path[:-len(".keras")]
        if not os.path.exists(stem + ".json"):
            continue
        try:
            with open(stem + ".json") as f:
                saved = json.load(f)
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad:
                raise ValueError(f"{bad} fails its CRC check")
        except Exception as e:  # noqa: BLE001  (any damage reads as damage)
            damaged.append((path, named_line(e)))
            with contextlib.suppress(OSError):
                os.replace(path, path + ".damaged")  # never the newest again
            continue
        for bad_path, why in damaged:
            print(f"warning: checkpoint {bad_path} is damaged ({why}); resuming from the one "
                  f"before it, {os.path.basename(path)}", file=sys.stderr, flush=True)
        return path, {**NOTHING_SAVED, **saved}
    if damaged:
        raise RuntimeError(f"every checkpoint in {folder} is damaged ({damaged[0][1]}): leave "
                           "out --resume to start anew")
    return None, dict(NOTHING_SAVED)


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


class FitSpan(keras.callbacks.Callback):
    """First among the callbacks of one of fit_from's fits: a resumed epoch's logs become
    the means over all its steps, those before the stop included, before TensorBoard and
    the checkpoint read them; and fit stops after epoch `last` (from 0), so that its
    progress lines count the run's epochs ("Epoch 3/5") however its fits are split."""

    def __init__(self, epoch, step, steps, partial, last):
        super().__init__()
        self.epoch, self.step, self.steps, self.partial = epoch, step, steps, partial
        self.last, self.ended = last, False

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch and self.step and logs is not None:
            for key in [k for k in logs if k in self.partial and not k.startswith("val_")]:
                logs[key] = ((self.partial[key] * self.step + float(logs[key])
                              * (self.steps - self.step)) / self.steps)
        if epoch == self.last and not self.model.stop_training:
            self.model.stop_training = self.ended = True


def fit_from(fit, model, data_at, epochs, steps, saved, callbacks, per_epoch=False, until=None,
             **kwargs):
    """Trains from where `saved` (latest_checkpoint's) stands up to epoch `until` (default:
    `epochs`, the run's total): the rest of its epoch, then the epochs after it. Returns
    a History of all the epochs trained.

    data_at(epoch, step) -> fit's data arguments ({"x": ...} or {"x", "y", "batch_size"})
    giving the batches an uninterrupted run reads from that step of that epoch on, in the
    same order: an endless tf.data pipeline (array_batches), or, with per_epoch, that
    epoch's arrays alone, fit once per epoch. `fit` is called like keras.Model.fit, with
    kwargs (validation_data, verbose, ...). The EpochCheckpoint among `callbacks` is told
    where each fit starts; while this runs, a signal (STOP) waits for the step in progress.
    """
    epoch, step, partial = saved["epochs_done"], saved.get("step", 0), saved.get("partial", {})
    until = min(until or epochs, epochs)
    checkpoints = [c for c in callbacks if isinstance(c, EpochCheckpoint)]
    boards = [b for b in callbacks if isinstance(b, keras.callbacks.TensorBoard)]
    for board in boards:  # one event file per split across all the fits (see keep_writers)
        board.set_model = functools.partial(keep_writers, board)
        board._close_writers = functools.partial(flush, board)
    history = keras.callbacks.History()
    STOP.training += 1
    try:
        while epoch < until:
            last = epoch + 1 if step or per_epoch else until
            for c in checkpoints:
                c.start(epoch, step, steps, partial, saved.get("logs"))
                c.tensorboards = boards
            span = FitSpan(epoch, step, steps, partial, last - 1)
            done = fit(model, **data_at(epoch, step), epochs=epochs, initial_epoch=epoch,
                       **({} if per_epoch else {"steps_per_epoch": steps - step}),
                       callbacks=[span, *callbacks], **kwargs)
            for key, values in (getattr(done, "history", None) or {}).items():
                history.history.setdefault(key, []).extend(values)
            epoch, step, partial = last, 0, {}
            if model.stop_training and not span.ended:  # TerminateOnNaN, early stopping
                break
            if STOP.signum is not None:  # it came after the epoch's end
                raise Preempted(STOP.signum, position(epoch, 0, steps),
                                checkpoints[0].saved_at_epoch_end(epoch) if checkpoints
                                else None)
    finally:
        STOP.training -= 1
        for board in boards:  # the points written so far reach the disk
            del board.set_model, board._close_writers
            with contextlib.suppress(Exception):
                flush(board)
    return history


def keep_writers(board, model):
    """keras.callbacks.TensorBoard.set_model, keeping the writers it already has open.

    Keras makes new writers at every fit (set_model) and closes them at its end. A run
    split into several fits (per epoch, or resumed mid-epoch) would then write a file per
    fit, and TensorBoard reads a folder's files in name order, where one process's
    ...12.v2 sorts before its ...2.v2 written in the same second: steps out of order.
    """
    if not (getattr(board, "_writers", None) and board.model is model):
        type(board).set_model(board, model)  # else: the same model, its writers and graph kept


def flush(board, logs=None):
    """Writes out what a keras.callbacks.TensorBoard has logged so far."""
    for writer in getattr(board, "_writers", {}).values():
        writer.flush()


def array_batches(x, y, batch_size, seed, first_step=0):
    """tf.data: full batches of in-memory (x, y), endless, from global step first_step on.

    Pass p over the data reads it in the order stateless_shuffle draws from (seed, p),
    so step s's batch is the same in every run: a resumed run starts at the exact batch
    (nothing is read to skip the steps already done). Each pass drops its last partial
    batch; an epoch of n // batch_size steps is one pass, a --steps_per_epoch cap runs on
    across passes. Sharded by data under multi_worker (each worker takes its share of
    every batch: an in-memory source has no files to shard by).
    """
    import tensorflow as tf  # only here: the drop-in files and JAX runs need none
    n = len(x)
    batch_size = min(batch_size, n)
    per_pass = n // batch_size
    first_pass, skip = divmod(int(first_step), per_pass)
    # Tensors made here are captured by the map below as its inputs: a NumPy array would be
    # written into its graph as a constant, which takes seconds per 100 MB.
    x, y = tf.convert_to_tensor(x), tf.convert_to_tensor(y)

    def one_pass(p):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), p]))
        return tf.data.Dataset.from_tensor_slices(order[:per_pass * batch_size]).batch(batch_size)

    indices = tf.data.Dataset.range(first_pass, sys.maxsize).flat_map(one_pass).skip(skip)
    return by_data(indices.map(lambda i: (tf.gather(x, i), tf.gather(y, i)))).prefetch(
        tf.data.AUTOTUNE)


def validation_batches(x, y, batch_size):
    """tf.data: in-memory (x, y) in order, the last batch short, sharded by data as
    array_batches' training batches are."""
    import tensorflow as tf
    return by_data(tf.data.Dataset.from_tensor_slices((x, y))).batch(
        min(batch_size, len(x))).prefetch(tf.data.AUTOTUNE)


def by_data(ds):
    """`ds` sharded by data under multi_worker: each worker takes its share of every batch
    (an in-memory source has no files to shard by)."""
    import tensorflow as tf
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def fit_by_strategy_run(model, x=None, y=None, batch_size=None, epochs=1, verbose="auto",
                        callbacks=None, validation_data=None, shuffle=True, initial_epoch=0,
                        steps_per_epoch=None):
    """keras.Model.fit for MultiWorkerMirroredStrategy, with the same arguments and result.

    Keras 3's fit fails under MultiWorkerMirroredStrategy ("Attempt to convert a
    value (PerReplica...)", keras-team/keras#20585, reproduced here), while the
    model's own train_step and test_step run fine under strategy.run. So this
    is fit's epoch loop around them: the model's compiled loss, metrics and
    optimizer (loss scaling included), the callbacks (TensorBoard, checkpoints,
    progress lines, stop_training) as fit calls them. The model must have been
    built and compiled under the strategy's scope.
    """
    import tensorflow as tf  # only here: the other experiments' JAX runs never import it

    strategy = model.distribute_strategy

    def dataset(x, y):
        if isinstance(x, tf.data.Dataset):
            return x
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if shuffle:
            ds = ds.shuffle(len(x), reshuffle_each_iteration=True)
        return ds.batch(batch_size or 32)  # the last batch short, as in fit

    train = strategy.experimental_distribute_dataset(dataset(x, y))
    val = None
    if validation_data is not None:
        val_ds = (validation_data if isinstance(validation_data, tf.data.Dataset)
                  else dataset(*validation_data[:2]))
        val = strategy.experimental_distribute_dataset(val_ds)
    train_step = tf.function(lambda data: strategy.run(model.train_step, args=(data,)))
    test_step = tf.function(lambda data: strategy.run(model.test_step, args=(data,)))

    def results():
        return {k: float(v) for k, v in model.get_metrics_result().items()}

    callback_list = keras.callbacks.CallbackList(
        callbacks, add_history=True, add_progbar=verbose != 0, model=model,
        verbose=2 if verbose == "auto" else verbose, epochs=epochs, steps=steps_per_epoch)
    model.stop_training = False
    callback_list.on_train_begin()
    logs = {}
    # A dataset given with steps_per_epoch is taken as repeated: its epochs run on from one
    # iterator, as in fit. Arrays become a finite dataset, read from the start each epoch.
    continuing = steps_per_epoch is not None and isinstance(x, tf.data.Dataset)
    iterator = iter(train)
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        if not continuing and epoch > initial_epoch:
            iterator = iter(train)
        step = 0
        while steps_per_epoch is None or step < steps_per_epoch:
            data = next(iterator, None)
            if data is None:
                break
            callback_list.on_train_batch_begin(step)
            outputs = train_step(data)
            callback_list.on_train_batch_end(
                step, {k: strategy.experimental_local_results(v)[0] for k, v in outputs.items()})
            step += 1
            if model.stop_training:
                break
        logs = results()
        if val is not None:
            model.reset_metrics()
            for data in val:
                test_step(data)
            logs.update({f"val_{k}": v for k, v in results().items()})
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end(logs)
    return model.history
