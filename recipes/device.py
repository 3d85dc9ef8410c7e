"""The same training job on each device, timed from the same start, and which is cheaper per job.

Shows:  your model copied onto each device (keras.device) with the same initial weights,
        trained there with SGD and timed (the clock waits for the device; the first
        compiled call, which traces and compiles, is timed apart), then each job's cost
        at its device's hourly price: the cheaper device, by how much, and the
        break-even speedup (the price ratio) a GPU must beat to pay off. A spot or
        preemptible price (gpu_spot:0.45) adds that machine's cost per job with the
        checkpoints it must save, timed on the job's own model.
Run:    python main.py --recipe=device --price_per_hour=cpu:0.40,gpu:1.20,gpu_spot:0.45
        # the measured experiment: a subprocess per device, the arithmetic floor
Expect: build_model's 784-500-10 from initial_weights, 5 epochs of batch 100 on 12,000
        28x28 shapes, 2 CPU cores shared with other jobs, no GPU: 2.6-3.6 s on JAX (val
        accuracy 0.85), 4.6-5.2 s on TensorFlow (Keras' own array pipeline; the
        experiment's tf.data batches by index are faster); "a GPU pays off only if it
        runs this job more than 3.00x as fast" at gpu $1.20/h vs cpu $0.40/h
Copy:   this file alone, then
            results = {d: job_on_device(model, d, x, y, x_val, y_val, epochs=2)
                       for d in local_devices()}  # "cpu", "gpu:0", ...
            lines, verdict = compare_costs(results, parse_prices("cpu:0.40,gpu:1.20,gpu_spot:0.45"))
            for line in lines:
                print(line)
            # verdict: cheapest_device, cpu_cost_usd, break_even_speedup, ...
        model: compiled with its loss (or pass loss=); it is never trained itself.
        The jobs share your process, one after another; for the cleanest comparison give
        each its own process that sees only its device (CUDA_VISIBLE_DEVICES), as
        the experiment does.
"""
import math
import os
import re
import tempfile
import time

import keras
import numpy as np

PRICE_NAME = re.compile(r"^(cpu|gpu)(_spot)?(:\d+)?$")
# On a spot machine a run saves a checkpoint at each epoch's end and every this many seconds
# (the repository's CLI default), so that a preemption loses little; they cost time there.
# As the CLI does, saves are spaced so that they take at most CHECKPOINT_SHARE of the job:
# short epochs pass theirs over, the last aside.
CHECKPOINT_EVERY_S = 30.0
CHECKPOINT_SHARE = 0.05


def initial_weights(input_dim, hidden_units, num_classes, seed):
    """Glorot-uniform kernels and zero biases from numpy: the same start on every device."""
    rng = np.random.default_rng(seed)
    weights = []
    for fan_in, fan_out in ((input_dim, hidden_units), (hidden_units, num_classes)):
        limit = math.sqrt(6 / (fan_in + fan_out))
        weights += [rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32),
                    np.zeros(fan_out, np.float32)]
    return weights


def build_model(input_shape, hidden_units, num_classes):
    """Flatten -> Dense(hidden, relu) -> Dense(classes) logits."""
    return keras.Sequential([
        keras.Input(shape=input_shape),
        keras.layers.Flatten(),
        keras.layers.Dense(hidden_units, activation="relu"),
        keras.layers.Dense(num_classes),
    ])


class CallTimer(keras.callbacks.Callback):
    """Seconds and steps of each compiled training call, and fit's time to the first one's end.

    With steps_per_execution=0 one call is a whole epoch, and the first call's share
    (tracing, compiling) is what a small job spends most on. The loss is read back
    before the clock stops: an asynchronous backend (JAX, a GPU) hands control back
    before the step has run, and would be timed too short.
    """

    def __init__(self):
        super().__init__()
        self.calls, self.first_call_s = [], None

    def on_train_begin(self, logs=None):
        self._fit_start = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._last_step = -1

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        keras.ops.convert_to_numpy((logs or {}).get("loss", 0.0))  # waits for the device
        now = time.perf_counter()
        if self.first_call_s is None:
            self.first_call_s = now - self._fit_start
        self.calls.append((now - self._start, batch - self._last_step))
        self._last_step = batch


def train_job(model, x, y=None, x_val=None, y_val=None, *, epochs=5, batch_size=100,
              steps_per_epoch=None, learning_rate=0.001, momentum=0.9, steps_per_execution=0,
              jit_compile=True, loss=None, metrics=("accuracy",), callbacks=()):
    """Compiles `model` with SGD, trains it on the current device, timed, and evaluates it.

    x, y: arrays, batch_size examples a step, shuffled each epoch; or x a batched
    dataset (y None), which shuffles itself (steps_per_epoch where one pass of it
    holds every epoch). steps_per_execution=0 runs a whole epoch per compiled call.
    loss None: the model's own compiled loss. Returns the job's wall time, the first
    compiled call's time, each call's (seconds, steps), the per-epoch history, the
    final loss and the validation loss and accuracy.
    """
    loss = loss or getattr(model, "loss", None)
    if loss is None:
        raise ValueError("the model has no loss: compile it with one, or pass loss=")
    arrays = y is not None
    steps = steps_per_epoch or (math.ceil(len(x) / batch_size) if arrays else len(x))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=momentum),
                  loss=loss, metrics=list(metrics),
                  steps_per_execution=min(steps_per_execution or steps, steps),
                  jit_compile=jit_compile)
    if arrays:
        inputs = {"x": x, "y": y, "batch_size": batch_size, "shuffle": True}
    else:  # the dataset shuffles itself; fit's own shuffle would only warn
        inputs = {"x": x, "shuffle": False,
                  **({"steps_per_epoch": steps_per_epoch} if steps_per_epoch else {})}
    timer = CallTimer()
    start = time.perf_counter()
    history = model.fit(epochs=epochs, verbose=2, callbacks=[timer, *callbacks], **inputs)
    wall = time.perf_counter() - start
    xla = bool(model.jit_compile)
    if keras.backend.backend() == "tensorflow":  # one pass over the validation data took
        model.jit_compile = False  # 0.8-1.3 s here with XLA's compile, 0.5 s without
    val_loss, val_accuracy = model.evaluate(
        verbose=0, **({"x": x_val, "y": y_val, "batch_size": batch_size} if arrays
                      else {"x": x_val}))[:2]
    return {"wall_time_s": wall, "first_call_s": timer.first_call_s, "calls": timer.calls,
            "checkpoint_s": checkpoint_seconds(model), "epochs": epochs,
            "history": history.history, "loss": history.history["loss"][-1],
            "val_loss": val_loss, "val_accuracy": val_accuracy,
            "steps_per_execution": model.steps_per_execution, "xla": xla}


def checkpoint_seconds(model):
    """Seconds to save `model`'s weights and optimizer state (what a checkpoint holds):
    one checkpoint's cost. (save_weights: model.save imports TensorFlow on JAX.)"""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        model.save_weights(os.path.join(folder, "checkpoint.weights.h5"))
        return time.perf_counter() - start


def job_on_device(model, device, x, y=None, x_val=None, y_val=None, **settings):
    """train_job on `device` ("cpu", "gpu:0", ...), on a copy of `model` made there with
    model's own weights: every device starts the same, and yours is never trained.
    settings: train_job's (epochs, batch_size, learning_rate, ...); the loss is yours."""
    settings.setdefault("loss", getattr(model, "loss", None))
    with keras.device(device if ":" in device else f"{device}:0"):
        job = keras.models.clone_model(model)
        job.set_weights(model.get_weights())
        return train_job(job, x, y, x_val, y_val, **settings)


def accelerator_count():
    """How many GPUs the current Keras backend sees in this process."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf
        return len(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax
        return sum(d.platform == "gpu" for d in jax.devices())
    if backend == "torch":
        import torch
        return torch.cuda.device_count()
    return 0


def local_devices():
    """['cpu', 'gpu:0', ...]: the CPU and each GPU the Keras backend sees here."""
    return ["cpu"] + [f"gpu:{i}" for i in range(accelerator_count())]


# --- the cost verdict ---------------------------------------------------------------

def parse_prices(text):
    """'cpu:0.40,gpu:1.20,gpu_spot:0.45' -> {'cpu': 0.4, 'gpu': 1.2, 'gpu_spot': 0.45}; needs
    a cpu and a gpu price (on demand); _spot names a preemptible machine's price."""
    prices = {}
    for item in filter(None, (part.strip().lower() for part in text.split(","))):
        name, _, value = item.rpartition(":")
        try:
            price = float(value)
        except ValueError:
            price = None
        if not PRICE_NAME.match(name) or price is None or not math.isfinite(price) or price < 0:
            raise ValueError(f"--price_per_hour: {item!r} is not device:price; write e.g. "
                             "cpu:0.40,gpu:1.20,gpu_spot:0.45 (devices cpu, gpu or gpu:N, "
                             "each also _spot; prices >= 0)")
        prices[name] = price
    if "cpu" not in prices or not any(re.match(r"gpu(:|$)", name) for name in prices):
        raise ValueError(f"--price_per_hour needs a cpu and a gpu price, got {text!r}; "
                         "write e.g. cpu:0.40,gpu:1.20")
    return prices


def price_of(device, prices, spot=False):
    """The hourly price of 'cpu' or 'gpu:N' (gpu:N's own price, else the gpu price), on
    demand or with spot=True preemptible (gpu_spot:N, gpu_spot), or None."""
    kind, _, index = device.partition(":")
    kind += "_spot" if spot else ""
    return prices.get(f"{kind}:{index}" if index else kind, prices.get(kind))


def metric_prefix(device):
    """'gpu:0' -> 'gpu0': a device's name in metric names."""
    return device.replace(":", "")


def compare_costs(results, prices):
    """Cost per job per device and a plain verdict: (lines of text, flat metrics).

    results: {device: {'wall_time_s': ...}} (a device whose result holds 'error'
    is reported and left out); prices: parse_prices' {device: $ per hour}.
    """
    ok = {d: r for d, r in results.items() if "error" not in r}
    metrics, lines = {}, []
    for device, r in ok.items():
        cost = r["wall_time_s"] / 3600 * price_of(device, prices)
        metrics[f"{metric_prefix(device)}_cost_usd"] = cost
        lines.append(f"{device}: {r['wall_time_s']:.2f} s per job at "
                     f"${price_of(device, prices):.2f}/h = ${cost:.6f} per job")
    for device, r in ok.items():
        if price_of(device, prices, spot=True) is not None:
            lines.append(spot_cost(device, r, prices, metrics))
    cpu_price = prices["cpu"]
    gpu_price = prices["gpu"] if "gpu" in prices else next(
        p for n, p in prices.items() if n.startswith("gpu:"))
    gpus = [d for d in ok if d != "cpu"]
    if ok:
        metrics["cheapest_device"] = min(ok, key=lambda d: metrics[f"{metric_prefix(d)}_cost_usd"])
        options = {**{d: metrics[f"{metric_prefix(d)}_cost_usd"] for d in ok},
                   **{f"{d} spot": metrics[f"{metric_prefix(d)}_spot_cost_usd"] for d in ok
                      if f"{metric_prefix(d)}_spot_cost_usd" in metrics}}
        metrics["cheapest_option"] = min(options, key=options.get)
    if "cpu" in ok and gpus:
        for gpu in gpus:
            lines.append(gpu_verdict(gpu, ok, prices, metrics))
        metrics["break_even_speedup"] = gpu_price / cpu_price if cpu_price > 0 else math.inf
    elif "cpu" in ok:
        break_even = gpu_price / cpu_price if cpu_price > 0 else math.inf
        metrics["break_even_speedup"] = break_even
        cpu_time = ok["cpu"]["wall_time_s"]
        lines.append(f"No GPU ran this job: the CPU figures stand alone. At "
                     f"gpu ${gpu_price:.2f}/h vs cpu ${cpu_price:.2f}/h a "
                     f"GPU pays off only if it runs this job more than {break_even:.2f}x as fast, "
                     f"i.e. in under {cpu_time / break_even:.2f} s.")
        spot = price_of("gpu", prices, spot=True)
        if spot is not None and cpu_price > 0:
            metrics["break_even_speedup_spot"] = spot / cpu_price
            lines.append(f"A spot GPU at ${spot:.2f}/h pays off if it runs it more than "
                         f"{spot / cpu_price:.2f}x as fast, plus the time its checkpoints take.")
    for device, r in results.items():
        if "error" in r:
            lines.append(f"{device} FAILED (left out of the verdict): {r['error']}")
    return lines, metrics


def spot_cost(device, r, prices, metrics, every_s=CHECKPOINT_EVERY_S):
    """The job on a spot machine: its wall time plus the checkpoints a preemptible run
    saves (at r['checkpoint_s'] each: one per epoch, as many as CHECKPOINT_SHARE of the
    job allows but at least the last, and one every every_s seconds or more) at the spot
    price; one line, and metrics added."""
    save_s, wall = r.get("checkpoint_s", 0.0), r["wall_time_s"]
    budget = math.floor(CHECKPOINT_SHARE * wall / save_s) if save_s > 0 else math.inf
    timed = wall // max(every_s, save_s / CHECKPOINT_SHARE)
    overhead = save_s * (min(r.get("epochs", 1), max(1, budget)) + timed)
    price, prefix = price_of(device, prices, spot=True), metric_prefix(device)
    cost = (wall + overhead) / 3600 * price
    on_demand = metrics[f"{prefix}_cost_usd"]
    metrics.update({f"{prefix}_spot_cost_usd": cost, f"{prefix}_checkpoint_overhead_s": overhead,
                    f"{prefix}_checkpoint_overhead_share": overhead / wall})
    return (f"{device} spot: {wall:.2f} s + {overhead:.2f} s of checkpoints "
            f"({overhead / wall:.1%}) at ${price:.2f}/h = ${cost:.6f} per job, "
            f"{1 - cost / on_demand:.0%} less than on demand"
            if on_demand > 0 else f"{device} spot: ${cost:.6f} per job")


def gpu_verdict(gpu, ok, prices, metrics):
    """One GPU against the CPU: its speedup and break-even speedup (added to metrics) and
    which of the two is cheaper per job, by how much, in one line."""
    cpu_price, price = prices["cpu"], price_of(gpu, prices)
    speedup = ok["cpu"]["wall_time_s"] / ok[gpu]["wall_time_s"]
    break_even = price / cpu_price if cpu_price > 0 else math.inf
    cpu_cost, gpu_cost = metrics["cpu_cost_usd"], metrics[f"{metric_prefix(gpu)}_cost_usd"]
    metrics[f"speedup_{metric_prefix(gpu)}_vs_cpu"] = speedup
    metrics[f"break_even_speedup_{metric_prefix(gpu)}"] = break_even
    winner, loser = ("cpu", gpu) if cpu_cost <= gpu_cost else (gpu, "cpu")
    saving = 1 - min(cpu_cost, gpu_cost) / max(cpu_cost, gpu_cost) if max(
        cpu_cost, gpu_cost) > 0 else 0.0
    return (f"{gpu} is {speedup:.2f}x as fast as cpu and costs "
            f"{break_even:.2f}x as much per hour: {winner} is cheaper per job by "
            f"{saving:.0%} than {loser}. Break-even speedup: {break_even:.2f}x "
            f"({gpu} pays off only when more than {break_even:.2f}x as fast).")
