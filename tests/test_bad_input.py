"""Every bad input across the CLI and the recipes: one line, exit code 2, nothing left.

The cases run main.main() in this process (one TensorFlow import for all of
them); tests/test_cli.py checks a few of the same end to end in subprocesses.
README's troubleshooting section lists these messages.
"""
import dataclasses
import json

import pytest
from PIL import Image

import main
from helpers import error_lines, write_idx_gz
from experiments import batch


def make_folders(root):
    """The bad data folders the cases point at."""
    (root / "empty").mkdir()
    (root / "flat").mkdir()
    (root / "flat" / "a.jpg").write_bytes(b"not really")
    (root / "one_class" / "cats").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "one_class" / "cats" / "0.png")
    idx = root / "idx"
    idx.mkdir()
    write_idx_gz(idx / "train-images-idx3-ubyte.gz", 2051, (5, 28, 28), bytes(5 * 28 * 28))
    write_idx_gz(idx / "train-labels-idx1-ubyte.gz", 2049, (5,), bytes(5))
    write_idx_gz(idx / "t10k-images-idx3-ubyte.gz", 2051, (3, 28, 28), bytes(100))  # truncated
    write_idx_gz(idx / "t10k-labels-idx1-ubyte.gz", 2049, (3,), bytes(3))
    (root / "a_file").write_text("not a folder")
    (root / "text.h5").write_text("not HDF5 weights")


BATCH = ["--recipe=batch", "--batch_sizes=8", "--epochs=1", "--steps_per_epoch=2"]
# name: (argv after main.py, with {root} for the temp dir; expected text in the error line)
CASES = {
    # the CLI and its shared flags
    "unknown_recipe": (["--recipe=nope"], "unknown recipe 'nope'; choose one of batch"),
    "no_recipe": (["--epochs=2"], "--recipe is required"),
    "unknown_flag": (BATCH + ["--nope=1"], "Unknown command line flag 'nope'"),
    "not_a_number": (BATCH + ["--seed=two"], "--seed"),
    "stray_argument": (BATCH + ["extra"], "unexpected arguments: extra"),
    "unknown_dataset": (BATCH + ["--dataset=cifar"], "unknown --dataset=cifar"),
    "zero_epochs": (BATCH + ["--epochs=0"], "--epochs must be at least 1"),
    "negative_batch_size": (["--recipe=prune", "--batch_size=-3"], "--batch_size must be at least 1"),
    "zero_steps_per_epoch": (BATCH + ["--steps_per_epoch=0"], "--steps_per_epoch must be at least 1"),
    "flag_recipe_lacks": (["--recipe=batch", "--batch_size=64"], "--batch_size does not apply"),
    "unwritable_logdir": (BATCH + ["--logdir={root}/a_file/runs"], "--logdir is not writable"),
    # data
    "missing_data_dir": (BATCH + ["--data_dir={root}/nowhere"], "does not exist"),
    "empty_data_dir": (BATCH + ["--data_dir={root}/empty"], "is empty"),
    "no_class_folders": (BATCH + ["--data_dir={root}/flat"], "no class sub-folders"),
    "one_class_folder": (BATCH + ["--data_dir={root}/one_class"], "one class folder (cats)"),
    "truncated_idx": (BATCH + ["--dataset=mnist", "--data_dir={root}/idx"],
                      "t10k-images-idx3-ubyte.gz is truncated"),
    "idx_files_missing": (BATCH + ["--dataset=fashion_mnist", "--data_dir={root}/empty"],
                          "lacks train-images-idx3-ubyte.gz"),
    # distribution and resuming
    "unknown_strategy": (BATCH + ["--strategy=bogus"], "unknown --strategy=bogus"),
    "unknown_strategy_on_one_device_recipe": (["--recipe=transfer", "--strategy=bogus"],
                                              "unknown --strategy=bogus"),
    "multi_worker_without_tf_config": (BATCH + ["--strategy=multi_worker"], "needs the TF_CONFIG"),
    "multi_worker_tf_config_not_json": (BATCH + ["--strategy=multi_worker"],
                                        "TF_CONFIG is not valid JSON", {"TF_CONFIG": "{cluster"}),
    "multi_worker_tf_config_without_task": (
        BATCH + ["--strategy=multi_worker"], 'TF_CONFIG needs "cluster" and "task" objects',
        {"TF_CONFIG": '{"cluster": {"worker": ["127.0.0.1:1"]}}'}),
    "multi_worker_task_outside_cluster": (
        BATCH + ["--strategy=multi_worker"], "is not in its cluster",
        {"TF_CONFIG": '{"cluster": {"worker": ["127.0.0.1:1"]}, '
                      '"task": {"type": "worker", "index": 3}}'}),
    "data_parallel_on_tensorflow": (BATCH + ["--strategy=data_parallel"],
                                    "on KERAS_BACKEND=tensorflow use --strategy=mirrored"),
    "strategy_recipe_lacks": (["--recipe=device", "--strategy=mirrored"],
                              "--strategy=mirrored is not supported by --recipe=device"),
    "prune_tfmot_engine_on_a_strategy": (
        ["--recipe=prune", "--engine=tfmot", "--strategy=mirrored"],
        "--engine=tfmot trains on one device: --strategy=mirrored needs --engine=keras"),
    "resume_prune_tfmot": (["--recipe=prune", "--engine=tfmot", "--resume"],
                           "--recipe=prune cannot resume here: --engine=tfmot keeps no per-epoch"),
    "resume_multi_worker": (BATCH + ["--strategy=multi_worker", "--resume"],
                            "--resume is not supported with --strategy=multi_worker"),
    "resume_not_resumable": (["--recipe=device", "--resume", "--logdir={root}/runs"],
                             "--recipe=device cannot resume"),
    # recipe flags
    "batch_sizes_not_numbers": (BATCH[:1] + ["--batch_sizes=8,x"], "--batch_sizes=8,x is not a list"),
    "batch_size_zero_in_sweep": (BATCH[:1] + ["--batch_sizes=0,8"], "--batch_sizes must be positive"),
    "sparsity_above_one": (["--recipe=prune", "--final_sparsity=1.2"], "--final_sparsity must be in [0, 1)"),
    "m_by_n_reversed": (["--recipe=prune", "--sparsity_m_by_n=3,2"], "--sparsity_m_by_n must be m,n"),
    "cache_with_augment": (["--recipe=transfer", "--cache_features", "--augment"],
                           "--cache_features cannot be used with --augment"),
    "image_too_small_for_vgg": (["--recipe=transfer", "--image_size=16"], "--image_size must be at least"),
    "weights_file_missing": (["--recipe=transfer", "--weights={root}/vgg.h5"], "is not a file"),
    "weights_file_not_hdf5": (["--recipe=transfer", "--weights={root}/text.h5", "--image_size=32"],
                              "text.h5 cannot be loaded into VGG16 (no top): Unable to"),
    "bad_price": (["--recipe=device", "--price_per_hour=cpu:abc"], "--price_per_hour"),
    "unknown_policy": (["--recipe=mixed_precision", "--policy=float64"], "--policy"),
    "profile_steps_reversed": (["--recipe=profile", "--profile_steps=15,10"], "--profile_steps must be"),
    "stream_unknown_loader": (["--recipe=stream", "--loader=pandas"], "--loader"),
    "stream_tiny_images": (["--recipe=stream", "--image_size=4"], "--image_size must be at least"),
    "advise_no_budget": (["--recipe=advise", "--budget_s=0"], "--budget_s must be > 0"),
    "advise_max_batch_below_batch": (["--recipe=advise", "--max_batch_size=16"],
                                     "--max_batch_size (16) must be at least --batch_size (32)"),
    "advise_one_class_folder": (["--recipe=advise", "--data_dir={root}/one_class"],
                                "one class folder (cats)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_no_results(case, tmp_path, capfd, monkeypatch):
    make_folders(tmp_path)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    args, expected, env = (CASES[case] + ({},))[:3]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = [a.replace("{root}", str(tmp_path)) for a in args]
    if not any(a.startswith("--logdir") for a in args):
        args.append(f"--logdir={tmp_path / 'runs'}")
    assert main.main(["main.py", *args]) == 2
    lines = error_lines(capfd.readouterr().err)  # the process's stderr, TensorFlow's included
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert not list((tmp_path / "runs").glob("*/*"))  # no run folder, no partial result


def test_resume_of_a_run_started_with_other_settings_is_one_line_exit_2(tmp_path, capfd):
    """Continuing a killed 3-epoch run as a 2-epoch one would mix two experiments."""
    first = tmp_path / "runs" / "batch" / "20260101T000000Z"
    first.mkdir(parents=True)
    (first / "flags.json").write_text(json.dumps({
        "recipe": "batch", "dataset": "shapes", "argv": BATCH + ["--epochs=3"],
        "config": {**dataclasses.asdict(batch.Config(batch_sizes=(8,), steps_per_epoch=2)),
                   "epochs": 3},
        "flags": {}}))
    args = [a for a in BATCH if not a.startswith("--epochs")] + ["--epochs=2", "--resume",
                                                                  f"--logdir={tmp_path / 'runs'}"]
    assert main.main(["main.py", *args]) == 2
    lines = error_lines(capfd.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: --resume: the unfinished run {first} was started with "
                               "other settings (epochs: 3 there, 2 here")
    assert sorted(p.name for p in (tmp_path / "runs" / "batch").iterdir()) == [first.name]
