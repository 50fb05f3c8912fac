"""Anomalies from a training climatology, scaled by a training standard deviation.

:class:`Normaliser` works on tensors ``(time, channel, lat, lon)``; its statistics come from the
training times only, so the held-out part cannot leak into them. A sub-annual climatology (per
calendar month or day of year) uses the group of each time step, which
:func:`calendar_groups` reads from the labelled time coordinate (any cftime calendar).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr

from ..errors import InputError, InputTypeError, NotFittedError, describe
from .grid import Grid, find_grid

SCALES = ("global", "channel", "point", None)


def calendar_groups(da: xr.DataArray, by: str | None = "auto", grid: Grid | None = None) -> torch.Tensor:
    """The climatology group of each time step of ``da``: a long tensor ``(time,)``.

    Args:
        da: the variable (only its time coordinate is read).
        by: ``"month"`` (groups 0-11), ``"dayofyear"`` (0-365; 0-359 in a 360-day calendar),
            ``None`` (one group: the plain mean), or ``"auto"``: by month when the times fall in
            more than one calendar month (sub-annual data), else one group (annual data, or
            times that are plain numbers).
        grid: the layout, found from ``da`` when not given.
    """
    grid = find_grid(da) if grid is None else grid
    n_times = da.sizes[grid.time]
    if by is None:
        return torch.zeros(n_times, dtype=torch.long)
    if by not in ("auto", "month", "dayofyear"):
        raise InputError(f"by: expected 'auto', 'month', 'dayofyear' or None, got {by!r}")
    times = da.coords.get(grid.time)
    try:
        months = np.asarray(times.dt.month.values)
    except (AttributeError, TypeError):
        if by == "auto":
            return torch.zeros(n_times, dtype=torch.long)
        raise InputError(f"{grid.time}: expected datetime values to group by {by}, got {describe(times)}") from None
    if by == "auto":
        by = "month" if np.unique(months).size > 1 else None
        if by is None:
            return torch.zeros(n_times, dtype=torch.long)
    values = months if by == "month" else np.asarray(times.dt.dayofyear.values)
    return torch.as_tensor(values.astype(np.int64) - 1)


def _time_index(train_index, n_times: int) -> torch.Tensor:
    """Indices (long tensor) from a slice, a range, a sequence of ints, or a bool/long tensor."""
    if isinstance(train_index, slice):
        index = torch.arange(n_times)[train_index]
    elif isinstance(train_index, torch.Tensor) and train_index.dtype == torch.bool:
        if train_index.shape != (n_times,):
            raise InputError(f"train_index: expected a bool tensor of shape ({n_times},), got {tuple(train_index.shape)}")
        index = train_index.nonzero().flatten()
    else:
        if isinstance(train_index, torch.Tensor) and train_index.is_floating_point():
            raise InputError(f"train_index: expected integer indices, a slice or a bool tensor, got {describe(train_index)}")
        try:
            index = torch.as_tensor(list(train_index) if isinstance(train_index, range) else train_index, dtype=torch.long).flatten()
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise InputError(f"train_index: expected integer indices, a slice or a bool tensor, got {describe(train_index)}") from None
    if index.numel() == 0:
        raise InputError(f"train_index: expected at least one training time step out of {n_times}, got none")
    if int(index.min()) < -n_times or int(index.max()) >= n_times:
        raise InputError(f"train_index: expected indices into {n_times} time steps, got {int(index.min())}..{int(index.max())}")
    return index % n_times


def _check_field(values, mask, name="values"):
    if not isinstance(values, torch.Tensor) or values.dim() != 4 or not values.is_floating_point():
        raise InputError(f"{name}: expected a floating tensor (time, channel, lat, lon), got {describe(values)}")
    if mask is None:
        return torch.ones_like(values, dtype=torch.bool)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise InputTypeError(f"mask: expected a bool tensor like {name}, got {describe(mask)}")
    try:
        return mask.expand_as(values)
    except RuntimeError:
        raise InputError(f"mask: expected a shape broadcastable to {tuple(values.shape)}, got {tuple(mask.shape)}") from None


@dataclass
class Normaliser:
    """``(x - climatology[group]) / scale``, with both fitted on the training times only.

    Args:
        scale: ``"global"``: one standard deviation of the training anomalies over every
            channel, point and time; ``"channel"``: one per channel; ``"point"``: one per channel
            and grid point; ``None``: anomalies only (scale 1). A zero deviation counts as 1.

    Example:
        >>> normaliser = Normaliser(scale="global").fit(values, mask, train_index=split.train)
        >>> anomalies = normaliser.transform(values, mask)
        >>> torch.testing.assert_close(normaliser.inverse(anomalies, mask), values)
    """

    scale: str | None = "global"
    climatology: torch.Tensor | None = field(default=None, repr=False)  # (group, channel, lat, lon)
    std: torch.Tensor | None = field(default=None, repr=False)  # broadcastable to (1, channel, lat, lon)
    counts: torch.Tensor | None = field(default=None, repr=False)  # (group, channel, lat, lon): training samples

    def __post_init__(self):
        if self.scale not in SCALES:
            raise InputError(f"scale: expected one of {SCALES}, got {self.scale!r}")

    def fit(self, values: torch.Tensor, mask: torch.Tensor | None, train_index, groups: torch.Tensor | None = None):
        """Fit the climatology and scale on ``values[train_index]``.

        Args:
            values: ``(time, channel, lat, lon)``; masked entries are ignored.
            mask: bool, broadcastable to ``values`` (True = valid), or ``None`` (all valid).
            train_index: the training times: a slice, indices, or a bool tensor ``(time,)``.
            groups: long tensor ``(time,)`` of climatology groups (:func:`calendar_groups`) for
                every time of ``values``; ``None``: one group (the mean).

        Returns:
            ``self``.
        """
        mask = _check_field(values, mask)
        index = _time_index(train_index, values.shape[0])
        groups = self._groups(groups, values.shape[0], fitting=True)[index]
        x, valid = values[index].double(), mask[index]
        used = x[valid]
        if not bool(torch.isfinite(used).all()) or (used.numel() and float(used.abs().max()) > 1e150):
            raise InputError(
                "values: expected finite values below 1e150 in magnitude where the mask is True (mark missing values "
                "False in mask), got NaN, inf or larger values"
            )
        n_groups = int(groups.max()) + 1
        one_hot = torch.nn.functional.one_hot(groups, n_groups).double()  # (time, group)
        counts = torch.einsum("tg,tcyx->gcyx", one_hot, valid.double())
        sums = torch.einsum("tg,tcyx->gcyx", one_hot, torch.where(valid, x, 0))
        climatology = sums / counts.clamp_min(1)
        anomalies = torch.where(valid, x - climatology[groups], 0)
        dims = {"global": (0, 1, 2, 3), "channel": (0, 2, 3), "point": (0,), None: None}[self.scale]
        if dims is None:
            std = torch.ones(1, 1, 1, 1, dtype=torch.float64)
        else:
            n = valid.sum(dims, keepdim=True).double()
            std = (anomalies.pow(2).sum(dims, keepdim=True) / (n - 1).clamp_min(1)).sqrt()
            std = torch.where(std > 0, std, 1)
        if not bool(torch.isfinite(std.to(values.dtype)).all()) or not bool(torch.isfinite(climatology.to(values.dtype)).all()):
            raise InputError(f"values: their spread overflows {values.dtype}; normalise them in torch.float64")
        self.climatology, self.std, self.counts = climatology.to(values.dtype), std.to(values.dtype), counts.to(torch.int64)
        return self

    def _groups(self, groups, n_times: int, fitting: bool = False) -> torch.Tensor:
        if groups is None:
            if not fitting and self.climatology.shape[0] > 1:
                raise InputError(f"groups: expected the calendar group of each of the {n_times} times (fitted with {self.climatology.shape[0]} groups), got None")
            return torch.zeros(n_times, dtype=torch.long)
        if not isinstance(groups, torch.Tensor) or groups.dtype != torch.long or groups.shape != (n_times,):
            raise InputError(f"groups: expected a long tensor of shape ({n_times},), got {describe(groups)}")
        if int(groups.min()) < 0:
            raise InputError(f"groups: expected group numbers >= 0, got {int(groups.min())}")
        if not fitting:
            n_fitted = self.climatology.shape[0]
            seen = self.counts.flatten(1).amax(1) > 0
            unseen = [int(g) for g in groups.unique() if int(g) >= n_fitted or not bool(seen[int(g)])]
            if unseen:
                raise InputError(f"groups: groups {unseen} have no training time step, so no climatology")
        return groups

    def _fitted(self):
        if self.climatology is None:
            raise NotFittedError("Normaliser: call fit(values, mask, train_index) (or load_state_dict) before transform/inverse")

    def transform(self, values: torch.Tensor, mask: torch.Tensor | None = None, groups: torch.Tensor | None = None) -> torch.Tensor:
        """``(values - climatology[groups]) / scale``; 0 where masked."""
        self._fitted()
        mask = _check_field(values, mask)
        climatology = self.climatology[self._groups(groups, values.shape[0])].to(values)
        return torch.where(mask, (values - climatology) / self.std.to(values), 0)

    def inverse(self, values: torch.Tensor, mask: torch.Tensor | None = None, groups: torch.Tensor | None = None) -> torch.Tensor:
        """``values * scale + climatology[groups]``; 0 where masked."""
        self._fitted()
        mask = _check_field(values, mask)
        climatology = self.climatology[self._groups(groups, values.shape[0])].to(values)
        return torch.where(mask, values * self.std.to(values) + climatology, 0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so the state loads with ``torch.load(..., weights_only=True)``."""
        self._fitted()
        return {"climatology": self.climatology.clone(), "std": self.std.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> Normaliser:
        expected = {"climatology", "std", "counts"}
        if not isinstance(state, dict) or set(state) != expected:
            raise InputError(f"state: expected keys {sorted(expected)}, got {sorted(state) if isinstance(state, dict) else describe(state)}")
        climatology, std, counts = state["climatology"], state["std"], state["counts"]
        if climatology.dim() != 4 or counts.shape != climatology.shape or std.dim() != 4:
            raise InputError(
                f"state: expected climatology and counts (group, channel, lat, lon) and a 4-D std, got shapes "
                f"{tuple(climatology.shape)}, {tuple(counts.shape)}, {tuple(std.shape)}"
            )
        self.climatology, self.std, self.counts = climatology.clone(), std.clone(), counts.clone()
        return self
