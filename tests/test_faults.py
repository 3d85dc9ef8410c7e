"""Runs that die, are interrupted or are spread over workers never lose finished work.

(SIGTERM, damaged checkpoints and failed checkpoint writes: test_preempt.py.)"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import (ENV, REPO, epochs_printed, error_lines, interrupted_at, only_run_dir,
                     read_tensorboard_tags, read_until, run_cli, run_two_workers, start_cli)

import main
from experiments import batch

# 400 steps of batch 4: an epoch takes about a second on 2 cores, long enough
# to stop the run inside the epoch we aim at.
LONG_RUN = ["--recipe=batch", "--batch_sizes=4", "--epochs=5", "--steps_per_epoch=400",
            "--warmup_steps=1"]


def test_killed_run_resumes_from_last_finished_epoch(tmp_path):
    logdir = tmp_path / "runs"
    first = start_cli(*LONG_RUN, f"--logdir={logdir}")
    read_until(first, "Epoch 3/5")  # epochs 1 and 2 are finished and checkpointed
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    run_dir = only_run_dir(logdir, "batch")
    assert not (run_dir / "metrics.json").exists()

    second = run_cli(*LONG_RUN, f"--logdir={logdir}", "--resume")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "at epoch 3, step 0 of 400" in second.stdout
    assert epochs_printed(second.stdout) == ["3/5", "4/5", "5/5"]
    assert only_run_dir(logdir, "batch") == run_dir  # the same folder, continued
    assert json.loads((run_dir / "metrics.json").read_text())["best_batch_size"] == 4
    tags = read_tensorboard_tags(run_dir / "batch_4" / "train")
    assert len(tags["epoch_loss"]) == 5  # the full history on one timeline


def test_ctrl_c_saves_the_step_it_stopped_at_and_exits_130(tmp_path):
    logdir = tmp_path / "runs"
    process = start_cli(*LONG_RUN, f"--logdir={logdir}")
    read_until(process, "Epoch 2/5")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert error_lines(stderr)[-1].startswith("error: interrupted; run folder kept")
    run_dir = only_run_dir(logdir, "batch")
    assert (run_dir / "INTERRUPTED").exists() and not (run_dir / "metrics.json").exists()
    checkpoint, saved = batch.latest_checkpoint(str(run_dir / "checkpoints" / "batch_4"))
    assert saved["epochs_done"] == 1 and saved["step"] >= 1  # inside epoch 2, at a step's end
    assert interrupted_at(run_dir) == ("SIGINT", 2, saved["step"])
    import keras
    assert keras.models.load_model(checkpoint).optimizer is not None


def test_failed_checkpoint_save_leaves_previous_checkpoint_whole(tmp_path, tiny_images):
    (x, y), _ = tiny_images
    model, loss = batch.build_model(x.shape[1:], 10)
    model.compile(optimizer="adam", loss=loss)
    saver = batch.EpochCheckpoint(str(tmp_path))
    saver.set_model(model)
    saver.on_epoch_end(0)

    def crash_mid_write(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise OSError("disk full")

    model.save = crash_mid_write
    with pytest.raises(OSError):
        saver.on_epoch_end(1)
    # 2's model never made it, and its record went with it
    assert sorted(os.listdir(tmp_path)) == ["epoch_0001.json", "epoch_0001.keras"]
    assert batch.latest_checkpoint(str(tmp_path))[1]["epochs_done"] == 1


def test_nan_loss_is_one_line_exit_1_and_no_metrics(tmp_path):
    result = run_cli("--recipe=batch", "--batch_sizes=32", "--epochs=1", "--steps_per_epoch=20",
                     "--learning_rate=1e30", f"--logdir={tmp_path}")
    assert result.returncode == 1, result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "training loss became nan" in lines[0]
    assert not (only_run_dir(tmp_path, "batch") / "metrics.json").exists()


GREEDY_BATCH = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # what main.py sets before TensorFlow loads; this
import keras, tensorflow as tf            # script loads it first, for its Greedy layer
import main
from experiments import batch

class Greedy(keras.layers.Layer):  # asks the CPU for 1 TiB at its first step
    def call(self, x):
        size = tf.cast(tf.shape(x)[:1], tf.int64) * 2**35  # int64 and dynamic: never folded
        return x + tf.reduce_max(tf.random.uniform(size))

def greedy_model(input_shape, num_classes):
    model = keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(), Greedy(),
                              keras.layers.Dense(num_classes)])
    return model, keras.losses.SparseCategoricalCrossentropy(from_logits=True)

batch.build_model = greedy_model
sys.exit(main.main(sys.argv))
"""


def test_out_of_memory_in_training_is_one_line_exit_1_and_keeps_the_folder(tmp_path):
    """A real ResourceExhaustedError from TensorFlow, in a real run of main."""
    result = subprocess.run(
        [sys.executable, "-c", GREEDY_BATCH, "--recipe=batch", "--batch_sizes=8", "--epochs=1",
         "--steps_per_epoch=2", f"--logdir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1, lines
    run_dir = only_run_dir(tmp_path, "batch")
    assert lines[0].startswith("error: out of memory at --batch_sizes=8: try a smaller")
    assert f"run folder kept: {run_dir}" in lines[0]
    assert "ResourceExhaustedError" in (run_dir / "error.txt").read_text()
    assert (run_dir / "flags.json").exists() and not (run_dir / "metrics.json").exists()


def test_a_failure_after_training_keeps_the_trained_models_exit_1(tmp_path, capfd,
                                                                  monkeypatch):
    """A late error (here writing TensorBoard's summary, once both models are saved) is not
    bad input: nothing made is lost. (An export that fails is reported, not raised:
    tests/test_prune.py.)"""
    from experiments import prune

    def converter_fails(*args):
        raise ValueError("TFLite converter failed: op not supported")

    monkeypatch.setattr(prune, "log_tensorboard", converter_fails)
    code = main.main(["main.py", "--recipe=prune", "--baseline_epochs=1", "--epochs=1",
                      "--steps_per_epoch=5", f"--logdir={tmp_path}"])
    assert code == 1
    lines = error_lines(capfd.readouterr().err)
    run_dir = only_run_dir(tmp_path, "prune")
    assert lines == [f"error: ValueError: TFLite converter failed: op not supported (run folder "
                     f"kept: {run_dir}; the traceback is in its error.txt)"]
    dense_model = (784 * 128 + 128) + (128 * 64 + 64) + (64 * 10 + 10)  # prune's default
    for trained in ("baseline.keras", "pruned.keras"):  # both models, whole, where written
        assert prune.load_model(str(run_dir / trained)).count_params() == dense_model
    assert "converter_fails" in (run_dir / "error.txt").read_text()
    assert list((run_dir / "baseline").iterdir())  # the TensorBoard logs stay too


def test_multi_worker_trains_on_two_local_workers(tmp_path):
    results = run_two_workers(lambda index: [
        "--recipe=batch", "--strategy=multi_worker", "--batch_sizes=8", "--epochs=2",
        "--steps_per_epoch=5", "--warmup_steps=1", f"--logdir={tmp_path / f'runs{index}'}"])
    for code, out, err in results:
        assert code == 0, err[-2000:]
        assert "x 2 replica(s)" in out
    metrics = json.loads((only_run_dir(tmp_path / "runs0", "batch") / "metrics.json").read_text())
    assert metrics["replicas"] == 2 and np.isfinite(metrics["val_loss_b8"])
    assert not (tmp_path / "runs1").exists()  # only the chief writes a run folder
    tags = read_tensorboard_tags(only_run_dir(tmp_path / "runs0", "batch") / "batch_8" / "validation")
    assert len(tags["epoch_accuracy"]) == 2


# Every recipe whose training is in this process, pushed to a NaN loss with a
# learning rate near float32's limit, so the first updates overflow (batch and
# mixed_precision are checked through the CLI, device per subprocess in their
# own test files).
NAN_RUNS = {
    "prune": ["--baseline_epochs=1", "--epochs=1", "--steps_per_epoch=10"],
    "transfer": ["--weights=none", "--epochs=1", "--steps_per_epoch=3", "--image_size=32"],
    "stream": ["--epochs=1", "--steps_per_epoch=5", "--image_size=32"],
    "profile": ["--epochs=1", "--steps_per_epoch=10", "--profile_steps=1,2"],
}


@pytest.mark.parametrize("recipe", sorted(NAN_RUNS))
def test_nan_loss_ends_every_recipe_with_one_line_and_exit_1(recipe, tmp_path, capsys,
                                                            monkeypatch):
    code = main.main(["main.py", f"--recipe={recipe}", *NAN_RUNS[recipe], "--learning_rate=1e38",
                      f"--logdir={tmp_path / 'runs'}"])
    assert code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and ("nan" in lines[0] or "inf" in lines[0]), lines
    assert not list((tmp_path / "runs").glob("*/*/metrics.json"))
