"""Mixed precision: the one-line policy, and everything around it that makes it pay.

Shows: `keras.mixed_precision.set_global_policy("mixed_float16")` (or
"mixed_bfloat16") runs the layers' math in 16 bits while the weights stay in
float32. The recipe picks the policy the hardware is fast at (--policy=auto,
and says why), keeps the softmax in float32 and checks the output dtype,
checks that mixed_float16 wraps the optimizer in a LossScaleOptimizer and logs
the loss scale to TensorBoard, stops at the first NaN/Inf loss naming the step
and policy, restores the global policy when it returns or fails, and advises
on what blocks a speedup (widths not multiples of 8, tiny batches, a slow
input pipeline). With --compare it trains float32 and the chosen policy from
the same initial weights on the same batches, alternating epoch by epoch in
one process, and reports the speedup, the accuracy/loss difference and memory.
Run:    python main.py --recipe=mixed_precision --compare
        KERAS_BACKEND=jax python main.py --recipe=mixed_precision --compare
        ... --strategy=mirrored (several GPUs; --batch_size is then per replica),
        KERAS_BACKEND=jax ... --strategy=data_parallel, --resume after a kill
        (each policy continues from its last finished epoch)
Expect: on a 2-core CPU with AVX512-BF16/AMX and no GPU, auto picks mixed_bfloat16
        and --compare on the default data (8,000 64x64 RGB shapes, 8 epochs per
        policy, ~2.5 min) measured speedup 2.66 (2412 vs 906 examples/s) and
        val_accuracy 0.9950 vs 0.9945 float32 (+0.05 points; over 5 seeds the
        delta stayed within 0.3 points: benchmarks/mixed_precision_accuracy.py).
        mixed_float16 on that CPU is ~300x slower (no oneDNN float16 path). On
        an NVIDIA GPU of compute capability 7.0+ auto picks mixed_float16.
Copy:   this file alone works in any project with keras (TensorFlow or JAX
        backend): run(Config(), "logs", ((x_train, y_train), (x_val, y_val)),
        model=your_model) rebuilds your keras.Model under each policy (copies,
        from its weights; a builder fn(input_shape, num_classes) works too;
        leave it out for the recipe's CNN). TensorFlow is optional: without it
        TensorBoard logging is skipped. strategy=tf.distribute.MirroredStrategy()
        or keras.distribution.DataParallel() spreads it over devices; for
        MultiWorkerMirroredStrategy also pass a fit= that works there (Keras
        3's fit does not). Running it again on the same folder continues it.
"""
import contextlib
import dataclasses
import functools
import glob
import json
import os
import platform
import resource
import socket
import time
import typing

import keras
import numpy as np

# What main.py feeds this recipe: 64x64 RGB arrays. 8,000 training images bring the
# default model to ~99% in 8 epochs; with 2,000 it stalled near 55% with a spread of
# 10 points between runs, which hid any difference the policy makes.
DATA = {"form": "arrays", "image_size": 64, "channels": 3, "examples": (8000, 2000)}
# The harder shapes variant (any polarity, position and rotation): this CNN still learns
# it to ~0.995, and the easier default would only push both policies closer to 1.0, where
# an accuracy difference between them cannot show.
DEFAULT_DATASET = "shapes_hard"
TAKES_MODEL = True  # run() takes model=: your keras.Model, rebuilt under each policy
RESUMABLE = True  # per-epoch checkpoints of each policy's model: --resume continues them
STRATEGIES = ("mirrored", "multi_worker", "data_parallel")  # run(strategy=, fit=)
HEADLINE = ("policy", "examples_per_sec", "val_accuracy", "speedup", "val_accuracy_delta",
            "float32_val_accuracy", "loss_scale", "wall_time_s")
POLICIES = ("mixed_float16", "mixed_bfloat16", "float32")


@dataclasses.dataclass
class Config:
    policy: typing.Literal["auto", "mixed_float16", "mixed_bfloat16", "float32"] = "auto"  # dtype
    # policy; auto picks what this hardware computes fast and prints why
    compare: bool = False  # also train float32 from the same weights and report the speedup
    epochs: int = 8  # training epochs (per policy)
    batch_size: int = 64  # examples per step; multiples of 8 suit 16-bit hardware
    learning_rate: float = 2e-3  # Adam learning rate (the peak, with --cosine_decay)
    cosine_decay: bool = True  # decay the learning rate to 0 over the run (steadier final accuracy)
    filters: tuple[int, ...] = (32, 64, 128, 128)  # channels of the stride-2 stem conv, then
    # of each conv+pool block; keep multiples of 8
    dense_units: int = 128  # width of the hidden dense layer; keep a multiple of 8
    warmup_steps: int = 3  # first steps of each model left out of throughput (they compile)
    scale_lr_with_replicas: bool = True  # multiply the learning rate by the replica count
    steps_per_epoch: int | None = None  # optional cap on steps per epoch
    seed: int = 0  # initial weights and batch order

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.warmup_steps < 0:
            raise ValueError("--epochs and --batch_size must be >= 1, --warmup_steps >= 0")
        if not self.filters or min(self.filters) < 1 or self.dense_units < 1:
            raise ValueError(f"--filters and --dense_units must be positive, got "
                             f"{self.filters} and {self.dense_units}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.policy not in ("auto",) + POLICIES:
            raise ValueError(f"--policy must be auto or one of {', '.join(POLICIES)}, "
                             f"got {self.policy!r}")


# --- which policy this hardware is fast at -------------------------------------

def cpu_flags():
    """The CPU feature flags from /proc/cpuinfo (x86 Linux); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def accelerators():
    """[(kind, compute capability or None)] of the accelerators the backend sees."""
    backend = keras.backend.backend()
    found = []
    if backend == "tensorflow":
        import tensorflow as tf
        for gpu in tf.config.list_physical_devices("GPU"):
            cc = tf.config.experimental.get_device_details(gpu).get("compute_capability")
            found.append(("gpu", float(f"{cc[0]}.{cc[1]}") if cc else None))
        found += [("tpu", None) for _ in tf.config.list_logical_devices("TPU")]
    elif backend == "jax":
        import jax
        for device in jax.devices():
            if device.platform == "gpu":
                cc = getattr(device, "compute_capability", None)
                found.append(("gpu", float(cc) if cc else None))
            elif device.platform == "tpu":
                found.append(("tpu", None))
    elif backend == "torch":
        import torch
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            found.append(("gpu", major + minor / 10))
    return tuple(found)


def conv_share(model):
    """Fraction of the model's multiply-adds in convolutions (the rest: mostly dense)."""
    conv = dense = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            out = layer.output.shape
            kh, kw = layer.kernel_size
            conv += out[1] * out[2] * out[3] * kh * kw * layer.kernel.shape[2]
        elif isinstance(layer, keras.layers.Dense):
            dense += int(np.prod(layer.kernel.shape))
    return conv / (conv + dense) if conv + dense else 0.0


def choose_policy(devices=None, flags=None, backend=None, model=None):
    """(policy, reason): the fastest policy this hardware and backend run safely.

    mixed_float16 on NVIDIA GPUs of compute capability 7.0+ (tensor cores),
    mixed_bfloat16 on TPUs, and on CPUs with bfloat16 math (AVX512-BF16, AMX)
    under TensorFlow for convolution-heavy models (given `model`), where oneDNN
    uses it; float32 otherwise. Measured on CPU (benchmarks/mixed_precision.py):
    bfloat16 ran a conv net 2.7x faster but a dense MLP 0.7x; float16 ran
    100x+ slower (TensorFlow falls back from oneDNN to Eigen). On JAX's XLA CPU
    backend bfloat16 measured slower than float32 (conv 0.8x, MLP 0.5x), so
    auto keeps float32 there (--policy=mixed_bfloat16 still works).
    """
    devices = accelerators() if devices is None else devices
    flags = cpu_flags() if flags is None else flags
    backend = backend or keras.backend.backend()
    gpus = [cc for kind, cc in devices if kind == "gpu"]
    if any(kind == "tpu" for kind, _ in devices):
        return "mixed_bfloat16", "a TPU computes in bfloat16 natively"
    if gpus:
        cc = min(c or 0 for c in gpus)
        if cc >= 7.0:
            return "mixed_float16", f"NVIDIA GPU of compute capability {cc:g} has float16 tensor cores"
        return "float32", (f"GPU of compute capability {cc:g} (< 7.0) has no tensor cores; "
                           "16-bit math would not be faster")
    bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if bf16 and backend == "tensorflow":
        share = 1.0 if model is None else conv_share(model)
        if share < 0.5:
            return "float32", (f"CPU has {', '.join(bf16)} but the model is dense-heavy "
                               f"({share:.0%} of its math in convolutions): bfloat16 dense "
                               "layers measured slower than float32 on CPU")
        return "mixed_bfloat16", f"CPU has bfloat16 math ({', '.join(bf16)}) that oneDNN uses"
    if bf16:
        return "float32", (f"CPU has {', '.join(bf16)} but bfloat16 on the {backend} backend "
                           "measured slower than float32; no GPU found")
    return "float32", "no GPU and no bfloat16 CPU instructions: 16-bit math would be slower"


def fastest_16bit_policy(devices=None):
    """The 16-bit policy this hardware runs best, whether or not auto would pick it:
    mixed_float16 on an NVIDIA GPU, mixed_bfloat16 on a TPU or a CPU. What --compare
    measures against float32 when the chosen policy is float32 itself."""
    devices = accelerators() if devices is None else devices
    return "mixed_float16" if any(kind == "gpu" for kind, _ in devices) else "mixed_bfloat16"


@contextlib.contextmanager
def global_policy(name):
    """Sets the global dtype policy inside the block; restores the previous one after.

    Note: keras.utils.clear_session() resets the global policy to float32, so
    call it BEFORE setting a policy, never after.
    """
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


# --- the model and its checks --------------------------------------------------

def build_model(input_shape, num_classes, filters=(32, 64, 128, 128), dense_units=128):
    """A small CNN under the CURRENT global policy; its softmax stays in float32.

    Each image is first standardized per channel (removes the background colour;
    the statistics are computed in float32 under a mixed policy). A 5x5 stride-2
    stem conv of filters[0] channels halves the image, then one conv -> relu ->
    pool block per further entry. The default sees 47 pixels around each output,
    enough to take in a whole figure of the 64x64 shapes set; three 3x3 blocks
    without the stem see 22 and stalled near 65% accuracy. (Batch norm after each
    conv learned no better here and cost most of the bfloat16 speedup on CPU: it
    is memory-bound.)
    """
    layers = [keras.Input(shape=input_shape),
              keras.layers.LayerNormalization(axis=(1, 2), center=False, scale=False),
              keras.layers.Conv2D(filters[0], 5, strides=2, padding="same", activation="relu")]
    for f in filters[1:]:
        layers += [keras.layers.Conv2D(f, 3, padding="same", activation="relu"),
                   keras.layers.MaxPooling2D()]
    layers += [keras.layers.GlobalAveragePooling2D(),
               keras.layers.Dense(dense_units, activation="relu"),
               keras.layers.Dense(num_classes),  # logits, computed in 16 bits
               # The softmax in float32: 16-bit exp/sum loses the small probabilities.
               keras.layers.Activation("softmax", dtype="float32")]
    return keras.Sequential(layers)


def check_policy_applied(model, policy):
    """Raises if the model's layers do not compute in `policy` (e.g. a lost global policy)."""
    expected = keras.dtype_policies.DTypePolicy(policy).compute_dtype
    got = {layer.dtype_policy.compute_dtype for layer in model.layers[:-1]
           if not isinstance(layer, keras.layers.InputLayer)}
    if got != {expected}:
        raise RuntimeError(f"model layers compute in {sorted(got)}, not {expected} of {policy}: "
                           "was keras.utils.clear_session() called after setting the policy?")


def check_output_float32(model, sample):
    """The model's output dtype (must be float32 so the loss is computed in float32)."""
    dtype = keras.backend.standardize_dtype(model(sample[:1]).dtype)
    if dtype != "float32":
        raise ValueError(f"model output is {dtype}; end the model with a float32 layer, e.g. "
                         "keras.layers.Activation('softmax', dtype='float32')")
    return dtype


def loss_scale(model):
    """The current dynamic loss scale if the optimizer scales the loss, else None."""
    if isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
        return float(keras.ops.convert_to_numpy(model.optimizer.dynamic_scale))
    return None


def check_loss_scaling(model, policy):
    """mixed_float16 needs loss scaling (Keras 3 adds it on compile): verify it."""
    scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    if policy == "mixed_float16" and not scaled:
        raise RuntimeError("mixed_float16 without loss scaling: small gradients underflow to "
                           "zero; compile under the policy or wrap the optimizer in "
                           "keras.optimizers.LossScaleOptimizer")
    return scaled


# --- training with a step timer and a NaN guard --------------------------------

class PolicyGuard(keras.callbacks.Callback):
    """Stops at the first NaN/Inf loss, naming the step and policy; logs the loss scale
    per epoch. (The kit's StepTimer beside it times the steps.)"""

    def __init__(self, policy):
        super().__init__()
        self.policy, self.step, self.bad = policy, 0, None

    def on_train_batch_end(self, batch, logs=None):
        loss = float(keras.ops.convert_to_numpy((logs or {}).get("loss", 0.0)))
        self.step += 1
        if not np.isfinite(loss) and self.bad is None:
            self.bad = f"loss became {loss} at training step {self.step} under policy {self.policy}"
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        scale = loss_scale(self.model)
        if scale is not None and logs is not None:
            logs["loss_scale"] = scale  # the TensorBoard callback after this one logs it


@functools.lru_cache(maxsize=None)
def has_tensorflow():
    """Whether TensorFlow imports (for TensorBoard logs); JAX runs need none."""
    try:
        import tensorflow  # noqa: F401
        return True
    except ImportError:
        return False


def under_policy(model, policy):
    """A copy of `model`, with its weights, whose layers compute in `policy` and whose
    output layer computes in float32 (so the loss is computed in float32).

    Each layer is re-created from its config with the policy as its dtype: a
    model's layers keep the dtype they were built with, whatever the global
    policy says later. Call it under global_policy(policy), so that the model
    itself (which compile asks about loss scaling) has the policy too.
    """
    last = model.layers[-1]

    def recreate(layer):
        config = layer.get_config()
        config["dtype"] = "float32" if layer is last else policy
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=recreate)
    copy.set_weights(model.get_weights())
    return copy


def policy_models(model, config, input_shape, num_classes):
    """(make, reference): make(policy) -> (a model computing in policy, its loss, its
    metrics), every one from the same weights; reference is the float32 model.

    model: None (this recipe's CNN), a keras.Model (copied, never changed) or a
    builder fn(input_shape, num_classes), called once under float32.
    """
    with global_policy("float32"):
        if model is None:
            reference = build_model(input_shape, num_classes, config.filters, config.dense_units)
        elif isinstance(model, keras.Model):
            reference = model
        else:
            reference = model(input_shape, num_classes)
    if model is None:
        weights = reference.get_weights()

        def make(policy):
            copy = build_model(input_shape, num_classes, config.filters, config.dense_units)
            copy.set_weights(weights)
            return copy, keras.losses.SparseCategoricalCrossentropy(), ["accuracy"]
        return make, reference
    print(f"your model: {reference.count_params():,} weights; loss: "
          f"{classifier_loss(reference, num_classes)[2]}; rebuilt under each policy")

    def make(policy):
        loss, metrics, _ = classifier_loss(reference, num_classes)
        return under_policy(reference, policy), loss, metrics
    return make, reference


class Trainee:
    """One model under one policy, trained an epoch at a time, checkpointed after each.

    A checkpoint left in `checkpoint_dir` by a killed run is continued: the
    model is built and compiled as for a new run, then its weights and
    optimizer state (the cosine schedule's step, the loss scale) are loaded.
    """

    def __init__(self, policy, config, make_model, log_dir, total_steps, strategy, fit,
                 checkpoint_dir):
        self.strategy, self.fit = strategy, fit
        learning_rate = config.learning_rate * (replica_count(strategy)
                                                if config.scale_lr_with_replicas else 1)
        with global_policy(policy), distribution_scope(strategy):  # layers and compile read it
            self.model, loss, metrics = make_model(policy)
            check_policy_applied(self.model, policy)
            if config.cosine_decay:
                learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, total_steps)
            self.model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss,
                               metrics=metrics)
            checkpoint, saved = latest_checkpoint(checkpoint_dir)
            if checkpoint:
                restore(self.model, checkpoint)
        self.policy, self.history, self.log_dir = policy, saved["logs"], log_dir
        self.epochs_done = saved["epochs_done"]
        self.timer, self.guard = StepTimer(), PolicyGuard(policy)
        state = saved["state"]
        self.timer.seconds = list(state.get("step_seconds", []))
        self.guard.step = state.get("steps", 0)
        self.gpu_peak_mb = state.get("gpu_peak_mb")
        if checkpoint:
            print(f"Resuming {policy} after epoch {self.epochs_done} from {checkpoint}")
        self.callbacks = [self.timer, self.guard]
        if log_dir and has_tensorflow():
            self.callbacks.append(keras.callbacks.TensorBoard(log_dir=log_dir))
        self.callbacks.append(EpochCheckpoint(checkpoint_dir, lambda: {
            "step_seconds": self.timer.seconds, "steps": self.guard.step,
            "gpu_peak_mb": self.gpu_peak_mb}))

    def fit_epoch(self, epoch, x, y, validation, batch_size):
        """Trains epoch `epoch` (from 0); run() skips those a killed run had finished."""
        reset_gpu_peak()
        with global_policy(self.policy), distribution_scope(self.strategy):
            history = self.fit(self.model, x, y, batch_size=batch_size, epochs=epoch + 1,
                               initial_epoch=epoch, shuffle=False, validation_data=validation,
                               verbose=2, callbacks=self.callbacks)
        peak = gpu_peak_mb()
        if peak is not None:
            self.gpu_peak_mb = max(self.gpu_peak_mb or 0, peak)
        if self.guard.bad:
            raise FloatingPointError(self.guard.bad + "; lower --learning_rate"
                                     + (" or use float32" if self.policy != "float32" else ""))
        for key, values in history.history.items():
            self.history[key] = values[-1]
        if not np.isfinite(self.history.get("val_loss", 0.0)):
            raise FloatingPointError(f"validation loss became {self.history['val_loss']} after "
                                     f"epoch {epoch + 1} under policy {self.policy}")

    def log_step_times(self, steps_per_epoch):
        """The median step time of each epoch, for the chart of step time per policy."""
        seconds = self.timer.seconds
        log_per_epoch(self.log_dir, "mixed_precision/epoch_step_time_ms", [
            1000 * float(np.median(seconds[i:i + steps_per_epoch]))
            for i in range(0, len(seconds), steps_per_epoch)])

    def results(self, batch_size, warmup_steps):
        out = {**throughput(self.timer.seconds, batch_size, warmup_steps),
               "val_accuracy": self.history["val_accuracy"],
               "val_loss": self.history["val_loss"], "loss": self.history["loss"]}
        if self.gpu_peak_mb is not None:
            out["gpu_peak_mb"] = self.gpu_peak_mb
        return out


# --- memory ----------------------------------------------------------------------

def _gpu_backend():
    devices = [kind for kind, _ in accelerators()]
    return keras.backend.backend() if "gpu" in devices else None


def reset_gpu_peak():
    if _gpu_backend() == "tensorflow":
        import tensorflow as tf
        tf.config.experimental.reset_memory_stats("GPU:0")


def gpu_peak_mb():
    """Peak GPU memory since the last reset (TensorFlow) or ever (JAX); None on CPU."""
    backend = _gpu_backend()
    if backend == "tensorflow":
        import tensorflow as tf
        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    if backend == "jax":
        import jax
        stats = jax.local_devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use", 0) / 2**20 or None
    return None


def peak_rss_mb():
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if platform.system() == "Darwin" else 2**10)


# --- advice ------------------------------------------------------------------------

def batch_fetch_ms(x, batch_size, seed, batches=10):
    """Milliseconds to gather one shuffled batch from the arrays (the input pipeline)."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(batches):
        np.ascontiguousarray(x[np.sort(rng.choice(len(x), batch_size, replace=False))])
    return 1000 * (time.perf_counter() - start) / batches


def advise(model, batch_size, step_ms, fetch_ms):
    """What blocks a 16-bit speedup here: odd widths, tiny batches, a slow input."""
    tips = []
    weighted = [layer for layer in model.layers if layer.weights]
    for layer in weighted[:-1]:  # the last layer's width is the number of classes
        width = getattr(layer, "units", None) or getattr(layer, "filters", None)
        if width and width % 8:
            tips.append(f"layer {layer.name} has {width} units/channels, not a multiple of 8: "
                        f"16-bit matrix units pad or fall back; use {8 * -(-width // 8)}")
    if batch_size < 32:
        tips.append(f"batch size {batch_size} is tiny: per-step overhead hides the faster math; "
                    "try 64 or more")
    elif batch_size % 8:
        tips.append(f"batch size {batch_size} is not a multiple of 8; use {8 * -(-batch_size // 8)}")
    if fetch_ms > 0.5 * step_ms:
        tips.append(f"input-bound: preparing a batch takes {fetch_ms:.1f} ms of a {step_ms:.1f} ms "
                    "step; faster math will not help until the input pipeline is faster")
    return tips


# --- the report -----------------------------------------------------------------

def log_tensorboard(run_dir, policies, results, table):
    """HParams: a trial per policy; the table and advice as the Text summary; a Custom
    Scalars chart of step time per epoch with a line per policy."""
    log_hparams_trials(os.path.join(run_dir, "hparams"), "mixed_precision", {
        policy: ({"policy": policy},
                 {key: r[key] for key in ("examples_per_sec", "step_time_ms_p50",
                                          "val_accuracy", "val_loss")})
        for policy, r in zip(policies, results)})
    log_text_summary(run_dir, table)
    log_custom_scalars(run_dir, "mixed_precision", {
        "step time per epoch (ms), a line per policy": [r"^mixed_precision/epoch_step_time_ms$"]})


def format_table(policies, results):
    lines = [f"{'policy':<16} {'examples/s':>11} {'p50 ms':>8} {'p90 ms':>8} {'val_acc':>8} "
             f"{'val_loss':>9}" + (f" {'gpu MiB':>8}" if "gpu_peak_mb" in results[0] else "")]
    for p, r in zip(policies, results):
        lines.append(f"{p:<16} {r['examples_per_sec']:>11.0f} {r['step_time_ms_p50']:>8.2f} "
                     f"{r['step_time_ms_p90']:>8.2f} {r['val_accuracy']:>8.4f} "
                     f"{r['val_loss']:>9.4f}"
                     + (f" {r['gpu_peak_mb']:>8.0f}" if "gpu_peak_mb" in r else ""))
    return "\n".join(lines)


def compare_verdict(recommended, reason, policy, speedup, noise=0.05):
    """One line: does the measured speedup agree with the recommended policy's rule?"""
    if recommended == "float32":
        agrees = speedup < 1 + noise
        return (f"float32 is recommended here ({reason}); measured {policy} at {speedup:.2f}x "
                f"float32, which " + ("agrees" if agrees else
                                      f"disagrees: try --policy={policy} on this machine"))
    agrees = speedup >= 1
    return (f"{recommended} is recommended ({reason}); measured {speedup:.2f}x float32, which "
            + ("agrees" if agrees else "disagrees: keep float32 on this machine"))


# --- the run ------------------------------------------------------------------------

def num_classes_of(data):
    (_, y_train), (_, y_val) = data
    return int(max(np.max(y_train), np.max(y_val))) + 1


def check(config, data, model=None):
    """ValueError (one line) for input that cannot run, your model's output included."""
    (x_train, _), (x_val, _) = data
    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError("the dataset needs training and validation examples")
    if isinstance(model, keras.Model):
        classifier_loss(model, num_classes_of(data))


def run(config, run_dir, data, strategy=None, fit=None, model=None):
    """Trains under the chosen policy (and float32 with --compare); returns flat metrics.

    strategy: a tf.distribute strategy, a keras.distribution (DataParallel on
    JAX) or None for one device; --batch_size is then per replica. fit: called
    like keras.Model.fit(model, ...), its default (the CLI passes a
    strategy.run loop for multi_worker). Checkpoints left in run_dir by a
    killed run are continued, both policies' with --compare.

    model: None for this recipe's CNN, your keras.Model (rebuilt under each policy
    from its weights; yours is never changed) or fn(input_shape, num_classes).
    """
    start = time.perf_counter()
    check(config, data, model)
    (x_train, y_train), (x_val, y_val) = data
    x_train, x_val = np.asarray(x_train, "float32"), np.asarray(x_val, "float32")
    y_train, y_val = np.asarray(y_train), np.asarray(y_val)
    num_classes = num_classes_of(data)
    fit = fit or keras.Model.fit
    replicas = replica_count(strategy)
    batch_size = min(config.batch_size * replicas, len(x_train))  # the global batch
    previous = keras.mixed_precision.global_policy()
    try:
        keras.utils.clear_session()  # resets the global policy to float32: so it comes first
        keras.utils.set_random_seed(config.seed)  # the initial weights every policy starts from
        make_model, reference = policy_models(model, config, x_train.shape[1:], num_classes)
        if config.policy == "auto":
            policy, reason = choose_policy(model=reference)
        else:
            policy, reason = config.policy, "asked for with --policy"
        print(f"policy: {policy} ({reason}); backend: {keras.backend.backend()}; batch "
              f"{batch_size // replicas} x {replicas} replica(s)")
        recommended = policy
        if config.compare and policy == "float32":  # float32 against itself would show nothing
            policy = fastest_16bit_policy()
            print(f"--compare: measuring {policy}, the fastest 16-bit policy here, against float32")
        if not has_tensorflow():
            print("note: TensorFlow is not installed, so no TensorBoard logs are written")
        n = len(x_train) // batch_size * batch_size  # whole batches: equal step times
        if config.steps_per_epoch:
            n = min(n, config.steps_per_epoch * batch_size)
        policies = [policy] + (["float32"] if config.compare else [])
        trainees = [Trainee(p, config, make_model,
                            os.path.join(run_dir, f"{p}_baseline" if i else p),
                            config.epochs * n // batch_size, strategy, fit,
                            os.path.join(run_dir, "checkpoints", p))
                    for i, p in enumerate(policies)]
        main = trainees[0]
        output_dtype = check_output_float32(main.model, x_val)
        scaled = check_loss_scaling(main.model, policy)
        rng = np.random.default_rng(config.seed)
        for epoch in range(config.epochs):
            order = rng.permutation(len(x_train))[:n]  # the same batches for every policy
            x, y = x_train[order], y_train[order]
            for t in (trainees if epoch % 2 == 0 else trainees[::-1]):  # alternate who goes first
                if epoch < t.epochs_done:
                    continue  # finished by the killed run this one continues
                print(f"-- epoch {epoch + 1}/{config.epochs} {t.policy}"
                      + (" (baseline)" if t is not main else ""))
                t.fit_epoch(epoch, x, y, (x_val, y_val), batch_size)
        results = [t.results(batch_size, config.warmup_steps) for t in trainees]
        for t in trainees:  # Custom Scalars: a line per policy
            t.log_step_times(n // batch_size)
        os.makedirs(run_dir, exist_ok=True)  # a drop-in caller's folder may not exist yet
        model_file = write_atomically(os.path.join(run_dir, f"{policy}.keras"), main.model.save)
    finally:
        keras.mixed_precision.set_global_policy(previous)

    r = results[0]
    metrics = {"policy": policy, "recommended_policy": recommended, "policy_reason": reason,
               "replicas": replicas,
               "backend": keras.backend.backend(), "output_dtype": output_dtype,
               "loss_scaling": scaled, **r}
    if scaled:
        metrics["loss_scale"] = loss_scale(main.model)
    tips = advise(main.model, batch_size, r["step_time_ms_p50"],
                  batch_fetch_ms(x_train, batch_size, config.seed))
    table = format_table(policies, results)
    if config.compare:
        base = results[1]
        metrics.update({f"float32_{k}": v for k, v in base.items()})
        metrics.update(speedup=r["examples_per_sec"] / base["examples_per_sec"],
                       val_accuracy_delta=r["val_accuracy"] - base["val_accuracy"],
                       val_loss_delta=r["val_loss"] - base["val_loss"])
        table += "\n" + compare_verdict(recommended, reason, policy, metrics["speedup"])
        print(table)
        if metrics["speedup"] < 1 and recommended != "float32":
            tips.append(f"{policy} ran {1 / metrics['speedup']:.2f}x SLOWER than float32 here: "
                        "this hardware has no fast path for it; keep float32")
    if "gpu_peak_mb" not in r:
        metrics["peak_rss_mb"] = peak_rss_mb()  # the whole process: both models with --compare
    for tip in tips:
        print("advice: " + tip)
    metrics["advice"] = " | ".join(tips) or "none"
    metrics.update(model_params=reference.count_params(), model_file=model_file)
    log_tensorboard(run_dir, policies, results, "\n".join([table] + [f"advice: {t}" for t in tips]))
    metrics["wall_time_s"] = time.perf_counter() - start
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


# --- scale-out kit: the same text in every recipe that takes --strategy and --resume -----
# (strategy: a tf.distribute strategy, a keras.distribution.Distribution on JAX, or None
# for one device. Under multi_worker every worker saves, since TensorFlow's saving runs
# collective ops that all workers must join: give each its own run_dir (main.py gives
# the others a temporary one). tests/test_kit.py fails if a copy differs)

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

        def dump(partial):
            with open(partial, "w") as f:
                json.dump(payload, f)
        write_atomically(stem + ".json", dump)
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

# --- end of scale-out kit ----------------------------------------------------------------


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
