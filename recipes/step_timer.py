"""Examples per second from fit's median step, for any Keras 3 model, on any backend.

Shows:  time each call of fit's train function, waiting for the device before the
        clock stops; leave the compiling warm-up steps out; report examples/s as
        the batch over the median step, with p50/p90 step times (a mean hides stalls).
Run:    python main.py --recipe=batch           # every recipe here measures with it
Expect: a stalled step moves the p90, not examples/s; on JAX or a GPU an unsynchronised
        clock reads steps several times too short (the loss is read back first here)
Copy:   this file alone, then
            timer = StepTimer()
            model.fit(x, y, batch_size=64, epochs=2, callbacks=[timer])
            print(throughput(timer.seconds, examples_per_step=64, warmup=2))
            # {'examples_per_sec': ..., 'step_time_ms_p50': ..., 'step_time_ms_p90': ...}
        With compile(steps_per_execution=k), one call is k steps: examples_per_step=64 * k.
"""
import time

import keras
import numpy as np


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
