"""The machinery written once (experiments/ and the step timer drop-in), by its rules:
median throughput, one warm-up rule, the clock waiting for the device, atomic
writes; copies of the user's model, never the model itself, and the loss its
output implies."""
import pathlib
import time

import pytest

import helpers  # noqa: F401  (puts the repository on sys.path)
from experiments import files, user_model
from recipes import step_timer


def test_throughput_is_examples_per_step_over_the_median_steady_step():
    seconds = [5.0, 0.010, 0.020, 0.030, 1.0]  # a compile, three steady steps, one stall
    result = step_timer.throughput(seconds, 64, warmup=1)
    assert result["step_time_ms_p50"] == pytest.approx(25.0)  # median of the last four
    assert result["examples_per_sec"] == pytest.approx(64 / 0.025)
    assert result["step_time_ms_p90"] == pytest.approx(1000 * (0.030 + 0.7 * (1.0 - 0.030)))


def test_warmup_rule_drops_warmup_steps_or_all_but_the_first():
    assert step_timer.steady([9, 1, 2, 3], warmup=2) == [2, 3]
    assert step_timer.steady([9, 1, 2], warmup=3) == [1, 2]  # too few: all but the first
    assert step_timer.steady([9], warmup=3) == [9]  # one timing is all there is


def test_step_timer_stops_the_clock_only_after_the_loss_is_on_the_host():
    class SlowLoss:  # what an asynchronous backend hands back: ready only when read
        def __array__(self, dtype=None, copy=None):
            time.sleep(0.05)
            return __import__("numpy").asarray(1.0)

    timer = step_timer.StepTimer()
    timer.on_train_batch_begin(0)
    timer.on_train_batch_end(0, {"loss": SlowLoss()})
    assert timer.seconds[0] >= 0.05


def test_write_atomically_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "model.keras"
    target.write_text("the previous checkpoint")

    def crash_midway(partial):
        assert partial.endswith(".keras")  # Keras picks the format from the extension
        pathlib.Path(partial).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.write_atomically(target, crash_midway)
    assert target.read_text() == "the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]  # no partial left behind
    files.write_atomically(target, lambda partial: pathlib.Path(partial).write_text("new"))
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def small_model(units=3, activation=None):
    import keras
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu"),
                             keras.layers.Dense(units, activation=activation)])


def test_fresh_model_trains_a_copy_and_leaves_the_users_model_as_it_was():
    import numpy as np
    mine = small_model()
    before = [w.copy() for w in mine.get_weights()]
    copy = user_model.fresh_model(mine, (4,), 3)
    assert copy is not mine
    for a, b in zip(copy.get_weights(), before):  # the copy starts from the user's weights
        np.testing.assert_array_equal(a, b)
    copy.compile("sgd", "sparse_categorical_crossentropy")
    copy.fit(np.ones((8, 4)), np.zeros(8), epochs=1, verbose=0)
    for a, b in zip(mine.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    built = user_model.fresh_model(lambda shape, n: small_model(n), (4,), 7)  # a builder is called
    assert built.outputs[0].shape[-1] == 7


def test_classifier_loss_uses_the_compiled_loss_else_reads_the_output_layer():
    import keras
    compiled = small_model(3, "softmax")
    compiled.compile("adam", keras.losses.CategoricalFocalCrossentropy(), metrics=["mae"])
    loss, metrics, why = user_model.classifier_loss(compiled, 3)
    assert isinstance(loss.inner, keras.losses.CategoricalFocalCrossentropy)  # fed one-hot labels
    assert why.startswith("its own compiled loss (categorical_focal_crossentropy)")
    assert metrics[0] == "accuracy" and len(metrics) == 2  # accuracy first, then the model's
    softmax = user_model.classifier_loss(small_model(3, "softmax"), 3)[0]
    logits = user_model.classifier_loss(small_model(3), 3)[0]
    assert isinstance(softmax, keras.losses.SparseCategoricalCrossentropy)
    assert not softmax.get_config()["from_logits"] and logits.get_config()["from_logits"]
    binary = user_model.classifier_loss(small_model(1, "sigmoid"), 2)[0]
    assert isinstance(binary, keras.losses.BinaryCrossentropy)


@pytest.mark.parametrize("units, activation, classes, message", [
    (1, None, 2, "regression output"),
    (4, "softmax", 10, "4 output units but the data has 10 classes"),
    (3, "sigmoid", 3, "multi-label"),
])
def test_classifier_loss_refuses_outputs_that_are_not_a_classifier_of_the_data(
        units, activation, classes, message):
    with pytest.raises(ValueError, match=message):
        user_model.classifier_loss(small_model(units, activation), classes)
