"""pytest fixtures; the helpers tests import live in helpers.py."""
import pytest

import helpers  # noqa: F401  (puts the repository on sys.path)


@pytest.fixture
def tiny_images():
    """((x_train, y_train), (x_val, y_val)): 60 + 20 generated 28x28 gray shapes."""
    from datasets import shapes
    return shapes.load(60, 20, image_size=28, channels=1, seed=0)


@pytest.fixture(scope="module")
def stream():
    """experiments/stream.py, imported only by the tests that use it (it loads TensorFlow)."""
    from experiments import stream
    return stream


@pytest.fixture(scope="module")
def stream_dropin():
    """recipes/stream.py, the drop-in file."""
    from recipes import stream
    return stream
