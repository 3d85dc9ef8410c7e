"""TensorBoard beyond fit's scalars: HParams trials, the Text summary, Custom Scalars.

Written with tensorboard's own protos: no TensorFlow needed, so a JAX run never
imports it; without the tensorboard package they write nothing.
"""
import os
import socket
import time


def write_events(log_dir, summaries):
    """[(step, tensorboard Summary proto), ...] as one new event file in log_dir."""
    try:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:
        return
    os.makedirs(log_dir, exist_ok=True)
    name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
            f"{os.getpid()}.{time.monotonic_ns()}")
    with open(os.path.join(log_dir, name), "wb") as f:
        writer = RecordWriter(f)
        writer.write(event_pb2.Event(wall_time=time.time(),
                                     file_version="brain.Event:2").SerializeToString())
        for step, summary in summaries:
            writer.write(event_pb2.Event(wall_time=time.time(), step=step,
                                         summary=summary).SerializeToString())


def scalar_pb(tag, value):
    from tensorboard.compat.proto import summary_pb2
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag,
                                                                simple_value=float(value))])


def log_text_summary(log_dir, table):
    """The table the run printed, in TensorBoard's Text tab under the tag `summary`
    (a fenced block: markdown that keeps the columns lined up)."""
    try:
        from tensorboard.plugins.text.summary_v2 import text_pb
    except ImportError:
        return
    write_events(log_dir, [(0, text_pb("summary", "```\n" + table.strip("\n") + "\n```"))])


def log_hparams_trials(log_dir, recipe, trials):
    """One HParams trial per compared setting: trials = {name: (hparams, metrics)}, each
    written to log_dir/<name>.

    TensorBoard's HParams tab builds one table from every trial under its
    logdir, so no experiment config is written (the tab would then show that
    one recipe's columns alone). Each trial carries a `recipe` hparam instead,
    its metrics are named `<recipe>/<metric>`, and its trial id names its run
    folder: trials of several recipes and days share the table without sharing
    a row or a metric column.
    """
    try:
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb
    except ImportError:
        return
    run = os.path.basename(os.path.dirname(os.path.abspath(log_dir)))
    for name, (hparams, metrics) in trials.items():
        write_events(os.path.join(log_dir, name), [
            (0, hparams_pb({"recipe": recipe, **hparams}, trial_id=f"{recipe} {name} ({run})")),
            *[(0, scalar_pb(f"{recipe}/{key}", value)) for key, value in metrics.items()]])


def log_custom_scalars(log_dir, recipe, charts):
    """Custom Scalars charts: {title: [tag regex, ...]}, each one chart with a line per
    run and matching tag, in a category named after the recipe (TensorBoard merges the
    layouts of all runs by category, so repeated runs add lines, not charts)."""
    try:
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, types_pb2
        from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    except ImportError:
        return
    layout = layout_pb2.Layout(category=[layout_pb2.Category(title=recipe, chart=[
        layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=tags))
        for title, tags in charts.items()])])
    # What custom_scalar.summary.pb() makes, which would import TensorFlow for it.
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING,
                                    string_val=[layout.SerializeToString()])
    write_events(log_dir, [(0, summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=metadata.CONFIG_SUMMARY_TAG, metadata=metadata.create_summary_metadata(),
        tensor=tensor)]))])


def log_per_epoch(log_dir, tag, values):
    """One point per epoch (steps 0, 1, ...) of `tag`, for a Custom Scalars chart; written
    once, when the run ends, so a resumed run's earlier epochs count once."""
    write_events(log_dir, [(epoch, scalar_pb(tag, value)) for epoch, value in enumerate(values)])
