"""Scale-out and resume for every experiment that takes --strategy and --resume.

strategy: a tf.distribute strategy, a keras.distribution.Distribution on JAX, or
None for one device. Under multi_worker every worker saves, since TensorFlow's
saving runs collective ops that all workers must join: give each its own run_dir
(main.py gives the others a temporary one).
"""
import contextlib
import glob
import json
import os

import keras
import numpy as np

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

        save_json(stem + ".json", payload)
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
