"""Keras GPU Recipes: run one measured recipe end to end.

    python main.py --recipe=NAME [flags]
    python main.py --recipe=NAME --help      # that recipe's own flags

Each run writes <logdir>/<recipe>/<UTC timestamp>/ with flags.json, TensorBoard
event files and metrics.json; `tensorboard --logdir runs` shows them.

Exit codes: 0 done; 2 bad input, found before training starts (one line, no run
folder left); 1 a failure once training started (one line naming the run
folder, which is kept with all it holds); 143 SIGTERM and 130 Ctrl-C (the step
in progress finishes, a checkpoint is saved there within --grace_s, the folder is
kept and marked INTERRUPTED; --resume continues at that step).
"""
import gc
import sys

from experiments.errors import named_line, one_line


def fail(message, code):
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def prepare(argv):
    """Everything before training, or None after --help. Bad input raises ValueError
    (UsageError, DataError, or the recipe's own from Config and check())."""
    import inspect

    from cli import data, distribute, flags, models, runs

    command = flags.parse(argv, __doc__)
    if command is None:
        return None
    strategy, fit = distribute.for_command(command)  # before any TensorFlow op runs
    fv = command.values
    model = (models.load(command.model_path, fv.trust_model, fv.model_code)
             if command.model_path else None)
    dataset, inputs = data.load(command, model)  # resized and scaled for the model's input
    given = {"model": model} if model is not None else {}
    if hasattr(command.module, "check"):
        takes = inspect.signature(command.module.check).parameters
        command.module.check(command.config, inputs, **given,
                             **({"strategy": strategy} if "strategy" in takes else {}))
    extra = {**given, **({"strategy": strategy} if strategy is not None else {}),
             **({"fit": fit} if fit is not None else {})}
    run = runs.prepare(command, dataset, chief=distribute.is_chief())  # the folder comes last
    return command, extra, inputs, run


def main(argv):
    from cli import quiet

    quiet.each_warning_once()
    try:
        prepared = prepare(argv)
    except ValueError as e:
        return fail(one_line(e), 2)
    if prepared is None:
        return 0
    from cli import runs

    # TensorFlow and Keras leave ~340,000 objects behind their imports; frozen, the collector
    # stops walking them during training and at exit (measured: exit 1.2 s -> 0.2 s).
    gc.freeze()
    command, extra, inputs, run = prepared
    from experiments.scale_out import Preempted  # loaded with the recipe already

    with runs.save_on_signal(run, command.values.grace_s):
        try:
            metrics = command.module.run(command.config, str(run.dir), inputs, **extra)
            if command.model_path:
                metrics["model_path"] = command.model_path
            runs.finish(run, metrics, getattr(command.module, "HEADLINE", ()),
                        command.values.logdir)
        except Preempted as stop:  # a signal: the checkpoint of the step it stopped at is saved
            return runs.stopped(run, stop)
        except Exception as e:  # training started: whatever went wrong, the folder stays
            return failed(e, command, run)
    return 0


def failed(error, command, run):
    """One line for an error raised once training started; the exit code (1)."""
    from cli import runs

    kept = runs.keep_after_failure(run, error)
    if isinstance(error, ArithmeticError):  # a NaN/Inf guard fired
        return fail(f"{one_line(error)} ({kept})", 1)
    if runs.is_out_of_memory(error):
        flag = "batch_size" if hasattr(command.config, "batch_size") else "batch_sizes"
        size = getattr(command.config, flag, "?")
        size = ",".join(map(str, size)) if isinstance(size, tuple) else size
        return fail(f"out of memory at --{flag}={size}: try a smaller --{flag} ({kept})", 1)
    return fail(f"{named_line(error)} ({kept}; the traceback is in its error.txt)", 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
