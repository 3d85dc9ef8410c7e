"""Magnitude pruning for any Keras 3 model, on any backend, that really shrinks the file.

Shows:  a mask per weight matrix, kept as an optimizer variable (a compiled JAX train
        step carries it), and a constraint on the variable, which Keras applies after
        every optimizer update on every backend: on the schedule's steps it recomputes
        the mask from the weights' magnitudes (tfmot's PolynomialDecay, or constant;
        optional m:n such as 2:4, or blocks), and always multiplies the weights by it,
        so pruned weights are exact zeros and stay zero. (A callback cannot: inside fit
        the JAX trainer holds the weights outside the model.) strip_pruning is a plain
        copy: no masks, no constraints, no optimizer. Prunes Dense, EinsumDense,
        Conv1D/2D/3D and their Transpose, SeparableConv1D/2D (depthwise and pointwise
        kernels), DepthwiseConv1D/2D and Embedding; by default the smallest layers,
        together at most 1% of the model's weight matrices, stay dense.
Run:    python main.py --recipe=prune            # the measured experiment around this file
Expect: shapes data (6,000 28x28 images), Flatten-Dense(128)-Dense(64)-Dense(10), 80%:
        dense_128 and dense_64 reach exactly 0.800; accuracy 0.981 -> 0.982; .keras gzip
        406,191 -> 124,168 bytes (3.27x) (TensorFlow, 2 CPU cores, ~10 s; JAX: 3.26x)
Copy:   this file alone, then
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # your loss
            end = 4 * (len(x) // 64)  # 4 epochs of batch 64: the target reached by the end
            schedule = Schedule("polynomial", initial=0.5, final=0.8, begin=0, end=end,
                                frequency=default_frequency(0, end))
            pruned, masks = prune_model(model, schedule, keras.optimizers.Adam(1e-3), loss)
            pruned.fit(x, y, batch_size=64, epochs=4, validation_data=(x_val, y_val))
            small = strip_pruning(pruned)  # your model's class, its zeros, no optimizer
            per_layer, sparsity, everything = measure_sparsity(small, list(masks))  # 0.8
            small.save("pruned.keras")  # gzip it: about 3x smaller than the dense file
        `model` is never changed. Save the stripped model: an optimizer's slots hide the
        zeros. `everything`: the zeros' share of all the model's weight matrices.
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
    """A weight matrix's pruning, run by Keras after every optimizer update (on every backend).

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
    """(a compiled copy of `model` that prunes while it trains, {layer name: [its masks]}).

    `model` is never changed. The copy starts from its weights; fit it, then
    strip_pruning() it. layer_names default: choose_layers(model). A layer has a
    mask per weight matrix it prunes: two for a SeparableConv, one for the rest.
    """
    if layer_names is None:
        layer_names = choose_layers(model, sparsity_m_by_n=sparsity_m_by_n,
                                    block_size=block_size)[0]
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    kept = {k: v for k, v in (model.get_compile_config() or {}).items()
            if k in ("jit_compile", "steps_per_execution")}  # as the model was compiled
    copy.compile(optimizer=optimizer, loss=loss, metrics=list(metrics), **kept)
    if not copy.optimizer.built:
        copy.optimizer.build(copy.trainable_variables)
    masks = {}
    for layer in all_layers(copy):
        if layer.name not in layer_names:
            continue
        masks[layer.name] = []
        for i, weights in enumerate(prunable_weights(layer)):
            mask = copy.optimizer.add_variable(weights.shape, initializer="ones",
                                               dtype=weights.dtype,
                                               name=f"prune_mask_{layer.name}_{i}")
            # The variable's own constraint: what a layer's kernel_constraint,
            # depthwise_/pointwise_constraint or embeddings_constraint set, and what the
            # optimizer applies after each update.
            weights.constraint = MagnitudeMask(mask, copy.optimizer.iterations, schedule,
                                               block_size, sparsity_m_by_n, weights.constraint)
            masks[layer.name].append(mask)
    return copy, masks


def strip_pruning(model):
    """A plain copy of a pruned model, its zeros kept: no masks, no constraints, no
    optimizer (a fresh model from its config, holding its weights)."""
    plain = model.__class__.from_config(model.get_config())
    plain.set_weights(model.get_weights())
    return plain


def measure_sparsity(model, layer_names):
    """({layer: share of exact zeros in the weights it prunes}, that share over those
    layers, the share over every weight matrix and kernel of the model: biases and
    normalization aside, pruned or not)."""
    per_layer, zeros, total, model_zeros, model_total = {}, 0, 0, 0, 0
    for layer in all_layers(model):
        values = [np.asarray(w) for w in weight_matrices(layer)]  # Keras 3 or tf_keras
        n_zeros, size = sum(int(np.sum(v == 0)) for v in values), sum(v.size for v in values)
        model_zeros, model_total = model_zeros + n_zeros, model_total + size
        if layer.name in layer_names and size:
            per_layer[layer.name] = n_zeros / size
            zeros, total = zeros + n_zeros, total + size
    return per_layer, zeros / max(total, 1), model_zeros / max(model_total, 1)


# --- which weights to prune -------------------------------------------------------------

_L = keras.layers
PRUNED = (  # (layer classes, the attributes that hold the weights pruning thins out)
    ((_L.SeparableConv1D, _L.SeparableConv2D), ("depthwise_kernel", "pointwise_kernel")),
    ((_L.Embedding,), ("embeddings",)),
    ((_L.Dense, _L.EinsumDense, _L.Conv1D, _L.Conv2D, _L.Conv3D, _L.Conv1DTranspose,
      _L.Conv2DTranspose, _L.Conv3DTranspose, _L.DepthwiseConv1D, _L.DepthwiseConv2D),
     ("kernel",)),
)
# The same for tf_keras layers (tfmot's models), by class name.
TF_KERAS_PRUNED = {
    **dict.fromkeys(("Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose",
                     "Conv2DTranspose", "Conv3DTranspose"), ("kernel",)),
    "DepthwiseConv2D": ("depthwise_kernel",), "Embedding": ("embeddings",),
    **dict.fromkeys(("SeparableConv1D", "SeparableConv2D"), ("depthwise_kernel",
                                                             "pointwise_kernel"))}
# Layers whose weights are no weight matrices, whatever their shape (a Normalization
# layer's mean can be 2-D).
NOT_MATRICES = ("BatchNormalization", "LayerNormalization", "GroupNormalization",
                "RMSNormalization", "UnitNormalization", "Normalization", "InputLayer")


def all_layers(model):
    """Every layer of `model`, the layers of nested models included, in order."""
    found = []
    for layer in model.layers:
        found += all_layers(layer) if hasattr(layer, "layers") else [layer]
    return found


def prunable_weights(layer):
    """The variables of `layer` that magnitude pruning thins out ([] for none).
    Keras 3 and tf_keras layers alike."""
    if type(layer).__module__.startswith("tf_keras"):
        names = TF_KERAS_PRUNED.get(type(layer).__name__, ())
    else:
        names = next((attrs for kinds, attrs in PRUNED if isinstance(layer, kinds)), ())
    found = [getattr(layer, name, None) for name in names]
    return [w for w in found if hasattr(w, "assign")]  # built variables (LoRA: a tensor)


def weight_matrices(layer):
    """Every weight matrix and kernel of `layer`, biases and normalization aside: the
    prunable ones, or for a layer this file does not prune (a custom one, say) each
    weight of two or more dimensions that is not a bias."""
    known = prunable_weights(layer)
    if known or type(layer).__name__ in NOT_MATRICES:
        return known
    return [w for w in layer.weights if len(w.shape) >= 2 and "bias" not in w.name]


def weight_shares(model):
    """{layer name: its share of the model's weight matrices}, for each layer with any."""
    sizes = {layer.name: sum(int(np.prod(w.shape)) for w in weight_matrices(layer))
             for layer in all_layers(model)}
    total = max(sum(sizes.values()), 1)
    return {name: size / total for name, size in sizes.items() if size}


def _why_dense(layer, trainable, sparsity_m_by_n, block_size):
    """Why `layer` cannot be pruned, or None where it can."""
    weights = prunable_weights(layer)
    if not weights:
        return "no weights this file prunes"
    if not all(id(w) in trainable for w in weights):
        return "frozen: trainable=False"
    for shape in (tuple(w.shape) for w in weights):
        if sparsity_m_by_n and (len(shape) < 2 or shape[-2] % sparsity_m_by_n[1]):
            return (f"{sparsity_m_by_n[0]}:{sparsity_m_by_n[1]} groups along the input axis "
                    f"do not fit {shape}")
        if block_size and (len(shape) != 2 or shape[0] % block_size[0]
                           or shape[1] % block_size[1]):
            return f"{block_size[0]}x{block_size[1]} blocks do not tile {shape}"
    return None


def choose_layers(model, layer_names=None, min_share=0.01, sparsity_m_by_n=None,
                  block_size=None):
    """(names of the layers to prune, {layer name: (its share of the model's weight
    matrices, why it stays dense)}).

    Named layers if `layer_names` is given. Otherwise every prunable layer but the
    smallest ones whose shares add up to at most `min_share` (a tiny first conv, or
    a MobileNet's many tiny depthwise kernels, saves little and costs accuracy).
    Layers whose weights do not fit the structure (m:n groups along the input
    axis, 2-D blocks) or are frozen stay dense too, as do the weight matrices of
    layers this file does not prune: each is listed with its share.
    """
    shares, candidates, dense = weight_shares(model), [], {}
    trainable = {id(w) for w in model.trainable_weights}
    for layer in all_layers(model):
        if layer_names is not None and layer.name not in layer_names:
            continue
        if layer.name not in shares:
            if layer_names is not None:  # named, but it has no weight matrix
                dense[layer.name] = (0.0, "no weight matrix to prune")
            continue
        why = _why_dense(layer, trainable, sparsity_m_by_n, block_size)
        if why:
            dense[layer.name] = (shares[layer.name], why)
        else:
            candidates.append(layer.name)
    if layer_names is None:
        used = 0.0
        for name in sorted(candidates, key=shares.get):  # the smallest first
            if used + shares[name] > min_share * (1 + 1e-9):
                break
            used += shares[name]
            dense[name] = (shares[name], f"the smallest, together <= {_percent(min_share)}")
    return [name for name in candidates if name not in dense], dense


def _percent(share):
    return f"{100 * share:.2g}%"


def dense_summary(dense):
    """One line naming each layer left dense with its share, grouped by why."""
    if not dense:
        return "left dense: none"
    groups = {}
    for name, (share, why) in dense.items():
        groups.setdefault(why, []).append(f"{name} {_percent(share)}")
    total = sum(share for share, _ in dense.values())
    return (f"left dense: {len(dense)} layer(s), {_percent(total)} of the weight matrices; "
            + "; ".join(f"{why}: {', '.join(names)}" for why, names in groups.items()))
