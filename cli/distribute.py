"""--strategy for the CLI: TensorFlow's tf.distribute, or Keras' own keras.distribution on JAX.

main.py creates the strategy before anything else touches TensorFlow (a
MultiWorkerMirroredStrategy must exist before the first op runs) and hands it
to recipes that list the name in their STRATEGIES (their run() takes
`strategy=` and `fit=`).

    auto           several local accelerators: mirrored (TensorFlow) or
                   data_parallel (JAX); else one device
    default        one device (the no-op strategy)
    mirrored       TensorFlow: all local GPUs, gradients all-reduced each step
    multi_worker   TensorFlow: every worker listed in the standard TF_CONFIG
                   environment variable (BUILD.md shows how to launch it);
                   trained by experiments.scale_out.fit_by_strategy_run, since
                   Keras 3's fit fails there
    data_parallel  JAX: keras.distribution.DataParallel over all local devices
    tpu            TensorFlow: a TPU found by TPUClusterResolver
"""
import json
import os

from cli import UsageError

NAMES = ("auto", "default", "mirrored", "multi_worker", "data_parallel", "tpu")
TENSORFLOW_ONLY = ("mirrored", "multi_worker", "tpu")


def for_command(command):
    """(strategy, fit) for the recipe's run(), each None where the recipe's default serves
    (strategy None: one device)."""
    name, fv = command.values.strategy, command.values
    if name not in NAMES:  # first, whatever the recipe
        raise UsageError(f"unknown --strategy={name}; choose one of {', '.join(NAMES)}")
    supported = getattr(command.module, "STRATEGIES", ())
    if name in ("auto", "default") and not supported:
        return None, None  # without importing keras: device's parent process stays light
    import keras  # Deferred, like TensorFlow: --help must stay instant.

    backend = keras.backend.backend()
    if backend == "jax" and name in TENSORFLOW_ONLY:
        raise UsageError(f"--strategy={name} is TensorFlow's (tf.distribute); on "
                         "KERAS_BACKEND=jax use --strategy=data_parallel")
    if backend != "jax" and name == "data_parallel":
        raise UsageError(f"--strategy=data_parallel is Keras' JAX distribution; on "
                         f"KERAS_BACKEND={backend} use --strategy=mirrored")
    if name not in ("auto", "default") and name not in supported:
        raise UsageError(f"--strategy={name} is not supported by --recipe={command.name} "
                         "(README: which recipes support which strategy)")
    if fv.resume and name == "multi_worker":
        raise UsageError("--resume is not supported with --strategy=multi_worker: each worker "
                         "would need the chief's checkpoint, and only the chief keeps a run "
                         "folder; run it again without --resume")
    strategy = make(name, backend)
    if name != "multi_worker":
        return strategy, None
    from experiments.scale_out import fit_by_strategy_run
    return strategy, fit_by_strategy_run


def make(name, backend):
    if backend == "jax":
        import keras

        devices = keras.distribution.list_devices()
        if name == "data_parallel" or (name == "auto" and len(devices) > 1):
            return keras.distribution.DataParallel(devices=devices)
        return None
    import tensorflow as tf  # Deferred: main.py --help must not load TensorFlow.

    if name == "auto":
        name = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "default"
    if name == "default":
        return None  # one device: the recipe's own default
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        check_tf_config(os.environ.get("TF_CONFIG"))
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError) as e:
        raise UsageError(f"--strategy=tpu: no TPU found ({str(e).splitlines()[0]})") from None
    return tf.distribute.TPUStrategy(resolver)


def check_tf_config(text):
    """UsageError (one line) unless TF_CONFIG names a cluster and this process's task in it."""
    if text is None:
        raise UsageError("--strategy=multi_worker needs the TF_CONFIG environment variable "
                         "(cluster and task); see BUILD.md")
    try:
        config = json.loads(text)
    except ValueError:
        raise UsageError("TF_CONFIG is not valid JSON; see BUILD.md") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise UsageError('TF_CONFIG needs "cluster" and "task" objects, e.g. {"cluster": '
                         '{"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", '
                         '"index": 0}}; see BUILD.md')
    members = cluster.get(task.get("type"))
    index = task.get("index", 0)
    if not isinstance(members, list) or not isinstance(index, int) or not 0 <= index < len(members):
        raise UsageError(f"TF_CONFIG's task {task} is not in its cluster {cluster}; see BUILD.md")


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
