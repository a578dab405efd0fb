"""sfumato: local, offline text-to-image (latent diffusion), on CPU or GPU.

    import sfumato
    pipe = sfumato.load()                 # the built-in model; or a path to an SD checkpoint
    images = pipe.generate(prompt="a red star above a blue circle", seed=1)

Heavy libraries (torch, diffusers, transformers) are imported lazily so that `import sfumato`
and the CLI start fast.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import TYPE_CHECKING, Any

# Idle OpenMP threads sleep instead of spinning. On a busy CPU (a laptop, a server also running
# other work) spinning threads wait on each other: measured here, a built-in-model UNet step went
# from 3.2 s to 0.05 s with this, and an SD1.5 image from 86 s to 47 s. It must be set before torch
# is first imported, hence here; the numbers computed are the same.
if "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ and sys.modules["torch"].get_num_threads() > 1:
    # Too late: OpenMP read its settings when torch was imported. Measured so, a built-in-model
    # image took 46 s instead of 0.76 s, with one of the 2 cores busy with other work.
    warnings.warn("torch was imported before sfumato, so its OpenMP threads spin while they wait: on a "
                  "CPU that is also busy with other work, generating can be many times slower. Import "
                  "sfumato first, or set OMP_WAIT_POLICY=PASSIVE in the environment", RuntimeWarning,
                  stacklevel=2)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

if TYPE_CHECKING:
    from sfumato.pipeline import Pipeline


def load(model: str | None = None, **kwargs: Any) -> Pipeline:
    """Load a model (None = the built-in one) and return a ready Pipeline."""
    from sfumato.pipeline import Pipeline

    return Pipeline.load(model, **kwargs)
