"""Benchmark: a head epoch through the frozen VGG16 base vs on cached features.

    .venv/bin/python benchmarks/transfer.py [--data_dir=PATH] [--images=256] [--repeats=3]

PATH is a folder of class sub-folders, or one with train/ and val/ sub-trees
(default ../shared/data/hymenoptera). Images are resized to 150x150, batch 32,
VGG16 with --weights=none (the speed of a step does not depend on the values
of the weights), the recipe's own model, head and extractor. In one process:
the base runs once over the images to cache their features (timed), then
`--repeats` times, alternating, one training epoch of the head through the
frozen base and one on the cached features, each after one untimed warm-up
epoch (tracing). Prints one table and a last line with the ratio vs target.
"""
import argparse
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_DATA = REPO.parent / "shared" / "data" / "hymenoptera"
TARGET = 10.0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA), help="class-folder tree")
    parser.add_argument("--image_size", type=int, default=150)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256, help="training images used (at most)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs of each, alternating")
    return parser.parse_args()


def timed_epoch(model, dataset):
    """Wall seconds of one training epoch (no validation) and its per-step seconds."""
    from recipes.step_timer import StepTimer
    timer = StepTimer()
    start = time.perf_counter()
    model.fit(dataset, epochs=1, verbose=0, shuffle=False, callbacks=[timer])
    return time.perf_counter() - start, timer.seconds


def main():
    args = parse_args()
    import keras
    import numpy as np
    from datasets import folder
    from experiments import transfer as experiment
    from recipes import transfer
    from recipes.step_timer import steady

    (x, y), _ = folder.load(args.data_dir, args.image_size, 3, seed=0)[0]
    x, y = x[:args.images], y[:args.images]
    batch = min(args.batch_size, len(x))
    steps = len(x) // batch
    print(f"{len(x)} images from {args.data_dir} at {args.image_size}x{args.image_size}, "
          f"batch {batch}, {steps} steps per epoch, {len(set(y.tolist()))} classes; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    keras.utils.set_random_seed(0)
    base = experiment.load_vgg16("none", args.image_size)
    model, head, extractor = transfer.build_model(base, int(y.max()) + 1)
    for m in (model, head):
        m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    start = time.perf_counter()
    features, extract_seconds = experiment.timed_extraction(extractor, x, batch)
    extract_s = time.perf_counter() - start
    images = experiment.make_dataset(x, y, batch, seed=0)
    cached = experiment.make_dataset(features, y, batch, seed=0)

    print("warm-up epochs (tracing, not timed) ...", flush=True)
    timed_epoch(model, images)
    timed_epoch(head, cached)
    results = {"frozen base": [], "cached features": []}
    steps_s = {"frozen base": [], "cached features": []}
    for r in range(args.repeats):
        for name, m, ds in (("frozen base", model, images), ("cached features", head, cached)):
            seconds, step_seconds = timed_epoch(m, ds)
            results[name].append(seconds)
            steps_s[name].extend(step_seconds)
            print(f"  repeat {r + 1}: {name:<16} {seconds:8.3f} s", flush=True)

    print(f"\n{'one epoch of':<24} {'epoch_s p50':>11} {'epoch_s max':>11} "
          f"{'step_ms p50':>11} {'step_ms p90':>11} {'images/s':>9}")
    for name, seconds in results.items():
        p50 = statistics.median(seconds)
        print(f"{'head on ' + name:<24} {p50:>11.3f} {max(seconds):>11.3f} "
              f"{1000 * np.percentile(steps_s[name], 50):>11.1f} "
              f"{1000 * np.percentile(steps_s[name], 90):>11.1f} {steps * batch / p50:>9.1f}")
    steady_s = steady(extract_seconds, warmup=1)
    print(f"{'caching pass (once)':<24} {extract_s:>11.3f} {'':>11} "
          f"{1000 * np.percentile(steady_s, 50):>11.1f} "
          f"{1000 * np.percentile(steady_s, 90):>11.1f} "
          f"{len(x) / extract_s:>9.1f}")
    base_s, head_s = (statistics.median(results[k]) for k in ("frozen base", "cached features"))
    ratio = base_s / head_s
    break_even = extract_s / (base_s - head_s)
    print(f"load average now {os.getloadavg()[0]:.1f}; "
          f"caching pays for itself after {break_even:.1f} head epoch(s)")
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(f"frozen-base/cached-features head epoch_s ratio: {ratio:.1f} "
          f"(target >= {TARGET:g}, {verdict})")


if __name__ == "__main__":
    main()
