"""Empirical orthogonal functions (EOF, principal components) as a linear reducer of fields.

The fields ``(time, channel, lat, lon)`` are weighted by ``sqrt(w)`` (``w`` the area weights),
so squared norms are area-weighted sums; points masked at any training time, or of zero
weight, are left out. The patterns are the leading right singular vectors of the weighted,
time-centred training matrix (``time x point``), computed in float64.
"""

from __future__ import annotations

import torch

from ..errors import InputError, NotFittedError, describe

_STATE_KEYS = ("components", "singular_values", "total_variance", "mean", "sqrt_weights", "used")


class EOFReducer:
    """Encode fields to their leading ``modes`` principal components and decode them back.

    Args:
        modes: the number K of EOFs kept (at most ``min(time, points)`` of the training data).
        center: subtract the per-point training mean before the decomposition (and add it back).
            Anomalies from a training climatology already have (near) zero mean.

    Attributes (after :meth:`fit`):
        explained_variance_ratio: ``(K,)`` share of the weighted training variance per mode,
            ``s_k**2 / sum(s**2)`` over all modes.
        patterns: ``(K, *field_shape)`` the EOFs in the weighted space (unit norm over used
            points, 0 elsewhere), sign fixed so each pattern's largest entry is positive.

    Example:
        >>> reducer = EOFReducer(modes=10).fit(anomalies[split.train], mask[split.train], area_weights(grid))
        >>> latent = reducer.encode(anomalies[split.test])          # (time, 10)
        >>> reconstruction = reducer.decode(latent)                  # (time, channel, lat, lon)
    """

    def __init__(self, modes: int, *, center: bool = True):
        if isinstance(modes, bool) or not isinstance(modes, int) or modes < 1:
            raise InputError(f"modes: expected an int >= 1, got {modes!r}")
        self.modes, self.center = modes, center
        self._state: dict[str, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return f"EOFReducer(modes={self.modes}, center={self.center})"

    def fit(self, values: torch.Tensor, mask: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> EOFReducer:
        """Fit the EOFs to training fields.

        Args:
            values: ``(time, *field_shape)``, e.g. ``(time, channel, lat, lon)``.
            mask: bool, broadcastable to ``values`` (True = valid); a point is used only where
                valid at every training time.
            weights: area weights broadcastable to ``field_shape`` (e.g. ``(lat, lon)``), or ``None``.

        Returns:
            ``self``.
        """
        if not isinstance(values, torch.Tensor) or values.dim() < 2 or not values.is_floating_point():
            raise InputError(f"values: expected a floating tensor (time, *field_shape), got {describe(values)}")
        field_shape = tuple(values.shape[1:])
        used = torch.ones(field_shape, dtype=torch.bool)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise InputError(f"mask: expected a bool tensor broadcastable to {tuple(values.shape)}, got {describe(mask)}")
            try:
                used = used & torch.broadcast_to(mask, values.shape).all(0)
            except RuntimeError:
                raise InputError(f"mask: expected a bool tensor broadcastable to {tuple(values.shape)}, got {describe(mask)}") from None
        weight = torch.ones(field_shape, dtype=torch.float64)
        if weights is not None:
            try:
                extra = weights.dim() - len(field_shape)  # leading size-1 dims, e.g. (1, channel, lat, lon)
                if extra > 0 and set(weights.shape[:extra]) != {1}:
                    raise RuntimeError
                weight = torch.broadcast_to(weights.to(torch.float64).reshape(weights.shape[max(extra, 0):]), field_shape).clone()
            except (RuntimeError, AttributeError):
                raise InputError(f"weights: expected a shape broadcastable to the field {field_shape}, got {describe(weights)}") from None
            if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
                raise InputError("weights: expected finite, non-negative weights, got some negative, NaN or inf")
        used = used & (weight > 0)
        n_times, n_used = values.shape[0], int(used.sum())
        if self.modes > min(n_times, n_used):
            raise InputError(f"modes: expected at most min(time, used points) = min({n_times}, {n_used}), got {self.modes}")
        x = values.detach().to(torch.float64).reshape(n_times, -1)
        flat_used = used.flatten()
        if not bool(torch.isfinite(x[:, flat_used]).all()):
            raise InputError("values: expected finite values where the mask is True (mark missing values False in mask), got NaN or inf")
        valid = torch.ones_like(x, dtype=torch.bool) if mask is None else torch.broadcast_to(mask, values.shape).reshape(n_times, -1)
        count = valid.sum(0).clamp_min(1)
        mean = torch.where(valid, x, 0).sum(0) / count if self.center else torch.zeros(x.shape[1], dtype=torch.float64)
        sqrt_weights = weight.flatten().sqrt()
        matrix = (x[:, flat_used] - mean[flat_used]) * sqrt_weights[flat_used]
        _, singular_values, vh = torch.linalg.svd(matrix, full_matrices=False)
        components = vh[: self.modes]
        largest = components.gather(1, components.abs().argmax(1, keepdim=True))
        components = components * torch.sign(largest).where(largest != 0, torch.ones_like(largest))
        self._state = {
            "components": components,  # (K, used points)
            "singular_values": singular_values[: self.modes].clone(),
            "total_variance": singular_values.pow(2).sum().reshape(1),
            "mean": mean.reshape(field_shape),
            "sqrt_weights": sqrt_weights.reshape(field_shape),
            "used": used,
        }
        return self

    def _fitted(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            raise NotFittedError("EOFReducer: call fit(values, mask, weights) (or load_state_dict) before encode/decode")
        return self._state

    @property
    def explained_variance_ratio(self) -> torch.Tensor:
        state = self._fitted()
        return state["singular_values"].pow(2) / state["total_variance"]

    @property
    def patterns(self) -> torch.Tensor:
        state = self._fitted()
        out = torch.zeros((self.modes, state["used"].numel()), dtype=torch.float64)
        out[:, state["used"].flatten()] = state["components"]
        return out.reshape(self.modes, *state["used"].shape)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """The principal components ``(time, K)`` of ``values`` ``(time, *field_shape)``, in their dtype."""
        state = self._fitted()
        field_shape = tuple(state["used"].shape)
        if not isinstance(values, torch.Tensor) or tuple(values.shape[1:]) != field_shape or values.dim() < 2:
            raise InputError(f"values: expected a tensor (time, *{field_shape}), got {describe(values)}")
        used = state["used"].flatten()
        x = values.detach().to(torch.float64).reshape(values.shape[0], -1)[:, used]
        weighted = (x - state["mean"].flatten()[used]) * state["sqrt_weights"].flatten()[used]
        latent = weighted @ state["components"].T
        return latent.to(values.dtype if values.is_floating_point() else torch.float64)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Fields ``(time, *field_shape)`` from principal components ``(time, K)``; unused points get the mean."""
        state = self._fitted()
        if not isinstance(latent, torch.Tensor) or latent.dim() != 2 or latent.shape[1] != self.modes:
            raise InputError(f"latent: expected a tensor (time, {self.modes}), got {describe(latent)}")
        used = state["used"].flatten()
        weighted = latent.to(torch.float64) @ state["components"]
        out = state["mean"].flatten().repeat(latent.shape[0], 1)
        out[:, used] += weighted / state["sqrt_weights"].flatten()[used]
        return out.reshape(latent.shape[0], *state["used"].shape).to(latent.dtype if latent.is_floating_point() else torch.float64)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so the state loads with ``torch.load(..., weights_only=True)``."""
        return {key: value.clone() for key, value in self._fitted().items()}

    def load_state_dict(self, state: dict) -> EOFReducer:
        if not isinstance(state, dict) or set(state) != set(_STATE_KEYS):
            raise InputError(f"state: expected keys {sorted(_STATE_KEYS)}, got {sorted(state) if isinstance(state, dict) else describe(state)}")
        if state["components"].shape[0] != self.modes:
            raise InputError(f"state: expected {self.modes} modes (components of shape ({self.modes}, points)), got {tuple(state['components'].shape)}")
        self._state = {key: state[key].clone() for key in _STATE_KEYS}
        return self


def fit_eof_blocks(blocks, modes: int, weights: torch.Tensor, used: torch.Tensor, *, oversample: int = 10,
                   power_iterations: int = 3, seed: int = 0) -> EOFReducer:
    """EOFs of data too large for memory, by a randomised SVD over passes of time blocks (halko2011).

    The weighted training matrix ``A = x * sqrt(w)`` (``time x used points``; ``x`` anomalies
    whose training mean is zero, e.g. from :class:`geonn.fields.Normaliser`) is never formed: each
    pass streams its time blocks once, computing ``A @ Q`` or ``A.T @ Q`` for ``modes + oversample``
    vectors. ``power_iterations`` sharpen the leading subspace (error shrinks like
    ``(s_{K+p+1} / s_K)^(2q+1)``); the whole fit reads the training data ``2 q + 2`` times.

    Args:
        blocks: a callable returning a fresh iterator of ``(steps, values, mask)`` over the
            training time steps in order (:func:`geonn.fields.blocks.time_blocks` after normalising),
            ``values`` of shape ``(block, *field_shape)``.
        modes: K.
        weights: area weights broadcastable to ``field_shape``.
        used: bool ``field_shape``: the points valid at every training time (others left out).
        oversample, power_iterations, seed: the randomised SVD's settings.

    Returns:
        A fitted :class:`EOFReducer` (``center`` off: the anomalies are taken as centred).
    """
    field_shape = tuple(used.shape)
    sqrt_weights = torch.broadcast_to(weights.to(torch.float64), field_shape).sqrt()
    used = used & (sqrt_weights > 0)
    flat_used = used.flatten()
    n_used = int(flat_used.sum())
    width = min(modes + oversample, n_used)
    if modes > n_used:
        raise InputError(f"modes: expected at most the {n_used} points valid at every training time, got {modes}")
    generator = torch.Generator().manual_seed(seed)
    sw = sqrt_weights.flatten()[flat_used]

    def rows(values):
        return values.detach().to(torch.float64).reshape(values.shape[0], -1)[:, flat_used] * sw

    def times_matrix(right):  # A @ right: (time, width)
        return torch.cat([rows(values) @ right for _, values, _ in blocks()])

    def transpose_times(left):  # A.T @ left: (points, width)
        total, start = torch.zeros(n_used, left.shape[1], dtype=torch.float64), 0
        for _, values, _ in blocks():
            a = rows(values)
            total += a.T @ left[start:start + a.shape[0]]
            start += a.shape[0]
        return total

    y = times_matrix(torch.randn(n_used, width, generator=generator, dtype=torch.float64))
    if y.shape[0] < modes:
        raise InputError(f"modes: expected at most the {y.shape[0]} training time steps, got {modes}")
    for _ in range(power_iterations):
        q, _ = torch.linalg.qr(y)
        z, _ = torch.linalg.qr(transpose_times(q))
        y = times_matrix(z)
    q, _ = torch.linalg.qr(y)
    b = torch.zeros(q.shape[1], n_used, dtype=torch.float64)
    total_variance, start = torch.zeros(1, dtype=torch.float64), 0
    for _, values, _ in blocks():
        a = rows(values)
        b += q[start:start + a.shape[0]].T @ a
        total_variance += a.pow(2).sum()
        start += a.shape[0]
    _, singular_values, vh = torch.linalg.svd(b, full_matrices=False)
    components = vh[:modes]
    largest = components.gather(1, components.abs().argmax(1, keepdim=True))
    components = components * torch.sign(largest).where(largest != 0, torch.ones_like(largest))
    reducer = EOFReducer(modes, center=False)
    return reducer.load_state_dict({
        "components": components, "singular_values": singular_values[:modes].clone(), "total_variance": total_variance,
        "mean": torch.zeros(field_shape, dtype=torch.float64), "sqrt_weights": sqrt_weights.clone(), "used": used,
    })
