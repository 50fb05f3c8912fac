"""Errors geonn raises on bad input or failed numerics.

Every error a user can trigger through the public API or the ``geonn`` command is one of
these. They subclass the standard ``ValueError`` / ``TypeError`` so callers that catch
those keep working; the message always names the argument, what was expected and what came.
"""

from __future__ import annotations


class GeonnError(Exception):
    """Base class of every error geonn raises on purpose."""


class InputError(GeonnError, ValueError):
    """An argument has the wrong value, shape or content (NaN, inf, empty, non-monotonic)."""


class InputTypeError(GeonnError, TypeError):
    """An argument has the wrong type."""


class ConfigError(InputError):
    """A case file or ``--set`` override is malformed: unknown key, wrong type, bad value."""


class NonFiniteError(InputError):
    """A trajectory became NaN or infinite; the message names the first bad step and its time."""

    def __init__(self, message: str, step: int | None = None, time: float | None = None):
        super().__init__(message)
        self.step = step
        self.time = time


class NotFittedError(GeonnError, RuntimeError):
    """A learned component was used before it was fitted."""


class WriteError(GeonnError, OSError):
    """A file or folder could not be written (disk full, no permission, ...).

    The message names the path and the system's reason; ``errno`` is the original one. Nothing
    partial is left under the path: an earlier file of that name is unchanged.
    """


def describe(value) -> str:
    """A short description of ``value`` for error messages: type, and shape/dtype for arrays."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None:
        return f"{type(value).__name__} of shape {tuple(shape)} and dtype {dtype}"
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"
