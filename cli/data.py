"""--dataset / --data_dir -> the data a recipe's DATA declares, through datasets/."""


def load(command):
    """(dataset name, data) for the recipe; DataError (a UsageError's sibling) for bad data.

    A recipe's Config may override its DATA geometry (image_size, channels), and
    may declare DEFAULT_DATASET where its default is not `shapes`.
    """
    import datasets  # Deferred so --help stays instant.

    module, config, fv = command.module, command.config, command.values
    spec = dict(getattr(module, "DATA", {"form": "arrays"}))
    for key in ("image_size", "channels"):
        if hasattr(config, key):
            spec[key] = getattr(config, key)
    dataset = fv.dataset or ("directory" if fv.data_dir
                             else getattr(module, "DEFAULT_DATASET", "shapes"))
    return dataset, datasets.load(dataset, fv.data_dir, seed=fv.seed, **spec)
