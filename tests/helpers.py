"""Shared test helpers: run the CLI in a subprocess, make tiny data, read TensorBoard.

Tests import them (`from helpers import run_cli`); conftest.py holds only fixtures."""
import contextlib
import gzip
import json
import os
import pathlib
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Generated data sets are drawn once for the whole suite, not into the user's own cache
# (CI sets its own folder).
os.environ.setdefault("KERAS_GPU_RECIPES_CACHE",
                      os.path.join(tempfile.gettempdir(), "keras-gpu-recipes-test-cache"))
# Subprocesses see what a user sees: main.py quiets TensorFlow's C++ start-up itself unless
# TF_CPP_MIN_LOG_LEVEL is set (cli/quiet.py), so the tests leave it unset.
ENV = {**{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
       "PYTHONUNBUFFERED": "1"}


def run_cli(*args, cwd=REPO, timeout=300, env=None):
    """`python main.py ARGS` -> CompletedProcess with text stdout/stderr."""
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env or ENV)


def error_lines(stderr):
    """stderr minus TensorFlow/absl start-up logging: what the user's error is."""
    noise = ("WARNING: All log messages", "I0000", "W0000", "E0000",
             "INFO: Created TensorFlow Lite XNNPACK delegate")  # TFLite's, at each interpreter
    return [line for line in stderr.splitlines()
            if line.strip() and not line.startswith(noise)
            and "rebuild TensorFlow with the appropriate compiler flags" not in line
            and not line.startswith("To enable the following instructions")]


def block_packages(folder, names):
    """Packages in folder that fail to import. With folder first on PYTHONPATH, a run
    proves it needs none of them (as on a machine without them)."""
    for name in names:
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} blocked')")


def block_tensorflow(folder):
    """A `tensorflow` that fails to import: a run proves it needs no TensorFlow (as on a
    JAX-only machine)."""
    block_packages(folder, ("tensorflow",))


def run_dropin(recipe_file, script, tmp_path, timeout=300, env=None, without_tensorflow=False,
               blocked=()):
    """Copies one recipe file alone into an empty dir and runs `script` there.

    The repository is not importable from there (cwd and PYTHONPATH point at
    the empty dir only), so this proves the file is drop-in. `blocked` names
    packages that fail to import there.
    """
    workdir = tmp_path / "dropin"
    workdir.mkdir()
    if without_tensorflow:
        block_tensorflow(workdir)
    block_packages(workdir, blocked)
    shutil.copy(REPO / "recipes" / recipe_file, workdir / recipe_file)
    run_env = {**(env or ENV), "PYTHONPATH": str(workdir)}
    return subprocess.run([sys.executable, "-c", script], cwd=workdir, capture_output=True,
                          text=True, timeout=timeout, env=run_env)


def copy_example(recipe_file):
    """The code of a drop-in file's `Copy:` section (its docstring lines indented 12
    spaces after `Copy:`), dedented: what a user pastes, and what its drop-in test runs."""
    import ast
    doc = ast.get_docstring(ast.parse((REPO / "recipes" / recipe_file).read_text()), clean=False)
    lines = doc[doc.index("Copy:"):].splitlines()[1:]
    code = [line[12:] for line in lines if line.startswith(" " * 12)]
    assert code, f"recipes/{recipe_file}: no code in its Copy: section"
    return "\n".join(code) + "\n"


def run_copy_example(recipe_file, tmp_path, setup, check="", backend="jax", **kwargs):
    """Runs the file's Copy: code alone in an empty folder (run_dropin): `setup` makes
    what the code names (model, x, y, ...), `check` asserts on what it left. On JAX,
    TensorFlow is blocked unless kwargs say otherwise."""
    kwargs.setdefault("without_tensorflow", backend == "jax")
    module = pathlib.Path(recipe_file).stem
    script = f"from {module} import *\n{setup}\n{copy_example(recipe_file)}\n{check}\n"
    return run_dropin(recipe_file, script, tmp_path,
                      env={**ENV, "KERAS_BACKEND": backend, **kwargs.pop("env", {})}, **kwargs)


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


def write_idx_gz(path, magic, dims, payload):
    """An idx file as MNIST publishes it: big-endian magic, dimensions, then bytes."""
    header = struct.pack(">II", magic, dims[0]) + b"".join(struct.pack(">I", d) for d in dims[1:])
    with gzip.open(path, "wb") as f:
        f.write(header + payload)


def write_idx_set(folder, n_train=6, n_test=4):
    """A random MNIST-format set (train and t10k) in folder; returns {split: (images, labels)}."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx_gz(folder / f"{split}-images-idx3-ubyte.gz", 2051, images.shape, images.tobytes())
        write_idx_gz(folder / f"{split}-labels-idx1-ubyte.gz", 2049, labels.shape, labels.tobytes())
        arrays[split] = (images, labels)
    return arrays


def free_ports(n=1):
    """n distinct ports on 127.0.0.1 that nothing listens on now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read()
        if response.headers.get("Content-Encoding") == "gzip":  # the profile plugin gzips
            body = gzip.decompress(body)
        return json.loads(body)


@contextlib.contextmanager
def tensorboard_server(logdir):
    """The real `tensorboard` on 127.0.0.1 at a free port; yields a `get(path)` that
    waits up to 60 s for it to answer, and stops the server afterwards."""
    port = free_ports()[0]
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", f"--logdir={logdir}",
                               "--host=127.0.0.1", f"--port={port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)

    def get(path):
        deadline = time.monotonic() + 60
        while True:
            try:
                return get_json(f"http://127.0.0.1:{port}{path}")
            except OSError:  # not listening yet
                assert server.poll() is None, "tensorboard exited early"
                assert time.monotonic() < deadline, "tensorboard did not answer within 60 s"
                time.sleep(0.5)

    get.base_url = f"http://127.0.0.1:{port}"
    try:
        yield get
    finally:
        server.terminate()
        server.wait(timeout=30)


def assert_median_throughput(metrics, rate_key, p50_key, examples_per_step):
    """A rate must be examples per step over the median step time (README), within 3%,
    not examples over total time, a mean that hides stalls."""
    expected = examples_per_step / (metrics[p50_key] / 1000)
    assert abs(metrics[rate_key] / expected - 1) <= 0.03, (rate_key, metrics[rate_key], expected)


def load_benchmark(name):
    """benchmarks/NAME.py as a module of its own name (not the recipe of the same name)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}",
                                                  REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_tensorboard_steps(event_dir):
    """{tag: [steps]} of scalar-like summaries in one TensorBoard run folder, in file order:
    a resumed run that logged an epoch twice shows its step twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(event_dir), size_guidance={"tensors": 0, "scalars": 0},
                           purge_orphaned_data=False)  # show duplicates, never hide them
    acc.Reload()
    out = {tag: [e.step for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}
    out.update({tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]})
    return out


def run_two_workers(args_for, timeout=240):
    """`python main.py` twice as a MultiWorkerMirroredStrategy cluster on 127.0.0.1 (free
    ports, worker 0 the chief); args_for(index) gives each worker's arguments. Returns
    [(returncode, stdout, stderr)] once both ended; neither outlives `timeout`."""
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workers = []
    for index in range(2):
        env = {**ENV, "TF_CONFIG": json.dumps({"cluster": cluster,
                                               "task": {"type": "worker", "index": index}})}
        workers.append(subprocess.Popen(
            [sys.executable, str(REPO / "main.py"), *args_for(index)], cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    try:
        outputs = [w.communicate(timeout=timeout) for w in workers]
    finally:
        for w in workers:
            w.kill()
    return [(w.returncode, out, err) for w, (out, err) in zip(workers, outputs)]


def epochs_printed(stdout):
    """The N/M of each of Keras' own `Epoch N/M` progress lines, in order."""
    return [line.split()[1] for line in stdout.splitlines() if line.startswith("Epoch ")]


def start_cli(*args, env=None, **popen):
    """`python main.py ARGS` started, its stdout and stderr piped as text."""
    return subprocess.Popen([sys.executable, str(REPO / "main.py"), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or ENV, **popen)


def read_until(process, marker, timeout=240):
    """Lines of stdout up to and including the first that contains `marker`."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            return lines
    process.kill()
    raise AssertionError(f"never saw {marker!r}; got {lines[-5:]}")


def stop_with_signal(args, marker, signum, delay=0.3, env=None, timeout=60):
    """Runs the CLI, sends `signum` `delay` s after the stdout line holding `marker`;
    returns (exit code, stdout, stderr, seconds from the signal to the exit)."""
    process = start_cli(*args, env=env)
    seen = read_until(process, marker)
    time.sleep(delay)
    process.send_signal(signum)
    sent = time.monotonic()
    out, err = process.communicate(timeout=timeout)
    return process.returncode, "".join(seen) + out, err, time.monotonic() - sent


def interrupted_at(run_dir):
    """(signal name, epoch, step) from a run folder's INTERRUPTED marker."""
    import re
    text = (pathlib.Path(run_dir) / "INTERRUPTED").read_text()
    found = re.search(r"(SIG\w+) at epoch (\d+), step (\d+) of", text)
    assert found, text
    return found.group(1), int(found.group(2)), int(found.group(3))
