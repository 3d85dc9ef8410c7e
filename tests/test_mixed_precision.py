"""mixed_precision: policy choice, float32 output, loss scaling, NaN guard, restore."""
import subprocess
import sys

import keras
import numpy as np
import pytest

from experiments import mixed_precision as mp
from helpers import (ENV, REPO, assert_median_throughput, block_tensorflow, error_lines,
                     load_benchmark, only_run_dir, read_tensorboard_tags, run_cli,
                     run_copy_example, write_idx_set)
from recipes import mixed_precision as recipe

TINY = dict(epochs=1, batch_size=16, steps_per_epoch=2, filters=(8, 16), dense_units=16,
            warmup_steps=1)


@pytest.fixture
def keep_global_policy():
    previous = keras.mixed_precision.global_policy()
    yield
    keras.mixed_precision.set_global_policy(previous)


def test_mixed_float16_compare_keeps_float32_output_scales_loss_and_reports_speedup(
        tiny_images, tmp_path, keep_global_policy, monkeypatch):
    starts = {}  # each policy's weights as its training begins
    original_init = mp.Trainee.__init__

    def recording_init(self, policy, *args, **kwargs):
        original_init(self, policy, *args, **kwargs)
        starts[policy] = [w.copy() for w in self.model.get_weights()]

    monkeypatch.setattr(mp.Trainee, "__init__", recording_init)
    metrics = mp.run(mp.Config(policy="mixed_float16", compare=True, **TINY), str(tmp_path),
                     tiny_images)
    assert metrics["policy"] == metrics["recommended_policy"] == "mixed_float16"
    assert metrics["output_dtype"] == "float32"
    assert metrics["loss_scaling"] is True and metrics["loss_scale"] > 1
    assert sorted(starts) == ["float32", "mixed_float16"]
    for mixed, full in zip(starts["mixed_float16"], starts["float32"]):  # the same start
        np.testing.assert_array_equal(mixed, full)
    assert metrics["speedup"] == pytest.approx(
        metrics["examples_per_sec"] / metrics["float32_examples_per_sec"])
    assert metrics["val_accuracy_delta"] == pytest.approx(
        metrics["val_accuracy"] - metrics["float32_val_accuracy"])
    for prefix in ("", "float32_"):
        assert_median_throughput(metrics, f"{prefix}examples_per_sec",
                                 f"{prefix}step_time_ms_p50", TINY["batch_size"])
    tags = read_tensorboard_tags(tmp_path / "mixed_float16" / "train")
    assert tags["epoch_loss_scale"][-1] == metrics["loss_scale"]
    assert "epoch_loss_scale" not in read_tensorboard_tags(tmp_path / "float32_baseline" / "train")


def test_compare_where_float32_is_kept_measures_the_fastest_16_bit_policy(
        tiny_images, tmp_path, keep_global_policy, capsys):
    metrics = mp.run(mp.Config(policy="float32", compare=True, **TINY), str(tmp_path),
                     tiny_images)
    assert metrics["recommended_policy"] == "float32"
    assert metrics["policy"] == recipe.fastest_16bit_policy() == "mixed_bfloat16"  # no GPU here
    assert metrics["speedup"] == pytest.approx(
        metrics["examples_per_sec"] / metrics["float32_examples_per_sec"])
    verdict = "agrees" if metrics["speedup"] < 1.05 else "disagrees"
    assert f"measured mixed_bfloat16 at {metrics['speedup']:.2f}x float32, which {verdict}" in \
        capsys.readouterr().out


def test_compare_verdict_says_when_the_measurement_contradicts_the_rule():
    assert "which agrees" in mp.compare_verdict("float32", "why", "mixed_bfloat16", 0.6)
    assert "disagrees: try --policy=mixed_bfloat16" in mp.compare_verdict(
        "float32", "why", "mixed_bfloat16", 1.4)
    assert "which agrees" in mp.compare_verdict("mixed_float16", "why", "mixed_float16", 2.5)
    assert "disagrees: keep float32" in mp.compare_verdict(
        "mixed_float16", "why", "mixed_float16", 0.8)


def test_model_with_16_bit_output_is_rejected(tiny_images, keep_global_policy):
    (x, _), _ = tiny_images
    with recipe.global_policy("mixed_bfloat16"):
        model = keras.Sequential([keras.Input(x.shape[1:]), keras.layers.Flatten(),
                                  keras.layers.Dense(10, activation="softmax")])
    with pytest.raises(ValueError, match="float32 layer"):
        recipe.check_output_float32(model, x)


def test_policy_restored_after_success_and_after_nan_failure(tiny_images, tmp_path,
                                                             keep_global_policy):
    keras.mixed_precision.set_global_policy("mixed_float16")
    mp.run(mp.Config(policy="float32", **TINY), str(tmp_path / "ok"), tiny_images)
    assert keras.mixed_precision.global_policy().name == "mixed_float16"

    keras.mixed_precision.set_global_policy("float32")
    with pytest.raises(FloatingPointError, match=r"at training step \d+ under policy mixed_bfloat16"):
        mp.run(mp.Config(policy="mixed_bfloat16", learning_rate=1e9, **{**TINY, "epochs": 2}),
               str(tmp_path / "nan"), tiny_images)
    assert keras.mixed_precision.global_policy().name == "float32"


def test_clear_session_silently_drops_a_policy_and_the_recipe_catches_it(tiny_images,
                                                                         keep_global_policy):
    (x, _), _ = tiny_images
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.clear_session()  # what many training scripts call between models
    assert keras.mixed_precision.global_policy().name == "float32"
    model = mp.build_model(x.shape[1:], 10, filters=(8,), dense_units=8)
    with pytest.raises(RuntimeError, match="clear_session"):
        recipe.check_policy_applied(model, "mixed_bfloat16")


def test_auto_picks_what_this_hardware_supports(keep_global_policy):
    policy, reason = recipe.choose_policy()
    devices, flags = recipe.accelerators(), recipe.cpu_flags()
    gpus = [cc for kind, cc in devices if kind == "gpu"]
    if gpus:
        assert policy == ("mixed_float16" if min(gpus) >= 7.0 else "float32"), reason
    elif flags & {"avx512_bf16", "amx_bf16"}:  # benchmarks/mixed_precision.py: ~1.5-2x here
        assert policy == "mixed_bfloat16", reason
    else:
        assert policy == "float32", reason
    # float16 on a CPU is many times slower (Eigen fallback): auto never picks it there.
    assert recipe.choose_policy(devices=(), flags={"avx512_fp16", "avx512_bf16"},
                                backend="tensorflow")[0] == "mixed_bfloat16"
    assert recipe.choose_policy(devices=(), flags={"avx512_fp16"},
                                backend="tensorflow")[0] == "float32"
    # bfloat16 dense layers measured 0.7x float32 on CPU: a dense-heavy model stays float32.
    with recipe.global_policy("float32"):
        mlp = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                                keras.layers.Dense(256), keras.layers.Dense(10)])
    assert recipe.choose_policy(devices=(), flags={"amx_bf16"}, backend="tensorflow",
                                model=mlp)[0] == "float32"
    assert recipe.choose_policy(devices=(), flags={"amx_bf16"}, backend="tensorflow",
                                model=mp.build_model((64, 64, 3), 10))[0] == "mixed_bfloat16"
    assert recipe.choose_policy(devices=(("gpu", 8.0),), flags=set())[0] == "mixed_float16"
    assert recipe.choose_policy(devices=(("gpu", 6.1),), flags=set())[0] == "float32"
    assert recipe.choose_policy(devices=(("tpu", None),), flags=set())[0] == "mixed_bfloat16"


def test_advice_names_odd_widths_tiny_batches_and_slow_input(keep_global_policy):
    model = mp.build_model((16, 16, 3), 10, filters=(12, 16), dense_units=100)
    tips = " | ".join(mp.advise(model, batch_size=8, step_ms=10.0, fetch_ms=9.0))
    assert "12 units/channels" in tips and "100 units/channels" in tips
    assert "16 units" not in tips and "10 units" not in tips  # multiples of 8; class count
    assert "batch size 8 is tiny" in tips and "input-bound" in tips
    assert mp.advise(mp.build_model((16, 16, 3), 10), 64, step_ms=10.0, fetch_ms=1.0) == []


def test_cli_nan_loss_stops_with_step_and_policy_exit_1_and_no_metrics(tmp_path):
    result = run_cli("--recipe=mixed_precision", "--learning_rate=1e9", "--epochs=2",
                     "--steps_per_epoch=3", "--batch_size=16", "--filters=8,16",
                     "--dense_units=16", f"--logdir={tmp_path}")
    lines = error_lines(result.stderr)
    assert result.returncode == 1, result.stderr[-2000:]
    assert len(lines) == 1 and "at training step" in lines[0] and "under policy" in lines[0], lines
    assert "--learning_rate" in lines[0]
    run_dir = only_run_dir(tmp_path, "mixed_precision")
    assert not (run_dir / "metrics.json").exists()


def test_cli_bad_width_is_one_line_error(tmp_path):
    result = run_cli("--recipe=mixed_precision", "--filters=0", f"--logdir={tmp_path}")
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "error: --filters and --dense_units must be positive, got (0,) and 128"]


EXPERIMENT_ON_JAX = """
import keras, numpy as np
from experiments import mixed_precision as mp
assert keras.backend.backend() == "jax", keras.backend.backend()
rng = np.random.default_rng(0)
x = rng.random((48, 16, 16, 3), dtype=np.float32); y = rng.integers(0, 4, 48)
m = mp.run(mp.Config(policy="mixed_bfloat16", compare=True, epochs=1, batch_size=16,
                     filters=(8,), dense_units=8, warmup_steps=1), "logs", ((x, y), (x[:16], y[:16])))
assert m["backend"] == "jax" and m["output_dtype"] == "float32", m
assert abs(m["speedup"] - m["examples_per_sec"] / m["float32_examples_per_sec"]) < 1e-9, m
assert keras.mixed_precision.global_policy().name == "float32"
print("OK", m["policy"], round(m["speedup"], 2))
"""


def test_experiment_runs_on_the_jax_backend_without_tensorflow(tmp_path):
    block_tensorflow(tmp_path)
    result = subprocess.run([sys.executable, "-c", EXPERIMENT_ON_JAX], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300,
                            env={**ENV, "KERAS_BACKEND": "jax",
                                 "PYTHONPATH": f"{tmp_path}:{REPO}"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK mixed_bfloat16" in result.stdout
    assert "TensorFlow is not installed" in result.stdout


# The drop-in file's Copy: example on a user's own model, JAX, TensorFlow blocked. The
# hardware choose_policy sees is set (a TPU, an NVIDIA GPU): each 16-bit policy is taken.
COPY_SETUP = """
import keras, numpy as np
import mixed_precision
assert keras.backend.backend() == "jax", keras.backend.backend()
mixed_precision.accelerators = lambda: {devices!r}
rng = np.random.default_rng(0)
x = rng.random((64, 16, 16, 3), dtype=np.float32); y = rng.integers(0, 4, 64)
x_val, y_val = x[:16], y[:16]
model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(8, 3, activation="relu"),
                          keras.layers.GlobalAveragePooling2D(), keras.layers.Dropout(0.1),
                          keras.layers.Dense(4, activation="softmax")])
start = [w.copy() for w in model.get_weights()]
"""
COPY_CHECK = """
assert policy == {policy!r}, (policy, why)
assert [l.dtype_policy.name for l in fast.layers] == [policy] * 3 + ["float32"]
assert {{w.dtype for w in fast.weights}} == {{"float32"}}  # the weights stay float32
assert fast.dtype_policy.name == policy  # what compile reads to add loss scaling
assert (loss_scale(fast) is not None) == (policy == "mixed_float16")
assert guard.step == 2 * 2 and guard.bad is None  # 64 examples in batches of 32, 2 epochs
assert any(not np.array_equal(a, b) for a, b in zip(fast.get_weights(), start))  # it trained
assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), start))  # yours did not
assert {{l.dtype_policy.name for l in model.layers}} == {{"float32"}}
assert keras.mixed_precision.global_policy().name == "float32"  # restored
print("OK", policy, why)
"""


@pytest.mark.parametrize("devices, policy", [((("tpu", None),), "mixed_bfloat16"),
                                             ((("gpu", 8.0),), "mixed_float16")])
def test_copy_example_rebuilds_your_model_under_the_policy_on_jax_without_tensorflow(
        tmp_path, devices, policy):
    result = run_copy_example("mixed_precision.py", tmp_path,
                              COPY_SETUP.format(devices=devices),
                              COPY_CHECK.format(policy=policy))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"OK {policy}" in result.stdout


def test_under_policy_restores_the_global_policy_when_it_fails(keep_global_policy):
    class Unbuildable(keras.layers.Layer):
        @classmethod
        def from_config(cls, config):
            raise TypeError("cannot rebuild")

    keras.mixed_precision.set_global_policy("float32")
    with recipe.global_policy("float32"):
        model = keras.Sequential([keras.Input((4,)), Unbuildable(), keras.layers.Dense(2)])
    with pytest.raises(TypeError, match="cannot rebuild"):
        recipe.under_policy(model, "mixed_bfloat16")
    assert keras.mixed_precision.global_policy().name == "float32"


def test_benchmark_runs_on_jax_with_tensorflow_not_importable(tmp_path):
    """The issue's GPU check runs this benchmark where only JAX is installed."""
    (tmp_path / "data" / "fashion-mnist").mkdir(parents=True)
    write_idx_set(tmp_path / "data" / "fashion-mnist", n_train=64)
    block_tensorflow(tmp_path)
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "mixed_precision.py"),
         f"--data_dir={tmp_path / 'data'}", "--examples=64", "--batch_size=16", "--steps=2",
         "--rounds=1", "--max_turn_s=2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**ENV, "KERAS_BACKEND": "jax", "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backend: jax" in result.stdout
    for model in ("conv", "mlp"):  # every policy measured for both models, each checked
        assert f"auto picks float32 for {model}; the fastest 16-bit policy" in result.stdout, \
            result.stdout[-2000:]
        for policy in mp.POLICIES:
            assert f"{model:<6} {policy:<16}" in result.stdout
    assert "conv CPU train examples_per_sec ratio:" in result.stdout


def test_benchmark_flags_float32_when_a_16_bit_policy_was_faster_beyond_noise():
    bench = load_benchmark("mixed_precision")
    rounds = {"float32": [100, 100, 100], "mixed_bfloat16": [130, 125, 128]}
    result = {"float32": 100, "mixed_bfloat16": 128}
    assert bench.auto_check("float32", "conv", result, rounds).startswith("VIOLATION")
    noisy = {"float32": [100, 100, 100], "mixed_bfloat16": [130, 95, 128]}  # slower once
    assert bench.auto_check("float32", "conv", result, noisy).startswith("ok")
    close = {"float32": 100, "mixed_bfloat16": 105}  # within noise
    assert bench.auto_check("float32", "conv", close, rounds).startswith("ok")
    slower = {"float32": 100, "mixed_bfloat16": 90}
    assert bench.auto_check("mixed_bfloat16", "conv", slower, rounds).startswith("VIOLATION")
    assert bench.auto_check("mixed_bfloat16", "conv", result, rounds).startswith("ok")
