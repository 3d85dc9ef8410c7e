"""The batch recipe: a sweep a user can read and trust; its drop-in file alone on JAX."""
import numpy as np
import pytest

from helpers import assert_median_throughput, run_copy_example

import datasets
from experiments import batch
from recipes import batch as dropin

TINY = dict(batch_sizes=(8, 16), epochs=2, steps_per_epoch=3, warmup_steps=1)


def test_sweep_reports_every_batch_size_and_picks_one(tmp_path, tiny_images):
    metrics = batch.run(batch.Config(**TINY), str(tmp_path), tiny_images)
    for b in (8, 16):
        for key in ("examples_per_sec", "step_time_ms_p50", "step_time_ms_p90",
                    "val_loss", "val_accuracy", "wall_time_s"):
            assert np.isfinite(metrics[f"{key}_b{b}"]), key
        assert metrics[f"step_time_ms_p50_b{b}"] <= metrics[f"step_time_ms_p90_b{b}"]
        assert_median_throughput(metrics, f"examples_per_sec_b{b}", f"step_time_ms_p50_b{b}", b)
    assert metrics["best_batch_size"] == dropin.pick_best(
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
    assert dropin.pick_best(results, tolerance=0.01) == 64
    assert dropin.pick_best(results, tolerance=0.2) == 128




@pytest.mark.parametrize("bad", [dict(batch_sizes=(0, 8)), dict(learning_rate=-1.0),
                                 dict(accuracy_tolerance=2.0)])
def test_bad_config_is_rejected(bad):
    with pytest.raises(ValueError):
        batch.Config(**bad)


def test_full_batches_are_full_and_reshuffled_each_epoch():
    x, y = np.arange(10).reshape(10, 1), np.arange(10)
    batches = dropin.FullBatches(x, y, batch_size=4, seed=0)
    assert len(batches) == 2 and all(len(batches[i][1]) == 4 for i in range(2))
    first = np.concatenate([batches[i][1] for i in range(2)])
    batches.on_epoch_end()
    second = np.concatenate([batches[i][1] for i in range(2)])
    assert len(set(first)) == 8 and not np.array_equal(first, second)
    np.testing.assert_array_equal(dropin.FullBatches(x, y, 4, shuffle=False)[1][0], x[4:8])


def test_dropin_sweep_scales_the_models_own_learning_rate(tiny_images):
    import keras
    (x, y), (x_val, y_val) = tiny_images
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    model.compile(keras.optimizers.SGD(0.01), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    results = dropin.sweep(model, x, y, x_val, y_val, batch_sizes=(8, 16), epochs=1,
                           scale_lr=True, base_batch_size=8, verbose=0)
    assert [r["learning_rate"] for r in results.values()] == [pytest.approx(0.01),
                                                              pytest.approx(0.02)]
    assert [r["steps_per_epoch"] for r in results.values()] == [60 // 8, 60 // 16]


def test_dropin_sweep_needs_a_compiled_model(tiny_images):
    import keras
    (x, y), (x_val, y_val) = tiny_images
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    with pytest.raises(ValueError, match="compile the model first"):
        dropin.sweep(model, x, y, x_val, y_val, batch_sizes=(8,), epochs=1)


# A user's model and data: which of three pixels is the brightest, a linear task.
COPY_SETUP = """
import keras, numpy as np
assert keras.backend.backend() == "jax"
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.random((2560, 8, 8, 1), dtype=np.float32)
x_val = rng.random((256, 8, 8, 1), dtype=np.float32)
y, y_val = (a.reshape(len(a), -1)[:, :3].argmax(axis=1) for a in (x, x_val))
model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
model.compile(keras.optimizers.Adam(0.03),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
before = model.get_weights()
starts = []  # the weights each batch size's copy holds as its fit begins
fit = keras.Model.fit
def recording_fit(self, *args, **kwargs):
    starts.append(self.get_weights())
    return fit(self, *args, **kwargs)
keras.Model.fit = recording_fit
"""
COPY_CHECK = """
assert sorted(results) == [32, 64, 128] and len(starts) == 3, (sorted(results), len(starts))
for weights in [*starts, model.get_weights()]:  # every copy from your weights; yours untouched
    for a, b in zip(weights, before):
        np.testing.assert_array_equal(a, b)
for b, r in results.items():
    assert r["steps_per_epoch"] == 2560 // b and r["learning_rate"] == np.float32(0.03)
    assert np.isfinite(r["examples_per_sec"]), r
    assert r["val_accuracy"] > 0.6, r  # trained: chance is 1/3
print("OK", {b: round(r["val_accuracy"], 3) for b, r in results.items()})
"""


def test_copy_example_sweeps_a_users_model_from_the_same_weights_on_jax(tmp_path):
    result = run_copy_example("batch.py", tmp_path, COPY_SETUP, COPY_CHECK)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "<- best" in result.stdout and "OK " in result.stdout, result.stdout[-2000:]
