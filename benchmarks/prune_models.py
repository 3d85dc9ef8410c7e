"""Pruning real model shapes: how much of all the weights the prune experiment zeroes, and
how much smaller the saved .keras file gets.

Two models whose weights sit where a Dense/Conv2D-only pruner does not look:
  xception   keras.io's "image classification from scratch" model, scaled down:
             SeparableConv2D (depthwise + pointwise kernels) hold most of the weights,
             BatchNormalization after each, 1x1 Conv2D residuals, a Dense head
  mobilenet  keras.applications.MobileNetV2(alpha=0.35, weights=None), 32x32x3, 10
             classes: 52 small convolutions (17 of them DepthwiseConv2D), BatchNorm
Each is trained from scratch for --baseline_epochs on Fashion-MNIST (the first --train
images, padded to 32x32 and repeated to 3 channels), then pruned by
experiments.prune.run at --final_sparsity=0.8 with the CLI's defaults (the layer
choice, the schedule, --epochs of fine-tuning), exports included. model_sparsity is the
share of exact zeros over every weight matrix and kernel of the pruned model (biases and
normalization aside); "x" is the baseline .keras gzip over the pruned one. Accuracy is
shown, not targeted: after 3 epochs from scratch it is near chance (BatchNorm's moving
statistics, momentum 0.99 and MobileNetV2's 0.999, barely move in ~140 steps);
benchmarks/prune.py measures what pruning costs in accuracy.

Measured (TensorFlow, 2 CPU cores, 145 s): xception model_sparsity 0.793, 3.05x (MET);
mobilenet 0.792, 2.74x (MISSED): its biases and BatchNorm weights, 6.7% of its values and
never pruned, gzip to 102 of its 583 KB (without them: 3.32x).

    python benchmarks/prune_models.py [--data_dir=../shared/data/fashion-mnist]
    KERAS_BACKEND=jax python benchmarks/prune_models.py   # no TFLite there
"""
import argparse
import contextlib
import io
import os
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from datasets import idx  # noqa: E402
from experiments import prune  # noqa: E402
from experiments.exports import gzip_bytes  # noqa: E402
from recipes.prune import all_layers, weight_shares  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "fashion-mnist"
TARGET_SPARSITY, TARGET_X = 0.75, 3.0  # at --final_sparsity=0.8


def xception(input_shape, num_classes, sizes=(64, 128, 256), top=512):
    """keras.io's make_model (image_classification_from_scratch), its widths scaled down."""
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same")(inputs)
    x = keras.layers.Activation("relu")(keras.layers.BatchNormalization()(x))
    previous = x
    for size in sizes:
        for _ in range(2):
            x = keras.layers.Activation("relu")(x)
            x = keras.layers.SeparableConv2D(size, 3, padding="same")(x)
            x = keras.layers.BatchNormalization()(x)
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same")(x)
        residual = keras.layers.Conv2D(size, 1, strides=2, padding="same")(previous)
        x = previous = keras.layers.add([x, residual])
    x = keras.layers.SeparableConv2D(top, 3, padding="same")(x)
    x = keras.layers.Activation("relu")(keras.layers.BatchNormalization()(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.25)(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x), name="xception_small")


def mobilenet(input_shape, num_classes):
    return keras.applications.MobileNetV2(alpha=0.35, weights=None, input_shape=input_shape,
                                          classes=num_classes)


MODELS = {"xception": xception, "mobilenet": mobilenet}


def load_data(data_dir, n_train, n_val):
    (x_train, y_train), (x_test, y_test) = idx.load("fashion_mnist", data_dir)

    def prep(x):  # 28x28 gray -> 32x32x3 in [0, 1], as a small RGB model takes it
        x = np.pad(x.astype(np.float32) / 255, ((0, 0), (2, 2), (2, 2)))
        return np.repeat(x[..., None], 3, axis=-1)

    return ((prep(x_train[:n_train]), y_train[:n_train].astype(np.int64)),
            (prep(x_test[:n_val]), y_test[:n_val].astype(np.int64)))


def share_by_kind(builder):
    """{layer class: its share of the model's weight matrices}, largest first."""
    model, kinds = builder((32, 32, 3), 10), {}
    shares = weight_shares(model)
    for layer in all_layers(model):
        kind = type(layer).__name__
        kinds[kind] = kinds.get(kind, 0.0) + shares.get(layer.name, 0.0)
    return dict(sorted(((k, v) for k, v in kinds.items() if v), key=lambda kv: -kv[1]))


def measure(name, data, args, tmp):
    config = prune.Config(baseline_epochs=args.baseline_epochs, epochs=args.epochs,
                          batch_size=args.batch_size, final_sparsity=args.final_sparsity)
    log = io.StringIO()
    began = time.perf_counter()
    with contextlib.redirect_stdout(log):
        metrics = prune.run(config, os.path.join(tmp, name), data, model=MODELS[name])
    metrics["seconds"] = time.perf_counter() - began
    metrics["dense_line"] = next(line for line in log.getvalue().splitlines()
                                 if line.startswith("left dense"))
    metrics.update(bytes_by_part(os.path.join(tmp, name, "pruned.keras")))
    return metrics


def bytes_by_part(path):
    """Where the pruned file's bytes go: gzip of its weight matrices alone and of its other
    weights alone (biases, normalization: never pruned), and how many values those are."""
    model = keras.models.load_model(path, compile=False)
    matrices = [np.asarray(w) for w in model.weights if len(w.shape) >= 2]
    others = [np.asarray(w) for w in model.weights if len(w.shape) < 2]
    return {"matrices_gzip": gzip_bytes(b"".join(v.tobytes() for v in matrices)),
            "others_gzip": gzip_bytes(b"".join(v.tobytes() for v in others)),
            "others_share": sum(v.size for v in others) / sum(v.size for v in matrices + others)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA),
                        help="folder with the four Fashion-MNIST idx .gz files")
    parser.add_argument("--models", default="xception,mobilenet", help="which, comma-separated")
    parser.add_argument("--train", type=int, default=3000, help="training images")
    parser.add_argument("--val", type=int, default=1000, help="validation images")
    parser.add_argument("--baseline_epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (pruning)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--final_sparsity", type=float, default=0.8)
    args = parser.parse_args()
    start = time.perf_counter()
    data = load_data(args.data_dir, args.train, args.val)
    names = args.models.split(",")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"== {name}: {args.baseline_epochs} baseline epoch(s), prune to "
                  f"{args.final_sparsity:.0%} over {args.epochs} ==", flush=True)
            keras.utils.clear_session()
            rows[name] = measure(name, data, args, tmp)
    print_report(names, rows, args, time.perf_counter() - start)


def print_report(names, rows, args, wall):
    print(f"\nFashion-MNIST 32x32x3 ({args.train:,} train / {args.val:,} val), backend "
          f"{keras.backend.backend()}, --final_sparsity={args.final_sparsity}; model_sparsity: "
          "zeros over every weight matrix and kernel; x: baseline .keras gzip / pruned")
    header = (f"{'model':<10} {'weights':>9} {'pruned':>6} {'dense':>5} {'dense %':>7} "
              f"{'sparsity':>8} {'model_sp':>8} {'baseline gz':>11} {'pruned gz':>10} "
              f"{'x':>5} {'acc':>6} {'->':>6} {'s':>4}")
    print(header + "\n" + "-" * len(header))
    for name in names:
        m = rows[name]
        print(f"{name:<10} {m['model_params']:>9,} {m['layers_pruned']:>6} "
              f"{m['layers_left_dense']:>5} {100 * m['left_dense_weight_share']:>7.2f} "
              f"{m['sparsity_measured']:>8.3f} {m['model_sparsity']:>8.3f} "
              f"{m['baseline_gzip_bytes']:>11,} {m['pruned_gzip_bytes']:>10,} "
              f"{m['compression_ratio']:>5.2f} {m['baseline_accuracy']:>6.3f} "
              f"{m['pruned_accuracy']:>6.3f} {m['seconds']:>4.0f}")
    for name in names:
        kinds = ", ".join(f"{k} {100 * v:.0f}%" for k, v in share_by_kind(MODELS[name]).items())
        print(f"{name}: weight matrices by layer kind: {kinds}")
        print(f"{name}: {rows[name]['dense_line']}")
        m = rows[name]
        print(f"{name}: pruned .keras gzip {m['pruned_gzip_bytes']:,} bytes; its weight matrices "
              f"alone gzip to {m['matrices_gzip']:,}, its biases and normalization weights "
              f"({100 * m['others_share']:.1f}% of the values, never pruned) to "
              f"{m['others_gzip']:,}: without those the file would be "
              f"{m['baseline_gzip_bytes'] / (m['pruned_gzip_bytes'] - m['others_gzip']):.2f}x "
              "smaller")
        errors = [f"{k} {v}" for k, v in rows[name].items() if k.endswith("_error")]
        print(f"{name}: exports: " + ("; ".join(errors) if errors else "all made and checked"))
    print("acc: validation accuracy before -> after pruning; near chance after this short a "
          "training from scratch (BatchNorm's moving statistics have barely moved): shown, "
          "not targeted")
    print(f"whole script {wall:.0f} s\n")
    met = []
    for name in names:
        m = rows[name]
        met.append(m["model_sparsity"] >= TARGET_SPARSITY and m["compression_ratio"] >= TARGET_X)
        print(f"{name} at {args.final_sparsity:.0%}: model_sparsity {m['model_sparsity']:.3f} "
              f"(target >= {TARGET_SPARSITY}), .keras gzip {m['compression_ratio']:.2f}x smaller "
              f"(target >= {TARGET_X:g}): {'MET' if met[-1] else 'MISSED'}")
    print(f"targets met: {sum(met)} of {len(met)}")


if __name__ == "__main__":
    main()
