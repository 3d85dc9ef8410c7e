"""The stream recipe: ImageDataGenerator vs tf.data on image folders, bad files included.

The technique (recipes/stream.py) is tested alone through its Copy: example; the
experiment around it (experiments/stream.py) through run(), check() and the CLI."""
import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from helpers import (assert_median_throughput, error_lines, only_run_dir, read_tensorboard_tags,
                     run_cli, run_copy_example)

SIZE = 32  # images are written at the size the tests train on: no resizing differences
TINY = dict(epochs=1, batch_size=4, image_size=SIZE, warmup_steps=1, input_batches=3)


def write_tree(root, classes=("bright", "dark"), per_class=6):
    """root/<class>/<i>.jpg: noisy bright or dark 32x32 RGB JPEGs."""
    for label, name in enumerate(classes):
        folder = pathlib.Path(root) / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            rng = np.random.default_rng([label, i])
            base = 200 if label == 0 else 50
            pixels = np.clip(rng.normal(base, 20, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=95)
    return pathlib.Path(root)


def add_bad_and_odd_files(root):
    """The files that crash the stock loaders, plus colour modes both must convert."""
    bright, dark = root / "bright", root / "dark"
    whole = (bright / "0.jpg").read_bytes()
    (bright / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (bright / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    (dark / "zero.jpg").write_bytes(b"")
    rgb = Image.open(dark / "0.jpg").convert("RGB")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(dark / "alpha.png")
    rgb.convert("L").save(dark / "gray.jpg")
    rgb.convert("CMYK").save(dark / "cmyk.jpg")
    (bright / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (dark / "._0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    return ["truncated.jpg", "notes.jpg", "zero.jpg"]


@pytest.fixture(scope="module")
def image_folder():
    from experiments import image_folder
    return image_folder


def test_compare_skips_bad_files_uses_odd_colour_modes_and_reports_both_loaders(
        stream, tmp_path, capsys):
    root = write_tree(tmp_path / "data")
    bad = add_bad_and_odd_files(root)
    val_root = write_tree(tmp_path / "val", per_class=2)
    metrics = stream.run(stream.Config(compare=True, **TINY), str(tmp_path / "run"),
                         (root, val_root))
    # 12 good + RGBA PNG, gray and CMYK JPEGs; the 3 broken files are skipped, 2 hidden ignored
    assert metrics["train_images"] == 15 and metrics["val_images"] == 4
    assert metrics["skipped_files"] == 3 and metrics["hidden_files"] == 2
    assert sorted(p.split(":")[0].rsplit("/", 1)[1] for p in metrics["skipped_file_paths"]) == \
        sorted(bad)
    out = capsys.readouterr().out
    assert "skipped 3 unreadable image file(s)" in out and all(name in out for name in bad)
    for loader in ("generator", "tf_data"):
        assert_median_throughput(metrics, f"{loader}_train_images_per_sec",
                                 f"{loader}_step_time_ms_p50", TINY["batch_size"])
        assert 100 < metrics[f"{loader}_peak_rss_mb"] < 100_000  # MB: a TensorFlow process
    assert metrics["speedup"] == pytest.approx(
        metrics["tf_data_train_images_per_sec"] / metrics["generator_train_images_per_sec"])
    assert metrics["input_speedup"] == pytest.approx(
        metrics["tf_data_input_images_per_sec"] / metrics["generator_input_images_per_sec"])
    tags = read_tensorboard_tags(tmp_path / "run" / "hparams" / "tf_data")  # its HParams trial
    assert tags["stream/train_images_per_sec"] == [
        pytest.approx(metrics["tf_data_train_images_per_sec"], rel=1e-6)]
    per_epoch = read_tensorboard_tags(tmp_path / "run" / "generator")["stream/epoch_images_per_sec"]
    assert per_epoch == pytest.approx([metrics[f"generator_epoch{i}_images_per_sec"]
                                       for i in range(1, TINY["epochs"] + 1)], rel=1e-6)
    assert "epoch_loss" in read_tensorboard_tags(tmp_path / "run" / "generator" / "train")


def test_on_bad_image_fail_names_the_file_before_training(stream, tmp_path):
    root = write_tree(tmp_path / "data")
    (root / "dark" / "broken.jpg").write_text("not a jpeg")
    with pytest.raises(ValueError, match=r"dark/broken\.jpg.*--on_bad_image=skip"):
        stream.run(stream.Config(on_bad_image="fail", **TINY), str(tmp_path / "run"), (root, None))
    assert not (tmp_path / "run").exists()  # nothing was trained or logged


def test_empty_class_folder_is_an_error_naming_it(stream, tmp_path):
    root = write_tree(tmp_path / "data")
    (root / "empty").mkdir()
    (root / "empty" / ".DS_Store").write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"class folder .*empty has no readable images"):
        stream.run(stream.Config(**TINY), str(tmp_path / "run"), (root, None))


def test_single_class_folder_is_an_error(stream, tmp_path):
    root = write_tree(tmp_path / "data", classes=("only",))
    with pytest.raises(ValueError, match=r"1 class folder\(s\) \(only\).*at least two"):
        stream.run(stream.Config(**TINY), str(tmp_path / "run"), (root, None))


def test_both_loaders_give_the_same_classes_and_pixels(stream, stream_dropin, image_folder, tmp_path):
    root = write_tree(tmp_path / "data", per_class=3)
    add_bad_and_odd_files(root)
    scan = image_folder.scan_folder(root, SIZE)
    generator = stream_dropin.generator_flow(stream.link_tree(scan, tmp_path / "view"), scan.class_names,
                                      SIZE, batch_size=len(scan.paths), shuffle=False)
    x_gen, y_gen = generator[0]
    dataset, _ = stream_dropin.tf_data_pipeline(scan.paths, scan.labels, SIZE, len(scan.paths),
                                         training=False)
    x_tf, y_tf = (np.asarray(t) for t in next(iter(dataset)))
    assert x_gen.shape == x_tf.shape == (9, SIZE, SIZE, 3)
    np.testing.assert_array_equal(y_gen.astype(int), y_tf)
    assert list(y_tf) == scan.labels and scan.class_names == ["bright", "dark"]
    assert 0 <= x_tf.min() and 0.5 < x_tf.max() <= 1  # [0, 1], not divided by 255 twice
    # The same decoded pixels (JPEG decoders may differ by a level or two; CMYK a little more).
    assert np.abs(x_gen - x_tf).mean() < 2 / 255


def test_cache_is_complete_after_fill_and_reused_by_a_later_run(stream, stream_dropin, image_folder,
                                                               tmp_path):
    root = write_tree(tmp_path / "data")
    scan = image_folder.scan_folder(root, SIZE)
    config = stream.Config(image_size=SIZE, cache=str(tmp_path / "cache"))
    dataset, cached = stream.tf_data_loader(scan, config, 4, True, "train", steps=3)
    stream_dropin.fill_cache(cached)
    for path in map(pathlib.Path, scan.paths):  # from now on only the cache can serve them:
        stat = path.stat()  # zeros of the same size and mtime (the cache's key) are not a JPEG
        path.write_bytes(bytes(stat.st_size))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again, _ = stream.tf_data_loader(scan, config, 4, True, "train", steps=3)
    labels = np.concatenate([np.asarray(y) for _, y in again.take(2 * 3)])  # two epochs
    assert sorted(labels) == sorted(scan.labels * 2)


@pytest.mark.parametrize("augment_with", ["fused", "layers"])
def test_augment_changes_images_but_keeps_shape_and_range(stream_dropin, image_folder, tmp_path,
                                                         augment_with):
    root = write_tree(tmp_path / "data", per_class=4)
    scan = image_folder.scan_folder(root, SIZE)
    plain, _ = stream_dropin.tf_data_pipeline(scan.paths, scan.labels, SIZE, 8, training=True,
                                       cache="memory", seed=1)
    augmented, _ = stream_dropin.tf_data_pipeline(scan.paths, scan.labels, SIZE, 8, training=True,
                                           cache="memory", augment=True, seed=1,
                                           augment_with=augment_with)
    x_plain, x_aug = next(iter(plain))[0].numpy(), next(iter(augmented))[0].numpy()
    assert x_aug.shape == x_plain.shape == (8, SIZE, SIZE, 3)
    assert 0 <= x_aug.min() and 0.5 < x_aug.max() <= 1  # [0, 1], not divided by 255 twice
    assert np.abs(np.sort(x_aug, axis=None) - np.sort(x_plain, axis=None)).mean() > 1e-3


def test_random_affine_geometry_flips_and_shifts_like_the_generator(stream_dropin):
    image = np.zeros((1, 9, 9, 1), np.float32)
    image[0, 2, 1, 0] = 1  # one bright pixel at row 2, column 1
    images = np.repeat(image, 64, axis=0)
    flipped = stream_dropin.RandomAffine(rotation=0, shift=0, zoom=0, seed=3)(images).numpy()
    # each image is either unchanged or mirrored left-right (column 1 -> column 7)
    same = np.all(np.isclose(flipped, images), axis=(1, 2, 3))
    mirrored = np.all(np.isclose(flipped, images[:, :, ::-1]), axis=(1, 2, 3))
    assert np.all(same | mirrored) and 0 < same.sum() < 64
    # shifts of at most 1/9 of the size move the pixel by at most one row and one column
    shifted = stream_dropin.RandomAffine(rotation=0, shift=1 / 9, zoom=0, horizontal_flip=False,
                                  seed=3)(images).numpy()
    rows, cols = np.nonzero(shifted[:, :, :, 0].max(axis=0) > 0.5)
    assert set(rows) <= {1, 2, 3} and set(cols) <= {0, 1, 2}


def test_cli_lists_skipped_files_in_output_and_metrics_json(tmp_path):
    root = write_tree(tmp_path / "data")
    add_bad_and_odd_files(root)
    result = run_cli("--recipe=stream", "--dataset=directory", f"--data_dir={root}",
                     "--epochs=1", "--batch_size=4", f"--image_size={SIZE}", "--input_batches=2",
                     f"--logdir={tmp_path / 'runs'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped 3 unreadable image file(s)" in result.stdout and "notes.jpg" in result.stdout
    metrics = json.loads((only_run_dir(tmp_path / "runs", "stream") / "metrics.json").read_text())
    assert metrics["skipped_files"] == 3
    assert_median_throughput(metrics, "tf_data_train_images_per_sec", "tf_data_step_time_ms_p50", 4)


def test_cli_on_bad_image_fail_is_one_line_naming_the_file_exit_2(tmp_path):
    root = write_tree(tmp_path / "data")
    (root / "bright" / "zero.jpg").write_bytes(b"")
    result = run_cli("--recipe=stream", "--dataset=directory", f"--data_dir={root}",
                     "--on_bad_image=fail", f"--logdir={tmp_path / 'runs'}")
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "zero.jpg" in lines[0] and "--on_bad_image" in lines[0], lines
    assert not list((tmp_path / "runs").glob("stream/*"))  # no run folder was left


COPY_SETUP = """
import pathlib
import keras, numpy as np
from PIL import Image
import tensorflow_model_optimization  # switches tf.keras to Keras 2; must not matter
keras.utils.set_random_seed(0)
paths, labels = [], []
for label, base in enumerate((200, 50)):  # bright and dark noisy photos, 40x40
    folder = pathlib.Path("photos") / ("bright", "dark")[label]
    folder.mkdir(parents=True)
    for i in range(64):
        pixels = np.random.default_rng([label, i]).normal(base, 20, (40, 40, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg")
        paths.append(str(folder / f"{i}.jpg"))
        labels.append(label)
val_paths, val_labels = paths[::4], labels[::4]
model = keras.Sequential([keras.Input((150, 150, 3)), keras.layers.GlobalAveragePooling2D(),
                          keras.layers.Dense(2, activation="softmax")])
model.compile(keras.optimizers.Adam(0.2), "sparse_categorical_crossentropy", metrics=["accuracy"])
"""
COPY_CHECK = """
images, _ = next(iter(val))
assert images.shape == (32, 150, 150, 3) and 0 <= np.min(images)
assert 0.5 < np.max(images) <= 1  # bright images in [0, 1], not divided by 255 twice
assert model.evaluate(val, verbose=0)[1] > 0.9, "bright vs dark was not learned"
first, second = (np.concatenate([y for _, y in train]) for _ in range(2))  # one pass each
assert sorted(first) == sorted(labels) and list(first) != list(second)  # reshuffled each pass
originals = [pathlib.Path(path).read_bytes() for path in paths]
for path in paths:  # the memory cache filled in epoch 1 serves every later pass
    pathlib.Path(path).write_bytes(b"")
assert sorted(np.concatenate([y for _, y in train])) == sorted(labels)
for path, data in zip(paths, originals):
    pathlib.Path(path).write_bytes(data)
x_gen, y_gen = generator_flow("photos", ["bright", "dark"], 150, 8, shuffle=False)[0]
assert x_gen.shape == (8, 150, 150, 3) and 0 <= x_gen.min() and 0.5 < x_gen.max() <= 1
# Keras 3's fit takes the classic loader, whose images the model reads as it read tf.data's
history = model.fit(generator_flow("photos", ["bright", "dark"], 150, 32, workers=2), verbose=0)
assert history.history["accuracy"][-1] > 0.9, history.history
print("OK", [int(y) for y in y_gen])
"""


def test_copy_example_trains_on_paths_and_labels_with_a_memory_cache_alone(tmp_path):
    result = run_copy_example("stream.py", tmp_path, COPY_SETUP, COPY_CHECK,
                              backend="tensorflow")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK [0, 0, 0, 0, 0, 0, 0, 0]" in result.stdout
