"""benchmarks/gpu.sh: GPU figures one command away, on a JAX machine without TensorFlow.

Its --quick run is the whole script with tiny settings: here, on the CPU, with the JAX
backend and TensorFlow's import blocked, as on a GPU machine that has JAX and no
TensorFlow. Every step must finish and the one table must show each.
"""
import json
import re
import subprocess
import sys
import zipfile

from helpers import ENV, REPO, block_tensorflow

STEPS = ("mixed_float16", "mixed_bfloat16", "device", "batch", "advise")


def test_the_gpu_script_runs_every_step_on_jax_without_tensorflow(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    block_tensorflow(blocked)
    env = {**ENV, "PYTHONPATH": str(blocked), "PYTHON": sys.executable,
           "GPU_SH_LOGDIR": str(tmp_path / "logs")}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--quick"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {line.split()[0]: line for line in result.stdout.splitlines()
            if line.split() and line.split()[0] in STEPS}
    assert set(rows) == set(STEPS), result.stdout[-3000:]
    for name, row in rows.items():
        log = (tmp_path / "logs" / f"{name}.log").read_text()
        assert row.split()[1] == "0" and "FAILED" not in row, f"{row}\n{log[-2000:]}"
        assert len(list((tmp_path / "logs" / name).rglob("metrics.json"))) == 1, log[-2000:]
    (advised,) = (tmp_path / "logs" / "advise").rglob("metrics.json")
    metrics = json.loads(advised.read_text())
    assert metrics["backend"] == "jax" and "time_to_accuracy_speedup" in metrics
    assert "KERAS_BACKEND=jax; jax" in result.stdout
    assert re.search(r"whole script \d+ s", result.stdout)


def test_fetch_wheels_brings_the_pinned_keras_for_python_3_12(tmp_path):
    """What gpu.sh installs on a JAX-only machine, fetched from the package registry."""
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "fetch_wheels.sh"), str(tmp_path)],
                            capture_output=True, text=True, timeout=300,
                            env={**ENV, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr[-2000:]
    wheels = sorted(p.name for p in tmp_path.glob("*.whl"))
    pinned = re.search(r"^keras==(\S+)$", (REPO / "requirements.txt").read_text(), re.M)[1]
    assert f"keras-{pinned}-py3-none-any.whl" in wheels, wheels
    assert any(w.startswith("namex-") and w.endswith("py3-none-any.whl") for w in wheels)
    optree = [w for w in wheels if w.startswith("optree-")]
    assert len(optree) == 1 and "cp312-cp312-manylinux" in optree[0] and "x86_64" in optree[0]
    for name in wheels:  # whole zip files, not pointers or truncated downloads
        with zipfile.ZipFile(tmp_path / name) as wheel:
            assert wheel.testzip() is None
