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
        clone.users_compile_settings = compile_settings(model)
        return clone
    return model(input_shape, num_classes)


KEPT_SETTINGS = {"jit_compile": "auto", "steps_per_execution": 1}  # and Keras' defaults


def compile_settings(model):
    """The jit_compile and steps_per_execution the user compiled the model with, where they
    differ from Keras' defaults."""
    config = model.get_compile_config() or {}
    return {k: config[k] for k, default in KEPT_SETTINGS.items()
            if config.get(k, default) != default}


def users_settings(copy, measured=()):
    """What to pass to compile() so that a copy fresh_model made keeps the user's
    jit_compile and steps_per_execution, but for those the experiment sets itself (it
    says so: the user's choice is not dropped in silence)."""
    settings = getattr(copy, "users_compile_settings", {})
    for name in sorted(set(settings) & set(measured)):
        print(f"your model's {name}={settings[name]} is not used here: this recipe sets "
              f"{name} itself to time its steps (--recipe=advise measures yours)")
    return {k: v for k, v in settings.items() if k not in measured}


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
    metrics = ["accuracy"] + [sparse_metric(m) for m in config.get("metrics") or []
                              if m != "accuracy"]
    if getattr(model, "loss", None) is not None:
        loss = keras.losses.get(model.loss) if isinstance(model.loss, (str, dict)) else model.loss
        loss, form = fed_class_ids(loss, units, num_classes)
        return loss, metrics, f"its own compiled loss ({loss_name(loss)}), labels {form}"
    if units == 1:
        return (keras.losses.BinaryCrossentropy(), metrics,
                "binary cross-entropy (a sigmoid unit), labels as class ids")
    if activation == "softmax":
        return (keras.losses.SparseCategoricalCrossentropy(), metrics,
                "sparse categorical cross-entropy on its softmax output, labels as class ids")
    return (keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics,
            "sparse categorical cross-entropy from logits (its output has no softmax), "
            "labels as class ids")


# Keras' losses that take a vector per example (one-hot, or smoothed) rather than a class id.
ONE_HOT_LOSSES = {"categorical_crossentropy", "categorical_focal_crossentropy",
                  "categorical_hinge", "kl_divergence", "poisson", "mean_squared_error",
                  "mean_absolute_error", "squared_hinge", "hinge", "binary_crossentropy",
                  "binary_focal_crossentropy", "log_cosh", "huber"}
# A one-hot metric named by the user, and the one that reads class ids the same way.
SPARSE_METRICS = {"categorical_accuracy": "sparse_categorical_accuracy",
                  "top_k_categorical_accuracy": "sparse_top_k_categorical_accuracy",
                  "categorical_crossentropy": "sparse_categorical_crossentropy"}


def loss_name(loss):
    loss = getattr(loss, "inner", loss)
    return getattr(getattr(loss, "fn", loss), "__name__", None) or type(loss).__name__


def sparse_metric(metric):
    """A compiled metric (a name or its config) that reads the class ids the data holds."""
    if isinstance(metric, str):
        return keras.metrics.get(SPARSE_METRICS.get(metric, metric))
    metric = keras.metrics.deserialize(metric)
    name = getattr(metric, "name", "")
    return keras.metrics.get(SPARSE_METRICS[name]) if name in SPARSE_METRICS else metric


def expects_one_hot(loss, units, num_classes):
    """Whether the loss wants a vector per example: Keras' own losses by their function's
    name, anything else by a probe: a loss that fails on class ids and runs on one-hot
    vectors wants one-hot vectors. One sigmoid unit always takes the class id."""
    name = loss_name(loss)
    if units == 1:  # one sigmoid unit: its target is the class id, 0 or 1
        return False
    if name in ONE_HOT_LOSSES:
        return True
    if name.startswith("sparse"):
        return False
    n = num_classes + 3  # not num_classes: ids of shape (n,) would broadcast against (n, n)
    ids = np.arange(n) % num_classes
    y_pred = np.full((n, units), 1 / units, "float32")
    try:
        keras.ops.convert_to_numpy(loss(ids, y_pred))
        return False
    except Exception:  # noqa: BLE001  (whatever a user's loss raises for the wrong form)
        keras.ops.convert_to_numpy(loss(np.eye(units, dtype="float32")[ids], y_pred))
        return True


def fed_class_ids(loss, units, num_classes):
    """(a loss that takes the class ids the data holds, the label form in words)."""
    if expects_one_hot(loss, units, num_classes):
        return OnClassIds(loss, one_hot=units), "one-hot encoded from the class ids for it"
    if not isinstance(loss, keras.losses.Loss):  # a bare function, called by custom steps too
        loss = OnClassIds(loss)
    return loss, "as class ids"


@keras.saving.register_keras_serializable(package="keras_gpu_recipes")
class OnClassIds(keras.losses.Loss):
    """A loss fed the class ids the data holds: one-hot encoded on the way in for a loss
    that wants vectors (keras.io's `categorical_crossentropy`, with or without label
    smoothing), shaped like the output for a bare function (as Keras' own loss classes
    do). Compiled in the model, so every train step uses it: fit's, profile's, the
    multi-worker loop's, advise's."""

    def __init__(self, inner, one_hot=None, **kwargs):
        kwargs.setdefault("name", loss_name(inner))
        if isinstance(inner, keras.losses.Loss):
            kwargs.setdefault("reduction", inner.reduction)
        super().__init__(**kwargs)
        self.inner, self.one_hot = inner, one_hot

    def call(self, y_true, y_pred):
        """Per-example losses; Loss.__call__ applies the sample weights and the reduction."""
        if self.one_hot:
            ids = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
            y_true = keras.ops.one_hot(ids, self.one_hot)
        elif len(y_true.shape) == len(y_pred.shape) - 1 and y_pred.shape[-1] == 1:
            y_true = keras.ops.expand_dims(y_true, -1)  # one sigmoid unit: (n,) -> (n, 1)
        per_example = getattr(self.inner, "call", self.inner)  # a Loss's, or the function
        return per_example(y_true, y_pred)

    def get_config(self):
        return {"inner": keras.losses.serialize(self.inner), "one_hot": self.one_hot,
                "name": self.name, "reduction": self.reduction}

    @classmethod
    def from_config(cls, config):
        return cls(keras.losses.deserialize(config.pop("inner")), **config)


def save_with_users_loss(model, path):
    """model.save(path), its compile config naming the user's own loss, not the OnClassIds
    around it: the file then loads where this repository is not installed."""
    compiled = getattr(model, "_compile_config", None)  # compile()'s arguments, as Keras keeps them
    loss = compiled.config.get("loss") if compiled is not None else None
    if not isinstance(loss, OnClassIds):
        return model.save(path)
    compiled.config["loss"] = loss.inner
    try:
        return model.save(path)
    finally:
        compiled.config["loss"] = loss


def num_classes_of(data):
    """How many classes ((x_train, y_train), (x_val, y_val)) holds."""
    (_, y_train), (_, y_val) = data
    return int(max(np.max(y_train), np.max(y_val))) + 1
