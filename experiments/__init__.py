"""The experiments main.py runs: the registry (name -> module, one-line summary) and the
contract between main.py and an experiment.

Kept free of heavy imports so `python main.py --help` lists the recipes
without loading TensorFlow; main.py imports only the chosen module.

The contract between main.py (through cli/) and an experiment module
-------------------------------------------------------------------
Each experiment imports its recipe's drop-in file (recipes/<name>.py, which
imports only public libraries) and the machinery written once in this package
(files, tensorboard, scale_out, user_model, ...); `advise` composes the other
experiments. An experiment module offers:

Config        a dataclass of the recipe's knobs. Each field becomes a flag of
              the same name, typed by its annotation, with the field's trailing
              comment as its help (cli/flags.py). `__post_init__` raises
              ValueError for values it rejects.
DATA          what the recipe trains on: {"form": "arrays" | "directory" |
              "arrays_or_directory" (a folder as a folder, other datasets as arrays),
              "image_size", "channels", "examples": (n_train, n_val)} (see
              datasets/__init__.py); Config.image_size/.channels override it.
DEFAULT_DATASET  optional, only where the default is not the generated `shapes`.
FOLDER_CHANNELS  optional, for a "directory" recipe: the --model input channels it
              feeds (default 3, RGB).
HEADLINE      the metric names printed at the end of a run.
RESUMABLE     optional, True when run() continues a stopped run found in its
              run folder at its checkpoint's step (scale_out.EpochCheckpoint and
              fit_from; Config.checkpoint_every_steps): --resume is accepted.
why_not_resumable(config)  optional: a RESUMABLE recipe's reason (one line) why
              it cannot continue a run of this Config, or None.
STRATEGIES    optional, the --strategy names run() takes besides auto/default
              (mirrored, multi_worker, tpu: tf.distribute; data_parallel:
              keras.distribution on JAX). Such a run() takes `strategy=` (the
              strategy object, None for one device; batch sizes are then per
              replica, the learning rate scales with the replica count, only
              the chief writes) and `fit=`, called like keras.Model.fit(model,
              ...), which is its default: the CLI passes its strategy.run loop
              (cli/distribute.py) for multi_worker, where Keras 3's fit fails.
check(config, data)  optional: raises ValueError, one line, for data (or
              weights, or settings that depend on the data) the recipe cannot
              run on. main.py calls it before it makes the run folder; run()
              calls it too, so a drop-in caller gets the same errors.
run(config, run_dir, data, ...) -> dict   trains and measures; returns flat
              metrics (lower_snake names, units in the name) for metrics.json.
              It writes TensorBoard logs and artifacts under run_dir.

What each exception means for the exit code (main.py)
    ValueError before run() (from Config, the data, check(), the flags)
                  bad input: `error: <message>` on one line, exit 2, and no run
                  folder is left behind.
    anything raised by run()
                  training had started: the run folder is kept with all it
                  holds, one line names it, exit 1. ArithmeticError
                  (FloatingPointError) is a NaN/Inf guard that fired and prints
                  its own message; an out-of-memory error advises a smaller
                  batch; any other error prints its type and first line and
                  leaves the traceback in the folder's error.txt.
    scale_out.Preempted  SIGTERM or Ctrl-C, honoured at the end of a training step
                  once its checkpoint is saved: the folder is marked INTERRUPTED
                  with the signal and step, exit 143 (SIGTERM) or 130 (Ctrl-C).
"""
RECIPES = {
    "batch": ("experiments.batch",
              "batch size vs throughput and accuracy: the same model swept over batch sizes"),
    "stream": ("experiments.stream",
               "image folders larger than memory: ImageDataGenerator vs tf.data, measured"),
    "mixed_precision": ("experiments.mixed_precision",
                        "mixed_float16 / mixed_bfloat16 policy, done safely, vs float32"),
    "transfer": ("experiments.transfer",
                 "VGG16 transfer learning: frozen base, cached features, fine-tuning"),
    "prune": ("experiments.prune",
              "magnitude pruning (Keras 3 or tfmot) that really shrinks the saved model"),
    "device": ("experiments.device",
               "the same job on CPU and each GPU, with time, cost and a verdict"),
    "profile": ("experiments.tf_profile",
                "profiler trace, CPU/GPU utilization and memory, input-bound verdict"),
    "advise": ("experiments.advise",
               "measured advice for your model: ranked speedups, applied together as proof"),
}
