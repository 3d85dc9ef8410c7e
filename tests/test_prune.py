"""The prune recipe: real sparsity and size savings on both engines, clean exports, clear errors."""
import concurrent.futures
import json
import subprocess
import sys

import keras
import numpy as np
import pytest

import prune_checks
from helpers import (ENV, REPO, error_lines, only_run_dir,
                     read_tensorboard_tags, run_cli, run_dropin)
from recipes import prune

DROPIN_SCRIPT = """
import os, sys, numpy as np, keras
import prune
rng = np.random.default_rng(0)
x = rng.random((48, 8, 8, 1), dtype=np.float32)
y = (x.mean(axis=(1, 2, 3)) > 0.5).astype(np.int64)
mine = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                         keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2)])
m = prune.run(prune.Config(epochs=1, batch_size=16), "logs", ((x, y), (x, y)), model=mine)
assert "tensorflow_model_optimization" not in sys.modules and "tf_keras" not in sys.modules
print("sparsity", round(m["sparsity_measured"], 2), m["pruned_gzip_bytes"] < m["baseline_gzip_bytes"],
      os.path.exists("logs/pruned.keras"))
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
    jobs["dropin"] = (run_dropin, "prune.py", DROPIN_SCRIPT, tmp, 300, None, False,
                      ("tensorflow_model_optimization", "tf_keras"))
    jobs["jax"] = (subprocess.run, [sys.executable, "-c", "import prune_checks; prune_checks.main()"])
    for i, flag in enumerate(BAD_FLAGS):
        jobs[flag] = (run_cli, "--recipe=prune", flag, f"--logdir={tmp / f'bad{i}'}")
    kwargs = {"jax": dict(cwd=REPO / "tests", capture_output=True, text=True, timeout=300,
                          env={**ENV, "KERAS_BACKEND": "jax"})}
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(*job, **kwargs.get(name, {})) for name, job in jobs.items()}
        yield futures, tmp


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
    # The default layer choice leaves the 640-weight output layer (0.6%) dense, and says so.
    assert "left dense: output (holds 0.6% of the kernel weights" in result.stdout
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
        assert prune.gzip_bytes(run_dir / name) == metrics[key], name
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


def test_bad_flags_are_one_line_errors(subprocesses):
    futures, tmp = subprocesses
    for i, (flag, words) in enumerate(BAD_FLAGS.items()):
        result = futures[flag].result()
        lines = error_lines(result.stderr)
        assert result.returncode == 2, flag
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], lines
        assert not (tmp / f"bad{i}" / "prune").exists()


def test_recipe_file_alone_prunes_a_keras3_model_without_tfmot_installed(subprocesses):
    result = subprocesses[0]["dropin"].result()
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sparsity 0.8 True True" in result.stdout


def test_schedule_follows_tfmots_polynomial_decay():
    ours = prune.Schedule("polynomial", 0.5, 0.8, 10, 110, 10)
    theirs = prune.tfmot_schedule(ours)
    for step in (10, 20, 55, 100, 110):
        due, sparsity = theirs(step)
        assert bool(keras.ops.convert_to_numpy(ours.due(step))) == bool(due.numpy()), step
        assert float(ours.sparsity(step)) == pytest.approx(float(sparsity.numpy()), abs=1e-6)
    assert not bool(ours.due(15)) and not bool(ours.due(120))


def test_default_layer_choice_leaves_tiny_kernels_dense_and_lists_what_cannot_be_pruned():
    guide, _ = prune.build_model((28, 28, 1), 10, "conv")
    names, dense = prune.choose_layers(guide)
    assert names == ["output"] and "conv" in dense and "0.5%" in dense["conv"]  # 108 weights
    odd = keras.Sequential([keras.Input((6,)), keras.layers.Embedding(10, 4, name="embed"),
                            keras.layers.Flatten(), keras.layers.Dense(8, name="hidden"),
                            keras.layers.BatchNormalization(name="bn")])
    names, dense = prune.choose_layers(odd, min_share=0)
    assert names == ["hidden"]
    assert dense == {"embed": "Embedding has no kernel to prune by magnitude"}  # BN: not listed
    assert "bn" in prune.choose_layers(odd, layer_names=("bn", "hidden"))[1]  # unless named


def test_tfmot_clustering_after_pruning_keeps_the_zeros_and_shares_values(tiny_images):
    tf_keras = prune._tfmot()[0]
    model, loss = prune.build_model((28, 28, 1), 10, api=tf_keras)
    schedule = prune.Schedule("polynomial", 0.5, 0.8, 0, 8, 1)
    pruned, _ = prune.tfmot_prune_model(model, schedule, ["dense_64"])
    pruned.compile(tf_keras.optimizers.Adam(1e-3), loss)
    prune.train(pruned, tiny_images, 2, 16, None, 0,
                [prune._tfmot()[1].sparsity.keras.UpdatePruningStep()])
    stripped = prune._tfmot()[1].sparsity.keras.strip_pruning(pruned)
    clustered = prune.tfmot_cluster(stripped, ["dense_64"], clusters=4)
    clustered.compile(tf_keras.optimizers.Adam(1e-4), loss)
    prune.train(clustered, tiny_images, 1, 16, None, 0)
    final = prune._tfmot()[1].clustering.keras.strip_clustering(clustered)
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
