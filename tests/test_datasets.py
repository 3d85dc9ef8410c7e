"""datasets/: the generated default, idx files, class folders, the toy."""
import hashlib

import numpy as np
import pytest
from PIL import Image

from helpers import write_idx_gz, write_idx_set

import datasets
from datasets import folder, idx, shapes
from datasets.errors import DataError

# sha1 of shapes.generate(200, seed=0) before shapes_hard got its name (commit 324b9a3).
SHAPES_HARD_200_SHA1 = "29ab38222ea7c43818631fcc706ab0eed1a2929f"


def test_shapes_is_deterministic_for_a_seed():
    a, labels_a = shapes.generate(30, seed=3)
    b, labels_b = shapes.generate(30, seed=3)
    c, _ = shapes.generate(30, seed=4)
    assert np.array_equal(a, b) and np.array_equal(labels_a, labels_b)
    assert not np.array_equal(a, c)


def test_shapes_prefix_does_not_depend_on_set_size():
    small, _ = shapes.generate(10, seed=0)
    large, _ = shapes.generate(50, seed=0)
    assert np.array_equal(small, large[:10])


def test_shapes_any_geometry_and_balanced_classes():
    (x, y), (x_val, y_val) = shapes.load(40, 20, image_size=64, channels=3, seed=0)
    assert x.shape == (40, 64, 64, 3) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 1
    assert np.bincount(y).tolist() == [4] * 10
    train_set = {a.tobytes() for a in x}
    assert not any(v.tobytes() in train_set for v in x_val)  # validation is disjoint


def _mlp_val_accuracy(variant):
    """The batch recipe's classifier (Flatten, Dense 128, logits), 5 epochs on 3,000 images."""
    import keras
    keras.utils.set_random_seed(0)
    (x, y), (x_val, y_val) = shapes.load(3000, 500, seed=0, variant=variant)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, epochs=5, batch_size=32, verbose=0)
    return model.evaluate(x_val, y_val, verbose=0)[1]


def test_default_shapes_teach_a_small_mlp_but_not_to_perfection():
    """Measured 0.926, 0.928, 0.934 for seeds 0-2; on shapes_hard 0.16-0.19 (chance is 0.10)."""
    accuracy = _mlp_val_accuracy("shapes")
    assert 0.85 < accuracy < 0.99, accuracy
    assert _mlp_val_accuracy("shapes_hard") < 0.4  # the earlier default: too hard for an MLP


def test_shapes_hard_is_still_learnable_by_a_small_cnn():
    """A small CNN gets well above chance (10%) in a few epochs, but not to 100%."""
    import keras
    keras.utils.set_random_seed(0)
    (x, y), (x_val, y_val) = shapes.load(3000, 500, seed=0, variant="shapes_hard")
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, epochs=4, batch_size=64, verbose=0)
    _, accuracy = model.evaluate(x_val, y_val, verbose=0)
    assert 0.25 < accuracy < 1.0


def test_shapes_hard_is_the_earlier_generator_pixel_for_pixel():
    """shapes_hard keeps the numbers measured on the earlier default valid: same pixels."""
    images, labels = shapes.generate(200, seed=0, variant="shapes_hard")
    assert hashlib.sha1(images.tobytes()).hexdigest() == SHAPES_HARD_200_SHA1
    assert labels.tolist() == [i % 10 for i in range(200)]


def _light_on_dark(images):
    """Per image: corners (never the figure) dark and its brightest 2% (the figure) light."""
    corners = images[:, [0, 0, -1, -1], [0, -1, 0, -1]].astype(float).mean(axis=(1, 2))
    brightest = np.percentile(images.reshape(len(images), -1), 98, axis=1)
    return (corners < shapes.DARK_MAX + 40) & (brightest > shapes.LIGHT_MIN - 40)


def test_default_shapes_draw_a_light_figure_on_a_dark_background():
    images, _ = shapes.generate(100, image_size=32, channels=3, seed=0)
    assert _light_on_dark(images).all()
    hard, _ = shapes.generate(100, image_size=32, channels=3, seed=0, variant="shapes_hard")
    assert _light_on_dark(hard).mean() < 0.5  # the check tells the variants apart


def test_large_shapes_sets_are_drawn_once_then_read_back(tmp_path, monkeypatch):
    n_train, n_val = shapes.CACHE_MIN_EXAMPLES - 100, 100
    first = shapes.load(n_train, n_val, image_size=8, seed=5, cache_dir=tmp_path)
    [cached] = tmp_path.glob("shapes-arrays-8px-1ch-*.npz")

    def no_drawing(*args, **kwargs):
        raise AssertionError("drew the set again instead of reading the cache")

    monkeypatch.setattr(shapes, "generate", no_drawing)
    again = shapes.load(n_train, n_val, image_size=8, seed=5, cache_dir=tmp_path)
    for (a, b), (c, d) in zip(first, again):  # (train, val), each (images, labels)
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    monkeypatch.undo()
    cached.write_bytes(cached.read_bytes()[:100])  # a damaged cache is drawn again, whole
    redrawn = shapes.load(n_train, n_val, image_size=8, seed=5, cache_dir=tmp_path)
    np.testing.assert_array_equal(redrawn[1][0], first[1][0])
    other = shapes.load(n_train, n_val, image_size=8, seed=5, cache_dir=tmp_path,
                        variant="shapes_hard")
    assert not np.array_equal(other[0][0], first[0][0])  # another look, another file
    assert len(list(tmp_path.glob("*.npz"))) == 2 and not list(tmp_path.glob("*.tmp"))


def test_shapes_folder_is_written_once_and_reused(tmp_path):
    root = shapes.cached_folder(20, 10, image_size=32, channels=3, cache_dir=tmp_path)
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert classes == sorted(shapes.CLASS_NAMES)
    files = list((root / "train").glob("*/*.jpg"))
    assert len(files) == 20 and len(list((root / "validation").glob("*/*.jpg"))) == 10
    with Image.open(files[0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    stamp = files[0].stat().st_mtime_ns
    assert shapes.cached_folder(20, 10, image_size=32, channels=3, cache_dir=tmp_path) == root
    assert files[0].stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name or p.name.startswith("train.")]


def test_idx_files_read_back_exactly(tmp_path):
    written = write_idx_set(tmp_path)
    (x, y), (x_test, y_test) = idx.load("fashion_mnist", tmp_path)
    assert np.array_equal(x, written["train"][0]) and np.array_equal(y, written["train"][1])
    assert np.array_equal(x_test, written["t10k"][0]) and np.array_equal(y_test, written["t10k"][1])


def test_idx_as_recipe_arrays_are_scaled_with_a_channel_axis(tmp_path):
    write_idx_set(tmp_path)
    (x, y), (x_val, _) = datasets.load("mnist", tmp_path)
    assert x.shape == (6, 28, 28, 1) and x.dtype == np.float32 and x.max() <= 1
    assert x_val.shape == (4, 28, 28, 1)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:20]), "not a readable idx file"),
    (lambda p: write_idx_gz(p, 2051, (6, 28, 28), bytes(100)), "truncated"),
    (lambda p: write_idx_gz(p, 1234, (6, 28, 28), bytes(6 * 28 * 28)), "magic number 1234"),
    (lambda p: write_idx_gz(p, 2051, (5, 28, 28), bytes(5 * 28 * 28)), "has 5 images but train-labels-idx1-ubyte.gz has 6 labels"),
])
def test_corrupt_idx_file_is_named_in_the_error(tmp_path, damage, message):
    write_idx_set(tmp_path)
    damage(tmp_path / "train-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match=message) as error:
        idx.load("mnist", tmp_path)
    assert "train" in str(error.value)


def test_missing_idx_files_name_data_dir(tmp_path):
    with pytest.raises(DataError, match="--data_dir=.* lacks train-images-idx3-ubyte.gz"):
        idx.load("mnist", tmp_path)


def make_class_tree(root, classes=("cats", "dogs"), per_class=5, size=12):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size + i, size), (40 * c, 90, 200)).save(root / name / f"{i}.png")
    return root


def test_directory_uses_train_and_val_subtrees(tmp_path):
    make_class_tree(tmp_path / "train")
    make_class_tree(tmp_path / "val", per_class=2)
    (x, y), (x_val, y_val) = datasets.load("directory", tmp_path, image_size=16, channels=3)
    assert x.shape == (10, 16, 16, 3) and x_val.shape == (4, 16, 16, 3)
    assert sorted(set(y.tolist())) == [0, 1]


def test_directory_without_subtrees_gets_a_seeded_split(tmp_path):
    make_class_tree(tmp_path, per_class=10)
    first = datasets.load("directory", tmp_path, image_size=8, channels=1, seed=1)
    again = datasets.load("directory", tmp_path, image_size=8, channels=1, seed=1)
    (x, _), (x_val, _) = first
    assert len(x) == 16 and len(x_val) == 4
    assert np.array_equal(first[1][0], again[1][0])


def test_directory_with_one_class_is_rejected(tmp_path):
    make_class_tree(tmp_path, classes=("only",))
    with pytest.raises(DataError, match="one class folder"):
        folder.find_tree(tmp_path)


def test_threshold_toy_is_x_above_half():
    (x, y), _ = datasets.load("threshold")
    assert x[:, 0].tolist() == pytest.approx([0.1, 0.3, 0.6, 0.9])
    assert y.tolist() == [0, 0, 1, 1]
