"""Does the 16-bit policy cost accuracy? The recipe's --compare, repeated over seeds.

Runs the mixed_precision recipe with --compare on its default data (the
generated shapes set it names in DEFAULT_DATASET, at its DATA geometry and
size) once per seed;
each run trains float32 and a 16-bit policy from the same initial weights on
the same batches: auto's pick, or, where auto keeps float32, the fastest
16-bit policy this hardware runs (the recipe's --compare never measures
float32 against itself). One run's delta mixes precision with training
noise, so this prints every seed's accuracies, delta and speedup, and a last
line with the largest |delta| against the issue's target (within 1 point).

    python benchmarks/mixed_precision_accuracy.py             # 3 seeds, ~3 min each on 2 CPU cores
    python benchmarks/mixed_precision_accuracy.py --seeds=5
"""
import argparse
import contextlib
import io
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from datasets import shapes  # noqa: E402
from experiments import mixed_precision as mp  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="runs, seeds 0..N-1 (weights, order)")
    parser.add_argument("--epochs", type=int, default=mp.Config.epochs)
    args = parser.parse_args()

    n_train, n_val = mp.DATA["examples"]
    size, channels = mp.DATA["image_size"], mp.DATA["channels"]
    data = shapes.load(n_train, n_val, size, channels, seed=0, variant=mp.DEFAULT_DATASET)
    print(f"{mp.DEFAULT_DATASET} {size}x{size}x{channels}: {n_train} train, {n_val} validation; "
          f"{args.epochs} epochs per policy")
    print(f"{'seed':>4} {'policy':<15} {'val_acc':>8} {'float32':>8} {'delta pts':>10} "
          f"{'speedup':>8}")
    deltas = []
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as run_dir, \
                contextlib.redirect_stdout(io.StringIO()):  # the recipe's per-epoch lines
            m = mp.run(mp.Config(compare=True, epochs=args.epochs, seed=seed), run_dir, data)
        deltas.append(100 * m["val_accuracy_delta"])
        if seed == 0:
            print(f"     (auto recommends {m['recommended_policy']} here; measured {m['policy']})")
        print(f"{seed:>4} {m['policy']:<15} {m['val_accuracy']:>8.4f} "
              f"{m['float32_val_accuracy']:>8.4f} {deltas[-1]:>+10.2f} {m['speedup']:>8.2f}",
              flush=True)
    worst = max(abs(d) for d in deltas)
    print(f"max |val_accuracy_delta| over {args.seeds} seeds: {worst:.2f} points "
          f"(target <= 1: {'met' if worst <= 1 else 'NOT met'})")


if __name__ == "__main__":
    main()
