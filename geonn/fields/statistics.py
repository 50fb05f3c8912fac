"""Distribution scores of sets of gridded fields ``(sample, channel, lat, lon)``: spectra and point-wise W1.

These compare a set of generated fields with a set of reference fields (for instance held-out
years) without pairing them, so they score a generator rather than a forecast:

- :func:`power_spectrum`: the radially averaged power spectrum of the fields (2-D FFT over
  latitude and longitude), averaged over samples and channels.
- :func:`spectrum_error`: the mean absolute ``log10`` ratio of two such spectra over the
  wavenumbers ``1 .. Nyquist`` (the domain mean, wavenumber 0, is left out).
- :func:`wasserstein_pointwise`: the 1-D Wasserstein distance between the values the two sets
  take at each grid point, area-weighted over the points.
"""

from __future__ import annotations

import torch

from ..errors import InputError, describe

FILLS = ("zero", "mean")


def _fields(name: str, values) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) or values.dim() != 4 or not values.is_floating_point() or values.shape[0] == 0:
        raise InputError(f"{name}: expected a non-empty floating tensor (sample, channel, lat, lon), got {describe(values)}")
    return values


def _mask(name: str, mask, values: torch.Tensor) -> torch.Tensor:
    """The validity mask broadcast to ``values``: given, or where ``values`` is finite (NaN = missing)."""
    finite = torch.isfinite(values)
    if mask is None:
        return finite
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise InputError(f"{name}: expected a bool tensor broadcastable to {tuple(values.shape)}, got {describe(mask)}")
    try:
        return torch.broadcast_to(mask, values.shape) & finite
    except RuntimeError:
        raise InputError(f"{name}: expected a shape broadcastable to {tuple(values.shape)}, got {tuple(mask.shape)}") from None


def radial_wavenumbers(n_lat: int, n_lon: int) -> torch.Tensor:
    """Bin centres of :func:`power_spectrum`: ``k / max(n_lat, n_lon)`` cycles per grid step, ``k = 0 .. K``.

    ``K = max(n_lat, n_lon) // 2``, so the last bin is the Nyquist wavenumber of the longer side.
    """
    n = max(n_lat, n_lon)
    return torch.arange(n // 2 + 1, dtype=torch.float64) / n


def power_spectrum(values: torch.Tensor, mask: torch.Tensor | None = None, *, fill: str = "zero") -> torch.Tensor:
    """The radially averaged power spectrum of fields, averaged over samples and channels.

    Each field (one sample, one channel, ``(lat, lon)``) is Fourier transformed in 2-D after its
    masked points are filled: with 0 (``fill="zero"``: right for anomalies, where 0 is the
    climatology) or with the mean of its valid points (``fill="mean"``). The power
    ``|F(ky, kx)|^2 / (n_lat n_lon)`` is placed at ``k = sqrt(ky^2 + kx^2)``, ``ky`` and ``kx`` in
    cycles per grid step (``numpy.fft.fftfreq``), so a wave of the same wavelength in grid steps
    lands in the same bin along either axis; bins are ``1 / max(n_lat, n_lon)`` wide and centred on
    :func:`radial_wavenumbers` (the corners beyond the last bin are left out), and the spectrum is
    the mean power over the frequencies in each bin. With this normalisation the powers over all
    frequencies sum to the field's sum of squares (Parseval). A regional grid is not periodic: the
    jump between opposite edges adds power at all wavenumbers, the same way for every set compared.

    Args:
        values: ``(sample, channel, lat, lon)``; NaN counts as masked.
        mask: bool, broadcastable to ``values`` (True = valid), or None (valid where finite).
        fill: ``"zero"`` or ``"mean"``.

    Returns:
        ``(K + 1,)`` float64 mean power per bin, in the fields' units squared; a bin without
        frequencies (none on small grids) is NaN.

    Example:
        >>> k = radial_wavenumbers(37, 49)
        >>> spectrum = power_spectrum(samples, fill="zero")   # (25,)
    """
    values = _fields("values", values)
    valid = _mask("mask", mask, values)
    if fill not in FILLS:
        raise InputError(f"fill: expected one of {FILLS}, got {fill!r}")
    x = torch.where(valid, values.double(), 0.0)
    if fill == "mean":
        count = valid.sum((-2, -1), keepdim=True)
        mean = x.sum((-2, -1), keepdim=True) / count.clamp_min(1)
        x = torch.where(valid, x, mean)
    n_lat, n_lon = x.shape[-2:]
    power = torch.fft.fft2(x).abs().pow(2).mean((0, 1)) / (n_lat * n_lon)  # (lat, lon)
    ky = torch.fft.fftfreq(n_lat, dtype=torch.float64)[:, None]
    kx = torch.fft.fftfreq(n_lon, dtype=torch.float64)[None, :]
    n = max(n_lat, n_lon)
    bins = torch.round(torch.sqrt(ky**2 + kx**2) * n).long().flatten()
    n_bins = n // 2 + 1
    keep = bins < n_bins
    total = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins[keep], power.flatten()[keep])
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins[keep], torch.ones_like(power.flatten()[keep]))
    return torch.where(count > 0, total / count.clamp_min(1), float("nan"))


def spectrum_error(spectrum: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean absolute ``log10(spectrum / reference)`` over the wavenumbers ``1 .. K`` (dimensionless).

    0 for identical spectra; 0.301 when one has twice the power of the other at every wavenumber.
    Bin 0 (the domain mean) is left out; bins where either spectrum is NaN or not positive are
    skipped.

    Args:
        spectrum: ``(K + 1,)`` from :func:`power_spectrum`, e.g. of generated fields.
        reference: the same for the reference fields (held-out data).
    """
    for name, value in (("spectrum", spectrum), ("reference", reference)):
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.shape[0] < 2:
            raise InputError(f"{name}: expected a 1-D tensor of at least 2 bins from power_spectrum, got {describe(value)}")
    if spectrum.shape != reference.shape:
        raise InputError(f"spectrum: expected the shape of reference {tuple(reference.shape)}, got {tuple(spectrum.shape)}")
    a, b = spectrum[1:].double(), reference[1:].double()
    usable = torch.isfinite(a) & torch.isfinite(b) & (a > 0) & (b > 0)
    if not bool(usable.any()):
        raise InputError("spectrum/reference: expected some wavenumber >= 1 with positive power in both, got none")
    return torch.log10(a[usable] / b[usable]).abs().mean()


def wasserstein_pointwise(samples: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor | None = None,
                          samples_mask: torch.Tensor | None = None, reference_mask: torch.Tensor | None = None,
                          *, per_point: bool = False) -> torch.Tensor:
    """The 1-D Wasserstein distance ``W1`` between the values of two sets of fields at each point.

    At each (channel, lat, lon) point, ``W1 = integral |F_s(x) - F_r(x)| dx`` between the empirical
    distribution functions of the samples' values and of the reference's values there (the
    formula of ``scipy.stats.wasserstein_distance``, vectorised over points; the two sets may have
    different sizes, and masked values are left out of each point's distribution). The result is
    the area-weighted mean over the points that have a valid value in both sets, channels pooled.

    Args:
        samples: ``(n, channel, lat, lon)``; NaN counts as masked.
        reference: ``(m, channel, lat, lon)``.
        weights: area weights broadcastable to ``(lat, lon)`` (e.g. :func:`geonn.fields.area_weights`),
            or None for equal weights.
        samples_mask, reference_mask: bool masks broadcastable to each set (True = valid), or None.
        per_point: return the ``(channel, lat, lon)`` distances (NaN where unscored) instead.

    Returns:
        A scalar (float64) in the fields' units.

    Example:
        >>> wasserstein_pointwise(generated, heldout, area_weights(grid))
    """
    samples, reference = _fields("samples", samples), _fields("reference", reference)
    if samples.shape[1:] != reference.shape[1:]:
        raise InputError(f"samples: expected fields of the reference's shape {tuple(reference.shape[1:])}, got {tuple(samples.shape[1:])}")
    valid_s = _mask("samples_mask", samples_mask, samples).flatten(1)
    valid_r = _mask("reference_mask", reference_mask, reference).flatten(1)
    s = torch.where(valid_s, samples.double().flatten(1), 0.0).T  # (points, n)
    r = torch.where(valid_r, reference.double().flatten(1), 0.0).T  # (points, m)
    ws, wr = valid_s.T.double(), valid_r.T.double()
    count_s, count_r = ws.sum(1), wr.sum(1)
    scored = (count_s > 0) & (count_r > 0)

    def cdf(values, weight, count, at):
        ordered, order = values.sort(dim=1)
        cumulative = torch.cat((torch.zeros_like(count)[:, None], weight.gather(1, order).cumsum(1)), 1)
        index = torch.searchsorted(ordered.contiguous(), at.contiguous(), right=True)
        return cumulative.gather(1, index) / count.clamp_min(1)[:, None]

    every = torch.cat((s, r), 1).sort(dim=1).values
    at = every[:, :-1]
    distance = ((cdf(s, ws, count_s, at) - cdf(r, wr, count_r, at)).abs() * every.diff(dim=1)).sum(1)
    distance = torch.where(scored, distance, float("nan")).reshape(samples.shape[1:])
    if per_point:
        return distance
    weight = torch.ones(samples.shape[-2:], dtype=torch.float64) if weights is None else weights.double()
    try:
        weight = torch.broadcast_to(weight, distance.shape) * scored.reshape(distance.shape)
    except RuntimeError:
        raise InputError(f"weights: expected a shape broadcastable to (lat, lon) {tuple(samples.shape[-2:])}, got {describe(weights)}") from None
    if bool((weight < 0).any()) or not bool(weight.sum() > 0):
        raise InputError("weights/masks: expected non-negative weights and some scored point of positive weight, got none")
    return (weight * torch.nan_to_num(distance)).sum() / weight.sum()
