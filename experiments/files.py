"""Files written whole or not at all: what every experiment writes goes through here."""
import json
import os
import time


def write_atomically(path, write):
    """Calls write(temporary path) in `path`'s folder, then renames it to `path`.

    A crash or kill never leaves a half-written file under the final name. The
    temporary name keeps the extension, from which Keras and h5py pick the format.
    """
    folder, name = os.path.split(os.fspath(path))
    stem, ext = os.path.splitext(name)
    # Not created beforehand (as mkstemp would, private), so the file gets the usual mode.
    partial = os.path.join(folder, f".{stem}.partial-{os.getpid()}-{time.monotonic_ns()}{ext}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def save_json(path, payload):
    """payload as JSON at path, written atomically."""
    def dump(partial):
        with open(partial, "w") as f:
            json.dump(payload, f)
    return write_atomically(path, dump)
