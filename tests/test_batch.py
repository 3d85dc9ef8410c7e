"""The batch recipe: a sweep a user can read and trust."""
import numpy as np
import pytest

from helpers import assert_median_throughput, run_dropin

import datasets
from recipes import batch

TINY = dict(batch_sizes=(8, 16), epochs=2, steps_per_epoch=3, warmup_steps=1)


def test_sweep_reports_every_batch_size_and_picks_one(tmp_path, tiny_images):
    metrics = batch.run(batch.Config(**TINY), str(tmp_path), tiny_images)
    for b in (8, 16):
        for key in ("examples_per_sec", "step_time_ms_p50", "step_time_ms_p90",
                    "val_loss", "val_accuracy", "wall_time_s"):
            assert np.isfinite(metrics[f"{key}_b{b}"]), key
        assert metrics[f"step_time_ms_p50_b{b}"] <= metrics[f"step_time_ms_p90_b{b}"]
        assert_median_throughput(metrics, f"examples_per_sec_b{b}", f"step_time_ms_p50_b{b}", b)
    assert metrics["best_batch_size"] == batch.pick_best(
        {b: {k: metrics[f"{k}_b{b}"] for k in ("val_accuracy", "examples_per_sec")}
         for b in (8, 16)}, batch.Config.accuracy_tolerance)
    assert (tmp_path / "batch_8" / "train").is_dir() and (tmp_path / "sweep").is_dir()


@pytest.mark.parametrize("own", [False, True])
def test_every_batch_size_starts_from_the_same_weights(tmp_path, tiny_images, monkeypatch, own):
    import keras
    starts = []  # the weights of each batch size's model as it is handed to training
    original = batch.model_maker

    def recording_maker(*args):
        make, reference = original(*args)

        def recording_make():
            model, loss, metrics = make()
            starts.append([w.copy() for w in model.get_weights()])
            return model, loss, metrics
        return recording_make, reference

    monkeypatch.setattr(batch, "model_maker", recording_maker)
    mine = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(10)]) if own else None
    batch.run(batch.Config(**TINY), str(tmp_path), tiny_images, model=mine)
    assert len(starts) == 2
    for a, b in zip(*starts):
        np.testing.assert_array_equal(a, b)
    if own:  # from the user's own weights, which training left as they were
        for a, b in zip(starts[0], mine.get_weights()):
            np.testing.assert_array_equal(a, b)


def test_scale_lr_grows_learning_rate_with_batch_size(tmp_path, tiny_images):
    config = batch.Config(**TINY, scale_lr=True, base_batch_size=8, learning_rate=0.002)
    metrics = batch.run(config, str(tmp_path), tiny_images)
    assert metrics["learning_rate_b8"] == pytest.approx(0.002)
    assert metrics["learning_rate_b16"] == pytest.approx(0.004)


def test_threshold_toy_learns_with_the_sigmoid_head(tmp_path):
    config = batch.Config(batch_sizes=(4,), epochs=200, learning_rate=0.05, warmup_steps=0)
    metrics = batch.run(config, str(tmp_path), datasets.threshold())
    assert metrics["val_accuracy_b4"] == 1.0


def test_best_batch_is_fastest_within_accuracy_tolerance():
    results = {32: {"val_accuracy": 0.90, "examples_per_sec": 100},
               64: {"val_accuracy": 0.895, "examples_per_sec": 180},
               128: {"val_accuracy": 0.80, "examples_per_sec": 300}}
    assert batch.pick_best(results, tolerance=0.01) == 64
    assert batch.pick_best(results, tolerance=0.2) == 128




@pytest.mark.parametrize("bad", [dict(batch_sizes=(0, 8)), dict(learning_rate=-1.0),
                                 dict(accuracy_tolerance=2.0)])
def test_bad_config_is_rejected(bad):
    with pytest.raises(ValueError):
        batch.Config(**bad)


def test_batch_recipe_is_drop_in(tmp_path):
    script = (
        "import numpy as np, batch\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.random((48, 8, 8, 1), dtype=np.float32); y = rng.integers(0, 3, 48)\n"
        "m = batch.run(batch.Config(batch_sizes=(8,), epochs=1, warmup_steps=1), 'logs',"
        " ((x, y), (x[:16], y[:16])))\n"
        "print('BEST', m['best_batch_size'])\n")
    result = run_dropin("batch.py", script, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "BEST 8" in result.stdout
    assert (tmp_path / "dropin" / "logs" / "batch_8" / "train").is_dir()
