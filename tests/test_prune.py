"""The prune recipe: real sparsity, real size savings, clean exports, clear errors."""
import concurrent.futures
import json

import numpy as np
import pytest

from helpers import error_lines, only_run_dir, read_tensorboard_tags, run_cli, run_dropin
from recipes import prune

tf_keras = prune.tf_keras

DROPIN_SCRIPT = """
import os, numpy as np
import prune
assert os.environ.get("TF_USE_LEGACY_KERAS") is None, "tfmot's env flip leaked"
rng = np.random.default_rng(0)
x = rng.random((48, 8, 8, 1), dtype=np.float32)
y = (x.mean(axis=(1, 2, 3)) > 0.5).astype(np.int64)
m = prune.run(prune.Config(baseline_epochs=1, epochs=1, batch_size=16), "logs", ((x, y), (x, y)))
print("sparsity", round(m["sparsity_measured"], 2), m["pruned_gzip_bytes"] < m["baseline_gzip_bytes"])
"""
BAD_FLAGS = {"--final_sparsity=1.2": "--final_sparsity", "--sparsity_m_by_n=3,2": "--sparsity_m_by_n"}


@pytest.fixture(scope="module")
def subprocesses(tmp_path_factory):
    """Every subprocess of this file, started at once: their TensorFlow imports overlap."""
    tmp = tmp_path_factory.mktemp("prune_subprocesses")
    jobs = {"headline": (run_cli, "--recipe=prune", "--baseline_epochs=1", "--epochs=2",
                         "--steps_per_epoch=3", f"--logdir={tmp / 'headline'}"),
            "dropin": (run_dropin, "prune.py", DROPIN_SCRIPT, tmp)}
    for i, flag in enumerate(BAD_FLAGS):
        jobs[flag] = (run_cli, "--recipe=prune", flag, f"--logdir={tmp / f'bad{i}'}")
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(*job) for name, job in jobs.items()}
        yield futures, tmp


def schedule(final=0.8, end_step=8):
    return prune.make_schedule("polynomial", 0.5, final, 0, end_step, 1)


def fit_pruned(model, loss, data, epochs=2, batch_size=16):
    prune.train(model, loss, data, epochs, batch_size, 1e-3, None, 0,
                [prune.sparsity.UpdatePruningStep()])


def test_cli_headline_run_reaches_target_sparsity_and_really_shrinks_the_export(subprocesses):
    futures, tmp = subprocesses
    result = futures["headline"].result()
    assert result.returncode == 0, result.stderr[-2000:]
    assert "baseline     pruned" in result.stdout and "per-layer kernel sparsity" in result.stdout
    run_dir = only_run_dir(tmp / "headline", "prune")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("baseline_accuracy", "pruned_accuracy", "accuracy_drop", "sparsity_target",
                "baseline_gzip_bytes", "tflite_gzip_bytes", "tflite_quant_gzip_bytes"):
        assert key in metrics, key
    assert metrics["accuracy_drop"] == pytest.approx(
        metrics["baseline_accuracy"] - metrics["pruned_accuracy"])
    assert abs(metrics["sparsity_measured"] - 0.8) <= 0.01
    for name in ("dense_128", "dense_64", "output"):
        assert abs(metrics[f"sparsity_{name}"] - 0.8) <= 0.01, name
    assert metrics["pruned_gzip_bytes"] < metrics["baseline_gzip_bytes"] / 2
    assert metrics["compression_ratio"] > 2
    assert metrics["tflite_quant_gzip_bytes"] < metrics["tflite_gzip_bytes"]
    assert metrics["reload_matches"] is True
    for name in ("baseline.h5", "pruned.h5", "pruned.tflite", "pruned_quant.tflite"):
        assert (run_dir / name).stat().st_size > 0, name
    # PruningSummaries stops at the last epoch start; the recipe logs the final sparsity.
    tags = read_tensorboard_tags(run_dir / "pruned" / "metrics")
    sparsity_tags = [t for t in tags if t.endswith("/sparsity")]
    assert len(sparsity_tags) == 3
    assert all(abs(tags[t][-1] - 0.8) <= 0.01 for t in sparsity_tags)
    assert {"epoch_loss", "epoch_accuracy"} <= set(read_tensorboard_tags(run_dir / "pruned" / "train"))


def test_bad_sparsity_flags_are_one_line_errors(subprocesses):
    futures, tmp = subprocesses
    for i, (flag, words) in enumerate(BAD_FLAGS.items()):
        result = futures[flag].result()
        lines = error_lines(result.stderr)
        assert result.returncode == 2, flag
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], lines
        assert not (tmp / f"bad{i}" / "prune").exists()


def test_recipe_file_works_alone_and_keeps_keras3_for_the_process(subprocesses):
    result = subprocesses[0]["dropin"].result()
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sparsity 0.8 True" in result.stdout


def test_baseline_is_not_pruned_in_place_and_export_predicts_like_memory(tiny_images, tmp_path):
    (x_train, y_train), (x_val, _) = tiny_images
    baseline, loss = prune.build_model(x_train.shape[1:], 10)
    before = [w.copy() for w in baseline.get_weights()]

    pruned, names, left_dense = prune.prune_model(baseline, schedule())
    fit_pruned(pruned, loss, tiny_images)
    stripped, per_layer, measured = prune.strip_and_measure(pruned, names)

    assert names == ["dense_128", "dense_64", "output"] and not left_dense
    assert abs(measured - 0.8) <= 0.01
    for old, new in zip(before, baseline.get_weights()):
        np.testing.assert_array_equal(old, new)  # the baseline kept every weight
    path = str(tmp_path / "pruned.h5")
    prune.save_h5(stripped, path)
    reloaded = tf_keras.models.load_model(path, compile=False)
    np.testing.assert_allclose(reloaded.predict(x_val, verbose=0),
                               stripped.predict(x_val, verbose=0), atol=1e-5)
    assert np.mean(reloaded.get_layer("dense_128").get_weights()[0] == 0) >= 0.79


def test_keras3_model_gets_a_clear_message_not_tfmots_error():
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(TypeError, match=r"Keras 3 model.*import tf_keras"):
        prune.prune_model(model, schedule())


def test_batchnorm_and_rescaling_layers_do_not_stop_pruning(tiny_images):
    (x_train, _), _ = tiny_images
    model = tf_keras.Sequential([
        tf_keras.Input(x_train.shape[1:]),
        tf_keras.layers.Rescaling(2.0, offset=-1.0, name="rescale"),
        tf_keras.layers.Flatten(),
        tf_keras.layers.Dense(32, activation="relu", name="hidden"),
        tf_keras.layers.BatchNormalization(name="bn"),
        tf_keras.layers.Dense(10, name="logits")])
    loss = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    pruned, names, left_dense = prune.prune_model(model, schedule())
    fit_pruned(pruned, loss, tiny_images)
    _, per_layer, _ = prune.strip_and_measure(pruned, names)

    assert list(left_dense) == ["rescale"] and "Rescaling" in left_dense["rescale"]
    assert "hidden" in names and "logits" in names
    assert per_layer["hidden"] == pytest.approx(0.8, abs=0.01)


def test_prune_layers_and_2_by_4_structure(tiny_images):
    (x_train, _), _ = tiny_images
    model, loss = prune.build_model(x_train.shape[1:], 10)
    pruned, names, _ = prune.prune_model(model, schedule(), sparsity_m_by_n=(2, 4),
                                         layer_names=("dense_128",))
    fit_pruned(pruned, loss, tiny_images)
    stripped, per_layer, _ = prune.strip_and_measure(pruned, names)

    assert list(per_layer) == ["dense_128"]
    groups = stripped.get_layer("dense_128").get_weights()[0].T.reshape(-1, 4)
    assert np.all(np.sum(groups == 0, axis=1) >= 2)  # 2 zeros in every 4 input weights
    assert np.mean(stripped.get_layer("dense_64").get_weights()[0] == 0) == 0
    with pytest.raises(ValueError, match="--prune_layers: no layer named nope"):
        prune.prune_model(model, schedule(), layer_names=("nope",))


def test_clustering_after_pruning_keeps_the_zeros_and_shares_values(tiny_images):
    (x_train, _), _ = tiny_images
    model, loss = prune.build_model(x_train.shape[1:], 10)
    pruned, names, _ = prune.prune_model(model, schedule(), layer_names=("dense_64",))
    fit_pruned(pruned, loss, tiny_images)
    stripped, _, _ = prune.strip_and_measure(pruned, names)

    clustered = prune.cluster_model(stripped, names, clusters=4)
    prune.train(clustered, loss, tiny_images, 1, 16, 1e-4, None, 0, [])
    final = prune.tfmot.clustering.keras.strip_clustering(clustered)

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
