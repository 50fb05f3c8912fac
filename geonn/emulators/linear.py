"""Linear one-step baselines for field emulators: persistence, ridge regression, a linear inverse model.

All three map the anomaly field at step ``t`` to the one at ``t + 1``, on tensors
``(time, channel, lat, lon)`` (anomalies from a training climatology, 0 where missing):

- :class:`Persistence`: ``x(t+1) = x(t)``.
- :class:`RidgeEmulator`: ``x(t+1) = B x(t)`` by ridge regression, field to field, on all
  (area-weighted) grid points or on the leading EOFs; the penalty is chosen on a validation slice
  at the end of the training series, then the regression is refitted on the whole series.
- :class:`LinearInverseModel`: ``z(t+1) = G z(t)`` on the leading EOFs' principal components, with
  ``G = C(1) C(0)^-1`` from the lag-1 and lag-0 covariances (penland1995).

They share ``fit(series, mask, weights) -> self`` (``series`` the training anomalies in time
order) and ``predict(previous) -> next``, the interface of the CNN emulator's one step.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError, NotFittedError, describe
from .eof import EOFReducer

DEFAULT_PENALTIES = tuple(10.0 ** (k / 4) for k in range(-16, 9))  # 1e-4 ... 1e2, relative to the mean squared input norm


def validation_slice(n_steps: int, fraction: float) -> slice:
    """The last ``round(fraction * n_steps)`` steps (at least 1) of a training series of ``n_steps``.

    Model selection (ridge penalties, the CNN's early stopping) uses these steps as one-step targets;
    the held-out test part is never among them.
    """
    if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise InputError(f"validation_fraction: expected a number in (0, 1), got {fraction!r}")
    n_validation = max(1, math.floor(fraction * n_steps + 0.5))
    if n_steps - n_validation < 2:
        raise InputError(f"series: expected at least {n_validation + 2} training steps to hold out {n_validation} for validation, got {n_steps}")
    return slice(n_steps - n_validation, n_steps)


def _check_series(series: torch.Tensor, mask, name: str = "series") -> torch.Tensor:
    if not isinstance(series, torch.Tensor) or series.dim() != 4 or not series.is_floating_point():
        raise InputError(f"{name}: expected a floating tensor (time, channel, lat, lon), got {describe(series)}")
    if series.shape[0] < 3:
        raise InputError(f"{name}: expected at least 3 time steps to fit a one-step model, got {series.shape[0]}")
    if mask is None:
        return torch.ones_like(series, dtype=torch.bool)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise InputError(f"mask: expected a bool tensor broadcastable to {tuple(series.shape)}, got {describe(mask)}")
    try:
        return torch.broadcast_to(mask, series.shape)
    except RuntimeError:
        raise InputError(f"mask: expected a shape broadcastable to {tuple(series.shape)}, got {tuple(mask.shape)}") from None


def _field_weights(weights, field_shape) -> torch.Tensor:
    if weights is None:
        return torch.ones(field_shape, dtype=torch.float64)
    try:
        return torch.broadcast_to(weights.to(torch.float64), field_shape).clone()
    except (RuntimeError, AttributeError):
        raise InputError(f"weights: expected a shape broadcastable to the field {tuple(field_shape)}, got {describe(weights)}") from None


def _check_previous(previous, field_shape) -> None:
    if not isinstance(previous, torch.Tensor) or previous.dim() != 4 or tuple(previous.shape[1:]) != tuple(field_shape):
        raise InputError(f"previous: expected a tensor (time, *{tuple(field_shape)}), got {describe(previous)}")


def _rmse(pred: torch.Tensor, truth: torch.Tensor, weight: torch.Tensor) -> float:
    """Mean over time of the per-step weighted RMSE; ``weight`` (time, points) is 0 where masked."""
    total = weight.sum(1)
    per_step = ((weight * (pred - truth).pow(2)).sum(1) / total.clamp_min(1e-300)).sqrt()
    return float(per_step[total > 0].mean())


class Persistence:
    """``x(t+1) = x(t)``: the forecast every emulator has to beat.

    Example:
        >>> Persistence().fit(anomalies[train]).predict(anomalies[test_start - 1:-1])
    """

    history = 1

    def __repr__(self) -> str:
        return "Persistence()"

    def fit(self, series: torch.Tensor, mask: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> Persistence:
        _check_series(series, mask)
        return self

    def predict(self, previous: torch.Tensor) -> torch.Tensor:
        """The next fields ``(time, channel, lat, lon)``: a copy of ``previous``."""
        if not isinstance(previous, torch.Tensor) or previous.dim() != 4:
            raise InputError(f"previous: expected a tensor (time, channel, lat, lon), got {describe(previous)}")
        return previous.clone()


class RidgeEmulator:
    """Ridge regression of the next field on the current one, ``x(t+1) = B x(t)``.

    The regression runs on the area-weighted fields ``sqrt(w) x`` (``basis="grid"``: every
    grid point valid at all training times, so the squared error is the area-weighted one) or on
    the principal components of the leading ``modes`` EOFs (``basis="eof"``). The penalty is
    ``lambda = penalty * mean_t |x(t)|^2``, scale-free; the one with the lowest area-weighted
    one-step RMSE on the validation slice (the last ``validation_fraction`` of the training
    series, fitted on the steps before it) is kept, and the regression is refitted on the whole
    series. Solved through the SVD of the inputs, so a grid of ``P`` points and ``n`` steps
    costs ``O(n^2 P)`` and stores ``2 min(n, P) P`` numbers, never a ``P x P`` matrix.

    Args:
        basis: ``"grid"`` or ``"eof"``.
        modes: the number of EOFs for ``basis="eof"``.
        penalties: the relative penalties tried.
        validation_fraction: the share of the training series held out to choose the penalty.

    Attributes (after :meth:`fit`):
        penalty: the chosen relative penalty.
        validation_rmse: ``{penalty: RMSE}`` on the validation slice, in the units of the series.

    Example:
        >>> ridge = RidgeEmulator().fit(anomalies[split.train], mask[split.train], area_weights(grid))
        >>> forecast = ridge.predict(anomalies[t0 - 1:t1 - 1])      # one step from each true field
    """

    history = 1

    def __init__(self, basis: str = "grid", *, modes: int = 10, penalties=DEFAULT_PENALTIES, validation_fraction: float = 0.2):
        if basis not in ("grid", "eof"):
            raise InputError(f"basis: expected 'grid' or 'eof', got {basis!r}")
        if isinstance(modes, bool) or not isinstance(modes, int) or modes < 1:
            raise InputError(f"modes: expected an int >= 1, got {modes!r}")
        penalties = tuple(float(p) for p in penalties)
        if not penalties or any(not math.isfinite(p) or p < 0 for p in penalties):
            raise InputError(f"penalties: expected finite numbers >= 0, got {penalties!r}")
        validation_slice(10, validation_fraction)  # checks the fraction
        self.basis, self.modes, self.penalties, self.validation_fraction = basis, modes, penalties, validation_fraction
        self.penalty: float | None = None
        self.validation_rmse: dict[float, float] = {}
        self._state: dict | None = None

    def __repr__(self) -> str:
        return f"RidgeEmulator(basis={self.basis!r}, modes={self.modes}, penalty={self.penalty})"

    # features: (time, features) float64; the error in feature space is the area-weighted error
    def _encoder(self, series, mask, weight):
        field_shape = tuple(series.shape[1:])
        if self.basis == "eof":
            modes = min(self.modes, series.shape[0] - 1)
            reducer = EOFReducer(modes=modes, center=False).fit(series, mask, weight)
            return (lambda x: reducer.encode(x.to(torch.float64))), (lambda z: reducer.decode(z)), reducer
        used = mask.all(0) & (weight > 0)
        root = weight.sqrt()[used]

        def encode(x):
            return x.to(torch.float64)[:, used] * root

        def decode(features):
            out = torch.zeros((features.shape[0], *field_shape), dtype=torch.float64)
            out[:, used] = features / root
            return out

        return encode, decode, None

    @staticmethod
    def _solve(inputs: torch.Tensor, targets: torch.Tensor):
        """``(V, s, U^T Y)`` of the thin SVD ``inputs = U diag(s) V^T``."""
        u, s, vh = torch.linalg.svd(inputs, full_matrices=False)
        return vh.T, s, u.T @ targets

    @staticmethod
    def _predict(features: torch.Tensor, solved, lam: float) -> torch.Tensor:
        v, s, uty = solved
        return ((features @ v) * (s / (s.pow(2) + lam))) @ uty

    def fit(self, series: torch.Tensor, mask: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> RidgeEmulator:
        """Choose the penalty on the validation slice, then fit on all pairs ``(x(t), x(t+1))`` of ``series``.

        Args:
            series: training anomalies ``(time, channel, lat, lon)`` in time order.
            mask: bool, broadcastable to ``series`` (True = valid); grid points missing at any
                training time are left out (predicted as 0 anomaly).
            weights: area weights broadcastable to ``(channel, lat, lon)``, or ``None``.
        """
        mask = _check_series(series, mask)
        weight = _field_weights(weights, series.shape[1:])
        validation = validation_slice(series.shape[0], self.validation_fraction)
        # penalty: fit on the steps before the validation slice, score one-step forecasts into it
        early = slice(0, validation.start)
        encode, decode, _ = self._encoder(series[early], mask[early], weight)
        features = encode(series)
        inputs, targets = features[: validation.start - 1], features[1: validation.start]
        solved = self._solve(inputs, targets)
        scale = float(inputs.pow(2).sum(1).mean()) or 1.0
        truth = series[validation].to(torch.float64).flatten(1)
        score_weight = (weight.flatten() * mask[validation].flatten(1)).to(torch.float64)
        previous = features[validation.start - 1: validation.stop - 1]
        self.validation_rmse = {}
        for penalty in self.penalties:
            pred = decode(self._predict(previous, solved, penalty * scale)).flatten(1)
            self.validation_rmse[penalty] = _rmse(pred, truth, score_weight)
        self.penalty = min(self.validation_rmse, key=self.validation_rmse.get)
        # refit on the whole training series with the chosen penalty
        encode, decode, reducer = self._encoder(series, mask, weight)
        features = encode(series)
        inputs, targets = features[:-1], features[1:]
        scale = float(inputs.pow(2).sum(1).mean()) or 1.0
        self._state = {"solved": self._solve(inputs, targets), "lam": self.penalty * scale, "encode": encode,
                       "decode": decode, "reducer": reducer, "field_shape": tuple(series.shape[1:])}
        return self

    def predict(self, previous: torch.Tensor) -> torch.Tensor:
        """The next fields ``(time, channel, lat, lon)`` from ``previous`` (same shape), in its dtype."""
        if self._state is None:
            raise NotFittedError("RidgeEmulator: call fit(series, mask, weights) before predict")
        state = self._state
        _check_previous(previous, state["field_shape"])
        features = self._predict(state["encode"](previous), state["solved"], state["lam"])
        return state["decode"](features).to(previous.dtype)


class LinearInverseModel:
    """A linear inverse model (penland1995) on the leading EOFs: ``z(t+1) = G z(t)``.

    The principal components ``z`` of the ``modes`` leading area-weighted EOFs of the training
    series give the lag covariances ``C(0) = <z(t) z(t)^T>`` and ``C(1) = <z(t+1) z(t)^T>``
    over the pairs of consecutive steps, and ``G = C(1) C(0)^-1`` (the least-squares one-step
    operator in EOF space). A forecast projects the current field on the EOFs, applies ``G`` and
    maps back; the part of the field outside the EOFs is forecast as the training mean.

    Args:
        modes: the number of EOFs.

    Attributes (after :meth:`fit`):
        operator: ``G``, ``(modes, modes)`` float64.
        reducer: the fitted :class:`EOFReducer`.

    Example:
        >>> lim = LinearInverseModel(modes=10).fit(anomalies[split.train], mask[split.train], area_weights(grid))
        >>> forecast = lim.predict(anomalies[t0 - 1:t1 - 1])
    """

    history = 1

    def __init__(self, modes: int = 10):
        if isinstance(modes, bool) or not isinstance(modes, int) or modes < 1:
            raise InputError(f"modes: expected an int >= 1, got {modes!r}")
        self.modes = modes
        self.operator: torch.Tensor | None = None
        self.reducer: EOFReducer | None = None

    def __repr__(self) -> str:
        return f"LinearInverseModel(modes={self.modes})"

    def fit(self, series: torch.Tensor, mask: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> LinearInverseModel:
        """Fit the EOFs and ``G`` on the training series ``(time, channel, lat, lon)`` (time order)."""
        mask = _check_series(series, mask)
        if self.modes > series.shape[0] - 2:
            raise InputError(f"modes: expected at most {series.shape[0] - 2} for {series.shape[0]} training steps, got {self.modes}")
        self.reducer = EOFReducer(modes=self.modes).fit(series, mask, weights)
        z = self.reducer.encode(series.to(torch.float64))
        now, then = z[:-1], z[1:]
        lag0 = now.T @ now / now.shape[0]
        lag1 = then.T @ now / now.shape[0]
        self.operator = torch.linalg.solve(lag0, lag1.T).T  # C(1) C(0)^-1, C(0) symmetric
        return self

    def predict(self, previous: torch.Tensor) -> torch.Tensor:
        """The next fields ``(time, channel, lat, lon)`` from ``previous`` (same shape), in its dtype."""
        if self.operator is None:
            raise NotFittedError("LinearInverseModel: call fit(series, mask, weights) before predict")
        _check_previous(previous, self.reducer.patterns.shape[1:])
        z = self.reducer.encode(previous.to(torch.float64))
        return self.reducer.decode(z @ self.operator.T).to(previous.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.operator is None:
            raise NotFittedError("LinearInverseModel: call fit before state_dict")
        return {"operator": self.operator.clone(), **{f"eof.{k}": v for k, v in self.reducer.state_dict().items()}}
