"""Shared test helpers: run the CLI in a subprocess, make tiny data, read TensorBoard."""
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Quiet TensorFlow's C++ logs in subprocesses; tests read stderr for one-line errors.
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def run_cli(*args, cwd=REPO, timeout=300, env=None):
    """`python main.py ARGS` -> CompletedProcess with text stdout/stderr."""
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env or ENV)


def error_lines(stderr):
    """stderr minus TensorFlow/absl start-up logging: what the user's error is."""
    noise = ("WARNING: All log messages", "I0000", "W0000", "E0000")
    return [line for line in stderr.splitlines()
            if line.strip() and not line.startswith(noise)
            and "rebuild TensorFlow with the appropriate compiler flags" not in line
            and not line.startswith("To enable the following instructions")]


def run_dropin(recipe_file, script, tmp_path, timeout=300, env=None):
    """Copies one recipe file alone into an empty dir and runs `script` there.

    The repository is not importable from there (cwd and PYTHONPATH point at
    the empty dir only), so this proves the file is drop-in.
    """
    workdir = tmp_path / "dropin"
    workdir.mkdir()
    shutil.copy(REPO / "recipes" / recipe_file, workdir / recipe_file)
    run_env = {**(env or ENV), "PYTHONPATH": str(workdir)}
    return subprocess.run([sys.executable, "-c", script], cwd=workdir, capture_output=True,
                          text=True, timeout=timeout, env=run_env)


def read_tensorboard_tags(event_dir):
    """{tag: [values]} of scalar-like summaries in one TensorBoard run folder.

    Keras 3 writes scalars as tensor summaries (`Tags()['tensors']`); tf.summary
    scalars written by recipes land there too.
    """
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(event_dir), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        values = [tf.make_ndarray(e.tensor_proto) for e in acc.Tensors(tag)]
        if all(v.dtype.kind in "fiu" and v.size == 1 for v in values):  # not text summaries
            out[tag] = [float(v) for v in values]
    for tag in acc.Tags()["scalars"]:
        out[tag] = [e.value for e in acc.Scalars(tag)]
    return out


def only_run_dir(logdir, recipe):
    """The single run folder a test's CLI call created under logdir/recipe."""
    runs = sorted((pathlib.Path(logdir) / recipe).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture
def tiny_images():
    """((x_train, y_train), (x_val, y_val)): 60 + 20 generated 28x28 gray shapes."""
    from datasets import shapes
    return shapes.load(60, 20, image_size=28, channels=1, seed=0)
