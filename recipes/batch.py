"""Batch size vs throughput and accuracy: your model, the same start, every batch size.

Shows:  copies of your compiled model trained from the same initial weights at each
        batch size. Bigger batches keep an accelerator busy (more examples/s) but
        take fewer optimizer steps per epoch, so accuracy after a fixed number of
        epochs can fall; scale_lr=True scales the learning rate linearly
        (lr * batch / base_batch_size), the usual remedy. pick_best: the fastest
        batch size within a tolerance of the best validation accuracy.
Run:    python main.py --recipe=batch --batch_sizes=32,64,128,256,512
Expect: (the Run: line) shapes data, 6,000 28x28 images, an MLP, 5 epochs, 2 CPU cores:
        examples/s 31,000 at batch 32 -> 202,000 at 512 (6.5x) while val accuracy falls
        0.963 -> 0.873 (fewer steps); the pick is 64. scale_lr gains under a point (64
        at 0.971) and past lr 4e-3 Adam overshoots (0.807 at 512): off by default.
Copy:   this file alone, then
            results = sweep(model, x, y, x_val, y_val, batch_sizes=(32, 64, 128), epochs=3)
            print(format_table(results, best=pick_best(results, tolerance=0.01)))
        model: yours, compiled as you would train it, with metrics=["accuracy"]; each
        batch size trains a clone from its weights with a new optimizer of its kind (yours
        is never trained). Any backend, no tf.data; callbacks=lambda batch_size: [...]
        adds yours, e.g. a TensorBoard folder per batch size.
"""
import time

import keras
import numpy as np


class FullBatches(keras.utils.PyDataset):
    """In-memory arrays in full batches only (the remainder of each epoch left out), so
    every step has the same shape and cost; reshuffled each epoch from `seed`. No tf.data."""

    def __init__(self, x, y, batch_size, seed=0, shuffle=True, **kwargs):
        super().__init__(**kwargs)
        self.x, self.y = x, y
        self.batch_size = min(batch_size, len(x))
        self.rng = np.random.default_rng(seed)
        self.shuffle = shuffle
        self.order = self.rng.permutation(len(x)) if shuffle else np.arange(len(x))

    def __len__(self):
        return len(self.x) // self.batch_size

    def __getitem__(self, index):
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.x[rows], self.y[rows]

    def on_epoch_end(self):
        if self.shuffle:
            self.order = self.rng.permutation(len(self.x))


class EpochClock(keras.callbacks.Callback):
    """Seconds of each epoch's training steps (validation left out). The last step's loss
    is read back before the clock stops: an asynchronous backend (JAX, a GPU) returns
    before the step has run."""

    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 == self.params["steps"]:
            keras.ops.convert_to_numpy(logs["loss"])  # waits for the device
            self.seconds.append(time.perf_counter() - self.started)


def scaled_learning_rate(learning_rate, batch_size, base_batch_size, scale_lr):
    """The linear scaling rule: lr * batch / base_batch_size when scale_lr, else lr."""
    return learning_rate * (batch_size / base_batch_size if scale_lr else 1)


def same_start_copy(model, weights, learning_rate):
    """A clone of `model` holding `weights`, compiled as `model` is (loss, metrics,
    jit_compile...) with a new optimizer of its kind at a constant `learning_rate`."""
    optimizer = keras.optimizers.serialize(model.optimizer)
    inner = optimizer["config"].get("inner_optimizer", optimizer)  # under loss scaling
    inner["config"]["learning_rate"] = learning_rate
    config = {**model.get_compile_config(), "optimizer": optimizer}
    copy = keras.models.clone_model(model)
    copy.set_weights(weights)
    copy.compile_from_config(config)
    return copy


def sweep(model, x, y, x_val, y_val, batch_sizes=(32, 64, 128, 256, 512), epochs=5,
          scale_lr=False, base_batch_size=32, callbacks=None, seed=0, verbose=2):
    """Trains a copy of the compiled `model` at each batch size, all from its weights now;
    returns {batch_size: {"examples_per_sec", "learning_rate", "steps_per_epoch",
    "wall_time_s", and the last epoch's logs: "loss", "val_loss", "val_accuracy"...}}.

    examples/s: steps x batch over the median epoch's training seconds, the first epoch
    (tracing and compiling) left out when there are others. The learning rate is the
    model's own, times batch / base_batch_size when scale_lr. `callbacks`: a list, or
    fn(batch_size) -> list, added to each fit. `model` itself is never trained.
    """
    if getattr(model, "optimizer", None) is None:
        raise ValueError("compile the model first (its loss, metrics=['accuracy']): each "
                         "batch size trains a copy compiled the same way")
    weights = model.get_weights()
    base_lr = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    results = {}
    for batch_size in batch_sizes:
        start = time.perf_counter()
        lr = scaled_learning_rate(base_lr, batch_size, base_batch_size, scale_lr)
        copy = same_start_copy(model, weights, lr)
        train = FullBatches(x, y, batch_size, seed=seed)
        clock = EpochClock()
        extra = callbacks(batch_size) if callable(callbacks) else list(callbacks or [])
        if verbose:
            print(f"\n== batch size {batch_size} (learning rate {lr:.2e}) ==")
        history = copy.fit(train, validation_data=(x_val, y_val),
                           validation_batch_size=train.batch_size, epochs=epochs,
                           verbose=verbose, callbacks=[clock, *extra,
                                                       keras.callbacks.TerminateOnNaN()])
        epoch_seconds = clock.seconds[1:] or clock.seconds
        results[batch_size] = {
            **{key: float(values[-1]) for key, values in history.history.items()},
            "examples_per_sec": len(train) * train.batch_size / float(np.median(epoch_seconds)),
            "learning_rate": lr, "steps_per_epoch": len(train),
            "wall_time_s": time.perf_counter() - start}
    return results


def pick_best(results, tolerance, key="val_accuracy"):
    """The fastest batch size whose `key` (val accuracy) is within `tolerance` of the best."""
    top = max(r[key] for r in results.values())
    good = [b for b, r in results.items() if r[key] >= top - tolerance]
    return max(good, key=lambda b: results[b]["examples_per_sec"])


# (key, title, format) of each column format_table prints after the batch size.
COLUMNS = (("learning_rate", "lr", ">9.2e"), ("examples_per_sec", "examples/s", ">11.0f"),
           ("val_accuracy", "val_acc", ">8.4f"), ("val_loss", "val_loss", ">9.4f"),
           ("wall_time_s", "wall s", ">7.1f"))


def format_table(results, best=None, columns=COLUMNS):
    """A row per batch size, the `best` one marked."""
    widths = [int(fmt[1:].split(".")[0]) for _, _, fmt in columns]
    lines = [f"{'batch':>6} " + " ".join(f"{title:>{width}}"
                                         for (_, title, _), width in zip(columns, widths))]
    for b, r in results.items():
        cells = " ".join(format(r[key], fmt) for key, _, fmt in columns)
        lines.append(f"{b:>6} {cells}" + ("  <- best" if b == best else ""))
    return "\n".join(lines)
