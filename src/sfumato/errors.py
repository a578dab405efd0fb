"""User-facing errors. The CLI and the server show their message, never a traceback."""


class SfumatoError(ValueError):
    """A problem the user can fix; the message says what is wrong and what is allowed."""


class ParamError(SfumatoError):
    """A generation parameter is out of range or unknown."""


class CheckpointError(SfumatoError):
    """A model file is unreadable, unknown, truncated or an unsafe pickle."""


class LoraError(SfumatoError):
    """A LoRA file is unreadable, of an unsupported format, or matches nothing in the model."""


class Interrupted(Exception):
    """Raised from a progress callback to stop a generation early."""
