"""The transfer recipe: frozen base, block5 fine-tuning, preprocessing once, offline
ImageNet error, caching refused with augmentation, saved models that reload, a tiny run."""
import json

import keras
import numpy as np
import pytest

from helpers import (ENV, error_lines, only_run_dir, read_tensorboard_tags, run_cli,
                     run_copy_example)
from experiments import transfer
from experiments.files import write_atomically
from recipes import transfer as dropin
from recipes.step_timer import StepTimer


def tiny_config(**overrides):
    values = dict(weights="none", image_size=32, epochs=1, batch_size=8, dense_units=16,
                  warmup_steps=0)
    return transfer.Config(**{**values, **overrides})


def random_images(n, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(size=(n, 32, 32, 3)).astype(np.float32),
            np.arange(n) % classes)


def tiny_model(classes=3):
    keras.utils.set_random_seed(0)
    base = transfer.load_vgg16("none", 32)
    model, head, extractor = dropin.build_model(base, classes, dense_units=16)
    return base, model, head, extractor


def fit_once(model, x, y, config, lr=1e-2):
    ds = transfer.make_dataset(x, y, config.batch_size, seed=0)
    return transfer.fit_phase(model, ds, ds, "test", 1, 0, lr, len(x) // config.batch_size,
                              config, [])


def test_phase1_keeps_the_base_frozen_and_phase2_trains_only_block5():
    base, model, head, _ = tiny_model()
    x, y = random_images(16)
    base_before = {w.path: w.numpy() for w in base.weights}
    head_before = [w.numpy() for w in head.weights]
    fit_once(model, x, y, tiny_config())  # phase 1
    assert all(np.array_equal(base_before[w.path], w.numpy()) for w in base.weights)
    assert not all(np.array_equal(a, w.numpy()) for a, w in zip(head_before, head.weights))
    assert {w.path for w in model.trainable_weights} == {w.path for w in head.weights}

    dropin.unfreeze_last_block(base)  # phase 2
    block5 = {w.path for w in base.weights if "block5_" in w.path}
    assert {w.path for w in base.trainable_weights} == block5 and block5
    fit_once(model, x, y, tiny_config(), lr=1e-3)
    for w in base.weights:
        changed = not np.array_equal(base_before[w.path], w.numpy())
        if "block5_" not in w.path:
            assert not changed, w.path
        elif w.path.endswith("kernel"):
            assert changed, w.path


def test_vgg16_preprocessing_is_applied_exactly_once():
    base, model, head, extractor = tiny_model()
    x, _ = random_images(2)
    once = keras.applications.vgg16.preprocess_input(255 * x.copy())
    twice = keras.applications.vgg16.preprocess_input(once.copy())
    layer = model.get_layer("vgg16_preprocess")
    np.testing.assert_allclose(np.asarray(layer(x)), once, rtol=1e-5, atol=1e-3)
    features = np.asarray(extractor(x))
    np.testing.assert_allclose(features, np.asarray(base(once)), rtol=1e-4, atol=1e-4)
    assert not np.allclose(features, np.asarray(base(twice)), rtol=1e-2, atol=1e-2)
    # the cached-features path and the image path give the same predictions
    np.testing.assert_allclose(np.asarray(head(features)), np.asarray(model(x)), atol=1e-5)


def test_cache_features_with_augment_is_refused_in_one_line():
    with pytest.raises(ValueError, match="--cache_features cannot be used with --augment") as e:
        tiny_config(cache_features=True, augment=True)
    assert "\n" not in str(e.value)


def test_weights_path_loads_a_keras_downloaded_style_h5_file(tmp_path):
    import tf_keras  # writes the legacy .h5 layout that keras' VGG16 download uses
    tf_keras.utils.set_random_seed(1)
    path = str(tmp_path / transfer.WEIGHTS_FILE)
    saved = tf_keras.applications.VGG16(weights=None, include_top=False,
                                        input_shape=(32, 32, 3))
    saved.save_weights(path)
    loaded = transfer.load_vgg16(path, 32)
    for a, b in zip(saved.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="--weights=.*is not a file"):
        tiny_config(weights=str(tmp_path / "missing.h5"))


def test_imagenet_weights_offline_fail_before_training_with_one_line_and_exit_2(tmp_path):
    dead_proxy = "http://127.0.0.1:9"  # no download can succeed, network or not
    env = {**ENV, "KERAS_HOME": str(tmp_path / "keras_home"),
           "https_proxy": dead_proxy, "HTTPS_PROXY": dead_proxy}
    result = run_cli("--recipe=transfer", "--weights=imagenet", "--image_size=32",
                     f"--logdir={tmp_path / 'logs'}", env=env)
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, lines
    expected = tmp_path / "keras_home" / "models" / transfer.WEIGHTS_FILE
    assert str(expected) in lines[0]
    assert "--weights=none" in lines[0] and "--weights=PATH" in lines[0]
    assert not list((tmp_path / "logs").glob("transfer/*"))  # no run folder left behind


def test_cli_tiny_run_at_32px_puts_both_phases_on_one_tensorboard_timeline(tmp_path):
    result = run_cli("--recipe=transfer", "--weights=none", "--image_size=32", "--epochs=1",
                     "--fine_tune_epochs=1", "--batch_size=16", "--steps_per_epoch=1",
                     "--dense_units=16", "--augment", f"--logdir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RANDOM weights" in result.stdout
    # The warning is repeated after training, beside the accuracy it qualifies.
    after_training = result.stdout[result.stdout.rindex("Epoch "):]
    assert "not a result. Accuracy needs pretrained weights: --weights=imagenet" in after_training
    run_dir = only_run_dir(tmp_path, "transfer")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("val_accuracy_phase1", "val_accuracy_phase2", "base_epoch_s",
                "trainable_params", "total_params", "best_val_accuracy"):
        assert key in metrics, key
    assert (run_dir / "best.keras").is_file() and (run_dir / "final.keras").is_file()
    tags = read_tensorboard_tags(run_dir / "train_log" / "validation")
    assert len(tags["epoch_accuracy"]) == 2  # epoch 0 of phase 1, epoch 1 of phase 2
    learning_rates = read_tensorboard_tags(run_dir / "train_log" / "train")["epoch_learning_rate"]
    assert learning_rates[-1] == pytest.approx(learning_rates[0] / 30, rel=1e-3)


def test_run_caches_fine_tunes_exports_and_saves_models_that_reload_with_equal_predictions(
        tmp_path):
    # Cached features (to a file), fine-tuning and export, on gray 40x40 images that the
    # experiment must turn into 32x32 RGB.
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(32, 40, 40, 1)).astype("float32")
    y = np.arange(32) % 2
    cfg = transfer.Config(weights="none", image_size=32, epochs=1, fine_tune_epochs=1,
                          batch_size=8, dense_units=16, warmup_steps=0, cache_features=True,
                          cache_file=str(tmp_path / "features.npz"), export="saved_model",
                          learning_rate=3e-3)
    logs = tmp_path / "logs"
    metrics = transfer.run(cfg, str(logs), ((x[:16], y[:16]), (x[16:], y[16:])))
    x_val, y_val = transfer.as_rgb(x[16:], 32), y[16:]
    rgb = transfer.as_rgb(x, 32)
    _, _, seconds = transfer.cached_features(None, rgb[:16], rgb[16:], 8, cfg)
    assert seconds is None  # a second extraction read features.npz instead
    assert metrics["cache_speedup"] == pytest.approx(metrics["base_epoch_s"]
                                                     / metrics["head_epoch_s"])
    trainable = metrics["trainable_params"], metrics["trainable_params_phase2"]
    assert trainable[0] < trainable[1] < metrics["total_params"]

    final = keras.models.load_model(logs / "final.keras")
    predictions = final.predict(x_val, verbose=0)
    assert np.mean(predictions.argmax(1) == y_val) == pytest.approx(metrics["val_accuracy"])
    best = keras.models.load_model(logs / "best.keras")
    best_accuracy = np.mean(best.predict(x_val, verbose=0).argmax(1) == y_val)
    assert best_accuracy == pytest.approx(metrics["best_val_accuracy"])
    import tensorflow as tf
    exported = tf.saved_model.load(str(logs / "saved_model"))  # keep it referenced
    np.testing.assert_allclose(np.asarray(exported.serve(x_val)), predictions, atol=1e-5)
    assert not list(logs.glob(".*partial*"))  # atomic writes leave no temp files behind


COPY_SETUP = """
import sys
import keras, numpy as np
assert keras.backend.backend() == "jax"
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.uniform(size=(48, 32, 32, 3)).astype("float32"); y = np.arange(48) % 2
x_val = rng.uniform(size=(16, 32, 32, 3)).astype("float32"); y_val = np.arange(16) % 2
weights = None  # random VGG16: a test downloads nothing
"""
COPY_CHECK = """
keras.utils.set_random_seed(0)  # the base the Copy code started from, again
start = keras.applications.VGG16(include_top=False, weights=None, input_shape=x.shape[1:])
trained = {}
for before, after in zip(start.layers, base.layers):
    if after.weights:
        changed = any(not np.array_equal(a, b)
                      for a, b in zip(before.get_weights(), after.get_weights()))
        assert changed == after.name.startswith("block5_"), (after.name, changed)
        trained[after.name] = changed
assert sum(trained.values()) == 3, trained  # block5's three convolutions, nothing else
assert len(head.history.history["val_accuracy"]) == 10  # phase 1 ran on the cached features
# VGG16's preprocessing is applied once, inside the model: the extractor on [0, 1] images
# equals the base on preprocess_input(255 * images).
once = keras.applications.vgg16.preprocess_input(255 * x_val.copy())
np.testing.assert_allclose(extract_features(extractor, x_val), np.asarray(base(once)),
                           rtol=1e-4, atol=1e-4)
reloaded = keras.models.load_model("transfer.keras")
np.testing.assert_allclose(reloaded.predict(x_val, verbose=0), model.predict(x_val, verbose=0),
                           atol=1e-5)
assert "tensorflow" not in sys.modules
print("OK", sorted(trained))
"""


def test_copy_example_fine_tunes_only_block5_and_saves_a_model_that_takes_raw_images_on_jax(
        tmp_path):
    result = run_copy_example("transfer.py", tmp_path, COPY_SETUP, COPY_CHECK)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK ['block1_conv1'" in result.stdout and "'block5_conv3']" in result.stdout


def test_saved_model_reloads_with_equal_predictions(tmp_path):
    _, model, _, _ = tiny_model()
    x, _ = random_images(4)
    write_atomically(tmp_path / "model.keras", model.save)
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)


def test_long_phase_prints_its_estimated_duration_from_the_first_timed_steps(capsys):
    timer = StepTimer()
    estimate = transfer.EstimatePrinter(timer, "phase 1", total_steps=100, warmup_steps=1)
    for _ in range(3):  # one warm-up step, then two timed ones
        timer.on_train_batch_begin(0)
        timer.on_train_batch_end(0, {"loss": 1.0})
        estimate.on_train_batch_end(0)
    out = capsys.readouterr().out
    assert "[phase 1] estimated" in out and "for 100 steps" in out
