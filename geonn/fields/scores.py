"""Area-weighted scores of gridded fields ``(time, channel, lat, lon)`` against the truth.

Both take a validity mask (True = valid; masked points count for nothing) and weights
broadcastable to the fields, typically :func:`geonn.fields.area_weights`; any normalisation of
the weights cancels.
"""

from __future__ import annotations

import torch

from ..errors import InputError, describe


def _inputs(pred, truth, mask, weights):
    for name, value in (("pred", pred), ("truth", truth)):
        if not isinstance(value, torch.Tensor) or value.dim() != 4 or not value.is_floating_point():
            raise InputError(f"{name}: expected a floating tensor (time, channel, lat, lon), got {describe(value)}")
    if pred.shape != truth.shape:
        raise InputError(f"pred: expected the shape of truth {tuple(truth.shape)}, got {tuple(pred.shape)}")
    weight = torch.ones((), dtype=torch.float64) if weights is None else weights.to(torch.float64)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise InputError(f"mask: expected a bool tensor broadcastable to {tuple(truth.shape)}, got {describe(mask)}")
        weight = weight * mask
    try:
        weight = torch.broadcast_to(weight, truth.shape)
    except RuntimeError:
        raise InputError(
            f"weights/mask: expected shapes broadcastable to {tuple(truth.shape)}, got {describe(weights)} and {describe(mask)}"
        ) from None
    if bool((weight < 0).any()):
        raise InputError("weights: expected non-negative weights, got some negative")
    return pred.double(), truth.double(), weight


def weighted_rmse(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor | None = None,
                  weights: torch.Tensor | None = None, *, per_time: bool = False) -> torch.Tensor:
    """Area-weighted RMSE of each time step, averaged over time (the WeatherBench convention).

    ``rmse_t = sqrt(sum_{c,y,x} w m (pred - truth)^2 / sum_{c,y,x} w m)``; the result is the mean
    of ``rmse_t`` over the time steps that have a valid point (or the vector when ``per_time``).
    Units: those of the fields.

    Example:
        >>> weighted_rmse(pred, truth, mask, area_weights(grid))
    """
    pred, truth, weight = _inputs(pred, truth, mask, weights)
    total = weight.sum((1, 2, 3))
    squared = (weight * (pred - truth).pow(2)).sum((1, 2, 3))
    rmse = torch.where(total > 0, squared / torch.where(total > 0, total, 1), float("nan")).sqrt()
    if per_time:
        return rmse
    if not bool((total > 0).any()):
        raise InputError("mask/weights: expected some valid point with positive weight, got none")
    return rmse[total > 0].mean()


def explained_variance(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor | None = None,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """Share of the truth's variance that ``pred`` explains: ``1 - SSE / SST``.

    ``SSE = sum w m (pred - truth)^2`` and ``SST = sum w m (truth - mean)^2`` over all times and
    points, ``mean`` being the truth's per-point time mean over its valid times. For an EOF
    reconstruction of the data it was fitted on, this is the sum of the kept modes'
    ``explained_variance_ratio``.
    """
    pred, truth, weight = _inputs(pred, truth, mask, weights)
    count = (weight > 0).sum(0, keepdim=True)
    mean = torch.where(weight > 0, truth, 0).sum(0, keepdim=True) / count.clamp_min(1)
    total = (weight * (truth - mean).pow(2)).sum()
    if not bool(total > 0):
        raise InputError("truth: expected some variance over time at valid, weighted points, got none")
    return 1 - (weight * (pred - truth).pow(2)).sum() / total


def anomaly_correlation(pred: torch.Tensor, truth: torch.Tensor, climatology: torch.Tensor | float | None = None,
                        mask: torch.Tensor | None = None, weights: torch.Tensor | None = None, *,
                        per_time: bool = False) -> torch.Tensor:
    """Area-weighted anomaly correlation coefficient (ACC) of each time step, averaged over time.

    With ``a = pred - climatology`` and ``b = truth - climatology`` (anomalies from a training
    climatology), ``acc_t = sum w m a b / sqrt(sum w m a^2 * sum w m b^2)`` over channels and
    points, uncentred (the spatial mean anomaly is kept, as in WeatherBench, rasp2020); the result
    is the mean of ``acc_t`` over the time steps where it is defined (some valid point, and neither
    anomaly zero everywhere), or the vector (NaN where undefined) when ``per_time``. Dimensionless,
    in [-1, 1].

    Args:
        pred, truth: ``(time, channel, lat, lon)``.
        climatology: broadcastable to them (e.g. ``(1, channel, lat, lon)``, or per time step for
            a seasonal climatology); ``None`` or 0 when ``pred`` and ``truth`` already are anomalies.
        mask: bool, broadcastable (True = valid); masked points count for nothing.
        weights: area weights broadcastable to the fields, e.g. :func:`geonn.fields.area_weights`.

    Example:
        >>> anomaly_correlation(forecast, truth, climatology, mask, area_weights(grid))
    """
    pred, truth, weight = _inputs(pred, truth, mask, weights)
    if climatology is not None:
        if isinstance(climatology, (int, float)):
            climatology = torch.tensor(float(climatology), dtype=torch.float64)
        if not isinstance(climatology, torch.Tensor):
            raise InputError(f"climatology: expected a tensor broadcastable to {tuple(truth.shape)}, a number or None, got {describe(climatology)}")
        try:
            climatology = torch.broadcast_to(climatology.to(torch.float64), truth.shape)
        except RuntimeError:
            raise InputError(f"climatology: expected a shape broadcastable to {tuple(truth.shape)}, got {tuple(climatology.shape)}") from None
        pred, truth = pred - climatology, truth - climatology
    valid = weight > 0  # masked entries may hold anything, NaN included
    pred, truth = torch.where(valid, pred, 0), torch.where(valid, truth, 0)
    covariance = (weight * pred * truth).sum((1, 2, 3))
    norms = (weight * pred.pow(2)).sum((1, 2, 3)) * (weight * truth.pow(2)).sum((1, 2, 3))
    acc = torch.where(norms > 0, covariance / norms.clamp_min(1e-300).sqrt(), float("nan"))
    if per_time:
        return acc
    defined = norms > 0
    if not bool(defined.any()):
        raise InputError("pred/truth: expected some time step with non-zero anomalies at valid, weighted points, got none")
    return acc[defined].mean()
