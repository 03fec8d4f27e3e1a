"""Progress reporting and cancellation shared by every long-running engine call.

Engine functions take an optional ``progress`` callable ``progress(fraction, message)`` with fraction in
[0, 1], and an optional ``cancel`` object with an ``is_set()`` method (a ``threading.Event``). They call
:func:`check_cancel` between units of work. The CLI wraps a tqdm bar around the callable; Slicer's worker
thread stores the latest value for a QTimer on the main thread to display.
"""
from typing import Callable, Optional, Protocol

from .errors import Cancelled

ProgressCallback = Callable[[float, str], None]


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


def report(progress: Optional[ProgressCallback], fraction: float, message: str) -> None:
    """Call ``progress`` if given, clamping ``fraction`` to [0, 1]."""
    if progress is not None:
        progress(min(1.0, max(0.0, float(fraction))), message)


def check_cancel(cancel: Optional[CancelToken]) -> None:
    """Raise :class:`Cancelled` if ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled by the user; nothing was changed")


def scaled(progress: Optional[ProgressCallback], start: float, stop: float) -> Optional[ProgressCallback]:
    """A callback mapping a sub-task's [0, 1] onto [start, stop] of ``progress``."""
    if progress is None:
        return None

    def sub(fraction: float, message: str) -> None:
        report(progress, start + (stop - start) * fraction, message)

    return sub
