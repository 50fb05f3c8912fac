"""Covariance localisation: the Gaspari-Cohn taper and distances on a ring."""

from __future__ import annotations

import math

import torch

from ..errors import InputError, InputTypeError, describe


def gaspari_cohn(distance, radius: float) -> torch.Tensor:
    """The Gaspari-Cohn fifth-order piecewise rational taper (gaspari1999, eq. 4.10).

    With ``r = distance / radius``::

        r <= 1:      1 - 5/3 r^2 + 5/8 r^3 + 1/2 r^4 - 1/4 r^5
        1 < r < 2:   4 - 5 r + 5/3 r^2 + 5/8 r^3 - 1/2 r^4 + 1/12 r^5 - 2/(3 r)
        r >= 2:      0

    so the taper is 1 at distance 0, about 0.2083 at ``distance = radius`` and exactly 0 from
    ``2 * radius`` on (compact support). Note: DAPPER's ``loc_rad`` is the distance where the
    taper is ``exp(-1/2)``; its Gaspari-Cohn half-width is ``radius = 1.82 * loc_rad``.

    Args:
        distance: non-negative distances, any shape (tensor, array or number), in grid units.
        radius: the half-width ``c`` (> 0; ``math.inf`` gives 1 everywhere: no localisation).

    Returns:
        Taper values in ``[0, 1]``, float64 unless ``distance`` is another floating tensor.

    Example:
        >>> from geonn.assimilation import gaspari_cohn
        >>> [round(v, 4) for v in gaspari_cohn([0.0, 1.0, 2.0], radius=1.0).tolist()]
        [1.0, 0.2083, 0.0]
    """
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or math.isnan(radius) or radius <= 0:
        raise InputError(f"radius: expected a positive number (or math.inf), got {describe(radius)}")
    if isinstance(distance, torch.Tensor):
        d = distance if distance.is_floating_point() else distance.double()
    else:
        try:
            d = torch.as_tensor(distance, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise InputTypeError(f"distance: expected numbers or a tensor, got {describe(distance)}") from None
    if bool(torch.isnan(d).any()) or bool((d < 0).any()):
        raise InputError("distance: expected non-negative distances, got a negative or NaN entry")
    r = d / radius
    inner = 1.0 + r**2 * (-5.0 / 3.0 + r * (5.0 / 8.0 + r * (0.5 - 0.25 * r)))
    rs = torch.clamp(r, min=1.0)  # avoids 1/0 in the unused branch
    outer = 4.0 - 5.0 * rs + rs**2 * (5.0 / 3.0 + rs * (5.0 / 8.0 + rs * (-0.5 + rs / 12.0))) - 2.0 / (3.0 * rs)
    taper = torch.where(r <= 1.0, inner, torch.where(r < 2.0, outer, torch.zeros_like(r)))
    return torch.clamp(taper, 0.0, 1.0)


def ring_distance(a: torch.Tensor, b: torch.Tensor, length: float) -> torch.Tensor:
    """Pairwise distances between positions ``a`` (m,) and ``b`` (p,) on a ring of circumference ``length``.

    Returns ``(m, p)``: ``min(|a_i - b_j| mod length, length - |a_i - b_j| mod length)``.
    """
    if isinstance(length, bool) or not isinstance(length, (int, float)) or not math.isfinite(length) or length <= 0:
        raise InputError(f"length: expected a positive ring circumference, got {describe(length)}")
    gap = torch.remainder((a[:, None] - b[None, :]).abs(), length)
    return torch.minimum(gap, length - gap)
