"""The one table benchmarks/gpu.sh ends with: a row per step, from each run's metrics.json.

    python benchmarks/gpu_table.py LOGDIR     # LOGDIR/steps.tsv: name, exit code, seconds

Reads only JSON: no Keras, no TensorFlow. A step that failed or timed out shows its exit
code and the last line of its log (LOGDIR/NAME.log).
"""
import json
import pathlib
import sys

# step name -> [(metric, label, format)]; a missing metric shows as "-"
COLUMNS = {
    "mixed_float16": [("examples_per_sec", "examples/s", ",.0f"), ("speedup", "vs float32", ".2f"),
                      ("val_accuracy", "val acc", ".4f"),
                      ("float32_val_accuracy", "float32 val acc", ".4f")],
    "mixed_bfloat16": [("examples_per_sec", "examples/s", ",.0f"),
                       ("speedup", "vs float32", ".2f"), ("val_accuracy", "val acc", ".4f"),
                       ("float32_val_accuracy", "float32 val acc", ".4f")],
    "device": [("cpu_examples_per_sec", "cpu examples/s", ",.0f"),
               ("gpu0_examples_per_sec", "gpu0 examples/s", ",.0f"),
               ("gpu0_wall_time_s", "gpu0 job s", ".1f"), ("cheapest_device", "cheapest", "s"),
               ("break_even_speedup", "break-even", ".2f")],
    "batch": [("best_batch_size", "best batch", "d"), ("best_examples_per_sec", "examples/s", ",.0f"),
              ("best_val_accuracy", "val acc", ".4f"),
              ("throughput_ratio_largest_vs_smallest", "largest/smallest", ".2f")],
    "advise": [("combined_speedup", "combined", ".2f"), ("predicted_speedup", "predicted", ".2f"),
               ("time_to_accuracy_speedup", "time to acc", ".2f"),
               ("baseline_time_to_target_s", "baseline s", ".1f"),
               ("advised_time_to_target_s", "advised s", ".1f"),
               ("advised_policy", "policy", "s"), ("advised_batch_size", "batch", "d"),
               ("fastest_backend", "fastest backend", "s")],
}


def metrics_of(logdir, name):
    found = sorted(pathlib.Path(logdir, name).rglob("metrics.json"))
    return json.loads(found[-1].read_text()) if found else {}


def cell(metrics, key, label, fmt):
    value = metrics.get(key)
    if value is None:
        return f"{label} -"
    return f"{label} {value:{fmt}}" if not isinstance(value, str) else f"{label} {value}"


def last_line(logdir, name):
    log = pathlib.Path(logdir, f"{name}.log")
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] \
        if log.exists() else []
    return lines[-1][:100] if lines else "(no output)"


def table(logdir):
    rows = [f"{'step':<15} {'exit':>4} {'s':>5}  measured"]
    steps = pathlib.Path(logdir, "steps.tsv").read_text().split("\n")
    for line in filter(None, steps):
        name, code, seconds = line.split("\t")
        metrics = metrics_of(logdir, name)
        if code == "0" and metrics:
            shown = "; ".join(cell(metrics, *c) for c in COLUMNS.get(name, []))
        else:
            shown = ("TIMED OUT: " if code in ("124", "137") else "FAILED: ") + last_line(logdir,
                                                                                          name)
        rows.append(f"{name:<15} {code:>4} {seconds:>5}  {shown}")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(sys.argv[1]))
