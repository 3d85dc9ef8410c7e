"""advise's report: the size probe, the ranked table, and what goes to TensorBoard.

The table ranks the advised changes by what each gives end to end alone, lists the rest as
"not worth it here" (demoted ones with why), and ends with the throughput proof; the run's
printout and its Text summary then end with the size line and the time-to-accuracy lines.
"""
import dataclasses
import os
import re
import warnings

import numpy as np

from experiments import advise_accuracy, exports
from experiments.files import write_atomically
from experiments.tensorboard import log_hparams_trials, log_text_summary, scalar_pb, write_events
from experiments.user_model import fresh_model


# --- size (no training) ----------------------------------------------------------------

def size_probe(reference, run_dir, x_val):
    """gzip bytes of the model in float32 and after Keras' model.quantize("int8"), the
    layers Keras left in float, and how often the two predict the same class."""
    float_bytes = exports.save_model(fresh_model(reference, None, None),
                                     os.path.join(run_dir, "float32.keras"))
    quantized = fresh_model(reference, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized.quantize("int8")
    path = write_atomically(os.path.join(run_dir, "int8.keras"), quantized.save)
    left = exports.left_in_float(quantized)
    same = np.mean(np.argmax(reference.predict(x_val, verbose=0), -1)
                   == np.argmax(quantized.predict(x_val, verbose=0), -1))
    return {"float32_gzip_bytes": float_bytes, "int8_gzip_bytes": exports.gzip_bytes(path),
            "int8_unquantized_layers": ", ".join(left) or "none",
            "int8_same_prediction": float(same)}


def size_line(metrics):
    return (f"size: {metrics['float32_gzip_bytes']:,} bytes gzipped in float32, "
            f"{metrics['int8_gzip_bytes']:,} after model.quantize('int8') (left in float: "
            f"{metrics['int8_unquantized_layers']}; same class on "
            f"{metrics['int8_same_prediction']:.0%} of validation examples); prune "
            "further: python main.py --recipe=prune --model=YOUR_MODEL.keras "
            "--data_dir=YOUR_DATA")


# --- the table ------------------------------------------------------------------------

def row(rank, f):
    if f.comparison is None:
        measured = "not timed"
    else:
        low, high = f.comparison.spread
        measured = f"{f.comparison.speedup:.2f}x ({low:.2f}-{high:.2f})"
    text = (f"{rank:<4} {f.change[:44]:<44} {measured:>20}  {f.acts_on:<10} "
            f"{f.end_to_end:>6.2f}x\n     {f.code}\n     cost: {f.cost}\n"
            f"     from: {f.measured_by}")
    return text + (f"\n     DEMOTED: {f.demoted}" if f.demoted else "")


def format_table(recommended, not_recommended, combined, predicted, backend):
    lines = [f"{'rank':<4} {'change':<44} {'speedup (spread)':>20}  {'of':<10} {'alone':>7}"]
    lines += [row(i + 1, f) for i, f in enumerate(recommended)] or [
        "     (no change measured faster beyond the noise)"]
    if not_recommended:
        lines.append("not worth it here (tried: no gain beyond the noise, or demoted):")
        lines += [row("-", f) for f in not_recommended]
    lines.append(f"combined speedup {combined:.2f}x (predicted {predicted:.2f}x) on {backend}, "
                 "every advised change but the backend applied together")
    lines += [f"combined speedup {f.proof}" for f in recommended if f.proof]
    return "\n".join(lines)


def closing_lines(metrics, accuracy):
    """The size line, then the time-to-accuracy lines: what the printout and the Text
    summary end with."""
    return "\n".join([size_line(metrics)] + advise_accuracy.lines(accuracy))


# --- TensorBoard ------------------------------------------------------------------------

def hparams(setting, advised):
    return {**{k: v if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
               for k, v in dataclasses.asdict(setting).items()}, "advised": advised}


def in_process(setting):
    """A Finding's Setting fields, less the backend (no Setting of this process)."""
    return {k: v for k, v in setting.items() if k != "backend"}


def log_tensorboard(log_dir, probes, findings, combined, text, accuracy):
    """The probes' scalars, the table as the Text summary, the time-to-accuracy chart, and
    HParams: a trial per change measured (its full Setting, whether it was advised, its
    speedup), beside the baseline and all advised changes together."""
    write_events(log_dir, [(step, scalar_pb(tag, value))
                           for tag, points in probes.scalars.items() for step, value in points])
    log_text_summary(log_dir, text)
    advise_accuracy.log(log_dir, accuracy)
    advised = [f for f in findings if f.recommended]
    together = {k: v for f in advised for k, v in in_process(f.setting).items()}
    trials = {"baseline": (hparams(probes.base, False), {"speedup": 1.0}),
              "advised_together": (hparams(dataclasses.replace(probes.base, **together), True),
                                   {"speedup": combined})}
    for i, f in enumerate(findings, 1):
        if f.comparison is not None:
            setting = dataclasses.replace(probes.base, **in_process(f.setting))
            trials[f"{i:02d}_" + re.sub(r"\W+", "_", f.change)[:40].strip("_")] = (
                {**hparams(setting, f.recommended),
                 **{k: v for k, v in f.setting.items() if k == "backend"}},
                {"speedup": f.comparison.speedup, "end_to_end_speedup": f.end_to_end})
    log_hparams_trials(os.path.join(log_dir, "hparams"), "advise", trials)
