"""What TensorBoard makes of the recipes' logs: HParams trials that answer each comparison,
a Text summary per run, Custom Scalars charts; several recipes and days in one logdir.

Runs the recipes in this process (tiny), then asks the real TensorBoard server what its
HParams, Text and Custom Scalars tabs would show. tests/test_tensorboard_browser.py looks
at the rendered pages themselves.
"""
import json
import urllib.request

import pytest

from helpers import read_tensorboard_tags, tensorboard_server
from experiments import batch  # noqa: E402
from experiments import mixed_precision  # noqa: E402
from experiments import prune  # noqa: E402

BATCH = dict(batch_sizes=(8, 16), epochs=2, steps_per_epoch=3, warmup_steps=1)


def text_summary(run_dir):
    """The markdown of the run's Text summary tagged `summary`."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("summary")
    return tf.make_ndarray(event.tensor_proto).item().decode()


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """A logdir as a user's fills up: two days of batch, a prune sweep, a mixed --compare."""
    from datasets import shapes
    tiny_images = shapes.load(60, 20, image_size=28, channels=1, seed=0)
    root = tmp_path_factory.mktemp("runs")
    metrics = {}
    for day in ("20260101T000000Z", "20260102T000000Z"):
        metrics[f"batch/{day}"] = batch.run(batch.Config(**BATCH), str(root / "batch" / day),
                                            tiny_images)
    metrics["prune"] = prune.run(prune.Config(baseline_epochs=1, epochs=1, steps_per_epoch=3,
                                              sweep=(0.5,)), str(root / "prune" / "r"),
                                 tiny_images)
    metrics["mixed_precision"] = mixed_precision.run(
        mixed_precision.Config(policy="mixed_bfloat16", compare=True, epochs=2, batch_size=16,
                               steps_per_epoch=2, filters=(8, 8), dense_units=8),
        str(root / "mixed_precision" / "r"), tiny_images)
    return root, metrics


def test_each_trial_holds_the_numbers_the_run_reported(logdir):
    root, metrics = logdir
    day = root / "batch" / "20260101T000000Z"
    for b in BATCH["batch_sizes"]:
        tags = read_tensorboard_tags(day / "hparams" / f"batch_{b}")
        assert tags["batch/examples_per_sec"] == [
            pytest.approx(metrics[f"batch/{day.name}"][f"examples_per_sec_b{b}"], rel=1e-6)]
        # Custom Scalars: examples/s for each of the two epochs
        assert len(read_tensorboard_tags(day / f"batch_{b}")["batch/epoch_examples_per_sec"]) == 2
    trial = read_tensorboard_tags(root / "prune" / "r" / "hparams" / "sparsity_50")
    assert trial["prune/accuracy"] == [pytest.approx(metrics["prune"]["sweep_accuracy_s50"])]
    baseline = read_tensorboard_tags(root / "prune" / "r" / "hparams" / "baseline")
    assert baseline["prune/gzip_bytes"] == [metrics["prune"]["baseline_gzip_bytes"]]
    policy = read_tensorboard_tags(root / "mixed_precision" / "r" / "hparams" / "float32")
    assert policy["mixed_precision/val_accuracy"] == [
        pytest.approx(metrics["mixed_precision"]["float32_val_accuracy"], rel=1e-6)]


def test_the_text_summary_is_the_table_the_run_printed(logdir):
    root, metrics = logdir
    day = root / "batch" / "20260101T000000Z"
    text = text_summary(day)
    assert text.startswith("```\n") and text.endswith("\n```")
    assert text.strip("`\n").splitlines()[0].split() == [
        "batch", "lr", "examples/s", "p50", "ms", "p90", "ms", "val_acc", "val_loss", "wall", "s"]
    best = metrics[f"batch/{day.name}"]["best_batch_size"]
    assert [line.split()[0] for line in text.splitlines() if "<- best" in line] == [str(best)]
    assert "sweep:" in text_summary(root / "prune" / "r")  # the sweep's table too
    assert "float32" in text_summary(root / "mixed_precision" / "r")


def post_json(url, payload):
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_tensorboard_shows_one_hparams_table_for_every_recipe_and_day(logdir):
    root, _ = logdir
    with tensorboard_server(root) as get:
        listing = get("/data/plugins_listing")
        assert {name for name in ("hparams", "text", "custom_scalars")
                if listing[name]["enabled"]} == {"hparams", "text", "custom_scalars"}
        base = get.base_url
        experiment = post_json(base + "/data/plugin/hparams/experiment", {"experimentName": ""})
        hparams = {h["name"] for h in experiment["hparamInfos"]}
        assert {"recipe", "batch_size", "learning_rate", "sparsity", "engine", "policy"} <= hparams
        groups = post_json(base + "/data/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 100, "colParams": [],
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                "STATUS_RUNNING"]})["sessionGroups"]
        layout = get("/data/plugin/custom_scalars/layout")
    by_recipe = {}
    for group in groups:
        recipe = group["hparams"]["recipe"]
        by_recipe.setdefault(recipe, []).append(group)
        # a trial's metrics are its own recipe's: no column mixes two recipes
        assert {m["name"]["tag"].split("/")[0] for m in group["metricValues"]} == {recipe}
    # two days of a 2-size sweep: 4 trials (the same settings on two days stay two rows);
    # prune: the baseline, 80% and the 50% sweep; mixed_precision: two policies
    assert {r: len(g) for r, g in by_recipe.items()} == {"batch": 4, "prune": 3,
                                                          "mixed_precision": 2}
    assert sorted(g["hparams"]["batch_size"] for g in by_recipe["batch"]) == [8, 8, 16, 16]
    assert sorted(c["title"] for c in layout["category"]) == ["batch", "mixed_precision"]
