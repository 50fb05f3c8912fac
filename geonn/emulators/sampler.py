"""The EOF-Gaussian sampler: the classical baseline generator of plausible fields.

Fit EOFs to training anomalies, draw each principal component from an independent Gaussian
with that component's training variance, decode; optionally add independent Gaussian noise at
each point with the variance the kept modes leave unexplained there. With all modes kept this
is the Gaussian with the training mean and covariance (rank ``time - 1``).
"""

from __future__ import annotations

import torch

from ..errors import InputError, NotFittedError, describe
from .eof import EOFReducer


class EOFGaussianSampler:
    """Sample fields from a Gaussian in the span of the leading EOFs (plus point-wise residual noise).

    Args:
        modes: EOFs kept; None keeps all of them (``min(time - 1, used points)``).
        residual: add independent Gaussian noise at each used point with the per-point variance
            of the training residual (data minus its K-mode reconstruction).

    Example:
        >>> sampler = EOFGaussianSampler(modes=10).fit(anomalies[train], mask[train], area_weights(grid))
        >>> fields = sampler.sample(100, generator=torch.Generator().manual_seed(0))  # (100, channel, lat, lon)
    """

    def __init__(self, modes: int | None = None, *, residual: bool = True):
        if modes is not None and (isinstance(modes, bool) or not isinstance(modes, int) or modes < 1):
            raise InputError(f"modes: expected an int >= 1 or None (all), got {modes!r}")
        self.modes, self.residual = modes, bool(residual)
        self.reducer: EOFReducer | None = None
        self._std: torch.Tensor | None = None       # (K,) standard deviations of the PCs
        self._residual_std: torch.Tensor | None = None  # (channel, lat, lon)

    def __repr__(self) -> str:
        return f"EOFGaussianSampler(modes={self.modes}, residual={self.residual})"

    def fit(self, values: torch.Tensor, mask: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> EOFGaussianSampler:
        """Fit to training fields ``(time, channel, lat, lon)`` (anomalies; 0 or anything where masked).

        ``mask`` and ``weights`` are as in :meth:`EOFReducer.fit`; points not valid at every
        training time stay masked in the samples.
        """
        if not isinstance(values, torch.Tensor) or values.dim() < 2 or values.shape[0] < 2:
            raise InputError(f"values: expected a floating tensor (time >= 2, *field_shape), got {describe(values)}")
        used = torch.ones(values.shape[1:], dtype=torch.bool)
        if mask is not None:
            used = torch.broadcast_to(mask, values.shape).all(0)
        modes = self.modes if self.modes is not None else min(values.shape[0] - 1, int(used.sum()))
        reducer = EOFReducer(modes=modes).fit(values, mask, weights)
        with torch.no_grad():
            latent = reducer.encode(values.double())
            residual = values.double() - reducer.decode(latent)
        keep = reducer._fitted()["used"]
        self.reducer = reducer
        self._std = latent.std(0, unbiased=True)
        self._residual_std = torch.where(keep, residual.std(0, unbiased=True), 0.0)
        return self

    def _fitted(self) -> EOFReducer:
        if self.reducer is None:
            raise NotFittedError("EOFGaussianSampler: call fit(values, mask, weights) before sample")
        return self.reducer

    @property
    def used(self) -> torch.Tensor:
        """Bool ``(channel, lat, lon)``: the points the sampler models (valid at every training time)."""
        return self._fitted()._fitted()["used"]

    def sample(self, n: int, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``n`` fields ``(n, channel, lat, lon)`` in the units of the training values; NaN at unused points."""
        reducer = self._fitted()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"n: expected an int >= 1, got {n!r}")
        latent = torch.randn((n, reducer.modes), generator=generator, dtype=torch.float64) * self._std
        fields = reducer.decode(latent)
        if self.residual:
            fields = fields + torch.randn(fields.shape, generator=generator, dtype=torch.float64) * self._residual_std
        return torch.where(self.used, fields, float("nan")).to(dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (loads with ``weights_only=True``)."""
        reducer = self._fitted()
        return {"reducer": reducer.state_dict(), "std": self._std.clone(), "residual_std": self._residual_std.clone()}

    def load_state_dict(self, state: dict) -> EOFGaussianSampler:
        if not isinstance(state, dict) or set(state) != {"reducer", "std", "residual_std"}:
            raise InputError(f"state: expected keys ['reducer', 'residual_std', 'std'], got {describe(state)}")
        reducer = EOFReducer(modes=int(state["std"].shape[0])).load_state_dict(state["reducer"])
        self.reducer, self._std, self._residual_std = reducer, state["std"].clone(), state["residual_std"].clone()
        return self
