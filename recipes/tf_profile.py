r"""A profiled window of training steps, and whether each step waits for its input (TensorFlow).

Shows:  the TensorFlow profiler on for chosen steps of fit only (a callback), each a step
        marker, the trace in log_dir/plugins/profile for TensorBoard's Profile tab
        (tensorboard-plugin-profile); then each step split into waiting for the next batch
        (next(iterator)) and the train step: the waiting share decides the advice
        (prefetch, parallel map calls, cache, a larger batch; or, when the input keeps up,
        the levers of the step itself). fit fetches each batch inside its compiled step,
        where the wait cannot be timed apart, so the split comes from Keras's "training
        loop from scratch": the same step, with next() outside it. The pipeline timed
        alone, against the step's own rate, is its headroom (below about 1x no
        prefetching can hide it).
Run:    python main.py --recipe=profile --profile_steps=10,15   # + CPU/GPU/RSS, offline tables
        python main.py --recipe=profile --input_delay_ms=20 --prefetch=false   # a slow input
Expect: shapes data, batch 64, 2 CPU cores: about 6% of step time waits for data,
        compute-bound, about 7,700 examples/s, the pipeline alone about 40x faster than
        the step; with a 20 ms sleep per batch and no prefetch about 69% waits, input-bound,
        and the advice starts with .prefetch(tf.data.AUTOTUNE)
Copy:   this file alone, then
            model.fit(x, y, batch_size=64, epochs=2, callbacks=[StepProfiler("logs", 10, 15)])
            ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(64).repeat().prefetch(-1)
            wait_s, step_s, losses = timed_steps(make_train_step(model), ds, steps=50)
            percent, bound, advice = input_bound_verdict(wait_s[5:], step_s[5:], 20)
            print(*advice, sep="\n")  # then: tensorboard --logdir logs -> Profile tab
        make_train_step(model) takes the model's compiled loss and optimizer (or pass yours);
        wait_s[5:] leaves out the first steps, which trace and compile. The file is named
        tf_profile.py, not profile.py, which would shadow the standard library's profile.
"""
import os
import time

import keras
import numpy as np
import tensorflow as tf


class StepProfiler(keras.callbacks.Callback):
    """Traces training steps `first` to `last` (1-based, inclusive, counted across
    epochs) with the TensorFlow profiler into log_dir/plugins/profile/<time>/.

    In fit: callbacks=[StepProfiler(log_dir, first, last)]; each traced step is a
    profiler step marker, so the Profile tab's step-time graph and input-pipeline
    analysis see its boundaries. In your own loop: before(step) and after(step)
    around each step (timed_steps does), stop() when it ends early.
    """

    def __init__(self, log_dir, first=10, last=15):
        super().__init__()
        self.log_dir, self.first, self.last = os.fspath(log_dir), first, last
        self.running = False
        self.step = 0
        self._marker = None

    def before(self, step):
        if step == self.first:
            tf.profiler.experimental.start(self.log_dir)
            self.running = True

    def after(self, step):
        if step == self.last and self.running:
            self.stop()

    def stop(self):
        if self.running:
            self.running = False
            tf.profiler.experimental.stop()

    def on_train_batch_begin(self, batch, logs=None):
        self.step += 1
        self.before(self.step)
        if self.running:
            self._marker = tf.profiler.experimental.Trace("train", step_num=self.step, _r=1)
            self._marker.__enter__()

    def on_train_batch_end(self, batch, logs=None):
        if self._marker is not None:
            keras.ops.convert_to_numpy((logs or {}).get("loss", 0.0))  # the step has run
            self._marker.__exit__(None, None, None)
            self._marker = None
        self.after(self.step)

    def on_train_end(self, logs=None):
        self.stop()  # fit ended before `last`: the trace is still written


def make_train_step(model, loss_fn=None, optimizer=None):
    """The compiled step: forward, loss, gradients, update; returns the loss. By default
    with the model's compiled loss and optimizer."""
    loss_fn = loss_fn or model.loss
    optimizer = optimizer or model.optimizer
    if isinstance(loss_fn, str):  # compiled by name: its function, averaged over the batch
        per_example = keras.losses.get(loss_fn)

        def loss_fn(y, y_pred):
            return keras.ops.mean(per_example(y, y_pred))

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss
    return train_step


def timed_steps(train_step, dataset, steps, profiler=None, on_step=None):
    """Runs `steps` steps of train_step(x, y) over `dataset` (it must hold them: repeat
    it); returns (wait_seconds, step_seconds, losses), one each per step.

    wait = time in next(iterator) (the input pipeline's share); step = time in
    the train step until its loss is on the host (the compute's share). Each
    step is a profiler step marker; `profiler` (a StepProfiler) traces its
    window of them. on_step(step, wait, seconds, loss) is called after each.
    """
    iterator = iter(dataset)
    waits, seconds, losses = [], [], []
    try:
        for step in range(1, steps + 1):
            if profiler:
                profiler.before(step)
            with tf.profiler.experimental.Trace("train", step_num=step, _r=1):
                t0 = time.perf_counter()
                x, y = next(iterator)
                t1 = time.perf_counter()
                loss = float(train_step(x, y))
                t2 = time.perf_counter()
            if profiler:
                profiler.after(step)
            if on_step:
                on_step(step, t1 - t0, t2 - t1, loss)
            waits.append(t1 - t0)
            seconds.append(t2 - t1)
            losses.append(loss)
    finally:
        if profiler:
            profiler.stop()
    return waits, seconds, losses


def pipeline_batches_per_sec(dataset, batches, warmup=2):
    """How fast the input pipeline alone makes batches (no training): its ceiling.

    Compared with how fast the train step alone runs: if the pipeline cannot
    make batches faster than the step uses them, no prefetching will hide it.
    """
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches / (time.perf_counter() - start)


def input_bound_verdict(wait_seconds, step_seconds, threshold_percent=20.0, prefetch=True,
                        parallel_calls=1, slow_map=False):
    """(percent of time waiting for data, input-bound?, advice lines).

    Input-bound when over `threshold_percent` of the time waits. The advice
    names what the pipeline lacks: say prefetch=False when it has no
    .prefetch, slow_map=True with parallel_calls=1 when a slow map runs in line.
    """
    wait, step = float(np.sum(wait_seconds)), float(np.sum(step_seconds))
    percent = 100 * wait / (wait + step) if wait + step > 0 else 0.0
    if percent > threshold_percent:
        advice = [f"input-bound: {percent:.0f}% of each step waits for the next batch "
                  f"(over {threshold_percent:g}%); the device idles meanwhile. Try, in order:"]
        if not prefetch:
            advice.append("- .prefetch(tf.data.AUTOTUNE) at the end of the pipeline, so the "
                          "next batch is made while this one trains")
        if slow_map and parallel_calls == 1:
            advice.append("- map(..., num_parallel_calls=tf.data.AUTOTUNE) for the slow step, "
                          "so several batches are made at once")
        advice += ["- .cache() after the expensive, deterministic steps (decoding, resizing), "
                   "so later epochs skip them",
                   "- a larger batch: fewer, bigger steps spread the per-batch overhead"]
    else:
        advice = [f"compute-bound: only {percent:.0f}% of step time waits for data "
                  f"(at most {threshold_percent:g}%); the input keeps up. Speed now comes "
                  "from the step itself: a larger batch, mixed precision, XLA "
                  "(jit_compile=True), a faster device"]
    return percent, percent > threshold_percent, advice
