"""Preemptible machines: SIGTERM is a save, not a crash; --resume continues at that step.

Spot machines, Kubernetes and Slurm send SIGTERM, then SIGKILL after a grace period. Each
test runs main.py in a subprocess and sends it a real signal. (The SIGTERM tests of the
other recipes live beside their resume tests: test_resume.py, test_stream_scale.py,
test_transfer_scale.py.)
"""
import json
import os
import resource
import signal
import subprocess
import sys
import time
import zipfile

import keras
import numpy as np
import pytest

from helpers import (ENV, REPO, epochs_printed, error_lines, interrupted_at, only_run_dir,
                     read_tensorboard_steps, read_tensorboard_tags, read_until, run_cli,
                     start_cli, stop_with_signal)

from experiments import scale_out

# 3 epochs of 400 steps of batch 4: about a second an epoch on 2 cores, so a signal sent
# just after "Epoch 2/3" lands inside epoch 2. Deterministic ops: a resumed run must end
# with the weights of an unbroken one.
LONG = ["--recipe=batch", "--batch_sizes=4", "--epochs=3", "--steps_per_epoch=400",
        "--warmup_steps=1"]
DETERMINISTIC = {**ENV, "TF_DETERMINISTIC_OPS": "1"}


def weights(path):
    return [np.asarray(w) for w in keras.models.load_model(path, compile=False).get_weights()]


def test_sigterm_saves_the_step_exits_143_and_resume_ends_with_unbroken_weights(tmp_path):
    unbroken = start_cli(*LONG, f"--logdir={tmp_path / 'unbroken'}", env=DETERMINISTIC)
    logdir = tmp_path / "runs"
    code, out, err, seconds = stop_with_signal([*LONG, f"--logdir={logdir}"], "Epoch 2/3",
                                               signal.SIGTERM, env=DETERMINISTIC)
    assert code == 143, err[-2000:]
    assert seconds < 25  # --grace_s's default
    run_dir = only_run_dir(logdir, "batch")
    name, epoch, step = interrupted_at(run_dir)
    assert (name, epoch) == ("SIGTERM", 2) and 0 < step < 400, (epoch, step)
    assert error_lines(err) == [f"error: interrupted; run folder kept: {run_dir} (SIGTERM at "
                                f"epoch 2, step {step} of 400: checkpoint saved; run the same "
                                "command with --resume)"]
    checkpoints = run_dir / "checkpoints" / "batch_4"
    assert (checkpoints / f"epoch_0001_step_{step:07d}.keras").exists()
    assert not (run_dir / "metrics.json").exists()

    resumed = run_cli(*LONG, f"--logdir={logdir}", "--resume", env=DETERMINISTIC)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resuming batch size 4 at epoch 2, step {step} of 400" in resumed.stdout
    assert epochs_printed(resumed.stdout) == ["2/3", "3/3"]
    assert only_run_dir(logdir, "batch") == run_dir and not (run_dir / "INTERRUPTED").exists()
    for split in ("train", "validation"):  # one timeline, each epoch once
        assert read_tensorboard_steps(run_dir / "batch_4" / split)["epoch_loss"] == [0, 1, 2]

    assert unbroken.wait(timeout=300) == 0, unbroken.stderr.read()[-2000:]
    reference = only_run_dir(tmp_path / "unbroken", "batch") / "batch_4" / "model.keras"
    for a, b in zip(weights(reference), weights(run_dir / "batch_4" / "model.keras")):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The stopped epoch's training loss is the mean over all its steps, both runs'.
    for split in ("train", "validation"):
        np.testing.assert_allclose(
            read_tensorboard_tags(run_dir / "batch_4" / split)["epoch_loss"],
            read_tensorboard_tags(reference.parent / split)["epoch_loss"], rtol=1e-4)


def limit_file_size(size):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_a_failed_checkpoint_write_keeps_the_last_one_and_a_damaged_one_is_passed_over(tmp_path):
    logdir = tmp_path / "runs"
    code, _, err, _ = stop_with_signal([*LONG, f"--logdir={logdir}"], "Epoch 2/3",
                                       signal.SIGTERM)
    assert code == 143, err[-2000:]
    run_dir = only_run_dir(logdir, "batch")
    _, _, step = interrupted_at(run_dir)
    folder = run_dir / "checkpoints" / "batch_4"
    before = sorted(os.listdir(folder))
    assert before == ["epoch_0001.json", "epoch_0001.keras", f"epoch_0001_step_{step:07d}.json",
                      f"epoch_0001_step_{step:07d}.keras"]

    # A full disk: no file may grow past 200 kB, and a checkpoint is 1.2 MB.
    full = start_cli(*LONG, f"--logdir={logdir}", "--resume", "--checkpoint_every_steps=20",
                     preexec_fn=limit_file_size(200_000))
    _, err = full.communicate(timeout=300)
    assert full.returncode == 1, err[-2000:]
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: OSError: could not write the "
                                                   "checkpoint"), lines
    assert f"the previous one is kept ({folder}/epoch_0001_step_{step:07d}.keras)" in lines[0]
    assert f"run folder kept: {run_dir}" in lines[0]
    assert sorted(os.listdir(folder)) == before  # the partial file is gone, the last one whole

    # The newest is damaged (cut short by a bad copy): one warning, the one before it is used.
    newest = folder / f"epoch_0001_step_{step:07d}.keras"
    newest.write_bytes(newest.read_bytes()[:5000])
    resumed = run_cli(*LONG, f"--logdir={logdir}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    warnings = [line for line in resumed.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: checkpoint {newest} is damaged (BadZipFile: File is not a "
                        "zip file); resuming from the one before it, epoch_0001.keras"]
    assert "Resuming batch size 4 at epoch 2, step 0 of 400" in resumed.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["best_batch_size"] == 4


SLOW_STEP = """
import sys, time
import keras
import main
from experiments import batch

class Slow(keras.layers.Layer):  # a training step that takes 4 s: longer than --grace_s=2
    def call(self, x, training=None):
        import tensorflow as tf
        if not training:
            return x
        pause = tf.numpy_function(lambda: (time.sleep(4), 0.0)[1], [], tf.float64,
                                  stateful=True)
        return x + tf.reshape(tf.cast(pause, x.dtype), []) * 0

    def compute_output_shape(self, shape):
        return shape

def slow_model(input_shape, num_classes, build=batch.build_model):
    _, loss = build(input_shape, num_classes)
    return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(), Slow(),
                             keras.layers.Dense(num_classes)]), loss

batch.build_model = slow_model
print("started", flush=True)
sys.exit(main.main(sys.argv))
"""


def test_a_step_longer_than_grace_s_still_ends_within_it(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_STEP, "--recipe=batch", "--batch_sizes=8", "--epochs=2",
         "--steps_per_epoch=5", "--grace_s=2", f"--logdir={tmp_path}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    read_until(process, "Epoch 1/2", timeout=120)
    time.sleep(1)  # inside the first 4-second step
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143
    assert time.monotonic() - sent < 3
    assert "did not finish within --grace_s=2" in error_lines(err)[-1]
    assert "did not finish" in (only_run_dir(tmp_path, "batch") / "INTERRUPTED").read_text()


# --- the checkpoints themselves, in this process ---------------------------------------

class StopAt(keras.callbacks.Callback):
    """Asks for a stop, as the CLI's SIGTERM handler does, at the end of one step."""

    def __init__(self, epoch, step):
        super().__init__()
        self.at, self.epoch = (epoch, step), 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch + 1) == self.at:
            scale_out.STOP.signum = signal.SIGTERM


def tiny_fit(folder, data, every_steps, stop_at=None):
    """Two epochs of 10 steps through fit_from, continuing what `folder` holds."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    checkpoint, saved = scale_out.latest_checkpoint(folder)
    if checkpoint:
        scale_out.restore(model, checkpoint)
    x, y = data
    callbacks = [StopAt(*stop_at)] if stop_at else []
    history = scale_out.fit_from(
        keras.Model.fit, model,
        lambda e, s: {"x": x[e][s * 8:], "y": y[e][s * 8:], "batch_size": 8}, 2, 10, saved,
        per_epoch=True, shuffle=False, verbose=0,
        callbacks=[*callbacks, scale_out.EpochCheckpoint(folder, every_steps=every_steps)])
    return model, history.history


def test_every_n_steps_checkpoints_keep_two_and_resume_at_the_exact_step(tmp_path):
    rng = np.random.default_rng(0)
    data = ([rng.normal(size=(80, 4)).astype("float32") for _ in range(2)],
            [rng.integers(0, 3, 80) for _ in range(2)])
    unbroken, unbroken_logs = tiny_fit(str(tmp_path / "a"), data, every_steps=3)
    assert sorted(os.listdir(tmp_path / "a")) == [
        "epoch_0001_step_0000009.json", "epoch_0001_step_0000009.keras", "epoch_0002.json",
        "epoch_0002.keras"]  # every 3 steps and at each epoch's end; the last two kept

    folder = str(tmp_path / "b")
    try:
        with pytest.raises(scale_out.Preempted, match="SIGTERM at epoch 2, step 4 of 10"):
            tiny_fit(folder, data, every_steps=3, stop_at=(1, 4))
    finally:
        scale_out.STOP.signum = None
    checkpoint, saved = scale_out.latest_checkpoint(folder)
    assert checkpoint.endswith("epoch_0001_step_0000004.keras")
    assert (saved["epochs_done"], saved["step"]) == (1, 4)
    resumed, resumed_logs = tiny_fit(folder, data, every_steps=3)
    for a, b in zip(unbroken.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # the resumed epoch's logs are the means over its 10 steps, as the unbroken run's
    assert resumed_logs["loss"] == pytest.approx(unbroken_logs["loss"][-1:], rel=1e-5)
    assert resumed_logs["accuracy"] == pytest.approx(unbroken_logs["accuracy"][-1:], abs=1e-6)


def test_a_damaged_checkpoint_is_passed_over_and_all_damaged_is_one_error(tmp_path, capsys):
    for name in ("epoch_0001", "epoch_0001_step_0000005"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"epochs_done": 1, "state": {}}))
        with zipfile.ZipFile(tmp_path / f"{name}.keras", "w") as archive:
            archive.writestr("model.weights.h5", b"x" * 1000)
    newest = tmp_path / "epoch_0001_step_0000005.keras"
    data = bytearray(newest.read_bytes())
    data[40:60] = b"\0" * 20  # bit rot inside the stored file: its CRC fails
    newest.write_bytes(bytes(data))
    path, saved = scale_out.latest_checkpoint(str(tmp_path))
    assert path == str(tmp_path / "epoch_0001.keras") and saved["step"] == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: checkpoint {newest} is damaged")
    (tmp_path / "epoch_0001.keras").write_bytes(b"cut")
    with pytest.raises(RuntimeError, match="every checkpoint in .* is damaged"):
        scale_out.latest_checkpoint(str(tmp_path))


def test_a_run_split_into_fits_writes_one_event_file_per_split(tmp_path):
    # Keras opens new writers at every fit: a file per epoch, which TensorBoard reads in name
    # order (one process's ...12.v2 before its ...2.v2 in the same second: steps misordered).
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)).astype("float32"), rng.integers(0, 3, 40)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    board = keras.callbacks.TensorBoard(str(tmp_path / "logs"))
    for until in (2, 4):  # two calls, as mixed_precision's Trainee makes, of per-epoch fits
        scale_out.fit_from(keras.Model.fit, model,
                           lambda e, s: {"x": x, "y": y, "batch_size": 8}, 4, 5,
                           {"epochs_done": until - 2, "step": 0}, [board], per_epoch=True,
                           until=until, validation_data=(x, y), shuffle=False, verbose=0)
    for split in ("train", "validation"):
        assert len(list((tmp_path / "logs" / split).glob("events.out.tfevents.*"))) == 1, split
        assert read_tensorboard_steps(tmp_path / "logs" / split)["epoch_loss"] == [0, 1, 2, 3]


def test_epochs_too_short_to_save_each_skip_theirs_but_the_last_saves(tmp_path, monkeypatch):
    # Saves "cost" 1 s each: an epoch ending within 1 / COST_SHARE = 20 s of the last save
    # skips its own; the run's last epoch saves whatever the cost.
    saver = scale_out.EpochCheckpoint(str(tmp_path))
    saver.set_params({"epochs": 3, "steps": 5})
    saved = []

    def save(epochs_done, step, partial):  # what save() records, without writing
        saved.append(epochs_done)
        saver.cost, saver.saved_at = 1.0, time.monotonic()

    monkeypatch.setattr(saver, "save", save)
    for epoch in range(3):
        saver.on_epoch_end(epoch)
    assert saved == [1, 3]  # the first (no save timed yet), the last; not the second
    saver.every_steps = 10  # --checkpoint_every_steps: every epoch's end saves
    saver.on_epoch_end(0)
    assert saved == [1, 3, 1]


class StopAfterEpochEnd(keras.callbacks.Callback):
    """A signal that lands after the checkpoint callback's epoch end, before fit returns."""

    def on_epoch_end(self, epoch, logs=None):
        scale_out.STOP.signum = signal.SIGTERM


def test_a_signal_after_an_epoch_that_skipped_its_save_saves_that_epochs_end(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)).astype("float32"), rng.integers(0, 3, 40)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    saver = scale_out.EpochCheckpoint(str(tmp_path))
    saver.cost = 1e9  # saves "take" so long that the epoch's end passes its save over
    try:
        with pytest.raises(scale_out.Preempted) as stop:
            scale_out.fit_from(keras.Model.fit, model,
                               lambda e, s: {"x": x, "y": y, "batch_size": 8}, 3, 5,
                               dict(scale_out.NOTHING_SAVED), [saver, StopAfterEpochEnd()],
                               per_epoch=True, shuffle=False, verbose=0)
    finally:
        scale_out.STOP.signum = None
    assert "SIGTERM at epoch 2, step 0 of 5" in str(stop.value)
    assert stop.value.checkpoint == str(tmp_path / "epoch_0001.keras")  # saved, not claimed
    assert scale_out.latest_checkpoint(str(tmp_path))[1]["epochs_done"] == 1
