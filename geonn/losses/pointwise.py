"""Point-wise errors between a prediction and partially observed, optionally weighted, targets."""

from __future__ import annotations

import torch

from ..errors import InputError, InputTypeError, NonFiniteError, describe
from ._inputs import broadcastable_to, check_finite, float_tensor, number


def lp_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    p: float = 2,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted mean of ``|pred - target| ** p`` over the observed entries.

    ``L = sum_i m_i w_i |pred_i - target_i|^p / sum_i m_i w_i``

    with ``m_i = 1`` where ``mask`` is True (observed) and 0 elsewhere, ``w_i`` the weights
    (1 when not given, so the loss is the plain mean over the observed entries: the MSE for
    ``p = 2``, the MAE for ``p = 1``). No ``1/p`` root is taken. Unobserved entries may hold
    NaN or anything else: they are replaced before any arithmetic, so neither the value nor the
    gradient sees them.

    Args:
        pred: prediction, any shape ``S``.
        target: observations, the same shape ``S`` and units as ``pred``.
        p: exponent, a finite number >= 1 (need not be an integer).
        mask: boolean, broadcastable to ``S``; True marks an observed entry. Default: all observed.
        weights: non-negative finite weights broadcastable to ``S`` (e.g. ``cos(lat)`` area weights
            of shape ``(lat, 1)`` for fields ``(..., lat, lon)``). Only their ratios matter.

    Returns:
        A scalar tensor in units of ``pred`` to the power ``p``.

    Raises:
        InputTypeError: ``pred``/``target``/``weights`` not floating-point tensors, ``mask`` not boolean.
        InputError: shapes that differ or do not broadcast, ``p < 1``, no observed entry (or zero
            total weight on them), NaN/inf among the observed entries, negative or non-finite weights.

    Example:
        >>> pred = torch.tensor([1.0, 2.0, 3.0]); target = torch.tensor([1.5, float("nan"), 2.0])
        >>> lp_loss(pred, target, p=1, mask=~target.isnan())
        tensor(0.7500)
    """
    pred = float_tensor("pred", pred)
    target = float_tensor("target", target)
    if pred.shape != target.shape:
        raise InputError(f"target: expected the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}")
    p = number("p", p, minimum=1.0)
    shape = pred.shape
    if mask is None:
        observed = torch.ones((), dtype=torch.bool, device=pred.device)
    else:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise InputTypeError(f"mask: expected a boolean torch.Tensor (True = observed), got {describe(mask)}")
        broadcastable_to("mask", mask, shape, "pred")
        observed = mask
    observed = observed.expand(shape)
    if not bool(observed.any()):
        raise InputError(f"mask: expected at least one observed (True) entry, got none among {observed.numel()}")
    check_finite("pred", pred[observed], " at the observed entries")
    check_finite("target", target[observed], " at the observed entries")
    residual = torch.where(observed, pred - target, torch.zeros((), dtype=pred.dtype, device=pred.device))
    error = residual.abs().pow(p)
    if weights is None:
        return _finite_loss(error.sum() / observed.sum().to(pred.dtype), p)
    weights = float_tensor("weights", weights)
    broadcastable_to("weights", weights, shape, "pred")
    check_finite("weights", weights)
    if bool((weights < 0).any()):
        raise InputError(f"weights: expected values >= 0, got a minimum of {float(weights.min())}")
    counted = torch.where(observed, weights.expand(shape), torch.zeros((), dtype=weights.dtype, device=weights.device))
    total = counted.sum()
    if not bool(total > 0):
        raise InputError("weights: expected a positive total weight on the observed entries, got 0")
    return _finite_loss((counted * error).sum() / total, p)


def _finite_loss(loss: torch.Tensor, p: float) -> torch.Tensor:
    """``loss``, or :class:`NonFiniteError` when finite inputs overflowed (``|pred - target|^p`` too large)."""
    if not bool(torch.isfinite(loss)):
        raise NonFiniteError(
            f"p: |pred - target|^{p:g} overflows {loss.dtype} (the loss is {float(loss)}); rescale pred and target or lower p"
        )
    return loss
