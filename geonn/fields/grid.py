"""Which dimensions of a gridded ``xarray.DataArray`` are time, latitude and longitude.

A dimension takes a role from the first evidence found, strongest first: the CF ``standard_name``
of its coordinate, its ``axis`` attribute (T/Y/X), its ``units`` (``degrees_north``,
``degrees_east``, ``<unit> since <date>``, or datetime values), then its name (``time``/``t``,
``lat``/``latitude``/``y``/``rlat``, ``lon``/``longitude``/``x``/``rlon``). Every other dimension
(level, member, ...) is a channel. The result, a :class:`Grid`, remembers the user's layout so
tensors can be put back into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from ..errors import InputError, InputTypeError, describe

ROLES = ("time", "lat", "lon")
NAMES = {
    "time": {"time", "t"},
    "lat": {"lat", "latitude", "y", "rlat"},
    "lon": {"lon", "longitude", "x", "rlon"},
}
STANDARD_NAMES = {
    "time": {"time"},
    "lat": {"latitude", "grid_latitude"},
    "lon": {"longitude", "grid_longitude"},
}
AXES = {"T": "time", "Y": "lat", "X": "lon"}
UNITS = {
    "lat": {"degrees_north", "degree_north", "degree_n", "degrees_n", "degreen", "degreesn"},
    "lon": {"degrees_east", "degree_east", "degree_e", "degrees_e", "degreee", "degreese"},
}


@dataclass(frozen=True)
class Grid:
    """The layout of a gridded variable, and how it maps to tensors ``(time, channel, lat, lon)``.

    Attributes:
        time, lat, lon: the names of the time, latitude and longitude dimensions.
        channels: the other dimensions, in the variable's order; they are flattened (C order)
            into the tensor's channel axis.
        dims: all dimension names in the variable's order (the layout outputs go back to).
        sizes: the size of each dimension in ``dims``.
        lat_descending: latitude runs north to south in the variable; tensors always run south
            to north, and outputs are flipped back.
        latitudes: latitude of each tensor row in degrees (south to north), or ``None`` where
            the latitude dimension has no coordinate.
    """

    time: str
    lat: str
    lon: str
    channels: tuple[str, ...]
    dims: tuple[str, ...]
    sizes: tuple[int, ...]
    lat_descending: bool = False
    latitudes: tuple[float, ...] | None = field(default=None, repr=False)

    def size(self, dim: str) -> int:
        return self.sizes[self.dims.index(dim)]

    @property
    def channel_sizes(self) -> tuple[int, ...]:
        return tuple(self.size(d) for d in self.channels)

    @property
    def n_channels(self) -> int:
        return int(np.prod(self.channel_sizes, dtype=np.int64))

    @property
    def tensor_dims(self) -> tuple[str, ...]:
        """The variable's dimensions in tensor order before the channels are flattened."""
        return (self.time, *self.channels, self.lat, self.lon)

    def tensor_shape(self, n_times: int | None = None) -> tuple[int, int, int, int]:
        """``(time, channel, lat, lon)``; ``n_times`` replaces the variable's number of times."""
        n_times = self.size(self.time) if n_times is None else n_times
        return (n_times, self.n_channels, self.size(self.lat), self.size(self.lon))


def _role_from_attrs(coord: xr.DataArray) -> str | None:
    attrs = coord.attrs
    standard_name = str(attrs.get("standard_name", "")).lower()
    for role, names in STANDARD_NAMES.items():
        if standard_name in names:
            return role
    axis = str(attrs.get("axis", "")).upper()
    if axis in AXES:
        return AXES[axis]
    units = str(attrs.get("units", coord.encoding.get("units", ""))).lower().replace(" ", "")
    for role, accepted in UNITS.items():
        if units in accepted:
            return role
    if " since " in str(attrs.get("units", coord.encoding.get("units", ""))) or _is_datetime(coord):
        return "time"
    return None


def _is_datetime(coord: xr.DataArray) -> bool:
    if np.issubdtype(coord.dtype, np.datetime64):
        return True
    return coord.dtype == object and coord.size > 0 and type(coord.values.flat[0]).__module__.startswith("cftime")


def _role(da: xr.DataArray, dim: str) -> tuple[str | None, str]:
    """The role of ``dim`` and the evidence for it."""
    if dim in da.coords:
        role = _role_from_attrs(da.coords[dim])
        if role is not None:
            return role, "attributes"
    for role, names in NAMES.items():
        if str(dim).lower() in names:
            return role, "name"
    return None, ""


def find_grid(da: xr.DataArray, *, time: str | None = None, lat: str | None = None, lon: str | None = None) -> Grid:
    """Find the time, latitude and longitude dimensions of ``da``; the others become channels.

    Args:
        da: a variable with a time, a latitude and a longitude dimension (any order, any other
            dimensions besides).
        time, lat, lon: name a dimension outright where detection would fail or be ambiguous.

    Raises:
        InputTypeError: ``da`` is not a DataArray (a Dataset must be indexed by variable first).
        InputError: a role has no dimension, or two; the message lists the dimensions and their attributes.

    Example:
        >>> grid = find_grid(ds["air_temperature"])
        >>> grid.time, grid.lat, grid.lon, grid.channels
        ('time', 'latitude', 'longitude', ())
    """
    if isinstance(da, xr.Dataset):
        raise InputTypeError(f"da: expected an xarray.DataArray, got a Dataset; pick one variable, e.g. ds[{next(iter(da.data_vars), 'name')!r}]")
    if not isinstance(da, xr.DataArray):
        raise InputTypeError(f"da: expected an xarray.DataArray, got {describe(da)}")
    given = {"time": time, "lat": lat, "lon": lon}
    for role, name in given.items():
        if name is not None and name not in da.dims:
            raise InputError(f"{role}: expected one of the dimensions {da.dims}, got {name!r}")
    found: dict[str, list[tuple[str, str]]] = {role: [] for role in ROLES}
    for dim in da.dims:
        if dim in given.values():
            continue
        role, evidence = _role(da, dim)
        if role is not None and given[role] is None:
            found[role].append((dim, evidence))
    chosen = {}
    for role in ROLES:
        if given[role] is not None:
            chosen[role] = given[role]
            continue
        candidates = found[role]
        by_attrs = [d for d, evidence in candidates if evidence == "attributes"]
        if len(by_attrs) == 1:
            candidates = [(by_attrs[0], "attributes")]
        if len(candidates) != 1:
            problem = "no dimension" if not candidates else f"several dimensions {[d for d, _ in candidates]}"
            raise InputError(
                f"{da.name or 'variable'}: expected one {role} dimension, found {problem} among {_describe_dims(da)}; "
                f"name it (find_grid(da, {role}='...')), rename it, or give its coordinate CF attributes "
                f"(standard_name/axis/units)"
            )
        chosen[role] = candidates[0][0]
    lat_name = chosen["lat"]
    latitudes, descending = None, False
    if lat_name in da.coords and da.coords[lat_name].ndim == 1 and np.issubdtype(da.coords[lat_name].dtype, np.number):
        values = np.asarray(da.coords[lat_name].values, dtype=np.float64)
        descending = bool(values.size > 1 and values[0] > values[-1])
        latitudes = tuple(float(v) for v in (values[::-1] if descending else values))
    return Grid(
        time=chosen["time"],
        lat=lat_name,
        lon=chosen["lon"],
        channels=tuple(d for d in da.dims if d not in chosen.values()),
        dims=tuple(da.dims),
        sizes=tuple(int(da.sizes[d]) for d in da.dims),
        lat_descending=descending,
        latitudes=latitudes,
    )


def _describe_dims(da: xr.DataArray) -> str:
    parts = []
    for dim in da.dims:
        attrs = da.coords[dim].attrs if dim in da.coords else {}
        keys = {k: attrs[k] for k in ("standard_name", "axis", "units") if k in attrs}
        parts.append(f"{dim} {keys}" if keys else f"{dim} (no coordinate attributes)")
    return "[" + ", ".join(parts) + "]"


def check_grid(da: xr.DataArray, grid: Grid, name: str = "da") -> None:
    """Raise unless ``da`` has exactly the dimensions of ``grid`` (any sizes along time)."""
    if not isinstance(da, xr.DataArray):
        raise InputTypeError(f"{name}: expected an xarray.DataArray, got {describe(da)}")
    if tuple(da.dims) != grid.dims:
        raise InputError(f"{name}: expected dimensions {grid.dims} (those of the grid), got {tuple(da.dims)}")
    for dim, size in zip(grid.dims, grid.sizes):
        if dim != grid.time and da.sizes[dim] != size:
            raise InputError(f"{name}: expected {dim} of size {size} (that of the grid), got {da.sizes[dim]}")
