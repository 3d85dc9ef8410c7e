"""What the Keras 3 pruning engine (recipes/prune.py) promises, as checks that run on any backend.

tests/test_prune.py runs them in its own process (TensorFlow) and, through
`python -c "import prune_checks; prune_checks.main()"`, on KERAS_BACKEND=jax.
Each check raises AssertionError when the promise breaks; main() prints
`OK <check>` for each that holds.
"""
import os
import sys
import tempfile

import keras
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from experiments import exports  # noqa: E402
from experiments.prune import keras_int8  # noqa: E402
from recipes import prune  # noqa: E402

STEPS = 12  # fine-tuning steps: pruning runs from step 1 to 8, then 4 more steps


def data(n=160, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8, 8, 1), dtype=np.float32)
    y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype(np.int64)
    return (x[:128], y[:128]), (x[128:], y[128:])


def dense_model():
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(32, activation="relu", name="hidden"),
                             keras.layers.Dense(2, name="logits")])


def users_model():
    """Functional, with a residual Add and BatchNormalization, as a user writes one."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(inputs)
    y = keras.layers.Conv2D(8, 3, padding="same", name="conv_b")(x)
    y = keras.layers.BatchNormalization(name="bn")(y)
    x = keras.layers.Add(name="residual")([x, keras.layers.Activation("relu")(y)])
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="logits")(x))


def pruned(model, layer_names, sparsity=0.75, m_by_n=None, steps=STEPS):
    """(the pruned copy after `steps` steps of batch 8, its masks)."""
    schedule = prune.Schedule("polynomial", 0.5, sparsity, 0, 8, 2)
    copy, masks = prune.prune_model(
        model, schedule, keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True), layer_names=layer_names,
        sparsity_m_by_n=m_by_n)
    (x, y), _ = data()
    copy.fit(x, y, batch_size=8, epochs=1, steps_per_epoch=steps, verbose=0)
    return copy, masks


def kernel(model, name):
    return keras.ops.convert_to_numpy(model.get_layer(name).kernel)


def check_measured_sparsity_equals_the_target_after_strip():
    copy, _ = pruned(dense_model(), ["hidden", "logits"])
    stripped = prune.strip_pruning(copy)
    per_layer, measured, _ = prune.measure_sparsity(stripped, ["hidden", "logits"])
    assert per_layer == {"hidden": 0.75, "logits": 0.75} and measured == 0.75, per_layer
    assert not stripped.compiled and stripped.get_layer("hidden").kernel.constraint is None


def check_zeros_stay_zero_through_more_training():
    copy, _ = pruned(dense_model(), ["hidden"], steps=8)  # pruning ends at step 8
    zeros = kernel(copy, "hidden") == 0
    (x, y), _ = data(seed=1)
    copy.fit(x, y, batch_size=8, epochs=3, verbose=0)  # 24 more Adam updates
    after = kernel(copy, "hidden")
    assert np.all(after[zeros] == 0) and np.mean(after == 0) == 0.75


def check_2_by_4_holds_in_every_group_of_4_along_the_input_axis():
    copy, _ = pruned(dense_model(), ["hidden"], m_by_n=(2, 4))
    groups = kernel(copy, "hidden").T.reshape(-1, 4)  # (inputs, units): groups of 4 inputs
    assert np.all(np.sum(groups == 0, axis=1) == 2)
    assert np.mean(kernel(copy, "logits") == 0) == 0  # not chosen: untouched


def check_the_model_passed_in_is_unchanged():
    model = users_model()
    before = [w.copy() for w in model.get_weights()]
    pruned(model, ["conv_b", "logits"])
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)
    assert model.get_layer("logits").kernel.constraint is None


def check_a_users_functional_model_prunes_and_its_exports_reload():
    model = users_model()
    names, dense = prune.choose_layers(model, min_share=0.1)
    assert names == ["conv_b", "logits"] and list(dense) == ["conv_a"], (names, dense)
    copy, _ = pruned(model, names)
    stripped = prune.strip_pruning(copy)
    assert prune.measure_sparsity(stripped, names)[0] == {"conv_b": 0.75, "logits": 0.75}
    (_, _), (x_val, y_val) = data()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "pruned.keras")
        exports.save_model(stripped, path)
        ok, diff = exports.predictions_match(stripped, exports.load_model(path), x_val)
        assert ok, diff
        quantized = keras_int8(stripped, folder, x_val, y_val)
        assert quantized["keras_int8_reload_matches"]
        assert quantized["keras_int8_unquantized_layers"] == "conv_a, conv_b"  # convolutions


def separable_model():
    """SeparableConv2D, DepthwiseConv2D and BatchNormalization: an Xception/MobileNet block."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.SeparableConv2D(16, 3, padding="same", name="sep_a")(inputs)
    x = keras.layers.Activation("relu")(keras.layers.BatchNormalization(name="bn_a")(x))
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="depthwise")(x)
    x = keras.layers.BatchNormalization(name="bn_b")(x)
    x = keras.layers.SeparableConv2D(32, 3, padding="same", name="sep_b")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="logits")(x))


def zeros_over_every_matrix(model):
    """Exact zeros over every weight of 2+ dimensions (biases and BatchNorm are 1-D)."""
    values = [keras.ops.convert_to_numpy(w) for w in model.weights if len(w.shape) >= 2]
    return sum(int(np.sum(v == 0)) for v in values) / sum(v.size for v in values)


def check_separable_and_depthwise_kernels_reach_the_target_over_all_weight_matrices():
    copy, masks = pruned(separable_model(), None, sparsity=0.8)  # the default layer choice
    assert [len(masks[name]) for name in ("sep_a", "depthwise", "sep_b")] == [2, 1, 2], masks
    stripped = prune.strip_pruning(copy)
    for name in ("sep_a", "sep_b"):  # both kernels of a SeparableConv2D
        layer = stripped.get_layer(name)
        for kernel in (layer.depthwise_kernel, layer.pointwise_kernel):
            share = np.mean(keras.ops.convert_to_numpy(kernel) == 0)
            assert abs(share - 0.8) < 0.06, (name, kernel.shape, share)  # 9 weights: 7/9
    everything = zeros_over_every_matrix(stripped)
    assert everything >= 0.75, everything
    assert prune.measure_sparsity(stripped, list(masks))[2] == everything


def check_embedding_on_variable_length_tokens_is_pruned_and_stays_pruned():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 40, (160, 12))
    labels = (tokens.mean(axis=1) > 20).astype(np.int64)
    inputs = keras.Input((None,), dtype="int32")  # any length, as keras.io's text models
    x = keras.layers.Embedding(40, 16, name="embed")(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(x))
    copy, masks = prune.prune_model(
        model, prune.Schedule("polynomial", 0.5, 0.75, 0, 8, 2), keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert list(masks) == ["embed", "logits"], masks
    copy.fit(tokens, labels, batch_size=8, epochs=1, steps_per_epoch=STEPS, verbose=0)
    zeros = keras.ops.convert_to_numpy(copy.get_layer("embed").embeddings) == 0
    copy.fit(tokens[:, :7], labels, batch_size=8, epochs=1, verbose=0)  # shorter: 20 more steps
    after = keras.ops.convert_to_numpy(copy.get_layer("embed").embeddings)
    assert np.mean(zeros) == 0.75 and np.all(after[zeros] == 0), np.mean(zeros)


CHECKS = [value for name, value in sorted(globals().items()) if name.startswith("check_")]


def main():
    for check in CHECKS:
        keras.utils.set_random_seed(0)
        check()
        print("OK", check.__name__, flush=True)


if __name__ == "__main__":
    main()
