"""Models written as keras.io and keras.applications write them, through every recipe.

tests/user_models.py builds eight models none of the recipes wrote (a one-hot loss by
name, augmentation before Rescaling, a nested feature extractor, SeparableConv2D and
DepthwiseConv2D with BatchNorm, MobileNetV2 with weights=None, jit_compile=True,
Conv1D on sequences and Embedding on variable-length token ids from .npz files). Each
goes through every recipe that takes --model, from the CLI, with a few steps each; the
table shows the exit code, whether the run stated the expected pixel range and loss,
whether model_params is the model's own count, and prune's zeros over all weights.

    python benchmarks/own_models.py [--data_dir=PHOTOS] [--recipes=batch,prune] [--workers=2]

PHOTOS is a folder of class sub-folders (default: ../shared/data/hymenoptera/train, real
photos of ants and bees; generated shapes when it is missing).
"""
import argparse
import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import user_models  # noqa: E402

RECIPE_FLAGS = {  # a few steps each
    "batch": ["--batch_sizes=8", "--epochs=1", "--steps_per_epoch=2"],
    "mixed_precision": ["--epochs=1", "--steps_per_epoch=2", "--batch_size=8", "--compare"],
    "device": ["--devices=cpu", "--epochs=1", "--batch_size=8"],
    "profile": ["--epochs=1", "--batch_size=8", "--steps_per_epoch=6", "--profile_steps=2,3"],
    "stream": ["--epochs=1", "--batch_size=8", "--input_batches=2", "--compare"],
    "prune": ["--epochs=1", "--batch_size=8"],
    "advise": ["--budget_s=10", "--repeats=1", "--batch_size=8", "--max_batch_size=16"],
}
IMAGES_ONLY = ("stream",)  # it reads folders


def write_models(folder, classes):
    """{name: (model file, data flags, expected range, expected loss, params)}."""
    import keras
    cases = {}
    for name, (build, data, pixels, loss) in user_models.MODELS.items():
        model = build(keras, user_models.CLASSES if data != "images" else classes)
        model.save(folder / f"{name}.keras")
        if data == "images":
            flags = None  # the photo folder, given per run
        else:
            flags = ["--dataset=npz", f"--data_dir={data(folder / f'{name}.npz')}"]
        cases[name] = (folder / f"{name}.keras", flags, pixels, loss, model.count_params())
    return cases


def run_one(name, case, recipe, photos, logdir):
    """One CLI run -> a row of the table (and the failure's last lines)."""
    path, data_flags, pixels, loss, params = case
    flags = data_flags or [f"--data_dir={photos}"]
    logs = logdir / name
    result = subprocess.run([sys.executable, str(REPO / "main.py"), f"--recipe={recipe}",
                             *RECIPE_FLAGS[recipe], f"--model={path}", *flags,
                             f"--logdir={logs}"], capture_output=True, text=True, timeout=900,
                            cwd=REPO)
    row = {"model": name, "recipe": recipe, "exit": result.returncode,
           "loss_stated": loss in result.stdout,
           "pixels_stated": pixels is None or any(
               f"{words} {pixels}" in result.stdout
               for words in ("pixels reach --model in", "pixels reach the model in",
                             "images reach it in")),
           "error": (result.stderr.strip().splitlines() or [""])[-1][:160]}
    runs = sorted((logs / recipe).glob("*/metrics.json"))
    if runs:
        metrics = json.loads(runs[-1].read_text())
        row["params_ok"] = metrics.get("model_params") == params
        row["model_sparsity"] = metrics.get("model_sparsity")
    return row


def run_matrix(cases, recipes, photos, logdir, workers):
    jobs = [(name, recipe) for name, case in cases.items() for recipe in recipes
            if case[1] is None or recipe not in IMAGES_ONLY]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(lambda job: run_one(job[0], cases[job[0]], job[1], photos, logdir),
                             jobs))
    return rows


def passed(row):
    return (row["exit"] == 0 and row["loss_stated"] and row["pixels_stated"]
            and row.get("params_ok", False)
            and (row["recipe"] != "prune" or (row.get("model_sparsity") or 0) >= 0.75))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared/data/hymenoptera/train"))
    parser.add_argument("--recipes", default=",".join(RECIPE_FLAGS))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        photos = pathlib.Path(args.data_dir)
        if not photos.is_dir():
            from test_own_model import write_folder
            photos = write_folder(tmp / "photos")
        classes = len([p for p in photos.iterdir() if p.is_dir()])
        cases = write_models(tmp, classes)
        rows = run_matrix(cases, args.recipes.split(","), photos, tmp / "runs", args.workers)
    print(f"{'model':<22} {'recipe':<16} exit loss pixels params sparsity  error")
    for r in rows:
        sparsity = "" if r.get("model_sparsity") is None else f"{r['model_sparsity']:.3f}"
        print(f"{r['model']:<22} {r['recipe']:<16} {r['exit']:>4} {str(r['loss_stated']):<5} "
              f"{str(r['pixels_stated']):<6} {str(r.get('params_ok')):<6} {sparsity:>8}  "
              f"{'' if passed(r) else r['error']}")
    print(f"runs passed: {sum(map(passed, rows))} of {len(rows)} (target: all; prune's zeros "
          "over all weight matrices >= 0.75)")


if __name__ == "__main__":
    main()
