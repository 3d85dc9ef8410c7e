"""The `device` recipe: the CPU job in this process without a GPU, else one subprocess per
device; a cost verdict, one-line errors."""
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from helpers import (ENV, REPO, assert_median_throughput, error_lines, only_run_dir,
                     read_tensorboard_tags, run_cli, run_copy_example, write_idx_set)
from experiments import device
from recipes import device as dropin

# The well-known comparison the recipe's reference job comes from.
CPU_S, GPU_S = 70.5, 62.6
PRICES = {"cpu": 0.40, "gpu": 1.20}


def tiny(**overrides):
    return device.Config(**{"devices": "cpu", "epochs": 1, "batch_size": 20,
                            "hidden_units": 16, **overrides})


def fake_nvidia_smi(folder, listing):
    """A folder holding an `nvidia-smi` that prints `listing` for `nvidia-smi -L`: put it
    first on PATH to decide which GPUs the recipe finds, whatever this machine has."""
    folder.mkdir(exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{listing}\nEOF\n")
    script.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def watch_workers(monkeypatch):
    """The CUDA_VISIBLE_DEVICES of every Python process the recipe starts, in order."""
    started, real_run = [], subprocess.run

    def run(args, **kwargs):
        if args[0] == sys.executable:
            started.append((kwargs.get("env") or os.environ).get("CUDA_VISIBLE_DEVICES"))
        return real_run(args, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    return started


def writer_pids(event_dir):
    """The process ids that wrote the TensorBoard event files in a folder: the field after
    the host name in `events.out.tfevents.<time>.<host>.<pid>...`."""
    after_host = f".{socket.gethostname()}."
    return {int(path.name.split(after_host, 1)[1].split(".")[0])
            for path in pathlib.Path(event_dir).glob("events.out.tfevents.*")}


def test_cost_verdict_names_cheaper_device_and_break_even_speedup():
    results = {"cpu": {"wall_time_s": CPU_S}, "gpu:0": {"wall_time_s": GPU_S}}
    lines, metrics = dropin.compare_costs(results, PRICES)
    assert metrics["cheapest_device"] == "cpu"  # 1.13x faster at 3x the price loses
    assert metrics["break_even_speedup"] == pytest.approx(3.0)
    assert metrics["speedup_gpu0_vs_cpu"] == pytest.approx(CPU_S / GPU_S)
    assert metrics["cpu_cost_usd"] == pytest.approx(CPU_S / 3600 * 0.40)
    assert metrics["gpu0_cost_usd"] == pytest.approx(GPU_S / 3600 * 1.20)
    saving = 1 - (CPU_S * 0.40) / (GPU_S * 1.20)
    assert any(f"cpu is cheaper per job by {saving:.0%}" in line for line in lines), lines

    # Four times as fast at three times the price: now the GPU wins.
    results["gpu:0"]["wall_time_s"] = CPU_S / 4
    _, metrics = dropin.compare_costs(results, PRICES)
    assert metrics["cheapest_device"] == "gpu:0"


def test_per_gpu_price_overrides_the_gpu_price():
    prices = dropin.parse_prices("cpu:1,gpu:2,gpu:1:8")
    assert dropin.price_of("gpu:0", prices) == 2 and dropin.price_of("gpu:1", prices) == 8
    results = {"cpu": {"wall_time_s": 10.0}, "gpu:0": {"wall_time_s": 4.0},
               "gpu:1": {"wall_time_s": 4.0}}
    _, metrics = dropin.compare_costs(results, prices)
    assert metrics["break_even_speedup_gpu0"] == pytest.approx(2)
    assert metrics["break_even_speedup_gpu1"] == pytest.approx(8)
    assert metrics["cheapest_device"] == "gpu:0"


def test_without_gpu_the_verdict_states_the_speedup_a_gpu_needs():
    lines, metrics = dropin.compare_costs({"cpu": {"wall_time_s": 12.0}}, PRICES)
    assert metrics["cheapest_device"] == "cpu"
    assert metrics["break_even_speedup"] == pytest.approx(3)
    verdict = " ".join(lines)
    assert "No GPU" in verdict and "more than 3.00x" in verdict and "under 4.00 s" in verdict


def test_a_spot_price_adds_the_job_with_its_checkpoints_at_that_price():
    prices = dropin.parse_prices("cpu:0.40,gpu:1.20,gpu_spot:0.30,gpu_spot:1:0.90")
    assert dropin.price_of("gpu:0", prices, spot=True) == 0.30
    assert dropin.price_of("gpu:1", prices, spot=True) == 0.90
    assert dropin.price_of("cpu", prices, spot=True) is None
    results = {"cpu": {"wall_time_s": CPU_S, "checkpoint_s": 0.5, "epochs": 5},
               "gpu:0": {"wall_time_s": GPU_S, "checkpoint_s": 0.5, "epochs": 5}}
    lines, metrics = dropin.compare_costs(results, prices)
    # 5 epoch-end checkpoints and 2 timed ones (every 30 s of 62.6 s), 0.5 s each
    assert metrics["gpu0_checkpoint_overhead_s"] == pytest.approx(3.5)
    assert metrics["gpu0_spot_cost_usd"] == pytest.approx((GPU_S + 3.5) / 3600 * 0.30)
    assert "cpu_spot_cost_usd" not in metrics  # no cpu_spot price
    assert metrics["cheapest_device"] == "cpu" and metrics["cheapest_option"] == "gpu:0 spot"
    assert any(line.startswith("gpu:0 spot: 62.60 s + 3.50 s of checkpoints (5.6%) at $0.30/h")
               for line in lines), lines

    # A checkpoint that takes 40 s: only the last epoch's is saved (more would cost over 5%),
    # and it alone makes the spot machine dearer than the CPU on demand.
    results["gpu:0"]["checkpoint_s"] = 40.0
    _, metrics = dropin.compare_costs(results, prices)
    assert metrics["gpu0_checkpoint_overhead_s"] == pytest.approx(40)
    assert metrics["cheapest_option"] == "cpu"


def test_job_arithmetic_is_about_2_4_mflop_per_example_and_counts_convolutions():
    job = dropin.build_model((28, 28, 1), 500, 10)
    assert device.train_flops_per_example(job) == pytest.approx(2.4e6, rel=0.01)
    import keras
    conv = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(8, 3, padding="same"),
                             keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4)])
    # 256 output pixels x (3x3x3 inputs -> 8 channels), then 8 -> 4: 6 FLOP per weight use
    assert device.train_flops_per_example(conv) == 6 * (256 * 27 * 8 + 8 * 4)


@pytest.mark.parametrize("text", ["cpu=0.4,gpu=1.2", "cpu:abc,gpu:1", "cpu:0.4", "gpu:1.2",
                                  "tpu:1,cpu:1,gpu:1", "cpu:-1,gpu:1", "cpu:nan,gpu:1", "",
                                  "cpu:1,gpu_spot:1", "cpu:1,gpu:1,tpu_spot:1"])
def test_bad_price_per_hour_is_rejected_naming_the_flag(text):
    with pytest.raises(ValueError, match="--price_per_hour"):
        device.Config(price_per_hour=text)


@pytest.mark.parametrize("text", ["gpu", "cpu,tpu:0", "gpu:x", ""])
def test_bad_devices_is_rejected_naming_the_flag(text):
    with pytest.raises(ValueError, match="--devices"):
        device.Config(devices=text)


def test_bad_price_per_hour_on_the_cli_is_a_one_line_error(tmp_path):
    proc = run_cli("--recipe=device", "--price_per_hour=cpu=0.4", f"--logdir={tmp_path}")
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "--price_per_hour" in lines[0] and "cpu:0.40" in lines[0], lines
    assert not (tmp_path / "device").exists() or not any((tmp_path / "device").iterdir())


def test_with_a_gpu_listed_each_device_runs_in_its_own_subprocess_and_a_failing_one_is_reported(
        tmp_path, tiny_images, monkeypatch):
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "bin", "GPU 0: Fake GPU (UUID: GPU-0)"))
    workers = watch_workers(monkeypatch)
    metrics = device.run(tiny(devices="cpu,gpu:99"), str(tmp_path / "run"), tiny_images)
    run_dir = tmp_path / "run"

    # A GPU is listed, so the CPU job ran in a subprocess that saw no GPU, gpu:99 in one
    # that saw only it; the CPU's curves were written by its worker, not by this process.
    assert workers == ["", "99"]
    pids = writer_pids(run_dir / "cpu" / "train")
    assert pids and os.getpid() not in pids
    # The CPU job ran and was measured, in a subprocess that left its log behind.
    assert_median_throughput(metrics, "cpu_examples_per_sec", "cpu_step_time_ms_p50", 20)
    assert metrics["cpu_first_call_s"] <= metrics["cpu_wall_time_s"] < metrics["cpu_process_time_s"]
    assert metrics["cpu_compute_share"] == pytest.approx(
        metrics["cpu_compute_floor_s"] / metrics["cpu_wall_time_s"])
    assert "loss:" in (run_dir / "cpu.log").read_text()  # the worker's own fit output
    # gpu:99 does not exist here: reported, not fatal, and left out of the verdict.
    assert metrics["devices_failed"] == 1
    assert "gpu:99 is not visible" in metrics["gpu99_error"]
    assert "gpu99_wall_time_s" not in metrics and metrics["cheapest_device"] == "cpu"
    tags = read_tensorboard_tags(run_dir / "hparams" / "cpu")  # the CPU's HParams trial
    assert {"device/wall_time_s", "device/cost_usd", "device/examples_per_sec"} <= set(tags)
    assert tags["device/cost_usd"][0] == pytest.approx(metrics["cpu_cost_usd"], rel=1e-5)
    assert not (run_dir / "hparams" / "gpu99").exists()  # the failed device has no trial
    assert len(read_tensorboard_tags(run_dir / "cpu" / "train")["epoch_loss"]) == 1


def test_without_a_gpu_the_cpu_job_runs_in_this_process_and_logs_like_a_worker(
        tmp_path, tiny_images, monkeypatch):
    if dropin.accelerator_count():
        pytest.skip("the backend sees a GPU here, which the job would run on")
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "bin", "No devices were found"))
    workers = watch_workers(monkeypatch)
    metrics = device.run(tiny(epochs=2, price_per_hour="cpu:0.40,gpu:1.20,cpu_spot:0.12"),
                         str(tmp_path / "run"), tiny_images)
    run_dir = tmp_path / "run"

    assert workers == []  # no Python process was started ...
    assert writer_pids(run_dir / "cpu" / "train") == {os.getpid()}  # ... this one trained
    assert_median_throughput(metrics, "cpu_examples_per_sec", "cpu_step_time_ms_p50", 20)
    assert metrics["cpu_first_call_s"] <= metrics["cpu_wall_time_s"] < metrics["cpu_process_time_s"]
    assert "loss:" in (run_dir / "cpu.log").read_text()  # fit's output went to its log
    assert len(read_tensorboard_tags(run_dir / "cpu" / "train")["epoch_loss"]) == 2
    assert metrics["cpu_cost_usd"] == pytest.approx(
        read_tensorboard_tags(run_dir / "hparams" / "cpu")["device/cost_usd"][0], rel=1e-5)
    # A spot CPU: the job plus its epochs' checkpoints (the last, and the other if 5% of the
    # job allows it), each timed saving the job's model.
    saves = metrics["cpu_checkpoint_overhead_s"] / metrics["cpu_checkpoint_s"]
    assert saves == pytest.approx(1) or saves == pytest.approx(2), saves
    assert metrics["cpu_spot_cost_usd"] == pytest.approx(
        (metrics["cpu_wall_time_s"] + metrics["cpu_checkpoint_overhead_s"]) / 3600 * 0.12)


# main.py as it runs from a shell, which says at exit whether TensorFlow was ever imported.
IMPORT_PROBE = """import atexit, os, runpy, sys
atexit.register(lambda: print("PARENT", os.getpid(), "tensorflow" in sys.modules, flush=True))
sys.argv = ["main.py", *sys.argv[1:]]
runpy.run_path("main.py", run_name="__main__")
"""


def test_a_cpu_only_run_on_jax_never_imports_tensorflow_and_trains_in_the_parent(tmp_path):
    write_idx_set(tmp_path, n_train=60, n_test=20)
    env = {**ENV, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "PATH": fake_nvidia_smi(tmp_path / "bin", "No devices were found")}
    proc = subprocess.run([sys.executable, "-c", IMPORT_PROBE, "--recipe=device",
                           "--dataset=fashion_mnist", f"--data_dir={tmp_path}", "--epochs=1",
                           "--batch_size=20", "--hidden_units=16", f"--logdir={tmp_path / 'runs'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, pid, imported = next(line for line in proc.stdout.splitlines()
                            if line.startswith("PARENT ")).split()
    assert imported == "False", "the parent imported tensorflow"
    run_dir = only_run_dir(tmp_path / "runs", "device")
    assert writer_pids(run_dir / "cpu" / "train") == {int(pid)}  # the job ran in that process
    assert '"cpu_backend": "jax"' in (run_dir / "metrics.json").read_text()


def test_batch_larger_than_the_data_is_rejected_before_training(tmp_path, tiny_images):
    with pytest.raises(ValueError, match="--batch_size"):
        device.run(tiny(batch_size=1000), str(tmp_path), tiny_images)
    with pytest.raises(ValueError, match="no price for gpu:0"):
        device.run(tiny(devices="cpu,gpu:0", price_per_hour="cpu:1,gpu:1:2"), str(tmp_path),
                   tiny_images)


COPY_SETUP = """
import keras, numpy as np
assert keras.backend.backend() == "jax"
rng = np.random.default_rng(0)
x = rng.random((600, 8, 8, 1), dtype=np.float32)
y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype("int64")
x, x_val, y, y_val = x[:480], x[480:], y[:480], y[480:]
model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                          keras.layers.Dense(32, activation="relu"),
                          keras.layers.Dense(2, activation="softmax")])
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
start = model.get_weights()
"""
COPY_CHECK = """
assert list(results) == ["cpu"], list(results)  # JAX_PLATFORMS=cpu: no GPU to time
r = results["cpu"]
assert [steps for _, steps in r["calls"]] == [5, 5], r["calls"]  # an epoch per compiled call
assert 0 < r["first_call_s"] <= r["wall_time_s"], r
assert r["history"]["loss"][1] < r["history"]["loss"][0], r["history"]  # the copy trained
assert all(np.array_equal(a, b) for a, b in zip(start, model.get_weights()))  # yours did not
assert verdict["cheapest_device"] == "cpu", verdict
assert abs(verdict["break_even_speedup"] - 3) < 1e-9, verdict
assert abs(verdict["cpu_cost_usd"] - r["wall_time_s"] / 3600 * 0.40) < 1e-12, verdict
assert "more than 3.00x as fast" in lines[-2], lines
assert "A spot GPU at $0.45/h" in lines[-1] and abs(verdict["break_even_speedup_spot"] - 1.125) < 1e-9
# The same start: with learning rate 0 the job's copy is your model, weight for weight.
still = job_on_device(model, "cpu", x, y, x_val, y_val, epochs=1, learning_rate=0.0)
assert abs(still["val_loss"] - model.evaluate(x_val, y_val, verbose=0)[0]) < 1e-5, still
print("OK", len(lines))
"""


def test_copy_example_times_a_copy_of_your_model_and_prices_it_on_jax_without_tensorflow(
        tmp_path):
    proc = run_copy_example("device.py", tmp_path, COPY_SETUP, COPY_CHECK,
                            env={"JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK 3" in proc.stdout, proc.stdout[-2000:]
    assert "No GPU ran this job" in proc.stdout  # the verdict the example printed


def test_nan_loss_in_the_worker_ends_the_run_with_the_workers_own_message(tmp_path):
    """End to end: the worker's NaN guard, its log, the parent's reading of that log, main."""
    result = run_cli("--recipe=device", "--devices=cpu", "--epochs=1", "--batch_size=100",
                     "--learning_rate=1e38", f"--logdir={tmp_path}")
    assert result.returncode == 1, result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1, lines
    assert "FloatingPointError: training loss became nan; lower --learning_rate" in lines[0]
    run_dir = only_run_dir(tmp_path, "device")
    assert f"run folder kept: {run_dir}" in lines[0]
    assert "training loss became nan" in (run_dir / "cpu.log").read_text()  # the worker's log
    assert not (run_dir / "metrics.json").exists()


@pytest.mark.parametrize("pipeline", ["arrays", "keras_arrays", "tf_data"])
def test_steps_per_execution_zero_runs_a_whole_epoch_per_compiled_call(pipeline, tiny_images):
    weights = dropin.initial_weights(28 * 28, 16, 10, seed=0)
    r = device.train_job(tiny(pipeline=pipeline, epochs=2), tiny_images, weights)
    assert r["steps_per_execution"] == 3 and r["xla"]  # 60 examples / batch 20
    assert_median_throughput(r, "examples_per_sec", "step_time_ms_p50", 20)
    assert r["first_call_s"] > r["steps_s"]  # epoch 1's call compiles; epoch 2's only runs


def test_throughput_is_the_median_step_leaving_out_the_compiling_first_call():
    calls = [(5.0, 10), (1.0, 10), (1.5, 10), (4.0, 10)]  # (seconds, steps) per compiled call
    r = device.call_throughput(calls, first_call_s=5.2, batch_size=100)
    assert r["step_time_ms_p50"] == pytest.approx(150)  # per step: 0.1, 0.15, 0.4 after the first
    assert r["examples_per_sec"] == pytest.approx(100 / 0.15)  # a mean would say 3000 / 6.5
    assert r["first_step_s"] == pytest.approx(5.2 - 9 * 6.5 / 30)  # less 9 steps at steady rate
    assert r["steps_s"] == pytest.approx(6.5)
