"""Measured advice for your model: what makes its training faster here, proved by applying it.

Shows: short probes on your model and data, each timed against your configuration
as given (float32, your --batch_size, Keras' default jit_compile, one step per call,
your input pipeline: the arrays fed to fit, or keras.utils.image_dataset_from_directory
with its defaults for a folder), alternating in one process:
  1. input pipeline: the train step alone on in-memory batches against the step with
     your pipeline gives the share of step time spent waiting for data; when that is
     over --input_bound_percent, the stream recipe's tuned tf.data pipeline (parallel
     decode, a cache when it fits in memory, prefetch) is timed on the same data;
  2. precision: float32 against the 16-bit policy this hardware runs best
     (mixed_precision.fastest_16bit_policy), the largest difference in the model's
     outputs between them, and whether mixed_precision.choose_policy's rule agrees;
  3. batch size: doubled from yours until throughput rises less than 5% or memory
     runs out (an out-of-memory error is caught; on a CPU, --ram_budget_mb is the
     limit), with what a larger batch means for the learning rate;
  4. compilation: jit_compile flipped from Keras' default, and steps_per_execution
     1 against --steps_per_execution;
  5. size (no training): the saved model in float32 and after Keras' own
     model.quantize("int8"), the layers it left in float, the prune recipe's command;
  6. backend (experiments/advise_backend.py): your model, saved, timed on every installed
     Keras backend, each in a process of its own, alternating, on the same examples and
     batch; the fastest other one is a change (KERAS_BACKEND=...) like the others.
A change is recommended only when its gain clears the noise: the median speedup over
the repeats at least 1 + --noise, and every repeat faster but one in five. The
recommendations are ranked by what each would give end to end alone. Then two proofs.
Time to accuracy (experiments/advise_accuracy.py): the baseline and the advice trained
from the same weights in the same order for --proof_epochs, validated 4x per epoch, a
larger batch at a learning rate scaled by a stated rule; the seconds each takes to the
baseline's best accuracy less --accuracy_tolerance; a change that misses it is found
(proved again without it) and demoted. Throughput: what is still advised (the backend
aside) applied together to a fresh copy, timed against the untouched baseline,
alternating, beside the prediction. The prediction composes the gains as the
bottlenecks do: compute changes shrink the train step, the input pipeline's time partly
overlaps it (the overlap is fitted from the baseline), so a faster pipeline saves
nothing once the step is compute-bound. The report is experiments/advise_report.py.
Run:    python main.py --recipe=advise          # mixed_precision's CNN on its default data
        python main.py --recipe=advise --model=my_model.keras --data_dir=my_photos/
        KERAS_BACKEND=jax python main.py --recipe=advise
Expect: on the default (mixed_precision's 260k-weight CNN, 8,000 64x64 shapes_hard
        arrays, 2 shared CPU cores with AMX-BF16, TensorFlow, ~5 min), measured: input
        wait 7% (arrays); mixed_bfloat16 2.68x the train step (spread 2.10-2.99), outputs
        within 0.00024, as choose_policy's rule says; batch 64 1.17x; jit_compile=True
        0.65x and steps_per_execution=16 1.02x: not worth it; JAX 0.36x TensorFlow;
        int8 quantize leaves the four convolutions in float (912 kB vs 959 kB gzip).
        Time to accuracy: batch 64 (Adam at sqrt(2)x the rate) with bfloat16 reached
        0.655 in 2 epochs against the baseline's best 0.8245 and was demoted; bfloat16
        alone reached 0.8195 in 22.9 s against the baseline's 31.9 s (1.40x; 1.69-3.60x
        on other runs of this shared machine). Throughput proof: combined speedup 2.63x
        (predicted 2.41x). KERAS_BACKEND=jax: KERAS_BACKEND=tensorflow ranks first,
        2.88x; bfloat16 measures ~0.6x float32 on a dense model (XLA's CPU backend)
        and is not recommended. On a user-style ResNet with BatchNorm reading 2,000
        cat/dog JPEGs at 64x64 (benchmarks/advise.py): input wait 29%, the tuned
        pipeline and steps_per_execution together 1.32x (predicted 1.97x), time to
        accuracy 1.94x, but that network is near chance (0.55) after 2 epochs; at
        128x128 nothing clears the noise (bfloat16 1.01x with BatchNorm).
Copy:   an experiment only, with no drop-in file of its own: it composes the recipes'
        techniques (recipes.mixed_precision's choose_policy and under_policy,
        recipes.stream's tf.data pipeline for folders, recipes.step_timer) with the
        experiments' machinery. From this repository call
        experiments.advise.run(Config(), "logs", data, model=your_model), data being
        ((x_train, y_train), (x_val, y_val)) arrays or (train_dir, val_dir or None).
        Arrays need no TensorFlow (JAX backend); folders read through tf.data.
"""
import dataclasses
import itertools
import math
import os
import time

import keras
import numpy as np

from experiments.mixed_precision import batch_fetch_ms, build_model, has_tensorflow, peak_rss_mb
from experiments.pixels import PIXEL_RANGES, from_unit, pixel_range
from experiments.user_model import classifier_loss
from recipes import mixed_precision
from experiments import advise_accuracy, advise_backend, advise_report
from recipes.step_timer import StepTimer, steady, throughput

# What main.py feeds this recipe: mixed_precision's default data as arrays, or a folder
# (--data_dir) as a class-folder tree it reads through tf.data itself.
DATA = {"form": "arrays_or_directory", "image_size": 64, "channels": 3,
        "examples": (8000, 2000)}
DEFAULT_DATASET = "shapes_hard"  # mixed_precision's default data, for its default CNN
TAKES_MODEL = True  # run() takes model=: your keras.Model, timed in copies (yours is unchanged)
HEADLINE = ("combined_speedup", "predicted_speedup", "baseline_examples_per_sec",
            "advised_examples_per_sec", "input_wait_percent", "advised_policy",
            "advised_batch_size", "advised_jit_compile", "advised_steps_per_execution",
            "advised_pipeline", "time_to_accuracy_speedup", "baseline_time_to_target_s",
            "advised_time_to_target_s", "fastest_backend", "wall_time_s")
PROBE_SHARE = 0.5  # of --budget_s: the probes' measurements (the proofs and the backends share
# the rest: advise_accuracy.PROOF_SHARE, and the backends' repeats at the probes' length)
BATCH_GAIN = 0.05  # the batch search goes on while doubling raises throughput by this much
POOL_BYTES = 512 * 2**20  # in-memory batches for the compute probes: at most this much


@dataclasses.dataclass
class Config:
    batch_size: int = 32  # your batch size: the baseline every probe is timed against
    budget_s: float = 300.0  # seconds of measuring and proving the run aims at: half for the
    # probes (each measurement scales with it), a third for the time-to-accuracy proof, the rest
    # for the backends; compiling and reading the data come on top: ~5 min in all for the default
    repeats: int = 5  # alternating repeats of every comparison (the spread is over these;
    # many short ones resist a shared machine's drifting load better than a few long ones)
    noise: float = 0.05  # a change must be at least this much faster (median) to be advised
    max_batch_size: int = 2048  # the batch search stops here
    steps_per_execution: int = 16  # the larger steps_per_execution the compile probe times
    ram_budget_mb: int | None = None  # CPU memory the batch search may reach (peak RSS);
    # default: half of what is available at the start
    input_bound_percent: float = 10.0  # input wait above this share of the step times the
    # tuned tf.data pipeline
    image_size: int = 64  # square size folder images are read at (--model sets its own)
    learning_rate: float = 1e-3  # Adam's, when your model brings no compiled optimizer
    seed: int = 0  # initial weights of the default CNN, batch order
    pixel_range: str = "auto"  # auto, 0_255, 0_1 or -1_1: what folder images reach your model in
    proof_epochs: int = 2  # epochs the time-to-accuracy proof trains the baseline and the advice
    # for (from the same weights, in the same order); the target is the baseline's best
    accuracy_tolerance: float = 0.005  # the target: the baseline's best validation accuracy
    # in --proof_epochs less this
    backends: str = "auto"  # Keras backends to time your model on, each in its own process:
    # auto (every installed one, when --budget_s is 135 or more), none, or a comma list
    # (tensorflow,jax,torch)

    def __post_init__(self):
        if self.batch_size < 1 or self.repeats < 1 or self.image_size < 8:
            raise ValueError("--batch_size and --repeats must be >= 1, --image_size >= 8")
        if not self.budget_s > 0:
            raise ValueError(f"--budget_s must be > 0, got {self.budget_s}")
        if self.max_batch_size < self.batch_size:
            raise ValueError(f"--max_batch_size ({self.max_batch_size}) must be at least "
                             f"--batch_size ({self.batch_size})")
        if self.steps_per_execution < 2:
            raise ValueError("--steps_per_execution must be >= 2 (1 is the baseline)")
        if not 0 <= self.noise < 1 or not 0 <= self.input_bound_percent <= 100:
            raise ValueError("--noise must be in [0, 1) and --input_bound_percent in [0, 100]")
        if self.ram_budget_mb is not None and self.ram_budget_mb < 1:
            raise ValueError("--ram_budget_mb must be >= 1")
        if self.proof_epochs < 1 or not 0 <= self.accuracy_tolerance < 1:
            raise ValueError("--proof_epochs must be >= 1 and --accuracy_tolerance in [0, 1)")
        unknown = set(self.backends.split(",")) - {"auto", "none", "tensorflow", "jax", "torch"}
        if unknown:
            raise ValueError(f"--backends: unknown {', '.join(sorted(unknown))}; use auto, none "
                             "or a comma list of tensorflow, jax, torch")


# --- what one training configuration is, and one timed copy of the model under it ------

@dataclasses.dataclass(frozen=True)
class Setting:
    """The knobs the probes turn. The baseline is Setting(batch_size=yours)."""
    batch_size: int
    policy: str = "float32"
    jit_compile: object = "auto"  # Keras' default; True / False when a probe sets it
    steps_per_execution: int = 1
    pipeline: str = "yours"  # or "tuned"


class Trial:
    """A compiled copy of the model under one Setting, fed by one source, timed one fit
    call at a time with the kit's StepTimer (which waits for the device)."""

    def __init__(self, setting, model, feed):
        self.setting, self.model, self.feed = setting, model, feed
        self.examples_per_call = setting.batch_size * setting.steps_per_execution
        self.timer = StepTimer()
        self.calls = 3
        self.compile_s = None

    def run(self, calls):
        self.timer.seconds = []
        self.feed(self.model, calls * self.setting.steps_per_execution, [self.timer])
        return list(self.timer.seconds)

    def warm_up(self, seconds):
        """The first calls trace and compile; then the calls per measurement that take
        about `seconds`, from a few timed ones."""
        start = time.perf_counter()
        self.run(1)
        self.compile_s = time.perf_counter() - start
        per_call = float(np.median(steady(self.run(2), 1)))
        self.calls = int(min(200, max(3, round(seconds / max(per_call, 1e-6)))))
        return self

    def seconds_per_example(self):
        """One measurement: median seconds per call / examples per call (the first call of
        each fit, which starts the iterator, is left out)."""
        rate = throughput(self.run(self.calls + 1), self.examples_per_call, 1)
        return 1 / rate["examples_per_sec"]


@dataclasses.dataclass
class Comparison:
    """Two trials timed alternately: per-repeat speedups of the candidate."""
    speedups: list
    baseline_s: float  # median seconds per example
    candidate_s: float

    @property
    def speedup(self):
        return float(np.median(self.speedups))

    @property
    def spread(self):
        return float(min(self.speedups)), float(max(self.speedups))

    def clears(self, noise):
        """Faster beyond the noise: the median by 1 + noise, and every repeat faster but
        one in five (a shared machine's load spikes now and then)."""
        return (self.speedup >= 1 + noise
                and sorted(self.speedups)[len(self.speedups) // 5] > 1)


CLEAR_LOSS = 0.5  # a candidate at half the baseline's speed or less needs no more repeats


def compare(baseline, candidate, repeats):
    """Times baseline and candidate in turn, who goes first alternating, `repeats` times
    (once when the candidate is a clear loss: eager JAX steps, say, take seconds)."""
    base, cand = [], []
    for r in range(repeats):
        for trial in ((baseline, candidate) if r % 2 == 0 else (candidate, baseline)):
            (base if trial is baseline else cand).append(trial.seconds_per_example())
        if base[-1] / cand[-1] <= CLEAR_LOSS:
            break
    return Comparison([b / c for b, c in zip(base, cand)], float(np.median(base)),
                      float(np.median(cand)))


def is_out_of_memory(error):
    """Out of memory on any backend: MemoryError, TensorFlow's ResourceExhaustedError,
    XLA's RESOURCE_EXHAUSTED, CUDA's 'out of memory'."""
    text = f"{type(error).__name__} {error}"
    return (isinstance(error, MemoryError) or "ResourceExhausted" in text
            or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower())


def available_ram_mb():
    """MemAvailable (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def on_gpu():
    return any(kind == "gpu" for kind, _ in mixed_precision.accelerators())


# --- the data: your pipeline, the tuned one, and in-memory batches -----------------------

class Data:
    """The user's training data, and the feeds each Setting reads it through."""

    def __init__(self, data, config, reference):
        self.folder = isinstance(data[0], (str, os.PathLike))
        self.config, self.seed = config, config.seed
        if self.folder:
            from experiments import stream as stream_experiment
            from recipes import stream  # tf.data: only folders need TensorFlow
            self.stream = stream
            self.train, self.val, _, _ = stream_experiment.check(stream_config(config), data,
                                                                 reference)
            self.n_train, self.num_classes = len(self.train.paths), len(self.train.class_names)
            self.pixels, _, why = pixel_range(reference, config.pixel_range)
            print(f"pixels reach the model in {PIXEL_RANGES[self.pixels][0]}: {why}")
            self.train_dir = data[0]
        else:
            (self.x, self.y), (self.x_val, self.y_val) = data
            self.x, self.x_val = np.asarray(self.x, "float32"), np.asarray(self.x_val, "float32")
            self.y, self.y_val = np.asarray(self.y), np.asarray(self.y_val)
            self.n_train = len(self.x)
            self.num_classes = int(max(self.y.max(), self.y_val.max())) + 1
        self.tuned_cache = None  # "memory" or "none", once the tuned pipeline is built
        self.tuned_datasets = {}  # batch size -> the tuned pipeline, its cache filled once
        self.cache_fill_s = {}  # batch size -> seconds its cache took to fill

    # Your pipeline, as given.
    def yours(self, batch_size):
        if not self.folder:
            return self.arrays_feed(batch_size)
        return dataset_feed(self.user_dataset(batch_size), "yours")

    def arrays_feed(self, batch_size):
        """Your arrays handed to fit, as many epochs as a measurement's steps need. An epoch
        is whole calls of steps_per_execution steps: arrays too short for one call are
        repeated (only tiny sets are)."""
        def feed(model, steps, callbacks):
            spe = model.steps_per_execution
            reps = math.ceil(spe * batch_size / self.n_train)
            x, y = (np.concatenate([self.x] * reps), np.concatenate([self.y] * reps)) \
                if reps > 1 else (self.x, self.y)
            per_epoch = min(steps, len(x) // batch_size // spe * spe)
            model.fit(x, y, batch_size=batch_size, epochs=math.ceil(steps / per_epoch),
                      steps_per_epoch=per_epoch, verbose=0, callbacks=callbacks)
        feed.pipeline, feed.batch_seen = "yours", batch_size
        return feed

    def tuned_dataset(self, batch_size):
        """The stream recipe's tf.data pipeline: parallel decode, a memory cache when the
        decoded images fit in a quarter of the RAM budget, shuffle, prefetch. Built (and
        its cache filled, one decode of every image) once per batch size: the end-to-end
        trial and the pipeline-alone timing read the same one."""
        if batch_size not in self.tuned_datasets:
            self.tuned_datasets[batch_size] = self._build_tuned(batch_size)
        return self.tuned_datasets[batch_size]

    def _build_tuned(self, batch_size):
        import tensorflow as tf
        if not self.folder:
            ds = tf.data.Dataset.from_tensor_slices((self.x, self.y)).cache()
            ds = ds.shuffle(self.n_train, seed=self.seed).batch(batch_size)
            self.tuned_cache = "memory"
            return ds.repeat().prefetch(tf.data.AUTOTUNE)
        size = self.config.image_size
        fits = self.n_train * size * size * 3 < ram_budget_mb(self.config) * 2**20 / 4
        self.tuned_cache = "memory" if fits else "none"
        ds, cached = self.stream.tf_data_pipeline(self.train.paths, self.train.labels, size,
                                                  batch_size, training=True,
                                                  cache=self.tuned_cache, seed=self.seed)
        ds = ds.repeat().prefetch(tf.data.AUTOTUNE)  # passes, as many as the steps need
        if cached is not None:
            start = time.perf_counter()
            self.stream.fill_cache(cached)  # decoded once, before any timing
            self.cache_fill_s[batch_size] = time.perf_counter() - start
        pixels = self.pixels
        if pixels != "0_1":  # the pipeline gives [0, 1]; your model takes another range
            ds = ds.map(lambda x, y: (from_unit(x, pixels), y))
        return ds

    def tuned(self, batch_size):
        return dataset_feed(self.tuned_dataset(batch_size), "tuned")

    def feed(self, setting):
        return (self.tuned if setting.pipeline == "tuned" else self.yours)(setting.batch_size)

    def input_seconds_per_example(self, pipeline, batch_size, batches=20):
        """The pipeline alone: seconds per example to produce batches (no training)."""
        if pipeline == "yours" and not self.folder:
            ms = batch_fetch_ms(self.x, batch_size, self.seed, batches)
            return ms / 1000 / batch_size
        ds = self.tuned_dataset(batch_size) if pipeline == "tuned" else self.user_dataset(
            batch_size)
        iterator = iter(ds)
        for _ in range(3):  # the first batches fill the prefetch buffer
            next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        return (time.perf_counter() - start) / batches / batch_size

    def user_dataset(self, batch_size):
        """keras.utils.image_dataset_from_directory with its defaults, scaled to what the
        model takes. (ignore_errors: files the folder check skipped would stop it.)"""
        ds = keras.utils.image_dataset_from_directory(
            self.train_dir, image_size=(self.config.image_size,) * 2, batch_size=batch_size,
            seed=self.seed, verbose=False)
        pixels = self.pixels  # it gives 0-255
        ds = ds.map(lambda x, y: (from_unit(x / 255.0, pixels), y)) if pixels != "0_255" else ds
        return ds.ignore_errors().repeat()

    def pool(self, limit):
        """(x, y): up to `limit` training examples in memory, for batches with no pipeline."""
        if not self.folder:
            return self.x[:limit], self.y[:limit]
        xs, ys, n = [], [], 0
        for x, y in self.user_dataset(min(limit, 256)):
            xs.append(np.asarray(x))
            ys.append(np.asarray(y))
            n += len(xs[-1])
            if n >= min(limit, self.n_train):
                break
        return np.concatenate(xs)[:limit], np.concatenate(ys)[:limit]

    def validation_arrays(self, limit=512):
        if not self.folder:
            return self.x_val[:limit], self.y_val[:limit]
        ds, _ = self.stream.tf_data_pipeline(self.val.paths, self.val.labels,
                                             self.config.image_size, limit, training=False)
        x, y = next(iter(ds))
        return from_unit(np.asarray(x), self.pixels), np.asarray(y)


def stream_config(config):
    """The stream recipe's Config for its folder checks, at this run's image size."""
    from experiments import stream
    return stream.Config(image_size=config.image_size, batch_size=config.batch_size,
                         on_bad_image="skip", seed=config.seed)


def dataset_feed(ds, pipeline):
    """fit on `ds` for a number of steps; the feed remembers which pipeline it is and the
    batch size it really yields: the larger of its first two batches (a pass over 96
    examples in batches of 64 ends in a short one; one test run here read 32 first)."""
    def feed(model, steps, callbacks):
        # shuffle=False: a dataset shuffles itself (and fit would shuffle a PyDataset's index)
        model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=callbacks,
                  shuffle=False)
    feed.pipeline = pipeline
    firsts = [ds[0]] if isinstance(ds, keras.utils.PyDataset) else itertools.islice(ds, 2)
    feed.batch_seen = max(int(keras.ops.shape(batch[0])[0]) for batch in firsts)
    return feed


def memory_feed(x, y, batch_size):
    """The same in-memory batch at every step: the train step with no input pipeline."""
    xb, yb = x[:batch_size], y[:batch_size]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        return dataset_feed(tf.data.Dataset.from_tensors((xb, yb)).repeat(), "in memory")

    class OneBatch(keras.utils.PyDataset):
        def __len__(self):  # more steps than any measurement takes
            return 10**6

        def __getitem__(self, index):
            return xb, yb
    return dataset_feed(OneBatch(), "in memory")


def ram_budget_mb(config):
    return config.ram_budget_mb or available_ram_mb() / 2


# --- the model under a Setting --------------------------------------------------------

class Models:
    """Compiled copies of the reference model, one per Setting, from the same weights."""

    def __init__(self, reference, num_classes, config):
        self.reference, self.config = reference, config
        self.loss, self.metrics, self.loss_why = classifier_loss(reference, num_classes)

    def optimizer(self):
        """A fresh optimizer like the model's compiled one (its config), else Adam."""
        if getattr(self.reference, "optimizer", None) is not None:
            return keras.optimizers.deserialize(keras.optimizers.serialize(
                self.reference.optimizer))
        return keras.optimizers.Adam(self.config.learning_rate)

    def uncompiled(self, policy):
        with mixed_precision.global_policy(policy):
            return mixed_precision.under_policy(self.reference, policy)

    def compiled(self, setting, optimizer=None):
        with mixed_precision.global_policy(setting.policy):  # compile reads it (loss scaling)
            model = mixed_precision.under_policy(self.reference, setting.policy)
            mixed_precision.check_policy_applied(model, setting.policy)
            model.compile(optimizer=optimizer or self.optimizer(), loss=self.loss,
                          metrics=self.metrics,
                          jit_compile=setting.jit_compile,
                          steps_per_execution=setting.steps_per_execution)
        return model


# --- the probes --------------------------------------------------------------------------

@dataclasses.dataclass
class Finding:
    """One change a probe measured, advised or not."""
    change: str  # what it is, in words
    code: str  # the line to write
    comparison: Comparison | None
    acts_on: str  # "train step" (timed on in-memory batches) or "end to end"
    cost: str
    measured_by: str  # the measurement it came from
    setting: dict  # the Setting fields it changes
    recommended: bool = False
    end_to_end: float = 1.0  # what it alone would give end to end (measured or predicted)
    demoted: str = ""  # why it is no longer advised although it was faster (accuracy)
    proof: str = ""  # a proof of its own, with the other advised changes (the backend's)

    def as_metrics(self):
        low, high = self.comparison.spread if self.comparison else (math.nan, math.nan)
        return {"change": self.change, "code": self.code,
                "speedup": round(self.comparison.speedup, 4) if self.comparison else None,
                "spread": [round(low, 4), round(high, 4)], "acts_on": self.acts_on,
                "end_to_end_speedup": round(self.end_to_end, 4), "cost": self.cost,
                "measured_by": self.measured_by, "setting": self.setting,
                **({"demoted": self.demoted} if self.demoted else {})}


class Probes:
    """The probes, sharing the baseline trials and the measurement budget."""

    def __init__(self, models, data, config):
        self.models, self.data, self.config = models, data, config
        self.base = Setting(batch_size=min(config.batch_size, data.n_train))
        # ~20 measurements per repeat, plus compiling, fill the probes' share of the budget.
        share = PROBE_SHARE * config.budget_s
        self.measure_s = share / (50 * config.repeats)
        self.deadline = time.perf_counter() + share
        limit = min(config.max_batch_size, data.n_train,
                    max(self.base.batch_size, POOL_BYTES // example_bytes(models.reference)))
        self.pool_x, self.pool_y = data.pool(limit)
        self.compute = {}  # Setting -> Trial on in-memory batches
        self.scalars = {}  # TensorBoard tag -> [(step, value)]

    def log(self, tag, value, step=0):
        self.scalars.setdefault(tag, []).append((step, float(value)))

    def compute_trial(self, setting):
        if setting not in self.compute:
            model = self.models.compiled(setting)
            feed = memory_feed(self.pool_x, self.pool_y, setting.batch_size)
            self.compute[setting] = Trial(setting, model, feed).warm_up(self.measure_s)
        return self.compute[setting]

    def end_to_end_trial(self, setting):
        return Trial(setting, self.models.compiled(setting),
                     self.data.feed(setting)).warm_up(self.measure_s)

    def time_left(self):
        return self.deadline - time.perf_counter()

    # 1. input pipeline
    def input_pipeline(self):
        """The Finding for the tuned pipeline (timed only when input-bound); sets the
        Bottleneck models of the baseline (self.baseline) and of the tuned pipeline."""
        base, repeats = self.base, self.config.repeats
        yours = self.end_to_end_trial(base)
        measured = compare(yours, self.compute_trial(base), repeats)
        step_s, compute_s = measured.baseline_s, measured.candidate_s
        wait = max(0.0, 1 - compute_s / step_s)
        input_s = self.data.input_seconds_per_example("yours", base.batch_size)
        # Waiting longer than the pipeline alone takes is time fit spends on the data
        # serially (handing batches over, fighting for the cores): input time too.
        self.baseline = Bottleneck(compute_s, max(input_s, step_s - compute_s), step_s)
        self.input_wait_percent = 100 * wait
        self.log("input/wait_percent", self.input_wait_percent)
        self.log("input/pipeline_alone_examples_per_sec", 1 / input_s)
        self.log("input/train_step_alone_examples_per_sec", 1 / compute_s)
        self.log("input/end_to_end_examples_per_sec", 1 / step_s)
        print(f"input: {self.input_wait_percent:.0f}% of the step waits for data "
              f"({1 / step_s:,.0f} examples/s end to end, {1 / compute_s:,.0f} with the data "
              f"in memory, the pipeline alone {1 / input_s:,.0f})")
        self.yours = yours
        what = "a tf.data pipeline from the arrays: cache, shuffle, prefetch" if \
            not self.data.folder else "the stream recipe's tf.data pipeline"
        if self.input_wait_percent < self.config.input_bound_percent:
            return Finding(f"tuned input pipeline ({what})", "not timed", None, "end to end",
                           f"input wait {self.input_wait_percent:.0f}% of the step, under "
                           f"--input_bound_percent={self.config.input_bound_percent:g}: not "
                           "input-bound", "input probe", {"pipeline": "tuned"})
        if not self.data.folder and keras.backend.backend() != "tensorflow":
            return Finding(f"tuned input pipeline ({what})", "not timed", None, "end to end",
                           "needs tf.data (the TensorFlow backend)", "input probe",
                           {"pipeline": "tuned"})
        tuned_setting = dataclasses.replace(base, pipeline="tuned")
        tuned = self.end_to_end_trial(tuned_setting)
        measured = compare(yours, tuned, repeats)
        tuned_input_s = self.data.input_seconds_per_example("tuned", base.batch_size)
        self.tuned = Bottleneck(compute_s, max(tuned_input_s, measured.candidate_s - compute_s),
                                measured.candidate_s)
        self.log("input/tuned_speedup", measured.speedup)
        cache = self.data.tuned_cache
        code = ("ds = tf.data.Dataset.from_tensor_slices((x, y)).cache().shuffle(len(x))"
                ".batch(batch_size).prefetch(tf.data.AUTOTUNE)" if not self.data.folder else
                "ds, _ = recipes.stream.tf_data_pipeline(paths, labels, "
                f"{self.config.image_size}, batch_size, training=True, cache={cache!r})")
        cost = ("a memory cache of the decoded images: "
                f"{self.data.n_train * self.config.image_size ** 2 * 3 / 2**20:,.0f} MB"
                if cache == "memory" and self.data.folder else
                "no cache (the images would not fit in memory): decode in parallel, prefetch"
                if self.data.folder else "a copy of the arrays in the tf.data cache")
        return Finding(f"tuned input pipeline ({what})", code, measured, "end to end", cost,
                       f"input probe: your pipeline vs the tuned one, {repeats} alternating "
                       "repeats end to end", {"pipeline": "tuned"},
                       end_to_end=measured.speedup)

    # 2. precision
    def precision(self):
        policy = mixed_precision.fastest_16bit_policy()
        rule, reason = mixed_precision.choose_policy(model=self.models.reference)
        trial = self.compute_trial(dataclasses.replace(self.base, policy=policy))
        measured = compare(self.compute_trial(self.base), trial, self.config.repeats)
        x = self.pool_x[:64]
        # Called directly, not through predict: each predict on a new model traces anew.
        outputs = [keras.ops.convert_to_numpy(self.models.uncompiled(p)(x, training=False))
                   for p in ("float32", policy)]
        diff = float(np.max(np.abs(outputs[0].astype("float32") - outputs[1].astype("float32"))))
        faster = measured.clears(self.config.noise)
        self.precision_agrees = (rule != "float32") == faster
        self.precision_rule = f"{rule} ({reason})"
        self.log("precision/speedup", measured.speedup)
        self.log("precision/max_output_difference", diff)
        verdict = "agrees with" if self.precision_agrees else "contradicts"
        print(f"precision: {policy} {measured.speedup:.2f}x float32's train step; "
              f"outputs differ by up to {diff:.2g}; the measurement {verdict} "
              f"choose_policy's rule, which picks {rule}")
        self.precision_diff = diff
        return Finding(f"mixed precision {policy}",
                       f'keras.mixed_precision.set_global_policy("{policy}")', measured,
                       "train step", f"outputs differ by up to {diff:.2g} (max |float32 - "
                       f"{policy.split('_')[1]}| on 64 examples); {verdict} choose_policy "
                       f"(picks {rule})", f"precision probe: float32 vs {policy} on in-memory "
                       f"batches, {self.config.repeats} alternating repeats", {"policy": policy})

    # 3. batch size
    def batch_size(self):
        base, config = self.base, self.config
        budget = None if on_gpu() else ram_budget_mb(config)
        if budget is not None:
            print(f"batch search: CPU memory budget {budget:,.0f} MB of peak RSS "
                  "(--ram_budget_mb)")
        baseline = self.compute_trial(base)
        best, best_cmp, previous, tried = base.batch_size, None, 1.0, []
        stop, rss = f"reached --max_batch_size or the examples held ({len(self.pool_x)})", []
        size = base.batch_size * 2
        share_end = time.perf_counter() + 0.35 * max(self.time_left(), 0)
        while size <= len(self.pool_x):
            if time.perf_counter() > share_end:
                stop = "the batch probe's time box ran out"
                break
            if budget is not None and len(rss) >= 2 and 2 * rss[-1] - rss[-2] > budget:
                stop = (f"batch {size} would need about {2 * rss[-1] - rss[-2]:,.0f} MB, over "
                        f"the {budget:,.0f} MB budget")
                break
            setting = dataclasses.replace(base, batch_size=size)
            try:
                measured = compare(baseline, self.compute_trial(setting), config.repeats)
            except Exception as error:  # out of memory ends the search; anything else is a bug
                if not is_out_of_memory(error):
                    raise
                self.compute.pop(setting, None)
                stop = f"out of memory at batch {size} ({type(error).__name__})"
                break
            rss.append(peak_rss_mb())
            if budget is not None and rss[-1] > budget:
                stop = f"batch {size} took peak RSS to {rss[-1]:,.0f} MB, over the budget"
                break
            tried.append(size)
            self.log("batch/examples_per_sec", 1 / measured.candidate_s, step=size)
            self.log("batch/speedup", measured.speedup, step=size)
            print(f"batch {size}: {measured.speedup:.2f}x batch {base.batch_size}'s train step")
            if measured.speedup < previous * (1 + BATCH_GAIN):
                stop = f"throughput rose less than {BATCH_GAIN:.0%} from batch {size // 2}"
                break
            best, best_cmp, previous = size, measured, measured.speedup
            size *= 2
        self.batch_tried, self.batch_stop = tried, stop
        print(f"batch search: stopped, {stop}")
        scale = best / base.batch_size
        steps = self.data.n_train // best // advise_accuracy.CHECKS_PER_EPOCH
        _, rule = advise_accuracy.scaled_optimizer(self.models.optimizer(), scale, steps)
        lr = (f"learning rate: {rule}, as the accuracy proof trains it; fewer, larger steps "
              "per epoch")
        if best_cmp is None:
            last = tried[-1] if tried else None
            return Finding(f"batch size {2 * base.batch_size}", f"batch_size={2 * base.batch_size}",
                           None, "train step", f"searched: {stop}", "batch probe",
                           {"batch_size": last or 2 * base.batch_size})
        return Finding(f"batch size {best}", f"batch_size={best}", best_cmp, "train step",
                       f"{lr}; search stopped: {stop}", f"batch probe: batch {base.batch_size} "
                       f"vs {best} on in-memory batches, {config.repeats} alternating repeats",
                       {"batch_size": best})

    # 4. compilation
    def jit(self):
        baseline = self.compute_trial(self.base)
        default = bool(baseline.model.jit_compile)  # what "auto" resolved to here
        setting = dataclasses.replace(self.base, jit_compile=not default)
        trial = self.compute_trial(setting)
        measured = compare(baseline, trial, self.config.repeats)
        self.log("compile/jit_compile_flipped_speedup", measured.speedup)
        print(f"compile: jit_compile={not default} {measured.speedup:.2f}x Keras' default "
              f"({default} here); its first calls took {trial.compile_s:.1f} s")
        return Finding(f"jit_compile={not default} (Keras' default resolved to {default})",
                       f"model.compile(..., jit_compile={not default})", measured, "train step",
                       f"the first calls took {trial.compile_s:.1f} s (tracing, compiling)",
                       f"compile probe: jit_compile {default} vs {not default} on in-memory "
                       f"batches, {self.config.repeats} alternating repeats",
                       {"jit_compile": not default})

    def steps_per_execution(self):
        spe = self.config.steps_per_execution
        setting = dataclasses.replace(self.base, steps_per_execution=spe)
        measured = compare(self.compute_trial(self.base), self.compute_trial(setting),
                           self.config.repeats)
        self.log("compile/steps_per_execution_speedup", measured.speedup)
        print(f"compile: steps_per_execution={spe} {measured.speedup:.2f}x one step per call")
        return Finding(f"steps_per_execution={spe}",
                       f"model.compile(..., steps_per_execution={spe})", measured, "train step",
                       f"callbacks and the progress bar update every {spe} steps",
                       f"compile probe: steps_per_execution 1 vs {spe} on in-memory batches, "
                       f"{self.config.repeats} alternating repeats",
                       {"steps_per_execution": spe})


def example_bytes(model):
    shape = [d or 1 for d in model.inputs[0].shape[1:]]
    return 4 * int(np.prod(shape))


# --- composing the gains as the bottlenecks do -----------------------------------------

@dataclasses.dataclass
class Bottleneck:
    """Seconds per example of the train step alone (compute), of the pipeline alone
    (input), and of the two together (step), measured. Together they take the longer of
    the two plus a share `overlap` of the shorter: 0 when prefetching hides the shorter
    completely, 1 when they run one after the other (or fight for the same cores). The
    share is fitted to the measured step; other step times scale from it."""
    compute_s: float
    input_s: float
    step_s: float

    @property
    def overlap(self):
        short, long = sorted((self.compute_s, self.input_s))
        return float(np.clip((self.step_s - long) / short, 0, 1)) if short > 0 else 0.0

    def shape(self, compute_s):
        short, long = sorted((compute_s, self.input_s))
        return long + self.overlap * short

    def step_with(self, compute_s):
        """The step when the train step alone takes compute_s instead."""
        return self.step_s * self.shape(compute_s) / self.shape(self.compute_s)


def predict(baseline, pipeline, compute_gain):
    """End-to-end speedup over the baseline when the train step gets compute_gain times
    faster and the input comes from `pipeline` (a Bottleneck measured on it)."""
    return baseline.step_s / pipeline.step_with(baseline.compute_s / compute_gain)


# --- the recipe ---------------------------------------------------------------------

def reference_model(model, data_shape, num_classes, config):
    if model is None:
        keras.utils.set_random_seed(config.seed)
        return build_model(data_shape, num_classes)
    if isinstance(model, keras.Model):
        return model
    return model(data_shape, num_classes)


def check(config, data, model=None):
    """ValueError (one line) for data or a model advise cannot time."""
    if isinstance(data[0], (str, os.PathLike)):
        if not has_tensorflow():
            raise ValueError("advise reads folders through tf.data: install tensorflow, or "
                             "pass arrays (--dataset=npz)")
        from experiments import stream
        train, _, _, _ = stream.check(stream_config(config), data, model)
        num_classes = len(train.class_names)
    else:
        (x, y), (x_val, y_val) = data
        if len(x) < config.batch_size:
            raise ValueError(f"--batch_size={config.batch_size} is more than the {len(x)} "
                             "training examples")
        num_classes = int(max(np.max(y), np.max(y_val))) + 1
    if isinstance(model, keras.Model):
        classifier_loss(model, num_classes)


def start(config, data, model):
    """The reference model, the data and the Probes over them; prints what the baseline is."""
    folder = isinstance(data[0], (str, os.PathLike))
    shape = ((config.image_size, config.image_size, 3) if folder
             else tuple(np.asarray(data[0][0]).shape[1:]))
    if folder:
        from experiments import image_folder
        num_classes = len(image_folder.class_names_of(data[0]))
    else:
        num_classes = int(max(np.max(data[0][1]), np.max(data[1][1]))) + 1
    reference = reference_model(model, shape, num_classes, config)
    inputs = Data(data, config, reference)
    models = Models(reference, inputs.num_classes, config)
    print(f"advise: {reference.count_params():,} weights, loss: {models.loss_why}; "
          f"backend {keras.backend.backend()}"
          f"{', GPU' if on_gpu() else ', CPU'}; baseline: float32, batch "
          f"{min(config.batch_size, inputs.n_train)}, jit_compile auto, one step per call, "
          f"{'image_dataset_from_directory' if folder else 'arrays to fit'}; "
          f"budget {config.budget_s:g} s")
    return Probes(models, inputs, config)


def run(config, run_dir, data, model=None):
    """Probes, ranks, proves time to accuracy (demoting what misses it), times the
    backends, applies the winners together and measures again; returns metrics.

    model: None for mixed_precision's CNN, your keras.Model (timed in copies from its
    weights; yours is never changed) or fn(input_shape, num_classes).
    """
    began = time.perf_counter()
    check(config, data, model)
    os.makedirs(run_dir, exist_ok=True)
    previous = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("float32")
        probes = start(config, data, model)
        findings = [probes.input_pipeline(), probes.precision(), probes.batch_size(),
                    probes.jit(), probes.steps_per_execution()]
        recommended = rank(probes, findings, config)
        accuracy = advise_accuracy.prove(probes, recommended, config,
                                         advice(probes, recommended)[1])
        advised, _ = advice(probes, rank(probes, findings, config))  # less what was demoted
        backend, backend_metrics = advise_backend.probe(probes, advised, config, run_dir)
        findings += [backend] if backend else []
        metrics, table = prove(probes, findings, config)
        metrics.update(advise_report.size_probe(probes.models.reference, run_dir,
                                                probes.data.validation_arrays()[0]))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    closing = advise_report.closing_lines(metrics, accuracy)
    print("\n" + table + "\n" + closing)
    advise_report.log_tensorboard(os.path.join(run_dir, "advise"), probes, findings,
                                  metrics["combined_speedup"], table + "\n" + closing, accuracy)
    metrics.update(advise_accuracy.metrics(accuracy), **backend_metrics,
                   model_params=probes.models.reference.count_params(),
                   backend=keras.backend.backend(),
                   prune_command="python main.py --recipe=prune --model=YOUR_MODEL.keras",
                   wall_time_s=time.perf_counter() - began)
    return metrics


def rank(probes, findings, config):
    """Marks what clears the noise (unless demoted) and what each train-step change alone
    gives end to end; the recommended, best first."""
    for f in findings:
        if f.comparison is None or f.demoted:
            continue
        f.recommended = f.comparison.clears(config.noise)
        if f.acts_on == "train step":
            f.end_to_end = predict(probes.baseline, probes.baseline, f.comparison.speedup)
    return sorted((f for f in findings if f.recommended), key=lambda f: -f.end_to_end)


def advice(probes, recommended):
    """(the Setting with every recommended change, its predicted end-to-end speedup)."""
    baseline = probes.baseline
    pipeline = probes.tuned if getattr(probes, "tuned", None) else baseline
    advised = advise_accuracy.with_changes(probes.base, recommended)
    gain = math.prod(f.comparison.speedup for f in recommended if f.acts_on == "train step")
    return advised, predict(baseline, pipeline if advised.pipeline == "tuned" else baseline, gain)


def prove(probes, findings, config):
    """Applies every recommended change (the backend aside) together and measures it
    against the untouched baseline, alternating; the metrics and the ranked table."""
    baseline = probes.baseline
    recommended = rank(probes, findings, config)
    not_recommended = [f for f in findings if not f.recommended]
    advised, predicted = advice(probes, recommended)
    if advised == probes.base:
        combined = Comparison([1.0], baseline.step_s, baseline.step_s)
        trial = probes.yours
    else:
        trial = probes.end_to_end_trial(advised)
        combined = compare(probes.yours, trial, config.repeats)
    probes.log("combined/speedup", combined.speedup)
    probes.log("combined/predicted_speedup", predicted)
    model = trial.model
    table = advise_report.format_table(recommended, not_recommended, combined.speedup,
                                       predicted, keras.backend.backend())
    metrics = {
        "combined_speedup": combined.speedup, "combined_speedup_spread": list(combined.spread),
        "predicted_speedup": predicted,
        "recommendations": [f.as_metrics() for f in recommended],
        "not_recommended": [f.as_metrics() for f in not_recommended],
        "input_wait_percent": probes.input_wait_percent,
        "baseline_examples_per_sec": 1 / combined.baseline_s,
        "baseline_batch_size": probes.base.batch_size,
        "advised_examples_per_sec": 1 / combined.candidate_s,
        # Read back from the model and data the combined measurement ran, not from the advice.
        "advised_policy": model.dtype_policy.name,
        "advised_compute_dtype": sorted({layer.dtype_policy.compute_dtype
                                         for layer in model.layers[:-1]}),
        "advised_jit_compile": bool(model.jit_compile),
        "advised_steps_per_execution": int(model.steps_per_execution),
        "advised_batch_size": trial.feed.batch_seen,
        "advised_pipeline": trial.feed.pipeline,
        "precision_max_output_difference": probes.precision_diff,
        "precision_rule": probes.precision_rule,
        "precision_rule_agrees": probes.precision_agrees,
        "batch_sizes_tried": probes.batch_tried, "batch_search_stop": probes.batch_stop,
        "input_overlap": baseline.overlap,
    }
    return metrics, table
