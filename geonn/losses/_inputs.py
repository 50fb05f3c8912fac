"""Argument checks shared by the losses; every failure names the argument, what was expected and what came."""

from __future__ import annotations

import math

import torch

from ..errors import InputError, InputTypeError, describe


def float_tensor(name: str, value) -> torch.Tensor:
    """``value`` if it is a floating-point tensor, else :class:`InputTypeError`."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise InputTypeError(f"{name}: expected a floating-point torch.Tensor, got {describe(value)}")
    return value


def check_finite(name: str, value: torch.Tensor, where: str = "") -> None:
    """Raise :class:`InputError` if ``value`` holds NaN or inf (``where`` says which entries were checked)."""
    if not bool(torch.isfinite(value).all()):
        kind = "NaN" if bool(torch.isnan(value).any()) else "inf"
        raise InputError(f"{name}: expected finite values{where}, got {kind}")


def number(name: str, value, *, minimum: float | None = None, exclusive: bool = False, maximum: float | None = None) -> float:
    """A finite real number within bounds (``minimum < value`` if ``exclusive``, else ``<=``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name}: expected a finite number, got {describe(value)}")
    low_ok = minimum is None or (value > minimum if exclusive else value >= minimum)
    high_ok = maximum is None or value <= maximum
    if not (low_ok and high_ok):
        low = "" if minimum is None else f"{'>' if exclusive else '>='} {minimum}"
        high = "" if maximum is None else f"<= {maximum}"
        raise InputError(f"{name}: expected a number {' and '.join(filter(None, (low, high)))}, got {value!r}")
    return float(value)


def positive_int(name: str, value, maximum: int = 2**20) -> int:
    """An integer in ``[1, maximum]`` (a size; beyond the maximum it would not fit in memory)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise InputError(f"{name}: expected an integer in [1, {maximum}], got {describe(value)}")
    return value


def broadcastable_to(name: str, value: torch.Tensor, shape: torch.Size, target_name: str) -> None:
    """Raise unless ``value`` broadcasts to ``shape`` without enlarging it."""
    try:
        ok = torch.broadcast_shapes(value.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise InputError(f"{name}: expected a shape that broadcasts to {target_name}'s {tuple(shape)}, got {tuple(value.shape)}")
