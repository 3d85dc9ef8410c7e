"""Bring your own model: every training recipe runs on a user's saved Keras model.

The models are written here, unlike any recipe's own: a functional net with a
Rescaling input layer, a residual Add, BatchNormalization, Dropout and a softmax
output, saved compiled; a Sequential MLP saved uncompiled with logits; a model
of feature vectors fed from an .npz.
"""
import concurrent.futures
import hashlib
import json

import keras
import numpy as np
import pytest
from PIL import Image

import main
from helpers import ENV, error_lines, only_run_dir, run_cli

CLASSES = ("circle", "square", "triangle")
SIZE = 32


def write_folder(root, per_class=10):
    """root/<class>/<i>.png: 32x32 RGB shapes of three classes."""
    from datasets import shapes
    images, labels = shapes.generate(len(shapes.CLASS_NAMES) * per_class, SIZE, 3, seed=1)
    for image, label in zip(images, labels):
        if label < len(CLASSES):
            folder = root / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{len(list(folder.iterdir()))}.png")
    return root


def residual_net(classes=len(CLASSES)):
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    y = keras.layers.Conv2D(8, 3, padding="same")(x)
    y = keras.layers.BatchNormalization()(y)
    x = keras.layers.Add()([x, keras.layers.Activation("relu")(y)])
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs, name="users_residual_net")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    return model


def gray_mlp(classes=len(CLASSES), size=16):
    return keras.Sequential([keras.Input((size, size, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(32, activation="relu"),
                             keras.layers.Dense(classes)], name="users_mlp")  # logits


def sha1(path):
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_model")
    files = {"folder": write_folder(root / "photos"), "net": root / "net.keras",
             "mlp": root / "mlp.h5"}
    residual_net().save(files["net"])
    gray_mlp().save(files["mlp"])
    return files


RUNS = {  # recipe: its flags for a run of a few steps
    "batch": ["--batch_sizes=4,8", "--epochs=1", "--steps_per_epoch=2"],
    "mixed_precision": ["--epochs=1", "--steps_per_epoch=2", "--batch_size=8", "--compare"],
    "device": ["--devices=cpu", "--epochs=1", "--batch_size=4"],
    "profile": ["--epochs=1", "--batch_size=4", "--profile_steps=1,2"],
    "stream": ["--epochs=1", "--batch_size=4", "--input_batches=2", "--compare"],
    "prune": ["--epochs=1", "--batch_size=8"],
    "advise": ["--budget_s=10", "--repeats=1", "--batch_size=8", "--max_batch_size=16"],
}


@pytest.fixture(scope="module")
def cli_runs(user_files, tmp_path_factory):
    """Every recipe's CLI on the residual net and the photo folder, started at once."""
    logdir = tmp_path_factory.mktemp("own_model_runs")
    before = sha1(user_files["net"])
    with concurrent.futures.ThreadPoolExecutor(len(RUNS)) as pool:
        futures = {recipe: pool.submit(run_cli, f"--recipe={recipe}", *flags,
                                       f"--model={user_files['net']}",
                                       f"--data_dir={user_files['folder']}",
                                       f"--logdir={logdir}", timeout=600)
                   for recipe, flags in RUNS.items()}
        results = {recipe: f.result() for recipe, f in futures.items()}
    return results, logdir, before


@pytest.mark.parametrize("recipe", sorted(RUNS))
def test_each_recipe_trains_a_copy_of_the_users_model_and_reports_its_size(
        recipe, cli_runs, user_files):
    results, logdir, before = cli_runs
    result = results[recipe]
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((only_run_dir(logdir, recipe) / "metrics.json").read_text())
    assert metrics["model_params"] == residual_net().count_params()
    assert metrics["model_path"] == str(user_files["net"])
    assert "loss: its own compiled loss" in result.stdout
    assert sha1(user_files["net"]) == before  # the user's file is never written


def test_images_reach_a_model_that_rescales_them_in_0_255(cli_runs):
    results, _, _ = cli_runs
    assert "pixels reach --model in 0-255: its layer 'rescaling" in results["batch"].stdout
    assert "(Rescaling) scales them to [0, 1]" in results["batch"].stdout
    assert "images reach it in 0-255" in results["stream"].stdout


def test_mixed_precision_rebuilds_the_users_model_under_the_16_bit_policy(cli_runs):
    results, logdir, _ = cli_runs
    metrics = json.loads((only_run_dir(logdir, "mixed_precision") / "metrics.json").read_text())
    assert metrics["policy"] in ("mixed_bfloat16", "mixed_float16")
    assert metrics["output_dtype"] == "float32"
    assert metrics["speedup"] == pytest.approx(
        metrics["examples_per_sec"] / metrics["float32_examples_per_sec"])
    trained = keras.models.load_model(metrics["model_file"])  # the 16-bit copy, in the run folder
    assert trained.layers[1].dtype_policy.name == metrics["policy"]
    assert trained.count_params() == metrics["model_params"]


def test_batch_keeps_each_sizes_trained_copy_in_the_run_folder(cli_runs):
    _, logdir, _ = cli_runs
    metrics = json.loads((only_run_dir(logdir, "batch") / "metrics.json").read_text())
    assert metrics["best_model_file"].endswith(f"batch_{metrics['best_batch_size']}/model.keras")
    assert keras.models.load_model(metrics["best_model_file"]).name == "users_residual_net"


def test_device_workers_train_the_users_model_from_a_copy_in_the_run_folder(cli_runs):
    _, logdir, _ = cli_runs
    run_dir = only_run_dir(logdir, "device")
    copy = keras.models.load_model(run_dir / "model.keras")
    assert copy.name == "users_residual_net"
    assert "users_residual_net" in (run_dir / "cpu.log").read_text()  # what the worker trained


def in_process(*args, tmp_path):
    """main.main in this process: its exit code and the run folders it left."""
    code = main.main(["main.py", *args, f"--logdir={tmp_path / 'runs'}"])
    return code, list((tmp_path / "runs").glob("*/*"))


def test_an_uncompiled_logits_mlp_is_fed_gray_resized_images_with_a_logits_loss(
        user_files, tmp_path, capsys):
    code, runs = in_process("--recipe=batch", "--batch_sizes=8", "--epochs=1",
                            f"--model={user_files['mlp']}",
                            f"--data_dir={user_files['folder']}", tmp_path=tmp_path)
    out = capsys.readouterr().out
    assert code == 0
    assert "pixels reach --model in [0, 1]" in out
    assert "loss: sparse categorical cross-entropy from logits" in out
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["model_params"] == gray_mlp().count_params()


def test_npz_arrays_feed_a_model_of_feature_vectors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 10)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)  # two classes: a sigmoid unit
    np.savez(tmp_path / "features.npz", x_train=x[:40], y_train=y[:40], x_val=x[40:],
             y_val=y[40:])
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.save(tmp_path / "features.keras")
    code, runs = in_process("--recipe=batch", "--batch_sizes=8", "--epochs=2",
                            "--dataset=npz", f"--data_dir={tmp_path / 'features.npz'}",
                            f"--model={tmp_path / 'features.keras'}", tmp_path=tmp_path)
    assert code == 0
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["model_params"] == model.count_params()


class Doubled(keras.layers.Layer):
    """A custom layer, registered only where its code is imported."""

    def call(self, x):
        return 2 * x


CUSTOM_CODE = '''
import keras

@keras.saving.register_keras_serializable(package="users")
class Doubled(keras.layers.Layer):
    def call(self, x):
        return 2 * x
'''


def bad_model_files(root):
    """name -> (file, expected text of the one error line)."""
    files = {}
    (root / "text.keras").write_text("I am not a model")
    files["text file named .keras"] = (root / "text.keras", "is not a Keras model")
    residual_net().save(root / "whole.keras")
    data = (root / "whole.keras").read_bytes()
    (root / "truncated.keras").write_bytes(data[:len(data) // 2])
    files["truncated file"] = (root / "truncated.keras", "is truncated or damaged")
    files["missing file"] = (root / "nowhere.keras", "does not exist")
    vectors = keras.Sequential([keras.Input((100,)), keras.layers.Dense(3)])
    vectors.save(root / "vectors.keras")
    files["model of feature vectors given images"] = (
        root / "vectors.keras", "takes inputs shaped (100,), which --dataset=directory images")
    residual_net(classes=5).save(root / "five.keras")
    files["output units differ from the classes"] = (
        root / "five.keras", "has 5 output units but the data has 3 classes")
    regression = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Flatten(),
                                   keras.layers.Dense(1)])
    regression.save(root / "regression.keras")
    files["regression output"] = (root / "regression.keras", "a regression output")
    lam = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Lambda(lambda t: t * 2),
                            keras.layers.Flatten(), keras.layers.Dense(3)])
    lam.save(root / "lambda.keras")
    files["Lambda layer, refused by safe mode"] = (
        root / "lambda.keras", "Keras' safe mode refuses to load because it can run anything: "
                               "pass --trust_model")
    keras.saving.register_keras_serializable(package="users")(Doubled)
    custom = keras.Sequential([keras.Input((SIZE, SIZE, 3)), Doubled(), keras.layers.Flatten(),
                               keras.layers.Dense(3)])
    custom.save(root / "custom.keras")
    keras.saving.get_custom_objects().pop("users>Doubled")  # as in a fresh process
    files["custom layer without its code"] = (
        root / "custom.keras", "uses the custom class(es) users>Doubled, which nothing "
                               "registered: pass --model_code=FILE.py")
    return files


def test_every_bad_model_file_is_one_line_exit_2_and_no_run_folder(user_files, tmp_path, capfd):
    for name, (path, expected) in bad_model_files(tmp_path).items():
        code, runs = in_process("--recipe=batch", "--batch_sizes=8", "--epochs=1",
                                f"--model={path}", f"--data_dir={user_files['folder']}",
                                tmp_path=tmp_path)
        lines = error_lines(capfd.readouterr().err)
        assert code == 2, name
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, lines)
        assert expected in lines[0], (name, lines[0])
        assert not runs, name


def test_trust_model_and_model_code_load_what_safe_mode_and_the_registry_refused(
        user_files, tmp_path):
    files = bad_model_files(tmp_path)
    (tmp_path / "layers.py").write_text(CUSTOM_CODE)
    tiny = ["--recipe=batch", "--batch_sizes=8", "--epochs=1", "--steps_per_epoch=1",
            f"--data_dir={user_files['folder']}"]
    code, runs = in_process(*tiny, f"--model={files['custom layer without its code'][0]}",
                            f"--model_code={tmp_path / 'layers.py'}", tmp_path=tmp_path)
    assert code == 0 and len(runs) == 1
    # In a subprocess: --trust_model turns safe mode off for the whole process.
    trusted = run_cli(*tiny, f"--model={files['Lambda layer, refused by safe mode'][0]}",
                      "--trust_model", f"--logdir={tmp_path / 'trusted'}")
    assert trusted.returncode == 0, trusted.stderr[-2000:]


def test_prune_writes_the_pruned_copy_and_tfmot_asks_for_the_keras_engine(
        cli_runs, user_files, tmp_path):
    _, logdir, _ = cli_runs
    run_dir = only_run_dir(logdir, "prune")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    pruned = keras.models.load_model(run_dir / "pruned.keras")  # the user's model, pruned
    assert pruned.name == "users_residual_net" and metrics["engine"] == "keras"
    assert metrics["sparsity_measured"] == pytest.approx(0.8, abs=0.005)
    result = run_cli("--recipe=prune", "--engine=tfmot", f"--model={user_files['net']}",
                     f"--data_dir={user_files['folder']}", f"--logdir={tmp_path}", env=ENV)
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, lines
    assert "use --engine=keras" in lines[0]
    assert not list(tmp_path.glob("prune/*"))


def test_model_flags_are_refused_where_they_do_not_apply(tmp_path, capfd):
    code, _ = in_process("--recipe=transfer", "--model=x.keras", tmp_path=tmp_path)
    assert code == 2 and "--model does not apply" in capfd.readouterr().err
    code, _ = in_process("--recipe=batch", "--trust_model", tmp_path=tmp_path)
    assert code == 2 and "go with --model=FILE" in capfd.readouterr().err
