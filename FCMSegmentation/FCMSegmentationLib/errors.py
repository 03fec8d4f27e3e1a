"""User-facing error types.

Every error the engine raises on purpose derives from :class:`FCMError`; its message is one line that
says what is wrong and what to do about it. The CLI prints it as ``error: <message>`` and exits 2; the
Slicer module shows it in a dialog. Anything else escaping the engine is a bug.
"""


class FCMError(Exception):
    """Base class: a problem the user can fix; ``str(err)`` is the actionable message."""


class InputError(FCMError):
    """An input image, label map or argument is unusable."""


class ModelError(FCMError):
    """A model file is missing, corrupt or incompatible."""


class OutputError(FCMError):
    """A result cannot be written where asked."""


class Cancelled(FCMError):
    """The user cancelled a long-running operation; state is as before the call."""


def require_probability(value: float, what: str) -> None:
    """Raise :class:`InputError` naming ``what`` unless ``value`` lies in [0, 1] (NaN does not)."""
    if not 0.0 <= value <= 1.0:
        raise InputError(f"{what} is a probability in [0, 1], got {value}")


def require_voxel_size(value: float, what: str) -> None:
    """Raise :class:`InputError` naming ``what`` unless ``value`` is a positive, finite number of mm."""
    if not 0.0 < value < float("inf"):
        raise InputError(f"{what} must be a positive number of mm, got {value}")
