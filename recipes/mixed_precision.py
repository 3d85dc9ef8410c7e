"""Mixed precision for any Keras 3 model: the 16-bit policy this hardware is fast at, done safely.

Shows:  pick mixed_float16 (NVIDIA tensor cores), mixed_bfloat16 (a TPU; a bfloat16 CPU
        under TensorFlow for a conv net) or float32, and say why; rebuild a model, with
        its weights, so its layers compute in 16 bits while the weights and the output
        stay float32; check that the policy took (clear_session() silently drops it),
        that the output is float32 and that mixed_float16 scales the loss; stop at the
        first NaN/Inf loss, naming the step and policy. The global policy is restored.
Run:    python main.py --recipe=mixed_precision --compare   # measured against float32
Expect: 2 CPU cores with AVX512-BF16/AMX, TensorFlow: auto picks mixed_bfloat16, 2.66x
        float32's examples/s on the recipe's CNN, val_accuracy within 0.3 points over 5
        seeds; mixed_float16 there ~300x slower (no oneDNN float16 path). On JAX's CPU
        backend bfloat16 is slower, so auto keeps float32; on an NVIDIA GPU of compute
        capability 7.0+ it picks mixed_float16.
Copy:   this file alone, then
            policy, why = choose_policy(model=model)  # e.g. mixed_float16: GPU tensor cores
            fast = under_policy(model, policy)  # a copy with your weights; yours is unchanged
            fast.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
            check_policy_applied(fast, policy)
            check_loss_scaling(fast, policy)  # compile wrapped the optimizer for mixed_float16
            guard = PolicyGuard(policy)
            fast.fit(x, y, epochs=2, validation_data=(x_val, y_val), callbacks=[guard])
            check_output_float32(fast, x_val)
        guard.bad names the step and policy where the loss went NaN (fit stopped there);
        loss_scale(fast) is the current loss scale (None without loss scaling).
"""
import contextlib
import functools

import keras
import numpy as np


# --- which policy this hardware is fast at -------------------------------------

def cpu_flags():
    """The CPU feature flags from /proc/cpuinfo (x86 Linux); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def accelerators():
    """[(kind, compute capability or None)] of the accelerators the backend sees."""
    backend = keras.backend.backend()
    found = []
    if backend == "tensorflow":
        import tensorflow as tf
        for gpu in tf.config.list_physical_devices("GPU"):
            cc = tf.config.experimental.get_device_details(gpu).get("compute_capability")
            found.append(("gpu", float(f"{cc[0]}.{cc[1]}") if cc else None))
        found += [("tpu", None) for _ in tf.config.list_logical_devices("TPU")]
    elif backend == "jax":
        import jax
        for device in jax.devices():
            if device.platform == "gpu":
                cc = getattr(device, "compute_capability", None)
                found.append(("gpu", float(cc) if cc else None))
            elif device.platform == "tpu":
                found.append(("tpu", None))
    elif backend == "torch":
        import torch
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            found.append(("gpu", major + minor / 10))
    return tuple(found)


def conv_share(model):
    """Fraction of the model's multiply-adds in convolutions (the rest: mostly dense)."""
    conv = dense = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            out = layer.output.shape
            kh, kw = layer.kernel_size
            conv += out[1] * out[2] * out[3] * kh * kw * layer.kernel.shape[2]
        elif isinstance(layer, keras.layers.Dense):
            dense += int(np.prod(layer.kernel.shape))
    return conv / (conv + dense) if conv + dense else 0.0


def choose_policy(devices=None, flags=None, backend=None, model=None):
    """(policy, reason): the fastest policy this hardware and backend run safely.

    mixed_float16 on NVIDIA GPUs of compute capability 7.0+ (tensor cores),
    mixed_bfloat16 on TPUs, and on CPUs with bfloat16 math (AVX512-BF16, AMX)
    under TensorFlow for convolution-heavy models (given `model`), where oneDNN
    uses it; float32 otherwise. Measured on CPU (benchmarks/mixed_precision.py):
    bfloat16 ran a conv net 2.7x faster but a dense MLP 0.7x; float16 ran
    100x+ slower (TensorFlow falls back from oneDNN to Eigen). On JAX's XLA CPU
    backend bfloat16 measured slower than float32 (conv 0.8x, MLP 0.5x), so
    auto keeps float32 there (--policy=mixed_bfloat16 still works).
    """
    devices = accelerators() if devices is None else devices
    flags = cpu_flags() if flags is None else flags
    backend = backend or keras.backend.backend()
    gpus = [cc for kind, cc in devices if kind == "gpu"]
    if any(kind == "tpu" for kind, _ in devices):
        return "mixed_bfloat16", "a TPU computes in bfloat16 natively"
    if gpus:
        cc = min(c or 0 for c in gpus)
        if cc >= 7.0:
            return "mixed_float16", f"NVIDIA GPU of compute capability {cc:g} has float16 tensor cores"
        return "float32", (f"GPU of compute capability {cc:g} (< 7.0) has no tensor cores; "
                           "16-bit math would not be faster")
    bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if bf16 and backend == "tensorflow":
        share = 1.0 if model is None else conv_share(model)
        if share < 0.5:
            return "float32", (f"CPU has {', '.join(bf16)} but the model is dense-heavy "
                               f"({share:.0%} of its math in convolutions): bfloat16 dense "
                               "layers measured slower than float32 on CPU")
        return "mixed_bfloat16", f"CPU has bfloat16 math ({', '.join(bf16)}) that oneDNN uses"
    if bf16:
        return "float32", (f"CPU has {', '.join(bf16)} but bfloat16 on the {backend} backend "
                           "measured slower than float32; no GPU found")
    return "float32", "no GPU and no bfloat16 CPU instructions: 16-bit math would be slower"


def fastest_16bit_policy(devices=None):
    """The 16-bit policy this hardware runs best, whether or not auto would pick it:
    mixed_float16 on an NVIDIA GPU, mixed_bfloat16 on a TPU or a CPU. What --compare
    measures against float32 when the chosen policy is float32 itself."""
    devices = accelerators() if devices is None else devices
    return "mixed_float16" if any(kind == "gpu" for kind, _ in devices) else "mixed_bfloat16"


@contextlib.contextmanager
def global_policy(name):
    """Sets the global dtype policy inside the block; restores the previous one after.

    Note: keras.utils.clear_session() resets the global policy to float32, so
    call it BEFORE setting a policy, never after.
    """
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


# --- a model under a policy -----------------------------------------------------

def under_policy(model, policy):
    """A copy of `model`, with its weights, whose layers compute in `policy` and whose
    output layer computes in float32 (so the loss is computed in float32).

    Each layer is re-created from its config with the policy as its dtype: a
    model's layers keep the dtype they were built with, whatever the global
    policy says later. The copy is made under global_policy(policy) (restored
    after), so the model itself has the policy too: compile reads it to add
    loss scaling for mixed_float16.
    """
    last = model.layers[-1]

    def recreate(layer):
        config = layer.get_config()
        config["dtype"] = "float32" if layer is last else policy
        return layer.__class__.from_config(config)

    with global_policy(policy):
        copy = keras.models.clone_model(model, clone_function=recreate)
    copy.set_weights(model.get_weights())
    return copy


# --- the checks -------------------------------------------------------------------

def check_policy_applied(model, policy):
    """Raises if the model's layers do not compute in `policy` (e.g. a lost global policy)."""
    expected = keras.dtype_policies.DTypePolicy(policy).compute_dtype
    got = {layer.dtype_policy.compute_dtype for layer in model.layers[:-1]
           if not isinstance(layer, keras.layers.InputLayer)}
    if got != {expected}:
        raise RuntimeError(f"model layers compute in {sorted(got)}, not {expected} of {policy}: "
                           "was keras.utils.clear_session() called after setting the policy?")


def check_output_float32(model, sample):
    """The model's output dtype (must be float32 so the loss is computed in float32)."""
    dtype = keras.backend.standardize_dtype(model(sample[:1]).dtype)
    if dtype != "float32":
        raise ValueError(f"model output is {dtype}; end the model with a float32 layer, e.g. "
                         "keras.layers.Activation('softmax', dtype='float32')")
    return dtype


def loss_scale(model):
    """The current dynamic loss scale if the optimizer scales the loss, else None."""
    if isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
        return float(keras.ops.convert_to_numpy(model.optimizer.dynamic_scale))
    return None


def check_loss_scaling(model, policy):
    """mixed_float16 needs loss scaling (Keras 3 adds it on compile): verify it."""
    scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    if policy == "mixed_float16" and not scaled:
        raise RuntimeError("mixed_float16 without loss scaling: small gradients underflow to "
                           "zero; compile under the policy or wrap the optimizer in "
                           "keras.optimizers.LossScaleOptimizer")
    return scaled


# --- the NaN guard ----------------------------------------------------------------

class PolicyGuard(keras.callbacks.Callback):
    """Stops at the first NaN/Inf loss, naming the step and policy in `bad`; logs the
    loss scale per epoch (as `loss_scale`, for a TensorBoard callback after it)."""

    def __init__(self, policy):
        super().__init__()
        self.policy, self.step, self.bad = policy, 0, None

    def on_train_batch_end(self, batch, logs=None):
        loss = float(keras.ops.convert_to_numpy((logs or {}).get("loss", 0.0)))
        self.step += 1
        if not np.isfinite(loss) and self.bad is None:
            self.bad = f"loss became {loss} at training step {self.step} under policy {self.policy}"
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        scale = loss_scale(self.model)
        if scale is not None and logs is not None:
            logs["loss_scale"] = scale  # the TensorBoard callback after this one logs it
