"""Area-weighted scores of gridded fields ``(time, channel, lat, lon)`` against the truth.

Both take a validity mask (True = valid; masked points count for nothing) and weights
broadcastable to the fields, typically :func:`geonn.fields.area_weights`; any normalisation of
the weights cancels.
"""

from __future__ import annotations

import torch

from ..errors import InputError, InputTypeError, describe


def _broadcastable(name: str, value: torch.Tensor, shape: tuple, what: str) -> None:
    """``value`` broadcasts to ``shape`` (without growing it)."""
    try:
        fits = torch.broadcast_shapes(tuple(value.shape), shape) == torch.Size(shape)
    except RuntimeError:
        fits = False
    if not fits:
        raise InputError(f"{name}: expected {what} broadcastable to the fields' shape {shape}, got shape {tuple(value.shape)}")


def _inputs(pred, truth, mask, weights):
    """Checked ``(pred, truth, weight)``: float64 fields with 0 at invalid points, and the weight of each
    point broadcast to the fields (0 where masked; scaled to a maximum of 1 if its sum would overflow)."""
    for name, value in (("pred", pred), ("truth", truth)):
        if not isinstance(value, torch.Tensor) or value.dim() != 4 or not value.is_floating_point():
            raise InputError(f"{name}: expected a floating tensor (time, channel, lat, lon), got {describe(value)}")
    if pred.shape != truth.shape:
        raise InputError(f"pred: expected the shape of truth {tuple(truth.shape)}, got {tuple(pred.shape)}")
    shape = tuple(truth.shape)
    if weights is None:
        weight = torch.ones((), dtype=torch.float64, device=truth.device)
    else:
        if not isinstance(weights, torch.Tensor) or weights.dtype == torch.bool or weights.is_complex():
            raise InputTypeError(f"weights: expected a real tensor broadcastable to {shape} (e.g. area_weights(grid)) "
                                 f"or None, got {describe(weights)}")
        _broadcastable("weights", weights, shape, "a tensor")
        weight = weights.to(device=truth.device, dtype=torch.float64)
        if not bool(torch.isfinite(weight).all()):
            raise InputError(f"weights: expected finite weights, got {int((~torch.isfinite(weight)).sum())} NaN or inf")
        if bool((weight < 0).any()):
            raise InputError(f"weights: expected non-negative weights, got a minimum of {float(weight.min()):g}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise InputError(f"mask: expected a bool tensor broadcastable to {shape}, got {describe(mask)}")
        _broadcastable("mask", mask, shape, "a bool tensor")
        weight = weight * mask.to(truth.device)
    weight = torch.broadcast_to(weight, shape)
    if weight.numel() and not bool(torch.isfinite(weight.sum())):  # huge weights: only their ratios count
        weight = weight / weight.amax()
    valid = weight > 0
    checked = []
    for name, value in (("pred", pred), ("truth", truth)):
        value = torch.where(valid, value.to(torch.float64), 0.0)  # masked entries may hold anything, NaN included
        if not bool(torch.isfinite(value).all()):
            raise InputError(f"{name}: expected finite values at the valid points (mask True, weight > 0), got "
                             f"{int((~torch.isfinite(value)).sum())} NaN or inf there")
        checked.append(value)
    return checked[0], checked[1], weight


def _difference(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    error = pred - truth
    if not bool(torch.isfinite(error).all()):
        raise InputError(f"pred: expected values within float64's range of truth's, got differences beyond "
                         f"{torch.finfo(torch.float64).max:.3g} (largest |pred| {float(pred.abs().max()):.3g}, "
                         f"|truth| {float(truth.abs().max()):.3g})")
    return error


def _scale(values: torch.Tensor, dims) -> torch.Tensor:
    """The largest ``|values|`` over ``dims`` (kept), 1 where all are 0: dividing by it keeps squares finite."""
    largest = values.abs().amax(dims, keepdim=True)
    return torch.where(largest > 0, largest, 1.0)


def weighted_rmse(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor | None = None,
                  weights: torch.Tensor | None = None, *, per_time: bool = False) -> torch.Tensor:
    """Area-weighted RMSE of each time step, averaged over time (the WeatherBench convention).

    ``rmse_t = sqrt(sum_{c,y,x} w m (pred - truth)^2 / sum_{c,y,x} w m)``; the result is the mean
    of ``rmse_t`` over the time steps that have a valid point (or the vector when ``per_time``,
    NaN at the time steps without one). Units: those of the fields.

    Args:
        pred, truth: ``(time, channel, lat, lon)`` floating tensors, finite at the valid points.
        mask: bool, broadcastable (True = valid); masked points count for nothing and may hold NaN.
        weights: non-negative finite area weights broadcastable to the fields (a tensor, e.g.
            :func:`geonn.fields.area_weights`), or ``None`` for equal weights.

    Raises:
        InputError: shapes, NaN or inf at a valid point, negative or non-finite weights, no valid point.
        InputTypeError: ``weights`` is not a real tensor.

    Example:
        >>> weighted_rmse(pred, truth, mask, area_weights(grid))
    """
    pred, truth, weight = _inputs(pred, truth, mask, weights)
    error = _difference(pred, truth)
    total = weight.sum((1, 2, 3))
    squared = (weight * error.pow(2)).sum((1, 2, 3))
    if not bool(torch.isfinite(squared).all()):  # errors beyond ~1e154: the same RMSE from scaled errors
        scale = _scale(error, (1, 2, 3))
        squared = (weight * (error / scale).pow(2)).sum((1, 2, 3))
        rmse = torch.where(total > 0, squared / torch.where(total > 0, total, 1), float("nan")).sqrt() * scale.flatten()
    else:
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
    ``explained_variance_ratio``. Same arguments as :func:`weighted_rmse`.

    Raises:
        InputError: as :func:`weighted_rmse`; and ``truth`` constant over time at every valid
            point (``SST = 0``: nothing to explain).
    """
    pred, truth, weight = _inputs(pred, truth, mask, weights)
    error = _difference(pred, truth)
    count = (weight > 0).sum(0, keepdim=True)
    mean = truth.sum(0, keepdim=True) / count.clamp_min(1)  # invalid points hold 0
    if not bool(torch.isfinite(mean).all()):  # the sum overflowed: the mean of scaled values
        scale = _scale(truth, (0,))
        mean = (truth / scale).sum(0, keepdim=True) / count.clamp_min(1) * scale
    anomaly = _difference(torch.where(weight > 0, truth, 0.0), torch.where(weight > 0, mean, 0.0))
    sse, sst = (weight * error.pow(2)).sum(), (weight * anomaly.pow(2)).sum()
    if not (bool(torch.isfinite(sse)) and bool(torch.isfinite(sst))):  # beyond ~1e154: the same ratio, scaled
        scale = torch.maximum(error.abs().amax(), anomaly.abs().amax())
        sse, sst = (weight * (error / scale).pow(2)).sum(), (weight * (anomaly / scale).pow(2)).sum()
    if not bool(sst > 0):
        raise InputError("truth: expected some variance over time at valid, weighted points, got none")
    return 1 - sse / sst


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
    valid = weight > 0  # masked entries may hold anything, NaN included
    if climatology is not None:
        if isinstance(climatology, (int, float)) and not isinstance(climatology, bool):
            climatology = torch.tensor(float(climatology), dtype=torch.float64)
        if not isinstance(climatology, torch.Tensor) or climatology.dtype == torch.bool or climatology.is_complex():
            raise InputError(f"climatology: expected a real tensor broadcastable to {tuple(truth.shape)}, a number or None, "
                             f"got {describe(climatology)}")
        _broadcastable("climatology", climatology, tuple(truth.shape), "a tensor")
        climatology = torch.where(valid, climatology.to(device=truth.device, dtype=torch.float64), 0.0)
        pred, truth = pred - climatology, truth - climatology
        for name, value in (("climatology", climatology), ("pred", pred), ("truth", truth)):
            if not bool(torch.isfinite(value).all()):
                raise InputError(f"{name}: expected finite anomalies at the valid points (mask True, weight > 0), got "
                                 f"{int((~torch.isfinite(value)).sum())} NaN or inf there")
    # each anomaly divided by its largest value at each time: the correlation is the same, and no square
    # overflows or underflows
    pred, truth = pred / _scale(pred, (1, 2, 3)), truth / _scale(truth, (1, 2, 3))
    covariance = (weight * pred * truth).sum((1, 2, 3))
    norms = (weight * pred.pow(2)).sum((1, 2, 3)).sqrt() * (weight * truth.pow(2)).sum((1, 2, 3)).sqrt()
    acc = torch.where(norms > 0, covariance / torch.where(norms > 0, norms, 1.0), float("nan"))
    if per_time:
        return acc
    defined = norms > 0
    if not bool(defined.any()):
        raise InputError("pred/truth: expected some time step with non-zero anomalies at valid, weighted points, got none")
    return acc[defined].mean()
