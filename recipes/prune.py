"""Magnitude pruning for any Keras 3 model, on any backend, that really shrinks the file.

Shows:  a mask per kernel, kept as an optimizer variable (a compiled JAX train step
        carries it), and a kernel constraint, which Keras applies after every optimizer
        update on every backend: on the schedule's steps it recomputes the mask from
        the weights' magnitudes (tfmot's PolynomialDecay, or constant; optional m:n such
        as 2:4, or blocks), and always multiplies the kernel by it, so pruned weights are
        exact zeros and stay zero. (A callback cannot: inside fit the JAX trainer holds
        the weights outside the model.) strip_pruning is a plain copy: no masks, no
        constraints, no optimizer. Kernels under 1% of the model's stay dense by default.
Run:    python main.py --recipe=prune            # the measured experiment around this file
Expect: shapes data (6,000 28x28 images), Flatten-Dense(128)-Dense(64)-Dense(10), 80%:
        dense_128 and dense_64 reach exactly 0.800; accuracy 0.982 -> 0.978; .keras gzip
        406,259 -> 124,485 bytes (3.26x) (TensorFlow, 2 CPU cores, ~15 s; JAX: 3.28x)
Copy:   this file alone, then
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # your loss
            end = 4 * (len(x) // 64)  # 4 epochs of batch 64: the target reached by the end
            schedule = Schedule("polynomial", initial=0.5, final=0.8, begin=0, end=end,
                                frequency=default_frequency(0, end))
            pruned, masks = prune_model(model, schedule, keras.optimizers.Adam(1e-3), loss)
            pruned.fit(x, y, batch_size=64, epochs=4, validation_data=(x_val, y_val))
            small = strip_pruning(pruned)  # your model's class, its zeros, no optimizer
            per_layer, sparsity, _ = measure_sparsity(small, list(masks))  # 0.8 each
            small.save("pruned.keras")  # gzip it: about 3x smaller than the dense file
        Prunes Dense, EinsumDense, Conv1D/2D/3D and DepthwiseConv1D/2D kernels; `model`
        is never changed. Save the stripped model: an optimizer's slots hide the zeros.
"""
import dataclasses

import keras
import numpy as np
from keras import ops


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


def default_frequency(begin_step, end_step, times=10):
    """The largest divisor of the span that still prunes ~`times` times.

    Pruning happens only when (step - begin_step) % frequency == 0, so a span
    that is not a multiple of the frequency never applies the final sparsity.
    """
    span = end_step - begin_step
    return max(f for f in range(1, max(1, span // times) + 1) if span % f == 0)


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

    Works on Keras 3 layers (variables) and tf_keras layers (tfmot's models) alike.
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
    that holds at least `min_share` of the model's kernel weights (a tiny first
    conv saves nothing and costs accuracy). A layer whose kernel does not fit
    the structure (m:n groups along its input axis, 2-D blocks) stays dense, as
    does a weighted layer that has no such kernel.
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
