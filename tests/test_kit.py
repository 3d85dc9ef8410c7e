"""The measuring kit: one block of text pasted into every recipe that times or writes.

Drop-in recipe files cannot import a shared module, so each carries the same
block between two marker comments. These tests fail when any copy drifts, when
a recipe grows its own timer or writer beside the kit, and when the kit's rules
(median throughput, one warm-up rule, the clock waiting for the device,
atomic writes) break.
"""
import pathlib
import re
import time

import pytest

from helpers import REPO
from recipes import batch as kit  # any copy: test_every_copy_is_the_same_text checks the rest

START = "# --- measuring kit:"
END = "# --- end of measuring kit"
KIT_NAMES = ("StepTimer", "steady", "throughput", "write_atomically")
# The recipes that time training steps or write files; each must carry the kit.
CARRIERS = ("batch", "device", "mixed_precision", "prune", "stream", "tf_profile", "transfer")


def kit_block(path):
    text = pathlib.Path(path).read_text()
    assert text.count(START) == 1 and text.count(END) == 1, f"{path}: one kit block expected"
    return text[text.index(START):text.index(END)]


def test_every_copy_is_the_same_text():
    blocks = {name: kit_block(REPO / "recipes" / f"{name}.py") for name in CARRIERS}
    reference = blocks["batch"]
    drifted = [name for name, block in blocks.items() if block != reference]
    assert not drifted, f"the measuring kit differs from recipes/batch.py's in: {drifted}"


def test_no_recipe_defines_a_kit_name_outside_its_kit_block():
    for path in sorted((REPO / "recipes").glob("*.py")):
        text = path.read_text()
        if START in text:
            text = text[:text.index(START)] + text[text.index(END):]
        for name in KIT_NAMES:
            assert not re.search(rf"^(def|class) {name}\b", text, re.M), (
                f"{path.name} defines its own {name}: use the kit's, or give a helper that "
                "measures something else its own name")


def test_every_recipe_that_times_or_writes_carries_the_kit():
    """A recipe file that times with perf_counter or renames files into place has the kit."""
    for path in sorted((REPO / "recipes").glob("*.py")):
        text = path.read_text()
        if START in text:
            text = text[:text.index(START)] + text[text.index(END):]
        if "os.replace(" in text or "perf_counter" in text:
            assert path.stem in CARRIERS, f"{path.name} times or writes files without the kit"


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
