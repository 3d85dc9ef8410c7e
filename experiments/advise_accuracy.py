"""advise's accuracy proof: does the advised configuration reach the baseline's accuracy sooner?

The throughput proof says how many examples per second the advice gives; this one says
whether those examples buy the same accuracy. The baseline and the advised configuration
train from the same initial weights, on the same examples in the same order (arrays: each
epoch one permutation that the seed and the epoch decide, cut into whole batches of each
configuration's size; folders: each pipeline's own seeded shuffle), for --proof_epochs,
with validation CHECKS_PER_EPOCH times per epoch (or more: every step when an epoch has
fewer). The clock counts training only: fit's calls with the time between them, the first
call's compiling included, each validation left out.

The target is the best validation accuracy the baseline reaches, less
--accuracy_tolerance. Each configuration's time to it is the training seconds at the
first check at or above it; time_to_accuracy_speedup = baseline seconds / advised
seconds. When the advised configuration misses the target, each recommended change that
can move accuracy (a larger batch, a 16-bit policy) is proved again without it; the first
whose removal reaches the target is demoted, and that proof is the one reported.

A larger batch trains with its learning rate scaled by RULE: linear with a warm-up for
plain SGD, square root for adaptive optimizers; a learning-rate schedule is kept as given.
"""
import dataclasses
import math
import time

import keras
import numpy as np

from experiments.device import seed_job
from experiments.tensorboard import log_custom_scalars, scalar_pb, write_events
from recipes.step_timer import StepTimer, throughput

CHECKS_PER_EPOCH = 4
VALIDATION_LIMIT = 2048  # validation examples each check evaluates (the same ones each time)
ACCURACY_KNOBS = ("batch_size", "policy")  # the changes that can move accuracy, tried in order
LINEAR_OPTIMIZERS = ("SGD",)
RULE = ("the learning rate for a batch k times larger: x k with a linear warm-up over the first "
        "quarter epoch for SGD (Goyal et al. 2017), x sqrt(k) for adaptive optimizers (Adam, "
        "RMSprop, ...: Malladi et al. 2022); a schedule is kept as given")


# --- the learning rate for a larger batch ----------------------------------------------

def scaled_optimizer(optimizer, scale, warmup_steps):
    """A fresh optimizer like `optimizer`, its learning rate set for a batch `scale` times
    larger by RULE; (optimizer, what was done, in words)."""
    config = keras.optimizers.serialize(optimizer)
    cls, kwargs = type(optimizer), dict(config["config"])
    lr, name = kwargs["learning_rate"], config["class_name"]
    if scale == 1:
        return cls.from_config(kwargs), "same batch: the learning rate as given"
    if not isinstance(lr, (int, float)):
        return cls.from_config(kwargs), f"{name}'s learning rate is a schedule: kept as given"
    if name in LINEAR_OPTIMIZERS:
        target = lr * scale
        kwargs["learning_rate"] = keras.optimizers.schedules.CosineDecay(
            lr, decay_steps=1, alpha=1.0, warmup_target=target, warmup_steps=max(1, warmup_steps))
        return cls.from_config(kwargs), (f"{name} {lr:.3g} -> {target:.3g} (linear, x{scale:g}, "
                                         f"warm-up over {max(1, warmup_steps)} steps)")
    kwargs["learning_rate"] = lr * math.sqrt(scale)
    return cls.from_config(kwargs), (f"{name} {lr:.3g} -> {lr * math.sqrt(scale):.3g} (square "
                                     f"root, x{math.sqrt(scale):.3g} for a batch x{scale:g})")


# --- the data in one order ----------------------------------------------------------------

def epoch_orders(n, batch_size, epochs, seed):
    """(steps, batch_size) example indices: each epoch a permutation decided by the seed and
    the epoch alone (the same for every batch size), cut into whole batches."""
    full = n // batch_size * batch_size
    return np.concatenate([np.random.default_rng([seed, epoch]).permutation(n)[:full]
                           .reshape(-1, batch_size) for epoch in range(epochs)])


def ordered_batches(x, y, orders):
    """The batches x[orders[i]], y[orders[i]] in turn: tf.data (gathered as Keras gathers
    arrays, prefetched) on TensorFlow, a PyDataset elsewhere."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        xt, yt = tf.constant(x), tf.constant(y)
        ds = tf.data.Dataset.from_tensor_slices(orders)
        return ds.map(lambda i: (tf.gather(xt, i), tf.gather(yt, i))).prefetch(tf.data.AUTOTUNE)

    class Ordered(keras.utils.PyDataset):
        def __len__(self):
            return len(orders)

        def __getitem__(self, index):
            return x[orders[index]], y[orders[index]]
    return Ordered()


def training_source(data, setting, epochs, examples):
    """(what fit reads, steps per epoch) for `setting` over `examples` training examples."""
    batch = setting.batch_size
    if not data.folder:
        orders = epoch_orders(examples, batch, epochs + 1, data.seed)
        return ordered_batches(data.x, data.y, orders), examples // batch
    ds = data.tuned_dataset(batch) if setting.pipeline == "tuned" else data.user_dataset(batch)
    return ds, examples // batch


# --- one configuration trained, validated CHECKS_PER_EPOCH times per epoch -----------------

class TrainClock(StepTimer):
    """Training seconds at each validation: the kit's StepTimer waits for the device at the
    end of each call, and the clock stops when validation begins."""

    def __init__(self):
        super().__init__()
        self.elapsed, self.at_checks = 0.0, []

    def on_epoch_begin(self, epoch, logs=None):
        self._since = time.perf_counter()

    def on_test_begin(self, logs=None):
        self.elapsed += time.perf_counter() - self._since
        self.at_checks.append(self.elapsed)


@dataclasses.dataclass
class Curve:
    """One configuration's validation curve against its training seconds."""
    label: str
    setting: object
    lr_rule: str
    epochs: list  # epochs trained at each check
    seconds: list  # training seconds at each check
    val_accuracy: list
    val_loss: list

    def reached(self, target):
        """(seconds, epochs) at the first check at or above target, else (None, None)."""
        for s, e, a in zip(self.seconds, self.epochs, self.val_accuracy):
            if a >= target:
                return s, e
        return None, None

    @property
    def best(self):
        return max(self.val_accuracy, default=math.nan)

    def final(self, key):
        values = getattr(self, key)
        return values[-1] if values else math.nan


def check_steps(steps_per_epoch, steps_per_execution):
    """(steps between checks, steps per execution): at most a quarter epoch between checks,
    in whole calls; steps_per_execution is lowered to fit (it moves no accuracy)."""
    per_check = max(1, steps_per_epoch // CHECKS_PER_EPOCH)
    spe = min(steps_per_execution, per_check)
    return per_check // spe * spe, spe


def train_curve(label, setting, plan, models, data):
    """Trains a fresh copy under `setting` for the plan's epochs; its Curve."""
    scale = setting.batch_size / plan.base_batch
    seed_job(plan.seed, "arrays" if not data.folder else "tf_data")  # the same random draws
    source, per_epoch = training_source(data, setting, plan.epochs, plan.examples)
    per_check, spe = check_steps(per_epoch, setting.steps_per_execution)
    optimizer, rule = scaled_optimizer(models.optimizer(), scale, per_epoch // CHECKS_PER_EPOCH)
    model = models.compiled(dataclasses.replace(setting, steps_per_execution=spe),
                            optimizer=optimizer)
    clock = TrainClock()
    history = model.fit(source, epochs=max(1, plan.epochs * per_epoch // per_check),
                        steps_per_epoch=per_check, validation_data=plan.validation,
                        validation_batch_size=256, verbose=0, shuffle=False,
                        callbacks=[clock, keras.callbacks.TerminateOnNaN()]).history
    n = len(clock.at_checks)
    curve = Curve(label, setting, rule, [(i + 1) * per_check / per_epoch for i in range(n)],
                  clock.at_checks, [float(v) for v in history.get("val_accuracy", [])[:n]],
                  [float(v) for v in history.get("val_loss", [])[:n]])
    if spe < setting.steps_per_execution:
        curve.lr_rule += f"; steps_per_execution {spe} (an epoch has {per_epoch} steps)"
    fill = data.cache_fill_s.get(setting.batch_size, 0) if setting.pipeline == "tuned" else 0
    if fill:  # the tuned pipeline's cache was filled before: its time counts here too
        curve.seconds = [s + fill for s in curve.seconds]
        curve.lr_rule += f"; {fill:.1f} s filling the pipeline's cache counted"
    print(f"  {label}: {describe(setting)}; {curve.lr_rule}; best val accuracy "
          f"{curve.best:.4f} in {curve.epochs[-1] if n else 0:.2f} epochs, "
          f"{curve.final('seconds'):.1f} s{rates(clock, setting.batch_size * spe)}")
    return curve


def rates(clock, examples_per_call):
    """' (N examples/s at the median step, M overall)': how far the stalls and the first
    call's compiling take the whole from the steady rate."""
    if not clock.seconds or not clock.elapsed:
        return ""
    median = throughput(clock.seconds, examples_per_call, 1)["examples_per_sec"]
    return (f" ({median:,.0f} examples/s at the median step, "
            f"{len(clock.seconds) * examples_per_call / clock.elapsed:,.0f} overall)")


def describe(setting):
    return (f"{setting.policy}, batch {setting.batch_size}"
            + (f", steps_per_execution {setting.steps_per_execution}"
               if setting.steps_per_execution > 1 else "")
            + (f", jit_compile={setting.jit_compile}" if setting.jit_compile != "auto" else "")
            + (", tuned pipeline" if setting.pipeline == "tuned" else ""))


# --- the proof ---------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """What every configuration of the proof trains on."""
    epochs: int
    examples: int  # training examples per epoch (all, unless the budget asked for fewer)
    base_batch: int
    seed: int
    validation: tuple  # (x_val, y_val), the same for every check


PROOF_SHARE = 0.35  # of --budget_s: the training this proof estimates it needs


def plan_proof(probes, config, advised, gain):
    """The proof's epochs, examples per epoch and validation examples: all of them (up to
    VALIDATION_LIMIT to validate on), unless the estimated training of both configurations
    and their checks would overrun the proof's share of --budget_s; then fewer (arrays: the
    first of each epoch's order; folders: fewer steps of the pipeline per epoch), never
    under a batch per check, nor under 256 validation examples."""
    data, baseline, epochs = probes.data, probes.baseline, config.proof_epochs
    allowance = PROOF_SHARE * config.budget_s
    check_s = 2 * CHECKS_PER_EPOCH * epochs * baseline.compute_s / 3  # per validation example
    x_val, y_val = data.validation_arrays(max(256, min(VALIDATION_LIMIT,
                                                       int(allowance / 3 / check_s))))
    train_s = epochs * data.n_train * baseline.step_s * (1 + 1 / max(gain, 1e-3))
    left = max(allowance - len(x_val) * check_s, allowance / 3)
    examples = data.n_train if train_s <= left else int(data.n_train * left / train_s)
    floor = CHECKS_PER_EPOCH * advised.batch_size * advised.steps_per_execution
    return Plan(epochs, min(data.n_train, max(examples, floor)), probes.base.batch_size,
                config.seed, (x_val, y_val))


@dataclasses.dataclass
class Result:
    target: float
    baseline: Curve
    advised: Curve | None  # the configuration reported: the first that reached the target
    tries: list  # every advised configuration trained, in order
    demoted: list  # the Findings demoted, with why
    plan: Plan

    @property
    def speedup(self):
        base_s, _ = self.baseline.reached(self.target)
        adv_s = self.advised.reached(self.target)[0] if self.advised else None
        return base_s / adv_s if base_s and adv_s else None


def with_changes(base, findings):
    """base with the findings' changes (a backend is no Setting: it is proved elsewhere)."""
    changes = {k: v for f in findings for k, v in f.setting.items() if k != "backend"}
    return dataclasses.replace(base, **changes)


def prove(probes, recommended, config, gain):
    """Trains the baseline and the advised configuration; on a miss, finds and demotes the
    change responsible (Finding.recommended = False, .demoted = why). None when nothing
    is advised."""
    advised = with_changes(probes.base, recommended)
    if advised == probes.base:
        print("time to accuracy: nothing advised, nothing to prove")
        return None
    plan = plan_proof(probes, config, advised, gain)
    print(f"time to accuracy: {plan.epochs} epoch(s) of {plan.examples:,} examples each, "
          f"validation on {len(plan.validation[0]):,} examples at least "
          f"{CHECKS_PER_EPOCH}x per epoch")
    baseline = train_curve("baseline", probes.base, plan, probes.models, probes.data)
    target = baseline.best - config.accuracy_tolerance
    tries = [train_curve("advised", advised, plan, probes.models, probes.data)]
    result = Result(target, baseline, tries[0], tries, [], plan)
    if not math.isfinite(target):  # the baseline itself never validated (its loss ran off)
        print("time to accuracy: the baseline reached no validation accuracy: no target")
    elif tries[0].reached(target)[0] is None:
        search_culprit(result, probes, recommended, plan)
    return result


def search_culprit(result, probes, recommended, plan):
    """Proves again without each change that can move accuracy, one at a time; demotes the
    first whose removal reaches the target, else all of them."""
    suspects = [f for knob in ACCURACY_KNOBS for f in recommended if knob in f.setting]
    missed = result.tries[0]
    why = (f"the advised configuration missed the accuracy target {result.target:.4f} (best "
           f"{missed.best:.4f} in {plan.epochs} epoch(s), the baseline's "
           f"{result.baseline.best:.4f})")
    result.advised = None
    for suspect in suspects:
        rest = [f for f in recommended if f is not suspect]
        curve = train_curve(f"without {suspect.change}", with_changes(probes.base, rest),
                            plan, probes.models, probes.data)
        result.tries.append(curve)
        if curve.reached(result.target)[0] is not None:
            demote(suspect, f"{why}; without it the target was reached")
            result.demoted, result.advised = [suspect], curve
            return
    for suspect in suspects:
        demote(suspect, f"{why}; no single change's removal reached it")
    result.demoted = suspects


def demote(finding, why):
    finding.recommended, finding.demoted = False, why
    print(f"demoted: {finding.change}: {why}")


# --- the report ----------------------------------------------------------------------------

def lines(result):
    """The lines that end the printed table and the Text summary."""
    if result is None:
        return ["time to accuracy: nothing advised, nothing to prove"]
    plan = result.plan
    out = [f"time to accuracy: target val accuracy {result.target:.4f} (the baseline's best "
           f"{result.baseline.best:.4f} in {plan.epochs} epoch(s) of {plan.examples:,} "
           f"examples, less the tolerance); training seconds, compiling included, validation "
           "left out", f"learning rate: {RULE}"]
    for curve in [result.baseline] + result.tries:
        seconds, epochs = curve.reached(result.target)
        reached = (f"{seconds:7.1f} s ({epochs:.2f} epochs)" if seconds is not None
                   else "  missed the target")
        out.append(f"  {curve.label[:40]:<40} {reached}; final val accuracy "
                   f"{curve.final('val_accuracy'):.4f}, loss {curve.final('val_loss'):.4f}"
                   f"  [{describe(curve.setting)}; {curve.lr_rule}]")
    for f in result.demoted:
        out.append(f"  demoted: {f.change}")
    base_s, _ = result.baseline.reached(result.target)
    if base_s is None:
        out.append("time to accuracy: the baseline reached no validation accuracy: no target")
    elif result.speedup is not None:
        adv_s, _ = result.advised.reached(result.target)
        out.append(f"time to accuracy: baseline {base_s:.1f} s, advised {adv_s:.1f} s: "
                   f"time_to_accuracy_speedup {result.speedup:.2f}x")
    else:
        out.append(f"time to accuracy: baseline {base_s:.1f} s, advised: missed the target")
    return out


def metrics(result):
    if result is None:
        return {"time_to_accuracy_speedup": None}
    base_s, base_e = result.baseline.reached(result.target)
    adv = result.advised or result.tries[0]
    adv_s, adv_e = adv.reached(result.target)
    return {
        "time_to_accuracy_speedup": result.speedup, "accuracy_target": result.target,
        "baseline_time_to_target_s": base_s, "baseline_epochs_to_target": base_e,
        "advised_time_to_target_s": adv_s, "advised_epochs_to_target": adv_e,
        "baseline_final_val_accuracy": result.baseline.final("val_accuracy"),
        "baseline_final_val_loss": result.baseline.final("val_loss"),
        "advised_final_val_accuracy": adv.final("val_accuracy"),
        "advised_final_val_loss": adv.final("val_loss"),
        "advised_first_try_reached_target": result.tries[0].reached(result.target)[0] is not None,
        "demoted": [f.change for f in result.demoted],
        "proof_epochs": result.plan.epochs, "proof_examples": result.plan.examples,
        "advised_learning_rate_rule": adv.lr_rule,
    }


CHART = "validation accuracy against training time (x: step = training milliseconds)"


def log(log_dir, result):
    """Each configuration's validation accuracy at its training milliseconds (the step),
    and the target, as one Custom Scalars chart."""
    if result is None:
        return
    points = []
    for curve in [result.baseline] + result.tries:
        tag = "time_to_accuracy/" + curve.label.replace(" ", "_")[:60] + "/val_accuracy"
        points += [(int(round(1000 * s)), scalar_pb(tag, a))
                   for s, a in zip(curve.seconds, curve.val_accuracy)]
    end = max(max(c.seconds, default=0) for c in [result.baseline] + result.tries)
    points += [(0, scalar_pb("time_to_accuracy/target", result.target)),
               (int(round(1000 * end)), scalar_pb("time_to_accuracy/target", result.target))]
    write_events(log_dir, points)
    log_custom_scalars(log_dir, "advise", {CHART: [r"time_to_accuracy/.*"]})
