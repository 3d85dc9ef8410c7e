"""A quiet screen: TensorFlow's C++ start-up lines kept off it, each warning shown once.

While TensorFlow loads it prints, from C++ and before any log level applies
(TF_CPP_MIN_LOG_LEVEL does not reach them), a few lines about oneDNN, CPU
instructions and CUDA drivers, twice; on a machine without a GPU they include
`E0000 ... failed call to cuInit`, an "error" before anything has happened. So
the CLI catches stderr at its file descriptor while TensorFlow loads and its
devices start, then writes back every line that is not one of those. The user's
own TF_CPP_MIN_LOG_LEVEL, or --verbose, leaves stderr untouched.
"""
import contextlib
import functools
import os
import re
import sys
import tempfile
import warnings

STARTUP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IW]\d{4} [\d:. ]+\d+ \S+\] "  # absl INFO and WARNING lines
    r"|E\d{4} [\d:. ]+\d+ \S+\] failed call to cuInit"  # no GPU: not an error here
    r"|To enable the following instructions: .* rebuild TensorFlow)")


def wanted(argv):
    """Whether to quiet the start-up: not when the user set TF_CPP_MIN_LOG_LEVEL or asked
    for --verbose."""
    return "TF_CPP_MIN_LOG_LEVEL" not in os.environ and "--verbose" not in argv


@contextlib.contextmanager
def startup(enabled=True):
    """Runs the block with fd 2 caught; afterwards the caught lines that are not start-up
    noise go to stderr, in order. Sets TF_CPP_MIN_LOG_LEVEL=2 for the C++ lines that come
    once logging is initialised (INFO and WARNING chatter during training)."""
    if not enabled:
        yield
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            text = caught.read().decode(errors="replace")
            sys.stderr.write("".join(line for line in text.splitlines(keepends=True)
                                     if not STARTUP_NOISE.match(line)))
            sys.stderr.flush()


def start_devices():
    """TensorFlow's devices, started now (inside `startup`), not at the first op of a run:
    finding no GPU is part of the start-up. Nothing for a run that has not loaded it."""
    if "tensorflow" in sys.modules:
        sys.modules["tensorflow"].config.list_physical_devices()


def each_warning_once():
    """Shows each warning (its text and category) once a run. Recipes load, clone and
    compile your model several times, so Keras repeats its warnings (a model that cannot
    jit_compile, say), and Python's "once" filter does not hold: every
    warnings.catch_warnings() block clears what it remembers."""
    shown = set()

    @functools.wraps(warnings.showwarning)
    def show(message, category, *args, **kwargs):
        if (str(message), category) not in shown:
            shown.add((str(message), category))
            original(message, category, *args, **kwargs)

    original, warnings.showwarning = warnings.showwarning, show
