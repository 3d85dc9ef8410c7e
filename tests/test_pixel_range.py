"""The pixel range a --model gets: decided from what the model does, not its first layer.

keras.io's models put augmentation (a Sequential of RandomFlip and RandomRotation) before
Rescaling(1/255); feature extractors nest it; keras.applications networks built without
their preprocessing were trained on their preprocess_input's range. --pixel_range overrides.
"""
import keras
import numpy as np
import pytest

import main
from experiments.pixels import from_unit, pixel_range
from helpers import error_lines, run_cli

L = keras.layers
SIZE, CLASSES = 32, 10  # the shapes data set's ten classes


def keras_io_model():
    """keras.io's image_classification_from_scratch, small: augmentation, then Rescaling."""
    augmentation = keras.Sequential([L.RandomFlip("horizontal"), L.RandomRotation(0.1)])
    inputs = keras.Input((SIZE, SIZE, 3))
    x = L.Rescaling(1.0 / 255, name="rescaling")(augmentation(inputs))
    x = L.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(CLASSES, activation="softmax")(x), name="keras_io")


def nested_extractor():
    """A feature extractor (its own Sequential: flip, Rescaling to [-1, 1], conv) in a model."""
    features = keras.Sequential([L.RandomFlip(), L.Rescaling(1 / 127.5, offset=-1),
                                 L.Conv2D(8, 3, activation="relu")], name="features")
    return keras.Sequential([keras.Input((SIZE, SIZE, 3)), features, L.GlobalAveragePooling2D(),
                             L.Dense(CLASSES)], name="with_extractor")


def unscaled_cnn():
    return keras.Sequential([keras.Input((SIZE, SIZE, 3)), L.RandomZoom(0.1),
                             L.Conv2D(8, 3, activation="relu", name="conv2d"),
                             L.GlobalAveragePooling2D(),
                             L.Dense(CLASSES)], name="unscaled")


def mobilenet_v2():
    """keras.applications' MobileNetV2, no weights, no preprocessing: trained on [-1, 1]."""
    base = keras.applications.MobileNetV2(alpha=0.35, weights=None, include_top=False,
                                          input_shape=(SIZE, SIZE, 3))
    return keras.Sequential([keras.Input((SIZE, SIZE, 3)), base, L.GlobalAveragePooling2D(),
                             L.Dense(CLASSES, activation="softmax")], name="on_mobilenet")


def test_augmentation_before_rescaling_wants_0_255():
    wanted, layer, why = pixel_range(keras_io_model())
    assert (wanted, layer[1]) == ("0_255", "Rescaling")
    assert "scales them to [0, 1] (after RandomFlip, RandomRotation)" in why


def test_a_nested_feature_extractor_is_looked_into():
    wanted, layer, why = pixel_range(nested_extractor())
    assert (wanted, layer[1]) == ("0_255", "Rescaling")  # Rescaling(1/127.5, -1) takes 0-255
    assert "(Rescaling, inside 'features') scales them to [-1, 1] (after RandomFlip)" in why


@pytest.mark.parametrize("scale, offset, wanted", [
    (1 / 255, 0, "0_255"), (1 / 127.5, -1, "0_255"), (1 / 128, -1, "0_255"),
    (2, -1, "0_1"), (255, 0, "0_1"), (0.5, 0.5, "-1_1")])
def test_rescaling_wants_the_range_it_maps_onto_a_unit_range(scale, offset, wanted):
    model = keras.Sequential([keras.Input((8, 8, 3)), L.Rescaling(scale, offset=offset),
                              L.Flatten(), L.Dense(2)])
    assert pixel_range(model)[0] == wanted


def test_normalization_wants_the_range_its_statistics_come_from():
    rng = np.random.default_rng(0)
    adapted = {}
    shapes = (rng.uniform(size=(20, 8, 8, 3)) > 0.85).astype("float32")  # white on black
    for name, images in (("0_255", rng.uniform(0, 255, (20, 8, 8, 3))),
                         ("0_1", shapes), ("-1_1", shapes * 2 - 1),
                         ("-1_1 uniform", rng.uniform(-1, 1, (20, 8, 8, 3)))):
        norm = L.Normalization()
        norm.adapt(images)
        adapted[name] = pixel_range(keras.Sequential([keras.Input((8, 8, 3)), norm,
                                                      L.Flatten(), L.Dense(2)]))
    assert {name: got[0] for name, got in adapted.items()} == {
        "0_255": "0_255", "0_1": "0_1", "-1_1": "-1_1", "-1_1 uniform": "-1_1"}
    assert "statistics that fit 0-255 pixels" in adapted["0_255"][2]
    # Not adapted (mean 0, variance 1) it changes nothing: the Rescaling after it decides.
    model = keras.Sequential([keras.Input((8, 8, 3)), L.Normalization(), L.Rescaling(2, offset=-1),
                              L.Flatten(), L.Dense(2)])
    assert pixel_range(model)[0] == "0_1"


def test_a_model_that_scales_nothing_gets_0_1_and_says_so():
    wanted, layer, why = pixel_range(unscaled_cnn())
    assert (wanted, layer[1]) == ("0_1", "Conv2D")
    assert why.startswith("nothing rescales or normalizes them before its layer")
    assert "(after RandomZoom)" in why and "--pixel_range" in why


def test_a_keras_applications_network_without_preprocessing_gets_its_familys_range():
    wanted, layer, why = pixel_range(mobilenet_v2())
    assert wanted == "-1_1" and layer[0].startswith("mobilenetv2_0.35_")
    assert "keras.applications network whose weights were trained on preprocess_input's " \
           "tf mode: [-1, 1]" in why


def test_a_keras_applications_network_with_its_own_rescaling_takes_0_255():
    base = keras.applications.MobileNetV3Small(weights=None, include_top=False,
                                               input_shape=(SIZE, SIZE, 3))
    model = keras.Sequential([keras.Input((SIZE, SIZE, 3)), base, L.GlobalAveragePooling2D(),
                              L.Dense(CLASSES)])
    wanted, layer, why = pixel_range(model)
    assert (wanted, layer[1]) == ("0_255", "Rescaling")
    assert f"inside '{base.name}') scales them to [-1, 1]" in why


@pytest.mark.parametrize("name, wanted, mode", [
    ("vgg16", "0_255", "caffe mode"), ("resnet50", "0_255", "caffe mode"),
    ("densenet121", "-1_1", "torch mode"), ("xception", "-1_1", "tf mode"),
    ("mobilenet_1.00_224", "-1_1", "tf mode"), ("my_resnet50", "0_1", None)])
def test_applications_families_by_name(name, wanted, mode):
    model = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(2, 3)], name=name)
    got, _, why = pixel_range(model)
    assert got == wanted
    assert (mode in why) if mode else why.startswith("nothing rescales")


def test_the_override_wins_and_says_what_auto_would_give():
    wanted, layer, why = pixel_range(keras_io_model(), "-1_1")
    assert (wanted, layer) == ("-1_1", None)
    assert why.startswith("--pixel_range=-1_1 chooses it (auto would give 0-255: its layer")
    with pytest.raises(ValueError, match="--pixel_range must be one of auto, 0_255, 0_1, -1_1"):
        pixel_range(keras_io_model(), "0_256")


def test_from_unit_scales_the_loaders_pixels():
    x = np.array([0.0, 0.5, 1.0], "float32")
    assert from_unit(x, "0_255").tolist() == [0.0, 127.5, 255.0]
    assert from_unit(x, "0_1") is x
    assert from_unit(x, "-1_1").tolist() == [-1.0, 0.0, 1.0]
    assert from_unit(x, "-1_1").dtype == np.float32


def test_stream_scales_its_loaders_in_front_of_the_model(stream):
    make, _ = stream.model_for_loaders(keras_io_model(), stream.Config(image_size=SIZE,
                                                                       pixel_range="-1_1"), CLASSES)
    first = make()[0].layers[0]
    assert isinstance(first, L.Rescaling)
    ones = np.ones((1, SIZE, SIZE, 3), "float32")
    assert [float(np.asarray(first(v * ones)).mean()) for v in (0.0, 0.5, 1.0)] == [-1, 0, 1]


# --- through the command line ------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for build in (keras_io_model, mobilenet_v2, unscaled_cnn):
        paths[build.__name__] = folder / f"{build.__name__}.keras"
        build().save(paths[build.__name__])
    return paths


def cli_pixels(model_path, *flags):
    """What the command line feeds --model: the line it prints and the training images."""
    from cli import data, flags as cli_flags, models

    command = cli_flags.parse(["main.py", "--recipe=batch", f"--model={model_path}", *flags],
                              main.__doc__)
    _, ((x, _), _) = data.load(command, models.load(str(model_path)))
    return x


@pytest.mark.parametrize("model, line, low, high", [
    ("keras_io_model", "pixels reach --model in 0-255: its layer 'rescaling", 0, 255),
    ("mobilenet_v2", "pixels reach --model in [-1, 1]: 'mobilenetv2_0.35_32' is a "
                     "keras.applications network", -1, 1),
    ("unscaled_cnn", "pixels reach --model in [0, 1]: nothing rescales or normalizes them "
                     "before its layer 'conv2d", 0, 1)])
def test_the_command_line_feeds_the_range_the_model_wants(saved, capsys, model, line, low, high):
    x = cli_pixels(saved[model])
    assert line in capsys.readouterr().out
    assert x.min() == pytest.approx(low, abs=0.01) and x.max() == pytest.approx(high, abs=0.5)


def test_pixel_range_flag_overrides_the_choice(saved, capsys):
    x = cli_pixels(saved["keras_io_model"], "--pixel_range=-1_1")
    assert "pixels reach --model in [-1, 1]: --pixel_range=-1_1 chooses it (auto would give " \
           "0-255" in capsys.readouterr().out
    assert x.min() == pytest.approx(-1, abs=0.01) and x.max() == pytest.approx(1, abs=0.01)


def test_pixel_range_without_a_model_file_is_one_line_error(tmp_path, capsys):
    code = main.main(["main.py", "--recipe=batch", "--pixel_range=0_255",
                      f"--logdir={tmp_path / 'runs'}"])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: --pixel_range goes with --model=FILE")
    assert not (tmp_path / "runs").exists()


def test_a_bad_pixel_range_is_one_line_error_exit_2(saved):
    result = run_cli("--recipe=batch", f"--model={saved['keras_io_model']}",
                     "--pixel_range=0_256")
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:") and "pixel_range" in lines[0]
    assert "auto|0_255|0_1|-1_1" in lines[0]


def test_keras_io_model_trains_on_0_255_through_the_cli(saved, tmp_path):
    result = run_cli("--recipe=batch", f"--model={saved['keras_io_model']}", "--batch_sizes=8",
                     "--epochs=1", "--steps_per_epoch=2", f"--logdir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("pixels reach --model in 0-255: its layer 'rescaling' (Rescaling) scales them to "
            "[0, 1] (after RandomFlip, RandomRotation)") in result.stdout
