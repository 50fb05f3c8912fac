"""Scores of an assimilation against the truth."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError, InputTypeError, describe


def _as_array(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputTypeError(f"{name}: expected an array (n_times, state_dim), got {describe(value)}") from None
    if array.ndim != 2 or array.size == 0:
        raise InputError(f"{name}: expected shape (n_times, state_dim), got {array.shape}")
    if not np.isfinite(array).all():
        raise InputError(f"{name}: expected finite values, got NaN or inf")
    return array


def rmse_time_mean(estimate, truth, burn_in: int = 0) -> float:
    """Time mean, after ``burn_in`` rows, of the RMSE over components (DAPPER's ``rmse.a``).

    ``rmse_k = sqrt(mean_i (estimate[k, i] - truth[k, i])^2)``, averaged over ``k >= burn_in``.

    Args:
        estimate: e.g. the analysis mean at the observation times, ``(n_times, state_dim)``.
        truth: the true states at the same times, same shape (state units).
        burn_in: number of leading times left out (the filter's spin-up), ``0 <= burn_in < n_times``.

    Returns:
        The score as a float, in state units.

    Example:
        >>> from geonn.assimilation import rmse_time_mean
        >>> rmse_time_mean([[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]])
        0.5
    """
    est, tru = _as_array(estimate, "estimate"), _as_array(truth, "truth")
    if est.shape != tru.shape:
        raise InputError(f"truth: expected the shape of estimate {est.shape}, got {tru.shape}")
    if isinstance(burn_in, bool) or not isinstance(burn_in, (int, np.integer)) or not 0 <= burn_in < est.shape[0]:
        raise InputError(f"burn_in: expected an integer in [0, {est.shape[0]}), got {describe(burn_in)}")
    rmse = np.sqrt(np.mean((est - tru) ** 2, axis=1))
    return float(rmse[burn_in:].mean())
