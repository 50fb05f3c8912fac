"""Explicit Runge-Kutta schemes as data (Butcher tableaux).

A tableau ``(a, b, c)`` defines the step

    k_i = f(t + c_i h, x + h * sum_j a_ij k_j),   x_next = x + h * sum_i b_i k_i

Note: torchdiffeq's ``method="rk4"`` is the 3/8 rule (``THREE_EIGHTHS`` here), not the classic
fourth-order scheme (``RK4`` here). Both are fourth order; their error constants differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError, InputTypeError


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta scheme.

    Attributes:
        name: short name (``"rk4"``).
        a: strictly lower-triangular stage matrix, ``stages`` rows of ``stages`` floats.
        b: weights, ``stages`` floats summing to 1.
        c: nodes, ``stages`` floats; ``c_i = sum_j a_ij`` for a consistent scheme.
        order: the scheme's order of accuracy.
    """

    name: str
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]
    order: int

    def __post_init__(self):
        _check_coefficients(self.name, self.a, self.b, self.c)
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order < 1:
            raise InputError(f"tableau {self.name!r}: order: expected an integer >= 1, got {self.order!r}")
        s = len(self.b)
        if len(self.c) != s or len(self.a) != s or any(len(row) != s for row in self.a):
            raise InputError(
                f"tableau {self.name!r}: expected a of shape ({s}, {s}) and c of length {s} "
                f"to match b of length {s}; got a with rows {[len(r) for r in self.a]} and c of length {len(self.c)}"
            )
        for i, row in enumerate(self.a):
            if any(row[j] != 0.0 for j in range(i, s)):
                raise InputError(f"tableau {self.name!r}: a must be strictly lower triangular (explicit scheme); row {i} is {row}")

    @property
    def stages(self) -> int:
        return len(self.b)


def _check_coefficients(name, a, b, c) -> None:
    """``a`` a sequence of rows and ``b``, ``c`` sequences, all of finite real numbers, at least one stage."""
    def numbers(values) -> bool:
        return isinstance(values, (tuple, list)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        )

    if not numbers(b) or not b:
        raise InputError(f"tableau {name!r}: b: expected a non-empty sequence of finite numbers, got {b!r}")
    if not numbers(c):
        raise InputError(f"tableau {name!r}: c: expected a sequence of finite numbers, got {c!r}")
    if not isinstance(a, (tuple, list)) or not all(numbers(row) for row in a):
        raise InputError(f"tableau {name!r}: a: expected rows (sequences) of finite numbers, got {a!r}")


EULER = ButcherTableau("euler", a=((0.0,),), b=(1.0,), c=(0.0,), order=1)
HEUN = ButcherTableau("heun", a=((0.0, 0.0), (1.0, 0.0)), b=(0.5, 0.5), c=(0.0, 1.0), order=2)
MIDPOINT = ButcherTableau("midpoint", a=((0.0, 0.0), (0.5, 0.0)), b=(0.0, 1.0), c=(0.0, 0.5), order=2)
RK4 = ButcherTableau(
    "rk4",
    a=((0.0, 0.0, 0.0, 0.0), (0.5, 0.0, 0.0, 0.0), (0.0, 0.5, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    c=(0.0, 0.5, 0.5, 1.0),
    order=4,
)
THREE_EIGHTHS = ButcherTableau(
    "rk38",
    a=((0.0, 0.0, 0.0, 0.0), (1 / 3, 0.0, 0.0, 0.0), (-1 / 3, 1.0, 0.0, 0.0), (1.0, -1.0, 1.0, 0.0)),
    b=(1 / 8, 3 / 8, 3 / 8, 1 / 8),
    c=(0.0, 1 / 3, 2 / 3, 1.0),
    order=4,
)

TABLEAUX: dict[str, ButcherTableau] = {t.name: t for t in (EULER, HEUN, MIDPOINT, RK4, THREE_EIGHTHS)}


def get_tableau(scheme: str | ButcherTableau) -> ButcherTableau:
    """Return the tableau for a scheme name (``euler``, ``heun``, ``midpoint``, ``rk4``, ``rk38``) or pass one through."""
    if isinstance(scheme, ButcherTableau):
        return scheme
    if not isinstance(scheme, str):
        raise InputTypeError(f"scheme: expected a scheme name {sorted(TABLEAUX)} or a ButcherTableau, got {type(scheme).__name__}")
    try:
        return TABLEAUX[scheme.lower()]
    except KeyError:
        raise InputError(f"scheme: expected one of {sorted(TABLEAUX)}, got {scheme!r}") from None
