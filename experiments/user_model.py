"""The user's model in an experiment: run(model=...) takes a keras.Model, never changed,
or a builder fn(input_shape, num_classes); experiments train copies."""
import keras
import numpy as np


def fresh_model(model, input_shape, num_classes):
    """A model to train: a clone of a keras.Model with its weights (the user's own object
    is never trained), or what the builder fn(input_shape, num_classes) returns."""
    if isinstance(model, keras.Model):
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        return clone
    return model(input_shape, num_classes)


def output_activation(model):
    """The activation of the layer that makes the model's output: softmax, sigmoid, linear..."""
    layer = model.layers[-1]
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    return getattr(getattr(layer, "activation", None), "__name__", "linear")


def classifier_loss(model, num_classes):
    """(loss, metrics, why): the model's compiled loss and metrics (accuracy first), else
    the loss its output implies. ValueError (one line) for an output that is not a
    classifier of num_classes."""
    if len(model.outputs) != 1:
        raise ValueError(f"the model has {len(model.outputs)} outputs; these recipes train "
                         "one classifier output")
    units, activation = int(model.outputs[0].shape[-1]), output_activation(model)
    if units == 1 and activation != "sigmoid":
        raise ValueError("the model ends in one linear unit, a regression output; these "
                         "recipes train classifiers: end it with Dense(classes) or a sigmoid unit")
    if units != num_classes and not (units == 1 and num_classes == 2):
        raise ValueError(f"the model has {units} output units but the data has {num_classes} "
                         "classes: they must match")
    if units > 1 and activation == "sigmoid":
        raise ValueError(f"the model ends in {units} sigmoid units (multi-label); these recipes "
                         "train one class per example: end it with softmax or logits")
    config = model.get_compile_config() or {}
    metrics = ["accuracy"] + [keras.metrics.get(m) if isinstance(m, str) else
                              keras.metrics.deserialize(m)
                              for m in config.get("metrics") or [] if m != "accuracy"]
    if getattr(model, "loss", None) is not None:
        return model.loss, metrics, "its own compiled loss"
    if units == 1:
        return keras.losses.BinaryCrossentropy(), metrics, "binary cross-entropy (a sigmoid unit)"
    if activation == "softmax":
        return (keras.losses.SparseCategoricalCrossentropy(), metrics,
                "sparse categorical cross-entropy on its softmax output")
    return (keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics,
            "sparse categorical cross-entropy from logits (its output has no softmax)")


def num_classes_of(data):
    """How many classes ((x_train, y_train), (x_val, y_val)) holds."""
    (_, y_train), (_, y_val) = data
    return int(max(np.max(y_train), np.max(y_val))) + 1
