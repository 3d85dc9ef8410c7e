"""--strategy for the CLI: TensorFlow's own tf.distribute strategies, chosen by name.

main.py creates the strategy before anything else touches TensorFlow (a
MultiWorkerMirroredStrategy must exist before the first op runs) and hands it
to recipes that declare TAKES_STRATEGY = True (their run() takes `strategy=`).

    auto          mirrored when more than one GPU is visible, else default
    default       one device (the no-op strategy)
    mirrored      all local GPUs, gradients all-reduced each step
    multi_worker  every worker listed in the standard TF_CONFIG environment
                  variable; BUILD.md shows how to launch it
    tpu           a TPU found by TPUClusterResolver
"""
import json
import os

from cli import UsageError

NAMES = ("auto", "default", "mirrored", "multi_worker", "tpu")


def for_command(command):
    """The strategy to pass to the recipe's run(), or None for a one-device recipe."""
    name, fv = command.values.strategy, command.values
    if name not in NAMES:  # first, whatever the recipe
        raise UsageError(f"unknown --strategy={name}; choose one of {', '.join(NAMES)}")
    if not getattr(command.module, "TAKES_STRATEGY", False):
        if name not in ("auto", "default"):
            raise UsageError(f"--strategy={name} is not supported by --recipe={command.name} "
                             "(README: which recipes support which strategy)")
        return None
    if fv.resume and name == "multi_worker":
        raise UsageError("--resume is not supported with --strategy=multi_worker")
    return make(name)


def make(name):
    import tensorflow as tf  # Deferred: main.py --help must not load TensorFlow.

    if name == "auto":
        name = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise UsageError("--strategy=multi_worker needs the TF_CONFIG environment variable "
                                "(cluster and task); see BUILD.md")
        try:
            json.loads(os.environ["TF_CONFIG"])
        except ValueError:
            raise UsageError("TF_CONFIG is not valid JSON; see BUILD.md") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError) as e:
        raise UsageError(f"--strategy=tpu: no TPU found ({str(e).splitlines()[0]})") from None
    return tf.distribute.TPUStrategy(resolver)


def is_chief():
    """True unless TF_CONFIG names this process as a worker other than worker 0.

    Only the chief writes the run folder and checkpoints; the others write to
    a temporary folder that main.py removes.
    """
    config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    task = config.get("task", {})
    if task.get("type") == "chief":
        return True
    has_chief = "chief" in config.get("cluster", {})
    return not task or (task.get("type") == "worker" and task.get("index", 0) == 0 and not has_chief)
