"""The `device` recipe: one subprocess per device, a cost verdict, one-line errors."""
import pytest

from helpers import ENV, error_lines, read_tensorboard_tags, run_cli, run_dropin
from recipes import device

# The well-known comparison the recipe's reference job comes from.
CPU_S, GPU_S = 70.5, 62.6
PRICES = {"cpu": 0.40, "gpu": 1.20}


def tiny(**overrides):
    return device.Config(**{"devices": "cpu", "epochs": 1, "batch_size": 20,
                            "hidden_units": 16, **overrides})


def test_cost_verdict_names_cheaper_device_and_break_even_speedup():
    results = {"cpu": {"wall_time_s": CPU_S}, "gpu:0": {"wall_time_s": GPU_S}}
    lines, metrics = device.compare_costs(results, PRICES)
    assert metrics["cheapest_device"] == "cpu"  # 1.13x faster at 3x the price loses
    assert metrics["break_even_speedup"] == pytest.approx(3.0)
    assert metrics["speedup_gpu0_vs_cpu"] == pytest.approx(CPU_S / GPU_S)
    assert metrics["cpu_cost_usd"] == pytest.approx(CPU_S / 3600 * 0.40)
    assert metrics["gpu0_cost_usd"] == pytest.approx(GPU_S / 3600 * 1.20)
    saving = 1 - (CPU_S * 0.40) / (GPU_S * 1.20)
    assert any(f"cpu is cheaper per job by {saving:.0%}" in line for line in lines), lines

    # Four times as fast at three times the price: now the GPU wins.
    results["gpu:0"]["wall_time_s"] = CPU_S / 4
    _, metrics = device.compare_costs(results, PRICES)
    assert metrics["cheapest_device"] == "gpu:0"


def test_per_gpu_price_overrides_the_gpu_price():
    prices = device.parse_prices("cpu:1,gpu:2,gpu:1:8")
    assert device.price_of("gpu:0", prices) == 2 and device.price_of("gpu:1", prices) == 8
    results = {"cpu": {"wall_time_s": 10.0}, "gpu:0": {"wall_time_s": 4.0},
               "gpu:1": {"wall_time_s": 4.0}}
    _, metrics = device.compare_costs(results, prices)
    assert metrics["break_even_speedup_gpu0"] == pytest.approx(2)
    assert metrics["break_even_speedup_gpu1"] == pytest.approx(8)
    assert metrics["cheapest_device"] == "gpu:0"


def test_without_gpu_the_verdict_states_the_speedup_a_gpu_needs():
    lines, metrics = device.compare_costs({"cpu": {"wall_time_s": 12.0}}, PRICES)
    assert metrics["cheapest_device"] == "cpu"
    assert metrics["break_even_speedup"] == pytest.approx(3)
    verdict = " ".join(lines)
    assert "No GPU" in verdict and "more than 3.00x" in verdict and "under 4.00 s" in verdict


def test_job_arithmetic_is_about_2_4_mflop_per_example():
    assert device.flops_per_example(784, 500, 10) == pytest.approx(2.4e6, rel=0.01)


@pytest.mark.parametrize("text", ["cpu=0.4,gpu=1.2", "cpu:abc,gpu:1", "cpu:0.4", "gpu:1.2",
                                  "tpu:1,cpu:1,gpu:1", "cpu:-1,gpu:1", "cpu:nan,gpu:1", ""])
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


def test_each_device_runs_in_its_own_subprocess_and_a_failing_one_is_reported(
        tmp_path, tiny_images):
    metrics = device.run(tiny(devices="cpu,gpu:99"), str(tmp_path), tiny_images)

    # The CPU job ran and was measured, in a subprocess that left its log behind.
    assert metrics["cpu_examples_per_sec"] > 0 and metrics["cpu_wall_time_s"] > 0
    assert 0 <= metrics["cpu_val_accuracy"] <= 1 and metrics["cpu_first_step_s"] > 0
    assert metrics["cpu_compute_floor_s"] > 0 and metrics["cpu_startup_s"] > 0
    assert "loss:" in (tmp_path / "cpu.log").read_text()  # the worker's own fit output
    # gpu:99 does not exist here: reported, not fatal, and left out of the verdict.
    assert metrics["devices_failed"] == 1
    assert "gpu:99 is not visible" in metrics["gpu99_error"]
    assert "gpu99_wall_time_s" not in metrics and metrics["cheapest_device"] == "cpu"
    tags = read_tensorboard_tags(tmp_path / "cpu")
    assert {"job/wall_time_s", "job/cost_usd", "job/examples_per_sec"} <= set(tags)
    assert tags["job/cost_usd"][0] == pytest.approx(metrics["cpu_cost_usd"], rel=1e-5)
    assert len(read_tensorboard_tags(tmp_path / "cpu" / "train")["epoch_loss"]) == 1


def test_batch_larger_than_the_data_is_rejected_before_training(tmp_path, tiny_images):
    with pytest.raises(ValueError, match="--batch_size"):
        device.run(tiny(batch_size=1000), str(tmp_path), tiny_images)
    with pytest.raises(ValueError, match="no price for gpu:0"):
        device.run(tiny(devices="cpu,gpu:0", price_per_hour="cpu:1,gpu:1:2"), str(tmp_path),
                   tiny_images)


DROPIN = """
import numpy as np
from device import Config, run
rng = np.random.default_rng(0)
x = rng.random((80, 28, 28, 1), dtype=np.float32)
y = (x.mean(axis=(1, 2, 3)) > 0.5).astype(np.int64)
metrics = run(Config(devices="cpu", epochs=1, batch_size=20, hidden_units=8), "logs",
              ((x[:60], y[:60]), (x[60:], y[60:])))
print("RESULT", metrics["cpu_backend"], metrics["devices_failed"],
      metrics["cpu_examples_per_sec"] > 0, metrics["cheapest_device"])
"""


def test_recipe_file_runs_alone_on_jax_without_tensorflow(tmp_path):
    proc = run_dropin("device.py", DROPIN, tmp_path,
                      env={**ENV, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"},
                      without_tensorflow=True)  # on PYTHONPATH: the per-device subprocess too
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT jax 0 True cpu" in proc.stdout, proc.stdout[-2000:]
    assert (tmp_path / "dropin" / "logs" / "cpu.log").exists()


def test_nan_loss_on_every_device_is_a_floating_point_error(tmp_path, tiny_images, monkeypatch):
    why = "FloatingPointError: training loss became nan; lower --learning_rate (exit code 1)"
    monkeypatch.setattr(device, "run_on_device", lambda *args: {"error": why})
    with pytest.raises(FloatingPointError, match="lower --learning_rate"):
        device.run(tiny(devices="cpu,gpu:0"), str(tmp_path), tiny_images)


@pytest.mark.parametrize("pipeline", ["arrays", "tf_data"])
def test_steps_per_execution_zero_runs_a_whole_epoch_per_compiled_call(pipeline, tiny_images):
    weights = device.initial_weights(28 * 28, 16, 10, seed=0)
    r = device.train_job(tiny(pipeline=pipeline, epochs=2), tiny_images, weights)
    assert r["steps_per_execution"] == 3 and r["xla"]  # 60 examples / batch 20
    assert r["examples_per_sec"] > 0 and 0 <= r["val_accuracy"] <= 1


def test_throughput_leaves_out_the_compiling_first_call():
    calls = [(5.0, 10), (1.0, 10), (1.5, 10)]  # (seconds, steps) per compiled call
    r = device.throughput(calls, first_call_s=5.2, batch_size=100)
    assert r["examples_per_sec"] == pytest.approx(2000 / 2.5)
    assert r["first_step_s"] == pytest.approx(5.2 - 9 * 2.5 / 20)  # less 9 steps at steady rate
    assert r["step_time_ms_p50"] == pytest.approx(125) and r["steps_s"] == pytest.approx(2.5)
