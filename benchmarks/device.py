"""The `device` recipe on this machine's CPU, whole process and job alone, against its FLOP floor.

The job: full Fashion-MNIST (60,000 train, 10,000 test), 784 -> 500 relu -> 10,
SGD lr 0.001 momentum 0.9, batch 100, 5 epochs. Absolute times differ between
machines, so both are held against this machine's own limit, measured in the
same run: the job's arithmetic (6 FLOP per weight per example, ~2.4 MFLOP,
times 300,000 examples) divided by the float32 rate this CPU reaches on a
100x784 by 784x500 matmul in a compiled loop, timed beside every run (the
verdicts use the median of those floors). Targets, at test accuracy >= 0.82:

- whole process / floor <= 3: a real `python main.py --recipe=device
  --dataset=fashion_mnist` subprocess, timed from start to exit (imports, data,
  the job, evaluation, its own floor measurement, the run folder);
- job / floor <= 1.6: the recipe's defaults, fit alone, in this process.

Variants, alternated and repeated in one process (each from the same initial
weights): Keras' defaults on numpy arrays, Keras' defaults on a batched
tf.data pipeline, then the recipe's choices added one at a time
(steps_per_execution = a whole epoch, then XLA, then numpy arrays instead of
per-example tf.data, then whole batches gathered by index in tf.data with its
autotuning off instead of Keras' autotuned pipeline for numpy). On the JAX
backend (no TensorFlow needed) the tf.data variants are skipped; the main.py
subprocess runs on the same backend.

    python benchmarks/device.py [--data_dir ../shared/data/fashion-mnist] [--repeats 2]
    KERAS_BACKEND=jax python benchmarks/device.py
"""
import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from datasets import idx  # noqa: E402  (checks magic, shape and count; no TensorFlow)
from experiments import device  # noqa: E402  (Config, train_job, the FLOP floor)
from recipes import device as dropin  # noqa: E402  (the job's model and initial weights)

WHOLE_TARGET, JOB_TARGET, ACCURACY_TARGET = 3.0, 1.6, 0.82
WHOLE = "python main.py --recipe=device (whole process)"


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
        ("fit(numpy), Keras defaults", dataclasses.replace(
            base, pipeline="keras_arrays", **defaults)),
        ("fit(tf.data), Keras defaults", dataclasses.replace(base, pipeline="tf_data", **defaults)),
        ("tf.data + steps_per_execution=epoch", dataclasses.replace(
            base, pipeline="tf_data", xla="off")),
        ("tf.data + steps_per_execution=epoch + XLA", dataclasses.replace(
            base, pipeline="tf_data")),
        ("numpy + steps_per_execution=epoch + XLA", dataclasses.replace(
            base, pipeline="keras_arrays")),
        ("index batches, no autotune + spe=epoch + XLA (recipe)", base),
    ]


def whole_process(data_dir, epochs):
    """A real `python main.py --recipe=device` on full Fashion-MNIST, timed from start to exit:
    its seconds, and the job's examples/s, time to first step and test accuracy it reported."""
    with tempfile.TemporaryDirectory(prefix="device_benchmark_") as logdir:
        command = [sys.executable, str(REPO / "main.py"), "--recipe=device",
                   "--dataset=fashion_mnist", f"--data_dir={data_dir}", f"--epochs={epochs}",
                   f"--logdir={logdir}"]
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"error: {' '.join(command)} failed:\n{proc.stderr[-3000:]}")
        metrics = json.loads(next(pathlib.Path(logdir).glob("device/*/metrics.json")).read_text())
    return {"wall_time_s": seconds, "examples_per_sec": metrics["cpu_examples_per_sec"],
            "first_step_s": metrics["cpu_first_step_s"],
            "val_accuracy": metrics["cpu_val_accuracy"], "job_s": metrics["cpu_wall_time_s"]}


def verdict(ratio, target, accuracy):
    return "MET" if ratio <= target and accuracy >= ACCURACY_TARGET else "MISSED"


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
    weights = dropin.initial_weights(784, 500, 10, seed=0)
    flops = (device.train_flops_per_example(dropin.build_model((28, 28, 1), 500, 10))
             * len(x_train) * args.epochs)
    rows = variants(backend)
    runs = {name: [] for name, _ in rows + [(WHOLE, None)]}
    floors = []
    for repeat in range(args.repeats):
        for name, config in rows + [(WHOLE, None)]:
            rate = device.matmul_flops_per_sec(100, 784, 500)  # the floor, beside each run
            floors.append(flops / rate)
            if config is None:
                r = whole_process(args.data_dir, args.epochs)
            else:
                keras.backend.clear_session()
                r = device.train_job(dataclasses.replace(config, epochs=args.epochs), data,
                                     weights)
            r["floor_s"] = flops / rate
            r["gflops"] = rate / 1e9
            runs[name].append(r)
            print(f"[{repeat + 1}/{args.repeats}] {name}: {r['wall_time_s']:.2f} s, "
                  f"floor {r['floor_s']:.2f} s, test accuracy {r['val_accuracy']:.4f}", flush=True)

    def med(name, key):
        return float(np.median([r[key] for r in runs[name]]))

    floor = float(np.median(floors))
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\nbackend {backend}, {os.cpu_count()} CPU cores (load average now {load}: other "
          f"processes share them), {len(x_train)} train examples x "
          f"{args.epochs} epochs, {flops / 1e9:.0f} GFLOP; medians of {args.repeats} repeats")
    print(f"{'variant':<54} {'wall s':>7} {'examples/s':>11} {'1st step s':>10} "
          f"{'test acc':>8} {'floor s':>7} {'wall/floor':>10}")
    for name in runs:
        print(f"{name:<54} {med(name, 'wall_time_s'):>7.2f} {med(name, 'examples_per_sec'):>11.0f} "
              f"{med(name, 'first_step_s'):>10.2f} {med(name, 'val_accuracy'):>8.4f} "
              f"{med(name, 'floor_s'):>7.2f} {med(name, 'wall_time_s') / floor:>10.2f}")
    gflops = np.median([r["gflops"] for rs in runs.values() for r in rs])
    print(f"matmul 100x784 @ 784x500: {gflops:.0f} GFLOP/s (median); "
          f"flop floor {floor:.2f} s (the median of all {len(floors)} floors, "
          f"the one wall/floor uses)")
    # Held against the median of every floor measured in this run (one beside each run):
    # one unlucky or lucky floor on shared cores does not decide the verdict.
    recipe = next(name for name, config in rows if config == device.Config(devices="cpu"))
    whole, whole_accuracy = med(WHOLE, "wall_time_s") / floor, med(WHOLE, "val_accuracy")
    job, job_accuracy = med(recipe, "wall_time_s") / floor, med(recipe, "val_accuracy")
    print(f"whole process / floor: {whole:.2f} ({med(WHOLE, 'wall_time_s'):.2f} s from start to "
          f"exit, of which the job {med(WHOLE, 'job_s'):.2f} s; target <= {WHOLE_TARGET:g}), "
          f"test accuracy {whole_accuracy:.4f} (target >= {ACCURACY_TARGET}): "
          f"{verdict(whole, WHOLE_TARGET, whole_accuracy)}")
    print(f"job / floor: {job:.2f} (the recipe's defaults, fit alone; target <= {JOB_TARGET:g}), "
          f"test accuracy {job_accuracy:.4f} (target >= {ACCURACY_TARGET}): "
          f"{verdict(job, JOB_TARGET, job_accuracy)}")


if __name__ == "__main__":
    main()
