"""main.py as a user meets it: help, bad input, the run folder, TensorBoard."""
import json
import os
import subprocess
import sys
import time
import urllib.parse

import pytest

from helpers import (ENV, REPO, error_lines, only_run_dir, read_tensorboard_tags, run_cli,
                      tensorboard_server)

import main
from cli import runs
from experiments import RECIPES
from test_bad_input import CASES as BAD_INPUT, make_folders

TINY_BATCH = ["--recipe=batch", "--batch_sizes=8,16", "--epochs=2", "--steps_per_epoch=3"]


def test_help_lists_recipes_without_importing_tensorflow():
    probe = ("import runpy, sys\n"
             "sys.argv = ['main.py', '--help']\n"
             "try:\n    runpy.run_path('main.py', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "print('EXIT', code, 'TF_LOADED', 'tensorflow' in sys.modules)\n")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                            text=True, env=ENV, timeout=60)
    elapsed = time.perf_counter() - start
    assert "EXIT 0 TF_LOADED False" in result.stdout
    for name, (_, summary) in RECIPES.items():
        assert name in result.stdout and summary in result.stdout
    assert elapsed < 5  # a fresh interpreter included; TensorFlow alone takes longer


def test_bare_main_lists_recipes():
    result = run_cli()
    assert result.returncode == 0
    assert all(name in result.stdout for name in RECIPES)


def test_recipe_help_shows_its_config_flags():
    result = run_cli("--recipe=batch", "--help")
    assert result.returncode == 0
    assert "--batch_sizes: batch sizes to sweep" in result.stdout
    assert "--scale_lr: scale the learning rate linearly" in result.stdout
    assert "--epochs" in result.stdout


# End to end in a subprocess (exit code, stderr as a user sees it); the full
# sweep of bad inputs runs in-process in test_bad_input.py.
END_TO_END = ["unknown_recipe", "zero_epochs", "truncated_idx", "unwritable_logdir"]


@pytest.mark.parametrize("case", END_TO_END)
def test_bad_input_is_one_line_error_with_exit_2_and_no_run_folder(case, tmp_path):
    make_folders(tmp_path)
    args, expected = BAD_INPUT[case]
    args = [a.replace("{root}", str(tmp_path)) for a in args]
    if not any(a.startswith("--logdir") for a in args):
        args.append(f"--logdir={tmp_path / 'runs'}")
    result = run_cli(*args)
    lines = error_lines(result.stderr)
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "runs").glob("*/*"))  # no run folder, not even a half-made one


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("logs")
    result = run_cli(*TINY_BATCH, f"--logdir={logdir}")
    assert result.returncode == 0, result.stderr
    return logdir, only_run_dir(logdir, "batch"), result.stdout


def test_run_folder_has_flags_metrics_and_events(finished_run):
    logdir, run_dir, stdout = finished_run
    flags = json.loads((run_dir / "flags.json").read_text())
    assert flags["recipe"] == "batch" and flags["config"]["batch_sizes"] == [8, 16]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best_row = next(line for line in stdout.splitlines() if line.endswith("<- best"))
    assert best_row.split()[0] == str(metrics["best_batch_size"])  # the table marks the same pick
    assert {"examples_per_sec_b8", "step_time_ms_p90_b16", "val_accuracy_b8"} <= set(metrics)
    assert list(run_dir.glob("batch_8/train/events.out.tfevents.*"))
    assert not list(run_dir.glob("*.tmp"))
    tail = stdout.strip().splitlines()[-8:]
    assert any(str(run_dir) in line for line in tail)
    assert tail[-1] == f"See it: tensorboard --logdir {logdir}"


def test_tensorboard_has_epoch_loss_and_accuracy_for_train_and_validation(finished_run):
    _, run_dir, _ = finished_run
    for split in ("train", "validation"):
        tags = read_tensorboard_tags(run_dir / "batch_8" / split)
        assert {"epoch_loss", "epoch_accuracy"} <= set(tags), tags
        assert len(tags["epoch_loss"]) == 2  # one point per epoch
    sweep = read_tensorboard_tags(run_dir / "sweep")
    assert len(sweep["sweep/examples_per_sec"]) == 2  # one point per batch size


def test_tensorboard_server_serves_a_finished_run(finished_run):
    logdir, run_dir, _ = finished_run
    query = urllib.parse.urlencode({"run": f"batch/{run_dir.name}/batch_8/train",
                                    "tag": "epoch_loss"})
    with tensorboard_server(logdir) as get:
        points = get(f"/data/plugin/scalars/scalars?{query}")
    assert [step for _, step, _ in points] == [0, 1]
    logged = read_tensorboard_tags(run_dir / "batch_8" / "train")["epoch_loss"]
    assert [value for _, _, value in points] == pytest.approx(logged)  # the run's own numbers


def test_run_folders_are_unique_within_one_second(tmp_path):
    folders = {runs.make_run_dir(tmp_path) for _ in range(3)}
    assert len(folders) == 3 and all(f.is_dir() for f in folders)


def test_metrics_write_that_fails_leaves_previous_file_and_no_temp(tmp_path):
    target = tmp_path / "metrics.json"
    runs.write_json_atomically(target, {"val_accuracy": 0.5})
    circular = {}
    circular["self"] = circular
    with pytest.raises(ValueError):
        runs.write_json_atomically(target, circular)
    assert json.loads(target.read_text()) == {"val_accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


STARTUP_LINES = ("I0000", "W0000", "E0000", "WARNING: All log messages before absl",
                 "To enable the following instructions")


def test_a_healthy_first_screen_shows_no_tensorflow_startup_lines():
    """TensorFlow prints oneDNN/CPU/CUDA lines while it loads, before any log level
    applies; the CLI keeps them off stderr unless the user asks (--verbose or
    TF_CPP_MIN_LOG_LEVEL)."""
    quiet = run_cli("--recipe=advise", "--help")
    assert quiet.returncode == 0 and "Flags of --recipe=advise" in quiet.stdout
    assert quiet.stderr == "", quiet.stderr[:2000]
    verbose = run_cli("--recipe=advise", "--help", "--verbose")
    assert any(line.startswith(STARTUP_LINES) for line in verbose.stderr.splitlines()), \
        "TensorFlow printed no start-up lines here, so the quiet check above proves nothing"


def test_caught_stderr_keeps_every_line_that_is_not_startup_noise(capfd):
    from cli import quiet
    with quiet.startup():
        os.write(2, b"I0000 00:00:1796436409.939686   23061 port.cc:153] oneDNN custom\n"
                    b"E0000 00:00:1796436409.9 23061 cuda_executor.cc:1] failed call to cuInit\n"
                    b"E0000 00:00:1796436409.9 23061 something.cc:9] a real failure\n"
                    b"a warning of the user's own\n")
    assert capfd.readouterr().err == ("E0000 00:00:1796436409.9 23061 something.cc:9] a real "
                                      "failure\na warning of the user's own\n")


def user_code_error():
    """What TensorFlow raises for a TypeError inside traced code: "in user code:", the
    stack, the cause last."""
    import tensorflow as tf

    loss = "sparse_categorical_crossentropy"  # a loss named by a string, called

    @tf.function
    def step(x):
        return loss(x)

    try:
        step(tf.constant(1.0))
    except TypeError as e:
        return e


def test_a_failure_line_names_the_cause_not_tensorflows_wrapper():
    error = user_code_error()
    assert str(error).startswith("in user code:")  # what the old first-line rule printed
    assert main.one_line(error) == "TypeError: 'str' object is not callable"
    import tensorflow as tf
    try:
        tf.ones((6,)) + tf.ones((6, 3))
    except tf.errors.InvalidArgumentError as e:
        assert main.one_line(e).startswith("Incompatible shapes: [6] vs. [6,3]")


def test_a_keras_warning_is_printed_once_a_run(tmp_path):
    """A model saved with jit_compile=True that XLA cannot compile (RandomZoom): Keras warns
    each time the model is loaded, cloned or compiled; the run shows it once."""
    import keras
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.RandomZoom(0.1),
                              keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"],
                  jit_compile=True)
    model.save(tmp_path / "jit.keras")
    result = run_cli("--recipe=batch", "--batch_sizes=8", "--epochs=1", "--steps_per_epoch=2",
                     f"--model={tmp_path / 'jit.keras'}", f"--logdir={tmp_path / 'runs'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("Model doesn't support `jit_compile=True`") == 1, result.stderr
