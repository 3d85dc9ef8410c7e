"""A recipe's Config dataclass becomes absl flags; the shared flags; --help; parse(argv).

Each Config field is a flag named like it, typed by its annotation (bool, int,
float, str, Literal -> enum, tuple -> comma list), with the field's trailing
comment as its help. So a new knob in a recipe needs no edit here.
"""
import dataclasses
import importlib
import inspect
import re
import types
import typing

from absl import flags

from cli import UsageError, quiet
from experiments import RECIPES

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
    "strategy": ("auto", "auto, default (one device), mirrored, multi_worker (reads TF_CONFIG) or "
                         "tpu (tf.distribute), data_parallel (KERAS_BACKEND=jax); with several "
                         "replicas --batch_size is per replica"),
    "resume": (False, "continue the newest unfinished run of this recipe at the step of its "
                      "last checkpoint, in the same run folder (its settings must match); "
                      "with none, start anew"),
    "model": (None, "your saved Keras model (.keras or .h5) to run the recipe on instead of its "
                    "own; the data is resized to its input (prune also takes dense or conv)"),
    "trust_model": (False, "load --model with Keras' safe mode off: only for a file you trust, "
                           "since a Lambda layer in it can run any Python code"),
    "model_code": (None, "a Python file that defines (and registers) the custom layers of "
                         "--model; it is imported before the model is loaded"),
    "pixel_range": ("auto", "the range pixels reach --model in: auto (from what it does: the "
                            "first Rescaling or Normalization past its augmentation, or the "
                            "range a keras.applications network was trained on; the output "
                            "says which), 0_255, 0_1 or -1_1"),
    "verbose": (False, "show TensorFlow's C++ start-up logging (hidden unless "
                       "TF_CPP_MIN_LOG_LEVEL is set)"),
    "grace_s": (25.0, "seconds a SIGTERM or Ctrl-C leaves the run to finish its step, save a "
                      "checkpoint and exit (143, or 130 for Ctrl-C); keep it under the "
                      "platform's own grace period (Kubernetes: 30 s by default)"),
    "checkpoint_every_steps": (None, "resumable recipes: also checkpoint every N training steps "
                                     "within an epoch, so a SIGKILL loses at most N (default: "
                                     "about every 30 s, never more than 5% of the time)"),
}
POSITIVE_INTS = ("epochs", "batch_size", "steps_per_epoch", "checkpoint_every_steps")
INT_FLAGS = POSITIVE_INTS + ("seed",)
BOOL_FLAGS = ("resume", "trust_model", "verbose")
FLOAT_FLAGS = ("grace_s",)
ENUM_FLAGS = {"pixel_range": ("auto", "0_255", "0_1", "-1_1")}


@dataclasses.dataclass
class Command:
    """One parsed command line: the recipe, its flag values and its Config."""
    name: str
    module: types.ModuleType
    values: flags.FlagValues
    config: object
    argv: list
    model_path: str | None = None  # --model, when it names a file (not a built-in model)


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
    """Defines one flag per Config field that is not a shared flag; returns list converters."""
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
        default = (field.default if field.default is not dataclasses.MISSING
                   else field.default_factory())
        define = dict(name=field.name, default=default, help=helps.get(field.name, field.name),
                      flag_values=fv)
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
        elif name in BOOL_FLAGS:
            flags.DEFINE_boolean(name, default, help_text, flag_values=fv)
        elif name in FLOAT_FLAGS:
            flags.DEFINE_float(name, default, help_text, flag_values=fv)
        elif name in ENUM_FLAGS:
            flags.DEFINE_enum(name, default, ENUM_FLAGS[name], help_text, flag_values=fv)
        else:
            flags.DEFINE_string(name, default, help_text, flag_values=fv)


def model_choice(module, fv):
    """(built-in model name or None, model file or None) from --model.

    A recipe whose Config has a `model` field of built-in names (prune: dense,
    conv) takes those names; any other value is a saved model file, for the
    recipes that declare TAKES_MODEL.
    """
    value = fv.model
    fields = {f.name: f for f in dataclasses.fields(module.Config)}
    builtins = (typing.get_args(typing.get_type_hints(module.Config)["model"])
                if "model" in fields else ())
    if value is None or value in builtins:
        return value, None
    if not getattr(module, "TAKES_MODEL", False):
        raise UsageError("--model does not apply to this recipe (see its --help)")
    return None, value


def build_config(module, fv, converters):
    """The recipe's Config from the flags; UsageError for a value it rejects."""
    fields = {f.name for f in dataclasses.fields(module.Config)}
    for name in POSITIVE_INTS:
        if fv[name].value is not None and fv[name].value < 1:
            raise UsageError(f"--{name} must be at least 1, got {fv[name].value}")
        if fv[name].value is not None and name not in fields:
            raise UsageError(f"--{name} does not apply to this recipe (see its --help)")
    if fv.grace_s <= 0:
        raise UsageError(f"--grace_s must be > 0, got {fv.grace_s:g}")
    if (fv.trust_model or fv.model_code) and not fv.model:
        raise UsageError("--trust_model and --model_code go with --model=FILE")
    values = {}
    for field in dataclasses.fields(module.Config):
        value = fv[field.name].value  # every field has a flag: its own or a shared one
        if field.name == "model":
            value = model_choice(module, fv)[0]
        if field.name in SHARED_FLAGS and (value is None or value is False):
            continue  # shared flag not given: keep the recipe's default
        try:
            values[field.name] = converters.get(field.name, lambda v: v)(value)
        except ValueError as e:
            raise UsageError(f"--{field.name}={','.join(value)} is not a list of numbers "
                             f"({e})") from None
    try:
        return module.Config(**values)
    except (ValueError, TypeError) as e:  # the recipe's own checks in __post_init__
        raise UsageError(str(e)) from None


# --- help ----------------------------------------------------------------------

def print_usage(usage):
    width = max(map(len, RECIPES))
    print(usage.strip())
    print("\nRecipes:\n" + "\n".join(f"  {name:<{width}}  {summary}"
                                     for name, (_, summary) in RECIPES.items()))
    print("\nShared flags:")
    for name, (default, help_text) in SHARED_FLAGS.items():
        print(f"  --{name}: {help_text}" + (f" (default: {default})" if default is not None else ""))
    print("\nInterrupted runs: SIGTERM (exit 143) and Ctrl-C (exit 130) finish the step in "
          "progress and save a checkpoint there; run the same command with --resume to "
          "continue at that step.")


def print_recipe_help(name, module, fv):
    print((module.__doc__ or name).strip())
    print(f"\nFlags of --recipe={name}:")
    for field in dataclasses.fields(module.Config):
        if field.name not in SHARED_FLAGS:
            flag = fv[field.name]
            print(f"  --{flag.name}: {flag.help} (default: {flag.default_as_str or flag.default})")
    print("\nShared flags:")
    defaults = {f.name: f.default for f in dataclasses.fields(module.Config)}
    for flag_name, (default, help_text) in SHARED_FLAGS.items():
        default = defaults.get(flag_name, default)
        print(f"  --{flag_name}: {help_text}" + (f" (default: {default})" if default is not None else ""))


# --- parse ---------------------------------------------------------------------

def peek_recipe(argv):
    for i, arg in enumerate(argv):
        if arg.startswith("--recipe="):
            return arg.split("=", 1)[1]
        if arg == "--recipe" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def parse(argv, usage):
    """argv -> Command; None after printing help; UsageError for bad input.

    Only the chosen recipe's module is imported, so `--help` stays instant.
    """
    name = peek_recipe(argv)
    wants_help = any(arg in HELP_ARGS for arg in argv[1:])
    if name is None:
        if wants_help or len(argv) == 1:
            print_usage(usage)
            return None
        raise UsageError(f"--recipe is required; choose one of {', '.join(RECIPES)}")
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    with quiet.startup(quiet.wanted(argv)):  # TensorFlow's C++ start-up lines kept out
        module = importlib.import_module(RECIPES[name][0])
        quiet.start_devices()
    fv = flags.FlagValues()
    define_shared_flags(fv)
    converters = define_config_flags(module.Config, fv)
    if wants_help:
        print_recipe_help(name, module, fv)
        return None
    try:
        rest = fv(argv)
    except flags.Error as e:
        raise UsageError(str(e).splitlines()[0]) from None
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
    if fv.resume and not getattr(module, "RESUMABLE", False):
        raise UsageError(f"--recipe={name} cannot resume (it keeps no per-epoch checkpoint)")
    config = build_config(module, fv, converters)
    why_not = getattr(module, "why_not_resumable", lambda config: None)(config)
    if fv.resume and why_not:
        raise UsageError(f"--recipe={name} cannot resume here: {why_not}")
    return Command(name, module, fv, config, list(argv), model_choice(module, fv)[1])
