"""Magnitude pruning that really shrinks the saved model, on Keras 3 (any backend) or tfmot.

Shows: train a small baseline (or take yours, as trained), prune a copy of it
to a target sparsity per kernel (polynomial or constant schedule, optional
block or m:n structure such as 2:4, only some layers if asked), strip the
pruning machinery, fine-tune, then measure what a user cares about: the share
of exact zeros in each kernel beside the target, accuracy before and after,
and the gzip size of the saved model, of a TFLite file and of its int8
variants. Every exported file is reloaded and must predict like the model in
memory.
Two engines, side by side (--engine):
  keras  the default: Keras 3 alone, on the TensorFlow, JAX and PyTorch
         backends. Each pruned kernel gets a mask, kept as a variable of the
         optimizer (so a compiled JAX train step carries it), and a kernel
         constraint, which Keras applies after every optimizer update on every
         backend: on the schedule's steps it recomputes the mask from the
         weights' magnitudes, and always multiplies the kernel by it, so pruned
         weights are exact zeros and stay zero. A callback cannot do this on
         JAX: inside fit the JAX trainer holds the weights outside the model.
         Strip is a plain copy: no masks, no constraints, no optimizer. Prunes
         Dense, EinsumDense, Conv1D/2D/3D and DepthwiseConv1D/2D kernels of any
         Keras 3 model, yours included (--model=FILE.keras).
  tfmot  TensorFlow Model Optimization's prune_low_magnitude, the reference: it
         prunes only tf_keras (Keras 2) models. It is imported only when this
         engine runs, so the file works without tfmot and tf-keras installed.
The default layer choice is an expert's: kernels that hold less than
--min_layer_share of the model's kernel weights stay dense (the tfmot guide's
108-weight first conv saves nothing and costs accuracy), and are printed.
Layers neither engine can prune are listed, not fatal.
Exports: the .keras (keras) or .h5 (tfmot) file without the optimizer, whose
slots would hide the zeros; on the TensorFlow backend a TFLite file and a
dynamic-range int8 TFLite file; with the Keras engine also Keras' own
model.quantize("int8") of the pruned model and its accuracy (Keras quantizes
Dense and EinsumDense, not convolutions: the layers it left are named).
Optional: --clusters=8 (tfmot) then shares 8 values per kernel (sparsity-
preserving clustering), which gzip and int8 TFLite compress further.
Run:    python main.py --recipe=prune
        python main.py --recipe=prune --sweep=0.5,0.7,0.8,0.9,0.95
        python main.py --recipe=prune --model=conv --dataset=mnist --data_dir=DIR
        python main.py --recipe=prune --model=my_model.keras --data_dir=my_photos/
        python main.py --recipe=prune --engine=tfmot       # the same on tfmot
        KERAS_BACKEND=jax python main.py --recipe=prune
        ... --strategy=mirrored, or on JAX --strategy=data_parallel (Keras engine;
        --batch_size is then per replica); --resume after a kill continues the
        baseline or the fine-tune, the schedule's step included
Expect: on the default shapes data (6,000 28x28 images, dense model, 80%, 2 CPU
        cores, ~15 s), measured: the output layer (0.6% of the kernel
        weights) is left dense, dense_128 and dense_64 reach exactly 0.800
        (0.795 over all kernels); accuracy 0.982 -> 0.978 (0.4 pt); .keras gzip
        406,259 -> 124,485 bytes (3.26x); int8 TFLite 41,459 (9.8x); Keras
        int8 41,320 at 0.978. KERAS_BACKEND=jax: 0.977 -> 0.978, 3.28x;
        --engine=tfmot: 0.988 -> 0.983, 3.2x. The sweep:
           target  measured  accuracy  drop pts  gzip bytes  ratio
             0.50     0.500    0.9830     -0.10     243,354   1.67
             0.70     0.700    0.9860     -0.40     165,385   2.46
             0.80     0.800    0.9780      0.40     124,485   3.26
             0.90     0.900    0.9740      0.80      80,732   5.03
             0.95     0.950    0.9600      2.20      56,106   7.24
        Accuracy holds to 90%; at 95% it falls. On the tfmot guide's MNIST
        model (benchmarks/prune.py), both engines lose <= 0.1 pt at 80%
        (guide: 0.7) and ~0.7 pt at 90% (guide: 3.0), int8 TFLite 14x.
Copy:   this file alone works in any Keras 3 project (TensorFlow, JAX or
        PyTorch backend; numpy): run(Config(), "logs", ((x_train, y_train),
        (x_val, y_val)), model=your_model) prunes a copy of your trained
        keras.Model (or of a builder fn(input_shape, num_classes)'s; leave it
        out for the built-in dense/conv models). In your own training loop:
        pruned, masks = prune_model(model, Schedule(...), optimizer, loss,
        layer_names=choose_layers(model)[0]); pruned.fit(...);
        strip_pruning(pruned). strategy= (a tf.distribute strategy or a
        keras.distribution) and fit= (for MultiWorkerMirroredStrategy, where
        Keras 3's fit fails) work as in batch.py. The tfmot engine needs tf-keras and
        tensorflow-model-optimization; TFLite export and TensorBoard logs need
        TensorFlow.
"""
import contextlib
import dataclasses
import glob
import gzip
import io
import json
import math
import os
import socket
import time
import typing
import warnings

import keras
import numpy as np
from keras import ops

# What main.py feeds this recipe: arrays of 28x28 gray images by default.
DATA = {"form": "arrays", "image_size": 28, "channels": 1}
TAKES_MODEL = True  # run() takes model=: your keras.Model (Keras engine), pruned from a copy
RESUMABLE = True  # Keras engine: per-epoch checkpoints of the baseline and each fine-tune
STRATEGIES = ("mirrored", "multi_worker", "data_parallel")  # Keras engine: run(strategy=, fit=)
HEADLINE = ("engine", "baseline_accuracy", "pruned_accuracy", "accuracy_drop", "sparsity_target",
            "sparsity_measured", "model_sparsity", "baseline_gzip_bytes", "pruned_gzip_bytes",
            "compression_ratio", "tflite_quant_gzip_bytes", "tflite_quant_compression_ratio",
            "wall_time_s")
ENGINES = ("keras", "tfmot")


@dataclasses.dataclass
class Config:
    engine: typing.Literal["keras", "tfmot"] = "keras"  # keras: Keras 3 alone, any backend;
    # tfmot: TensorFlow Model Optimization on tf_keras models, the reference
    model: typing.Literal["dense", "conv"] = "dense"  # the built-in model (or --model=FILE):
    # dense: Flatten-Dense(128)-Dense(64)-out; conv: the tfmot guide's MNIST model
    baseline_epochs: int | None = None  # epochs to train the baseline before pruning; default:
    # 10 for a built-in model, 0 for yours (taken as trained)
    epochs: int = 4  # fine-tuning epochs of the pruned copy (the pruning schedule runs in them)
    batch_size: int = 64  # examples per training step
    learning_rate: float = 1e-3  # Adam learning rate of the baseline
    finetune_learning_rate: float = 1e-3  # Adam learning rate while pruning
    schedule: typing.Literal["polynomial", "constant"] = "polynomial"  # polynomial: initial ->
    # final sparsity; constant: final from begin_step
    initial_sparsity: float = 0.5  # sparsity at begin_step (polynomial schedule)
    final_sparsity: float = 0.8  # target fraction of zeros in each pruned kernel
    begin_step: int = 0  # fine-tuning step where pruning starts
    end_step: int | None = None  # step where the target is reached; default: the last step
    frequency: int | None = None  # prune every N steps; default: about 10 times in the span
    block_size: tuple[int, ...] | None = None  # e.g. 1,4: prune 2-D kernels in blocks of this shape
    sparsity_m_by_n: tuple[int, ...] | None = None  # e.g. 2,4: m zeros in every n weights
    prune_layers: tuple[str, ...] | None = None  # names of layers to prune (default: every
    # prunable kernel that holds at least --min_layer_share of the kernel weights)
    min_layer_share: float = 0.01  # default layer choice: kernels holding less than this share
    # of the model's kernel weights stay dense (they save little and cost accuracy)
    clusters: int = 0  # tfmot: after pruning, share N values per kernel, zeros kept; 0: off
    sweep: tuple[float, ...] | None = None  # e.g. 0.5,0.7,0.8,0.9,0.95: also prune to each
    steps_per_epoch: int | None = None  # optional cap on training steps per epoch
    scale_lr_with_replicas: bool = True  # multiply the learning rates by the replica count
    seed: int = 0  # initial weights and shuffling

    def __post_init__(self):
        for name in ("initial_sparsity", "final_sparsity"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {value}")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"--initial_sparsity ({self.initial_sparsity}) must not exceed "
                             f"--final_sparsity ({self.final_sparsity})")
        if self.sweep is not None and not all(0 < s < 1 for s in self.sweep):
            raise ValueError(f"--sweep values must be sparsities in (0, 1), got {self.sweep}")
        if (self.baseline_epochs is not None and self.baseline_epochs < 0) or self.epochs < 1 \
                or self.batch_size < 1:
            raise ValueError("--epochs and --batch_size must be >= 1, --baseline_epochs >= 0")
        if self.learning_rate <= 0 or self.finetune_learning_rate <= 0:
            raise ValueError("--learning_rate and --finetune_learning_rate must be > 0")
        if self.begin_step < 0 or (self.end_step is not None and self.end_step <= self.begin_step):
            raise ValueError(f"--end_step must be after --begin_step (>= 0), got "
                             f"{self.begin_step}..{self.end_step}")
        if self.clusters < 0 or self.clusters == 1:
            raise ValueError(f"--clusters must be 0 (off) or >= 2, got {self.clusters}")
        if self.clusters and self.engine != "tfmot":
            raise ValueError("--clusters is tfmot's sparsity-preserving clustering: add "
                             "--engine=tfmot")
        if self.frequency is not None and self.frequency < 1:
            raise ValueError(f"--frequency must be >= 1, got {self.frequency}")
        if not 0 <= self.min_layer_share < 1:
            raise ValueError(f"--min_layer_share must be in [0, 1), got {self.min_layer_share}")
        if self.block_size is not None and (len(self.block_size) != 2 or min(self.block_size) < 1):
            raise ValueError(f"--block_size must be two positive integers like 1,4, "
                             f"got {','.join(map(str, self.block_size))}")
        if self.sparsity_m_by_n is not None:
            m_by_n = self.sparsity_m_by_n
            if len(m_by_n) != 2 or not 0 < m_by_n[0] < m_by_n[1]:
                raise ValueError(f"--sparsity_m_by_n must be m,n with 0 < m < n (m zeros in "
                                 f"every n weights), like 2,4; got {','.join(map(str, m_by_n))}")
            if self.block_size is not None or self.sweep is not None:
                raise ValueError("--sparsity_m_by_n fixes the sparsity at m/n: it cannot be "
                                 "combined with --block_size or --sweep")


# --- the built-in models ----------------------------------------------------------------

def build_model(input_shape, num_classes, kind="dense", api=keras):
    """A classifier and its loss: logits for >2 classes, a sigmoid unit for 2.

    dense: Flatten -> Dense(128) -> Dense(64) -> output (the classic recipe);
    conv:  Conv2D(12, 3) -> MaxPool -> Flatten -> output (the tfmot guide's MNIST model).
    `api` is keras (Keras 3) or tf_keras (for the tfmot engine): the same model.
    """
    binary, layers = num_classes <= 2, api.layers
    if kind == "dense":
        body = [layers.Flatten(name="flatten"),
                layers.Dense(128, activation="relu", name="dense_128"),
                layers.Dense(64, activation="relu", name="dense_64")]
    else:
        body = [layers.Conv2D(12, 3, activation="relu", name="conv"),
                layers.MaxPooling2D(2, name="pool"), layers.Flatten(name="flatten")]
    head = (layers.Dense(1, activation="sigmoid", name="output") if binary
            else layers.Dense(num_classes, name="output"))
    model = api.Sequential([api.Input(shape=input_shape), *body, head], name=kind)
    loss = (api.losses.BinaryCrossentropy() if binary
            else api.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, loss


# --- which kernels to prune -------------------------------------------------------------

PRUNABLE = (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Conv1D,
            keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.DepthwiseConv1D,
            keras.layers.DepthwiseConv2D)
# Layers with weights that no one prunes by magnitude: not worth a "left dense" line.
NOT_PRUNED = ("BatchNormalization", "LayerNormalization", "GroupNormalization",
              "Normalization", "InputLayer")


def all_layers(model):
    """Every layer of `model`, the layers of nested models included, in order."""
    found = []
    for layer in model.layers:
        found += all_layers(layer) if hasattr(layer, "layers") else [layer]
    return found


def kernel_of(layer):
    """The weight tensor magnitude pruning thins out, or None where it does not apply.

    Works on Keras 3 layers (variables) and tf_keras layers alike.
    """
    kernel = getattr(layer, "kernel", None)
    if kernel is None or not (isinstance(layer, PRUNABLE) or _is_tf_keras_prunable(layer)):
        return None
    return kernel


def _is_tf_keras_prunable(layer):
    return (type(layer).__module__.startswith("tf_keras")
            and type(layer).__name__ in ("Dense", "Conv1D", "Conv2D", "Conv3D",
                                         "DepthwiseConv2D"))


def choose_layers(model, layer_names=None, min_share=0.01, sparsity_m_by_n=None,
                  block_size=None):
    """(names of the layers to prune, {layer name: why it stays dense}).

    Named layers if `layer_names` is given; otherwise every prunable kernel
    that holds at least `min_share` of the model's kernel weights. A layer
    whose kernel does not fit the structure (m:n groups along its input axis,
    2-D blocks) stays dense, as does a weighted layer that has no such kernel.
    """
    layers = all_layers(model)
    sizes = {layer.name: int(np.prod(kernel_of(layer).shape)) for layer in layers
             if kernel_of(layer) is not None}
    total = max(sum(sizes.values()), 1)
    chosen, dense = [], {}
    for layer in layers:
        if layer_names is not None and layer.name not in layer_names:
            continue
        kernel = kernel_of(layer)
        if kernel is None:
            if layer.weights and (layer_names or type(layer).__name__ not in NOT_PRUNED):
                dense[layer.name] = f"{type(layer).__name__} has no kernel to prune by magnitude"
            continue
        shape, share = tuple(kernel.shape), sizes[layer.name] / total
        if layer_names is None and share < min_share:
            dense[layer.name] = (f"holds {share:.1%} of the kernel weights, under "
                                 f"--min_layer_share={min_share:g}: pruning it saves little")
        elif sparsity_m_by_n and (len(shape) < 2 or shape[-2] % sparsity_m_by_n[1]):
            dense[layer.name] = (f"{sparsity_m_by_n[0]}:{sparsity_m_by_n[1]} groups along the "
                                 f"input axis do not fit its kernel {shape}")
        elif block_size and (len(shape) != 2 or shape[0] % block_size[0]
                             or shape[1] % block_size[1]):
            dense[layer.name] = (f"{block_size[0]}x{block_size[1]} blocks do not tile its "
                                 f"kernel {shape}")
        else:
            chosen.append(layer.name)
    return chosen, dense


# --- the Keras 3 engine: a mask per kernel, applied by its constraint -------------------

@dataclasses.dataclass(frozen=True)
class Schedule:
    """When and how far to prune, in training steps counted from 1 (as tfmot counts).

    polynomial: tfmot's PolynomialDecay, initial -> final sparsity over begin..end
    (power 3: fast at first, gently at the end); constant: final from begin.
    Pruning happens on steps begin, begin + frequency, ... up to end.
    """
    kind: str
    initial: float
    final: float
    begin: int
    end: int
    frequency: int

    def sparsity(self, step):
        """The target at `step` (a tensor inside a train step)."""
        if self.kind == "constant":
            return ops.convert_to_tensor(self.final, "float32")
        progress = ops.clip((ops.cast(step, "float32") - self.begin) / (self.end - self.begin),
                            0.0, 1.0)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3

    def due(self, step):
        """Whether `step` recomputes the masks."""
        return ops.logical_and(ops.logical_and(step >= self.begin, step <= self.end),
                               (step - self.begin) % self.frequency == 0)


def _keep_largest(scores, sparsity):
    """1 for all but the `sparsity` share of scores that are smallest, 0 for those."""
    flat = ops.reshape(scores, (-1,))
    pruned = ops.cast(ops.round(sparsity * flat.shape[0]), "int32")
    ranks = ops.argsort(ops.argsort(flat))  # 0 for the smallest score
    return ops.reshape(ops.cast(ranks >= pruned, scores.dtype), scores.shape)


def magnitude_mask(weights, mask, sparsity, block_size=None, sparsity_m_by_n=None):
    """The new mask: the weights of largest magnitude kept, the rest 0.

    Scores are |weights x old mask|, so a weight pruned once stays pruned while
    the schedule only raises the sparsity. m:n keeps the n - m largest of
    every n weights along the input axis (the axis before the last); blocks
    are scored by their mean magnitude.
    """
    scores = ops.abs(weights * mask)
    if sparsity_m_by_n:
        m, n = sparsity_m_by_n
        moved = ops.moveaxis(scores, -2, -1)  # the input axis last, in groups of n
        groups = ops.reshape(moved, (-1, n))
        keep = ops.cast(ops.argsort(ops.argsort(groups, axis=-1), axis=-1) >= m, scores.dtype)
        return ops.moveaxis(ops.reshape(keep, moved.shape), -1, -2)
    if block_size:
        (rows, cols), (bh, bw) = scores.shape, block_size
        blocks = ops.mean(ops.reshape(scores, (rows // bh, bh, cols // bw, bw)), axis=(1, 3))
        keep = _keep_largest(blocks, sparsity)
        return ops.repeat(ops.repeat(keep, bh, axis=0), bw, axis=1)
    return _keep_largest(scores, sparsity)


class MagnitudeMask(keras.constraints.Constraint):
    """A kernel's pruning, run by Keras after every optimizer update (on every backend).

    On the schedule's steps it recomputes the mask from the weights; always it
    returns the weights times the mask, so pruned weights are exact zeros after
    every update. The mask and the step count are optimizer variables, which a
    compiled train step carries (on JAX as part of its state).
    """

    def __init__(self, mask, iterations, schedule, block_size=None, sparsity_m_by_n=None,
                 previous=None):
        self.mask, self.iterations, self.schedule = mask, iterations, schedule
        self.block_size, self.sparsity_m_by_n, self.previous = block_size, sparsity_m_by_n, previous

    def __call__(self, weights):
        if self.previous is not None:  # the layer's own constraint still applies
            weights = self.previous(weights)
        step = ops.cast(self.iterations, "int32") + 1  # this update's step, counted from 1

        def recomputed():
            return magnitude_mask(weights, self.mask, self.schedule.sparsity(step),
                                  self.block_size, self.sparsity_m_by_n)

        mask = ops.cond(self.schedule.due(step), recomputed,
                        lambda: ops.convert_to_tensor(self.mask))
        self.mask.assign(mask)
        return weights * mask


def prune_model(model, schedule, optimizer, loss, metrics=("accuracy",), layer_names=None,
                block_size=None, sparsity_m_by_n=None):
    """(a compiled copy of `model` that prunes while it trains, {layer name: mask}).

    `model` is never changed. The copy starts from its weights; fit it, then
    strip_pruning() it. layer_names default: choose_layers(model).
    """
    if layer_names is None:
        layer_names = choose_layers(model, sparsity_m_by_n=sparsity_m_by_n,
                                    block_size=block_size)[0]
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    copy.compile(optimizer=optimizer, loss=loss, metrics=list(metrics))
    if not copy.optimizer.built:
        copy.optimizer.build(copy.trainable_variables)
    masks = {}
    for layer in all_layers(copy):
        if layer.name in layer_names:
            kernel = kernel_of(layer)
            masks[layer.name] = copy.optimizer.add_variable(
                kernel.shape, initializer="ones", dtype=kernel.dtype,
                name=f"prune_mask_{layer.name}")
            kernel.constraint = MagnitudeMask(masks[layer.name], copy.optimizer.iterations,
                                              schedule, block_size, sparsity_m_by_n,
                                              kernel.constraint)
    return copy, masks


def strip_pruning(model):
    """A plain copy of a pruned model, its zeros kept: no masks, no constraints, no
    optimizer (a fresh model from its config, holding its weights)."""
    plain = model.__class__.from_config(model.get_config())
    plain.set_weights(model.get_weights())
    return plain


def measure_sparsity(model, layer_names):
    """({layer: share of exact zeros in its kernel}, that share over those kernels,
    the share over every prunable kernel of the model)."""
    per_layer, zeros, total, model_zeros, model_total = {}, 0, 0, 0, 0
    for layer in all_layers(model):
        kernel = kernel_of(layer)
        if kernel is None:
            continue
        values = np.asarray(kernel)  # a Keras 3 or a tf_keras variable
        model_zeros, model_total = model_zeros + int(np.sum(values == 0)), model_total + values.size
        if layer.name in layer_names:
            per_layer[layer.name] = float(np.mean(values == 0))
            zeros, total = zeros + int(np.sum(values == 0)), total + values.size
    return per_layer, zeros / max(total, 1), model_zeros / max(model_total, 1)


class PruningLog(keras.callbacks.Callback):
    """Each pruned layer's sparsity and threshold (its smallest kept |weight|), per epoch
    into TensorBoard (`<layer>/sparsity`, `<layer>/threshold`): the last epoch's are the
    final values. Weights are read at epoch ends, where every backend has them."""

    def __init__(self, log_dir, layer_names):
        super().__init__()
        self.log_dir, self.layer_names = log_dir, layer_names

    def on_epoch_end(self, epoch, logs=None):
        step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        points = []
        for layer in all_layers(self.model):
            if layer.name in self.layer_names:
                values = np.abs(ops.convert_to_numpy(kernel_of(layer)))
                kept = values[values > 0]
                points += [(step, scalar_pb(f"{layer.name}/sparsity", np.mean(values == 0))),
                           (step, scalar_pb(f"{layer.name}/threshold",
                                            kept.min() if kept.size else 0.0))]
        write_events(self.log_dir, points)


# --- the tfmot engine: tf_keras models, imported only when it runs -----------------------

def _tfmot():
    """(tf_keras, tensorflow_model_optimization), imported on first use.

    tfmot 0.8 prunes only tf_keras (Keras 2) models, and importing it sets
    TF_USE_LEGACY_KERAS=1 for the whole process, which flips what TensorFlow's
    keras alias means; it is put back, so the rest of the process keeps Keras 3.
    """
    previous = os.environ.get("TF_USE_LEGACY_KERAS")
    try:
        import tf_keras
        import tensorflow_model_optimization as tfmot
    except ImportError as e:
        raise ValueError(f"--engine=tfmot needs tf-keras and tensorflow-model-optimization "
                         f"({e}); --engine=keras needs neither") from None
    finally:
        if previous is None:
            os.environ.pop("TF_USE_LEGACY_KERAS", None)
        else:
            os.environ["TF_USE_LEGACY_KERAS"] = previous
    return tf_keras, tfmot


def tfmot_schedule(schedule):
    """The tfmot schedule object for a Schedule."""
    sparsity = _tfmot()[1].sparsity.keras
    if schedule.kind == "constant":
        return sparsity.ConstantSparsity(schedule.final, begin_step=schedule.begin,
                                         end_step=schedule.end, frequency=schedule.frequency)
    return sparsity.PolynomialDecay(initial_sparsity=schedule.initial,
                                    final_sparsity=schedule.final, begin_step=schedule.begin,
                                    end_step=schedule.end, frequency=schedule.frequency)


def tfmot_prune_model(model, schedule, layer_names, block_size=None, sparsity_m_by_n=None):
    """Wraps a *copy* of tf_keras `model` in tfmot's prune_low_magnitude for the named layers.

    Returns (pruned copy, {layer: why tfmot left it dense}). tfmot's
    prune_low_magnitude(model) wraps the same layer objects, so fine-tuning
    would prune the original too: hence the clone.
    """
    tf_keras, tfmot = _tfmot()
    if not isinstance(model, tf_keras.Model):
        raise ValueError("--engine=tfmot prunes tf_keras (Keras 2) models only, and this is a "
                         "Keras 3 model: use --engine=keras (the default)")
    copy = tf_keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    params = {"pruning_schedule": tfmot_schedule(schedule)}
    if block_size is not None:
        params["block_size"] = tuple(block_size)
    if sparsity_m_by_n is not None:
        params["sparsity_m_by_n"] = tuple(sparsity_m_by_n)
    left_dense = {}

    def wrap(layer):
        if isinstance(layer, tf_keras.layers.InputLayer):
            return layer.__class__.from_config(layer.get_config())
        if layer.name not in layer_names:
            return layer
        try:
            return tfmot.sparsity.keras.prune_low_magnitude(layer, **params)
        except ValueError as e:  # a layer tfmot cannot wrap (Rescaling, RandomFlip, custom...)
            left_dense[layer.name] = f"tfmot cannot wrap {type(layer).__name__}: {str(e)[:60]}..."
            return layer

    return tf_keras.models.clone_model(copy, clone_function=wrap), left_dense


def tfmot_cluster(model, layer_names, clusters):
    """A copy of tf_keras `model` wrapped for sparsity-preserving weight clustering: each
    named kernel keeps its zeros and shares `clusters` values after strip_clustering."""
    tf_keras, tfmot = _tfmot()
    clustering = tfmot.clustering.keras
    copy = tf_keras.models.clone_model(model)
    copy.set_weights(model.get_weights())

    def wrap(layer):
        if layer.name not in layer_names:
            return layer
        return clustering.cluster_weights(
            layer, number_of_clusters=clusters, preserve_sparsity=True,
            cluster_centroids_init=clustering.CentroidInitialization.KMEANS_PLUS_PLUS)

    return tf_keras.models.clone_model(copy, clone_function=wrap)


def tfmot_log_final_sparsity(log_dir, pruned_model, step):
    """What PruningSummaries misses: it writes at epoch starts, never after the last step."""
    tf = _tensorflow()  # tf.summary: its tags must match PruningSummaries' (same name rules)
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        for layer in pruned_model.layers:
            for _, mask, threshold in getattr(layer, "pruning_vars", ()):  # PruningSummaries' tags
                tf.summary.scalar(mask.name + "/sparsity", 1 - float(np.mean(mask.numpy())),
                                  step=step)
                tf.summary.scalar(threshold.name + "/threshold", float(threshold.numpy()),
                                  step=step)
    writer.close()


# --- both engines: train, prune, measure, export -----------------------------------------

def _tensorflow():
    """TensorFlow if it imports (TensorBoard logs, TFLite), else None: JAX needs none."""
    try:
        import tensorflow as tf
        return tf
    except ImportError:
        return None


def api_of(model):
    """keras for a Keras 3 model, tf_keras for a tf_keras one: their callbacks differ."""
    return _tfmot()[0] if type(model).__module__.startswith("tf_keras") else keras


def train(model, data, epochs, batch_size, steps_per_epoch, seed, callbacks=(), fit=None,
          checkpoint_dir=None):
    """fit on in-memory arrays; FloatingPointError when the loss is not finite.

    `model` is compiled (Keras 3 or tf_keras alike). With checkpoint_dir (Keras 3
    models), each epoch is checkpointed there and a checkpoint a killed run left
    is continued, its optimizer state (the pruning schedule's step) included.
    """
    (x_train, y_train), (x_val, y_val) = data
    saved = {"epochs_done": 0, "logs": {}}
    if checkpoint_dir is not None:
        checkpoint, saved = latest_checkpoint(checkpoint_dir)
        if checkpoint:
            print(f"Resuming after epoch {saved['epochs_done']} from {checkpoint}")
            restore(model, checkpoint)
        callbacks = [*callbacks, EpochCheckpoint(checkpoint_dir)]  # last: after TensorBoard
    if steps_per_epoch is not None:  # the cap: the first steps x batch examples, each epoch
        # (fit's own steps_per_epoch reads arrays on across epochs and runs out of data)
        x_train, y_train = x_train[:steps_per_epoch * batch_size], y_train[:steps_per_epoch
                                                                           * batch_size]
    fit = fit or type(model).fit
    history = fit(model, x_train, y_train, batch_size=batch_size, epochs=epochs,
                  initial_epoch=saved["epochs_done"], validation_data=(x_val, y_val),
                  shuffle=True, verbose=2,
                  callbacks=[api_of(model).callbacks.TerminateOnNaN(), *callbacks])
    final_loss = final_logs(history, saved)["loss"]
    if not np.isfinite(final_loss) or len(history.history.get("loss", [])) < epochs - saved[
            "epochs_done"]:
        raise FloatingPointError(f"training loss became {final_loss}; lower --learning_rate "
                                 "or --finetune_learning_rate")
    return history


def accuracy(model, x, y, batch_size=512):
    """Fraction of correct predictions (argmax of the outputs, or sigmoid > 0.5)."""
    out = np.asarray(model.predict(x, batch_size=batch_size, verbose=0))
    predicted = (out[:, 0] > 0.5).astype(np.int64) if out.shape[-1] == 1 else out.argmax(-1)
    return float(np.mean(predicted == np.asarray(y).astype(np.int64)))


def gzip_bytes(path_or_bytes):
    """Size after gzip -9: what a zipped download of the model costs."""
    if isinstance(path_or_bytes, bytes):
        return len(gzip.compress(path_or_bytes, compresslevel=9, mtime=0))
    with open(path_or_bytes, "rb") as f:
        return len(gzip.compress(f.read(), compresslevel=9, mtime=0))


def save_model(model, path):
    """The model without an optimizer (whose slots are dense and would hide the zeros):
    .keras for Keras 3, .h5 for tf_keras (what the tfmot guide measures). Returns its
    gzip size."""
    if path.endswith(".h5"):
        with warnings.catch_warnings():  # "HDF5 is legacy"
            warnings.simplefilter("ignore", UserWarning)
            write_atomically(path, lambda partial: model.save(partial, include_optimizer=False))
    else:
        plain = model if not model.compiled else strip_pruning(model)
        write_atomically(path, plain.save)
    return gzip_bytes(path)


def load_model(path):
    if path.endswith(".h5"):
        return _tfmot()[0].models.load_model(path, compile=False)
    return keras.models.load_model(path, compile=False)


def predictions_match(model, reloaded, x, atol=1e-5):
    """(whether `reloaded` predicts like `model` on x, the largest difference)."""
    expected = np.asarray(model.predict(x, verbose=0))
    got = np.asarray(reloaded.predict(x, verbose=0))
    max_diff = float(np.max(np.abs(expected - got)))
    return max_diff <= atol, max_diff


def to_tflite(model, quantize):
    """A TFLite flatbuffer (TensorFlow backend); quantize=True adds dynamic-range (int8
    weight) quantization."""
    converter = _tensorflow().lite.TFLiteConverter.from_keras_model(model)
    if quantize:
        converter.optimizations = [_tensorflow().lite.Optimize.DEFAULT]
    with contextlib.redirect_stdout(io.StringIO()):  # a Keras 3 model goes via a SavedModel,
        return converter.convert()                    # whose export lists its endpoints


def tflite_predict(flatbuffer, x):
    """The TFLite model's outputs for x, one example at a time."""
    with warnings.catch_warnings():  # "deprecated ... use ai_edge_litert": not installed here
        warnings.simplefilter("ignore", UserWarning)
        interpreter = _tensorflow().lite.Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    outputs = []
    for example in x:
        interpreter.set_tensor(inp["index"], example[None].astype(inp["dtype"]))
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(out["index"])[0])
    return np.stack(outputs)


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def export_tflite(model, run_dir, x_check):
    """pruned.tflite and pruned_quant.tflite (TensorFlow backend): their gzip sizes and
    reload checks (float: outputs within 1e-4; int8: the same predicted classes)."""
    expected = np.asarray(model.predict(x_check, verbose=0))
    out = {}
    for name, quantize in (("tflite", False), ("tflite_quant", True)):
        flatbuffer = to_tflite(model, quantize)
        write_atomically(os.path.join(run_dir, f"pruned{'_quant' if quantize else ''}.tflite"),
                         lambda partial: write_bytes(partial, flatbuffer))
        got = tflite_predict(flatbuffer, x_check)
        out[f"{name}_gzip_bytes"] = gzip_bytes(flatbuffer)
        out[f"{name}_reload_matches"] = bool(
            np.allclose(got, expected, atol=1e-4) if not quantize else
            np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.98 if got.shape[-1] > 1 else
            np.mean((got[:, 0] > 0.5) == (expected[:, 0] > 0.5)) >= 0.98)
    return out


def left_in_float(model):
    """Names of the kernel layers model.quantize("int8") leaves in float: all but Dense
    and EinsumDense (convolutions, for one)."""
    return [layer.name for layer in all_layers(model) if kernel_of(layer) is not None
            and not isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))]


def keras_int8(model, run_dir, x_val, y_val):
    """Keras' own model.quantize("int8") of a copy: accuracy, gzip size, reload check,
    and the layers it left in float (it quantizes Dense and EinsumDense only)."""
    copy = strip_pruning(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy.quantize("int8")
    path = os.path.join(run_dir, "pruned_int8.keras")
    write_atomically(path, copy.save)
    reload_ok, _ = predictions_match(copy, keras.models.load_model(path, compile=False),
                                     x_val[:256])
    left = left_in_float(copy)
    return {"keras_int8_accuracy": accuracy(copy, x_val, y_val),
            "keras_int8_gzip_bytes": gzip_bytes(path), "keras_int8_reload_matches": reload_ok,
            "keras_int8_unquantized_layers": ", ".join(left) or "none"}


def pruning_steps(config, n_train, replicas=1):
    """(steps per epoch, end_step, frequency) of the fine-tuning; ValueError if they clash.
    Each step takes batch_size examples per replica."""
    steps = math.ceil(n_train / (config.batch_size * replicas))  # one pass, the last batch short
    steps = min(steps, config.steps_per_epoch or steps)
    end_step = config.end_step or steps * config.epochs
    if end_step <= config.begin_step:
        raise ValueError(f"--begin_step ({config.begin_step}) must be before the end of "
                         f"pruning (step {end_step}); lower it or raise --epochs")
    frequency = config.frequency or default_frequency(config.begin_step, end_step)
    if config.schedule == "polynomial" and (end_step - config.begin_step) % frequency:
        raise ValueError(f"--end_step - --begin_step ({end_step - config.begin_step}) must be a "
                         f"multiple of --frequency ({frequency}), or the final sparsity is "
                         "never applied")
    return steps, end_step, frequency


def default_frequency(begin_step, end_step, times=10):
    """The largest divisor of the span that still prunes ~`times` times.

    Pruning happens only when (step - begin_step) % frequency == 0, so a span
    that is not a multiple of the frequency never applies the final sparsity.
    """
    span = end_step - begin_step
    return max(f for f in range(1, max(1, span // times) + 1) if span % f == 0)


def prune_and_finetune(baseline, loss, data, config, final_sparsity, log_dir, strategy=None,
                       fit=None, checkpoint_dir=None):
    """Prunes a copy of `baseline` to `final_sparsity` with the configured engine,
    fine-tunes and strips it; returns the stripped model and its measurements.

    Keras engine: under `strategy` (see run()), checkpointed in checkpoint_dir."""
    (x_train, _), (x_val, y_val) = data
    replicas = replica_count(strategy)
    steps, end_step, frequency = pruning_steps(config, len(x_train), replicas)
    lr_scale = replicas if config.scale_lr_with_replicas else 1
    schedule = Schedule(config.schedule, min(config.initial_sparsity, final_sparsity),
                        final_sparsity, config.begin_step, end_step, frequency)
    names, left_dense = choose_layers(baseline, config.prune_layers, config.min_layer_share,
                                      config.sparsity_m_by_n, config.block_size)
    tf = _tensorflow()
    if config.engine == "keras":
        with distribution_scope(strategy):
            model, _ = prune_model(baseline, schedule, keras.optimizers.Adam(
                config.finetune_learning_rate * lr_scale), loss, ["accuracy"], names,
                config.block_size, config.sparsity_m_by_n)
        callbacks = [PruningLog(os.path.join(log_dir, "metrics"), names)]
        if tf is not None:
            callbacks.append(keras.callbacks.TensorBoard(log_dir=log_dir))
    else:
        tf_keras, tfmot = _tfmot()
        model, refused = tfmot_prune_model(baseline, schedule, names, config.block_size,
                                           config.sparsity_m_by_n)
        left_dense.update(refused)
        names = [n for n in names if n not in refused]
        model.compile(optimizer=tf_keras.optimizers.Adam(config.finetune_learning_rate),
                      loss=loss, metrics=["accuracy"])
        callbacks = [tfmot.sparsity.keras.UpdatePruningStep(),
                     tfmot.sparsity.keras.PruningSummaries(log_dir=log_dir)]
    for name, why in left_dense.items():
        print(f"left dense: {name} ({why})")
    if not names:
        raise ValueError("no layer was pruned: check --prune_layers, --min_layer_share and the "
                         "layers listed above")
    amount = (f"{config.sparsity_m_by_n[0]}:{config.sparsity_m_by_n[1]}" if config.sparsity_m_by_n
              else f"{final_sparsity:.0%}")
    print(f"pruning {', '.join(names)} to {amount} with the {config.engine} engine "
          f"({config.schedule}, steps {config.begin_step}..{end_step} every {frequency})")
    with distribution_scope(strategy):
        train(model, data, config.epochs, config.batch_size * replicas, steps, config.seed,
              callbacks, fit, checkpoint_dir if config.engine == "keras" else None)
    if config.engine == "keras":
        stripped = strip_pruning(model)
    else:
        tfmot_log_final_sparsity(os.path.join(log_dir, "metrics"), model,
                                 int(model.optimizer.iterations.numpy()))
        stripped = tfmot.sparsity.keras.strip_pruning(model)
        if config.clusters:
            print(f"clustering {', '.join(names)} to {config.clusters} shared values "
                  "(zeros kept), 1 epoch")
            clustered = tfmot_cluster(stripped, names, config.clusters)
            clustered.compile(optimizer=tf_keras.optimizers.Adam(
                config.finetune_learning_rate / 10), loss=loss, metrics=["accuracy"])
            train(clustered, data, 1, config.batch_size, steps, config.seed)
            stripped = tfmot.clustering.keras.strip_clustering(clustered)
    per_layer, measured, model_sparsity = measure_sparsity(stripped, names)
    return {"model": stripped, "accuracy": accuracy(stripped, x_val, y_val),
            "per_layer": per_layer, "sparsity_measured": measured,
            "model_sparsity": model_sparsity, "left_dense": left_dense,
            "end_step": end_step, "frequency": frequency,
            "steps_trained": int(ops.convert_to_numpy(model.optimizer.iterations))}


# --- the run -----------------------------------------------------------------------------

def num_classes_of(data):
    (_, y_train), (_, y_val) = data
    return int(max(np.max(y_train), np.max(y_val))) + 1


def check(config, data, model=None, strategy=None):
    """ValueError (one line) for input that cannot run: the engine and the model, the
    engine and the strategy, the layer names, the pruning span."""
    (x_train, _), _ = data
    if strategy is not None and config.engine == "tfmot":
        raise ValueError("--engine=tfmot trains on one device: --strategy="
                         f"{strategy_name(strategy)} needs --engine=keras (the default)")
    if model is not None and config.engine == "tfmot":
        raise ValueError("--engine=tfmot prunes tf_keras (Keras 2) models only, and --model is "
                         "a Keras 3 model: use --engine=keras (the default)")
    if config.engine == "tfmot":
        _tfmot()  # its ImportError, as one line
    if isinstance(model, keras.Model):
        classifier_loss(model, num_classes_of(data))
        reference = model
    else:
        reference = build_model(np.shape(x_train)[1:], num_classes_of(data), config.model)[0]
    names = [layer.name for layer in all_layers(reference)]
    unknown = sorted(set(config.prune_layers or ()) - set(names))
    if unknown:
        raise ValueError(f"--prune_layers: no layer named {', '.join(unknown)}; "
                         f"the model has {', '.join(names)}")
    pruning_steps(config, len(x_train), replica_count(strategy))


def strategy_name(strategy):
    kind = type(strategy).__name__
    return {"MirroredStrategy": "mirrored", "MultiWorkerMirroredStrategy": "multi_worker",
            "DataParallel": "data_parallel"}.get(kind, kind)


def why_not_resumable(config):
    """Why --resume cannot continue a run of this Config, or None when it can."""
    if config.engine == "tfmot":
        return "--engine=tfmot keeps no per-epoch checkpoint (the Keras engine does)"
    return None


def baseline_model(config, data, model, replicas=1):
    """(the model to prune, its loss, how many epochs to train it first, its description)."""
    (x_train, _), _ = data
    shape, classes = x_train.shape[1:], num_classes_of(data)
    learning_rate = config.learning_rate * (replicas if config.scale_lr_with_replicas else 1)
    if model is None:
        api = _tfmot()[0] if config.engine == "tfmot" else keras
        built, loss = build_model(shape, classes, config.model, api)
        built.compile(optimizer=api.optimizers.Adam(learning_rate), loss=loss,
                      metrics=["accuracy"])
        epochs = 10 if config.baseline_epochs is None else config.baseline_epochs
        return built, loss, epochs, f"{config.model} model"
    user = model if isinstance(model, keras.Model) else model(shape, classes)
    loss, metrics, why = classifier_loss(user, classes)
    copy = fresh_model(user, shape, classes)
    copy.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=metrics)
    print(f"your model, {user.count_params():,} weights; loss: {why}")
    return copy, loss, config.baseline_epochs or 0, "your model"


def log_sweep(log_dir, rows):
    """One TensorBoard run whose x axis is the target sparsity in percent."""
    write_events(log_dir, [
        (round(100 * target), scalar_pb(f"sweep/{tag}", row[key]))
        for target, row in rows.items()
        for tag, key in (("pruned_accuracy", "accuracy"), ("gzip_bytes", "gzip_bytes"),
                         ("sparsity_measured", "sparsity_measured"))])


def log_tensorboard(run_dir, engine, baseline_accuracy, baseline_gzip, rows, table):
    """HParams: the baseline and each pruned sparsity, one trial each; the printed tables
    as the Text summary."""
    trials = {"baseline": ({"sparsity": 0.0, "engine": engine},
                           {"accuracy": baseline_accuracy, "gzip_bytes": baseline_gzip})}
    for target, row in rows.items():
        trials[f"sparsity_{round(100 * target)}"] = (
            {"sparsity": float(target), "engine": engine},
            {"accuracy": row["accuracy"], "gzip_bytes": row["gzip_bytes"]})
    log_hparams_trials(os.path.join(run_dir, "hparams"), "prune", trials)
    log_text_summary(run_dir, table)


def format_table(m, per_layer, targets, suffix):
    lines = [f"{'':<24} {'baseline':>10} {'pruned':>10}   ({m['engine']} engine)",
             f"{'accuracy':<24} {m['baseline_accuracy']:>10.4f} {m['pruned_accuracy']:>10.4f}"
             f"   drop {100 * m['accuracy_drop']:.2f} points",
             f"{'sparsity':<24} {0.0:>10.3f} {m['sparsity_measured']:>10.3f}"
             f"   target {m['sparsity_target']:.3f}; whole model {m['model_sparsity']:.3f}",
             f"{suffix + ' gzip bytes':<24} {m['baseline_gzip_bytes']:>10,} "
             f"{m['pruned_gzip_bytes']:>10,}   {m['compression_ratio']:.2f}x smaller"]
    if "tflite_gzip_bytes" in m:
        lines += [f"{'TFLite gzip bytes':<24} {'':>10} {m['tflite_gzip_bytes']:>10,}",
                  f"{'TFLite int8 gzip bytes':<24} {'':>10} {m['tflite_quant_gzip_bytes']:>10,}"
                  f"   {m['tflite_quant_compression_ratio']:.2f}x smaller than the baseline"]
    if "keras_int8_gzip_bytes" in m:
        lines.append(f"{'Keras int8 gzip bytes':<24} {'':>10} {m['keras_int8_gzip_bytes']:>10,}"
                     f"   accuracy {m['keras_int8_accuracy']:.4f}; left in float: "
                     f"{m['keras_int8_unquantized_layers']}")
    lines.append("per-layer kernel sparsity: " + ", ".join(
        f"{name} {value:.3f} (target {targets[name]:.3f})" for name, value in per_layer.items()))
    return "\n".join(lines)


def run(config, run_dir, data, strategy=None, fit=None, model=None):
    """Trains (or takes) a baseline, prunes a copy, exports both; returns flat metrics.

    strategy (Keras engine): a tf.distribute strategy, a keras.distribution
    (DataParallel on JAX) or None for one device; --batch_size is then per
    replica. fit: called like keras.Model.fit(model, ...), its default (the CLI
    passes a strategy.run loop for multi_worker). Checkpoints a killed run left
    in run_dir are continued: the baseline's, the fine-tune's, the sweep's.

    model: None for the built-in config.model, your keras.Model (taken as trained
    unless --baseline_epochs; a copy is pruned, yours is never changed) or a
    builder fn(input_shape, num_classes).
    """
    start = time.perf_counter()
    check(config, data, model, strategy)
    keras.utils.set_random_seed(config.seed)
    if config.engine == "tfmot":
        _tfmot()[0].utils.set_random_seed(config.seed)
    os.makedirs(run_dir, exist_ok=True)
    (x_train, _), (x_val, y_val) = data
    replicas = replica_count(strategy)
    with distribution_scope(strategy):
        baseline, loss, baseline_epochs, what = baseline_model(config, data, model, replicas)
    steps, _, _ = pruning_steps(config, len(x_train), replicas)
    print(f"== baseline: {what}, {baseline.count_params():,} weights, {baseline_epochs} epoch(s) "
          f"of training first; batch {config.batch_size} x {replicas} replica(s) ==")
    checkpoints = os.path.join(run_dir, "checkpoints")
    keras_engine = config.engine == "keras"
    if baseline_epochs:
        tensorboard = ([] if _tensorflow() is None else [api_of(baseline).callbacks.TensorBoard(
            log_dir=os.path.join(run_dir, "baseline"))])
        with distribution_scope(strategy):
            train(baseline, data, baseline_epochs, config.batch_size * replicas, steps,
                  config.seed, tensorboard, fit,
                  os.path.join(checkpoints, "baseline") if keras_engine else None)
    suffix = ".h5" if config.engine == "tfmot" else ".keras"
    baseline_accuracy = accuracy(baseline, x_val, y_val)
    baseline_gzip = save_model(baseline, os.path.join(run_dir, f"baseline{suffix}"))

    print(f"\n== pruning to {config.final_sparsity:.0%} ==")
    result = prune_and_finetune(baseline, loss, data, config, config.final_sparsity,
                                os.path.join(run_dir, "pruned"), strategy, fit,
                                os.path.join(checkpoints, "pruned"))
    stripped = result["model"]
    pruned_path = os.path.join(run_dir, f"pruned{suffix}")
    pruned_gzip = save_model(stripped, pruned_path)
    reload_ok, reload_diff = predictions_match(stripped, load_model(pruned_path), x_val[:256])
    if not reload_ok:
        print(f"warning: the reloaded pruned{suffix} differs from the model in memory by "
              f"{reload_diff}")
    target = (config.sparsity_m_by_n[0] / config.sparsity_m_by_n[1] if config.sparsity_m_by_n
              else config.final_sparsity)
    metrics = {
        "engine": config.engine, "backend": keras.backend.backend(),
        "baseline_accuracy": baseline_accuracy, "pruned_accuracy": result["accuracy"],
        "accuracy_drop": baseline_accuracy - result["accuracy"],
        "sparsity_target": target, "sparsity_measured": result["sparsity_measured"],
        "model_sparsity": result["model_sparsity"],
        "baseline_gzip_bytes": baseline_gzip, "pruned_gzip_bytes": pruned_gzip,
        "compression_ratio": baseline_gzip / pruned_gzip,
        "reload_matches": reload_ok, "reload_max_abs_diff": reload_diff,
        "layers_pruned": len(result["per_layer"]), "layers_left_dense": len(result["left_dense"]),
        "pruning_end_step": result["end_step"], "pruning_frequency": result["frequency"],
        "clusters": config.clusters, "model_params": baseline.count_params(),
        "replicas": replicas, "finetune_steps": result["steps_trained"],
    }
    metrics.update({f"sparsity_{name}": value for name, value in result["per_layer"].items()})
    if keras.backend.backend() == "tensorflow" or config.engine == "tfmot":
        metrics.update(export_tflite(stripped, run_dir, x_val[:64]))
        metrics["tflite_quant_compression_ratio"] = (baseline_gzip
                                                     / metrics["tflite_quant_gzip_bytes"])
    if config.engine == "keras":
        metrics.update(keras_int8(stripped, run_dir, x_val, y_val))
    write_events(os.path.join(run_dir, "summary"), [
        (0, scalar_pb(f"summary/{key}", metrics[key])) for key in (
            "baseline_accuracy", "pruned_accuracy", "sparsity_measured", "baseline_gzip_bytes",
            "pruned_gzip_bytes", "tflite_quant_gzip_bytes") if key in metrics])
    table = format_table(metrics, result["per_layer"],
                         {name: target for name in result["per_layer"]}, suffix)
    print("\n" + table)
    trials = {target: {**result, "gzip_bytes": pruned_gzip}}  # HParams: the sweep's too
    if config.sweep:
        rows = {}
        for target in config.sweep:
            if math.isclose(target, config.final_sparsity) and config.sparsity_m_by_n is None:
                rows[target] = {**result, "gzip_bytes": pruned_gzip}
                continue
            print(f"\n== sweep: pruning to {target:.0%} ==")
            row = prune_and_finetune(baseline, loss, data, config, target,
                                     os.path.join(run_dir, f"sweep_{round(100 * target)}"),
                                     strategy, fit, os.path.join(
                                         checkpoints, f"sweep_{round(100 * target)}"))
            row["gzip_bytes"] = save_model(row["model"], os.path.join(
                run_dir, f"sweep_{round(100 * target)}{suffix}"))
            rows[target] = row
        log_sweep(os.path.join(run_dir, "sweep"), rows)
        sweep_table = [f"{'target':>7} {'measured':>9} {'accuracy':>9} {'drop pts':>9} "
                       f"{'gzip bytes':>11} {'ratio':>6}"]
        for target, row in rows.items():
            sweep_table.append(
                f"{target:>7.2f} {row['sparsity_measured']:>9.3f} {row['accuracy']:>9.4f} "
                f"{100 * (baseline_accuracy - row['accuracy']):>9.2f} "
                f"{row['gzip_bytes']:>11,} {baseline_gzip / row['gzip_bytes']:>6.2f}")
            key = round(100 * target)
            metrics[f"sweep_accuracy_s{key}"] = row["accuracy"]
            metrics[f"sweep_gzip_bytes_s{key}"] = row["gzip_bytes"]
            metrics[f"sweep_sparsity_measured_s{key}"] = row["sparsity_measured"]
        print("\n" + "\n".join(sweep_table))
        table += "\n\nsweep:\n" + "\n".join(sweep_table)
        trials.update(rows)
    log_tensorboard(run_dir, config.engine, baseline_accuracy, baseline_gzip, trials, table)
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
