"""Exports and their sizes: a model saved without its optimizer, gzip -9 bytes, a reload
that must predict the same, TFLite flatbuffers (TensorFlow imported only for those)."""
import contextlib
import gzip
import io
import warnings

import keras
import numpy as np

from experiments.files import write_atomically
from recipes.prune import all_layers, strip_pruning, weight_matrices


def gzip_bytes(path_or_bytes):
    """Size after gzip -9: what a zipped download of the model costs."""
    if isinstance(path_or_bytes, bytes):
        return len(gzip.compress(path_or_bytes, compresslevel=9, mtime=0))
    with open(path_or_bytes, "rb") as f:
        return len(gzip.compress(f.read(), compresslevel=9, mtime=0))


def save_model(model, path):
    """The model without an optimizer (whose slots are dense and would hide the zeros):
    .keras for Keras 3, .h5 for tf_keras (what the tfmot guide measures). Returns its
    gzip size."""
    if path.endswith(".h5"):
        with warnings.catch_warnings():  # "HDF5 is legacy"
            warnings.simplefilter("ignore", UserWarning)
            write_atomically(path, lambda partial: model.save(partial, include_optimizer=False))
    else:
        plain = model if not model.compiled else strip_pruning(model)
        write_atomically(path, plain.save)
    return gzip_bytes(path)


def load_model(path):
    """A saved model, uncompiled: .h5 through tf_keras (tfmot's), else Keras 3."""
    if path.endswith(".h5"):
        from experiments.prune_tfmot import tfmot_modules
        return tfmot_modules()[0].models.load_model(path, compile=False)
    return keras.models.load_model(path, compile=False)


def predictions_match(model, reloaded, x, atol=1e-5):
    """(whether `reloaded` predicts like `model` on x, the largest difference)."""
    expected = np.asarray(model.predict(x, verbose=0))
    got = np.asarray(reloaded.predict(x, verbose=0))
    max_diff = float(np.max(np.abs(expected - got)))
    return max_diff <= atol, max_diff


def to_tflite(model, quantize):
    """A TFLite flatbuffer (TensorFlow backend); quantize=True adds dynamic-range (int8
    weight) quantization."""
    import tensorflow as tf  # only here: a JAX run exports no TFLite and never imports it
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    with contextlib.redirect_stdout(io.StringIO()):  # a Keras 3 model goes via a SavedModel,
        return converter.convert()                    # whose export lists its endpoints


def tflite_predict(flatbuffer, x):
    """The TFLite model's outputs for x, one example at a time. A dimension the model
    left open (None: tokens of any length, images of any size) takes x's: the input is
    resized to one example of x before the tensors are allocated."""
    import tensorflow as tf
    with warnings.catch_warnings():  # "deprecated ... use ai_edge_litert": not installed here
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    inp = interpreter.get_input_details()[0]
    shape = (1, *np.shape(x)[1:])
    if tuple(inp["shape"]) != shape:
        interpreter.resize_tensor_input(inp["index"], shape)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    outputs = []
    for example in x:
        interpreter.set_tensor(inp["index"], example[None].astype(inp["dtype"]))
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(out["index"])[0])
    return np.stack(outputs)


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def left_in_float(model):
    """Names of the layers with weight matrices that a model.quantize("int8") left in float:
    all but Dense, EinsumDense and Embedding (convolutions, for one)."""
    return [layer.name for layer in all_layers(model)
            if getattr(layer, "quantization_mode", None) is None and weight_matrices(layer)]
