"""Where the training time goes: profiler trace, utilization, memory, input-bound verdict.

Shows: a short training of a small CNN that answers "is the device busy, or
waiting for data?" in three ways.
  1. A TensorBoard profiler trace of chosen steps (--profile_steps=10,15),
     opened by the Profile tab (tensorboard-plugin-profile): the trace viewer,
     the per-op table and the input-pipeline analysis.
  2. A monitor thread that samples every --sample_seconds: this process's CPU %
     (100 = one core busy), the machine's CPU %, resident memory (RSS) and, on
     NVIDIA GPUs, utilization %, memory used and power from `nvidia-smi` (or
     NVML when nvidia-ml-py is installed), plus TensorFlow's peak GPU memory.
     They are TensorBoard scalars in the same run, at the same step and wall
     time as the loss, so a dip in GPU utilization lines up with what the
     training loop was doing then.
  3. An input-bound verdict: each step is split into the time spent waiting
     for the next batch (`next(iterator)`) and the time in the train step; the
     waiting share, as a percentage, decides the advice (prefetch, parallel
     map calls, cache, a larger batch; or, when the input keeps up, the levers
     of the step itself). As a cross-check the pipeline is also timed alone,
     before training: its batches/s over the train step's own steps/s is the
     pipeline's headroom (below about 1x, no prefetching can hide it).
  4. The Profile tab's first answers as plain text, for reading with no network
     (the tab itself draws with Google Charts from a CDN and is blank offline):
     the profile plugin's own converters read the trace (framework_op_stats,
     input_pipeline_analyzer) into the top 10 operations by self time, the
     profiler's input-bound verdict and its step-time breakdown (compute /
     input / all others per traced step). They are printed at the end and,
     with the timing table and verdict, logged as one TensorBoard Text summary
     (tag `summary`, step 0). Without the plugin, or if a converter fails, the
     run still finishes and one line says why the tables are missing.
  With no NVIDIA GPU the GPU series are simply absent and the output says so.
  The loop is the Keras 3 "training loop from scratch" (a tf.function train
  step over a tf.data iterator) because model.fit fetches each batch inside
  its compiled step, where the wait cannot be timed apart; with fit, the same
  trace comes from the drop-in's StepProfiler callback (or
  keras.callbacks.TensorBoard(profile_batch=(10, 15))).
Run:    python main.py --recipe=profile --profile_steps=10,15
        python main.py --recipe=profile --input_delay_ms=20 --prefetch=false
                                            # a deliberately slow input
        python main.py --recipe=profile --input_delay_ms=20 --parallel_calls=0
                                            # the same input, parallel + prefetched
Expect: on the default shapes data (6,000 28x28 images, batch 64, 2 epochs,
        2 shared CPU cores, no GPU, ~4 s): about 6% of step time waits for
        data (p50 0.5 ms, the cost of one eager next()), train step p50
        about 8 ms, about 7,700 examples/s (batch / median whole step):
        compute-bound, and the pipeline alone makes about 40x more batches
        than the step uses; val accuracy 0.987. --input_delay_ms=20
        --prefetch=false: about 69% waits (p50 22 ms of a 31 ms step),
        input-bound, examples/s falls about 4x (2,050), headroom 0.4x.
        --input_delay_ms=20 --parallel_calls=0 (AUTOTUNE, prefetched): the
        wait falls to about 7% and examples/s comes back (7,200), but
        headroom is 0.8x: on 2 cores AUTOTUNE runs about two sleeps at once,
        so the input still nearly sets the pace. On
        Fashion-MNIST (--dataset=fashion_mnist --data_dir=..., 1 epoch):
        14% / 65% / 18% waiting, 3,400 / 1,760 / 4,490 examples/s, val
        accuracy 0.87. No GPU here, so the GPU series are absent.
        The offline tables of the default run: the top op is the second conv's
        Conv2DBackpropFilter (about 16% of the host's busy self time, the top 10
        70-80%); the profiler counts 4-8% of the traced steps as input (its Input
        column: time in tf.data ops only; the recipe's timer adds the eager
        next() around them), 80-88% as host compute, and its verdict reads
        "POTENTIALLY input-bound" (for 8% 'All Others': time it cannot put on an
        op, Python or I/O) or, on a busier machine, "MODERATELY input-bound".
        `tensorboard --logdir runs` -> Profile tab lists the run's trace;
        Time Series shows loss and monitor/* on one step/wall-time axis; Text
        shows the tables (no network needed).
Metrics: the recipe's timers: input_wait_percent, input_bound, input_wait_ms_p50/_p90,
        train_step_ms_p50/_p90, step_time_ms_p50/_p90, examples_per_sec,
        pipeline_batches_per_sec, pipeline_headroom; the monitor's <series>_mean/_max
        (cpu_percent, system_cpu_percent, rss_mb, gpuN_...), monitor_samples, gpu_count;
        loss, val_loss, val_accuracy, model_params, profile_trace, wall_time_s.
        From the profile plugin's converters (absent when they cannot run):
        top_op_name, top_op_type, top_op_where (Host, or Device when the trace has
        device ops), top_op_self_time_ms (summed over the traced steps) and
        top_op_self_time_share (a fraction, 0-1, of that side's self time, IDLE left
        out: framework_op_stats's own share), top_ops_self_time_share (the top 10
        together); input_wait_share_pct (input_pipeline_analyzer: the percent of
        traced step time in its Input column, the number its verdict quotes unless
        that speaks of 'All Others'), profile_traced_steps, and per traced step
        profile_step_ms_avg = profile_compute_ms_avg (device + host compute) +
        profile_input_ms_avg + profile_other_ms_avg (all the rest). Always:
        profile_tables_error ("" when the tables were made, else why not).
Copy:   the technique (the profiled window of steps, the timed loop, the verdict) is
        the drop-in file recipes/tf_profile.py (its own Copy: shows it on your model).
        This experiment is called from this repository (it needs psutil, and
        tensorboard-plugin-profile for the offline tables):
        experiments.tf_profile.run(Config(), run_dir, ((x_train, y_train), (x_val, y_val)),
        model=your_model) (model= is optional: a keras.Model, copied, or a
        builder fn(input_shape, num_classes)).
"""
import contextlib
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import threading
import time

import keras
import numpy as np
import psutil
import tensorflow as tf

from experiments.tensorboard import log_text_summary
from experiments.user_model import classifier_loss, fresh_model, num_classes_of
from recipes.step_timer import steady, throughput
from recipes.tf_profile import (StepProfiler, input_bound_verdict, make_train_step,
                                pipeline_batches_per_sec, timed_steps)


# What main.py feeds this recipe: arrays of 28x28 gray images by default.
DATA = {"form": "arrays", "image_size": 28, "channels": 1}
TAKES_MODEL = True  # run() takes model=: your keras.Model is traced instead of the CNN
HEADLINE = ("input_wait_percent", "input_bound", "step_time_ms_p50", "input_wait_ms_p50",
            "examples_per_sec", "pipeline_headroom", "input_wait_share_pct", "top_op_name",
            "top_op_self_time_share", "cpu_percent_mean", "rss_mb_max", "gpu_count",
            "val_accuracy", "wall_time_s")

GPU_QUERY = ("index", "utilization.gpu", "memory.used", "power.draw")


@dataclasses.dataclass
class Config:
    epochs: int = 2  # training epochs
    batch_size: int = 64  # examples per training step
    steps_per_epoch: int | None = None  # optional cap on steps per epoch (default: one pass)
    learning_rate: float = 1e-3  # Adam learning rate
    profile_steps: tuple[int, ...] = (10, 15)  # first,last training step to trace (1-based,
    # inclusive); the trace lands in <run>/plugins/profile for TensorBoard's Profile tab
    sample_seconds: float = 0.5  # monitor sampling period (CPU %, RSS, GPU util/memory/power)
    input_delay_ms: float = 0.0  # sleep per batch in the input pipeline: a deliberately slow
    # input (a stand-in for decoding or augmentation) to see the verdict flip
    parallel_calls: int = 1  # parallel calls of that slow map (1: in line); 0 means tf.data.AUTOTUNE
    prefetch: bool = True  # overlap input with training: .prefetch(tf.data.AUTOTUNE)
    input_bound_percent: float = 20.0  # verdict: input-bound when waiting for data is over
    # this share of step time
    warmup_steps: int = 5  # first steps left out of timings (they trace and compile)
    seed: int = 0  # initial weights and shuffling

    def __post_init__(self):
        self.profile_steps = tuple(self.profile_steps)
        if len(self.profile_steps) != 2 or not 1 <= self.profile_steps[0] <= self.profile_steps[1]:
            raise ValueError(f"--profile_steps must be FIRST,LAST with 1 <= FIRST <= LAST, "
                             f"got {','.join(map(str, self.profile_steps))}; e.g. --profile_steps=10,15")
        if self.epochs < 1 or self.batch_size < 1 or (self.steps_per_epoch or 1) < 1:
            raise ValueError("--epochs, --batch_size and --steps_per_epoch must be at least 1")
        if self.sample_seconds <= 0:
            raise ValueError(f"--sample_seconds must be > 0, got {self.sample_seconds}")
        if self.input_delay_ms < 0 or self.parallel_calls < 0 or self.warmup_steps < 0:
            raise ValueError("--input_delay_ms, --parallel_calls and --warmup_steps must be >= 0")
        if self.learning_rate <= 0 or not 0 < self.input_bound_percent < 100:
            raise ValueError("--learning_rate must be > 0 and --input_bound_percent in (0, 100)")


# --- model and input pipeline ---------------------------------------------------

def build_model(input_shape, num_classes):
    """A small CNN: two conv blocks and a dense head, logits out."""
    return keras.Sequential([
        keras.Input(shape=input_shape),
        keras.layers.Conv2D(16, 3, activation="relu", padding="same"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu", padding="same"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(num_classes),
    ])


def make_dataset(x, y, batch_size, seed, delay_ms=0.0, parallel_calls=1, prefetch=True,
                 shuffle=True, repeat=True):
    """In-memory tf.data pipeline; `delay_ms` adds a slow per-batch step (a tf.py_function sleep)."""
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(min(batch_size, len(x)), drop_remainder=True)
    if repeat:
        ds = ds.repeat()
    if delay_ms > 0:
        def slow(images, labels):
            def sleep(images):
                time.sleep(delay_ms / 1000)  # releases the GIL, like real decoding in C
                return images
            images = tf.py_function(sleep, [images], images.dtype)
            return tf.ensure_shape(images, ds.element_spec[0].shape), labels
        # parallel_calls=1 maps in line (a parallel map would buffer ahead, a hidden prefetch)
        ds = ds.map(slow, num_parallel_calls=None if parallel_calls == 1
                    else parallel_calls or tf.data.AUTOTUNE)
    if prefetch:
        return ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()  # tf.data would otherwise add the prefetch on its own
    options.experimental_optimization.inject_prefetch = False
    options.experimental_optimization.map_parallelization = False
    return ds.with_options(options)


# --- the monitor ----------------------------------------------------------------

def parse_nvidia_smi(text):
    """`nvidia-smi --query-gpu=index,utilization.gpu,memory.used,power.draw
    --format=csv,noheader,nounits` output -> [{index, utilization_percent,
    memory_used_mb, power_w}]; fields shown as [N/A] are left out."""
    names = ("utilization_percent", "memory_used_mb", "power_w")
    gpus = []
    for line in text.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(GPU_QUERY) or not cells[0].isdigit():
            continue
        gpu = {"index": int(cells[0])}
        for name, cell in zip(names, cells[1:]):
            try:
                gpu[name] = float(cell)
            except ValueError:  # "[N/A]", "[Not Supported]"
                pass
        gpus.append(gpu)
    return gpus


def query_gpus():
    """[{index, utilization_percent, memory_used_mb, power_w}] of NVIDIA GPUs, [] when none."""
    try:
        import pynvml  # nvidia-ml-py, if installed: no process spawn per sample
        pynvml.nvmlInit()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            gpu = {"index": i,
                   "utilization_percent": float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                   "memory_used_mb": pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20}
            with contextlib.suppress(pynvml.NVMLError):
                gpu["power_w"] = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000
            gpus.append(gpu)
        return gpus
    except Exception:  # not installed, or no driver: fall back to nvidia-smi
        pass
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(GPU_QUERY)}",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi(out.stdout) if out.returncode == 0 else []


class Monitor:
    """Samples CPU %, RSS and NVIDIA GPU figures every `seconds` in a background thread.

    Each sample is written at once as TensorBoard scalars (monitor/...) with the
    step that `current_step()` returns, so it shares the loss's step and wall-time
    axes. Use as a context manager; `summary()` gives means and maxima.
    """

    def __init__(self, writer, seconds, current_step=lambda: 0):
        self.writer, self.seconds, self.current_step = writer, seconds, current_step
        self.samples = []
        self.process = psutil.Process()
        self.gpus_found = bool(query_gpus())
        self.tf_gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="monitor", daemon=True)

    def __enter__(self):
        self.process.cpu_percent(None)  # the first call only sets the baseline
        psutil.cpu_percent(None)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._record(self.sample())  # one last sample at the end of training

    def _loop(self):
        while not self._stop.wait(self.seconds):
            self._record(self.sample())

    def sample(self):
        """One flat {name: value} reading of this process and the GPUs."""
        values = {"cpu_percent": self.process.cpu_percent(None),
                  "system_cpu_percent": psutil.cpu_percent(None),
                  "rss_mb": self.process.memory_info().rss / 2**20}
        for gpu in query_gpus() if self.gpus_found else []:
            for key, value in gpu.items():
                if key != "index":
                    values[f"gpu{gpu['index']}_{key}"] = value
        for i, name in enumerate(self.tf_gpus):
            with contextlib.suppress(ValueError):
                peak = tf.config.experimental.get_memory_info(name.split("device:")[-1])["peak"]
                values[f"gpu{i}_tf_peak_memory_mb"] = peak / 2**20
        return values

    def _record(self, values):
        step = self.current_step()
        self.samples.append({"step": step, **values})
        with self.writer.as_default():
            for key, value in values.items():
                tf.summary.scalar(f"monitor/{key}", value, step=step)

    def summary(self):
        """Flat mean/max of each series over the samples (e.g. cpu_percent_mean, rss_mb_max)."""
        out = {"monitor_samples": len(self.samples)}
        keys = sorted({k for s in self.samples for k in s} - {"step"})
        for key in keys:
            series = np.array([s[key] for s in self.samples if key in s], dtype=float)
            out[f"{key}_mean"] = float(series.mean())
            out[f"{key}_max"] = float(series.max())
        return out


def _ms(seconds, q):
    return 1000 * float(np.percentile(seconds, q))


def classes_in(data):
    """The data's classes, at least two (one label alone still trains a two-class head)."""
    return max(2, num_classes_of(data))


def step_logger(writer, current):
    """timed_steps' on_step: the NaN guard, the step the monitor tags its samples with,
    and the step's loss and times as TensorBoard scalars."""
    def on_step(step, wait, seconds, loss):
        if not np.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at step {step}; "
                                     "lower --learning_rate")
        current["step"] = step
        with writer.as_default(step=step):
            tf.summary.scalar("loss", loss)
            tf.summary.scalar("input_wait_ms", 1000 * wait)
            tf.summary.scalar("train_step_ms", 1000 * seconds)
            tf.summary.scalar("step_time_ms", 1000 * (wait + seconds))
    return on_step


# --- the offline tables: what the Profile tab shows first, without its web page ------
# (the tab draws with Google Charts from a CDN, blank offline; its converters run here)

STEP_TOTAL, STEP_INPUT = "stepTimeMs", "infeedTimeMs"  # input_pipeline_analyzer's column ids
STEP_COMPUTE = ("deviceComputeTimeMs", "hostComputeTimeMs")


def profile_converter():
    """The profile plugin's converter module (raw_to_tool_data), imported only when called:
    in tensorboard-plugin-profile 2.20+ it lives in the xprof package the plugin wraps,
    before that in the plugin itself. ImportError when neither is installed."""
    try:
        from xprof.convert import raw_to_tool_data
    except ImportError:
        from tensorboard_plugin_profile.convert import raw_to_tool_data
    return raw_to_tool_data


def profile_tool_data(xplane_path, tool):
    """One Profile-tab tool's data for a trace, parsed: the converter's JSON, a list of
    Google Charts DataTables ({"cols": [{"id", "label", "type"}], "rows": [{"c": [{"v"}]}],
    "p": {name: text}}). RuntimeError when the converter finds nothing."""
    data, _ = profile_converter().xspace_to_tool_data([os.fspath(xplane_path)], tool, {})
    if not data:
        raise RuntimeError(f"the {tool} converter returned nothing for {xplane_path}")
    return json.loads(data)


def datatable_rows(table):
    """A DataTable's rows as [{column id: value}]."""
    ids = [col["id"] for col in table["cols"]]
    return [dict(zip(ids, (cell.get("v") if cell else None for cell in row["c"])))
            for row in table["rows"]]


def top_ops(op_stats, top=10):
    """(where, ops): framework_op_stats's operations by total self time, IDLE left out,
    on the device when the trace has device ops (a GPU), else on the host. Each op:
    type, name, count, self_ms and share (the converter's own: a fraction, 0-1, of that
    side's busy self time)."""
    rows = [r for r in datatable_rows(op_stats[-1]) if r["type"] != "IDLE"]  # last: no IDLE
    where = "Device" if any(r["host_or_device"] == "Device" for r in rows) else "Host"
    share = f"{where.lower()}_total_self_time_percent"  # named percent, holds a fraction
    rows = sorted((r for r in rows if r["host_or_device"] == where),
                  key=lambda r: -r["total_self_time"])
    return where, [{"type": r["type"], "name": r["operation"], "count": int(r["occurrences"]),
                    "self_ms": r["total_self_time"] / 1000, "share": r[share]}
                   for r in rows[:top]]


def step_breakdown(input_pipeline):
    """input_pipeline_analyzer's step-time table: {"conclusion": its verdict, "labels":
    {column id: label} of the parts any step spends time in, "steps": [{column id: ms}]}.
    The parts of a step add up to its step time."""
    table = next((t for t in input_pipeline if any(c["id"] == STEP_TOTAL for c in t["cols"])),
                 None)
    if table is None:
        raise RuntimeError("input_pipeline_analyzer holds no step-time table")
    steps = datatable_rows(table)
    parts = [c for c in table["cols"] if c["type"] == "number" and c["id"] != STEP_TOTAL]
    return {"conclusion": table.get("p", {}).get("input_conclusion", ""),
            "labels": {c["id"]: c["label"] for c in parts
                       if any(s[c["id"]] for s in steps) or c["id"] == STEP_INPUT},
            "steps": steps}


def text_table(header, rows, align):
    """Lines of a table padded to its widest cells; align: '<' or '>' per column."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(f"{c:{a}{w}}" for c, a, w in zip(row, align, widths)).rstrip()
            for row in cells]


def offline_profile_tables(xplane_path, top=10):
    """(sections, metrics): the trace's top operations by self time, its input-pipeline
    verdict and its step-time breakdown, read by the profile plugin's own converters
    (framework_op_stats, input_pipeline_analyzer) as the Profile tab would show them.
    sections: [(title, lines)] of aligned text; metrics: flat (the module's Metrics).
    Raises when the plugin is missing or a converter fails."""
    where, ops = top_ops(profile_tool_data(xplane_path, "framework_op_stats"), top)
    pipeline = step_breakdown(profile_tool_data(xplane_path, "input_pipeline_analyzer"))
    if not ops:
        raise RuntimeError("framework_op_stats holds no operations")
    sections = [(f"Top {len(ops)} operations by self time on the {where} "
                 "(framework_op_stats; IDLE left out)",
                 text_table(["#", "self ms", "share", "count", "type", "operation"],
                            [[i, f"{op['self_ms']:.3f}", f"{100 * op['share']:.1f}%",
                              op["count"], op["type"], op["name"]]
                             for i, op in enumerate(ops, 1)],
                            ">>>><<"))]
    metrics = {"top_op_name": ops[0]["name"], "top_op_type": ops[0]["type"],
               "top_op_where": where, "top_op_self_time_ms": ops[0]["self_ms"],
               "top_op_self_time_share": ops[0]["share"],
               "top_ops_self_time_share": sum(op["share"] for op in ops)}
    steps, labels = pipeline["steps"], pipeline["labels"]
    if not steps:  # no step markers in the trace: the converter says so in its verdict
        sections.append(("Input pipeline (input_pipeline_analyzer)", [pipeline["conclusion"]]))
        return sections, metrics
    mean = {key: float(np.mean([s[key] for s in steps])) for key in [*labels, STEP_TOTAL]}
    compute = sum(mean.get(key, 0.0) for key in STEP_COMPUTE)
    metrics.update({
        "input_wait_share_pct": 100 * mean[STEP_INPUT] / mean[STEP_TOTAL],
        "profile_traced_steps": len(steps), "profile_step_ms_avg": mean[STEP_TOTAL],
        "profile_compute_ms_avg": compute, "profile_input_ms_avg": mean[STEP_INPUT],
        "profile_other_ms_avg": mean[STEP_TOTAL] - compute - mean[STEP_INPUT]})
    sections.append(("Input pipeline (input_pipeline_analyzer)", [
        f"{metrics['input_wait_share_pct']:.1f}% of step time waits for input "
        f"({mean[STEP_INPUT]:.2f} of {mean[STEP_TOTAL]:.2f} ms a step, "
        f"{len(steps)} traced steps)", pipeline["conclusion"]]))
    rows = [[s["stepnum"], *(f"{s[key]:.2f}" for key in labels), f"{s[STEP_TOTAL]:.2f}"]
            for s in steps]
    rows.append(["average", *(f"{mean[key]:.2f}" for key in labels), f"{mean[STEP_TOTAL]:.2f}"])
    rows.append(["share", *(f"{100 * mean[key] / mean[STEP_TOTAL]:.1f}%" for key in labels),
                 "100%"])
    sections.append(("Step-time breakdown, ms (input_pipeline_analyzer)",
                     text_table(["step", *labels.values(), "step time"], rows,
                                "<" + ">" * (len(labels) + 1))))
    return sections, metrics


def profile_tables_or_notice(xplane_path, top=10):
    """offline_profile_tables(), or, when they cannot be made, one section of one line
    saying why, and metrics {"profile_tables_error": why}. Never raises."""
    try:
        if not xplane_path:
            raise RuntimeError("no trace was written")
        sections, metrics = offline_profile_tables(xplane_path, top)
        return sections, {**metrics, "profile_tables_error": ""}
    except Exception as error:  # a missing plugin, a failed or changed converter
        text = str(error).strip().splitlines()
        why = f"{type(error).__name__}: {text[0] if text else 'no message'}"
        if isinstance(error, ImportError):
            why += " (pip install tensorboard-plugin-profile)"
        return ([("Offline profile tables", [f"offline profile tables unavailable: {why}"])],
                {"profile_tables_error": why})


def check(config, data, model=None):
    """(batch size, total steps) of the run; ValueError (one line) for input that cannot run
    (`model`, yours, included: its output must classify the data's classes)."""
    if keras.backend.backend() != "tensorflow":
        raise ValueError(f"the profile recipe needs Keras's TensorFlow backend, not "
                         f"{keras.backend.backend()}; set KERAS_BACKEND=tensorflow")
    (x_train, _), _ = data
    batch_size = min(config.batch_size, len(x_train))
    steps_per_epoch = config.steps_per_epoch or len(x_train) // batch_size
    total_steps = config.epochs * steps_per_epoch
    first, last = config.profile_steps
    if last > total_steps:
        raise ValueError(f"--profile_steps={first},{last} is past the run's {total_steps} steps "
                         f"({config.epochs} epochs x {steps_per_epoch}); lower it or raise --epochs")
    if isinstance(model, keras.Model):
        classifier_loss(model, classes_in(data))
    return batch_size, total_steps


def run(config, run_dir, data, model=None):
    """Trains with the profiler and the monitor on; returns flat metrics for metrics.json.

    model: None for this recipe's small CNN, your keras.Model (a copy is traced and
    trained; yours is never changed) or fn(input_shape, num_classes).
    """
    start = time.perf_counter()
    batch_size, total_steps = check(config, data, model)
    keras.utils.set_random_seed(config.seed)
    (x_train, y_train), (x_val, y_val) = data
    first, last = config.profile_steps
    num_classes = classes_in(data)
    if model is None:
        model = build_model(x_train.shape[1:], num_classes)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = ["accuracy"]
    else:
        user = model if isinstance(model, keras.Model) else model(x_train.shape[1:], num_classes)
        loss_fn, metrics, why = classifier_loss(user, num_classes)
        model = fresh_model(user, x_train.shape[1:], num_classes)
        print(f"your model: {model.count_params():,} weights; loss: {why}")
    optimizer = keras.optimizers.Adam(config.learning_rate)
    model.compile(optimizer=optimizer, loss=loss_fn, metrics=metrics)
    train_ds = make_dataset(x_train, y_train, batch_size, config.seed, config.input_delay_ms,
                            config.parallel_calls, config.prefetch)
    writer = tf.summary.create_file_writer(run_dir)
    profiler = StepProfiler(run_dir, first, last)
    current = {"step": 0}
    monitor = Monitor(writer, config.sample_seconds, lambda: current["step"])
    print("GPUs: " + (", ".join(monitor.tf_gpus) or "none seen by TensorFlow") + "; "
          + ("nvidia-smi/NVML series are logged" if monitor.gpus_found else
             "no NVIDIA GPU found (no nvidia-smi or NVML): GPU series are absent, "
             "CPU and memory only"))
    pipeline_rate = pipeline_batches_per_sec(train_ds, min(50, total_steps))
    print(f"training {total_steps} steps of {batch_size}; tracing steps {first}-{last}")
    try:
        with monitor:
            waits, steps, losses = timed_steps(
                make_train_step(model, loss_fn, optimizer), train_ds, total_steps, profiler,
                on_step=step_logger(writer, current))
    finally:
        writer.close()  # flushes; the loss and monitor series stay even if training failed
    val_loss, val_accuracy = model.evaluate(
        make_dataset(x_val, y_val, batch_size, config.seed, shuffle=False, repeat=False),
        verbose=0)[:2]  # loss and accuracy come first

    waits = np.array(steady(waits, config.warmup_steps))
    steps = np.array(steady(steps, config.warmup_steps))
    # A step as training sees it: waiting for the batch, then computing on it.
    rates = throughput(waits + steps, batch_size, warmup=0)
    percent, bound, advice = input_bound_verdict(
        waits, steps, config.input_bound_percent, config.prefetch, config.parallel_calls,
        config.input_delay_ms > 0)
    traces = sorted(glob.glob(os.path.join(run_dir, "plugins", "profile", "*", "*.xplane.pb")))
    stats = monitor.summary()
    step_rate = 1000 / _ms(steps, 50)  # steps/s the train step alone runs: training on free data
    report = [
        f"{'':>12} {'p50 ms':>8} {'p90 ms':>8} {'share':>6}",
        f"{'input wait':>12} {_ms(waits, 50):>8.2f} {_ms(waits, 90):>8.2f} {percent:>5.0f}%",
        f"{'train step':>12} {_ms(steps, 50):>8.2f} {_ms(steps, 90):>8.2f} {100 - percent:>5.0f}%",
        f"{'whole step':>12} {rates['step_time_ms_p50']:>8.2f} {rates['step_time_ms_p90']:>8.2f}"
        f"        {rates['examples_per_sec']:.0f} examples/s",
        f"monitor: {stats['monitor_samples']} samples, CPU {stats['cpu_percent_mean']:.0f}% "
        f"mean (100 = one core), RSS max {stats['rss_mb_max']:.0f} MB"
        + ("" if monitor.gpus_found else "; no GPU series (no NVIDIA GPU)"),
        "trace: " + (traces[-1] if traces else "none written"),
        f"  view: tensorboard --logdir {run_dir}  (Profile tab; its charts need internet: "
        "offline, read the tables below, also in the Text tab)",
        f"input pipeline alone: {pipeline_rate:.0f} batches/s; the train step alone: "
        f"{step_rate:.0f} steps/s -> pipeline headroom {pipeline_rate / step_rate:.1f}x "
        "(below about 1x the input sets the pace, whatever the overlap)",
        *advice]
    print("\n" + "\n".join(report))
    sections, tables = profile_tables_or_notice(traces[-1] if traces else "")
    for title, lines in sections:  # or, when they cannot be made, the one line saying why
        print("\n".join(lines if tables["profile_tables_error"] else ["", title, *lines]))
    log_text_summary(run_dir, "\n\n".join(
        "\n".join([title, *lines]) for title, lines in
        [("Timing and verdict (this recipe's own timers, warm-up steps left out)", report),
         *sections]))
    return {
        "input_wait_percent": percent,
        "input_bound": bound,
        "input_wait_ms_p50": _ms(waits, 50), "input_wait_ms_p90": _ms(waits, 90),
        **rates,  # examples_per_sec and step_time_ms_p50/_p90 of the whole step
        "train_step_ms_p50": _ms(steps, 50), "train_step_ms_p90": _ms(steps, 90),
        "pipeline_batches_per_sec": pipeline_rate,
        "pipeline_headroom": pipeline_rate / step_rate,
        "gpu_count": len(monitor.tf_gpus),
        **stats,
        "loss": losses[-1], "val_loss": float(val_loss), "val_accuracy": float(val_accuracy),
        "profile_trace": traces[-1] if traces else "",
        **tables,  # top_op_*, input_wait_share_pct, profile_*_ms_avg: the offline tables
        "model_params": model.count_params(),
        "wall_time_s": time.perf_counter() - start,
    }

