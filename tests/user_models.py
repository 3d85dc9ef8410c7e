"""Models written as keras.io and keras.applications write them, none built for a recipe:
the matrix that tests/test_model_matrix.py and benchmarks/own_models.py run through every
recipe that takes --model. Each entry says what a recipe must state about it."""
import numpy as np

CLASSES = 3


def mnist_convnet(keras, classes=CLASSES):
    """keras.io "Simple MNIST convnet": one-hot labels, so a one-hot loss by name."""
    model = keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        keras.layers.Conv2D(8, kernel_size=(3, 3), activation="relu"),
        keras.layers.MaxPooling2D(pool_size=(2, 2)),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(classes, activation="softmax"),
    ], name="mnist_convnet")
    model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    return model


def augment_then_rescale(keras, classes=CLASSES):
    """keras.io "Image classification from scratch": augmentation before Rescaling."""
    augmentation = keras.Sequential([keras.layers.RandomFlip("horizontal"),
                                     keras.layers.RandomRotation(0.1)], name="augmentation")
    inputs = keras.Input(shape=(32, 32, 3))
    x = augmentation(inputs)
    x = keras.layers.Rescaling(1.0 / 255)(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs, name="augment_then_rescale")
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def nested_extractor(keras, classes=CLASSES):
    """A Sequential feature extractor (with its own Rescaling) nested in a functional head."""
    features = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255),
                                 keras.layers.Conv2D(8, 3, activation="relu"),
                                 keras.layers.GlobalAveragePooling2D()], name="features")
    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Dense(classes)(features(inputs))  # logits, saved uncompiled
    return keras.Model(inputs, outputs, name="nested_extractor")


def separable_blocks(keras, classes=CLASSES):
    """Xception/MobileNet-style blocks: SeparableConv2D and DepthwiseConv2D with BatchNorm."""
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same")(x)
    for filters in (32, 64):
        x = keras.layers.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.Activation("relu")(x)
        x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs, name="separable_blocks")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    return model


def mobilenet_v2(keras, classes=CLASSES):
    """keras.applications, weights=None, no preprocess_input inside: trained on [-1, 1]."""
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                           classes=classes)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def jit_compiled(keras, classes=CLASSES):
    """Compiled with jit_compile=True: kept, and Keras' warning about it printed once."""
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Rescaling(1 / 255),
                              keras.layers.Conv2D(8, 3, activation="relu"),
                              keras.layers.Flatten(),
                              keras.layers.Dense(classes, activation="softmax")],
                             name="jit_compiled")
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"],
                  jit_compile=True)
    return model


def conv1d_sequences(keras, classes=CLASSES):
    """Conv1D on (steps, features) sequences, fed from an .npz."""
    model = keras.Sequential([keras.Input((40, 4)), keras.layers.Conv1D(16, 5, activation="relu"),
                              keras.layers.GlobalMaxPooling1D(),
                              keras.layers.Dense(classes, activation="softmax")],
                             name="conv1d_sequences")
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def token_classifier(keras, classes=CLASSES):
    """keras.io's text classifier: variable-length integer token ids, Embedding, a sigmoid."""
    inputs = keras.Input(shape=(None,), dtype="int64")
    x = keras.layers.Embedding(1000, 16)(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(inputs, outputs, name="token_classifier")
    model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
    return model


def sequences_npz(path, n=240, seed=0):
    """Three classes of 40-step, 4-feature sequences (a sine at a class's frequency)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    t = np.arange(40)[None, :, None]
    x = np.sin(t * (y[:, None, None] + 1) * 0.3) + 0.3 * rng.normal(size=(n, 40, 4))
    split = n * 3 // 4
    np.savez(path, x_train=x[:split].astype("float32"), y_train=y[:split],
             x_val=x[split:].astype("float32"), y_val=y[split:])
    return path


def tokens_npz(path, n=240, length=200, seed=0):
    """Token ids 1-999 of length 200 (0 pads); class 1 uses the upper half of the vocabulary."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.integers(1, 500, (n, length)) + 499 * y[:, None] * (rng.random((n, length)) < 0.5)
    split = n * 3 // 4
    np.savez(path, x_train=x[:split], y_train=y[:split], x_val=x[split:], y_val=y[split:])
    return path


# name: (builder, data ("images" or an .npz writer), the pixel range stated, the loss stated)
MODELS = {
    "mnist_convnet": (mnist_convnet, "images", "[0, 1]",
                      "its own compiled loss (categorical_crossentropy), labels one-hot"),
    "augment_then_rescale": (augment_then_rescale, "images", "0-255",
                             "its own compiled loss (sparse_categorical_crossentropy)"),
    "nested_extractor": (nested_extractor, "images", "0-255",
                         "sparse categorical cross-entropy from logits"),
    "separable_blocks": (separable_blocks, "images", "0-255", "its own compiled loss"),
    "mobilenet_v2": (mobilenet_v2, "images", "[-1, 1]", "its own compiled loss"),
    "jit_compiled": (jit_compiled, "images", "0-255", "its own compiled loss"),
    "conv1d_sequences": (conv1d_sequences, sequences_npz, None, "its own compiled loss"),
    "token_classifier": (token_classifier, tokens_npz, None,
                         "its own compiled loss (binary_crossentropy), labels as class ids"),
}
