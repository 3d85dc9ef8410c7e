"""Keras GPU Recipes: run one measured recipe end to end.

    python main.py --recipe=NAME [flags]
    python main.py --recipe=NAME --help      # that recipe's own flags

Each run writes <logdir>/<recipe>/<UTC timestamp>/ with flags.json, TensorBoard
event files and metrics.json; `tensorboard --logdir runs` shows them.
"""
import dataclasses
import datetime
import importlib
import inspect
import json
import os
import pathlib
import re
import shutil
import signal
import sys
import tempfile
import types
import typing

from absl import flags

from recipes import RECIPES

HELP_ARGS = {"--help", "-h", "-?", "--helpfull", "--helpshort"}
# Shared flags: name -> (default, help). None means "the recipe's own default".
SHARED_FLAGS = {
    "recipe": (None, "which recipe to run: " + ", ".join(RECIPES)),
    "dataset": (None, "shapes (generated, the default), shapes_hard (any polarity, position "
                      "and rotation), mnist, fashion_mnist, directory (a folder of class "
                      "sub-folders) or threshold"),
    "data_dir": (None, "folder with the dataset's files (idx .gz files or class sub-folders)"),
    "epochs": (None, "training epochs (default: the recipe's)"),
    "batch_size": (None, "examples per training step (default: the recipe's)"),
    "steps_per_epoch": (None, "optional cap on training steps per epoch"),
    "logdir": ("runs", "where run folders go: <logdir>/<recipe>/<UTC timestamp>"),
    "seed": (0, "random seed for data generation, splits and initial weights"),
    "strategy": ("auto", "tf.distribute strategy: auto, default, mirrored, multi_worker (reads "
                         "TF_CONFIG) or tpu; with several replicas --batch_size is per replica"),
    "resume": (False, "continue the newest unfinished run of this same command from its last "
                      "finished epoch, in the same run folder"),
}
POSITIVE_INTS = ("epochs", "batch_size", "steps_per_epoch")
INT_FLAGS = POSITIVE_INTS + ("seed",)


class UsageError(Exception):
    """Bad input found before any work: one line on stderr, exit code 2."""


def fail(message, code=2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


# --- recipe Config dataclass -> absl flags ------------------------------------

def config_help(config_cls):
    """Field name -> its trailing comment in the Config source: the flag's help."""
    helps, last = {}, None
    for line in inspect.getsource(config_cls).splitlines():
        field = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
        continuation = re.match(r"\s+#\s*(.*)$", line)
        if field:
            last = field.group(1)
            helps[last] = field.group(2)
        elif continuation and last:
            helps[last] += " " + continuation.group(1)
        else:
            last = None
    return helps


def _parse_items(value, item_type):
    return tuple(item_type(v) for v in value) if value is not None else None


def define_config_flags(config_cls, fv):
    """Defines one flag per Config field that is not a shared flag."""
    hints = typing.get_type_hints(config_cls)
    helps = config_help(config_cls)
    converters = {}
    for field in dataclasses.fields(config_cls):
        if field.name in SHARED_FLAGS:
            continue
        kind = hints[field.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        args = typing.get_args(kind)
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = helps.get(field.name, field.name)
        define = dict(name=field.name, default=default, help=help_text, flag_values=fv)
        if typing.get_origin(kind) is typing.Literal:
            flags.DEFINE_enum(enum_values=[str(a) for a in args], **define)
        elif kind is bool:
            flags.DEFINE_boolean(**define)
        elif kind is int:
            flags.DEFINE_integer(**define)
        elif kind is float:
            flags.DEFINE_float(**define)
        elif typing.get_origin(kind) is tuple:
            define["default"] = None if default is None else [str(v) for v in default]
            flags.DEFINE_list(**define)
            converters[field.name] = lambda v, t=args[0]: _parse_items(v, t)
        else:
            flags.DEFINE_string(**define)
    return converters


def define_shared_flags(fv):
    for name, (default, help_text) in SHARED_FLAGS.items():
        if name in INT_FLAGS:
            flags.DEFINE_integer(name, default, help_text, flag_values=fv)
        elif name == "resume":
            flags.DEFINE_boolean(name, default, help_text, flag_values=fv)
        else:
            flags.DEFINE_string(name, default, help_text, flag_values=fv)


def build_config(module, fv, converters):
    fields = {f.name for f in dataclasses.fields(module.Config)}
    for name in POSITIVE_INTS:
        if fv[name].value is not None and name not in fields:
            raise ValueError(f"--{name} does not apply to this recipe (see its --help)")
    values = {}
    for field in dataclasses.fields(module.Config):
        value = fv[field.name].value  # every field has a flag: its own or a shared one
        if field.name in SHARED_FLAGS and value is None:
            continue  # shared flag not given: keep the recipe's default
        try:
            values[field.name] = converters.get(field.name, lambda v: v)(value)
        except ValueError as e:
            raise ValueError(f"--{field.name}={','.join(value)} is not a list of numbers ({e})") from None
    return module.Config(**values)


# --- help ----------------------------------------------------------------------

def recipe_list():
    width = max(map(len, RECIPES))
    return "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in RECIPES.items())


def print_usage():
    print(__doc__.strip())
    print("\nRecipes:\n" + recipe_list())
    print("\nShared flags:")
    for name, (default, help_text) in SHARED_FLAGS.items():
        print(f"  --{name}: {help_text}" + (f" (default: {default})" if default is not None else ""))
    print("\nInterrupted runs: Ctrl-C exits with code 130 and keeps the last finished epoch; "
          "run the same command with --resume to continue it.")


def print_recipe_help(name, module, fv):
    print((module.__doc__ or name).strip())
    print(f"\nFlags of --recipe={name}:")
    for field in dataclasses.fields(module.Config):
        if field.name in SHARED_FLAGS:
            continue
        flag = fv[field.name]
        print(f"  --{flag.name}: {flag.help} (default: {flag.default_as_str or flag.default})")
    print("\nShared flags:")
    defaults = {f.name: f.default for f in dataclasses.fields(module.Config)}
    for flag_name, (default, help_text) in SHARED_FLAGS.items():
        default = defaults.get(flag_name, default)
        print(f"  --{flag_name}: {help_text}" + (f" (default: {default})" if default is not None else ""))


# --- run folder ----------------------------------------------------------------

def write_json_atomically(path, payload):
    """Temp file + os.replace: readers never see a half-written file."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_writable(folder):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"--logdir is not writable: {folder} ({e.strerror or e})") from None


def _without_resume(args):
    return [a for a in args if a.split("=")[0] not in ("--resume", "--noresume")]


def find_resumable(recipe_dir, argv):
    """The newest run folder of this same command that has no metrics.json yet."""
    wanted = _without_resume(argv[1:])
    for run_dir in sorted(recipe_dir.iterdir(), reverse=True):
        try:
            flags_json = json.loads((run_dir / "flags.json").read_text())
        except (OSError, ValueError):
            continue
        if _without_resume(flags_json.get("argv", [])) == wanted:
            return None if (run_dir / "metrics.json").exists() else run_dir
    return None


def make_run_dir(recipe_dir):
    """<logdir>/<recipe>/<UTC timestamp>, suffixed -2, -3... within one second."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for attempt in range(1, 1000):
        run_dir = recipe_dir / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise UsageError(f"could not create a fresh run folder under {recipe_dir}")


# --- main ----------------------------------------------------------------------

def peek_recipe(argv):
    for i, arg in enumerate(argv):
        if arg.startswith("--recipe="):
            return arg.split("=", 1)[1]
        if arg == "--recipe" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def parse(argv):
    """argv -> (name, module, fv, config); exits on help and on bad input."""
    name = peek_recipe(argv)
    wants_help = any(arg in HELP_ARGS for arg in argv[1:])
    if name is None:
        if wants_help or len(argv) == 1:
            print_usage()
            sys.exit(0)
        fail(f"--recipe is required; choose one of {', '.join(RECIPES)}")
    if name not in RECIPES:
        fail(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out
    module = importlib.import_module(RECIPES[name][0])
    fv = flags.FlagValues()
    define_shared_flags(fv)
    converters = define_config_flags(module.Config, fv)
    if wants_help:
        print_recipe_help(name, module, fv)
        sys.exit(0)
    try:
        rest = fv(argv)
    except flags.Error as e:
        fail(str(e).splitlines()[0])
    if len(rest) > 1:
        fail(f"unexpected arguments: {' '.join(rest[1:])}")
    for flag_name in POSITIVE_INTS:
        if fv[flag_name].value is not None and fv[flag_name].value < 1:
            fail(f"--{flag_name} must be at least 1, got {fv[flag_name].value}")
    try:
        config = build_config(module, fv, converters)
    except (ValueError, TypeError) as e:
        fail(str(e))
    return name, module, fv, config


def load_data(module, fv, config):
    import datasets  # Deferred so --help stays instant.

    spec = dict(getattr(module, "DATA", {"form": "arrays"}))
    for key in ("image_size", "channels"):  # a recipe's Config may override its geometry
        if hasattr(config, key):
            spec[key] = getattr(config, key)
    dataset = fv.dataset or ("directory" if fv.data_dir else getattr(module, "DEFAULT_DATASET", "shapes"))
    try:
        return dataset, datasets.load(dataset, fv.data_dir, seed=fv.seed, **spec)
    except datasets.DataError as e:
        fail(str(e))


def print_summary(run_dir, metrics, headline, logdir):
    shown = [k for k in headline if k in metrics] or sorted(metrics)
    print(f"\nRun folder: {run_dir}")
    for key in shown:
        value = metrics[key]
        print(f"  {key:<28} {value:.4g}" if isinstance(value, float) else f"  {key:<28} {value}")
    print(f"See it: tensorboard --logdir {logdir}")


def make_strategy(name, module, fv):
    """The tf.distribute strategy to pass to run(), or None for recipes without one."""
    import distribute  # Deferred: it imports TensorFlow when a strategy is made.

    try:
        distribute.check_name(fv.strategy)  # first, whatever the recipe
        if "strategy" not in inspect.signature(module.run).parameters:
            if fv.strategy not in ("auto", "default"):
                fail(f"--strategy={fv.strategy} is not supported by --recipe={name} "
                     "(README: which recipes support which strategy)")
            return None
        if fv.resume and fv.strategy == "multi_worker":
            fail("--resume is not supported with --strategy=multi_worker")
        return distribute.make(fv.strategy)
    except distribute.StrategyError as e:
        fail(str(e))


def prepare_run_dir(name, module, fv, argv, chief):
    """A fresh run folder, the one --resume continues, or a temp dir for non-chief workers."""
    if not chief:
        return pathlib.Path(tempfile.mkdtemp(prefix=f"{name}-worker-"))
    recipe_dir = pathlib.Path(fv.logdir) / name
    try:
        check_writable(recipe_dir)
        if fv.resume:
            if not getattr(module, "RESUMABLE", False):
                raise UsageError(f"--recipe={name} cannot resume (it keeps no per-epoch checkpoint)")
            run_dir = find_resumable(recipe_dir, argv)
            if run_dir is not None:
                print(f"Resuming {run_dir}")
                (run_dir / "INTERRUPTED").unlink(missing_ok=True)
                return run_dir
            print("Nothing to resume for this command: starting a new run")
        return make_run_dir(recipe_dir)
    except UsageError as e:
        fail(str(e))


def is_out_of_memory(error):
    return (type(error).__name__ == "ResourceExhaustedError"
            or "out of memory" in str(error).lower())


def exit_on_interrupt(run_dir):
    """Ctrl-C marks the run folder INTERRUPTED and leaves at once, exit code 130.

    A KeyboardInterrupt raised inside a TensorFlow step can abort the process
    (heap corruption, seen here as free() errors), so the handler does not
    unwind: every artifact is written to a temp name and renamed, so leaving
    now keeps the last finished epoch whole, as a kill would.
    """
    def handler(signum, frame):
        (run_dir / "INTERRUPTED").write_text("interrupted by Ctrl-C; its last finished epoch is "
                                             "kept: run the same command with --resume\n")
        sys.stdout.flush()
        print(f"error: interrupted; run folder kept: {run_dir}", file=sys.stderr, flush=True)
        os._exit(130)

    signal.signal(signal.SIGINT, handler)


def main(argv):
    import distribute

    name, module, fv, config = parse(argv)
    strategy = make_strategy(name, module, fv)  # before any TensorFlow op runs
    dataset, data = load_data(module, fv, config)
    chief = distribute.is_chief()
    run_dir = prepare_run_dir(name, module, fv, argv, chief)
    fresh = not (run_dir / "flags.json").exists()  # False when --resume continues a run
    if fresh:
        write_json_atomically(run_dir / "flags.json", {
            "recipe": name, "dataset": dataset, "argv": argv[1:],
            "config": dataclasses.asdict(config),
            "flags": {k: fv[k].value for k in SHARED_FLAGS}})
    extra = {} if strategy is None else {"strategy": strategy}
    if chief:
        exit_on_interrupt(run_dir)
    try:
        metrics = module.run(config, str(run_dir), data, **extra)
        if chief:
            write_json_atomically(run_dir / "metrics.json", metrics)
            print_summary(run_dir, metrics, getattr(module, "HEADLINE", ()), fv.logdir)
    except ArithmeticError as e:  # a NaN/Inf guard fired: the run is over, its logs stay
        fail(f"{e} (run folder: {run_dir})", code=1)
    except ValueError as e:  # the recipe rejected its input before training: leave nothing new
        if fresh:
            shutil.rmtree(run_dir, ignore_errors=True)
        fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        fail(f"out of memory at --batch_size={fv.batch_size or 'default'}: "
             "try a smaller --batch_size", code=1)
    finally:
        if not chief:
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv)
