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
and the break-even speedup (the price ratio) a GPU must beat to pay off. A
spot price (gpu_spot:0.45, cpu_spot:..., gpu_spot:N:...) adds the job's cost on
that preemptible machine: its wall time plus the checkpoints a resumable run saves
there (one per epoch within 5% of the job, one every 30 s), each timed saving the job's own model on
its device, and the cheapest option of all (cheapest_option).
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
Copy:   the technique (the job on a device from the same start, the cost verdict) is the
        drop-in file recipes/device.py: job_on_device, compare_costs. This experiment
        around it is called from this repository: experiments.device.run(Config(), "logs",
        ((x_train, y_train), (x_val, y_val)), model=your_model). Without a GPU the CPU
        job runs in your process; with one, each device's job runs in a subprocess
        that imports this module from the repository. Your keras.Model (optional; a
        builder fn(input_shape, num_classes) works too) reaches each job as
        run_dir/model.keras, so its custom layers need Config(model_code="your_layers.py").
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
import subprocess
import sys
import tempfile
import time
import traceback
import typing

import keras
import numpy as np

from experiments.files import write_atomically
from experiments.tensorboard import log_hparams_trials, log_text_summary, scalar_pb, write_events
from experiments.user_model import (classifier_loss, fresh_model, num_classes_of,
                                     save_with_users_loss)
from recipes.device import (accelerator_count, build_model, compare_costs, initial_weights,
                            metric_prefix, parse_prices, price_of)
from recipes.device import train_job as timed_job
from recipes.step_timer import throughput

# What main.py feeds this recipe: arrays of 28x28 gray images (Fashion-MNIST's shape).
# 12,000 shapes: the job's 5 epochs of SGD at lr 0.001 reach ~0.86 on them; on 6,000
# (300 steps) they stopped near 0.78.
DATA = {"form": "arrays", "image_size": 28, "channels": 1, "examples": (12000, 2000)}
TAKES_MODEL = True  # run() takes model=: your keras.Model is the job on every device
HEADLINE = ("cheapest_device", "cpu_wall_time_s", "cpu_examples_per_sec", "cpu_val_accuracy",
            "cpu_compute_share", "break_even_speedup", "gpu_count", "devices_failed",
            "wall_time_s")
DEVICE_NAME = re.compile(r"^(cpu|gpu:\d+)$")


@dataclasses.dataclass
class Config:
    devices: str = "auto"  # comma list of cpu, gpu:N; auto = the CPU and every GPU nvidia-smi lists
    price_per_hour: str = "cpu:0.40,gpu:1.20"  # device:price per hour; gpu prices every GPU,
    # gpu:N one; gpu_spot (cpu_spot, gpu_spot:N) a preemptible machine's, its checkpoints added
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


# --- devices ---------------------------------------------------------------------

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


def find_devices():
    """['cpu', 'gpu:0', ...]: the CPU and every NVIDIA GPU `nvidia-smi -L` lists."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    gpus = [int(m.group(1)) for m in re.finditer(r"^GPU (\d+):", listing, re.MULTILINE)]
    return ["cpu"] + [f"gpu:{i}" for i in gpus]


# --- the job (in this process or in a device's subprocess) ----------------------------

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


def call_throughput(calls, first_call_s, batch_size):
    """The step timer's throughput over per-step times, leaving out the first call (it
    compiles); plus the first call, the time to the first step and the later calls' total.

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


def job_inputs(data, config):
    """The drop-in train_job's inputs for the chosen pipeline: the arrays (Keras batches
    and shuffles them), or tf.data pipelines that batch and shuffle themselves."""
    (x, y), (x_val, y_val) = data
    tensorflow = keras.backend.backend() == "tensorflow"
    if config.pipeline == "keras_arrays" or (config.pipeline == "arrays" and not tensorflow):
        return {"x": x, "y": y, "x_val": x_val, "y_val": y_val}
    import tensorflow as tf  # tf.data only: JAX's arrays pipeline needs no TensorFlow
    if config.pipeline == "arrays":  # one iterator for every epoch
        return {"x": index_batches(x, y, config.batch_size, config.epochs, config.seed),
                "steps_per_epoch": math.ceil(len(x) / config.batch_size),
                "x_val": index_batches(x_val, y_val, config.batch_size)}
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
        len(x), seed=config.seed, reshuffle_each_iteration=True)
    val = tf.data.Dataset.from_tensor_slices((x_val, y_val))
    return {"x": ds.batch(config.batch_size).prefetch(tf.data.AUTOTUNE),
            "x_val": val.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)}


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
    """The job on the current default device: the drop-in's train_job on the chosen
    pipeline; returns its measurements.

    The model is this recipe's 784-500-10 from `weights`, or `model` (yours, as its
    worker loaded it: compiled with its loss).
    """
    seed_job(config.seed, config.pipeline)
    if model is None:
        model = build_model(data[0][0].shape[1:], config.hidden_units, len(weights[-1]))
        model.set_weights(weights)
        loss, metrics = keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"]
    else:
        loss, metrics, _ = classifier_loss(model, num_classes_of(data))
    job = timed_job(model, **job_inputs(data, config), epochs=config.epochs,
                    batch_size=config.batch_size, learning_rate=config.learning_rate,
                    momentum=config.momentum, steps_per_execution=config.steps_per_execution,
                    jit_compile={"on": True, "off": False, "auto": "auto"}[config.xla],
                    loss=loss, metrics=metrics, callbacks=[keras.callbacks.TerminateOnNaN()])
    if log_dir:  # after the clock stops: a TensorBoard callback cost ~0.4 s per epoch here
        log_history(os.path.join(log_dir, "train"), job["history"])
    if not np.isfinite(job["loss"]):
        raise FloatingPointError(f"training loss became {job['loss']}; lower --learning_rate")
    return {**call_throughput(job["calls"], job["first_call_s"], config.batch_size),
            **{key: job[key] for key in ("wall_time_s", "loss", "val_loss", "val_accuracy",
                                         "steps_per_execution", "xla", "checkpoint_s",
                                         "epochs")}}


def log_history(log_dir, history):
    """Per-epoch curves as TensorBoard scalars (epoch_loss, ...), written without TensorFlow
    (~4 s of import that a JAX run never needs)."""
    write_events(log_dir, [(step, scalar_pb(f"epoch_{key}", value))
                           for key, values in history.items() for step, value in enumerate(values)])


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

# The subprocess imports this module from the repository, whose root goes first on its
# sys.path as main.py's folder does on main's; it runs in a temporary folder, where no
# file can shadow a module.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = """import sys
sys.path.insert(0, sys.argv[1])
from experiments.device import worker
worker(sys.argv[2])
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
            proc = subprocess.run([sys.executable, "-c", WORKER, REPO, job_file], cwd=work_dir,
                                  stdout=log, stderr=subprocess.STDOUT,
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
    path = write_atomically(os.path.join(run_dir, "model.keras"),
                           lambda partial: save_with_users_loss(copy, partial))
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


