"""Pruning on MNIST: the TF Model Optimization guide's recipe vs this recipe's two engines.

The guide (tensorflow.org/model_optimization/guide/pruning/pruning_with_keras):
Conv2D(12, 3) -> MaxPool -> Flatten -> Dense(10), baseline 4 epochs at fit's
default batch 32 on 54,000 training images, then prune_low_magnitude on the whole model,
PolynomialDecay 50% -> 80% over 2 epochs at batch 128 (default frequency 100), strip,
zip the .h5. It reports 0.9794 -> 0.9743 accuracy, 3.04x smaller zipped .h5
and a 9.5x smaller pruned + quantized TFLite file.

Each repeat trains one baseline (Keras 3) and copies its weights into the same
model built with tf_keras, so every variant starts from the same trained
weights; then the variants run one after the other on copies of it:
  guide 80% / 90%          tfmot, the guide's code as written (whole model, frequency 100)
  tfmot 80% / 90%          the prune experiment --engine=tfmot with the CLI's defaults:
                           its layer choice (the 108-weight conv stays dense),
                           the schedule aligned with the fine-tuning span
  keras 80% / 90%          --engine=keras (the default, recipes/prune.py's technique), the same
  tfmot 80% + 8 clusters   then tfmot's sparsity-preserving clustering, 1 epoch at lr/10
Sizes are gzip -9 of each engine's saved model without the optimizer (.h5 for
tfmot, .keras for Keras 3) and of the dynamic-range int8 TFLite file; "x" is
the dense baseline's size in the same format over this size. Accuracy is on
the 10,000 test images.

    python benchmarks/prune.py [--data_dir=../shared/data/mnist] [--repeats=2]
    KERAS_BACKEND=jax python benchmarks/prune.py   # the Keras engine on JAX (no TFLite there)
"""
import argparse
import math
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
from experiments.exports import gzip_bytes, save_model, to_tflite  # noqa: E402
from experiments.prune_tfmot import tfmot_modules  # noqa: E402
from recipes.prune import measure_sparsity  # noqa: E402

BATCH, BASELINE_BATCH, BASELINE_EPOCHS, FINETUNE_EPOCHS, N_TRAIN = 128, 32, 4, 2, 54000
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist"
TARGETS = {0.8: (0.3, 3.0), 0.9: (1.0, 4.5)}  # sparsity: (max accuracy drop in points, min gzip x)
TFLITE_TARGET = 12.0
ENGINE_GAP = 0.3  # points: the Keras engine within this of tfmot at equal sparsity
# "No larger": the same container holds no byte more (no masks or pruning variables left),
# and gzipped it is no larger beyond this share, by which two sets of equally sparse but
# differently trained weights compress differently (0.2-0.4% between repeats here).
GZIP_NOISE = 0.005
TFLITE = keras.backend.backend() == "tensorflow"


def load_mnist(data_dir):
    (x_train, y_train), (x_test, y_test) = idx.load("mnist", data_dir)
    prep = lambda x: (x[..., None] / 255).astype(np.float32)  # noqa: E731
    # The guide trains with validation_split=0.1: the first 54,000 images.
    return ((prep(x_train[:N_TRAIN]), y_train[:N_TRAIN].astype(np.int64)),
            (prep(x_test), y_test.astype(np.int64)))


def measure(model, names, data, baseline, tmp, tag):
    """Accuracy, sparsity and gzip sizes of a stripped model (Keras 3 or tf_keras)."""
    engine = "tfmot" if type(model).__module__.startswith("tf_keras") else "keras"
    per_layer, measured, _ = measure_sparsity(model, names)
    size = save_model(model, os.path.join(tmp, f"{tag}{SUFFIX[engine]}"))
    quant = gzip_bytes(to_tflite(model, quantize=True)) if TFLITE or \
        engine == "tfmot" else float("nan")
    accuracy = prune.accuracy(model, *data[1])
    dense = baseline[engine]
    # The same weights in the same container for both engines: the .keras zip holds a config
    # and metadata the .h5 does not, so files of different formats differ by more than pruning.
    h5 = size if engine == "tfmot" else save_model(tf_keras_twin(model),
                                                   os.path.join(tmp, f"{tag}.h5"))
    h5_raw = os.path.getsize(os.path.join(tmp, f"{tag}.h5"))  # uncompressed: the structure
    return {"accuracy": accuracy, "drop": 100 * (baseline["accuracy"] - accuracy),
            "sparsity": measured, "per_layer": per_layer, "size": size, "quant": quant,
            "size_x": dense / size, "quant_x": dense / quant, "h5": h5, "h5_raw": h5_raw}


def tf_keras_twin(model):
    """The guide's model built with tf_keras, holding a Keras 3 model's weights."""
    twin, _ = prune.build_model((28, 28, 1), 10, "conv", api=tfmot_modules()[0])
    twin.set_weights(model.get_weights())
    return twin


SUFFIX = {"tfmot": ".h5", "keras": ".keras"}


def guide_variant(baselines, loss, data, target, tmp, baseline, tag):
    """The guide's code, except that it prunes a clone (the guide prunes the baseline itself)."""
    tf_keras, tfmot = tfmot_modules()
    sparsity = tfmot.sparsity.keras
    model = tf_keras.models.clone_model(baselines["tfmot"])
    model.set_weights(baselines["tfmot"].get_weights())
    end_step = math.ceil(N_TRAIN / BATCH) * FINETUNE_EPOCHS
    model = sparsity.prune_low_magnitude(model, pruning_schedule=sparsity.PolynomialDecay(
        initial_sparsity=0.5, final_sparsity=target, begin_step=0, end_step=end_step))
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-3), loss=loss["tfmot"],
                  metrics=["accuracy"])
    prune.train(model, data, FINETUNE_EPOCHS, BATCH, None, 0, [sparsity.UpdatePruningStep()])
    stripped = sparsity.strip_pruning(model)
    names = [layer.name for layer in stripped.layers if layer.weights]
    return measure(stripped, names, data, baseline, tmp, tag)


def recipe_variant(engine, baselines, loss, data, target, tmp, baseline, tag, clusters=0):
    """The prune experiment with the CLI's defaults for the pruning, on the guide's training."""
    config = prune.Config(engine=engine, model="conv", epochs=FINETUNE_EPOCHS, batch_size=BATCH,
                          final_sparsity=target, clusters=clusters)
    result = prune.prune_and_finetune(baselines[engine], loss[engine], data, config, target,
                                      os.path.join(tmp, tag))
    return measure(result["model"], list(result["per_layer"]), data, baseline, tmp, tag)


VARIANTS = [
    ("guide 80%", lambda *a: guide_variant(*a[:3], 0.8, *a[3:])),
    ("tfmot 80%", lambda *a: recipe_variant("tfmot", *a[:3], 0.8, *a[3:])),
    ("keras 80%", lambda *a: recipe_variant("keras", *a[:3], 0.8, *a[3:])),
    ("tfmot 80% + 8 clusters", lambda *a: recipe_variant("tfmot", *a[:3], 0.8, *a[3:],
                                                         clusters=8)),
    ("guide 90%", lambda *a: guide_variant(*a[:3], 0.9, *a[3:])),
    ("tfmot 90%", lambda *a: recipe_variant("tfmot", *a[:3], 0.9, *a[3:])),
    ("keras 90%", lambda *a: recipe_variant("keras", *a[:3], 0.9, *a[3:])),
]


def train_baselines(data, seed, tmp):
    """The guide's baseline, trained once in Keras 3, and its twin in tf_keras."""
    tf_keras = tfmot_modules()[0]
    keras.utils.set_random_seed(seed)
    model, loss = prune.build_model((28, 28, 1), 10, "conv")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    prune.train(model, data, BASELINE_EPOCHS, BASELINE_BATCH, None, seed)
    twin, twin_loss = prune.build_model((28, 28, 1), 10, "conv", api=tf_keras)
    twin.set_weights(model.get_weights())
    baselines, losses = {"keras": model, "tfmot": twin}, {"keras": loss, "tfmot": twin_loss}
    sizes = {engine: save_model(m, os.path.join(tmp, f"baseline{SUFFIX[engine]}"))
             for engine, m in baselines.items()}
    return baselines, losses, {"accuracy": prune.accuracy(model, *data[1]), **sizes}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA),
                        help="folder with the four MNIST idx .gz files")
    parser.add_argument("--repeats", type=int, default=2, help="baselines (seeds) to repeat on")
    args = parser.parse_args()
    start = time.perf_counter()
    data = load_mnist(args.data_dir)
    rows = {name: [] for name, _ in VARIANTS}
    baselines_seen = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.repeats):
            print(f"\n== repeat {seed + 1}/{args.repeats}: baseline, {BASELINE_EPOCHS} epochs ==")
            baselines, losses, baseline = train_baselines(data, seed, tmp)
            baselines_seen.append(baseline)
            for name, variant in VARIANTS:
                print(f"\n== repeat {seed + 1}/{args.repeats}: {name} ==")
                keras.utils.set_random_seed(seed)
                tfmot_modules()[0].utils.set_random_seed(seed)
                began = time.perf_counter()
                row = variant(baselines, losses, data, tmp, baseline,
                              f"{name}-{seed}".replace(" ", "_").replace("%", ""))
                row["seconds"] = time.perf_counter() - began
                rows[name].append(row)
    print_report(baselines_seen, rows, args, time.perf_counter() - start)


def median(rows, key):
    return float(np.median([r[key] for r in rows]))


def fmt(value, spec):
    """The value in spec, or a dash of the same width where it was not measured (nan)."""
    width = int(spec.split(",")[0].split(".")[0])
    return f"{'-':>{width}}" if math.isnan(value) else f"{value:{spec}}"


def print_report(baselines, rows, args, wall):
    print(f"\nMNIST conv model (guide's), backend {keras.backend.backend()}, {args.repeats} "
          "repeat(s), medians; drop = baseline minus pruned test accuracy in points; x = the "
          "dense baseline's gzip in the same format / this gzip")
    header = (f"{'variant':<24} {'sparsity':>8} {'test acc':>9} {'drop pts':>9} "
              f"{'model gzip':>10} {'x':>5} {'int8 tflite gzip':>16} {'x':>6} {'s':>5}  "
              "per-layer sparsity")
    print(header)
    print("-" * len(header))
    print(f"{'dense baseline (.h5)':<24} {0:>8.3f} {median(baselines, 'accuracy'):>9.4f} "
          f"{'':>9} {median(baselines, 'tfmot'):>10,.0f} {1:>5.2f}")
    print(f"{'dense baseline (.keras)':<24} {0:>8.3f} {median(baselines, 'accuracy'):>9.4f} "
          f"{'':>9} {median(baselines, 'keras'):>10,.0f} {1:>5.2f}")
    for name, _ in VARIANTS:
        r = rows[name]
        layers = ", ".join(f"{k} {v:.3f}" for k, v in r[0]["per_layer"].items())
        print(f"{name:<24} {median(r, 'sparsity'):>8.3f} {median(r, 'accuracy'):>9.4f} "
              f"{median(r, 'drop'):>9.2f} {median(r, 'size'):>10,.0f} {median(r, 'size_x'):>5.2f} "
              f"{fmt(median(r, 'quant'), '16,.0f')} {fmt(median(r, 'quant_x'), '6.2f')} "
              f"{median(r, 'seconds'):>5.0f}  {layers}")
    print("drop per repeat: " + "; ".join(
        f"{name} " + "/".join(f"{r['drop']:.2f}" for r in rows[name]) for name, _ in VARIANTS))
    print(f"whole script {wall:.0f} s\n")
    met = []
    for engine in prune.ENGINES:
        for target, (max_drop, min_x) in TARGETS.items():
            r = rows[f"{engine} {target:.0%}"]
            drop, x = median(r, "drop"), median(r, "size_x")
            met.append(drop <= max_drop and x >= min_x)
            print(f"{engine} {target:.0%}: accuracy drop {drop:.2f} pts (target <= {max_drop:g}),"
                  f" gzip {x:.2f}x (target >= {min_x:g}): {'MET' if met[-1] else 'MISSED'}")
        for name in (f"{engine} 90%",) + (("tfmot 80% + 8 clusters",) if engine == "tfmot" else ()):
            x = median(rows[name], "quant_x")
            if math.isnan(x):
                print(f"{name} pruned + int8 TFLite: not measured (TFLite needs the TensorFlow "
                      "backend)")
                continue
            met.append(x >= TFLITE_TARGET)
            print(f"{name} pruned + int8 TFLite: {x:.1f}x smaller than the dense model gzip "
                  f"(target >= {TFLITE_TARGET:g}): {'MET' if met[-1] else 'MISSED'}")
    for target in TARGETS:
        keras_row, tfmot_row = rows[f"keras {target:.0%}"], rows[f"tfmot {target:.0%}"]
        gap = median(tfmot_row, "accuracy") * 100 - median(keras_row, "accuracy") * 100
        k_gzip, t_gzip = median(keras_row, "h5"), median(tfmot_row, "h5")
        k_raw, t_raw = median(keras_row, "h5_raw"), median(tfmot_row, "h5_raw")
        smaller = k_raw <= t_raw and k_gzip <= t_gzip * (1 + GZIP_NOISE)
        met.append(gap <= ENGINE_GAP and smaller)
        print(f"keras vs tfmot at {target:.0%}: {gap:+.2f} pts behind (target <= {ENGINE_GAP:g}); "
              f"the same weights in .h5: {k_raw:,.0f} vs {t_raw:,.0f} bytes (target: no larger), "
              f"gzipped {k_gzip:,.0f} vs {t_gzip:,.0f} ({100 * (k_gzip / t_gzip - 1):+.2f}%, "
              f"target <= +{100 * GZIP_NOISE:g}%; native .keras {median(keras_row, 'size'):,.0f})"
              f": {'MET' if met[-1] else 'MISSED'}")
    print(f"targets met: {sum(met)} of {len(met)}")


if __name__ == "__main__":
    main()
