import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SFUMATO_CACHE", tempfile.mkdtemp(prefix="sfumato-test-cache-"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random SD1-shaped model as a diffusers folder (see tests/tiny.py)."""
    from tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-sd")
