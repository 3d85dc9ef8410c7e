"""The recipe registry: name -> (module, one-line summary).

Kept free of heavy imports so `python main.py --help` lists the recipes
without loading TensorFlow; main.py imports only the chosen module.
"""
RECIPES = {
    "batch": ("recipes.batch",
              "batch size vs throughput and accuracy: the same model swept over batch sizes"),
    "stream": ("recipes.stream",
               "image folders larger than memory: ImageDataGenerator vs tf.data, measured"),
    "mixed_precision": ("recipes.mixed_precision",
                        "mixed_float16 / mixed_bfloat16 policy, done safely, vs float32"),
    "transfer": ("recipes.transfer",
                 "VGG16 transfer learning: frozen base, cached features, fine-tuning"),
    "prune": ("recipes.prune",
              "tfmot magnitude pruning that really shrinks the saved model (gzip, TFLite)"),
    "device": ("recipes.device",
               "the same job on CPU and each GPU, with time, cost and a verdict"),
    "profile": ("recipes.tf_profile",
                "profiler trace, CPU/GPU utilization and memory, input-bound verdict"),
}
