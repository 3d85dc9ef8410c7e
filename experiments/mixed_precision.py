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
        KERAS_BACKEND=jax ... --strategy=data_parallel, --resume after a SIGTERM
        or a kill (each policy continues at the step of its last checkpoint)
Expect: on a 2-core CPU with AVX512-BF16/AMX and no GPU, auto picks mixed_bfloat16
        and --compare on the default data (8,000 64x64 RGB shapes, 8 epochs per
        policy, ~2.5 min) measured speedup 2.66 (2412 vs 906 examples/s) and
        val_accuracy 0.9950 vs 0.9945 float32 (+0.05 points; over 5 seeds the
        delta stayed within 0.3 points: benchmarks/mixed_precision_accuracy.py).
        mixed_float16 on that CPU is ~300x slower (no oneDNN float16 path). On
        an NVIDIA GPU of compute capability 7.0+ auto picks mixed_float16.
Copy:   the technique alone (choose the policy, rebuild your model under it, the
        checks, the NaN guard) is the drop-in file recipes/mixed_precision.py. This
        experiment around it is called from this repository (keras with TensorFlow
        or JAX): experiments.mixed_precision.run(Config(), run_dir, data,
        model=your_model), data being ((x_train, y_train), (x_val, y_val)), rebuilds
        your keras.Model under each policy (copies, from its weights; a builder
        fn(input_shape, num_classes) works too; leave it out for the recipe's CNN).
        TensorFlow is optional: without it TensorBoard logging is skipped.
        strategy=tf.distribute.MirroredStrategy() or keras.distribution.DataParallel()
        spreads it over devices; for MultiWorkerMirroredStrategy also pass a fit= that
        works there (Keras 3's fit does not). Running it again on the same folder
        continues it.
"""
import dataclasses
import functools
import os
import platform
import resource
import time
import typing

import keras
import numpy as np

from experiments.files import write_atomically
from experiments.scale_out import (EpochCheckpoint, distribution_scope, fit_from,
                                   latest_checkpoint, position, replica_count, restore)
from experiments.tensorboard import (log_custom_scalars, log_hparams_trials, log_per_epoch,
                                    log_text_summary)
from experiments.user_model import (classifier_loss, compile_settings, num_classes_of,
                                     save_with_users_loss, users_settings)
from recipes.mixed_precision import (PolicyGuard, accelerators, check_loss_scaling,
                                     check_output_float32, check_policy_applied, choose_policy,
                                     fastest_16bit_policy, global_policy, loss_scale,
                                     under_policy)
from recipes.step_timer import StepTimer, throughput

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
    checkpoint_every_steps: int = 0  # also checkpoint every N steps within an epoch (0: auto)
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


# --- the recipe's own model ------------------------------------------------------

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


@functools.lru_cache(maxsize=None)
def has_tensorflow():
    """Whether TensorFlow imports (for TensorBoard logs); JAX runs need none."""
    try:
        import tensorflow  # noqa: F401
        return True
    except ImportError:
        return False


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
        copy = under_policy(reference, policy)
        copy.users_compile_settings = compile_settings(reference)
        return copy, loss, metrics
    return make, reference


class Trainee:
    """One model under one policy, trained an epoch at a time, checkpointed after each
    (and within epochs: EpochCheckpoint).

    A checkpoint left in `checkpoint_dir` by a stopped or killed run is continued at its
    step: the model is built and compiled as for a new run, then its weights and
    optimizer state (the cosine schedule's step, the loss scale) are loaded.
    """

    def __init__(self, policy, config, make_model, log_dir, steps, strategy, fit,
                 checkpoint_dir):
        total_steps = config.epochs * steps
        self.strategy, self.fit = strategy, fit
        learning_rate = config.learning_rate * (replica_count(strategy)
                                                if config.scale_lr_with_replicas else 1)
        with global_policy(policy), distribution_scope(strategy):  # layers and compile read it
            self.model, loss, metrics = make_model(policy)
            check_policy_applied(self.model, policy)
            if config.cosine_decay:
                learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, total_steps)
            self.model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss,
                               metrics=metrics,
                               **users_settings(self.model, ("steps_per_execution",)))
            checkpoint, saved = latest_checkpoint(checkpoint_dir)
            if checkpoint:
                restore(self.model, checkpoint)
        self.policy, self.history, self.log_dir = policy, saved["logs"], log_dir
        self.saved, self.steps, self.epochs = saved, steps, config.epochs
        self.epochs_done = saved["epochs_done"]  # with a mid-epoch checkpoint, in the next
        self.timer, self.guard = StepTimer(), PolicyGuard(policy)
        state = saved["state"]
        self.timer.seconds = list(state.get("step_seconds", []))
        self.guard.step = state.get("steps", 0)
        self.gpu_peak_mb = state.get("gpu_peak_mb")
        if checkpoint:
            print(f"Resuming {policy} at "
                  f"{position(self.epochs_done, saved['step'], steps)} from {checkpoint}")
        self.callbacks = [self.timer, self.guard]
        if log_dir and has_tensorflow():
            self.callbacks.append(keras.callbacks.TensorBoard(log_dir=log_dir))
        self.callbacks.append(EpochCheckpoint(checkpoint_dir, lambda: {
            "step_seconds": self.timer.seconds, "steps": self.guard.step,
            "gpu_peak_mb": self.gpu_peak_mb}, config.checkpoint_every_steps))

    def fit_epoch(self, epoch, x, y, validation, batch_size):
        """Trains epoch `epoch` (from 0) on its batches x, y in order; run() skips those a
        stopped run had finished, and this goes on at its step in the one it had begun."""
        reset_gpu_peak()
        saved = (self.saved if epoch == self.saved["epochs_done"]
                 else {"epochs_done": epoch, "step": 0})
        with global_policy(self.policy), distribution_scope(self.strategy):
            history = fit_from(
                self.fit, self.model, lambda e, step: {"x": x[step * batch_size:],
                                                       "y": y[step * batch_size:],
                                                       "batch_size": batch_size},
                self.epochs, self.steps, saved, self.callbacks, per_epoch=True,
                until=epoch + 1, shuffle=False, validation_data=validation, verbose=2)
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
                            n // batch_size, strategy, fit,
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
        model_file = write_atomically(os.path.join(run_dir, f"{policy}.keras"),
                                      lambda partial: save_with_users_loss(main.model, partial))
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
