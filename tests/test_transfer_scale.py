"""transfer under --strategy and --resume: a killed run continues after its last finished
epoch in either phase, never recomputes cached features it had written, and keeps one
TensorBoard point per epoch; mirrored and two-worker runs train both phases."""
import json
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

from helpers import (ENV, REPO, epochs_printed, interrupted_at, only_run_dir,
                     read_tensorboard_steps, read_tensorboard_tags, read_until, run_cli,
                     run_two_workers, start_cli, stop_with_signal)
from experiments import transfer
from experiments.scale_out import EpochCheckpoint, latest_checkpoint
from recipes import transfer as dropin

TINY = ["--recipe=transfer", "--weights=none", "--image_size=32", "--batch_size=8",
        "--dense_units=16", "--steps_per_epoch=4"]


# (where the kill lands, the flags, the epoch the resumed run continues after)
KILLS = {
    # (a kill inside an epoch, resumed from the one before it, is batch's, mixed_precision's
    # and prune's test too, through the same kit: here, what transfer adds)
    # phase 1 (cached features) finished and checkpointed, phase 2 started: phase 2 runs
    # again from its start, on features read back, not extracted again
    "between_phases": ("Epoch 4/5", ["--cache_features"], 3),
    # (a kill in phase 2, after its checkpoint: the SIGTERM test below resumes in phase 2,
    # phase 1 skipped)
}


@pytest.mark.parametrize("where", sorted(KILLS))
def test_killed_run_resumes_after_its_last_finished_epoch_in_either_phase(where, tmp_path):
    kill_at, flags, done = KILLS[where]
    command = [*TINY, *flags, "--epochs=3", "--fine_tune_epochs=2", f"--logdir={tmp_path}"]
    first = start_cli(*command)
    before_kill = "".join(read_until(first, kill_at))
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    run_dir = only_run_dir(tmp_path, "transfer")
    assert not (run_dir / "metrics.json").exists()
    if "--cache_features" in flags:
        assert "[feature extraction] estimated" in before_kill
        assert (run_dir / "checkpoints" / "features.npz").is_file()

    second = run_cli(*command, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert only_run_dir(tmp_path, "transfer") == run_dir  # the same folder, continued
    assert f"at epoch {done + 1}, step 0 of 4 from" in second.stdout
    total = 5
    phase1_left = [f"{e}/3" for e in range(done + 1, 4)]
    phase2_left = [f"{e}/5" for e in range(max(done, 3) + 1, total + 1)]
    assert epochs_printed(second.stdout) == phase1_left + phase2_left  # the unfinished ones
    assert "[feature extraction]" not in second.stdout  # never extracted twice
    if where == "between_phases":
        assert "features read back from" in second.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("val_accuracy_phase1", "val_accuracy_phase2", "base_epoch_s"):
        assert np.isfinite(metrics[key]), key  # measured before the kill, carried over
    assert metrics["best_val_accuracy"] >= metrics["val_accuracy_phase2"]
    assert metrics["best_epoch"] in range(total)
    assert (run_dir / "final.keras").is_file() and (run_dir / "best.keras").is_file()
    assert not (run_dir / "checkpoints").exists()  # removed once the run is done
    train_log = run_dir / "train_log" / "train"
    assert read_tensorboard_steps(train_log)["epoch_loss"] == list(range(total))  # each once


def test_sigterm_in_each_phase_saves_that_step_and_resume_goes_on_from_it(tmp_path):
    command = [*TINY, "--steps_per_epoch=40", "--epochs=2", "--fine_tune_epochs=1",
               f"--logdir={tmp_path}"]
    stops = []
    for phase, epoch_at, marker in ((1, 1, "Epoch 1/2"), (2, 3, "Epoch 3/3")):  # then resumed
        code, out, err, seconds = stop_with_signal(command + ["--resume"] * (phase - 1),
                                                   marker, signal.SIGTERM)
        assert code == 143 and seconds < 25, err[-3000:]
        run_dir = only_run_dir(tmp_path, "transfer")
        name, epoch, step = interrupted_at(run_dir)
        assert (name, epoch) == ("SIGTERM", epoch_at) and 0 < step < 40, (phase, epoch, step)
        assert (run_dir / "checkpoints" / f"phase{phase}"
                / f"epoch_{epoch_at - 1:04d}_step_{step:07d}.keras").exists()
        stops.append(step)
    assert f"Resuming phase 1, head through the frozen base at epoch 1, step {stops[0]} of 40" in out
    last = run_cli(*command, "--resume")
    assert last.returncode == 0, last.stderr[-3000:]
    assert f"Resuming phase 2, fine-tuning block5 at epoch 3, step {stops[1]} of 40" in last.stdout
    assert "phase 1: finished in an earlier run" in last.stdout
    assert epochs_printed(last.stdout) == ["3/3"]
    assert read_tensorboard_steps(run_dir / "train_log" / "train")["epoch_loss"] == [0, 1, 2]
    assert (run_dir / "final.keras").is_file() and not (run_dir / "checkpoints").exists()


def tiny_config(**overrides):
    values = dict(weights="none", image_size=32, epochs=1, batch_size=8, dense_units=16,
                  warmup_steps=0)
    return transfer.Config(**{**values, **overrides})


def test_phase2_checkpoint_restores_weights_and_adam_state_after_the_new_compile(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(16, 32, 32, 3)).astype(np.float32), np.arange(16) % 3
    ds = transfer.make_dataset(x, y, 8, seed=0)

    def phase2_model(seed):
        keras.utils.set_random_seed(seed)
        base = transfer.load_vgg16("none", 32)
        model, _, _ = dropin.build_model(base, 3, dense_units=16)
        dropin.unfreeze_last_block(base)
        return model

    trained = phase2_model(0)
    transfer.fit_phase(trained, ds, ds, "phase 2", 2, 1, 1e-3, 2, tiny_config(),
                       [EpochCheckpoint(str(tmp_path))])
    resume = latest_checkpoint(str(tmp_path))
    assert resume[1]["epochs_done"] == 2

    restored = phase2_model(1)  # other initial weights: everything must come from the file
    logs, _ = transfer.fit_phase(restored, ds, ds, "phase 2", 2, 1, 1e-3, 2, tiny_config(),
                                 [], resume=resume)  # nothing left to train
    assert logs["val_accuracy"] == resume[1]["logs"]["val_accuracy"]
    for a, b in zip(trained.weights, restored.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert int(restored.optimizer.iterations.numpy()) == 2
    assert len(restored.optimizer.variables) == len(trained.optimizer.variables)
    for a, b in zip(trained.optimizer.variables, restored.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


MIRRORED_ON_TWO_CPUS = """
import json, numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
from experiments import transfer
rng = np.random.default_rng(0)
x = rng.uniform(size=(48, 32, 32, 3)).astype("float32"); y = np.arange(48) % 3
cfg = transfer.Config(weights="none", image_size=32, epochs=1, fine_tune_epochs=1, batch_size=8,
                      dense_units=16, warmup_steps=0, cache_features=True, learning_rate=1e-3)
m = transfer.run(cfg, "logs", ((x[:32], y[:32]), (x[32:], y[32:])), strategy=strategy)
print(json.dumps(m))
"""


def test_mirrored_run_on_two_replicas_scales_batch_and_learning_rate(tmp_path):
    # The experiment called from Python (not main.py), with a MirroredStrategy over two
    # logical CPUs: two real replicas. In a process of its own: the logical CPUs must be
    # set before TensorFlow starts.
    result = subprocess.run([sys.executable, "-c", MIRRORED_ON_TWO_CPUS], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300,
                            env={**ENV, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 replica(s)" in result.stdout
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["replicas"] == 2 and np.isfinite(metrics["val_accuracy_phase2"])
    logs = tmp_path / "logs"
    rates = read_tensorboard_tags(logs / "train_log" / "train")["epoch_learning_rate"]
    assert rates == pytest.approx([2e-3, 2e-3 / 30], rel=1e-3)  # 1e-3 x 2 replicas
    # 32 images at 8 per replica x 2: two steps per epoch (per replica it would be four)
    assert "2/2 - " in result.stdout and "4/4 - " not in result.stdout
    assert keras.models.load_model(logs / "final.keras").count_params() == metrics["total_params"]


def test_multi_worker_trains_both_phases_on_two_local_workers(tmp_path):
    results = run_two_workers(lambda index: [
        *TINY, "--strategy=multi_worker", "--cache_features", "--epochs=1",
        "--fine_tune_epochs=1", "--steps_per_epoch=2", f"--logdir={tmp_path / f'runs{index}'}"])
    for code, out, err in results:
        assert code == 0, err[-3000:]
        assert "x 2 replica(s)" in out
    run_dir = only_run_dir(tmp_path / "runs0", "transfer")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["replicas"] == 2
    for key in ("val_accuracy_phase1", "val_accuracy_phase2"):
        assert np.isfinite(metrics[key]), key
    assert not (tmp_path / "runs1").exists()  # only the chief writes a run folder
    tags = read_tensorboard_tags(run_dir / "train_log" / "validation")
    assert len(tags["epoch_accuracy"]) == 2  # both phases on the chief's timeline
