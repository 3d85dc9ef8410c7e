"""The `device` recipe's reference job on this machine's CPU, held against its FLOP floor.

The job: full Fashion-MNIST (60,000 train, 10,000 test), 784 -> 500 relu -> 10,
SGD lr 0.001 momentum 0.9, batch 100, 5 epochs. Absolute times differ between
machines, so the job is held against this machine's own limit, measured in the
same run: its arithmetic (6 FLOP per weight per example, ~2.4 MFLOP, times
300,000 examples) divided by the float32 rate this CPU reaches on a 100x784 by
784x500 matmul in a compiled loop (timed beside every job; the verdict uses
the median of those floors). Target: job_time / flop_floor <= 2.

Variants, alternated and repeated in one process (each from the same initial
weights): Keras' defaults on numpy arrays, Keras' defaults on a batched
tf.data pipeline, then the recipe's choices added one at a time
(steps_per_execution = a whole epoch, then XLA, then numpy arrays instead of
per-example tf.data). On the JAX backend (no TensorFlow needed) the tf.data
variants are skipped.

    python benchmarks/device.py [--data_dir ../shared/data/fashion-mnist] [--repeats 2]
    KERAS_BACKEND=jax python benchmarks/device.py
"""
import argparse
import dataclasses
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from datasets import idx  # noqa: E402  (checks magic, shape and count; no TensorFlow)
from recipes import device  # noqa: E402

TARGET = 2.0


def load_fashion_mnist(folder):
    """((x_train, y_train), (x_test, y_test)): float32 (n, 28, 28, 1) in [0, 1], int64 labels."""
    return tuple((x[..., None].astype(np.float32) / 255, y.astype(np.int64))
                 for x, y in idx.load("fashion_mnist", folder))


def variants(backend):
    """(name, Config) pairs: Keras' defaults first, then the recipe's choices one at a time."""
    base = device.Config(devices="cpu")  # the recipe's defaults
    defaults = dict(steps_per_execution=1, xla="auto")
    if backend != "tensorflow":  # no tf.data; "auto" already means jit on JAX
        return [("fit(numpy), Keras defaults", dataclasses.replace(base, **defaults)),
                ("+ steps_per_execution=epoch (the recipe's default)", base)]
    return [
        ("fit(numpy), Keras defaults", dataclasses.replace(base, **defaults)),
        ("fit(tf.data), Keras defaults", dataclasses.replace(base, pipeline="tf_data", **defaults)),
        ("tf.data + steps_per_execution=epoch", dataclasses.replace(
            base, pipeline="tf_data", xla="off")),
        ("tf.data + steps_per_execution=epoch + XLA", dataclasses.replace(
            base, pipeline="tf_data")),
        ("numpy + steps_per_execution=epoch + XLA (recipe)", base),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "fashion-mnist"),
                        help="folder with the four Fashion-MNIST idx .gz files")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all variants")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per job")
    args = parser.parse_args()
    if not (pathlib.Path(args.data_dir) / "train-images-idx3-ubyte.gz").exists():
        sys.exit(f"error: no Fashion-MNIST idx files in {args.data_dir}; pass --data_dir "
                 "(or apt-get install dataset-fashion-mnist: /usr/share/datasets/fashion-mnist)")
    backend = keras.backend.backend()
    data = load_fashion_mnist(args.data_dir)
    (x_train, _), _ = data
    weights = device.initial_weights(784, 500, 10, seed=0)
    flops = (device.train_flops_per_example(device.build_model((28, 28, 1), 500, 10))
             * len(x_train) * args.epochs)
    rows = variants(backend)
    runs = {name: [] for name, _ in rows}
    floors = []
    for repeat in range(args.repeats):
        for name, config in rows:
            config = dataclasses.replace(config, epochs=args.epochs)
            rate = device.matmul_flops_per_sec(100, 784, 500)  # the floor, beside each job
            floors.append(flops / rate)
            keras.backend.clear_session()
            r = device.train_job(config, data, weights)
            r["floor_s"] = flops / rate
            r["gflops"] = rate / 1e9
            runs[name].append(r)
            print(f"[{repeat + 1}/{args.repeats}] {name}: {r['wall_time_s']:.2f} s, "
                  f"floor {r['floor_s']:.2f} s, test accuracy {r['val_accuracy']:.4f}", flush=True)

    def med(name, key):
        return float(np.median([r[key] for r in runs[name]]))

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\nbackend {backend}, {os.cpu_count()} CPU cores (load average now {load}: other "
          f"processes share them), {len(x_train)} train examples x "
          f"{args.epochs} epochs, {flops / 1e9:.0f} GFLOP; medians of {args.repeats} repeats")
    print(f"{'variant':<50} {'wall s':>7} {'examples/s':>11} {'1st step s':>10} "
          f"{'test acc':>8} {'floor s':>7} {'wall/floor':>10}")
    for name, _ in rows:
        ratio = med(name, "wall_time_s") / float(np.median(floors))
        print(f"{name:<50} {med(name, 'wall_time_s'):>7.2f} {med(name, 'examples_per_sec'):>11.0f} "
              f"{med(name, 'first_step_s'):>10.2f} {med(name, 'val_accuracy'):>8.4f} "
              f"{med(name, 'floor_s'):>7.2f} {ratio:>10.2f}")
    gflops = np.median([r["gflops"] for rs in runs.values() for r in rs])
    print(f"matmul 100x784 @ 784x500: {gflops:.0f} GFLOP/s (median); "
          f"flop floor {np.median(floors):.2f} s (the median of all {len(floors)} floors, "
          f"the one wall/floor uses)")
    # Held against the median of every floor measured in this run (one beside each job):
    # one unlucky or lucky floor on shared cores does not decide the verdict.
    best = next(name for name, config in rows if config == device.Config(devices="cpu"))
    ratio = med(best, "wall_time_s") / float(np.median(floors))
    accuracy = med(best, "val_accuracy")
    verdict = "met" if ratio <= TARGET and accuracy >= 0.82 else "NOT met"
    print(f"recipe default job_time/flop_floor ratio: {ratio:.2f} (target <= {TARGET:g}), "
          f"test accuracy {accuracy:.4f} (target >= 0.82): {verdict}")


if __name__ == "__main__":
    main()
