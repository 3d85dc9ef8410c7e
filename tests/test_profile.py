"""The profile recipe: a trace TensorBoard's Profile tab opens, monitor scalars
beside the loss, an input-bound verdict that follows the input pipeline, and the
Profile tab's first tables made offline by the plugin's own converters."""
import contextlib
import io
import json
import pathlib
import re
import sys

import numpy as np
import pytest

from helpers import (assert_median_throughput, error_lines, only_run_dir, read_tensorboard_tags,
                     run_cli, run_copy_example, tensorboard_server)

from experiments import tf_profile as profile  # noqa: E402  (helpers puts the repo on sys.path)
from recipes import tf_profile  # noqa: E402

# 60 training images at batch 8: 7 steps an epoch, 14 in two epochs. The verdict's
# threshold is set well apart from both the fast and the deliberately slow pipeline.
TINY = dict(epochs=2, batch_size=8, profile_steps=(3, 5), sample_seconds=0.05, warmup_steps=2,
            input_bound_percent=50.0)


def tiny_data():
    from datasets import shapes
    return shapes.load(60, 20, image_size=28, channels=1, seed=0)


def run_quietly(config, run_dir, data):
    """run() with its printout captured: (metrics, text printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        metrics = profile.run(config, str(run_dir), data)
    return metrics, out.getvalue()


def plugin_tables(trace, tool):
    """The profile plugin's own converter output for a trace (DataTables), and each
    table's rows as [{column id: value}]."""
    data, _ = profile.profile_converter().xspace_to_tool_data([trace], tool, {})
    tables = json.loads(data)
    return tables, [[dict(zip([c["id"] for c in t["cols"]], [cell["v"] for cell in row["c"]]))
                     for row in t["rows"]] for t in tables]


def read_text_summary(run_dir, tag="summary"):
    """(events of the tag, the first one's markdown, its plugin name) in a run folder."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    if tag not in acc.Tags()["tensors"]:
        return [], "", ""
    events = acc.Tensors(tag)
    text = tf.make_ndarray(events[0].tensor_proto).item().decode()
    return events, text, acc.SummaryMetadata(tag).plugin_data.plugin_name


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """One tiny profiled run shared by the tests that only read what it wrote."""
    run_dir = tmp_path_factory.mktemp("profiled")
    metrics, printed = run_quietly(profile.Config(**TINY), run_dir, tiny_data())
    return metrics, run_dir, printed


def test_profile_run_writes_trace_that_tensorboard_profile_tab_lists(profiled):
    metrics, run_dir, _ = profiled
    traces = list(run_dir.glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert metrics["profile_trace"] == str(traces[0])
    session = traces[0].parent.name

    with tensorboard_server(run_dir) as get:
        runs = get("/data/plugin/profile/runs")
        plugins = get("/data/plugins_listing")
        tools = get(f"/data/plugin/profile/run_tools?run={session}")
    assert "profile" in plugins
    assert session in [pathlib.PurePath(run).name for run in runs], runs
    # The trace opens: the tab offers its trace viewer and input-pipeline analysis.
    assert any(t.startswith("trace_viewer") for t in tools) and "input_pipeline_analyzer" in tools


def test_monitor_scalars_share_the_loss_step_and_time_axis(profiled):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    metrics, run_dir, _ = profiled
    tags = read_tensorboard_tags(run_dir)
    assert len(tags["loss"]) == len(tags["step_time_ms"]) == len(tags["train_step_ms"]) == 14
    assert min(tags["monitor/rss_mb"]) > 10  # MB: a real reading of this process
    assert max(tags["monitor/cpu_percent"]) > 10  # training kept at least a tenth of a core busy
    assert metrics["monitor_samples"] == len(tags["monitor/cpu_percent"]) >= 2

    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    loss, rss = acc.Tensors("loss"), acc.Tensors("monitor/rss_mb")
    # Each monitor sample carries the training step it was taken during, so on the
    # step axis it sits between the loss events around it, and on the wall-time
    # axis too (within a little slack for the step counter being set just
    # before the loss is written).
    loss_time = {e.step: e.wall_time for e in loss}
    assert sorted(loss_time) == list(range(1, 15))
    assert rss[-1].step == 14
    for sample in rss:
        if sample.step >= 1:
            assert sample.wall_time >= loss_time[sample.step] - 0.5, sample
        if sample.step < 14:
            assert sample.wall_time <= loss_time[sample.step + 1] + 0.5, sample


def test_gpu_series_present_only_with_an_nvidia_gpu_and_output_says_so(profiled):
    metrics, run_dir, printed = profiled
    gpu_tags = [t for t in read_tensorboard_tags(run_dir) if t.startswith("monitor/gpu")]
    if profile.query_gpus():
        assert "monitor/gpu0_utilization_percent" in gpu_tags
        assert "gpu0_memory_used_mb_max" in metrics
    else:
        assert gpu_tags == []
        assert not any(key.startswith("gpu0") for key in metrics)
        assert "no NVIDIA GPU" in printed


def test_nvidia_smi_csv_parses_to_gpu_series():
    text = "0, 87, 12034, 250.31\n1, 0, 3, [N/A]\n"
    assert profile.parse_nvidia_smi(text) == [
        {"index": 0, "utilization_percent": 87.0, "memory_used_mb": 12034.0, "power_w": 250.31},
        {"index": 1, "utilization_percent": 0.0, "memory_used_mb": 3.0}]
    assert profile.parse_nvidia_smi("NVIDIA-SMI has failed\n") == []


def test_verdict_flips_when_the_input_pipeline_is_slow(profiled, tmp_path):
    fast = profiled[0]  # the same run on the fast, prefetched in-memory pipeline
    slow, printed = run_quietly(
        profile.Config(**TINY, input_delay_ms=40.0, prefetch=False), tmp_path, tiny_data())
    assert fast["input_bound"] is False and fast["input_wait_percent"] < 50
    assert slow["input_bound"] is True and slow["input_wait_percent"] > 50
    assert slow["input_wait_ms_p50"] >= 35  # the 40 ms sleep is waited for, not hidden
    assert slow["step_time_ms_p50"] >= 35  # and a whole step, as training sees it, holds it
    assert slow["step_time_ms_p50"] > slow["train_step_ms_p50"] + 30
    for metrics in (fast, slow):
        assert_median_throughput(metrics, "examples_per_sec", "step_time_ms_p50", 8)
    assert "input-bound" in printed and ".prefetch(tf.data.AUTOTUNE)" in printed
    # The pipeline measured alone agrees: slower than the step uses batches only when slow.
    assert slow["pipeline_headroom"] < 1 < fast["pipeline_headroom"]


def test_verdict_arithmetic_and_advice_on_fixed_timings():
    percent, bound, advice = tf_profile.input_bound_verdict(
        [0.03] * 10, [0.01] * 10, 20, prefetch=False, parallel_calls=1, slow_map=True)
    assert percent == pytest.approx(75) and bound
    text = "\n".join(advice)
    assert "prefetch" in text and "num_parallel_calls" in text and "cache" in text
    _, _, advice = tf_profile.input_bound_verdict([0.03], [0.01], 20, prefetch=True,
                                                  slow_map=False)
    assert "prefetch(" not in "\n".join(advice) and "num_parallel_calls" not in "\n".join(advice)
    percent, bound, advice = tf_profile.input_bound_verdict([0.001] * 4, [0.009] * 4, 20)
    assert percent == pytest.approx(10) and not bound and advice[0].startswith("compute-bound")


def test_profile_steps_past_the_run_is_rejected_before_training(tmp_path):
    config = profile.Config(epochs=1, batch_size=8, steps_per_epoch=3, profile_steps=(2, 5))
    with pytest.raises(ValueError, match="--profile_steps=2,5 is past the run's 3 steps"):
        profile.run(config, str(tmp_path), tiny_data())
    assert not (tmp_path / "plugins").exists()


def test_cli_bad_profile_steps_is_one_line_error(tmp_path):
    result = run_cli("--recipe=profile", "--profile_steps=15,10", f"--logdir={tmp_path}")
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "--profile_steps" in lines[0] and "FIRST <= LAST" in lines[0]
    assert not (tmp_path / "profile").exists()


def test_cli_run_prints_verdict_and_writes_metrics(tmp_path):
    from PIL import Image
    (x, y), _ = tiny_data()  # a small folder of class sub-folders: quicker than 7,000 shapes
    for i, (image, label) in enumerate(zip(x, y)):
        (tmp_path / "images" / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[..., 0] * 255).astype(np.uint8)).save(
            tmp_path / "images" / f"class{label}" / f"{i}.png")
    result = run_cli("--recipe=profile", f"--data_dir={tmp_path / 'images'}", "--epochs=2",
                     "--batch_size=8", "--profile_steps=2,3", "--sample_seconds=0.1",
                     "--prefetch=false", f"--logdir={tmp_path / 'runs'}")
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = only_run_dir(tmp_path / "runs", "profile")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert list(run_dir.glob("plugins/profile/*/*.xplane.pb"))
    verdict = "input-bound:" if metrics["input_bound"] else "compute-bound:"
    assert verdict in result.stdout  # the printed verdict is the one metrics.json records
    assert f"{metrics['input_wait_percent']:.0f}%" in result.stdout.split(verdict)[1].split("\n")[0]
    assert_median_throughput(metrics, "examples_per_sec", "step_time_ms_p50", 8)


COPY_SETUP = """
import json, pathlib
import keras, numpy as np
assert keras.backend.backend() == "tensorflow"
keras.utils.set_random_seed(0)
x = np.random.default_rng(0).random((640, 12, 12, 1), dtype=np.float32)
y = (x.mean(axis=(1, 2, 3)) > 0.5).astype("int32")
model = keras.Sequential([keras.Input((12, 12, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                          keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")])
model.compile("adam", "sparse_categorical_crossentropy")  # a loss by name, as keras.io writes
"""
COPY_CHECK = """
traces = list(pathlib.Path("logs").glob("plugins/profile/*/*.xplane.pb"))
assert len(traces) == 1 and traces[0].stat().st_size > 0, traces  # written: the profiler stopped
from xprof.convert import raw_to_tool_data  # the Profile tab's own reading of the trace
data, _ = raw_to_tool_data.xspace_to_tool_data([str(traces[0])], "input_pipeline_analyzer", {})
table = next(t for t in json.loads(data) if t["cols"] and t["cols"][0]["id"] == "stepnum")
print("TRACED", [row["c"][0]["v"] for row in table["rows"]])
assert len(wait_s) == len(step_s) == len(losses) == 50
share = 100 * sum(wait_s[5:]) / (sum(wait_s[5:]) + sum(step_s[5:]))
assert abs(percent - share) < 1e-9 and bound == (percent > 20), (percent, share, bound)
assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses  # the timed steps trained the model
print("OK")
"""


def test_copy_example_traces_fits_chosen_steps_and_splits_each_step_alone(tmp_path):
    result = run_copy_example("tf_profile.py", tmp_path, COPY_SETUP, COPY_CHECK,
                              backend="tensorflow")
    assert result.returncode == 0, result.stderr[-3000:]
    # fit's steps 10 to 15, each a step marker the input-pipeline analysis reads
    assert "TRACED ['train 10', 'train 11', 'train 12', 'train 13', 'train 14', 'train 15']" \
        in result.stdout, result.stdout[-2000:]
    assert "OK" in result.stdout
    assert re.search(r"^(input|compute)-bound: ", result.stdout, re.M)  # the advice, printed


def test_offline_top_ops_match_the_profile_plugins_own_op_stats(profiled):
    metrics, _, printed = profiled
    assert metrics["profile_tables_error"] == ""
    tables, rows = plugin_tables(metrics["profile_trace"], "framework_op_stats")
    where = metrics["top_op_where"]
    assert where == ("Device" if profile.query_gpus() else "Host")
    ops = [r for r in rows[-1] if r["host_or_device"] == where and r["type"] != "IDLE"]
    top = max(ops, key=lambda r: r["total_self_time"])
    assert metrics["top_op_name"] == top["operation"] and metrics["top_op_type"] == top["type"]
    assert metrics["top_op_self_time_ms"] == pytest.approx(top["total_self_time"] / 1000)
    # The shares are the converter's own: fractions of the side's busy time, summing to 1.
    shares = sorted(r[f"{where.lower()}_total_self_time_percent"] for r in ops)
    assert sum(shares) == pytest.approx(1, abs=0.01)
    assert metrics["top_op_self_time_share"] == pytest.approx(shares[-1])
    assert metrics["top_ops_self_time_share"] == pytest.approx(sum(shares[-10:]))
    assert 0 < metrics["top_op_self_time_share"] < metrics["top_ops_self_time_share"] <= 1

    # Printed as an aligned table: ten ranked rows, names in the header's column.
    lines = printed.split(f"Top 10 operations by self time on the {where}")[1].splitlines()[1:12]
    header, first = lines[0], lines[1]
    assert header.split() == ["#", "self", "ms", "share", "count", "type", "operation"]
    assert first.index(metrics["top_op_name"]) == header.index("operation")
    assert f"{100 * metrics['top_op_self_time_share']:.1f}%" in first.split()
    assert [line.split()[0] for line in lines[1:]] == [str(i) for i in range(1, 11)]


def test_offline_input_verdict_and_step_breakdown_match_the_converter(profiled):
    metrics, _, printed = profiled
    tables, rows = plugin_tables(metrics["profile_trace"], "input_pipeline_analyzer")
    index = next(i for i, t in enumerate(tables) if t["cols"] and t["cols"][0]["id"] == "stepnum")
    steps, summary = rows[index], tables[index]["p"]
    assert [s["stepnum"] for s in steps] == ["train 3", "train 4", "train 5"]  # profile_steps
    assert metrics["profile_traced_steps"] == 3
    total = sum(s["stepTimeMs"] for s in steps)
    assert metrics["input_wait_share_pct"] == pytest.approx(
        100 * sum(s["infeedTimeMs"] for s in steps) / total)
    # The converter's verdict quotes, to one decimal, the share it is about.
    conclusion = summary["input_conclusion"]
    stated = float(re.search(r"([\d.]+)% of the total step time", conclusion).group(1))
    quoted = (metrics["input_wait_share_pct"] if "waiting for input" in conclusion
              else 100 * sum(s["otherTimeMs"] for s in steps) / total)  # "All Others"
    assert quoted == pytest.approx(stated, abs=0.051)
    # The averages agree with the converter's own (rounded to 0.1 ms) and add up.
    assert metrics["profile_step_ms_avg"] == pytest.approx(float(summary["steptime_ms_average"]),
                                                           abs=0.051)
    assert metrics["profile_input_ms_avg"] == pytest.approx(float(summary["infeed_time_ms_avg"]),
                                                            abs=0.051)
    assert metrics["profile_compute_ms_avg"] == pytest.approx(
        float(summary["host_compute_time_ms_avg"]) + float(summary["device_compute_time_ms_avg"]),
        abs=0.11)
    assert (metrics["profile_compute_ms_avg"] + metrics["profile_input_ms_avg"]
            + metrics["profile_other_ms_avg"]) == pytest.approx(total / 3)
    # Printed: the verdict and the share, then one row per traced step, the averages
    # and the shares, in aligned columns.
    assert conclusion in printed
    assert f"{metrics['input_wait_share_pct']:.1f}% of step time waits for input" in printed
    table = printed.split("Step-time breakdown, ms (input_pipeline_analyzer)\n")[1].splitlines()
    assert [line.split()[0] for line in table[:6]] == ["step", "train", "train", "train",
                                                       "average", "share"]
    assert table[4].split()[-1] == f"{metrics['profile_step_ms_avg']:.2f}"
    assert len({len(line) for line in table[:6]}) == 1  # numbers right-aligned


def test_one_text_summary_holds_the_printed_tables_for_reading_offline(profiled):
    metrics, run_dir, printed = profiled
    events, text, plugin = read_text_summary(run_dir)
    assert len(events) == 1 and events[0].step == 0 and plugin == "text"
    assert metrics["top_op_name"] in text
    verdict = "input-bound:" if metrics["input_bound"] else "compute-bound:"
    assert verdict in text and "input wait" in text  # the recipe's own timing table
    # Every printed line of the offline tables is in it, columns kept (a fenced block).
    offline = printed[printed.index("Top 10 operations"):]
    for line in filter(None, offline.splitlines()):
        assert line in text.splitlines(), line
    assert text.startswith("```\n") and text.endswith("\n```")
    assert "Step-time breakdown" in text


def test_converter_failure_still_finishes_the_run_with_a_one_line_notice(
        tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("converter exploded\nwith a second line")
    monkeypatch.setattr(profile.profile_converter(), "xspace_to_tool_data", broken)
    config = profile.Config(epochs=1, batch_size=8, steps_per_epoch=4, profile_steps=(2, 3),
                            sample_seconds=0.05, warmup_steps=1)
    metrics, printed = run_quietly(config, tmp_path, tiny_data())
    notice = "offline profile tables unavailable: RuntimeError: converter exploded"
    assert [line for line in printed.splitlines() if "unavailable" in line] == [notice]
    assert "Traceback" not in printed + capsys.readouterr().err and "second line" not in printed
    assert metrics["profile_tables_error"] == "RuntimeError: converter exploded"
    assert not {"top_op_name", "input_wait_share_pct", "profile_step_ms_avg"} & set(metrics)
    assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb")) and 0 <= metrics["val_accuracy"]
    events, text, _ = read_text_summary(tmp_path)  # still written: the timings and the notice
    assert len(events) == 1 and notice in text and "whole step" in text


def test_missing_profile_plugin_is_named_in_the_one_line_notice(profiled, monkeypatch):
    for name in ("xprof", "xprof.convert", "tensorboard_plugin_profile"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    sections, metrics = profile.profile_tables_or_notice(profiled[0]["profile_trace"])
    assert len(sections) == 1 and len(sections[0][1]) == 1
    line = sections[0][1][0]
    assert line.startswith("offline profile tables unavailable: ") and "Error" in line
    assert "pip install tensorboard-plugin-profile" in line
    assert metrics == {"profile_tables_error": line.split("unavailable: ")[1]}
