"""--resume after a SIGKILL or a SIGTERM, and --strategy=data_parallel on JAX, for
mixed_precision and prune.

(batch: tests/test_faults.py and test_preempt.py; transfer and stream: their own test
files.) A resumed run continues in the same folder from its last checkpoint (the last
finished epoch after a SIGKILL, the step a SIGTERM stopped at): it prints only the
epochs it had not finished and leaves one TensorBoard point per epoch.
"""
import json
import signal
import subprocess
import sys

import pytest

from helpers import (ENV, REPO, epochs_printed, interrupted_at, only_run_dir,
                     read_tensorboard_steps, read_tensorboard_tags, read_until, run_cli,
                     start_cli, stop_with_signal)


def policy_epochs(stdout):
    """mixed_precision's own `-- epoch N/M policy` lines, one per epoch of each policy."""
    return [line.strip() for line in stdout.splitlines() if line.startswith("-- epoch ")]


def kill_then_resume(args, logdir, marker, recipe):
    first = start_cli(*args, f"--logdir={logdir}")
    read_until(first, marker)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    run_dir = only_run_dir(logdir, recipe)
    assert not (run_dir / "metrics.json").exists()
    second = run_cli(*args, f"--logdir={logdir}", "--resume", timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert only_run_dir(logdir, recipe) == run_dir  # the same folder, continued
    return run_dir, second.stdout, json.loads((run_dir / "metrics.json").read_text())


def sigterm_then_resume(args, logdir, marker, recipe, delay=0.5):
    """SIGTERM `delay` s after `marker`: exit 143 with a checkpoint at that step; the same
    command with --resume finishes. Returns (run folder, resumed stdout, metrics, epoch,
    step) where epoch (from 1) and step are the marker's."""
    code, _, err, seconds = stop_with_signal([*args, f"--logdir={logdir}"], marker,
                                             signal.SIGTERM, delay=delay)
    assert code == 143, err[-3000:]
    assert seconds < 25
    run_dir = only_run_dir(logdir, recipe)
    name, epoch, step = interrupted_at(run_dir)
    assert name == "SIGTERM" and step > 0, (epoch, step)
    second = run_cli(*args, f"--logdir={logdir}", "--resume", timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert only_run_dir(logdir, recipe) == run_dir  # the same folder, continued
    return (run_dir, second.stdout, json.loads((run_dir / "metrics.json").read_text()), epoch,
            step)


# 30 steps of 64: an epoch takes a second or two here, so the kill lands inside the next.
PRUNE = ["--recipe=prune", "--baseline_epochs=3", "--epochs=4", "--steps_per_epoch=30"]


def test_prune_killed_in_the_baseline_resumes_and_prunes_with_the_whole_schedule(tmp_path):
    # (killed in the fine-tune: the SIGTERM test below resumes there, mid-epoch)
    run_dir, stdout, metrics = kill_then_resume(PRUNE, tmp_path / "runs", "Epoch 2/3", "prune")
    assert epochs_printed(stdout) == ["2/3", "3/3", "1/4", "2/4", "3/4", "4/4"]
    # The schedule's step is the optimizer's: restored, it ends where an unbroken run does
    # and reaches its target; restarted from 0, it would stop short of both.
    assert metrics["finetune_steps"] == 4 * 30 == metrics["pruning_end_step"]
    assert metrics["sparsity_measured"] == pytest.approx(0.8, abs=1e-3)
    for phase, epochs in (("baseline", 3), ("pruned", 4)):
        steps = read_tensorboard_steps(run_dir / phase / "train")["epoch_loss"]
        assert steps == list(range(epochs)), (phase, steps)


def test_prune_sigterm_in_the_fine_tune_resumes_at_that_step_of_the_schedule(tmp_path):
    args = ["--recipe=prune", "--baseline_epochs=1", "--epochs=3"]  # 94 steps of 64
    run_dir, stdout, metrics, epoch, step = sigterm_then_resume(
        args, tmp_path / "runs", "Epoch 2/3", "prune", delay=0.3)
    assert epoch == 2 and step < 94
    assert f"Resuming at epoch 2, step {step} of 94" in stdout
    assert epochs_printed(stdout) == ["2/3", "3/3"]
    # The schedule's step is the optimizer's: it ends where an unbroken run does.
    assert metrics["finetune_steps"] == 3 * 94 == metrics["pruning_end_step"]
    assert metrics["sparsity_measured"] == pytest.approx(0.8, abs=1e-3)
    assert read_tensorboard_steps(run_dir / "pruned" / "train")["epoch_loss"] == [0, 1, 2]


# --checkpoint_every_steps: every epoch's end saves (on the auto interval, epochs this short
# pass their save over), and no step within one does.
MIXED = ["--recipe=mixed_precision", "--policy=mixed_bfloat16", "--compare", "--epochs=3",
         "--steps_per_epoch=12", "--batch_size=32", "--filters=8,8", "--dense_units=8",
         "--checkpoint_every_steps=1000"]


def test_mixed_precision_compare_killed_resumes_both_policies(tmp_path):
    # Epoch 2 runs float32 first (the order alternates), so at this line float32 has
    # finished 2 epochs and mixed_bfloat16 one.
    run_dir, stdout, metrics = kill_then_resume(MIXED, tmp_path / "runs",
                                                "-- epoch 2/3 mixed_bfloat16", "mixed_precision")
    assert policy_epochs(stdout) == [
        "-- epoch 2/3 mixed_bfloat16", "-- epoch 3/3 mixed_bfloat16",
        "-- epoch 3/3 float32 (baseline)"]
    assert "Resuming float32 at epoch 3, step 0 of 12" in stdout
    assert "Resuming mixed_bfloat16 at epoch 2, step 0 of 12" in stdout
    for folder, prefix in (("mixed_bfloat16", ""), ("float32_baseline", "float32_")):
        assert read_tensorboard_steps(run_dir / folder / "train")["epoch_loss"] == [0, 1, 2]
        # the reported accuracy is the last epoch's, trained by the resumed run
        last = read_tensorboard_tags(run_dir / folder / "validation")["epoch_accuracy"][-1]
        assert metrics[prefix + "val_accuracy"] == pytest.approx(last, abs=1e-6)


def test_mixed_precision_sigterm_saves_the_step_and_resume_goes_on_from_it(tmp_path):
    args = ["--recipe=mixed_precision", "--policy=mixed_bfloat16", "--compare", "--epochs=2",
            "--steps_per_epoch=200", "--batch_size=32", "--filters=8,8", "--dense_units=8"]
    # Epoch 2 runs float32 first, then mixed_bfloat16: stopped inside the latter's.
    run_dir, stdout, metrics, epoch, step = sigterm_then_resume(
        args, tmp_path / "runs", "-- epoch 2/2 mixed_bfloat16", "mixed_precision")
    assert epoch == 2 and step < 200
    assert f"Resuming mixed_bfloat16 at epoch 2, step {step} of 200" in stdout
    assert "Resuming float32 at epoch 3, step 0 of 200" in stdout  # float32 had finished
    assert policy_epochs(stdout) == ["-- epoch 2/2 mixed_bfloat16"]
    for folder, prefix in (("mixed_bfloat16", ""), ("float32_baseline", "float32_")):
        assert read_tensorboard_steps(run_dir / folder / "train")["epoch_loss"] == [0, 1]
        # the reported accuracy is the last epoch's: mixed_bfloat16's trained by the resumed run
        last = read_tensorboard_tags(run_dir / folder / "validation")["epoch_accuracy"][-1]
        assert metrics[prefix + "val_accuracy"] == pytest.approx(last, abs=1e-6)


DATA_PARALLEL = """
import json, sys
import keras
import numpy as np
from experiments import batch  # noqa: E402
from experiments import mixed_precision  # noqa: E402
from experiments import prune  # noqa: E402

seen = []
fit = keras.Model.fit

def recording_fit(model, *args, **kwargs):  # where the model's weights live when it trains
    seen.append(len(model.trainable_variables[0].value.sharding.device_set))
    return fit(model, *args, **kwargs)

keras.Model.fit = recording_fit
strategy = keras.distribution.DataParallel(devices=keras.distribution.list_devices())
rng = np.random.default_rng(0)
small = ((rng.uniform(size=(64, 28, 28, 1)).astype("float32"), np.arange(64) % 3),
         (rng.uniform(size=(32, 28, 28, 1)).astype("float32"), np.arange(32) % 3))
out = {}
out["batch"] = batch.run(batch.Config(batch_sizes=(8,), epochs=1, steps_per_epoch=2),
                         sys.argv[1] + "/b", small, strategy=strategy)["replicas"]
out["mixed_precision"] = mixed_precision.run(
    mixed_precision.Config(policy="float32", epochs=1, batch_size=8, steps_per_epoch=2,
                           filters=(8, 8), dense_units=8), sys.argv[1] + "/m", small,
    strategy=strategy)["replicas"]
out["prune"] = prune.run(prune.Config(baseline_epochs=1, epochs=1, batch_size=8,
                                      steps_per_epoch=2), sys.argv[1] + "/p", small,
                         strategy=strategy)["replicas"]
print(json.dumps({"replicas": out, "devices_at_fit": seen}))
"""


def test_data_parallel_on_jax_trains_every_model_across_both_devices(tmp_path):
    env = {**ENV, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run([sys.executable, "-c", DATA_PARALLEL, str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == {"batch": 2, "mixed_precision": 2, "prune": 2}
    # batch, mixed_precision (one fit per epoch), prune (baseline, fine-tune): every model
    # that trained held its weights on both devices.
    assert report["devices_at_fit"] == [2] * len(report["devices_at_fit"])
    assert len(report["devices_at_fit"]) == 4


def test_data_parallel_cli_reports_two_replicas(tmp_path):
    env = {**ENV, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = run_cli("--recipe=batch", "--strategy=data_parallel", "--batch_sizes=8",
                     "--epochs=1", "--steps_per_epoch=3", f"--logdir={tmp_path}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 replica(s)" in result.stdout
    assert json.loads((only_run_dir(tmp_path, "batch") / "metrics.json").read_text())[
        "replicas"] == 2


def test_mirrored_on_jax_is_one_line_exit_2(tmp_path):
    result = run_cli("--recipe=prune", "--strategy=mirrored", f"--logdir={tmp_path}",
                     env={**ENV, "KERAS_BACKEND": "jax"})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: --strategy=mirrored is TensorFlow's (tf.distribute); on "
                     "KERAS_BACKEND=jax use --strategy=data_parallel"]
    assert not (tmp_path / "prune").exists() or not list((tmp_path / "prune").iterdir())
