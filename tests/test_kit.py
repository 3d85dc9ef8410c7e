"""The kits: blocks of text pasted into every recipe that needs them.

Drop-in recipe files cannot import a shared module, so each carries the same
blocks between marker comments: the measuring kit (in every recipe that times
or writes) and the model kit (in every recipe that trains the user's model).
These tests fail when any copy drifts, when a recipe grows its own version of
a kit's function beside it, and when the kits' rules break: median throughput,
one warm-up rule, the clock waiting for the device, atomic writes; copies of
the user's model, never the model itself, and the loss its output implies.
"""
import pathlib
import re
import time

import pytest

from helpers import REPO
from recipes import batch as kit  # any copy: test_every_copy_is_the_same_text checks the rest

# name: (first marker, end marker, the recipes that must carry it, the names it defines)
KITS = {
    "measuring": ("# --- measuring kit:", "# --- end of measuring kit",
                  ("batch", "device", "mixed_precision", "prune", "stream", "tf_profile",
                   "transfer"),
                  ("StepTimer", "steady", "throughput", "write_atomically")),
    "model": ("# --- model kit:", "# --- end of model kit",
              ("batch", "device", "mixed_precision", "prune", "stream", "tf_profile"),
              ("fresh_model", "output_activation", "classifier_loss")),
    "scale-out": ("# --- scale-out kit:", "# --- end of scale-out kit",
                  ("batch", "mixed_precision", "prune", "stream", "transfer"),
                  ("replica_count", "distribution_scope", "EpochCheckpoint",
                   "latest_checkpoint", "restore", "final_logs")),
    "TensorBoard": ("# --- TensorBoard kit:", "# --- end of TensorBoard kit",
                    ("batch", "device", "mixed_precision", "prune", "stream", "tf_profile",
                     "transfer"),
                    ("write_events", "scalar_pb", "log_text_summary", "log_hparams_trials", "log_custom_scalars",
                     "log_per_epoch")),
}

COMPOSED = ("advise",)  # the one recipe that is not drop-in: it imports the kits from a sibling


def kit_block(path, kit):
    start, end = KITS[kit][:2]
    text = pathlib.Path(path).read_text()
    assert text.count(start) == 1 and text.count(end) == 1, f"{path}: one {kit} kit expected"
    return text[text.index(start):text.index(end)]


def outside_kits(text):
    """The text of a recipe file with its kit blocks cut out."""
    for start, end, _, _ in KITS.values():
        if start in text:
            text = text[:text.index(start)] + text[text.index(end):]
    return text


@pytest.mark.parametrize("kit", sorted(KITS))
def test_every_copy_is_the_same_text(kit):
    carriers = KITS[kit][2]
    blocks = {name: kit_block(REPO / "recipes" / f"{name}.py", kit) for name in carriers}
    reference = blocks[carriers[0]]
    drifted = [name for name, block in blocks.items() if block != reference]
    assert not drifted, f"the {kit} kit differs from recipes/{carriers[0]}.py's in: {drifted}"


def test_no_recipe_defines_a_kit_name_outside_its_kit_block():
    for path in sorted((REPO / "recipes").glob("*.py")):
        text = outside_kits(path.read_text())
        for name in (n for kit in KITS.values() for n in kit[3]):
            assert not re.search(rf"^(def|class) {name}\b", text, re.M), (
                f"{path.name} defines its own {name}: use the kit's, or give a helper that "
                "measures something else its own name")


def test_every_recipe_that_times_writes_or_trains_a_users_model_carries_its_kit():
    """A recipe file that times with perf_counter or renames files into place has the
    measuring kit; one that copies the user's model has the model kit."""
    for path in sorted((REPO / "recipes").glob("*.py")):
        text = outside_kits(path.read_text())
        if path.stem in COMPOSED:  # not drop-in: it imports every kit name it uses
            used = {n for kit in KITS.values() for n in kit[3] if re.search(rf"\b{n}\(", text)}
            imported = re.search(r"from recipes\.\w+ import \(([^)]*)\)", text)
            assert imported and used <= set(re.findall(r"\w+", imported.group(1))), path.name
            continue
        if "os.replace(" in text or "perf_counter" in text:
            assert path.stem in KITS["measuring"][2], f"{path.name} times or writes, no kit"
        if "fresh_model(" in text or "classifier_loss(" in text:
            assert path.stem in KITS["model"][2], f"{path.name} trains a model, no model kit"


def test_throughput_is_examples_per_step_over_the_median_steady_step():
    seconds = [5.0, 0.010, 0.020, 0.030, 1.0]  # a compile, three steady steps, one stall
    result = kit.throughput(seconds, 64, warmup=1)
    assert result["step_time_ms_p50"] == pytest.approx(25.0)  # median of the last four
    assert result["examples_per_sec"] == pytest.approx(64 / 0.025)
    assert result["step_time_ms_p90"] == pytest.approx(1000 * (0.030 + 0.7 * (1.0 - 0.030)))


def test_warmup_rule_drops_warmup_steps_or_all_but_the_first():
    assert kit.steady([9, 1, 2, 3], warmup=2) == [2, 3]
    assert kit.steady([9, 1, 2], warmup=3) == [1, 2]  # too few: all but the first
    assert kit.steady([9], warmup=3) == [9]  # one timing is all there is


def test_step_timer_stops_the_clock_only_after_the_loss_is_on_the_host():
    class SlowLoss:  # what an asynchronous backend hands back: ready only when read
        def __array__(self, dtype=None, copy=None):
            time.sleep(0.05)
            return __import__("numpy").asarray(1.0)

    timer = kit.StepTimer()
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
        kit.write_atomically(target, crash_midway)
    assert target.read_text() == "the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]  # no partial left behind
    kit.write_atomically(target, lambda partial: pathlib.Path(partial).write_text("new"))
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def small_model(units=3, activation=None):
    import keras
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu"),
                             keras.layers.Dense(units, activation=activation)])


def test_fresh_model_trains_a_copy_and_leaves_the_users_model_as_it_was():
    import numpy as np
    mine = small_model()
    before = [w.copy() for w in mine.get_weights()]
    copy = kit.fresh_model(mine, (4,), 3)
    assert copy is not mine
    for a, b in zip(copy.get_weights(), before):  # the copy starts from the user's weights
        np.testing.assert_array_equal(a, b)
    copy.compile("sgd", "sparse_categorical_crossentropy")
    copy.fit(np.ones((8, 4)), np.zeros(8), epochs=1, verbose=0)
    for a, b in zip(mine.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    built = kit.fresh_model(lambda shape, n: small_model(n), (4,), 7)  # a builder is called
    assert built.outputs[0].shape[-1] == 7


def test_classifier_loss_uses_the_compiled_loss_else_reads_the_output_layer():
    import keras
    compiled = small_model(3, "softmax")
    compiled.compile("adam", keras.losses.CategoricalFocalCrossentropy(), metrics=["mae"])
    loss, metrics, why = kit.classifier_loss(compiled, 3)
    assert isinstance(loss, keras.losses.CategoricalFocalCrossentropy) and why.startswith("its own")
    assert metrics[0] == "accuracy" and len(metrics) == 2  # accuracy first, then the model's
    softmax = kit.classifier_loss(small_model(3, "softmax"), 3)[0]
    logits = kit.classifier_loss(small_model(3), 3)[0]
    assert isinstance(softmax, keras.losses.SparseCategoricalCrossentropy)
    assert not softmax.get_config()["from_logits"] and logits.get_config()["from_logits"]
    binary = kit.classifier_loss(small_model(1, "sigmoid"), 2)[0]
    assert isinstance(binary, keras.losses.BinaryCrossentropy)


@pytest.mark.parametrize("units, activation, classes, message", [
    (1, None, 2, "regression output"),
    (4, "softmax", 10, "4 output units but the data has 10 classes"),
    (3, "sigmoid", 3, "multi-label"),
])
def test_classifier_loss_refuses_outputs_that_are_not_a_classifier_of_the_data(
        units, activation, classes, message):
    with pytest.raises(ValueError, match=message):
        kit.classifier_loss(small_model(units, activation), classes)
