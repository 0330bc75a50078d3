"""Exception types. Every user-facing failure of the model core is one of these, with a message that names the
problem and the fix, so the CLI and the app can show it as-is."""


class Blip2Error(Exception):
    """Base class for the model core's user-facing errors."""


class CheckpointError(Blip2Error):
    """A checkpoint is missing, corrupt, of an unknown kind, or cannot be downloaded."""


class PrecisionError(Blip2Error):
    """The requested precision or device cannot be used on this machine."""


class PromptTooLongError(Blip2Error):
    """The prompt (with history and image queries) does not fit the language model's context."""
