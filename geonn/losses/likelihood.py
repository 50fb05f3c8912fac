"""Gaussian negative log-likelihood with a learned (diagonal or full) covariance.

The model error ``y - f`` of a learned model is treated as Gaussian with covariance ``Sigma``,
given directly (log-variances, standard deviations or a Cholesky factor) or produced by
:class:`LearnedCovariance`, a constant or state-dependent Cholesky factor trained with the model.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError, NonFiniteError
from ._inputs import check_finite, float_tensor, number, positive_int

REDUCTIONS = ("mean", "sum", "none")
COVARIANCE_KINDS = ("diagonal", "full")


def gaussian_nll(
    pred: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    log_variance: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    scale_tril: torch.Tensor | None = None,
    constant: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Negative log-likelihood of residuals ``r = target - pred`` under ``N(0, Sigma)``.

    ``nll(r) = 1/2 [ r^T Sigma^-1 r + log det Sigma + d log(2 pi) ]``

    per sample, then averaged over samples (``reduction="mean"``). With ``constant=True``
    (default) the ``d log(2 pi)`` term is included and ``nll`` equals
    ``-scipy.stats.multivariate_normal.logpdf(target, pred, Sigma)`` exactly; ``constant=False``
    drops that term (same gradients). Give the covariance in exactly one way:

    - ``log_variance``: diagonal ``Sigma = diag(exp(log_variance))``;
    - ``std``: diagonal ``Sigma = diag(std ** 2)``, ``std > 0``;
    - ``scale_tril``: full ``Sigma = L L^T`` with ``L`` lower-triangular with a positive diagonal
      (the Cholesky factor), e.g. from :class:`LearnedCovariance`. ``r^T Sigma^-1 r`` is
      ``|L^-1 r|^2`` by a triangular solve and ``log det Sigma = 2 sum log diag L``.

    Args:
        pred: prediction ``f``, shape ``(..., d)``; or the residual itself when ``target`` is None.
        target: observation ``y``, the shape of ``pred``, same units.
        log_variance: shape broadcastable with ``(..., d)``; log of variances in units of ``y`` squared.
        std: shape broadcastable with ``(..., d)``; standard deviations in units of ``y``.
        scale_tril: shape ``(..., d, d)``, batch dimensions broadcastable with the residual's; units of ``y``.
        constant: include the ``d/2 log(2 pi)`` term.
        reduction: ``"mean"`` (over samples), ``"sum"`` or ``"none"`` (one value per sample, shape
            the broadcast batch shape ``...``).

    Returns:
        The NLL in nats: a scalar, or per sample with ``reduction="none"``.

    Raises:
        InputError: not exactly one covariance given, mismatched shapes, NaN/inf, a covariance that
            is not positive definite (``std <= 0``, or ``scale_tril`` with a diagonal entry ``<= 0``
            or entries above the diagonal).

    Example:
        >>> r = torch.tensor([[0.5, -1.0]])
        >>> gaussian_nll(r, log_variance=torch.zeros(2))  # standard normal: 0.5 * 1.25 + log(2 pi)
        tensor(2.4629)
    """
    pred = float_tensor("pred", pred)
    if target is None:
        residual = pred
    else:
        target = float_tensor("target", target)
        if target.shape != pred.shape:
            raise InputError(f"target: expected the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}")
        residual = target - pred
    if residual.dim() < 1 or residual.shape[-1] < 1:
        raise InputError(f"pred: expected shape (..., d) with d >= 1, got {tuple(pred.shape)}")
    check_finite("pred" if target is None else "pred - target", residual)
    if reduction not in REDUCTIONS:
        raise InputError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    given = [
        name for name, value in (("log_variance", log_variance), ("std", std), ("scale_tril", scale_tril)) if value is not None
    ]
    if len(given) != 1:
        raise InputError(f"log_variance, std, scale_tril: expected exactly one covariance, got {given or 'none'}")
    d = residual.shape[-1]

    if scale_tril is not None:
        factor = check_scale_tril(scale_tril, d)
        batch = _broadcast("scale_tril", factor.shape[:-2], residual.shape[:-1])
        factor = factor.expand(*batch, d, d)
        whitened = torch.linalg.solve_triangular(factor, residual.expand(*batch, d).unsqueeze(-1), upper=False).squeeze(-1)
        mahalanobis = whitened.pow(2).sum(-1)
        log_det = 2 * torch.diagonal(factor, dim1=-2, dim2=-1).log().sum(-1)
    else:
        name, spec = given[0], float_tensor(given[0], log_variance if log_variance is not None else std)
        if spec.dim() < 1 or spec.shape[-1] != d:
            raise InputError(f"{name}: expected last dimension {d} (the residual's), got shape {tuple(spec.shape)}")
        _broadcast(name, spec.shape[:-1], residual.shape[:-1])
        check_finite(name, spec)
        if name == "std":
            if bool((spec <= 0).any()):
                raise InputError(f"std: covariance not positive definite: expected std > 0, got a minimum of {float(spec.min())}")
            log_variance = 2 * spec.log()
        else:
            log_variance = spec
        mahalanobis = (residual.pow(2) * torch.exp(-log_variance)).sum(-1)
        log_det = log_variance.sum(-1)
    nll = 0.5 * (mahalanobis + log_det)
    if constant:
        nll = nll + 0.5 * d * math.log(2 * math.pi)
    out = nll.mean() if reduction == "mean" else nll.sum() if reduction == "sum" else nll
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError(
            "pred - target: the NLL overflows (squared residuals over the variance exceed the dtype's range); "
            "rescale the data or the covariance"
        )
    return out


def check_scale_tril(scale_tril, d: int | None = None) -> torch.Tensor:
    """Check a Cholesky factor ``(..., d, d)``: square, lower-triangular, finite, positive diagonal.

    Raises:
        InputError: with "not positive definite" when a diagonal entry is ``<= 0``.
    """
    factor = float_tensor("scale_tril", scale_tril)
    if factor.dim() < 2 or factor.shape[-1] != factor.shape[-2] or (d is not None and factor.shape[-1] != d):
        expected = "(..., d, d)" if d is None else f"(..., {d}, {d}) for residuals with d = {d}"
        raise InputError(f"scale_tril: expected shape {expected}, got {tuple(factor.shape)}")
    check_finite("scale_tril", factor)
    diagonal = torch.diagonal(factor, dim1=-2, dim2=-1)
    if bool((diagonal <= 0).any()):
        raise InputError(
            "scale_tril: covariance not positive definite: expected a Cholesky factor with a positive diagonal, "
            f"got a diagonal entry of {float(diagonal.min())}"
        )
    if bool((torch.triu(factor, diagonal=1) != 0).any()):
        raise InputError("scale_tril: expected a lower-triangular Cholesky factor, got non-zero entries above the diagonal")
    return factor


def _broadcast(name: str, batch: torch.Size, residual_batch: torch.Size) -> torch.Size:
    try:
        return torch.broadcast_shapes(batch, residual_batch)
    except RuntimeError:
        raise InputError(
            f"{name}: expected batch dimensions broadcastable with the residual's {tuple(residual_batch)}, got {tuple(batch)}"
        ) from None


class LearnedCovariance(nn.Module):
    """A learned Cholesky factor ``L`` of the model-error covariance ``Sigma = L L^T``.

    ``L``'s diagonal is ``softplus(raw) + min_std`` (positive, so ``Sigma`` is positive definite
    whatever the parameters); with ``kind="full"`` its strictly lower part is free. The raw
    values are parameters (``state_dependent=False``: one constant ``Sigma``) or the output of a
    tiny MLP ``state_dim -> hidden -> n_raw`` of the state (``state_dependent=True``:
    heteroscedastic errors). ``L`` starts at ``initial_std * I`` (the state-dependent one near it:
    its last layer starts with weights 100 times smaller than PyTorch's default).

    Args:
        state_dim: ``d``, the size of the state and residual.
        kind: ``"diagonal"`` (``d`` raw values) or ``"full"`` (``d (d + 1) / 2``).
        state_dependent: make ``L`` a function of the state.
        hidden: width of the MLP's hidden layer (tanh).
        initial_std: the standard deviation the factor starts from, in state units.
        min_std: a floor added to the diagonal, in state units.

    Example:
        >>> state, pred, target = torch.randn(16, 3), torch.randn(16, 3), torch.randn(16, 3)
        >>> cov = LearnedCovariance(3, kind="full")
        >>> gaussian_nll(pred, target, scale_tril=cov()).backward()  # constant Sigma, (3, 3)
        >>> cov = LearnedCovariance(3, kind="full", state_dependent=True)
        >>> cov(state).shape  # Sigma(state)
        torch.Size([16, 3, 3])
    """

    def __init__(
        self,
        state_dim: int,
        kind: str = "diagonal",
        state_dependent: bool = False,
        hidden: int = 32,
        initial_std: float = 1.0,
        min_std: float = 1e-6,
    ):
        super().__init__()
        self.state_dim = positive_int("state_dim", state_dim, maximum=2**12 if kind == "full" else 2**20)
        if kind not in COVARIANCE_KINDS:
            raise InputError(f"kind: expected one of {COVARIANCE_KINDS}, got {kind!r}")
        self.kind = kind
        if not isinstance(state_dependent, bool):
            raise InputError(f"state_dependent: expected True or False, got {state_dependent!r}")
        self.state_dependent = state_dependent
        self.min_std = number("min_std", min_std, minimum=0.0, maximum=1e15)
        initial_std = number("initial_std", initial_std, minimum=self.min_std, exclusive=True, maximum=1e15)
        self.n_off_diagonal = state_dim * (state_dim - 1) // 2 if kind == "full" else 0
        n_raw = state_dim + self.n_off_diagonal
        if self.state_dependent and isinstance(hidden, int) and (state_dim + n_raw) * hidden > 2**30:
            raise InputError(f"state_dim, hidden: expected a covariance network of at most 2**30 weights, got "
                             f"{(state_dim + n_raw) * hidden}")
        initial = torch.zeros(n_raw)
        shifted = torch.tensor(initial_std - self.min_std, dtype=torch.float64)
        initial[:state_dim] = float(shifted + torch.log(-torch.expm1(-shifted)))  # softplus^-1
        if self.state_dependent:
            last = nn.Linear(positive_int("hidden", hidden), n_raw)
            with torch.no_grad():
                last.weight.mul_(1e-2)  # small, not zero: zero would block the first layer's gradient
                last.bias.copy_(initial)
            self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.Tanh(), last)
        else:
            self.raw = nn.Parameter(initial)

    def forward(self, state: torch.Tensor | None = None) -> torch.Tensor:
        """The Cholesky factor: ``(d, d)`` if constant, ``(..., d, d)`` for a state ``(..., d)``."""
        d = self.state_dim
        if self.state_dependent:
            if state is None:
                raise InputError("state: expected a state tensor (..., state_dim) for a state-dependent covariance, got None")
            state = float_tensor("state", state)
            if state.dim() < 1 or state.shape[-1] != d:
                raise InputError(f"state: expected last dimension {d}, got shape {tuple(state.shape)}")
            weight = self.net[0].weight
            if state.dtype != weight.dtype:
                raise InputError(f"state: expected dtype {weight.dtype} (that of the covariance network), got {state.dtype}")
            raw = self.net(state)
        else:
            raw = self.raw
        diagonal = F.softplus(raw[..., :d]) + self.min_std
        factor = torch.diag_embed(diagonal)
        if self.n_off_diagonal:
            rows, cols = torch.tril_indices(d, d, offset=-1, device=raw.device)
            lower = torch.zeros_like(factor)
            lower[..., rows, cols] = raw[..., d:]
            factor = factor + lower
        return factor

    def extra_repr(self) -> str:
        return f"state_dim={self.state_dim}, kind={self.kind!r}, state_dependent={self.state_dependent}"
