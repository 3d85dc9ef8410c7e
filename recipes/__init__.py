"""The recipe registry: name -> (module, one-line summary).

Kept free of heavy imports so `python main.py --help` lists the recipes
without loading TensorFlow; main.py imports only the chosen module.
"""
RECIPES = {
    "batch": ("recipes.batch",
              "batch size vs throughput and accuracy: the same model swept over batch sizes"),
}
