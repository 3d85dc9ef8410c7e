"""Magnitude pruning that really shrinks the saved model, on Keras 3 (any backend) or tfmot.

Shows: train a small baseline (or take yours, as trained), prune a copy of it
to a target sparsity per kernel (polynomial or constant schedule, optional
block or m:n structure such as 2:4, only some layers if asked), strip the
pruning machinery, fine-tune, then measure what a user cares about: the share
of exact zeros in each kernel beside the target, accuracy before and after,
and the gzip size of the saved model, of a TFLite file and of its int8
variants. Every exported file is reloaded and must predict like the model in
memory.
Two engines, side by side (--engine):
  keras  the default: Keras 3 alone, on the TensorFlow, JAX and PyTorch
         backends (recipes/prune.py, the drop-in file). Each pruned kernel gets
         a mask, kept as a variable of the optimizer (so a compiled JAX train
         step carries it), and a kernel constraint, which Keras applies after
         every optimizer update on every backend: on the schedule's steps it
         recomputes the mask from the weights' magnitudes, and always
         multiplies the kernel by it, so pruned weights are exact zeros and stay
         zero. A callback cannot do this on JAX: inside fit the JAX trainer
         holds the weights outside the model. Strip is a plain copy: no masks,
         no constraints, no optimizer. Prunes the layers that hold a model's
         weights: Dense, EinsumDense, Conv1D/2D/3D and their Transpose,
         SeparableConv1D/2D (depthwise and pointwise kernels),
         DepthwiseConv1D/2D and Embedding, of any Keras 3 model, yours included
         (--model=FILE.keras).
  tfmot  TensorFlow Model Optimization's prune_low_magnitude, the reference: it
         prunes only tf_keras (Keras 2) models. It is imported only when this
         engine runs, so the Keras engine works without tfmot and tf-keras installed.
The default layer choice is an expert's: the smallest layers, whose weights add
up to at most --min_layer_share of the model's weight matrices, stay dense (the
tfmot guide's 108-weight first conv, a MobileNet's tiny depthwise kernels save
nothing and cost accuracy). What stays dense (those, layers neither engine can
prune, frozen ones) is named with its share in one line, not fatal.
model_sparsity is the share of exact zeros over every weight matrix and kernel
of the model (biases and normalization aside), pruned or not.
Exports: the .keras (keras) or .h5 (tfmot) file without the optimizer, whose
slots would hide the zeros; on the TensorFlow backend a TFLite file and a
dynamic-range int8 TFLite file (inputs of any length: the interpreter is resized
to the data); with the Keras engine also Keras' own model.quantize("int8") of
the pruned model and its accuracy (Keras quantizes Dense, EinsumDense and
Embedding, not convolutions: the layers it left are named). An export that
cannot be made or checked is reported in the table and as `<export>_error` in
metrics.json; the run still finishes.
Optional: --clusters=8 (tfmot) then shares 8 values per kernel (sparsity-
preserving clustering), which gzip and int8 TFLite compress further.
Run:    python main.py --recipe=prune
        python main.py --recipe=prune --sweep=0.5,0.7,0.8,0.9,0.95
        python main.py --recipe=prune --model=conv --dataset=mnist --data_dir=DIR
        python main.py --recipe=prune --model=my_model.keras --data_dir=my_photos/
        python main.py --recipe=prune --engine=tfmot       # the same on tfmot
        KERAS_BACKEND=jax python main.py --recipe=prune
        ... --strategy=mirrored, or on JAX --strategy=data_parallel (Keras engine;
        --batch_size is then per replica); --resume after a kill continues the
        baseline or the fine-tune, the schedule's step included
Expect: on the default shapes data (6,000 28x28 images, dense model, 80%, 2 CPU
        cores, ~10 s), measured: the output layer (0.59% of the weight
        matrices) is left dense, dense_128 and dense_64 reach exactly 0.800
        (model_sparsity 0.795); accuracy 0.981 -> 0.982 (-0.1 pt); .keras gzip
        406,191 -> 124,168 bytes (3.27x); int8 TFLite 41,487 (9.8x); Keras
        int8 41,247 at 0.980 (each epoch reads the examples in an order
        permuted by (seed, epoch), so that a resumed epoch reads the rest of
        it). KERAS_BACKEND=jax: 0.989 -> 0.982, 3.26x; --engine=tfmot: 0.988
        -> 0.983, 3.2x. The sweep:
           target  measured  accuracy  drop pts  gzip bytes  ratio
             0.50     0.500    0.9830     -0.20     243,529   1.67
             0.70     0.700    0.9800      0.10     165,384   2.46
             0.80     0.800    0.9820     -0.10     124,167   3.27
             0.90     0.900    0.9790      0.20      79,116   5.13
             0.95     0.950    0.9610      2.00      55,362   7.34
        Accuracy holds to 90%; at 95% it falls 2 points. On the tfmot guide's MNIST
        model (benchmarks/prune.py), both engines lose <= 0.1 pt at 80%
        (guide: 0.7) and ~0.7 pt at 90% (guide: 3.0), int8 TFLite 14x.
        benchmarks/prune_models.py, at 80%: a small Xception (SeparableConv2D 85%
        of its weight matrices) model_sparsity 0.793, .keras gzip 3.05x;
        MobileNetV2 alpha 0.35 (52 convolutions; 11 stay dense, 0.99%) 0.792,
        2.74x: its never-pruned biases and BatchNorm weights (6.7% of its values)
        are 17% of the pruned file.
Copy:   recipes/prune.py is the drop-in file: copy it alone into any Keras 3
        project (its docstring shows prune_model, fit, strip_pruning on your
        model). This experiment is called from this repository:
        experiments.prune.run(Config(), run_dir, ((x_train, y_train), (x_val,
        y_val)), model=your_model) prunes a copy of your trained keras.Model (or
        of a builder fn(input_shape, num_classes)'s; leave it out for the
        built-in dense/conv models). strategy= (a tf.distribute strategy or a
        keras.distribution) and fit= (for MultiWorkerMirroredStrategy, where
        Keras 3's fit fails) work as in batch. The tfmot engine
        (experiments/prune_tfmot.py) needs tf-keras and
        tensorflow-model-optimization; TFLite export and TensorBoard logs need
        TensorFlow.
"""
import dataclasses
import math
import os
import time
import typing
import warnings

import keras
import numpy as np
from keras import ops

from experiments.errors import named_line
from experiments.exports import (gzip_bytes, left_in_float, load_model, predictions_match,
                                 save_model, tflite_predict, to_tflite, write_bytes)
from experiments.files import write_atomically
from experiments.prune_tfmot import (tfmot_cluster, tfmot_log_final_sparsity, tfmot_modules,
                                     tfmot_prune_model)
from experiments.scale_out import (EpochCheckpoint, distribution_scope, final_logs, fit_from,
                                   latest_checkpoint, position, replica_count, restore)
from experiments.tensorboard import log_hparams_trials, log_text_summary, scalar_pb, write_events
from experiments.user_model import classifier_loss, fresh_model, num_classes_of, users_settings
from recipes import prune

# What main.py feeds this recipe: arrays of 28x28 gray images by default.
DATA = {"form": "arrays", "image_size": 28, "channels": 1}
TAKES_MODEL = True  # run() takes model=: your keras.Model (Keras engine), pruned from a copy
RESUMABLE = True  # Keras engine: checkpoints (epoch ends, every N steps, on SIGTERM) of the
# baseline and each fine-tune
STRATEGIES = ("mirrored", "multi_worker", "data_parallel")  # Keras engine: run(strategy=, fit=)
HEADLINE = ("engine", "baseline_accuracy", "pruned_accuracy", "accuracy_drop", "sparsity_target",
            "sparsity_measured", "model_sparsity", "baseline_gzip_bytes", "pruned_gzip_bytes",
            "compression_ratio", "tflite_quant_gzip_bytes", "tflite_quant_compression_ratio",
            "wall_time_s")
ENGINES = ("keras", "tfmot")


@dataclasses.dataclass
class Config:
    engine: typing.Literal["keras", "tfmot"] = "keras"  # keras: Keras 3 alone, any backend;
    # tfmot: TensorFlow Model Optimization on tf_keras models, the reference
    model: typing.Literal["dense", "conv"] = "dense"  # the built-in model (or --model=FILE):
    # dense: Flatten-Dense(128)-Dense(64)-out; conv: the tfmot guide's MNIST model
    baseline_epochs: int | None = None  # epochs to train the baseline before pruning; default:
    # 10 for a built-in model, 0 for yours (taken as trained)
    epochs: int = 4  # fine-tuning epochs of the pruned copy (the pruning schedule runs in them)
    batch_size: int = 64  # examples per training step
    learning_rate: float = 1e-3  # Adam learning rate of the baseline
    finetune_learning_rate: float = 1e-3  # Adam learning rate while pruning
    schedule: typing.Literal["polynomial", "constant"] = "polynomial"  # polynomial: initial ->
    # final sparsity; constant: final from begin_step
    initial_sparsity: float = 0.5  # sparsity at begin_step (polynomial schedule)
    final_sparsity: float = 0.8  # target fraction of zeros in each pruned kernel
    begin_step: int = 0  # fine-tuning step where pruning starts
    end_step: int | None = None  # step where the target is reached; default: the last step
    frequency: int | None = None  # prune every N steps; default: about 10 times in the span
    block_size: tuple[int, ...] | None = None  # e.g. 1,4: prune 2-D kernels in blocks of this shape
    sparsity_m_by_n: tuple[int, ...] | None = None  # e.g. 2,4: m zeros in every n weights
    prune_layers: tuple[str, ...] | None = None  # names of layers to prune (default: every
    # prunable layer but the smallest, see --min_layer_share)
    min_layer_share: float = 0.01  # default layer choice: the smallest prunable layers, whose
    # weights add up to at most this share of the model's weight matrices, stay dense (they
    # save little and cost accuracy); 0 prunes every prunable layer
    clusters: int = 0  # tfmot: after pruning, share N values per kernel, zeros kept; 0: off
    sweep: tuple[float, ...] | None = None  # e.g. 0.5,0.7,0.8,0.9,0.95: also prune to each
    steps_per_epoch: int | None = None  # optional cap on training steps per epoch
    checkpoint_every_steps: int = 0  # Keras engine: also checkpoint every N steps (0: auto)
    scale_lr_with_replicas: bool = True  # multiply the learning rates by the replica count
    seed: int = 0  # initial weights and shuffling

    def __post_init__(self):
        for name in ("initial_sparsity", "final_sparsity"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {value}")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"--initial_sparsity ({self.initial_sparsity}) must not exceed "
                             f"--final_sparsity ({self.final_sparsity})")
        if self.sweep is not None and not all(0 < s < 1 for s in self.sweep):
            raise ValueError(f"--sweep values must be sparsities in (0, 1), got {self.sweep}")
        if (self.baseline_epochs is not None and self.baseline_epochs < 0) or self.epochs < 1 \
                or self.batch_size < 1:
            raise ValueError("--epochs and --batch_size must be >= 1, --baseline_epochs >= 0")
        if self.learning_rate <= 0 or self.finetune_learning_rate <= 0:
            raise ValueError("--learning_rate and --finetune_learning_rate must be > 0")
        if self.begin_step < 0 or (self.end_step is not None and self.end_step <= self.begin_step):
            raise ValueError(f"--end_step must be after --begin_step (>= 0), got "
                             f"{self.begin_step}..{self.end_step}")
        if self.clusters < 0 or self.clusters == 1:
            raise ValueError(f"--clusters must be 0 (off) or >= 2, got {self.clusters}")
        if self.clusters and self.engine != "tfmot":
            raise ValueError("--clusters is tfmot's sparsity-preserving clustering: add "
                             "--engine=tfmot")
        if self.frequency is not None and self.frequency < 1:
            raise ValueError(f"--frequency must be >= 1, got {self.frequency}")
        if not 0 <= self.min_layer_share < 1:
            raise ValueError(f"--min_layer_share must be in [0, 1), got {self.min_layer_share}")
        if self.block_size is not None and (len(self.block_size) != 2 or min(self.block_size) < 1):
            raise ValueError(f"--block_size must be two positive integers like 1,4, "
                             f"got {','.join(map(str, self.block_size))}")
        if self.sparsity_m_by_n is not None:
            m_by_n = self.sparsity_m_by_n
            if len(m_by_n) != 2 or not 0 < m_by_n[0] < m_by_n[1]:
                raise ValueError(f"--sparsity_m_by_n must be m,n with 0 < m < n (m zeros in "
                                 f"every n weights), like 2,4; got {','.join(map(str, m_by_n))}")
            if self.block_size is not None or self.sweep is not None:
                raise ValueError("--sparsity_m_by_n fixes the sparsity at m/n: it cannot be "
                                 "combined with --block_size or --sweep")


# --- the built-in models ----------------------------------------------------------------

def build_model(input_shape, num_classes, kind="dense", api=keras):
    """A classifier and its loss: logits for >2 classes, a sigmoid unit for 2.

    dense: Flatten -> Dense(128) -> Dense(64) -> output (the classic recipe);
    conv:  Conv2D(12, 3) -> MaxPool -> Flatten -> output (the tfmot guide's MNIST model).
    `api` is keras (Keras 3) or tf_keras (for the tfmot engine): the same model.
    """
    binary, layers = num_classes <= 2, api.layers
    if kind == "dense":
        body = [layers.Flatten(name="flatten"),
                layers.Dense(128, activation="relu", name="dense_128"),
                layers.Dense(64, activation="relu", name="dense_64")]
    else:
        body = [layers.Conv2D(12, 3, activation="relu", name="conv"),
                layers.MaxPooling2D(2, name="pool"), layers.Flatten(name="flatten")]
    head = (layers.Dense(1, activation="sigmoid", name="output") if binary
            else layers.Dense(num_classes, name="output"))
    model = api.Sequential([api.Input(shape=input_shape), *body, head], name=kind)
    loss = (api.losses.BinaryCrossentropy() if binary
            else api.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, loss



class PruningLog(keras.callbacks.Callback):
    """Each pruned layer's sparsity and threshold (its smallest kept |weight|, over all
    the weights it prunes), per epoch into TensorBoard (`<layer>/sparsity`,
    `<layer>/threshold`): the last epoch's are the final values. Weights are read at
    epoch ends, where every backend has them."""

    def __init__(self, log_dir, layer_names):
        super().__init__()
        self.log_dir, self.layer_names = log_dir, layer_names

    def on_epoch_end(self, epoch, logs=None):
        step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        points = []
        for layer in prune.all_layers(self.model):
            if layer.name in self.layer_names:
                values = np.concatenate([np.abs(ops.convert_to_numpy(w)).ravel()
                                         for w in prune.prunable_weights(layer)])
                kept = values[values > 0]
                points += [(step, scalar_pb(f"{layer.name}/sparsity", np.mean(values == 0))),
                           (step, scalar_pb(f"{layer.name}/threshold",
                                            kept.min() if kept.size else 0.0))]
        write_events(self.log_dir, points)


# --- both engines: train, prune, measure, export -----------------------------------------

def _tensorflow():
    """TensorFlow if it imports (TensorBoard logs, TFLite), else None: JAX needs none."""
    try:
        import tensorflow as tf
        return tf
    except ImportError:
        return None


def api_of(model):
    """keras for a Keras 3 model, tf_keras for a tf_keras one: their callbacks differ."""
    return tfmot_modules()[0] if type(model).__module__.startswith("tf_keras") else keras


def train(model, data, epochs, batch_size, steps_per_epoch, seed, callbacks=(), fit=None,
          checkpoint_dir=None, every_steps=0):
    """fit on in-memory arrays; FloatingPointError when the loss is not finite.

    `model` is compiled (Keras 3 or tf_keras alike). With checkpoint_dir (Keras 3
    models), checkpoints go there (each epoch, every `every_steps` steps, on SIGTERM)
    and one a stopped run left is continued at its step, its optimizer state (the
    pruning schedule's step) included; epoch e reads the examples in the order
    permuted by (seed, e), so a resumed epoch reads the batches it had not reached.
    """
    (x_train, y_train), (x_val, y_val) = data
    if steps_per_epoch is not None:  # the cap: the first steps x batch examples, each epoch
        # (fit's own steps_per_epoch reads arrays on across epochs and runs out of data)
        x_train, y_train = x_train[:steps_per_epoch * batch_size], y_train[:steps_per_epoch
                                                                           * batch_size]
    fit = fit or type(model).fit
    callbacks = [api_of(model).callbacks.TerminateOnNaN(), *callbacks]
    saved = {"epochs_done": 0, "logs": {}}
    if checkpoint_dir is None:  # tf_keras (tfmot): fit's own shuffle, no resume
        history = fit(model, x_train, y_train, batch_size=batch_size, epochs=epochs,
                      validation_data=(x_val, y_val), shuffle=True, verbose=2,
                      callbacks=callbacks)
    else:
        steps = math.ceil(len(x_train) / batch_size)  # the last batch short
        checkpoint, saved = latest_checkpoint(checkpoint_dir)
        if checkpoint:
            print(f"Resuming at {position(saved['epochs_done'], saved['step'], steps)} from "
                  f"{checkpoint}")
            restore(model, checkpoint)

        def data_at(epoch, step):
            order = np.random.default_rng([seed, epoch]).permutation(len(x_train))
            order = order[step * batch_size:]
            return {"x": x_train[order], "y": y_train[order], "batch_size": batch_size}

        history = fit_from(fit, model, data_at, epochs, steps, saved, per_epoch=True,
                           validation_data=(x_val, y_val), shuffle=False, verbose=2,
                           callbacks=[*callbacks, EpochCheckpoint(  # last: after TensorBoard
                               checkpoint_dir, every_steps=every_steps)])
    final_loss = final_logs(history, saved)["loss"]
    if not np.isfinite(final_loss) or len(history.history.get("loss", [])) < epochs - saved[
            "epochs_done"]:
        raise FloatingPointError(f"training loss became {final_loss}; lower --learning_rate "
                                 "or --finetune_learning_rate")
    return history


def accuracy(model, x, y, batch_size=512):
    """Fraction of correct predictions (argmax of the outputs, or sigmoid > 0.5)."""
    out = np.asarray(model.predict(x, batch_size=batch_size, verbose=0))
    predicted = (out[:, 0] > 0.5).astype(np.int64) if out.shape[-1] == 1 else out.argmax(-1)
    return float(np.mean(predicted == np.asarray(y).astype(np.int64)))


def export_tflite(model, run_dir, x_check):
    """pruned.tflite and pruned_quant.tflite (TensorFlow backend): their gzip sizes and
    reload checks (float: outputs within 1e-4; int8: the same predicted classes). An
    export that cannot be made or checked is `<name>_error`, one line, not raised: what
    was made is kept."""
    expected = np.asarray(model.predict(x_check, verbose=0))
    out = {}
    for name, quantize in (("tflite", False), ("tflite_quant", True)):
        try:
            flatbuffer = to_tflite(model, quantize)
        except Exception as e:  # noqa: BLE001 -- an op TFLite lacks, say: reported
            out[f"{name}_error"] = f"not made: {named_line(e, 300)}"
            continue
        write_atomically(os.path.join(run_dir, f"pruned{'_quant' if quantize else ''}.tflite"),
                         lambda partial: write_bytes(partial, flatbuffer))
        out[f"{name}_gzip_bytes"] = gzip_bytes(flatbuffer)
        try:
            got = tflite_predict(flatbuffer, x_check)
        except Exception as e:  # noqa: BLE001
            out[f"{name}_reload_matches"] = False
            out[f"{name}_error"] = f"made, but its check failed: {named_line(e, 300)}"
            continue
        out[f"{name}_reload_matches"] = bool(
            np.allclose(got, expected, atol=1e-4) if not quantize else
            np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.98 if got.shape[-1] > 1 else
            np.mean((got[:, 0] > 0.5) == (expected[:, 0] > 0.5)) >= 0.98)
    return out


def keras_int8(model, run_dir, x_val, y_val):
    """Keras' own model.quantize("int8") of a copy: accuracy, gzip size, reload check,
    and the layers it left in float (it quantizes Dense, EinsumDense and Embedding).
    Where it cannot be made or checked: `keras_int8_error`, one line, not raised."""
    copy = prune.strip_pruning(model)
    path = os.path.join(run_dir, "pruned_int8.keras")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            copy.quantize("int8")
        write_atomically(path, copy.save)
    except Exception as e:  # noqa: BLE001
        return {"keras_int8_error": f"not made: {named_line(e, 300)}"}
    out = {"keras_int8_gzip_bytes": gzip_bytes(path),
           "keras_int8_unquantized_layers": ", ".join(left_in_float(copy)) or "none"}
    try:
        out["keras_int8_reload_matches"] = predictions_match(
            copy, keras.models.load_model(path, compile=False), x_val[:256])[0]
        out["keras_int8_accuracy"] = accuracy(copy, x_val, y_val)
    except Exception as e:  # noqa: BLE001
        out.update(keras_int8_reload_matches=False,
                   keras_int8_error=f"made, but its check failed: {named_line(e, 300)}")
    return out


def pruning_steps(config, n_train, replicas=1):
    """(steps per epoch, end_step, frequency) of the fine-tuning; ValueError if they clash.
    Each step takes batch_size examples per replica."""
    steps = math.ceil(n_train / (config.batch_size * replicas))  # one pass, the last batch short
    steps = min(steps, config.steps_per_epoch or steps)
    end_step = config.end_step or steps * config.epochs
    if end_step <= config.begin_step:
        raise ValueError(f"--begin_step ({config.begin_step}) must be before the end of "
                         f"pruning (step {end_step}); lower it or raise --epochs")
    frequency = config.frequency or prune.default_frequency(config.begin_step, end_step)
    if config.schedule == "polynomial" and (end_step - config.begin_step) % frequency:
        raise ValueError(f"--end_step - --begin_step ({end_step - config.begin_step}) must be a "
                         f"multiple of --frequency ({frequency}), or the final sparsity is "
                         "never applied")
    return steps, end_step, frequency


def prune_and_finetune(baseline, loss, data, config, final_sparsity, log_dir, strategy=None,
                       fit=None, checkpoint_dir=None):
    """Prunes a copy of `baseline` to `final_sparsity` with the configured engine,
    fine-tunes and strips it; returns the stripped model and its measurements.

    Keras engine: under `strategy` (see run()), checkpointed in checkpoint_dir."""
    (x_train, _), (x_val, y_val) = data
    replicas = replica_count(strategy)
    steps, end_step, frequency = pruning_steps(config, len(x_train), replicas)
    lr_scale = replicas if config.scale_lr_with_replicas else 1
    schedule = prune.Schedule(config.schedule, min(config.initial_sparsity, final_sparsity),
                              final_sparsity, config.begin_step, end_step, frequency)
    names, left_dense = prune.choose_layers(baseline, config.prune_layers,
                                            config.min_layer_share, config.sparsity_m_by_n,
                                            config.block_size)
    tf = _tensorflow()
    if config.engine == "keras":
        with distribution_scope(strategy):
            model, _ = prune.prune_model(baseline, schedule, keras.optimizers.Adam(
                config.finetune_learning_rate * lr_scale), loss, ["accuracy"], names,
                config.block_size, config.sparsity_m_by_n)
        callbacks = [PruningLog(os.path.join(log_dir, "metrics"), names)]
        if tf is not None:
            callbacks.append(keras.callbacks.TensorBoard(log_dir=log_dir))
    else:
        tf_keras, tfmot = tfmot_modules()
        model, refused = tfmot_prune_model(baseline, schedule, names, config.block_size,
                                           config.sparsity_m_by_n)
        shares = prune.weight_shares(baseline)
        left_dense.update({name: (shares.get(name, 0.0), why) for name, why in refused.items()})
        names = [n for n in names if n not in refused]
        model.compile(optimizer=tf_keras.optimizers.Adam(config.finetune_learning_rate),
                      loss=loss, metrics=["accuracy"])
        callbacks = [tfmot.sparsity.keras.UpdatePruningStep(),
                     tfmot.sparsity.keras.PruningSummaries(log_dir=log_dir)]
    print(prune.dense_summary(left_dense))  # one line, however many layers
    if not names:
        raise ValueError("no layer was pruned: check --prune_layers, --min_layer_share and the "
                         "layers left dense above")
    amount = (f"{config.sparsity_m_by_n[0]}:{config.sparsity_m_by_n[1]}" if config.sparsity_m_by_n
              else f"{final_sparsity:.0%}")
    which = (", ".join(names) if len(names) <= 8
             else f"{len(names)} layers ({names[0]} ... {names[-1]})")
    print(f"pruning {which} to {amount} with the {config.engine} engine "
          f"({config.schedule}, steps {config.begin_step}..{end_step} every {frequency})")
    with distribution_scope(strategy):
        train(model, data, config.epochs, config.batch_size * replicas, steps, config.seed,
              callbacks, fit, checkpoint_dir if config.engine == "keras" else None,
              config.checkpoint_every_steps)
    if config.engine == "keras":
        stripped = prune.strip_pruning(model)
    else:
        tfmot_log_final_sparsity(os.path.join(log_dir, "metrics"), model,
                                 int(model.optimizer.iterations.numpy()))
        stripped = tfmot.sparsity.keras.strip_pruning(model)
        if config.clusters:
            print(f"clustering {', '.join(names)} to {config.clusters} shared values "
                  "(zeros kept), 1 epoch")
            clustered = tfmot_cluster(stripped, names, config.clusters)
            clustered.compile(optimizer=tf_keras.optimizers.Adam(
                config.finetune_learning_rate / 10), loss=loss, metrics=["accuracy"])
            train(clustered, data, 1, config.batch_size, steps, config.seed)
            stripped = tfmot.clustering.keras.strip_clustering(clustered)
    per_layer, measured, model_sparsity = prune.measure_sparsity(stripped, names)
    return {"model": stripped, "accuracy": accuracy(stripped, x_val, y_val),
            "per_layer": per_layer, "sparsity_measured": measured,
            "model_sparsity": model_sparsity, "left_dense": left_dense,
            "end_step": end_step, "frequency": frequency,
            "steps_trained": int(ops.convert_to_numpy(model.optimizer.iterations))}


# --- the run -----------------------------------------------------------------------------

def check(config, data, model=None, strategy=None):
    """ValueError (one line) for input that cannot run: the engine and the model, the
    engine and the strategy, the layer names, the pruning span."""
    (x_train, _), _ = data
    if strategy is not None and config.engine == "tfmot":
        raise ValueError("--engine=tfmot trains on one device: --strategy="
                         f"{strategy_name(strategy)} needs --engine=keras (the default)")
    if model is not None and config.engine == "tfmot":
        raise ValueError("--engine=tfmot prunes tf_keras (Keras 2) models only, and --model is "
                         "a Keras 3 model: use --engine=keras (the default)")
    if config.engine == "tfmot":
        tfmot_modules()  # its ImportError, as one line
    if isinstance(model, keras.Model):
        classifier_loss(model, num_classes_of(data))
        reference = model
    else:
        reference = build_model(np.shape(x_train)[1:], num_classes_of(data), config.model)[0]
    names = [layer.name for layer in prune.all_layers(reference)]
    unknown = sorted(set(config.prune_layers or ()) - set(names))
    if unknown:
        raise ValueError(f"--prune_layers: no layer named {', '.join(unknown)}; "
                         f"the model has {', '.join(names)}")
    pruning_steps(config, len(x_train), replica_count(strategy))


def strategy_name(strategy):
    kind = type(strategy).__name__
    return {"MirroredStrategy": "mirrored", "MultiWorkerMirroredStrategy": "multi_worker",
            "DataParallel": "data_parallel"}.get(kind, kind)


def why_not_resumable(config):
    """Why --resume cannot continue a run of this Config, or None when it can."""
    if config.engine == "tfmot":
        return "--engine=tfmot keeps no per-epoch checkpoint (the Keras engine does)"
    return None


def baseline_model(config, data, model, replicas=1):
    """(the model to prune, its loss, how many epochs to train it first, its description)."""
    (x_train, _), _ = data
    shape, classes = x_train.shape[1:], num_classes_of(data)
    learning_rate = config.learning_rate * (replicas if config.scale_lr_with_replicas else 1)
    if model is None:
        api = tfmot_modules()[0] if config.engine == "tfmot" else keras
        built, loss = build_model(shape, classes, config.model, api)
        built.compile(optimizer=api.optimizers.Adam(learning_rate), loss=loss,
                      metrics=["accuracy"])
        epochs = 10 if config.baseline_epochs is None else config.baseline_epochs
        return built, loss, epochs, f"{config.model} model"
    user = model if isinstance(model, keras.Model) else model(shape, classes)
    loss, metrics, why = classifier_loss(user, classes)
    copy = fresh_model(user, shape, classes)
    copy.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=metrics,
                 **users_settings(copy))
    print(f"your model, {user.count_params():,} weights; loss: {why}")
    return copy, loss, config.baseline_epochs or 0, "your model"


def log_sweep(log_dir, rows):
    """One TensorBoard run whose x axis is the target sparsity in percent."""
    write_events(log_dir, [
        (round(100 * target), scalar_pb(f"sweep/{tag}", row[key]))
        for target, row in rows.items()
        for tag, key in (("pruned_accuracy", "accuracy"), ("gzip_bytes", "gzip_bytes"),
                         ("sparsity_measured", "sparsity_measured"))])


def log_tensorboard(run_dir, engine, baseline_accuracy, baseline_gzip, rows, table):
    """HParams: the baseline and each pruned sparsity, one trial each; the printed tables
    as the Text summary."""
    trials = {"baseline": ({"sparsity": 0.0, "engine": engine},
                           {"accuracy": baseline_accuracy, "gzip_bytes": baseline_gzip})}
    for target, row in rows.items():
        trials[f"sparsity_{round(100 * target)}"] = (
            {"sparsity": float(target), "engine": engine},
            {"accuracy": row["accuracy"], "gzip_bytes": row["gzip_bytes"]})
    log_hparams_trials(os.path.join(run_dir, "hparams"), "prune", trials)
    log_text_summary(run_dir, table)


def format_table(m, per_layer, targets, suffix):
    lines = [f"{'':<24} {'baseline':>10} {'pruned':>10}   ({m['engine']} engine)",
             f"{'accuracy':<24} {m['baseline_accuracy']:>10.4f} {m['pruned_accuracy']:>10.4f}"
             f"   drop {100 * m['accuracy_drop']:.2f} points",
             f"{'sparsity':<24} {0.0:>10.3f} {m['sparsity_measured']:>10.3f}"
             f"   target {m['sparsity_target']:.3f}; all weight matrices "
             f"{m['model_sparsity']:.3f}",
             f"{suffix + ' gzip bytes':<24} {m['baseline_gzip_bytes']:>10,} "
             f"{m['pruned_gzip_bytes']:>10,}   {m['compression_ratio']:.2f}x smaller"]
    for key, label in (("reload", f"{suffix} reload"), ("tflite", "TFLite"),
                       ("tflite_quant", "TFLite int8"), ("keras_int8", "Keras int8")):
        if f"{key}_gzip_bytes" in m:
            note = ""
            if key == "tflite_quant":
                note = f"   {m['tflite_quant_compression_ratio']:.2f}x smaller than the baseline"
            elif key == "keras_int8":
                note = (f"   accuracy {m.get('keras_int8_accuracy', float('nan')):.4f}; left in "
                        f"float: {m['keras_int8_unquantized_layers']}")
            lines.append(f"{label + ' gzip bytes':<24} {'':>10} {m[f'{key}_gzip_bytes']:>10,}"
                         + note)
        if f"{key}_error" in m:
            lines.append(f"{label + ':':<24} {m[f'{key}_error']}")
    lines.append("per-layer kernel sparsity: " + ", ".join(
        f"{name} {value:.3f} (target {targets[name]:.3f})" for name, value in per_layer.items()))
    lines.append(f"{'layers left dense':<24} {'':>10} {m['layers_left_dense']:>10}   "
                 f"{100 * m['left_dense_weight_share']:.2g}% of the weight matrices (named above)")
    return "\n".join(lines)


def run(config, run_dir, data, strategy=None, fit=None, model=None):
    """Trains (or takes) a baseline, prunes a copy, exports both; returns flat metrics.

    strategy (Keras engine): a tf.distribute strategy, a keras.distribution
    (DataParallel on JAX) or None for one device; --batch_size is then per
    replica. fit: called like keras.Model.fit(model, ...), its default (the CLI
    passes a strategy.run loop for multi_worker). Checkpoints a killed run left
    in run_dir are continued: the baseline's, the fine-tune's, the sweep's.

    model: None for the built-in config.model, your keras.Model (taken as trained
    unless --baseline_epochs; a copy is pruned, yours is never changed) or a
    builder fn(input_shape, num_classes).
    """
    start = time.perf_counter()
    check(config, data, model, strategy)
    keras.utils.set_random_seed(config.seed)
    if config.engine == "tfmot":
        tfmot_modules()[0].utils.set_random_seed(config.seed)
    os.makedirs(run_dir, exist_ok=True)
    (x_train, _), (x_val, y_val) = data
    replicas = replica_count(strategy)
    with distribution_scope(strategy):
        baseline, loss, baseline_epochs, what = baseline_model(config, data, model, replicas)
    steps, _, _ = pruning_steps(config, len(x_train), replicas)
    print(f"== baseline: {what}, {baseline.count_params():,} weights, {baseline_epochs} epoch(s) "
          f"of training first; batch {config.batch_size} x {replicas} replica(s) ==")
    checkpoints = os.path.join(run_dir, "checkpoints")
    keras_engine = config.engine == "keras"
    if baseline_epochs:
        tensorboard = ([] if _tensorflow() is None else [api_of(baseline).callbacks.TensorBoard(
            log_dir=os.path.join(run_dir, "baseline"))])
        with distribution_scope(strategy):
            train(baseline, data, baseline_epochs, config.batch_size * replicas, steps,
                  config.seed, tensorboard, fit,
                  os.path.join(checkpoints, "baseline") if keras_engine else None,
                  config.checkpoint_every_steps)
    suffix = ".h5" if config.engine == "tfmot" else ".keras"
    baseline_accuracy = accuracy(baseline, x_val, y_val)
    baseline_gzip = save_model(baseline, os.path.join(run_dir, f"baseline{suffix}"))

    print(f"\n== pruning to {config.final_sparsity:.0%} ==")
    result = prune_and_finetune(baseline, loss, data, config, config.final_sparsity,
                                os.path.join(run_dir, "pruned"), strategy, fit,
                                os.path.join(checkpoints, "pruned"))
    stripped = result["model"]
    pruned_path = os.path.join(run_dir, f"pruned{suffix}")
    pruned_gzip = save_model(stripped, pruned_path)
    try:
        reload_ok, reload_diff = predictions_match(stripped, load_model(pruned_path),
                                                   x_val[:256])
        reloaded = {"reload_matches": reload_ok, "reload_max_abs_diff": reload_diff}
        if not reload_ok:
            print(f"warning: the reloaded pruned{suffix} differs from the model in memory by "
                  f"{reload_diff}")
    except Exception as e:  # noqa: BLE001 -- a custom layer Keras cannot rebuild, say
        reloaded = {"reload_matches": False, "reload_error": f"not checked: {named_line(e, 300)}"}
    target = (config.sparsity_m_by_n[0] / config.sparsity_m_by_n[1] if config.sparsity_m_by_n
              else config.final_sparsity)
    metrics = {
        "engine": config.engine, "backend": keras.backend.backend(),
        "baseline_accuracy": baseline_accuracy, "pruned_accuracy": result["accuracy"],
        "accuracy_drop": baseline_accuracy - result["accuracy"],
        "sparsity_target": target, "sparsity_measured": result["sparsity_measured"],
        "model_sparsity": result["model_sparsity"],
        "baseline_gzip_bytes": baseline_gzip, "pruned_gzip_bytes": pruned_gzip,
        "compression_ratio": baseline_gzip / pruned_gzip,
        **reloaded, "layers_pruned": len(result["per_layer"]),
        "layers_left_dense": len(result["left_dense"]),
        "left_dense_weight_share": sum(share for share, _ in result["left_dense"].values()),
        "pruning_end_step": result["end_step"], "pruning_frequency": result["frequency"],
        "clusters": config.clusters, "model_params": baseline.count_params(),
        "replicas": replicas, "finetune_steps": result["steps_trained"],
    }
    metrics.update({f"sparsity_{name}": value for name, value in result["per_layer"].items()})
    if keras.backend.backend() == "tensorflow" or config.engine == "tfmot":
        metrics.update(export_tflite(stripped, run_dir, x_val[:64]))
        if "tflite_quant_gzip_bytes" in metrics:
            metrics["tflite_quant_compression_ratio"] = (baseline_gzip
                                                         / metrics["tflite_quant_gzip_bytes"])
    if config.engine == "keras":
        metrics.update(keras_int8(stripped, run_dir, x_val, y_val))
    write_events(os.path.join(run_dir, "summary"), [
        (0, scalar_pb(f"summary/{key}", metrics[key])) for key in (
            "baseline_accuracy", "pruned_accuracy", "sparsity_measured", "baseline_gzip_bytes",
            "pruned_gzip_bytes", "tflite_quant_gzip_bytes") if key in metrics])
    table = format_table(metrics, result["per_layer"],
                         {name: target for name in result["per_layer"]}, suffix)
    print("\n" + table)
    trials = {target: {**result, "gzip_bytes": pruned_gzip}}  # HParams: the sweep's too
    if config.sweep:
        rows = {}
        for target in config.sweep:
            if math.isclose(target, config.final_sparsity) and config.sparsity_m_by_n is None:
                rows[target] = {**result, "gzip_bytes": pruned_gzip}
                continue
            print(f"\n== sweep: pruning to {target:.0%} ==")
            row = prune_and_finetune(baseline, loss, data, config, target,
                                     os.path.join(run_dir, f"sweep_{round(100 * target)}"),
                                     strategy, fit, os.path.join(
                                         checkpoints, f"sweep_{round(100 * target)}"))
            row["gzip_bytes"] = save_model(row["model"], os.path.join(
                run_dir, f"sweep_{round(100 * target)}{suffix}"))
            rows[target] = row
        log_sweep(os.path.join(run_dir, "sweep"), rows)
        sweep_table = [f"{'target':>7} {'measured':>9} {'accuracy':>9} {'drop pts':>9} "
                       f"{'gzip bytes':>11} {'ratio':>6}"]
        for target, row in rows.items():
            sweep_table.append(
                f"{target:>7.2f} {row['sparsity_measured']:>9.3f} {row['accuracy']:>9.4f} "
                f"{100 * (baseline_accuracy - row['accuracy']):>9.2f} "
                f"{row['gzip_bytes']:>11,} {baseline_gzip / row['gzip_bytes']:>6.2f}")
            key = round(100 * target)
            metrics[f"sweep_accuracy_s{key}"] = row["accuracy"]
            metrics[f"sweep_gzip_bytes_s{key}"] = row["gzip_bytes"]
            metrics[f"sweep_sparsity_measured_s{key}"] = row["sparsity_measured"]
        print("\n" + "\n".join(sweep_table))
        table += "\n\nsweep:\n" + "\n".join(sweep_table)
        trials.update(rows)
    log_tensorboard(run_dir, config.engine, baseline_accuracy, baseline_gzip, trials, table)
    metrics["wall_time_s"] = time.perf_counter() - start
    return metrics
