"""Models written as keras.io and keras.applications write them (tests/user_models.py),
through the recipes from the CLI: each exits 0, states the pixel range and the loss it
should, reports the model's own weight count, and prune reaches its target over all
weight matrices. benchmarks/own_models.py runs every model through every recipe; here
each model runs through the recipes its kind of model breaks most easily, so the suite
stays short."""
import pytest

from helpers import load_benchmark
from test_own_model import write_folder

PAIRS = [  # (model, recipe): every model, and every recipe that takes --model
    ("mnist_convnet", "stream"),  # a one-hot loss; gray images from both loaders
    ("augment_then_rescale", "stream"),  # its loaders must feed 0-255
    ("nested_extractor", "mixed_precision"),  # a nested model rebuilt under the policy
    ("separable_blocks", "prune"),  # SeparableConv2D and DepthwiseConv2D pruned
    ("mobilenet_v2", "batch"),  # (mixed_precision --compare traces it twice: 39 s here;
    # benchmarks/own_models.py runs every pair)
    ("jit_compiled", "device"),
    ("conv1d_sequences", "advise"),
    ("token_classifier", "prune"),  # variable-length tokens through the TFLite checks
]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    bench = load_benchmark("own_models")
    root = tmp_path_factory.mktemp("matrix")
    photos = write_folder(root / "photos")
    cases = bench.write_models(root, 3)
    return bench, cases, photos, root / "runs"


@pytest.mark.parametrize("name, recipe", PAIRS)
def test_a_users_model_runs_and_is_described_truthfully(name, recipe, matrix):
    bench, cases, photos, logdir = matrix
    row = bench.run_one(name, cases[name], recipe, photos, logdir)
    assert row["exit"] == 0, row["error"]
    assert row["loss_stated"], f"{name}: the loss line is not {cases[name][3]!r}"
    assert row["pixels_stated"], f"{name}: the pixel range stated is not {cases[name][2]}"
    assert row["params_ok"], f"{name}: model_params is not the model's own count"
    if recipe == "prune":
        assert row["model_sparsity"] >= 0.75, row
