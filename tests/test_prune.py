"""The prune experiment and its drop-in file: real sparsity and size savings on both engines,
clean exports, clear errors; recipes/prune.py's Copy: example alone on JAX."""
import concurrent.futures
import json
import subprocess
import sys

import keras
import numpy as np
import pytest

import prune_checks
from experiments import prune, prune_tfmot
from experiments.exports import gzip_bytes
from helpers import (ENV, REPO, error_lines, only_run_dir,
                     read_tensorboard_tags, run_cli, run_copy_example)
from recipes.prune import Schedule, choose_layers, measure_sparsity

# A user's own small model and data, trained as they would (TensorFlow blocked: JAX).
COPY_SETUP = """
import gzip, sys
import keras, numpy as np
assert keras.backend.backend() == "jax"
rng = np.random.default_rng(0)
x, x_val = (rng.random((n, 8, 8, 1), dtype=np.float32) for n in (512, 128))
label = lambda x: (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype("int64")
y, y_val = label(x), label(x_val)
model = keras.Sequential([keras.Input((8, 8, 1)),
                          keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
                          keras.layers.Flatten(),
                          keras.layers.Dense(32, activation="relu", name="hidden"),
                          keras.layers.Dense(2, name="logits")])
model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x, y, epochs=1, verbose=0)
before = model.get_weights()
model.save("dense.keras")
"""
COPY_CHECK = """
assert "tensorflow" not in sys.modules and "tf_keras" not in sys.modules
assert list(masks) == ["conv", "hidden"], masks  # the 64-weight output (0.69%) stays dense
assert abs(per_layer["hidden"] - 0.8) < 1e-3 and abs(sparsity - 0.8) < 1e-3, per_layer
assert abs(everything - 0.8 * (1 - 64 / 9352)) < 1e-3, everything  # all 3 weight matrices
assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # yours unchanged
saved = keras.models.load_model("pruned.keras").get_layer("hidden").kernel
assert np.mean(keras.ops.convert_to_numpy(saved) == 0) == per_layer["hidden"]  # zeros kept
size = {name: len(gzip.compress(open(name, "rb").read(), 9))
        for name in ("dense.keras", "pruned.keras")}
assert size["pruned.keras"] < 0.6 * size["dense.keras"], size
print("OK", round(sparsity, 2), type(small).__name__, "compiled" if small.compiled else "plain")
"""
BAD_FLAGS = {"--final_sparsity=1.2": "--final_sparsity", "--sparsity_m_by_n=3,2": "--sparsity_m_by_n",
             "--clusters=8": "--engine=tfmot"}
TINY = ["--baseline_epochs=1", "--epochs=2", "--steps_per_epoch=3"]


@pytest.fixture(scope="module")
def subprocesses(tmp_path_factory):
    """Every subprocess of this file, started at once: their TensorFlow imports overlap."""
    tmp = tmp_path_factory.mktemp("prune_subprocesses")
    jobs = {engine: (run_cli, "--recipe=prune", f"--engine={engine}", *TINY,
                     f"--logdir={tmp / engine}") for engine in prune.ENGINES}
    jobs["copy"] = (run_copy_example, "prune.py", tmp, COPY_SETUP, COPY_CHECK)
    jobs["jax"] = (subprocess.run, [sys.executable, "-c", "import prune_checks; prune_checks.main()"])
    for i, flag in enumerate(BAD_FLAGS):
        jobs[flag] = (run_cli, "--recipe=prune", flag, f"--logdir={tmp / f'bad{i}'}")
    model_file, npz_file = text_classifier_files(tmp)
    jobs["tokens"] = (run_cli, "--recipe=prune", f"--model={model_file}", "--dataset=npz",
                      f"--data_dir={npz_file}", *TINY, f"--logdir={tmp / 'tokens'}")
    kwargs = {"jax": dict(cwd=REPO / "tests", capture_output=True, text=True, timeout=300,
                          env={**ENV, "KERAS_BACKEND": "jax"})}
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(*job, **kwargs.get(name, {})) for name, job in jobs.items()}
        yield futures, tmp


def text_classifier_files(folder):
    """keras.io's text classifier, small: token ids of any length (Input(shape=(None,))),
    Embedding, a sigmoid unit; and a tiny .npz of 200-token reviews for it."""
    inputs = keras.Input(shape=(None,), dtype="int64")
    x = keras.layers.Embedding(100, 16, name="embed")(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="output")(x)).save(
        folder / "text.keras")
    rng = np.random.default_rng(0)
    x = rng.integers(1, 100, (240, 200))
    y = (x[:, :100].mean(axis=1) > x[:, 100:].mean(axis=1)).astype(np.int64)
    np.savez(folder / "reviews.npz", x_train=x[:192], y_train=y[:192], x_val=x[192:],
             y_val=y[192:])
    return folder / "text.keras", folder / "reviews.npz"


@pytest.mark.parametrize("check", prune_checks.CHECKS, ids=lambda c: c.__name__[6:])
def test_keras_engine_on_tensorflow(check):
    keras.utils.set_random_seed(0)
    check()


def test_keras_engine_on_jax(subprocesses):
    result = subprocesses[0]["jax"].result()
    assert result.returncode == 0, result.stderr[-3000:]
    for check in prune_checks.CHECKS:
        assert f"OK {check.__name__}" in result.stdout, check.__name__


@pytest.mark.parametrize("engine", prune.ENGINES)
def test_cli_headline_run_reaches_target_sparsity_and_really_shrinks_the_export(
        subprocesses, engine):
    futures, tmp = subprocesses
    result = futures[engine].result()
    assert result.returncode == 0, result.stderr[-2000:]
    assert "baseline     pruned" in result.stdout and "per-layer kernel sparsity" in result.stdout
    # The default layer choice leaves the 640-weight output layer (0.59%) dense, and says so.
    dense = [line for line in result.stdout.splitlines() if line.startswith("left dense")]
    assert dense == ["left dense: 1 layer(s), 0.59% of the weight matrices; the smallest, "
                     "together <= 1%: output 0.59%"], dense
    run_dir = only_run_dir(tmp / engine, "prune")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["engine"] == engine
    assert metrics["accuracy_drop"] == pytest.approx(
        metrics["baseline_accuracy"] - metrics["pruned_accuracy"])
    assert metrics["sparsity_measured"] == pytest.approx(0.8, abs=0.005)
    for name in ("dense_128", "dense_64"):
        assert metrics[f"sparsity_{name}"] == pytest.approx(0.8, abs=0.005), name
    assert "sparsity_output" not in metrics
    kernels = {"dense_128": 784 * 128, "dense_64": 128 * 64, "output": 64 * 10}
    zeros = 0.8 * (kernels["dense_128"] + kernels["dense_64"])
    assert metrics["model_sparsity"] == pytest.approx(zeros / sum(kernels.values()), abs=0.005)
    assert metrics["pruned_gzip_bytes"] < metrics["baseline_gzip_bytes"] / 2
    assert metrics["tflite_quant_gzip_bytes"] < metrics["tflite_gzip_bytes"]
    assert metrics["reload_matches"] and metrics["tflite_reload_matches"]
    assert metrics["tflite_quant_reload_matches"]
    suffix = ".keras" if engine == "keras" else ".h5"
    # The files left in the run folder are the ones the sizes were measured on.
    files = {f"baseline{suffix}": "baseline_gzip_bytes", f"pruned{suffix}": "pruned_gzip_bytes",
             "pruned.tflite": "tflite_gzip_bytes", "pruned_quant.tflite": "tflite_quant_gzip_bytes"}
    for name, key in files.items():
        assert gzip_bytes(run_dir / name) == metrics[key], name
    tags = read_tensorboard_tags(run_dir / "pruned" / "metrics")
    sparsity_tags = [t for t in tags if t.endswith("/sparsity")]
    assert len(sparsity_tags) == 2 and all("dense_" in t for t in sparsity_tags)
    assert all(tags[t][-1] == pytest.approx(0.8, abs=0.005) for t in sparsity_tags)  # the final
    assert len([t for t in tags if t.endswith("/threshold")]) == 2
    assert {"epoch_loss", "epoch_accuracy"} <= set(read_tensorboard_tags(run_dir / "pruned" / "train"))


def test_keras_engine_also_exports_keras_int8_and_names_what_it_left_in_float(subprocesses):
    futures, tmp = subprocesses
    metrics = json.loads((only_run_dir(tmp / "keras", "prune") / "metrics.json").read_text())
    assert metrics["keras_int8_unquantized_layers"] == "none"  # an MLP: every kernel is Dense
    assert metrics["keras_int8_reload_matches"]
    assert metrics["keras_int8_gzip_bytes"] < metrics["pruned_gzip_bytes"] / 2


def test_embedding_on_variable_length_tokens_prunes_and_exports_through_the_cli(subprocesses):
    futures, tmp = subprocesses
    result = futures["tokens"].result()
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((only_run_dir(tmp / "tokens", "prune") / "metrics.json").read_text())
    assert metrics["sparsity_embed"] == pytest.approx(0.8, abs=0.005)  # its embeddings
    # TFLite takes the 200-token reviews: its input is resized to them, then checked
    assert metrics["tflite_reload_matches"] and metrics["tflite_quant_reload_matches"]
    assert not [key for key in metrics if key.endswith("_error")], metrics
    assert metrics["keras_int8_unquantized_layers"] == "none"  # Embedding and Dense: int8


def test_an_export_that_fails_is_reported_and_the_run_keeps_going(tmp_path, monkeypatch):
    model, _ = prune.build_model((28, 28, 1), 10)
    x = np.zeros((4, 28, 28, 1), "float32")

    def no_tflite(model, quantize):
        raise ValueError("op not supported\nwith a long TensorFlow trace")

    monkeypatch.setattr(prune, "to_tflite", no_tflite)
    assert prune.export_tflite(model, str(tmp_path), x) == {
        "tflite_error": "not made: ValueError: op not supported",
        "tflite_quant_error": "not made: ValueError: op not supported"}
    monkeypatch.setattr(keras.Model, "quantize", lambda self, *args, **kwargs: 1 / 0)
    assert prune.keras_int8(model, str(tmp_path), x, np.zeros(4)) == {
        "keras_int8_error": "not made: ZeroDivisionError: division by zero"}


def test_many_small_layers_are_named_in_one_line_and_the_rest_reach_the_target(
        tiny_images, tmp_path, capsys):
    """MobileNet-like: 25 small convolutions, each under 1% of the weight matrices (the old
    rule left each dense, with a line each), then a Dense layer with 96% of them."""
    def build(input_shape, num_classes):
        x = inputs = keras.Input(input_shape)
        x = keras.layers.Conv2D(4, 3, strides=2, name="stem")(x)  # 36 weights
        for i in range(12):
            x = keras.layers.DepthwiseConv2D(3, padding="same", name=f"dw_{i}")(x)  # 36
            x = keras.layers.Conv2D(4, 1, name=f"pw_{i}")(x)  # 16
        x = keras.layers.Dense(32, name="hidden")(keras.layers.Flatten()(x))  # 21,632
        return keras.Model(inputs, keras.layers.Dense(num_classes, name="logits")(x))  # 320

    model = build((28, 28, 1), 10)
    config = prune.Config(epochs=2, batch_size=16, final_sparsity=0.8)
    result = prune.prune_and_finetune(model, keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), tiny_images, config, 0.8, str(tmp_path))
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("left dense")]
    assert len(lines) == 1, lines  # one line, not one per layer
    dense = result["left_dense"]
    assert sorted(dense) == sorted(f"pw_{i}" for i in range(12))  # the smallest: 0.85% in all
    assert all(f"{name} 0.071%" in lines[0] for name in dense), lines
    assert len(result["per_layer"]) == 15  # the stem, the 12 depthwise, hidden and logits
    assert result["model_sparsity"] >= 0.75


def test_bad_flags_are_one_line_errors(subprocesses):
    futures, tmp = subprocesses
    for i, (flag, words) in enumerate(BAD_FLAGS.items()):
        result = futures[flag].result()
        lines = error_lines(result.stderr)
        assert result.returncode == 2, flag
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], lines
        assert not (tmp / f"bad{i}" / "prune").exists()


def test_copy_example_prunes_a_users_model_alone_on_jax_without_tensorflow(subprocesses):
    result = subprocesses[0]["copy"].result()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK 0.8 Sequential plain" in result.stdout  # your class, no optimizer


def test_schedule_follows_tfmots_polynomial_decay():
    ours = Schedule("polynomial", 0.5, 0.8, 10, 110, 10)
    theirs = prune_tfmot.tfmot_schedule(ours)
    for step in (10, 20, 55, 100, 110):
        due, sparsity = theirs(step)
        assert bool(keras.ops.convert_to_numpy(ours.due(step))) == bool(due.numpy()), step
        assert float(ours.sparsity(step)) == pytest.approx(float(sparsity.numpy()), abs=1e-6)
    assert not bool(ours.due(15)) and not bool(ours.due(120))


def test_default_layer_choice_leaves_tiny_kernels_dense_and_lists_what_cannot_be_pruned():
    guide, _ = prune.build_model((28, 28, 1), 10, "conv")
    names, dense = choose_layers(guide)
    assert names == ["output"] and list(dense) == ["conv"]
    assert dense["conv"][0] == pytest.approx(108 / (108 + 20280))  # its share: 0.53%
    odd = keras.Sequential([keras.Input((6,)), keras.layers.Embedding(10, 4, name="embed"),
                            keras.layers.Flatten(), keras.layers.Dense(8, name="hidden"),
                            keras.layers.BatchNormalization(name="bn"), Gate(name="custom")])
    names, dense = choose_layers(odd, min_share=0)
    assert names == ["embed", "hidden"]  # an Embedding is pruned too
    # BN holds no weight matrix: not listed; a layer this file does not prune is, with its share
    assert dense == {"custom": (pytest.approx(64 / 296), "no weights this file prunes")}
    assert "bn" in choose_layers(odd, layer_names=("bn", "hidden"))[1]  # unless named


class Gate(keras.layers.Layer):
    """A user's own layer with an 8x8 weight matrix and a bias."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], 8), name="w")
        self.b = self.add_weight(shape=(8,), name="bias")

    def call(self, x):
        return x @ self.w + self.b


def test_model_sparsity_counts_every_weight_matrix_and_kernel():
    """Zeros over every kernel of every layer, pruned or not; biases and BatchNorm aside."""
    inputs = keras.Input((10,))
    x = keras.layers.Embedding(20, 4, name="embed")(inputs)  # 80
    x = keras.layers.SeparableConv1D(8, 3, name="sep")(x)  # 12 depthwise + 32 pointwise
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Flatten()(x)
    x = Gate(name="custom")(keras.layers.Dense(8, name="hidden")(x))  # 512, then 64
    model = keras.Model(inputs, x)
    zeros = {"embeddings": 40, "depthwise_kernel": 6, "pointwise_kernel": 16, "kernel": 256,
             "w": 32, "bias": 3, "gamma": 8, "beta": 4}
    for w in model.weights:
        values = np.ones(w.shape, "float32").ravel()
        values[:zeros.get(w.name, 0)] = 0
        w.assign(values.reshape(w.shape))
    per_layer, measured, everything = measure_sparsity(model, ["sep"])
    assert per_layer == {"sep": 22 / 44} and measured == 22 / 44
    assert everything == (40 + 6 + 16 + 256 + 32) / (80 + 12 + 32 + 512 + 64)


def test_tfmot_clustering_after_pruning_keeps_the_zeros_and_shares_values(tiny_images):
    tf_keras = prune_tfmot.tfmot_modules()[0]
    model, loss = prune.build_model((28, 28, 1), 10, api=tf_keras)
    schedule = Schedule("polynomial", 0.5, 0.8, 0, 8, 1)
    pruned, _ = prune_tfmot.tfmot_prune_model(model, schedule, ["dense_64"])
    pruned.compile(tf_keras.optimizers.Adam(1e-3), loss)
    prune.train(pruned, tiny_images, 2, 16, None, 0,
                [prune_tfmot.tfmot_modules()[1].sparsity.keras.UpdatePruningStep()])
    stripped = prune_tfmot.tfmot_modules()[1].sparsity.keras.strip_pruning(pruned)
    clustered = prune_tfmot.tfmot_cluster(stripped, ["dense_64"], clusters=4)
    clustered.compile(tf_keras.optimizers.Adam(1e-4), loss)
    prune.train(clustered, tiny_images, 1, 16, None, 0)
    final = prune_tfmot.tfmot_modules()[1].clustering.keras.strip_clustering(clustered)
    kernel = final.get_layer("dense_64").get_weights()[0]
    assert np.mean(kernel == 0) == pytest.approx(0.8, abs=0.01)
    assert len(np.unique(kernel[kernel != 0])) <= 4


def test_sweep_compares_accuracy_and_size_per_sparsity(tiny_images, tmp_path):
    config = prune.Config(baseline_epochs=1, epochs=2, batch_size=16, sweep=(0.5, 0.8, 0.95))
    metrics = prune.run(config, str(tmp_path), tiny_images)

    sizes = [metrics[f"sweep_gzip_bytes_s{s}"] for s in (50, 80, 95)]
    assert sizes[0] > sizes[1] > sizes[2]  # more zeros, smaller download
    assert metrics["sweep_gzip_bytes_s80"] == metrics["pruned_gzip_bytes"]  # reused, not retrained
    assert metrics["sweep_accuracy_s80"] == metrics["pruned_accuracy"]
    for s in (50, 80, 95):
        assert abs(metrics[f"sweep_sparsity_measured_s{s}"] - s / 100) <= 0.01
    tags = read_tensorboard_tags(tmp_path / "sweep")
    assert len(tags["sweep/pruned_accuracy"]) == 3 and len(tags["sweep/gzip_bytes"]) == 3
