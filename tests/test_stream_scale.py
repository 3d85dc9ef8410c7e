"""The stream recipe scaled out and resumed: --strategy (tf.data only) and --resume."""
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import (ENV, REPO, epochs_printed, error_lines, interrupted_at, only_run_dir,
                     read_tensorboard_steps, read_tensorboard_tags, read_until, run_cli,
                     run_two_workers, start_cli, stop_with_signal)
from test_stream import SIZE, TINY, write_tree


@pytest.fixture(scope="module")
def stream():
    from experiments import stream
    return stream


def stream_cli(root, logdir, *args):
    return ["--recipe=stream", "--dataset=directory", f"--data_dir={root}", "--batch_size=2",
            f"--image_size={SIZE}", "--input_batches=3", "--warmup_steps=1", f"--logdir={logdir}",
            *args]


def test_killed_compare_run_resumes_tf_data_and_keeps_the_finished_generator(tmp_path):
    # 80 training images in steps of 2: an epoch takes about half a second, long enough to
    # stop the run inside the epoch we aim at.
    root = write_tree(tmp_path / "data", per_class=50)
    # --checkpoint_every_steps: every epoch's end saves (on the auto interval an epoch this
    # short, under 20 saves' time, passes its save over), and no step within one does.
    args = stream_cli(root, tmp_path / "runs", "--compare", "--epochs=4",
                      "--checkpoint_every_steps=1000")
    first = start_cli(*args)
    read_until(first, "training with --loader=tf_data")
    read_until(first, "Epoch 3/4")  # tf_data's epochs 1 and 2 are finished and checkpointed
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    run_dir = only_run_dir(tmp_path / "runs", "stream")
    assert not (run_dir / "metrics.json").exists()
    generator = json.loads((run_dir / "generator" / "result.json").read_text())
    saved = json.loads((run_dir / "checkpoints" / "tf_data" / "epoch_0002.json").read_text())

    second = run_cli(*args, "--resume")
    assert second.returncode == 0, second.stderr[-2000:]
    out = second.stdout
    assert "--loader=generator: finished in an earlier run, kept" in out
    assert "Found " not in out  # the generator's folders were not even listed again
    assert "Resuming --loader=tf_data at epoch 3, step 0 of 40" in out
    assert epochs_printed(out) == ["3/4", "4/4"]
    assert only_run_dir(tmp_path / "runs", "stream") == run_dir  # the same folder, continued
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert all(metrics[f"generator_{key}"] == value for key, value in generator.items())
    # tf.data's input was measured before the kill, not again after it
    assert metrics["tf_data_input_images_per_sec"] == saved["state"]["input"][
        "input_images_per_sec"]
    assert all(f"tf_data_epoch{i}_images_per_sec" in metrics for i in (1, 2, 3, 4))
    # the speedup holds the kept generator's rate against the resumed tf.data's
    assert metrics["speedup"] == pytest.approx(metrics["tf_data_train_images_per_sec"]
                                               / generator["train_images_per_sec"])
    for loader in ("generator", "tf_data"):  # the full history, one point per epoch
        assert read_tensorboard_steps(run_dir / loader / "train")["epoch_loss"] == [0, 1, 2, 3]
    assert not (run_dir / "checkpoints").exists()


def test_sigterm_mid_epoch_saves_that_step_and_resume_runs_the_rest_of_the_epoch(tmp_path):
    # 80 steps an epoch; the signal lands in epoch 1, whose first step also compiles.
    root = write_tree(tmp_path / "data", per_class=100)
    args = stream_cli(root, tmp_path / "runs", "--epochs=2")
    code, _, err, seconds = stop_with_signal(args, "Epoch 1/2", signal.SIGTERM, delay=0.2)
    assert code == 143 and seconds < 25, err[-2000:]
    run_dir = only_run_dir(tmp_path / "runs", "stream")
    name, epoch, step = interrupted_at(run_dir)
    assert (name, epoch) == ("SIGTERM", 1) and 0 < step < 80, (epoch, step)
    assert (run_dir / "checkpoints" / "tf_data" / f"epoch_0000_step_{step:07d}.keras").exists()

    second = run_cli(*args, "--resume")
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"Resuming --loader=tf_data at epoch 1, step {step} of 80" in second.stdout
    assert epochs_printed(second.stdout) == ["1/2", "2/2"]
    assert read_tensorboard_steps(run_dir / "tf_data" / "train")["epoch_loss"] == [0, 1]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # the stopped epoch's steps before and after the signal make one epoch
    assert "tf_data_epoch2_images_per_sec" in metrics
    assert "tf_data_epoch3_images_per_sec" not in metrics


def test_a_run_killed_after_its_last_epoch_reports_the_checkpoints_numbers(
        stream, tmp_path, capsys, monkeypatch):
    root = write_tree(tmp_path / "data")
    config = stream.Config(**{**TINY, "epochs": 2})

    def killed(path, payload):  # as if the run died after its last checkpoint
        raise OSError("killed before the result was written")

    with monkeypatch.context() as patch:
        patch.setattr(stream, "save_json", killed)
        with pytest.raises(OSError, match="killed before"):
            stream.run(config, str(tmp_path / "run"), (root, None))
    _, saved = stream.latest_checkpoint(str(tmp_path / "run" / "checkpoints" / "tf_data"))
    assert saved["epochs_done"] == 2
    capsys.readouterr()

    metrics = stream.run(config, str(tmp_path / "run"), (root, None))
    out = capsys.readouterr().out
    assert "Resuming --loader=tf_data at epoch 3, step 0 of" in out and not epochs_printed(out)
    assert metrics["tf_data_val_accuracy"] == pytest.approx(saved["logs"]["val_accuracy"])
    assert metrics["tf_data_step_time_ms_p50"] > 0  # from the killed run's step timings
    assert len(read_tensorboard_tags(tmp_path / "run" / "tf_data" / "train")["epoch_loss"]) == 2


def test_the_generator_under_a_strategy_is_a_one_line_error(stream, tmp_path):
    import tensorflow as tf
    root = write_tree(tmp_path / "data")
    mirrored = tf.distribute.MirroredStrategy()
    for config in (stream.Config(compare=True, **TINY), stream.Config(loader="generator", **TINY)):
        with pytest.raises(ValueError, match=r"tf\.data loader only.*--loader=tf_data") as error:
            stream.run(config, str(tmp_path / "run"), (root, None), strategy=mirrored)
        assert "\n" not in str(error.value)
        assert not (tmp_path / "run").exists()  # refused before anything was written
        stream.check(config, (root, None))  # no strategy, or the default one: fine
        stream.check(config, (root, None), strategy=tf.distribute.get_strategy())
    stream.check(stream.Config(**TINY), (root, None), strategy=mirrored)  # tf.data: fine
    # and from the command line, which hands check() the strategy: exit 2, no run folder
    result = run_cli(*stream_cli(root, tmp_path / "runs", "--strategy=mirrored", "--compare"))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "tf.data loader only" in lines[0], lines
    assert not list((tmp_path / "runs").glob("stream/*"))


TWO_CPU_REPLICAS = """
import sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from experiments import stream
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
m = stream.run(stream.Config(epochs=2, batch_size=2, image_size=32, warmup_steps=1,
                             input_batches=2), sys.argv[2], (sys.argv[1], None),
               strategy=strategy)
print("METRICS", m["replicas"], m["train_images"], m["tf_data_val_accuracy"])
"""


def test_mirrored_on_two_replicas_takes_full_global_batches_with_keras_fit(tmp_path):
    root = write_tree(tmp_path / "data", per_class=7)  # 11 training images, 3 validation
    result = subprocess.run([sys.executable, "-c", TWO_CPU_REPLICAS, str(root),
                             str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True,
                            timeout=240, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "METRICS 2 11" in out
    assert "2 steps/epoch of 2 x 2 replica(s)" in out  # 11 // 4: the partial batch is dropped
    assert "learning rate 2.00e-03" in out  # 1e-3 x 2 replicas
    assert [line.split()[0] for line in out.splitlines() if "/step - " in line] == ["2/2", "2/2"]
    assert len(read_tensorboard_tags(tmp_path / "run" / "tf_data" / "validation")[
        "epoch_accuracy"]) == 2


def test_multi_worker_trains_tf_data_on_two_local_workers(tmp_path):
    root = write_tree(tmp_path / "data", per_class=8)
    results = run_two_workers(lambda index: stream_cli(
        root, tmp_path / f"runs{index}", "--strategy=multi_worker", "--epochs=2"))
    for code, out, err in results:
        assert code == 0, err[-2000:]
        assert "x 2 replica(s)" in out
        assert epochs_printed(out) == ["1/2", "2/2"]  # both ran every step: none hung
    run_dir = only_run_dir(tmp_path / "runs0", "stream")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["replicas"] == 2 and np.isfinite(metrics["tf_data_val_accuracy"])
    assert not (tmp_path / "runs1").exists()  # only the chief writes a run folder
    assert len(read_tensorboard_tags(run_dir / "tf_data" / "validation")["epoch_accuracy"]) == 2
