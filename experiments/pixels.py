"""The pixel range a user's model wants, decided from what it does (not its first layer),
and the loaders' [0, 1] turned into it."""
import keras
import numpy as np


# name -> (the words for it, its lowest and highest value). The loaders give [0, 1].
PIXEL_RANGES = {"0_255": ("0-255", 0.0, 255.0), "0_1": ("[0, 1]", 0.0, 1.0),
                "-1_1": ("[-1, 1]", -1.0, 1.0)}
# keras.applications networks by the name they are built with, when nothing rescales their
# pixels first: what their preprocess_input feeds them (its mode), and the nearest range.
APPLICATIONS = (
    (r"vgg1[69]|resnet(50|101|152)", "0_255", "caffe mode: 0-255 in BGR order less the "
     "ImageNet mean; 0-255 is the nearest"),
    (r"densenet\d+|convnext_\w+|efficientnetv2-b\d", "-1_1", "torch mode: [0, 1] less the "
     "ImageNet mean, over its std (about -2 to 2.6); [-1, 1] is the nearest"),
    (r"resnet\d+v2|inception_v3|inception_resnet_v2|xception|mobilenet(v2)?_[\d.]+_\d+|"
     r"nasnet_(mobile|large)|MobileNetV3(Small|Large)|efficientnetv2-[sml]", "-1_1",
     "tf mode: [-1, 1]"),
)


def from_unit(x, pixel_range):
    """The loaders' [0, 1] pixels (an array or a tensor) in pixel_range ("0_255", "0_1",
    "-1_1"): x * 255, x, or x * 2 - 1."""
    _, low, high = PIXEL_RANGES[pixel_range]
    return x if pixel_range == "0_1" else x * (high - low) + low


def pixel_range(model, override="auto"):
    """(range, layer, reason): the range the model wants its pixels in ("0_255", "0_1" or
    "-1_1"), the layer that decided ((name, class name), or None for `override`), and why,
    in words for the output ("its layer 'rescaling' (Rescaling) scales them to [0, 1]").

    From the input on, it looks through the layers that keep the value range (Keras' image
    preprocessing: flips, rotations, zooms, translations, crops, contrast, resizing...;
    reshaping, padding, cropping, dropout, noise) and into nested models, to the first that
    rescales or normalizes. A Rescaling wants the range it maps onto [0, 1], [-1, 1] or
    0-255 (Rescaling(1/255) and Rescaling(1/127.5, offset=-1): 0-255; Rescaling(2,
    offset=-1): [0, 1]); an adapted Normalization the narrowest range its mean and variance
    fit. When another layer comes first, a keras.applications network known by its name
    (mobilenetv2_1.00_224, resnet50, ...) wants what its preprocess_input feeds it (the
    nearest range, said so); any other model [0, 1], as the loaders give them. `override`
    ("auto", or one of the ranges: --pixel_range) wins; ValueError for another value.
    """
    import re

    if override != "auto" and override not in PIXEL_RANGES:
        raise ValueError(f"--pixel_range must be one of auto, {', '.join(PIXEL_RANGES)}; "
                         f"got {override!r}")
    passed, path = [], [model]  # range-keeping layers walked through; the models entered

    def walk(layers):  # -> (layer, (range, what it does) or None), or None: all kept the range
        for layer in layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            if isinstance(layer, (keras.Model, keras.layers.Pipeline)):
                path.append(layer)
                found = walk(layer.layers)
                if found is not None:
                    return found
                path.pop()
                continue
            wants = _scaling_wants(layer)
            if wants is not None:
                return layer, wants
            if not _keeps_range(layer):
                return layer, None
            passed.append(type(layer).__name__)
        return None

    layer, wants = walk(model.layers) or (None, None)
    inside = f", inside '{path[-1].name}'" if len(path) > 1 else ""
    where = (f"its layer '{layer.name}' ({type(layer).__name__}{inside})" if layer is not None
             else "its output")
    after = f" (after {', '.join(passed)})" if passed else ""
    if wants is not None:
        found, why = wants
        decided = (found, (layer.name, type(layer).__name__), f"{where} {why}{after}")
    else:
        family = next(((m, want, mode) for m in reversed(path) for pattern, want, mode
                       in APPLICATIONS if re.fullmatch(pattern, m.name)), None)
        if family is not None:
            m, want, mode = family
            decided = (want, (m.name, type(m).__name__),
                       f"'{m.name}' is a keras.applications network whose weights were "
                       f"trained on preprocess_input's {mode}; nothing rescales or normalizes "
                       f"them before {where}{after}")
        else:
            decided = ("0_1", layer and (layer.name, type(layer).__name__),
                       f"nothing rescales or normalizes them before {where}{after}: [0, 1], "
                       "as the loaders give them (--pixel_range=0_255 or -1_1 if it was "
                       "trained on another range)")
    if override == "auto":
        return decided
    return (override, None, f"--pixel_range={override} chooses it (auto would give "
                            f"{PIXEL_RANGES[decided[0]][0]}: {decided[2]})")


def _scaling_wants(layer):
    """(range, what the layer does) for a Rescaling or an adapted Normalization, else None."""
    if isinstance(layer, keras.layers.Rescaling):
        scale = np.asarray(layer.scale, "float64").ravel()
        offset = np.asarray(layer.offset, "float64").ravel()

        def out(name):  # the lowest and highest value pixels in that range come out as
            _, low, high = PIXEL_RANGES[name]
            ends = np.concatenate([low * scale + offset, high * scale + offset])
            return float(ends.min()), float(ends.max())

        for low, high in ((0, 1), (-1, 1), (0, 255)):
            for name in PIXEL_RANGES:
                a, b = out(name)
                if abs(a - low) <= 0.02 * (high - low) and abs(b - high) <= 0.02 * (high - low):
                    return name, f"scales them to [{low}, {high}]"
        # None exactly: the range it spreads over about two units, as a normalized net's inputs.
        name = min(PIXEL_RANGES, key=lambda n: abs(np.log(max(out(n)[1] - out(n)[0], 1e-9) / 2)))
        a, b = out(name)
        by, plus = (", ".join(f"{v:.3g}" for v in values) for values in (scale, offset))
        return name, (f"scales them (x {by} + {plus}: {PIXEL_RANGES[name][0]} to "
                      f"[{a:.3g}, {b:.3g}], the nearest to a unit range)")
    if isinstance(layer, keras.layers.Normalization):
        mean = layer.mean if layer.mean is not None else getattr(layer, "input_mean", None)
        variance = (layer.variance if layer.variance is not None
                    else getattr(layer, "input_variance", None))
        if mean is None or variance is None:
            return None  # neither adapted nor given statistics: it changes nothing yet
        mean, variance = (np.asarray(v, "float64").ravel() for v in (mean, variance))
        if np.allclose(mean, 0) and np.allclose(variance, 1):
            return None  # not adapted (mean 0, variance 1): it keeps the range
        # The narrowest range its statistics fit: values within [low, high] have a variance
        # of at most (mean - low) * (high - mean) (the Bhatia-Davis bound), per channel.
        fits = [name for name, (_, low, high) in sorted(PIXEL_RANGES.items(),
                                                        key=lambda item: item[1][2] - item[1][1])
                if np.all(variance <= (mean - low) * (high - mean) * 1.05 + 1e-12)]
        name = fits[0] if fits else "0_255" if mean.mean() > 1 else "-1_1"
        stats = f"mean {mean.mean():.3g}, std {np.sqrt(variance.mean()):.3g}"
        return name, (f"normalizes them ({stats}: statistics that fit {PIXEL_RANGES[name][0]} "
                      "pixels)" if fits else f"normalizes them ({stats}: statistics that fit "
                      f"none of the ranges; {PIXEL_RANGES[name][0]} is the nearest)")
    return None


def _keeps_range(layer):
    """Whether the layer passes pixels on in the range they came in: Keras' image
    preprocessing (augmentation, resizing, crops), reshaping, padding, dropout and noise,
    and a Normalization that holds no statistics (not adapted: mean 0, variance 1)."""
    kind, module = type(layer).__name__, type(layer).__module__
    return ("image_preprocessing" in module or kind.startswith("Random")
            or isinstance(layer, keras.layers.Normalization)
            or kind in ("Resizing", "CenterCrop", "Identity")
            or module.startswith(("keras.src.layers.reshaping", "keras.src.layers.regularization")))
