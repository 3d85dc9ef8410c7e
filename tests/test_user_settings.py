"""The user's compile settings are kept: jit_compile always, steps_per_execution unless the
recipe sets it itself to time its steps (then it says so)."""
import json

import keras

from helpers import only_run_dir, run_cli


def test_batch_keeps_jit_compile_and_says_it_times_single_steps(tmp_path):
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"],
                  jit_compile=False, steps_per_execution=4)
    model.save(tmp_path / "mine.keras")
    result = run_cli("--recipe=batch", "--batch_sizes=8", "--epochs=1", "--steps_per_epoch=4",
                     f"--model={tmp_path / 'mine.keras'}", f"--logdir={tmp_path / 'runs'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "your model's steps_per_execution=4 is not used here" in result.stdout
    metrics = json.loads((only_run_dir(tmp_path / "runs", "batch") / "metrics.json").read_text())
    trained = keras.models.load_model(metrics["best_model_file"])
    assert trained.get_compile_config()["jit_compile"] is False  # Keras' default would be "auto"
    assert trained.get_compile_config()["steps_per_execution"] == 1
