"""The tfmot engine of the prune experiment: TensorFlow Model Optimization's
prune_low_magnitude, the reference, beside recipes/prune.py's Keras 3 engine.

tfmot prunes only tf_keras (Keras 2) models. tf_keras and tfmot are imported only
when this engine runs, so the Keras engine works without either installed.
"""
import os

import numpy as np


def tfmot_modules():
    """(tf_keras, tensorflow_model_optimization), imported on first use.

    tfmot 0.8 prunes only tf_keras (Keras 2) models, and importing it sets
    TF_USE_LEGACY_KERAS=1 for the whole process, which flips what TensorFlow's
    keras alias means; it is put back, so the rest of the process keeps Keras 3.
    """
    previous = os.environ.get("TF_USE_LEGACY_KERAS")
    try:
        import tf_keras
        import tensorflow_model_optimization as tfmot
    except ImportError as e:
        raise ValueError(f"--engine=tfmot needs tf-keras and tensorflow-model-optimization "
                         f"({e}); --engine=keras needs neither") from None
    finally:
        if previous is None:
            os.environ.pop("TF_USE_LEGACY_KERAS", None)
        else:
            os.environ["TF_USE_LEGACY_KERAS"] = previous
    return tf_keras, tfmot


def tfmot_schedule(schedule):
    """The tfmot schedule object for a recipes.prune.Schedule."""
    sparsity = tfmot_modules()[1].sparsity.keras
    if schedule.kind == "constant":
        return sparsity.ConstantSparsity(schedule.final, begin_step=schedule.begin,
                                         end_step=schedule.end, frequency=schedule.frequency)
    return sparsity.PolynomialDecay(initial_sparsity=schedule.initial,
                                    final_sparsity=schedule.final, begin_step=schedule.begin,
                                    end_step=schedule.end, frequency=schedule.frequency)


def tfmot_prune_model(model, schedule, layer_names, block_size=None, sparsity_m_by_n=None):
    """Wraps a *copy* of tf_keras `model` in tfmot's prune_low_magnitude for the named layers.

    Returns (pruned copy, {layer: why tfmot left it dense}). tfmot's
    prune_low_magnitude(model) wraps the same layer objects, so fine-tuning
    would prune the original too: hence the clone.
    """
    tf_keras, tfmot = tfmot_modules()
    if not isinstance(model, tf_keras.Model):
        raise ValueError("--engine=tfmot prunes tf_keras (Keras 2) models only, and this is a "
                         "Keras 3 model: use --engine=keras (the default)")
    copy = tf_keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    params = {"pruning_schedule": tfmot_schedule(schedule)}
    if block_size is not None:
        params["block_size"] = tuple(block_size)
    if sparsity_m_by_n is not None:
        params["sparsity_m_by_n"] = tuple(sparsity_m_by_n)
    left_dense = {}

    def wrap(layer):
        if isinstance(layer, tf_keras.layers.InputLayer):
            return layer.__class__.from_config(layer.get_config())
        if layer.name not in layer_names:
            return layer
        try:
            return tfmot.sparsity.keras.prune_low_magnitude(layer, **params)
        except ValueError as e:  # a layer tfmot cannot wrap (Rescaling, RandomFlip, custom...)
            left_dense[layer.name] = f"tfmot cannot wrap {type(layer).__name__}: {str(e)[:60]}..."
            return layer

    return tf_keras.models.clone_model(copy, clone_function=wrap), left_dense


def tfmot_cluster(model, layer_names, clusters):
    """A copy of tf_keras `model` wrapped for sparsity-preserving weight clustering: each
    named kernel keeps its zeros and shares `clusters` values after strip_clustering."""
    tf_keras, tfmot = tfmot_modules()
    clustering = tfmot.clustering.keras
    copy = tf_keras.models.clone_model(model)
    copy.set_weights(model.get_weights())

    def wrap(layer):
        if layer.name not in layer_names:
            return layer
        return clustering.cluster_weights(
            layer, number_of_clusters=clusters, preserve_sparsity=True,
            cluster_centroids_init=clustering.CentroidInitialization.KMEANS_PLUS_PLUS)

    return tf_keras.models.clone_model(copy, clone_function=wrap)


def tfmot_log_final_sparsity(log_dir, pruned_model, step):
    """What PruningSummaries misses: it writes at epoch starts, never after the last step."""
    import tensorflow as tf  # tf.summary: its tags must match PruningSummaries' (same name rules)
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        for layer in pruned_model.layers:
            for _, mask, threshold in getattr(layer, "pruning_vars", ()):  # PruningSummaries' tags
                tf.summary.scalar(mask.name + "/sparsity", 1 - float(np.mean(mask.numpy())),
                                  step=step)
                tf.summary.scalar(threshold.name + "/threshold", float(threshold.numpy()),
                                  step=step)
    writer.close()
