"""VGG16 transfer learning for Keras 3, on any backend: frozen base, cached features, fine-tuning.

Shows:  VGG16(include_top=False) frozen under a new head (pooling, Dense(relu), softmax), with
        VGG16's own preprocessing (BGR, ImageNet mean; not 1/255) inside the model as a frozen
        1x1 convolution, so the saved model takes [0, 1] images; the base run once to cache
        its features, the head trained on them; then block5 unfrozen at a 10-100x lower
        learning rate (phase 2) on the whole model, the head keeping what it learned.
Run:    python main.py --recipe=transfer --weights=none --cache_features   # the measured
        experiment around this file (strategies, resume, best/final.keras, SavedModel)
Expect: a head epoch on cached features 55-68x faster than one through the frozen base
        (64x64 images, 2 CPU cores); accuracy needs ImageNet weights, not random ones
Copy:   this file alone, then
            base = keras.applications.VGG16(include_top=False, weights=weights, input_shape=x.shape[1:])
            model, head, extractor = build_model(base, num_classes=int(y.max()) + 1)
            features, val_features = extract_features(extractor, x), extract_features(extractor, x_val)
            loss = "sparse_categorical_crossentropy"
            head.compile("adam", loss, metrics=["accuracy"])
            head.fit(features, y, epochs=10, validation_data=(val_features, y_val))  # phase 1
            unfreeze_last_block(base)  # phase 2: block5 trains too, at a 30x lower rate
            model.compile(keras.optimizers.Adam(1e-3 / 30), loss, metrics=["accuracy"])
            model.fit(x, y, epochs=2, validation_data=(x_val, y_val))
            model.save("transfer.keras")  # takes [0, 1] images: preprocessing is inside
        x, x_val: float32 RGB images in [0, 1], (n, size, size, 3), size >= 32; y: class ids.
        weights: "imagenet" (keras downloads it once), a no-top VGG16 .h5 file, or None
        (random: the mechanics and speed only).
"""
import time

import keras
import numpy as np

LAST_BLOCK = "block5_"  # VGG16's last convolution block: what phase 2 unfreezes


def vgg16_preprocessing(name="vgg16_preprocess"):
    """keras.applications.vgg16.preprocess_input(255 * x) as a frozen 1x1 convolution.

    The base expects its own preprocessing (RGB->BGR, ImageNet mean
    subtracted), not 1/255. preprocess_input is affine, so a 1x1 convolution
    whose weights are read off preprocess_input reproduces it exactly, and the
    saved model holds only standard layers (no Lambda, no custom class).
    """
    def preprocess(pixels):  # preprocess_input edits numpy arrays in place: give it a copy
        return keras.applications.vgg16.preprocess_input(
            np.array(pixels, np.float32).reshape(1, 1, 1, 3))[0, 0, 0]

    bias = preprocess([0, 0, 0])
    kernel = np.stack([preprocess(255 * np.eye(3)[i]) - bias for i in range(3)])
    layer = keras.layers.Conv2D(3, 1, name=name, trainable=False)
    layer.build((None, None, None, 3))
    layer.set_weights([kernel.reshape(1, 1, 3, 3), bias])
    return layer


def build_model(base, num_classes, dense_units=1024, augment=False, seed=0):
    """(model, head, extractor) sharing layers; `base` (VGG16 without its top) is frozen.

    model:     [0, 1] images -> (augment) -> preprocess -> frozen base -> head
    head:      base features -> GlobalAveragePooling2D -> Dense(relu) -> Dense(softmax)
    extractor: [0, 1] images -> preprocess -> base features (for caching)
    """
    base.trainable = False
    preprocess = vgg16_preprocessing()
    head = keras.Sequential([
        keras.Input(shape=base.output.shape[1:]),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(dense_units, activation="relu"),
        keras.layers.Dense(num_classes, activation="softmax"),
    ], name="head")
    images = keras.Input(shape=base.input.shape[1:], name="images")
    x = images
    if augment:  # active in fit only; the saved model ignores it at inference
        x = keras.layers.RandomFlip("horizontal", seed=seed)(x)
        x = keras.layers.RandomRotation(0.1, seed=seed)(x)
        x = keras.layers.RandomZoom(0.1, seed=seed)(x)
    # training=False keeps a base with BatchNormalization in inference mode when
    # called directly; inside fit, Keras 3 passes fit's flag through, and
    # trainable=False is what keeps such layers frozen (VGG16 has none).
    model = keras.Model(images, head(base(preprocess(x), training=False)), name="vgg16_transfer")
    extractor = keras.Model(images, base(preprocess(images), training=False), name="extractor")
    return model, head, extractor


def extract_features(extractor, x, batch_size=32, forward=None, on_batch=None):
    """The frozen base run once over x, in batches -> float32 features for the head.

    Training the head on these instead of on images skips the base's forward
    pass in every epoch (the same work each time while the base is frozen), so
    a head epoch is many times faster. Not with augmentation: cached features
    see the same images every epoch.

    forward: runs one batch (default: extractor.predict_on_batch, compiled by
    Keras on any backend). on_batch(seconds): called after each batch with the
    seconds it took, the result read back from the device.
    """
    forward = forward or extractor.predict_on_batch
    features = []
    for i in range(0, len(x), batch_size):
        start = time.perf_counter()
        features.append(np.asarray(forward(x[i:i + batch_size])))
        if on_batch is not None:
            on_batch(time.perf_counter() - start)
    return np.concatenate(features).astype(np.float32)


def unfreeze_last_block(base, prefix=LAST_BLOCK):
    """Phase 2: only the layers named prefix* (VGG16's last conv block) train.

    Compile again afterwards (trainable takes effect at compile) with a learning
    rate 10-100x lower than phase 1's, so the pretrained filters move a little
    instead of being overwritten by the gradients of a head still settling.
    """
    base.trainable = True
    for layer in base.layers:
        layer.trainable = layer.name.startswith(prefix)
