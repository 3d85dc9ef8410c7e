"""The drop-in files in recipes/: each reads like a keras.io example and stands alone.

A user copies one file into a Keras project. So it imports only public libraries
(never this repository, never a sibling recipe), keeps TensorFlow where the
technique is TensorFlow's own, tf_keras and tfmot inside the functions that need
them, and stays short with the technique first. Each file's own test runs its
`Copy:` example alone in an empty folder (tests/test_<recipe>.py; the step timer's
is here).
"""
import ast
import sys

import pytest

from helpers import REPO, run_copy_example

FILES = sorted(p for p in (REPO / "recipes").glob("*.py") if p.name != "__init__.py")

REPOSITORY = {"recipes", "experiments", "cli", "datasets", "main", "benchmarks", "tests",
              "helpers", *(p.stem for p in FILES)}
ANYWHERE = {"keras", "numpy"} | set(sys.stdlib_module_names)
TOP_LEVEL_EXTRA = {  # where the technique is TensorFlow's own: tf.data, the profiler
    "stream": {"tensorflow"},
    "tf_profile": {"tensorflow"},
}
INSIDE_FUNCTIONS = {"tensorflow", "tf_keras", "tensorflow_model_optimization", "PIL", "psutil",
                    "jax", "torch"}


def imports(tree):
    """[(top-level module name, at module level?)] of every import in the file."""
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.ClassDef))
              for n in ast.walk(f) if n is not f}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = ["." if node.level else node.module]
        else:
            continue
        found += [(name.split(".")[0], id(node) not in inside) for name in names]
    return found


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_dropin_file_imports_only_public_libraries(path):
    for name, top_level in imports(ast.parse(path.read_text())):
        assert name != "." and name not in REPOSITORY, \
            f"{path.name} imports {name}: a copied file cannot"
        allowed = ANYWHERE | TOP_LEVEL_EXTRA.get(path.stem, set())
        assert name in allowed or (not top_level and name in INSIDE_FUNCTIONS), (
            f"{path.name} imports {name} {'at module level' if top_level else ''}")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_dropin_file_is_short_with_the_technique_first(path):
    text = path.read_text()
    tree = ast.parse(text)
    doc = ast.get_docstring(tree, clean=False)
    assert len(text.splitlines()) <= 350, f"{path.name}: {len(text.splitlines())} lines"
    assert doc and len(doc.splitlines()) <= 30, f"{path.name}: docstring over 30 lines"
    for part in ("Shows:", "Run:", "Expect:", "Copy:"):
        assert part in doc, f"{path.name}: its docstring has no {part}"
    first = min(n.lineno for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)))
    assert first <= 80, f"{path.name}: the technique starts at line {first}"
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 60, f"{path.name}: {node.name} has {length} lines"


def test_import_rule_sees_imports_inside_functions_and_at_module_level():
    tree = ast.parse("import keras\ndef f():\n    from experiments import files\n"
                     "    import tf_keras\nimport tensorflow.data\n")
    assert sorted(imports(tree)) == [("experiments", False), ("keras", True),
                                     ("tensorflow", True), ("tf_keras", False)]


NOT_TENSORFLOWS_OWN = {"batch", "device", "mixed_precision", "prune", "step_timer", "transfer"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_dropin_file_has_a_test_that_runs_its_copy_example(path):
    """A file whose Copy: code no test runs could drift from what it says; one that is not
    TensorFlow's technique is run on JAX with TensorFlow blocked (the helper's default)."""
    calls = [line for test in (REPO / "tests").glob("test_*.py")
             for line in test.read_text().split("run_copy_example")[1:]
             if line.lstrip("(, ").startswith(f'"{path.name}"')]
    assert calls, f"no test runs recipes/{path.name}'s Copy: example (helpers.run_copy_example)"
    on_tensorflow = any('backend="tensorflow"' in call.split(")")[0] for call in calls)
    assert on_tensorflow == (path.stem not in NOT_TENSORFLOWS_OWN), path.name


STEP_TIMER_SETUP = """
import keras, numpy as np
assert keras.backend.backend() == "jax"
x = np.random.default_rng(0).random((640, 8), dtype=np.float32)
y = (x.sum(axis=1) > 4).astype("int32")
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                          keras.layers.Dense(2, activation="softmax")])
model.compile("adam", "sparse_categorical_crossentropy")
"""
STEP_TIMER_CHECK = """
assert len(timer.seconds) == 2 * 10, len(timer.seconds)  # every step of both epochs, timed
r = throughput(timer.seconds, examples_per_step=64, warmup=2)
assert abs(r["examples_per_sec"] - 64000 / r["step_time_ms_p50"]) < 1e-6 * r["examples_per_sec"]
print("OK", sorted(r))
"""


def test_step_timer_copy_example_runs_alone_on_jax_without_tensorflow(tmp_path):
    result = run_copy_example("step_timer.py", tmp_path, STEP_TIMER_SETUP, STEP_TIMER_CHECK)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK ['examples_per_sec', 'step_time_ms_p50', 'step_time_ms_p90']" in result.stdout
