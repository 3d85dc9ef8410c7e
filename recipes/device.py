"""The same job on every device, with time, cost and a verdict.

Shows: one small classifier (784 -> 500 relu -> 10, SGD lr 0.001 momentum 0.9,
batch 100, 5 epochs: a well-known CPU-vs-GPU comparison) trained once per
device this machine has (the CPU, then each GPU), all from the same initial
weights. Where nvidia-smi lists a GPU, each device's job runs in its own
subprocess that sees only that device (CUDA_VISIBLE_DEVICES), so visibility and
memory start clean; where it lists none there is nothing to hide, and the CPU
job runs in this process (a subprocess would import the backend again and copy
the data: ~5 s). For each device: wall time, examples/s (the first compiled
call left out), time to the first step, validation accuracy, and the job's cost
at --price_per_hour. It says which device is cheaper per job and by how much,
and the break-even speedup (the price ratio) a GPU must beat to pay off.
Where the time goes: each job also times a float32 matmul of the first
layer's shape on its device, so the job's arithmetic floor (6 FLOP per weight
per example) is printed beside its wall time. A job this small is mostly
per-step overhead and input pipeline, not arithmetic, which is why a GPU gains
little on it. The defaults here are the fast path: in-memory arrays gathered a
whole batch at a time by shuffled index (no per-example work; on TensorFlow a
tf.data pipeline with its autotuning off, whose threads competed with the step
on 2 cores), a whole epoch per compiled call (--steps_per_execution=0) and an
XLA-compiled step (--xla=on). Keras' own defaults (the arrays handed to fit,
one Python round trip per step, no XLA on a CPU-only TensorFlow) are
--pipeline=keras_arrays --steps_per_execution=1 --xla=auto; on the full
Fashion-MNIST job they take 1.5-2.2x as long. --batch_size=1000 shows how a
bigger batch shrinks the overhead share; KERAS_BACKEND=jax runs the same job
with less overhead still on a CPU, and without importing TensorFlow at all.
Run:    python main.py --recipe=device --price_per_hour=cpu:0.40,gpu:1.20
        python main.py --recipe=device --dataset=fashion_mnist --data_dir=DIR
Expect: on the default shapes data (12,000 28x28 images) on 2 shared CPU cores,
        no GPU: the CPU job runs in this process and takes 2.4-2.6 s, 1.2-1.3 s
        of it before the first step (tracing and XLA compiling), about
        48,000-61,000 examples/s (batch / median step); the arithmetic floor is
        ~1.0 s (40%), so the verdict is "overhead-bound". The 600 SGD steps
        reach val accuracy 0.849; the whole command takes 8.4-9.0 s. The cost
        verdict says a GPU at $1.20/h pays off only above a 3.00x speedup.
        --batch_size=1000 trims the job only to ~2.1 s here (the compile stays)
        and, with 60 steps, ends at 0.55. On full Fashion-MNIST
        (--dataset=fashion_mnist) the job takes 6.3-7.1 s against a floor of
        4.7-4.8 s, val accuracy 0.825, and the whole command 12.4-13.3 s (of it
        ~4 s importing TensorFlow, 0.7-1.3 s reading the data, 0.2 s exiting:
        main.py freezes the start-up objects for the garbage collector, which
        took ~1.2 s at exit before); Keras' defaults take 2.2-2.3x as long
        (benchmarks/device.py on a quiet machine; with other jobs running the
        job reached 1.8-2.0x its floor and the whole command 2.7-3.6x). With
        KERAS_BACKEND=jax: 2.4-2.5 s (val accuracy 0.852) and 7.6-7.9 s for the
        whole default command; 5.3-6.3 s and 11-12.5 s on Fashion-MNIST (0.826).
Copy:   this file alone works in any project with keras (TensorFlow or JAX
        backend) and numpy: run(Config(), "logs", ((x_train, y_train),
        (x_val, y_val)), model=your_model). Without a GPU the CPU job runs in
        your process; with one, the file loads itself in a subprocess per
        device. Your keras.Model (optional; a builder fn(input_shape,
        num_classes) works too) reaches each job as run_dir/model.keras, so its
        custom layers need Config(model_code="your_layers.py").
"""
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import typing

import keras
import numpy as np

# What main.py feeds this recipe: arrays of 28x28 gray images (Fashion-MNIST's shape).
# 12,000 shapes: the job's 5 epochs of SGD at lr 0.001 reach ~0.86 on them; on 6,000
# (300 steps) they stopped near 0.78.
DATA = {"form": "arrays", "image_size": 28, "channels": 1, "examples": (12000, 2000)}
TAKES_MODEL = True  # run() takes model=: your keras.Model is the job on every device
HEADLINE = ("cheapest_device", "cpu_wall_time_s", "cpu_examples_per_sec", "cpu_val_accuracy",
            "cpu_compute_share", "break_even_speedup", "gpu_count", "devices_failed",
            "wall_time_s")
DEVICE_NAME = re.compile(r"^(cpu|gpu:\d+)$")
PRICE_NAME = re.compile(r"^(cpu|gpu|gpu:\d+)$")


@dataclasses.dataclass
class Config:
    devices: str = "auto"  # comma list of cpu, gpu:N; auto = the CPU and every GPU nvidia-smi lists
    price_per_hour: str = "cpu:0.40,gpu:1.20"  # device:price per hour; gpu prices every GPU, gpu:N one
    epochs: int = 5  # epochs of the job on each device
    batch_size: int = 100  # examples per step; bigger batches shrink per-step overhead (try 1000)
    learning_rate: float = 0.001  # SGD learning rate
    momentum: float = 0.9  # SGD momentum
    hidden_units: int = 500  # width of the one hidden relu layer
    steps_per_execution: int = 0  # training steps per compiled call; 0 = a whole epoch,
    # 1 = Keras' default (one Python round trip per step)
    xla: typing.Literal["on", "off", "auto"] = "on"  # XLA-compile the train step; auto = Keras'
    # choice (off on a CPU-only TensorFlow)
    pipeline: typing.Literal["arrays", "keras_arrays", "tf_data"] = "arrays"  # input: arrays =
    # whole batches gathered by shuffled index (Keras' numpy path on JAX; on TensorFlow the same
    # in tf.data with autotuning off), keras_arrays = the numpy arrays handed to fit (on
    # TensorFlow Keras' autotuned tf.data), tf_data = tf.data slices shuffled one at a time
    timeout_s: int = 3600  # seconds one device's subprocess may take before it is reported as
    # failed (a CPU job run in this process has no limit)
    seed: int = 0  # initial weights and shuffling (the same on every device)
    model_code: str | None = None  # with your model: a Python file that registers its custom
    # layers, imported by each device's worker before it loads the model
    trust_model: bool = False  # with your model: workers load it with Keras' safe mode off

    def __post_init__(self):
        parse_devices(self.devices)
        parse_prices(self.price_per_hour)
        if min(self.epochs, self.batch_size, self.hidden_units, self.timeout_s) < 1:
            raise ValueError("--epochs, --batch_size, --hidden_units and --timeout_s must be >= 1")
        if self.steps_per_execution < 0:
            raise ValueError(f"--steps_per_execution must be >= 0 (0 = a whole epoch), "
                             f"got {self.steps_per_execution}")
        if self.learning_rate <= 0 or not 0 <= self.momentum < 1:
            raise ValueError("--learning_rate must be > 0 and --momentum in [0, 1)")


# --- devices and prices ----------------------------------------------------------

def parse_devices(text):
    """'auto' -> None; 'cpu,gpu:0' -> ['cpu', 'gpu:0']; anything else is a ValueError."""
    text = text.strip().lower()
    if text == "auto":
        return None
    names = [name.strip() for name in text.split(",")]
    bad = [name for name in names if not DEVICE_NAME.match(name)]
    if bad or not names:
        raise ValueError(f"--devices: {bad[0] if bad else text!r} is not a device; "
                         "write auto or a comma list like cpu,gpu:0,gpu:1")
    return list(dict.fromkeys(names))


def parse_prices(text):
    """'cpu:0.40,gpu:1.20' -> {'cpu': 0.4, 'gpu': 1.2}; needs a cpu and a gpu price."""
    prices = {}
    for item in filter(None, (part.strip().lower() for part in text.split(","))):
        name, _, value = item.rpartition(":")
        try:
            price = float(value)
        except ValueError:
            price = None
        if not PRICE_NAME.match(name) or price is None or not math.isfinite(price) or price < 0:
            raise ValueError(f"--price_per_hour: {item!r} is not device:price; write e.g. "
                             "cpu:0.40,gpu:1.20 (devices cpu, gpu or gpu:N, prices >= 0)")
        prices[name] = price
    if "cpu" not in prices or not any(name.startswith("gpu") for name in prices):
        raise ValueError(f"--price_per_hour needs a cpu and a gpu price, got {text!r}; "
                         "write e.g. cpu:0.40,gpu:1.20")
    return prices


def price_of(device, prices):
    """The hourly price of 'cpu' or 'gpu:N' (gpu:N's own price, else the gpu price), or None."""
    return prices.get(device, prices.get(device.split(":")[0]))


def find_devices():
    """['cpu', 'gpu:0', ...]: the CPU and every NVIDIA GPU `nvidia-smi -L` lists."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    gpus = [int(m.group(1)) for m in re.finditer(r"^GPU (\d+):", listing, re.MULTILINE)]
    return ["cpu"] + [f"gpu:{i}" for i in gpus]


def compare_costs(results, prices):
    """Cost per job per device and a plain verdict: (lines of text, flat metrics)."""
    ok = {d: r for d, r in results.items() if "error" not in r}
    metrics, lines = {}, []
    for device, r in ok.items():
        cost = r["wall_time_s"] / 3600 * price_of(device, prices)
        metrics[f"{metric_prefix(device)}_cost_usd"] = cost
        lines.append(f"{device}: {r['wall_time_s']:.2f} s per job at "
                     f"${price_of(device, prices):.2f}/h = ${cost:.6f} per job")
    cpu_price = prices["cpu"]
    gpu_price = prices.get("gpu", next(p for n, p in prices.items() if n.startswith("gpu")))
    gpus = [d for d in ok if d != "cpu"]
    if ok:
        cheapest = min(ok, key=lambda d: metrics[f"{metric_prefix(d)}_cost_usd"])
        metrics["cheapest_device"] = cheapest
    if "cpu" in ok and gpus:
        cpu_time, cpu_cost = ok["cpu"]["wall_time_s"], metrics["cpu_cost_usd"]
        for gpu in gpus:
            price = price_of(gpu, prices)
            speedup = cpu_time / ok[gpu]["wall_time_s"]
            break_even = price / cpu_price if cpu_price > 0 else math.inf
            gpu_cost = metrics[f"{metric_prefix(gpu)}_cost_usd"]
            metrics[f"speedup_{metric_prefix(gpu)}_vs_cpu"] = speedup
            metrics[f"break_even_speedup_{metric_prefix(gpu)}"] = break_even
            winner, loser = ("cpu", gpu) if cpu_cost <= gpu_cost else (gpu, "cpu")
            saving = 1 - min(cpu_cost, gpu_cost) / max(cpu_cost, gpu_cost) if max(
                cpu_cost, gpu_cost) > 0 else 0.0
            lines.append(f"{gpu} is {speedup:.2f}x as fast as cpu and costs "
                         f"{break_even:.2f}x as much per hour: {winner} is cheaper per job by "
                         f"{saving:.0%} than {loser}. Break-even speedup: {break_even:.2f}x "
                         f"({gpu} pays off only when more than {break_even:.2f}x as fast).")
        metrics["break_even_speedup"] = gpu_price / cpu_price if cpu_price > 0 else math.inf
    elif "cpu" in ok:
        break_even = gpu_price / cpu_price if cpu_price > 0 else math.inf
        metrics["break_even_speedup"] = break_even
        cpu_time = ok["cpu"]["wall_time_s"]
        lines.append(f"No GPU ran this job: the CPU figures stand alone. At "
                     f"gpu ${gpu_price:.2f}/h vs cpu ${cpu_price:.2f}/h a "
                     f"GPU pays off only if it runs this job more than {break_even:.2f}x as fast, "
                     f"i.e. in under {cpu_time / break_even:.2f} s.")
    for device, r in results.items():
        if "error" in r:
            lines.append(f"{device} FAILED (left out of the verdict): {r['error']}")
    return lines, metrics


def metric_prefix(device):
    return device.replace(":", "")


# --- the job (in this process or in a device's subprocess) ----------------------------

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


def matrix_products(model):
    """(rows per example, k, n) of each Dense and Conv2D layer as the matrix product it
    computes: a Dense on (.., k) features has one row per position, a convolution one
    per output pixel with k = kernel height x width x input channels (im2col)."""
    products = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            k, n = layer.kernel.shape
            products.append((math.prod(d or 1 for d in layer.input.shape[1:-1]), k, n))
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw, k_in, n = layer.kernel.shape
            pixels = math.prod(d or 1 for d in layer.output.shape[1:-1])
            products.append((pixels, kh * kw * k_in, n))
    return products


def train_flops_per_example(model):
    """Forward and backward of its Dense and Conv2D products: 6 FLOP per weight per row.
    Other layers are left out, so the arithmetic floor built on it is a lower bound."""
    return sum(6 * rows * k * n for rows, k, n in matrix_products(model))


def _compiled_variants(unrolled, looped):
    """The chain compiled each way the current backend can run it, each in the form it
    compiles fast in: TensorFlow's graph unrolled (a graph while loop costs time per
    iteration), XLA (TensorFlow's and JAX's) as a loop, whose body it compiles once: the
    unrolled chain took ~0.9 s to compile here, the loop ~0.15 s, and ran no faster."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf
        # Plain tensor code: no need for AutoGraph's rewriting, which costs a source parse.
        return [tf.function(unrolled, autograph=False),
                tf.function(looped, jit_compile=True, autograph=False)]
    if backend == "jax":
        import jax
        return [jax.jit(looped)]
    return [unrolled]


def matmul_flops_per_sec(m, k, n, chain=20, repeats=7):
    """float32 FLOP/s of an (m,k) x (k,n) matmul on the default device: the best timed chain.

    Each product feeds the next one's input, so no compiler can hoist or merge them;
    on TensorFlow both the plain graph kernel and XLA's are timed and the faster counts.
    """
    def step(a, b):
        return a + keras.ops.matmul(a, b)[:, :1] * 1e-12

    def unrolled(a, b):
        for _ in range(chain):
            a = step(a, b)
        return a

    def looped(a, b):
        return keras.ops.fori_loop(0, chain, lambda _, a: step(a, b), a)

    rng = np.random.default_rng(0)
    a = keras.ops.convert_to_tensor(rng.random((m, k), np.float32))
    b = keras.ops.convert_to_tensor(rng.random((k, n), np.float32))
    best = math.inf
    for fn in _compiled_variants(unrolled, looped):
        keras.ops.convert_to_numpy(fn(a, b))  # trace and compile
        for _ in range(repeats):
            start = time.perf_counter()
            keras.ops.convert_to_numpy(fn(a, b))
            best = min(best, time.perf_counter() - start)
    return chain * 2 * m * k * n / best


class CallTimer(keras.callbacks.Callback):
    """Seconds and steps of each compiled training call, and fit's time to the first one's end.

    Not the kit's StepTimer: with steps_per_execution=0 one call is a whole epoch,
    and the first call's share (tracing, compiling) is what this recipe explains.
    The loss is read back before the clock stops, as the kit's timer does.
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


def call_throughput(calls, first_call_s, batch_size):
    """The kit's throughput over per-step times, leaving out the first call (it compiles);
    plus the first call, the time to the first step and the later calls' total.

    Time to the first step: the first call's time less its other steps at the steady
    rate (with one step per call, exactly the first call's time).
    """
    per_step = [seconds / steps for seconds, steps in calls]
    steady_calls = calls[1:] or calls
    seconds_per_step = sum(s for s, _ in steady_calls) / sum(n for _, n in steady_calls)
    first_step = first_call_s - (calls[0][1] - 1) * seconds_per_step
    return {**throughput(per_step, batch_size, warmup=1),
            "first_call_s": first_call_s, "first_step_s": max(first_step, 0.0),
            "steps_s": float(sum(s for s, _ in calls[1:]))}


def make_inputs(x, y, config, training):
    """fit/evaluate keyword arguments for the chosen pipeline (shuffled when training)."""
    tensorflow = keras.backend.backend() == "tensorflow"
    if config.pipeline == "keras_arrays" or (config.pipeline == "arrays" and not tensorflow):
        return {"x": x, "y": y, "batch_size": config.batch_size,
                **({"shuffle": True} if training else {})}
    import tensorflow as tf  # tf.data only: JAX's arrays pipeline needs no TensorFlow
    if config.pipeline == "arrays" and training:  # one iterator for every epoch
        return {"x": index_batches(x, y, config.batch_size, config.epochs, config.seed),
                "steps_per_epoch": math.ceil(len(x) / config.batch_size), "shuffle": False}
    if config.pipeline == "arrays":
        return {"x": index_batches(x, y, config.batch_size)}
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if training:  # the dataset shuffles itself; fit's own shuffle would only warn
        ds = ds.shuffle(len(x), seed=config.seed, reshuffle_each_iteration=True)
    ds = ds.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)
    return {"x": ds, **({"shuffle": False} if training else {})}


def index_batches(x, y, batch_size, epochs=1, seed=None):
    """`epochs` passes over in-memory arrays in one tf.data pipeline of whole batches
    gathered by index, each pass in its own order (seed None: in order).

    Keras' own scheme for numpy arrays (a permutation cut into batches by two ops, not
    one tf.data step per example), with tf.data's autotuning off: on 2 shared cores its
    threads competed with the training step (2.5-4 s of a 13-17 s Fashion-MNIST job went
    between epochs, 0.4 s without them). One iterator serves every epoch, so fit needs
    steps_per_epoch and no epoch waits for a new iterator.
    """
    import tensorflow as tf
    x, y = tf.constant(x), tf.constant(y)
    n, full = len(x), len(x) // batch_size * batch_size

    # Plain tensor code: AutoGraph's rewriting of it took 0.5 s of a 0.7 s set-up here.
    @tf.autograph.experimental.do_not_convert
    def one_pass(epoch):
        order = tf.range(n, dtype=tf.int64)
        if seed is not None:
            order = tf.random.experimental.stateless_shuffle(
                order, seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        batches = tf.data.Dataset.from_tensor_slices(tf.reshape(order[:full], (-1, batch_size)))
        return batches.concatenate(tf.data.Dataset.from_tensors(order[full:])) if full < n \
            else batches

    ds = tf.data.Dataset.range(epochs).flat_map(one_pass)
    # flat_map hides the length, which Keras needs to end an evaluation without a warning.
    ds = ds.apply(tf.data.experimental.assert_cardinality(epochs * math.ceil(n / batch_size)))
    ds = ds.map(tf.autograph.experimental.do_not_convert(
        lambda i: (tf.gather(x, i), tf.gather(y, i)))).prefetch(2)
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def seed_job(seed, pipeline):
    """keras.utils.set_random_seed where TensorFlow takes part. It imports TensorFlow
    whenever it is installed (to seed tf.data), ~4 s that a JAX job on arrays never
    needs, so there only what Keras draws from is seeded: numpy (its shuffling of
    array indices) and Python's random (the default seed of each layer)."""
    if keras.backend.backend() == "tensorflow" or pipeline == "tf_data":
        keras.utils.set_random_seed(seed)
    else:
        random.seed(seed)
        np.random.seed(seed)


def train_job(config, data, weights=None, log_dir=None, model=None):
    """The job on the current default device; returns its measurements.

    The model is this recipe's 784-500-10 from `weights`, or `model` (yours, as its
    worker loaded it: compiled with its loss).
    """
    (x_train, y_train), (x_val, y_val) = data
    seed_job(config.seed, config.pipeline)
    if model is None:
        model = build_model(x_train.shape[1:], config.hidden_units, len(weights[-1]))
        model.set_weights(weights)
        loss, metrics = keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"]
    else:
        loss, metrics, _ = classifier_loss(model, num_classes_of(data))
    steps = math.ceil(len(x_train) / config.batch_size)
    model.compile(optimizer=keras.optimizers.SGD(config.learning_rate, momentum=config.momentum),
                  loss=loss, metrics=metrics,
                  steps_per_execution=min(config.steps_per_execution or steps, steps),
                  jit_compile={"on": True, "off": False, "auto": "auto"}[config.xla])
    timer = CallTimer()
    start = time.perf_counter()
    history = model.fit(epochs=config.epochs, verbose=2,
                        callbacks=[timer, keras.callbacks.TerminateOnNaN()],
                        **make_inputs(x_train, y_train, config, training=True))
    wall = time.perf_counter() - start
    if log_dir:  # after the clock stops: a TensorBoard callback cost ~0.4 s per epoch here
        log_history(os.path.join(log_dir, "train"), history.history)
    final_loss = history.history["loss"][-1]
    if not np.isfinite(final_loss):
        raise FloatingPointError(f"training loss became {final_loss}; lower --learning_rate")
    xla = bool(model.jit_compile)
    if keras.backend.backend() == "tensorflow":  # one pass over the validation data took
        model.jit_compile = False  # 0.8-1.3 s here with XLA's compile, 0.5 s without
    val_loss, val_accuracy = model.evaluate(verbose=0, **make_inputs(x_val, y_val, config,
                                                                       training=False))[:2]
    return {**call_throughput(timer.calls, timer.first_call_s, config.batch_size),
            "wall_time_s": wall, "loss": final_loss,
            "val_loss": val_loss, "val_accuracy": val_accuracy,
            "steps_per_execution": model.steps_per_execution, "xla": xla}


def log_history(log_dir, history):
    """Per-epoch curves as TensorBoard scalars (epoch_loss, ...), written without TensorFlow
    (~4 s of import that a JAX run never needs)."""
    write_events(log_dir, [(step, scalar_pb(f"epoch_{key}", value))
                           for key, values in history.items() for step, value in enumerate(values)])


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


def measure_job(job, data, weights):
    """One device's job in the current process: train_job's measurements, the job's
    arithmetic floor on this device and the start-up since the job was launched."""
    config = Config(**job["config"])
    model = None
    if job["model_file"]:  # yours: the parent saved a copy of it for every worker
        if config.model_code:
            spec = importlib.util.spec_from_file_location("user_model_code", config.model_code)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        model = keras.models.load_model(job["model_file"], safe_mode=not config.trust_model)
        print(f"training {model.name} ({model.count_params():,} weights) from "
              f"{job['model_file']}", flush=True)
    startup = time.time() - job["launched_at"]
    result = train_job(config, data, weights, job["log_dir"], model)
    if model is None:
        model = build_model(data[0][0].shape[1:], config.hidden_units, len(weights[-1]))
    rows, k, n = max(matrix_products(model), key=lambda p: p[0] * p[1] * p[2])
    rate = matmul_flops_per_sec(min(config.batch_size * rows, 8192), k, n)
    floor = train_flops_per_example(model) * len(data[0][0]) * config.epochs / rate
    result.update(startup_s=startup, matmul_gflops=rate / 1e9, compute_floor_s=floor,
                  compute_share=floor / result["wall_time_s"], backend=keras.backend.backend())
    return result


def worker(job_file):
    """Subprocess entry point: train on the one device the environment leaves visible."""
    job = json.loads(pathlib.Path(job_file).read_text())
    device = job["device"]
    if device != "cpu" and accelerator_count() < 1:
        raise RuntimeError(f"{device} is not visible to keras' {keras.backend.backend()} "
                           f"backend (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
    # Mapped, not read into a copy: the pages the parent just wrote are in the page cache.
    arrays = {name: np.load(path, mmap_mode="r") for name, path in job["arrays"].items()}
    data = ((arrays["x_train"], arrays["y_train"]), (arrays["x_val"], arrays["y_val"]))
    weights = [arrays[f"w{i}"] for i in range(4)] if "w0" in arrays else None
    result = measure_job(job, data, weights)
    write_atomically(job["out"], lambda partial: pathlib.Path(partial).write_text(
        json.dumps(result)))


# --- the parent: the CPU job here when no GPU is listed, else one subprocess per device ----

# The subprocess loads this file by path and calls worker(): running it as a script
# would put its folder first on sys.path, where a sibling file named like a
# standard-library module could shadow it.
WORKER = """import importlib.util, sys
spec = importlib.util.spec_from_file_location("device_recipe_worker", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
module.worker(sys.argv[2])
"""


def device_env(device):
    """The environment that leaves exactly `device` visible to the job."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    else:
        env["CUDA_VISIBLE_DEVICES"] = device.split(":")[1]
        env.pop("JAX_PLATFORMS", None)
    return env


def new_job(device, config, run_dir, model_file):
    """What one device's job needs to know, as JSON a worker reads."""
    return {"device": device, "config": dataclasses.asdict(config), "model_file": model_file,
            "log_dir": os.path.join(run_dir, metric_prefix(device)), "launched_at": time.time()}


def run_here(job, data, weights, log_path):
    """The job in this process, its output in its log as a worker's would be; its
    result, or {'error': why} (the traceback in the log)."""
    start = time.perf_counter()
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            result = measure_job(job, data, weights)
        except Exception as e:  # reported like a failed worker: the other devices still run
            traceback.print_exc()
            text = str(e).strip()
            return {"error": f"{type(e).__name__}: {text.splitlines()[0] if text else ''} "
                             f"(log {log_path})"}
    result["process_time_s"] = time.perf_counter() - start
    return result


def run_in_subprocess(job, arrays, work_dir, log_path, timeout_s):
    """The job in a fresh subprocess that sees only its device; its result, or {'error': why}."""
    name = metric_prefix(job["device"])
    out = os.path.join(work_dir, f"{name}.json")
    job_file = os.path.join(work_dir, f"{name}_job.json")
    pathlib.Path(job_file).write_text(json.dumps({**job, "arrays": arrays, "out": out}))
    start = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run([sys.executable, "-c", WORKER, os.path.abspath(__file__),
                                   job_file], cwd=work_dir, stdout=log, stderr=subprocess.STDOUT,
                                  env=device_env(job["device"]), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s (see {log_path})"}
    if proc.returncode != 0 or not os.path.exists(out):
        lines = [ln for ln in pathlib.Path(log_path).read_text().splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if re.match(r"^\w*(Error|Exception)\b", ln)),
                   lines[-1] if lines else f"exit code {proc.returncode}")
        return {"error": f"{why.strip()} (exit code {proc.returncode}; log {log_path})"}
    result = json.loads(pathlib.Path(out).read_text())
    result["process_time_s"] = time.perf_counter() - start
    return result


def save_arrays(arrays, work_dir):
    """Each array as work_dir/NAME.npy, which workers map; {name: path}."""
    paths = {name: os.path.join(work_dir, f"{name}.npy") for name in arrays}
    for name, array in arrays.items():
        np.save(paths[name], array)
    return paths


def explain(device, r):
    """Where the job's time went on one device, in one line, with the advice that follows."""
    first, wall, share = r["first_call_s"], r["wall_time_s"], r["compute_share"]
    rest = max(wall - first - r["steps_s"], 0.0)
    line = (f"{device}: {wall:.2f} s = {first:.2f} s in the first compiled call (~"
            f"{r['first_step_s']:.2f} s of it before the first step: tracing, compiling, filling "
            f"the pipeline) + {r['steps_s']:.2f} s in later calls + {rest:.2f} s between calls "
            f"(epoch ends: new iterators, reshuffles, callbacks). The arithmetic "
            f"needs >= {r['compute_floor_s']:.2f} s ({share:.0%} of the job, at "
            f"{r['matmul_gflops']:.0f} GFLOP/s); the other {1 - share:.0%} is overhead.")
    if share < 0.5:
        line += (" Overhead-bound: a faster device speeds up only the arithmetic share; a bigger "
                 "--batch_size (try 1000) or --steps_per_execution shrinks the rest.")
    return line


def format_table(results, prices):
    lines = [f"{'device':>7} {'wall s':>7} {'examples/s':>11} {'p50 ms':>7} {'1st step s':>10} "
             f"{'startup s':>9} {'val_acc':>7} {'floor s':>7} {'per hour':>8} {'per job':>10}"]
    for device, r in results.items():
        if "error" in r:
            lines.append(f"{device:>7} FAILED: {r['error']}")
            continue
        price = price_of(device, prices)
        lines.append(f"{device:>7} {r['wall_time_s']:>7.2f} {r['examples_per_sec']:>11.0f} "
                     f"{r['step_time_ms_p50']:>7.3f} {r['first_step_s']:>10.2f} "
                     f"{r['startup_s']:>9.2f} {r['val_accuracy']:>7.4f} "
                     f"{r['compute_floor_s']:>7.2f} {price:>8.2f} "
                     f"{r['wall_time_s'] / 3600 * price:>10.6f}")
    return "\n".join(lines)


def log_results(run_dir, results, cost_metrics, table):
    """HParams: a trial per device (time, throughput, accuracy, cost per job); the table
    and the verdict as the Text summary."""
    log_hparams_trials(os.path.join(run_dir, "hparams"), "device", {
        metric_prefix(device): ({"device": device}, {
            **{key: r[key] for key in ("wall_time_s", "examples_per_sec", "first_step_s",
                                       "val_accuracy", "compute_floor_s")},
            "cost_usd": cost_metrics[f"{metric_prefix(device)}_cost_usd"]})
        for device, r in results.items() if "error" not in r})
    log_text_summary(run_dir, table)


def num_classes_of(data):
    (_, y_train), (_, y_val) = data
    return int(max(np.max(y_train), np.max(y_val))) + 1


def check(config, data, model=None):
    """(devices, prices) to run on; ValueError (one line) for input that cannot run,
    your model's output included."""
    prices = parse_prices(config.price_per_hour)
    devices = parse_devices(config.devices) or find_devices()
    unpriced = [d for d in devices if price_of(d, prices) is None]
    if unpriced:
        raise ValueError(f"--price_per_hour has no price for {unpriced[0]}; add "
                         f"{unpriced[0].split(':')[0]}:PRICE or {unpriced[0]}:PRICE")
    (x_train, _), _ = data
    if len(x_train) < config.batch_size:
        raise ValueError(f"--batch_size={config.batch_size} is larger than the "
                         f"{len(x_train)} training examples; lower it")
    if isinstance(model, keras.Model):
        classifier_loss(model, num_classes_of(data))
    return devices, prices


def save_for_workers(model, data, run_dir):
    """Your model, as a file each device's worker loads: a copy with your weights,
    compiled with its loss (the worker recompiles with the job's SGD). Returns
    (its path, its parameter count)."""
    (x_train, _), _ = data
    reference = model if isinstance(model, keras.Model) else model(x_train.shape[1:],
                                                                    num_classes_of(data))
    loss, metrics, why = classifier_loss(reference, num_classes_of(data))
    copy = fresh_model(reference, x_train.shape[1:], num_classes_of(data))
    copy.compile(optimizer="sgd", loss=loss, metrics=metrics)
    path = write_atomically(os.path.join(run_dir, "model.keras"), copy.save)
    print(f"your model: {copy.count_params():,} weights; loss: {why}; saved for the "
          f"workers as {path}")
    return path, copy.count_params()


def run(config, run_dir, data, model=None):
    """Runs the job once per device; returns flat metrics for metrics.json.

    Where neither nvidia-smi nor the backend finds a GPU, the CPU job runs in this
    process: there is no device to hide from it, and a subprocess would only add
    its start-up (importing the backend again, reading the data). Otherwise each
    device's job runs in its own subprocess that sees only that device.

    model: None for this recipe's 784-500-10, your keras.Model (a copy is saved to
    run_dir/model.keras and each job trains it from there; yours is never
    changed) or fn(input_shape, num_classes). Custom layers need
    Config.model_code so that the workers can load it.
    """
    start = time.perf_counter()
    run_dir = os.path.abspath(run_dir)  # the per-device subprocesses run elsewhere
    devices, prices = check(config, data, model)
    (x_train, y_train), (x_val, y_val) = data
    os.makedirs(run_dir, exist_ok=True)
    weights, model_file = None, None
    if model is None:
        weights = initial_weights(int(np.prod(x_train.shape[1:])), config.hidden_units,
                                  num_classes_of(data), config.seed)
        params = int(sum(w.size for w in weights))
    else:
        model_file, params = save_for_workers(model, data, run_dir)
    # Asked only when nvidia-smi lists no GPU: a JAX backend would claim a GPU's memory.
    alone = "cpu" in devices and find_devices() == ["cpu"] and accelerator_count() == 0
    here = {"cpu"} if alone else set()
    work_dir = tempfile.mkdtemp(prefix="device_recipe_")
    try:
        arrays = None
        results = {}
        for device in devices:
            print(f"\n== {device} ==", flush=True)
            job = new_job(device, config, run_dir, model_file)
            log_path = os.path.join(run_dir, f"{metric_prefix(device)}.log")
            if device in here:
                results[device] = run_here(job, data, weights, log_path)
            else:
                if arrays is None:  # written once, for every subprocess
                    arrays = save_arrays({"x_train": x_train, "y_train": y_train,
                                          "x_val": x_val, "y_val": y_val,
                                          **{f"w{i}": w for i, w in enumerate(weights or [])}},
                                         work_dir)
                results[device] = run_in_subprocess(job, arrays, work_dir, log_path,
                                                    config.timeout_s)
            if "error" in results[device]:
                print(f"{device} failed: {results[device]['error']}")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    failed = [d for d, r in results.items() if "error" in r]
    if failed and len(failed) == len(results) and all(
            "FloatingPointError" in results[d]["error"] for d in failed):
        raise FloatingPointError(results[failed[0]]["error"])
    cost_lines, cost_metrics = compare_costs(results, prices)
    if config.devices.strip().lower() == "auto" and devices == ["cpu"]:
        cost_lines.insert(0, "No GPU found (nvidia-smi lists none): only the CPU ran, "
                             "in this process.")
    table = "\n\n".join([format_table(results, prices), "\n".join(cost_lines), "\n".join(
        explain(d, r) for d, r in results.items() if "error" not in r)])
    print("\n" + table)
    log_results(run_dir, results, cost_metrics, table)
    metrics = {f"{metric_prefix(d)}_{key}": value for d, r in results.items()
               if "error" not in r for key, value in r.items()
               if isinstance(value, (int, float, str))}
    metrics.update(cost_metrics, gpu_count=sum(d != "cpu" for d in devices),
                   devices_failed=len(failed), model_params=params,
                   wall_time_s=time.perf_counter() - start)
    metrics.update({f"{metric_prefix(d)}_error": results[d]["error"] for d in failed})
    return metrics


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
