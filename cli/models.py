"""--model=PATH: a user's saved Keras model, loaded once and checked, for every recipe.

Recipes never open model files: main.py hands the loaded keras.Model to
run(..., model=), and the recipe trains clones of it. Loading uses Keras'
safe mode, which refuses a file that would run arbitrary Python (a Lambda
layer): --trust_model lifts that for a file the user trusts. Custom layers load
when --model_code names the Python file that registers them
(@keras.saving.register_keras_serializable). Every problem is one UsageError line.
"""
import importlib.util
import json
import os
import warnings
import zipfile

from cli import UsageError

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def import_model_code(path):
    """Runs the user's --model_code file, so the classes it registers exist for loading."""
    if not os.path.isfile(path):
        raise UsageError(f"--model_code={path} does not exist")
    spec = importlib.util.spec_from_file_location("user_model_code", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise UsageError(f"--model_code={path} failed to import: {type(e).__name__}: "
                         f"{_first_line(e)}") from None


def unregistered_classes(archive_path):
    """Names of the classes in a .keras file's config that neither Keras nor any
    registered custom code provides."""
    import keras

    with zipfile.ZipFile(archive_path) as archive:
        config = json.loads(archive.read("config.json"))
    missing, stack = set(), [config]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
            name, module = node.get("class_name"), node.get("module")
            if (isinstance(name, str) and not name.startswith("__")
                    and not (module or "").startswith("keras")):
                registered = node.get("registered_name") or name
                if keras.saving.get_registered_object(registered) is None:
                    missing.add(registered)
    return sorted(missing)


def check_file(path):
    """UsageError, one line, unless `path` looks like a whole saved Keras model."""
    if not os.path.isfile(path):
        raise UsageError(f"--model={path} does not exist (a saved .keras or .h5 model file)")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in KERAS_SUFFIXES:
        raise UsageError(f"--model={path}: not a saved Keras model (expected a .keras or .h5 "
                         "file, from model.save)")
    with open(path, "rb") as f:
        head = f.read(8)
    if suffix == ".keras":
        if not head.startswith(b"PK"):
            raise UsageError(f"--model={path} is not a Keras model: a .keras file is a zip "
                             "archive written by model.save")
        try:
            with zipfile.ZipFile(path) as archive:
                if "config.json" not in archive.namelist():
                    raise UsageError(f"--model={path} is a zip archive but not a Keras model "
                                     "(it has no config.json)")
                bad = archive.testzip()
        except zipfile.BadZipFile:
            bad = path
        if bad is not None:
            raise UsageError(f"--model={path} is truncated or damaged (a partial copy or "
                             "download?): save or copy it again")
    elif not head.startswith(b"\x89HDF"):
        raise UsageError(f"--model={path} is not a Keras .h5 model (not an HDF5 file)")


def load(path, trust=False, code=None):
    """The user's keras.Model from `path`, with its compiled loss when it was saved compiled."""
    import keras

    if code:
        import_model_code(code)
    check_file(path)
    if trust:  # the recipes clone the model, which deserializes its Lambda layers again
        keras.config.enable_unsafe_deserialization()
    if path.lower().endswith(".keras"):
        missing = unregistered_classes(path)
        if missing:
            raise UsageError(f"--model={path} uses the custom class(es) {', '.join(missing)}, "
                             "which nothing registered: pass --model_code=FILE.py, a Python file "
                             "that defines them with @keras.saving.register_keras_serializable")
    try:
        with warnings.catch_warnings():  # its saved optimizer state: the recipes train afresh
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model = keras.models.load_model(path, safe_mode=not trust)
    except Exception as e:
        if "safe_mode" in str(e):
            raise UsageError(f"--model={path} holds Python code (a Lambda layer), which Keras' "
                             "safe mode refuses to load because it can run anything: pass "
                             "--trust_model to load it anyway, if you trust where it came "
                             "from") from None
        raise UsageError(f"--model={path} could not be loaded: {type(e).__name__}: "
                         f"{_first_line(e)}") from None
    if not isinstance(model, keras.Model):
        raise UsageError(f"--model={path} holds a {type(model).__name__}, not a keras.Model")
    return model


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
