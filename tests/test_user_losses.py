"""Labels fit the loss: the data holds class ids, and whatever loss a user's model was
compiled with (a string, a function or an object; sparse or one-hot; categorical,
binary or focal; from logits or not; with label smoothing) gets them in the form it
expects, in every recipe's train step, and the output says which form."""
import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from experiments.user_model import classifier_loss
from helpers import ENV, only_run_dir, run_cli

IDS = np.array([0, 2, 1, 2, 0, 1, 1])


@keras.saving.register_keras_serializable(package="users")
def users_one_hot_loss(y_true, y_pred):
    """A user's own loss, written for one-hot labels (it fails on class ids)."""
    return -keras.ops.sum(y_true * keras.ops.log(y_pred + 1e-7), axis=-1)


def model_compiled_with(loss, units=3, activation="softmax"):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(units, activation=activation)])
    model.compile("adam", loss, metrics=["accuracy"])
    return model


ONE_HOT = np.eye(3, dtype="float32")[IDS]
CASES = {  # name: (compiled loss, units, activation, the labels it must be given)
    "categorical by name": ("categorical_crossentropy", 3, "softmax", ONE_HOT),
    "categorical, label smoothing": (
        keras.losses.CategoricalCrossentropy(label_smoothing=0.1), 3, "softmax", ONE_HOT),
    "categorical from logits": (
        keras.losses.CategoricalCrossentropy(from_logits=True), 3, None, ONE_HOT),
    "categorical focal": (keras.losses.CategoricalFocalCrossentropy(), 3, "softmax", ONE_HOT),
    "a user's one-hot function": (users_one_hot_loss, 3, "softmax", ONE_HOT),
    "sparse by name": ("sparse_categorical_crossentropy", 3, "softmax", IDS),
    "sparse from logits": (
        keras.losses.SparseCategoricalCrossentropy(from_logits=True), 3, None, IDS),
    "binary, one sigmoid unit": ("binary_crossentropy", 1, "sigmoid", IDS % 2),
    "binary focal, one sigmoid unit": (keras.losses.BinaryFocalCrossentropy(), 1, "sigmoid",
                                       IDS % 2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_loss_gets_the_labels_in_the_form_it_expects(name):
    compiled, units, activation, labels = CASES[name]
    model = model_compiled_with(compiled, units, activation)
    classes = 2 if units == 1 else 3
    loss, metrics, why = classifier_loss(model, classes)
    ids = IDS % classes
    y_pred = np.random.default_rng(0).random((len(ids), units)).astype("float32")
    if activation == "softmax":
        y_pred /= y_pred.sum(axis=1, keepdims=True)
    reference = keras.losses.get(compiled) if isinstance(compiled, str) else compiled
    target = labels.reshape(len(labels), -1) if units == 1 else labels  # (n, 1) for one unit
    expected = np.mean(keras.ops.convert_to_numpy(reference(target, y_pred)))  # a function's
    given = np.mean(keras.ops.convert_to_numpy(loss(ids, y_pred)))  # per-example values too
    assert given == pytest.approx(expected, rel=1e-5)
    one_hot = labels is ONE_HOT
    assert ("one-hot encoded" in why) == one_hot, why
    assert ("labels as class ids" in why) == (not one_hot), why


def test_a_one_hot_accuracy_metric_reads_class_ids():
    model = model_compiled_with("categorical_crossentropy")
    model.compile("adam", "categorical_crossentropy", metrics=["categorical_accuracy"])
    _, metrics, _ = classifier_loss(model, 3)
    assert [getattr(m, "name", m) for m in metrics] == ["accuracy", "sparse_categorical_accuracy"]


def mnist_convnet():
    """keras.io's "Simple MNIST convnet", as written there: one-hot labels, so
    loss="categorical_crossentropy"."""
    model = keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        keras.layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
        keras.layers.MaxPooling2D(pool_size=(2, 2)),
        keras.layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
        keras.layers.MaxPooling2D(pool_size=(2, 2)),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    return model


@pytest.mark.parametrize("recipe, flags", [
    ("profile", ["--epochs=1", "--batch_size=8", "--steps_per_epoch=6", "--profile_steps=2,3"]),
    ("prune", ["--epochs=1", "--batch_size=32", "--steps_per_epoch=4"]),
])
def test_keras_io_convnet_with_its_one_hot_loss_trains_from_the_cli(recipe, flags, tmp_path):
    """profile trains in its own train step, prune through fit: both call the compiled loss."""
    mnist_convnet().save(tmp_path / "convnet.keras")
    result = run_cli(f"--recipe={recipe}", *flags, f"--model={tmp_path / 'convnet.keras'}",
                     f"--logdir={tmp_path / 'runs'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("loss: its own compiled loss (categorical_crossentropy), labels one-hot encoded "
            "from the class ids for it") in result.stdout
    metrics = json.loads((only_run_dir(tmp_path / "runs", recipe) / "metrics.json").read_text())
    assert metrics["model_params"] == mnist_convnet().count_params()


def test_a_model_trained_with_class_ids_is_saved_with_the_users_own_loss(tmp_path):
    """The copy batch writes loads where this repository is not installed, compiled with the
    loss the user wrote (the wrapper that fed it one-hot labels is not in the file)."""
    mnist_convnet().save(tmp_path / "convnet.keras")
    result = run_cli("--recipe=batch", "--batch_sizes=16", "--epochs=1", "--steps_per_epoch=2",
                     f"--model={tmp_path / 'convnet.keras'}", f"--logdir={tmp_path / 'runs'}")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((only_run_dir(tmp_path / "runs", "batch") / "metrics.json").read_text())
    load = subprocess.run(
        [sys.executable, "-c", "import sys, keras; m = keras.models.load_model(sys.argv[1]); "
                               "print(getattr(m.loss, '__name__', m.loss))",
         saved["best_model_file"]],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**ENV, "PYTHONPATH": str(tmp_path)})  # the repository is not importable there
    assert load.returncode == 0, load.stderr[-2000:]
    assert load.stdout.strip() == "categorical_crossentropy"
