"""--dataset / --data_dir -> the data a recipe's DATA declares, through datasets/.

With --model, the model's input decides the geometry: images are loaded at its
height, width and channels, and reach it in the range it wants (0-255, [0, 1] or
[-1, 1]: experiments.pixels.pixel_range decides from what the model does, and
--pixel_range overrides it).
"""
from cli import UsageError


def model_geometry(model, path, dataset):
    """(height, width, channels) of the model's image input; UsageError when images
    cannot fill it (a model of feature vectors, say)."""
    if len(model.inputs) != 1:
        raise UsageError(f"--model={path} has {len(model.inputs)} inputs; the recipes feed one")
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or shape[-1] not in (1, 3):
        raise UsageError(f"--model={path} takes inputs shaped {shape}, which --dataset={dataset} "
                         "images (height, width, 1 or 3 channels) cannot fill: use "
                         "--dataset=npz --data_dir=FILE.npz with arrays of that shape")
    return shape


def load(command, model=None):
    """(dataset name, data) for the recipe; DataError/UsageError (one line) for bad data."""
    import datasets  # Deferred so --help stays instant.

    module, config, fv = command.module, command.config, command.values
    spec = dict(getattr(module, "DATA", {"form": "arrays"}))
    for key in ("image_size", "channels"):  # a recipe's Config may override its geometry
        if hasattr(config, key):
            spec[key] = getattr(config, key)
    dataset = fv.dataset or ("directory" if fv.data_dir
                             else getattr(module, "DEFAULT_DATASET", "shapes"))
    if spec["form"] == "arrays_or_directory":  # a folder as a folder, anything else as arrays
        spec["form"] = "directory" if dataset == "directory" else "arrays"
    if fv.pixel_range != "auto" and (model is None or dataset == "npz"):
        raise UsageError("--pixel_range goes with --model=FILE and images (the recipes' own "
                         "models take [0, 1]; .npz arrays reach a model as they are)")
    if model is None or dataset == "npz":
        data = datasets.load(dataset, fv.data_dir, seed=fv.seed, **spec)
        return dataset, (check_npz_fits(model, command.model_path, data) if model else data)
    height, width, channels = model_geometry(model, command.model_path, dataset)
    if spec["form"] == "directory":  # the recipe decodes the images itself, square and RGB
        fed = getattr(command.module, "FOLDER_CHANNELS", (3,))
        if height is None or height != width or channels not in fed:
            kinds = " or ".join({1: "gray", 3: "RGB"}[c] for c in sorted(fed, reverse=True))
            raise UsageError(f"--model={command.model_path} takes {(height, width, channels)} "
                             f"inputs; --recipe={command.name} feeds square {kinds} images")
        command.config = _with_image_size(config, height)
        return dataset, datasets.load(dataset, fv.data_dir, seed=fv.seed,
                                      **{**spec, "image_size": height})
    size = height or spec.get("image_size", 28)
    data = datasets.load(dataset, fv.data_dir, seed=fv.seed,
                         **{**spec, "image_size": size, "channels": channels})
    if width is not None and width != size:
        data = tuple((_resize(x, (size, width)), y) for x, y in data)
    from experiments.pixels import PIXEL_RANGES, from_unit, pixel_range

    wanted, _, why = pixel_range(model, fv.pixel_range)
    print(f"pixels reach --model in {PIXEL_RANGES[wanted][0]}: {why}")
    return dataset, tuple((from_unit(x, wanted), y) for x, y in data)  # the loaders give [0, 1]


def check_npz_fits(model, path, data):
    (x_train, _), _ = data
    expected = tuple(model.inputs[0].shape[1:])
    got = tuple(x_train.shape[1:])
    if len(got) != len(expected) or any(e not in (None, g) for e, g in zip(expected, got)):
        raise UsageError(f"--model={path} takes inputs shaped {expected}; the .npz arrays are "
                         f"shaped {got}")
    return data


def _with_image_size(config, size):
    import dataclasses
    return dataclasses.replace(config, image_size=size)


def _resize(images, size):
    import tensorflow as tf
    return tf.image.resize(images, size).numpy()
