"""sfumato: local, offline text-to-image (latent diffusion), on CPU or GPU.

    import sfumato
    pipe = sfumato.load()                 # the built-in model; or a path to an SD checkpoint
    images = pipe.generate(prompt="a red star above a blue circle", seed=1)

Heavy libraries (torch, diffusers, transformers) are imported lazily so that `import sfumato`
and the CLI start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from sfumato.pipeline import Pipeline


def load(model: str | None = None, **kwargs: Any) -> Pipeline:
    """Load a model (None = the built-in one) and return a ready Pipeline."""
    from sfumato.pipeline import Pipeline

    return Pipeline.load(model, **kwargs)
