import os
import tempfile

import pytest
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Property tests draw the same examples on every run (a red CI must be reproducible) and have no
# per-example deadline (CI machines are slow and shared).
settings.register_profile("sfumato", derandomize=True, deadline=None)
settings.load_profile("sfumato")
os.environ.setdefault("SFUMATO_CACHE", tempfile.mkdtemp(prefix="sfumato-test-cache-"))
# A developer's own server must not receive the tests' `generate` jobs (`generate --server`).
for name in ("SFUMATO_SERVER", "SFUMATO_API_KEY"):
    os.environ.pop(name, None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random SD1-shaped model as a diffusers folder (see tests/tiny.py)."""
    from tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-sd")
