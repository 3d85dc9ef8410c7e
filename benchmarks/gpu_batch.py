"""benchmarks/gpu.sh's batch sweep: the drop-in recipes/batch.py on the batch recipe's data.

`python main.py --recipe=batch` feeds its sweep through tf.data (resumable batches,
sharded validation), which a JAX-only GPU machine does not have; the drop-in file's
sweep needs none (a PyDataset of full batches). Same data and model as the recipe: the
generated shapes set at 28x28, its 784-128-classes classifier, Adam 1e-3, each batch
size from the same weights. Writes OUT/metrics.json with the batch recipe's headline
names, for benchmarks/gpu_table.py.

    python benchmarks/gpu_batch.py --out=FOLDER [--batch_sizes=256,1024,4096,8192]
        [--epochs=3] [--examples=N]
"""
import argparse
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import keras  # noqa: E402

import datasets  # noqa: E402
from experiments.batch import DATA, build_model  # noqa: E402
from experiments.files import save_json  # noqa: E402
from recipes.batch import format_table, pick_best, sweep  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch_sizes", default="256,1024,4096,8192")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--examples", type=int, default=None, help="training examples (all)")
    args = parser.parse_args()
    (x, y), (x_val, y_val) = datasets.load("shapes", image_size=DATA["image_size"],
                                           channels=DATA["channels"])
    x, y = x[:args.examples], y[:args.examples]
    keras.utils.set_random_seed(0)
    model, loss = build_model(x.shape[1:], int(max(y.max(), y_val.max())) + 1)
    model.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    sizes = [min(int(b), len(x)) for b in args.batch_sizes.split(",")]
    results = sweep(model, x, y, x_val, y_val, batch_sizes=sizes, epochs=args.epochs, verbose=0)
    best = pick_best(results, tolerance=0.01)
    print(f"backend {keras.backend.backend()}; {len(x):,} training examples, {args.epochs} "
          f"epochs per batch size\n" + format_table(results, best=best))
    smallest, largest = results[sizes[0]], results[sizes[-1]]
    os.makedirs(args.out, exist_ok=True)
    save_json(os.path.join(args.out, "metrics.json"), {
        "best_batch_size": best, "best_examples_per_sec": results[best]["examples_per_sec"],
        "best_val_accuracy": results[best]["val_accuracy"],
        "throughput_ratio_largest_vs_smallest": (largest["examples_per_sec"]
                                                 / smallest["examples_per_sec"]),
        "backend": keras.backend.backend(),
        "results": {str(b): r for b, r in results.items()}})


if __name__ == "__main__":
    main()
