"""Benchmark: ImageDataGenerator vs tf.data on real JPEGs, input alone and inside fit.

    .venv/bin/python benchmarks/stream.py [--data=PATH] [--passes=3] [--workers=1,2]

PATH is the cats-vs-dogs-small tar (default ../shared/data/cats-vs-dogs-small/
cats_and_dogs_filtered.tar, extracted to a temp dir) or any folder whose train/
sub-tree (or itself) holds class folders. Images are resized to 150x150, batch
32, the recipe's model. In one process, alternating, `--passes` times each:
the generator as the classic recipe writes it (workers=1) and with more
threads, tf.data streaming, tf.data from a memory cache (filled once first),
augmentation on both sides (tf.data: the recipe's fused RandomAffine layer and
the four stock Keras layers), the model alone (one batch in memory, repeated:
the ceiling in fit), and a raw decode-and-resize floor: file bytes already in
memory, decoded and resized by a bare tf.data map (TF's thread pool), or by TF
ops or PIL from one Python thread per core; the fastest of the three is the
floor. Generator passes time --generator_steps steps (their rate is steady),
tf.data passes whole epochs; fit runs --steps_per_execution steps per call for
every setting. Peak RSS of streaming is measured in fresh processes on the
folder and on a tree with each image 4 times. Prints one table, the ratios
against the targets, and a last line with the headline ratio.
"""
import argparse
import atexit
import concurrent.futures
import io
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cats-vs-dogs-small" / "cats_and_dogs_filtered.tar"
SIZE, BATCH, WARMUP = 150, 32, 3  # WARMUP: batches left out of input-alone rates
# Steps left out of fit rates: tracing, plus the batches the loaders' background
# threads queue up meanwhile (the generator's queue holds 10), which would flatter them.
FIT_WARMUP_STEPS = 16


def find_train_dir(path, workdir):
    """The class-folder tree to read: the tar's train/ (extracted) or a folder's train/."""
    path = pathlib.Path(path)
    if path.is_file():
        with tarfile.open(path) as tar:
            tar.extractall(workdir, filter="data")
        path = pathlib.Path(workdir)
    candidates = [p for p in sorted(path.rglob("train")) if p.is_dir()] or [path]
    return candidates[0]


def replicate_tree(scan, dest, copies):
    """dest/<class>/<copy>_<name>: each image `copies` times (symlinks)."""
    for name in scan.class_names:
        (dest / name).mkdir(parents=True, exist_ok=True)
    for i, (path, label) in enumerate(zip(scan.paths, scan.labels)):
        for c in range(copies):
            os.symlink(path, dest / scan.class_names[label] / f"{c}_{i:06d}.jpg")
    return dest


def peak_rss_mb():
    """This process's peak resident memory (VmHWM; ru_maxrss survives exec on Linux)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(folder):
    """In a fresh process: one streaming tf.data epoch inside fit; prints peak RSS in MB."""
    from experiments import stream as experiment
    from experiments.image_folder import scan_folder
    from recipes import stream
    scan = scan_folder(folder, SIZE)
    dataset, _ = stream.tf_data_pipeline(scan.paths, scan.labels, SIZE, BATCH, training=True)
    model = experiment.build_model(SIZE, len(scan.class_names))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    steps = -(-len(scan.paths) // BATCH)
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    print(f"RSS {len(scan.paths)} {peak_rss_mb():.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="tar or class-folder tree")
    parser.add_argument("--passes", type=int, default=3, help="alternating passes per setting")
    parser.add_argument("--workers", default="1,2", help="generator thread settings to try")
    parser.add_argument("--steps_per_execution", type=int, default=4,
                        help="training steps per compiled call, the same for every setting")
    parser.add_argument("--generator_steps", type=int, default=48,
                        help="steps per generator pass (tf.data passes are whole epochs)")
    parser.add_argument("--rss_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child)

    import keras
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    from experiments import stream as experiment
    from experiments.image_folder import scan_folder
    from recipes import stream
    from recipes.step_timer import StepTimer

    workdir = tempfile.mkdtemp(prefix="stream-bench-")
    atexit.register(shutil.rmtree, workdir, True)
    train_dir = find_train_dir(args.data, workdir)
    start = time.perf_counter()
    scan = scan_folder(train_dir, SIZE)
    scan_rate = len(scan.paths) / (time.perf_counter() - start)
    n, steps = len(scan.paths), -(-len(scan.paths) // BATCH)
    workers = [int(w) for w in args.workers.split(",")]
    print(f"{n} images in {len(scan.class_names)} classes from {train_dir}; {steps} steps of "
          f"{BATCH}; checked all files first at {scan_rate:.0f} images/s "
          f"({len(scan.skipped)} bad); {os.cpu_count()} CPU cores")

    view = experiment.link_tree(scan, pathlib.Path(workdir) / "view")

    def generator(w, augment=False):
        return stream.generator_flow(view, scan.class_names, SIZE, BATCH, augment=augment,
                                     workers=w)

    def tf_data(cache="none", augment=False, augment_with="fused"):  # one pass: an epoch
        return stream.tf_data_pipeline(scan.paths, scan.labels, SIZE, BATCH, training=True,
                                       cache=cache, augment=augment, augment_with=augment_with)[0]

    cached_ds, cached_stage = stream.tf_data_pipeline(scan.paths, scan.labels, SIZE, BATCH, True,
                                                      "memory")
    fill_rate = stream.fill_cache(cached_stage)
    loaders = {f"generator w={w}": (generator(w), w) for w in workers}
    loaders.update({"tf.data": (tf_data(), None), "tf.data cached": (cached_ds, None),
                    "generator+aug w=1": (generator(1, True), 1),
                    "tf.data+aug fused": (tf_data(augment=True), None),
                    "tf.data+aug layers": (tf_data(augment=True, augment_with="layers"), None)})

    # The floor: decode and resize only, bytes already in memory, one thread per core.
    encoded = [pathlib.Path(p).read_bytes() for p in scan.paths]

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def tf_decode(data):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        return tf.cast(tf.image.resize(image, (SIZE, SIZE)), tf.uint8)

    def pil_decode(data):
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))

    def floor_pass(decode):
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
            for _ in pool.map(decode, encoded):
                pass
        return n / (time.perf_counter() - t0)

    bytes_ds = tf.data.Dataset.from_tensor_slices(tf.constant(encoded))

    def map_floor_pass():  # TF's own thread pool, nothing but decode, resize and batch
        t0, count = time.perf_counter(), 0
        for batch in bytes_ds.map(tf_decode, num_parallel_calls=tf.data.AUTOTUNE,
                                  deterministic=False).batch(BATCH).prefetch(tf.data.AUTOTUNE):
            count += int(batch.shape[0])
        return count / (time.perf_counter() - t0)

    floors = {"raw floor TF map": map_floor_pass,
              "raw floor TF thr": lambda: floor_pass(tf_decode),
              "raw floor PIL thr": lambda: floor_pass(pil_decode)}

    def steps_of(name):  # generators are slow: a part of the epoch gives their steady rate
        return min(steps, args.generator_steps) if name.startswith("generator") else steps

    def input_pass(name):
        if name in floors:
            return floors[name]()
        data, w = loaders[name]
        if w is None:
            return experiment.time_dataset(data, steps_of(name), WARMUP)
        return experiment.time_generator(data, steps_of(name), w, WARMUP)

    # The model alone: one batch already in memory, repeated; the ceiling for any loader.
    images, labels = next(iter(cached_ds))
    loaders["model alone"] = (tf.data.Dataset.from_tensors((images, labels)).repeat(), None)
    models = {}

    def fit_pass(name):
        data, _ = loaders[name]
        if name not in models:
            keras.utils.set_random_seed(0)
            models[name] = experiment.build_model(SIZE, len(scan.class_names))
            models[name].compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                                 steps_per_execution=args.steps_per_execution)
        timer, sizes = StepTimer(), experiment.CallSizes(BATCH, n, steps)
        models[name].fit(data, epochs=1, steps_per_epoch=steps_of(name), verbose=0,
                         shuffle=False, callbacks=[timer, sizes])
        warmup_calls = -(-FIT_WARMUP_STEPS // args.steps_per_execution)
        return experiment.input_rate(timer.seconds, [k for _, k in sizes.epochs[-1]], warmup_calls)

    rows = {}  # (name, kind) -> [images/s per pass], peak RSS MB
    peak = {}
    for name in loaders:  # untimed: trace each model and start each pipeline's threads once
        fit_pass(name)
    for p in range(args.passes):
        for kind, names, fn in (("input", [*floors, *(k for k in loaders if k != "model alone")],
                                 input_pass),
                                ("fit", list(loaders), fit_pass)):
            for name in names:
                with experiment.PeakRSS() as rss:
                    value = fn(name)
                rows.setdefault((name, kind), []).append(value)
                peak[name] = max(peak.get(name, 0), rss.mb)
                print(f"  pass {p + 1} {kind:<5} {name:<18} {value:8.0f} images/s", flush=True)

    # Streaming memory with 4x the images, each in a fresh process.
    rss = {}
    for copies in (1, 4):
        tree = replicate_tree(scan, pathlib.Path(workdir) / f"x{copies}", copies)
        out = subprocess.run([sys.executable, __file__, f"--rss_child={tree}"],
                             capture_output=True, text=True, timeout=600)
        line = [l for l in out.stdout.splitlines() if l.startswith("RSS ")]
        rss[copies] = float(line[-1].split()[2]) if line else float("nan")

    med = {key: statistics.median(v) for key, v in rows.items()}

    def paired(a, b, kind):
        """Median over passes of a/b within each pass (the settings ran back to back)."""
        return statistics.median(x / y for x, y in zip(rows[(a, kind)], rows[(b, kind)]))

    print(f"\n{'setting':<20}{'input img/s (passes)':>36}{'fit img/s (passes)':>34}"
          f"{'peak RSS MB':>13}")
    for name in [*floors, *loaders]:
        cells = []
        for kind in ("input", "fit"):
            v = rows.get((name, kind))
            cells.append(f"{med[(name, kind)]:7.0f} (" + " ".join(f"{x:.0f}" for x in v) + ")"
                         if v else "-")
        print(f"{name:<20}{cells[0]:>36}{cells[1]:>34}{peak.get(name, 0):>13.0f}")
    print(f"tf.data cache fill (first decode pass): {fill_rate:.0f} images/s")
    cached_fit = rows[("tf.data cached", "fit")]
    print(f"streaming peak RSS, fresh process, one tf.data epoch in fit: {n} images "
          f"{rss[1]:.1f} MB, {4 * n} images {rss[4]:.1f} MB")

    gens = [f"generator w={w}" for w in workers]
    best = max(gens, key=lambda g: med[(g, "fit")])
    g1 = f"generator w={workers[0]}"
    best_floor = max(floors, key=lambda f: med[(f, "input")])
    checks = [
        ("fit: tf.data / generator w=1", paired("tf.data", g1, "fit"), 2.0),
        (f"fit: tf.data / best generator ({best})", paired("tf.data", best, "fit"), 1.3),
        (f"input: tf.data / raw decode floor ({best_floor})",
         paired("tf.data", best_floor, "input"), 0.9),
        ("fit: slowest cached epoch / generator w=1", min(cached_fit) / med[(g1, "fit")], 10.0),
        ("input: tf.data cached / generator w=1", paired("tf.data cached", g1, "input"), 10.0),
        ("fit: tf.data+aug fused / generator+aug w=1",
         paired("tf.data+aug fused", "generator+aug w=1", "fit"), 1.5),
        ("fit: tf.data+aug layers / generator+aug w=1",
         paired("tf.data+aug layers", "generator+aug w=1", "fit"), 1.5),
        ("input: tf.data+aug fused / generator+aug w=1",
         paired("tf.data+aug fused", "generator+aug w=1", "input"), None),
        ("input: tf.data+aug layers / generator+aug w=1",
         paired("tf.data+aug layers", "generator+aug w=1", "input"), None),
        ("input: tf.data / generator w=1", paired("tf.data", g1, "input"), None),
        ("fit: tf.data cached / model alone", paired("tf.data cached", "model alone", "fit"),
         None),
        ("streaming peak RSS growth at 4x images", rss[4] / rss[1] - 1, -0.10),
    ]
    print("\nratios: median over passes of the ratio within a pass (settings ran back to back); "
          "the cached check uses its slowest pass")
    for label, value, target in checks:
        if target is None:
            verdict = "(no target)"
        elif target < 0:
            verdict = f"(target <= {-target:.0%}) " + ("met" if value <= -target else "MISSED")
        else:
            verdict = f"(target >= {target:g}) " + ("met" if value >= target else "MISSED")
        shown = f"{value:+.1%}" if target is not None and target < 0 else f"{value:.2f}"
        print(f"{label:<52} {shown:>7}  {verdict}")
    ratio = checks[0][1]
    print(f"tf.data/generator fit images_per_sec ratio: {ratio:.1f} (target >= 2)")


if __name__ == "__main__":
    main()
