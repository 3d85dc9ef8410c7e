"""float32 vs mixed_bfloat16 vs mixed_float16: training throughput, measured.

Two models on real Fashion-MNIST images: the mixed_precision recipe's conv net
(images upsampled to 64x64 RGB, its default geometry) and a dense-heavy MLP
(784-1024-1024-1024-10). For each model the three policies start from the
same initial weights, train on the same batches, and take turns in one
process (round-robin, the starting policy rotating each round), repeated.
After a warm-up that compiles each model, each turn times its steps (the
loss is read back to the host, so async backends are waited for; a turn is
cut short after --max_turn_s, since float16 crawls on a CPU); the table shows
the median over rounds of each turn's median examples/s, and the ratio to
float32.

    python benchmarks/mixed_precision.py                    # TensorFlow backend
    KERAS_BACKEND=jax python benchmarks/mixed_precision.py  # JAX backend, no TF needed

The last lines say what `--policy=auto` of the recipe picks on this machine
and whether this measurement supports it (auto must never pick a policy that
is slower than float32 here), and the ratio vs the target: >= 1.5 for the
picked 16-bit policy on CPU, >= 2 for the conv net on a GPU.
"""
import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import numpy as np  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from datasets import idx  # noqa: E402  (checks magic, shape and count; no TensorFlow)
from experiments.mixed_precision import build_model  # noqa: E402  (the recipe's conv net)
from recipes import mixed_precision as mp  # noqa: E402

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


def load_fashion(data_dir, n):
    """The first n Fashion-MNIST training images (float32 in [0, 1]) and labels."""
    (images, labels), _ = idx.load("fashion_mnist", pathlib.Path(data_dir) / "fashion-mnist")
    return images[:n].astype("float32") / 255, labels[:n].astype("int64")


def upsample_rgb(images, size):
    """Nearest-neighbour resize of (n, 28, 28) gray to (n, size, size, 3), NumPy only."""
    idx = (np.arange(size) * images.shape[1] / size).astype(int)
    big = images[:, idx][:, :, idx]
    return np.repeat(big[..., None], 3, axis=-1)


def build_mlp(input_shape, num_classes):
    return keras.Sequential([
        keras.Input(shape=input_shape), keras.layers.Flatten(),
        keras.layers.Dense(1024, activation="relu"), keras.layers.Dense(1024, activation="relu"),
        keras.layers.Dense(1024, activation="relu"), keras.layers.Dense(num_classes),
        keras.layers.Activation("softmax", dtype="float32")])


class Timer(keras.callbacks.Callback):
    """Step seconds; stops the turn once it has used max_seconds (16-bit on CPU is slow)."""

    def __init__(self, max_seconds, min_steps=2):
        super().__init__()
        self.max_seconds, self.min_steps, self.seconds = max_seconds, min_steps, []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        float(keras.ops.convert_to_numpy(logs["loss"]))  # wait for the step to finish
        self.seconds.append(time.perf_counter() - self._start)
        if len(self.seconds) >= self.min_steps and sum(self.seconds) > self.max_seconds:
            self.model.stop_training = True


def make_model(builder, policy, input_shape, weights):
    with mp.global_policy(policy):
        model = builder(input_shape, 10)
        model.set_weights(weights)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy())
    return model


def bench_model(name, builder, x, y, args):
    keras.utils.set_random_seed(0)
    with mp.global_policy("float32"):
        weights = builder(x.shape[1:], 10).get_weights()
    models = {p: make_model(builder, p, x.shape[1:], weights) for p in args.policies}
    per_round = {p: [] for p in args.policies}
    chunk = args.steps * args.batch_size
    for p in args.policies:  # warm-up: two steps each compile the train step; not counted
        models[p].fit(x[:2 * args.batch_size], y[:2 * args.batch_size],
                      batch_size=args.batch_size, epochs=1, shuffle=False, verbose=0)
    for r in range(1, args.rounds + 1):
        start = (r * chunk) % (len(x) - chunk + 1)
        xs, ys = x[start:start + chunk], y[start:start + chunk]
        order = args.policies[r % len(args.policies):] + args.policies[:r % len(args.policies)]
        for p in order:
            timer = Timer(args.max_turn_s)
            models[p].fit(xs, ys, batch_size=args.batch_size, epochs=1, shuffle=False,
                          verbose=0, callbacks=[timer])
            per_round[p].append(args.batch_size / float(np.median(timer.seconds)))
            print(f"  {name} round {r} {p:<15} {per_round[p][-1]:9.0f} examples/s "
                  f"({len(timer.seconds)} steps)", flush=True)
    return {p: float(np.median(v)) for p, v in per_round.items()}, per_round


def auto_check(pick, name, result, per_round, noise=0.10):
    """'ok' or 'VIOLATION': does this measurement support auto's pick for one model?

    A 16-bit pick must not be slower than float32. A float32 pick is wrong when a
    16-bit policy was faster beyond noise: by more than `noise` at the median and
    in every round.
    """
    base = result["float32"]
    if pick != "float32":
        ok = result[pick] >= base
        return (f"{'ok' if ok else 'VIOLATION'}: auto picks {pick} for {name}, "
                f"{result[pick] / base:.2f}x float32 here")
    challengers = [p for p in result if p != "float32"]
    if not challengers:
        return f"ok: auto picks float32 for {name} (no 16-bit policy measured)"
    best = max(challengers, key=result.get)
    beaten = result[best] > (1 + noise) * base and all(
        fast > slow for fast, slow in zip(per_round[best], per_round["float32"]))
    return (f"{'VIOLATION' if beaten else 'ok'}: auto picks float32 for {name}; the fastest "
            f"16-bit policy, {best}, ran {result[best] / base:.2f}x float32 here")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"),
                        help="folder holding fashion-mnist/ (default: ../shared/data)")
    parser.add_argument("--examples", type=int, default=4096, help="training images to use")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="steps per turn")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up)")
    parser.add_argument("--max_turn_s", type=float, default=8.0,
                        help="cut a turn short after this many seconds (float16 on CPU crawls)")
    parser.add_argument("--models", default="conv,mlp")
    parser.add_argument("--policies", default=",".join(POLICIES))
    args = parser.parse_args()
    args.policies = [p for p in args.policies.split(",") if p]
    if "float32" not in args.policies:
        sys.exit("error: --policies must include float32 (the baseline)")

    images, labels = load_fashion(args.data_dir, args.examples)
    data = {"conv": (upsample_rgb(images, 64), labels), "mlp": (images[..., None], labels)}
    builders = {"conv": build_model, "mlp": build_mlp}
    devices = mp.accelerators()
    where = "GPU" if any(k == "gpu" for k, _ in devices) else "CPU"
    print(f"backend: {keras.backend.backend()}  device: {where}  flags: "
          f"{' '.join(sorted(mp.cpu_flags() & {'avx512_bf16', 'amx_bf16', 'avx512_fp16'}))}")

    table, auto, rounds = {}, {}, {}
    for name in args.models.split(","):
        x, y = data[name]
        with mp.global_policy("float32"):
            auto[name], reason = mp.choose_policy(model=builders[name](x.shape[1:], 10))
        print(f"recipe --policy=auto picks for {name}: {auto[name]} ({reason})")
        table[name], rounds[name] = bench_model(name, builders[name], x, y, args)

    print(f"\n{'model':<6} {'policy':<16} {'examples/s':>11} {'vs float32':>11}")
    for name, result in table.items():
        for p in args.policies:
            print(f"{name:<6} {p:<16} {result[p]:>11.0f} {result[p] / result['float32']:>10.2f}x")

    for name, result in table.items():
        print(auto_check(auto[name], name, result, rounds[name]))
    target = 2.0 if where == "GPU" else 1.5
    first = auto[next(iter(table))]
    best16 = first if first != "float32" else max(
        (p for p in args.policies if p != "float32"), key=lambda p: table["conv"][p]
        if "conv" in table else 0)
    name = "conv" if "conv" in table else next(iter(table))
    ratio = table[name][best16] / table[name]["float32"]
    verdict = "met" if ratio >= target else "NOT met"
    print(f"{best16}/float32 {name} {where} train examples_per_sec ratio: {ratio:.2f} "
          f"(target >= {target:g}: {verdict})")


if __name__ == "__main__":
    main()
