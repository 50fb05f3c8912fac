"""Gridded fields at the xarray boundary: dimension detection, exact round trips, masks, area weights,
normalisation from the training part only, the time split, lazy batches, scores and the EOF reducer."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import xarray as xr

from geonn.emulators import EOFReducer
from geonn.errors import InputError, InputTypeError, NotFittedError
from geonn.fields import (
    FieldBatches,
    Normaliser,
    area_weights,
    calendar_groups,
    explained_variance,
    find_grid,
    from_tensor,
    time_split,
    to_tensor,
    weighted_rmse,
)
from geonn.io import load_checkpoint, save_checkpoint, write_netcdf

LAT_ATTRS = {"standard_name": "latitude", "units": "degrees_north", "axis": "Y"}
LON_ATTRS = {"standard_name": "longitude", "units": "degrees_east", "axis": "X"}


def make_field(
    n_times=6, n_lat=5, n_lon=7, *, dims=("time", "lat", "lon"), descending=False, calendar=None, freq="YS",
    land=False, level=None, attrs=True, seed=0, dtype=np.float32,
):
    """A small field with CF attributes, a name, attrs and an encoding; ``dims`` in the given order."""
    rng = np.random.default_rng(seed)
    time_name, lat_name, lon_name = dims
    latitudes = np.linspace(-60, 60, n_lat)[::-1] if descending else np.linspace(-60, 60, n_lat)
    if calendar is None:
        times = np.arange(n_times, dtype=np.float64)
    else:
        times = xr.date_range("2000-01-01", periods=n_times, freq=freq, calendar=calendar, use_cftime=True)
    coords = {
        time_name: (time_name, times, {"standard_name": "time"} if attrs else {}),
        lat_name: (lat_name, latitudes, LAT_ATTRS if attrs else {}),
        lon_name: (lon_name, np.linspace(0, 300, n_lon), LON_ATTRS if attrs else {}),
        "height": ((), 2.0, {"units": "m"}),
    }
    shape, order = [n_times, n_lat, n_lon], [time_name, lat_name, lon_name]
    if level is not None:
        coords["level"] = ("level", np.array([1000.0, 850.0, 500.0])[:level], {"units": "hPa", "positive": "down"})
        shape.insert(1, level)
        order.insert(1, "level")
    values = (280 + 10 * rng.standard_normal(shape)).astype(dtype)
    if land:
        values[..., 1:3, 2:4] = np.nan  # a static land mask
        values[0, ..., 0, 0] = np.nan  # and one missing value
    da = xr.DataArray(values, dims=order, coords=coords, name="tas", attrs={"units": "K", "long_name": "air temperature"})
    da.encoding = {"dtype": np.dtype("float32"), "_FillValue": np.float32(1e20), "zlib": True}
    return da


# ---------------------------------------------------------------- dimension detection


@pytest.mark.parametrize(
    "dims, attrs",
    [
        (("time", "lat", "lon"), False),
        (("t", "latitude", "longitude"), False),
        (("time", "rlat", "rlon"), False),
        (("a", "b", "c"), True),  # CF attributes only
        (("time", "y", "x"), True),
    ],
)
def test_find_grid_by_name_or_attributes(dims, attrs):
    grid = find_grid(make_field(dims=dims, attrs=attrs))
    assert (grid.time, grid.lat, grid.lon, grid.channels) == (*dims, ())


def test_find_grid_by_units_and_axis_and_datetime_values():
    da = make_field(dims=("a", "b", "c"), attrs=False, calendar="360_day")  # time found from its cftime values
    da["b"].attrs = {"units": "degrees_north"}
    da["c"].attrs = {"axis": "X"}
    grid = find_grid(da)
    assert (grid.time, grid.lat, grid.lon) == ("a", "b", "c")


def test_find_grid_keeps_extra_dims_as_channels_in_order():
    da = make_field(level=3).expand_dims(member=2).transpose("lat", "member", "time", "level", "lon")
    grid = find_grid(da)
    assert grid.channels == ("member", "level") and grid.n_channels == 6
    assert grid.dims == ("lat", "member", "time", "level", "lon")


def test_find_grid_errors_name_the_problem():
    with pytest.raises(InputError, match=r"time dimension, found no dimension among \[a \(no coordinate"):
        find_grid(xr.DataArray(np.zeros((2, 3, 4)), dims=("a", "lat", "lon")))
    with pytest.raises(InputError, match=r"lat dimension, found several dimensions \['lat', 'y'\]"):
        find_grid(xr.DataArray(np.zeros((2, 3, 4, 5)), dims=("time", "lat", "y", "lon")))
    with pytest.raises(InputTypeError, match=r"da: expected an xarray.DataArray, got a Dataset; pick one variable"):
        find_grid(make_field().to_dataset())
    with pytest.raises(InputError, match=r"lat: expected one of the dimensions"):
        find_grid(make_field(), lat="nope")


def test_find_grid_by_name_outright_resolves_ambiguity():
    da = xr.DataArray(np.zeros((2, 3, 4, 5)), dims=("time", "lat", "y", "lon"))
    grid = find_grid(da, lat="y")
    assert grid.lat == "y" and grid.channels == ("lat",)


# ---------------------------------------------------------------- round trips


def write_chunked(da, path, time_chunk):
    """Write ``da`` to netCDF stored in chunks of ``time_chunk`` time steps."""
    da = da.copy()
    da.encoding["chunksizes"] = (time_chunk, *da.shape[1:])
    return write_netcdf(da.to_dataset(), path)


def dask_backed(tmp_path):
    pytest.importorskip("dask")
    path = write_chunked(make_field(n_times=8, land=True), tmp_path / "tas.nc", 2)
    return xr.open_dataset(path, chunks={"time": 2})["tas"]


CASES = {
    "plain": lambda tmp_path: make_field(),
    "latitude/longitude": lambda tmp_path: make_field(dims=("time", "latitude", "longitude"), attrs=False),
    "y/x with CF attrs": lambda tmp_path: make_field(dims=("time", "y", "x")),
    "descending latitude": lambda tmp_path: make_field(descending=True),
    "360-day calendar": lambda tmp_path: make_field(n_times=24, calendar="360_day", freq="MS"),
    "NaN land mask": lambda tmp_path: make_field(land=True),
    "level": lambda tmp_path: make_field(level=3, land=True),
    "level, odd order": lambda tmp_path: make_field(level=2, descending=True).transpose("lon", "level", "lat", "time"),
    "float64": lambda tmp_path: make_field(dtype=np.float64),
    "dask-backed netCDF": dask_backed,
}


@pytest.mark.parametrize("case", CASES)
def test_round_trip_is_identical(case, tmp_path):
    da = CASES[case](tmp_path)
    values, mask, grid = to_tensor(da)
    assert values.shape == grid.tensor_shape() and values.dtype == torch.from_numpy(np.zeros(0, da.dtype)).dtype
    assert mask.dtype == torch.bool and mask.shape == values.shape
    assert torch.isfinite(values).all() and (values[~mask] == 0).all()
    for kwargs in ({"mask": mask}, {}):  # the mask of to_tensor, or NaN where `like` is NaN
        back = from_tensor(values, like=da, grid=grid, **kwargs)
        xr.testing.assert_identical(back, da)
        assert back.encoding == da.encoding
    assert int((~mask).sum()) == int(da.isnull().sum())


def test_tensor_layout_south_to_north_time_first_channels_flattened():
    da = make_field(level=2, descending=True).transpose("lon", "level", "lat", "time")
    values, _, grid = to_tensor(da)
    assert grid.lat_descending and grid.latitudes == tuple(np.linspace(-60, 60, 5))
    south = da.sel(lat=-60.0, level=850.0, time=3.0).transpose("lon").values
    np.testing.assert_array_equal(values[3, 1, 0].numpy(), south)


def test_masked_values_stay_nan_whatever_the_tensor_holds():
    da = make_field(land=True)
    values, mask, grid = to_tensor(da)
    back = from_tensor(values + 1000, like=da, grid=grid, mask=mask)
    assert bool(back.isnull().equals(da.isnull()))
    static = from_tensor(values, like=da, grid=grid, mask=mask.all(0, keepdim=True))  # a static mask broadcasts over time
    xr.testing.assert_equal(static.isnull(), da.isnull().any("time").broadcast_like(da).transpose(*da.dims))
    unmasked = from_tensor(values, like=da, grid=grid, mask=None)
    assert not bool(unmasked.isnull().any()) and float(unmasked[0, 0, 0]) == 0.0


def test_from_tensor_refuses_wrong_shape_and_mask():
    da = make_field()
    values, mask, grid = to_tensor(da)
    with pytest.raises(InputError, match=r"values: expected shape \(6, 1, 5, 7\) \(time, channel, lat, lon\) of like, got \(5, 1, 5, 7\)"):
        from_tensor(values[1:], like=da, grid=grid)
    with pytest.raises(InputTypeError, match="mask: expected 'like', None or a bool tensor"):
        from_tensor(values, like=da, grid=grid, mask=mask.float())
    with pytest.raises(InputError, match=r"like: expected dimensions \('time', 'lat', 'lon'\)"):
        from_tensor(values, like=da.rename(lat="latitude"), grid=grid)
    part = from_tensor(values[:2], like=da.isel(time=slice(0, 2)), grid=grid)  # part of the times
    xr.testing.assert_identical(part, da.isel(time=slice(0, 2)))


# ---------------------------------------------------------------- area weights


def test_area_weights_are_normalised_cosine_latitude():
    grid = find_grid(make_field(descending=True))
    weights = area_weights(grid, dtype=torch.float64)
    assert weights.shape == (5, 7)
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    cosine = np.cos(np.deg2rad(np.linspace(-60, 60, 5)))  # south to north, like the tensors
    np.testing.assert_allclose(weights[:, 0].numpy(), cosine / cosine.sum() / 7)


def test_area_weights_respect_the_mask():
    _, mask, grid = to_tensor(make_field(land=True))
    weights = area_weights(grid, mask)
    assert weights.shape == mask.shape
    assert (weights[~mask] == 0).all() and (weights[mask] > 0).all()
    torch.testing.assert_close(weights.sum((-2, -1)), torch.ones(6, 1))


def test_area_weights_refuse_projected_coordinates():
    da = make_field(dims=("time", "y", "x"), attrs=False).assign_coords(y=np.linspace(0, 4e6, 5))
    with pytest.raises(InputError, match="expected latitudes in degrees within"):
        area_weights(find_grid(da))


# ---------------------------------------------------------------- normalisation


def test_normaliser_uses_the_training_part_only():
    da = make_field(n_times=10, land=True, level=2)
    values, mask, _ = to_tensor(da)
    split = time_split(10, 0.3)
    fitted = Normaliser(scale="point").fit(values, mask, split.train).state_dict()
    changed = values.clone()
    changed[split.test] = changed[split.test] * 3 + 50
    refitted = Normaliser(scale="point").fit(changed, mask, split.train).state_dict()
    for key in fitted:
        torch.testing.assert_close(fitted[key], refitted[key], rtol=0, atol=0)
    train = values[split.train].double()
    valid = mask[split.train]
    expected_mean = torch.where(valid, train, 0).sum(0) / valid.sum(0).clamp_min(1)
    torch.testing.assert_close(fitted["climatology"][0].double(), expected_mean, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("scale, std_shape", [("global", (1, 1, 1, 1)), ("channel", (1, 2, 1, 1)), ("point", (1, 2, 5, 7)), (None, (1, 1, 1, 1))])
def test_normaliser_transform_inverse_round_trip(scale, std_shape):
    values, mask, _ = to_tensor(make_field(n_times=8, land=True, level=2, dtype=np.float64))
    normaliser = Normaliser(scale=scale).fit(values, mask, slice(0, 6))
    assert normaliser.std.shape == std_shape
    anomalies = normaliser.transform(values, mask)
    assert (anomalies[~mask] == 0).all()
    if scale == "global":  # unit variance over the training anomalies (n - 1 denominator)
        train = anomalies[:6][mask[:6]]
        torch.testing.assert_close(train.pow(2).sum() / (train.numel() - 1), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(normaliser.inverse(anomalies, mask), values)


def test_normaliser_monthly_climatology_from_calendar_groups():
    da = make_field(n_times=36, calendar="360_day", freq="MS")  # three years of monthly means
    values, mask, _ = to_tensor(da, dtype=torch.float64)
    groups = calendar_groups(da)
    assert groups.tolist() == list(range(12)) * 3
    normaliser = Normaliser(scale=None).fit(values, mask, slice(0, 24), groups)
    assert normaliser.climatology.shape == (12, 1, 5, 7)
    torch.testing.assert_close(normaliser.climatology[4], (values[4] + values[16]) / 2)
    with pytest.raises(InputError, match=r"groups: expected the calendar group of each of the 36 times \(fitted with 12 groups\)"):
        normaliser.transform(values, mask)
    with pytest.raises(InputError, match=r"groups: groups \[12\] have no training time step"):
        normaliser.transform(values[:1], mask[:1], torch.tensor([12]))


def test_calendar_groups_annual_and_dayofyear():
    assert calendar_groups(make_field(n_times=5, calendar="360_day")).tolist() == [0] * 5  # annual: one group
    assert calendar_groups(make_field(n_times=5)).tolist() == [0] * 5  # plain numbers: one group
    daily = make_field(n_times=400, n_lat=2, n_lon=2, calendar="360_day", freq="D")
    groups = calendar_groups(daily, by="dayofyear")
    assert groups[:3].tolist() == [0, 1, 2] and int(groups.max()) == 359 and groups[360] == 0
    with pytest.raises(InputError, match="expected datetime values to group by month"):
        calendar_groups(make_field(), by="month")


def test_normaliser_state_is_tensors_only_and_refuses_use_before_fit(tmp_path):
    values, mask, _ = to_tensor(make_field(land=True))
    with pytest.raises(NotFittedError, match="Normaliser: call fit"):
        Normaliser().transform(values, mask)
    normaliser = Normaliser().fit(values, mask, slice(0, 4))
    save_checkpoint({"normaliser": normaliser.state_dict()}, tmp_path / "n.pt")  # loads with weights_only=True
    restored = Normaliser().load_state_dict(load_checkpoint(tmp_path / "n.pt")["normaliser"])
    torch.testing.assert_close(restored.transform(values, mask), normaliser.transform(values, mask))
    with pytest.raises(InputError, match="state: expected keys"):
        Normaliser().load_state_dict({"climatology": torch.zeros(1, 1, 1, 1)})
    with pytest.raises(InputError, match="scale: expected one of"):
        Normaliser(scale="pointwise")


# ---------------------------------------------------------------- split and batches


def test_time_split_holds_out_the_last_part():
    assert time_split(240, 0.2) == (slice(0, 192), slice(192, 240))
    assert time_split(make_field(n_times=10), 0.3) == (slice(0, 7), slice(7, 10))


def test_time_split_errors_name_the_numbers():
    with pytest.raises(InputError, match=r"n_times: 2 time steps with test_fraction=0.2 leave 2 for training and 0 for testing"):
        time_split(2, 0.2)
    with pytest.raises(InputError, match=r"n_times: 1 time steps with test_fraction=0.5 leave 0 for training and 1 for testing"):
        time_split(1, 0.5)
    with pytest.raises(InputError, match=r"test_fraction: expected a number in \(0, 1\), got 1.0"):
        time_split(10, 1.0)
    with pytest.raises(InputTypeError, match="n_times: expected an int or a DataArray"):
        time_split(10.0)


def test_batches_cover_every_sample_with_the_right_patches():
    da = make_field(n_times=5, n_lat=6, n_lon=8, land=True, level=2, descending=True)
    values, mask, _ = to_tensor(da)
    batches = FieldBatches(da, times=slice(1, 4), batch_size=4, patch_size=(3, 4), shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(batches) == 3  # 3 times x 2 x 2 patches = 12 samples
    seen = []
    for batch in batches:
        assert batch.values.shape == (4, 2, 3, 4) and batch.mask.shape == batch.values.shape
        for k, (t, row, col) in enumerate(zip(batch.time.tolist(), batch.lat_start.tolist(), batch.lon_start.tolist())):
            torch.testing.assert_close(batch.values[k], values[t, :, row:row + 3, col:col + 4], rtol=0, atol=0)
            assert torch.equal(batch.mask[k], mask[t, :, row:row + 3, col:col + 4])
            seen.append((t, row, col))
    assert sorted(seen) == [(t, r, c) for t in (1, 2, 3) for r in (0, 3) for c in (0, 4)]


def test_batches_refuse_bad_arguments():
    da = make_field()
    with pytest.raises(InputError, match=r"patch_size: expected \(lat, lon\) sizes within the grid \(5, 7\)"):
        FieldBatches(da, patch_size=(6, 2))
    with pytest.raises(InputError, match="times: expected time steps within 0..5"):
        FieldBatches(da, times=[3, 9])
    with pytest.raises(InputError, match="batch_size: expected an int >= 1"):
        FieldBatches(da, batch_size=0)


def test_batches_load_only_the_needed_time_chunks_of_a_dask_variable(tmp_path):
    pytest.importorskip("dask")
    path = write_chunked(make_field(n_times=12, land=True), tmp_path / "tas.nc", 1)
    opened = xr.open_dataset(path, chunks={"time": 1})["tas"]
    computed = []

    def record(block, block_info=None):
        computed.append(block_info[0]["chunk-location"][0])  # the time chunk read from the file
        return block

    da = opened.copy(data=opened.data.map_blocks(record, dtype=opened.dtype))
    split = time_split(da, 0.25)
    batches = FieldBatches(da, times=split.train, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(1))
    first = next(iter(batches))
    assert sorted(computed) == sorted(first.time.tolist())  # one batch: its three time steps only
    for _ in batches:
        pass
    assert set(computed) == set(range(9))  # the held-out chunks 9..11 are never read
    values, mask, _ = to_tensor(opened.isel(time=first.time.tolist()))
    torch.testing.assert_close(first.values, values, rtol=0, atol=0)
    assert torch.equal(first.mask, mask)


# ---------------------------------------------------------------- scores


def test_weighted_rmse_and_explained_variance_against_numpy():
    rng = np.random.default_rng(3)
    truth, pred = rng.standard_normal((2, 4, 2, 5, 6))
    mask = rng.random((4, 2, 5, 6)) > 0.2
    weights = np.cos(np.deg2rad(np.linspace(-70, 70, 5)))[:, None] * np.ones(6)
    w = weights * mask
    per_time = np.sqrt((w * (pred - truth) ** 2).sum((1, 2, 3)) / w.sum((1, 2, 3)))
    args = (torch.from_numpy(pred), torch.from_numpy(truth), torch.from_numpy(mask), torch.from_numpy(weights))
    np.testing.assert_allclose(weighted_rmse(*args, per_time=True).numpy(), per_time)
    np.testing.assert_allclose(float(weighted_rmse(*args)), per_time.mean())
    mean = (mask * truth).sum(0) / mask.sum(0)
    expected = 1 - (w * (pred - truth) ** 2).sum() / (w * (truth - mean) ** 2).sum()
    np.testing.assert_allclose(float(explained_variance(*args)), expected)
    with pytest.raises(InputError, match=r"pred: expected the shape of truth"):
        weighted_rmse(args[0][:2], args[1])


def _fields(seed=4, shape=(3, 1, 4, 5)):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal(shape)), torch.from_numpy(rng.standard_normal(shape))


@pytest.mark.parametrize("weights", [[1.0, 2.0, 3.0, 4.0, 5.0], np.ones(5), 2.0])
def test_weighted_rmse_refuses_weights_that_are_not_a_tensor(weights):
    pred, truth = _fields()
    with pytest.raises(InputTypeError, match="weights: expected a real tensor"):  # AttributeError: 'list' object has no attribute 'to'
        weighted_rmse(pred, truth, weights=weights)


def test_weighted_rmse_refuses_weights_or_mask_that_do_not_broadcast_naming_which():
    pred, truth = _fields()
    with pytest.raises(InputError, match=r"mask: expected a bool tensor broadcastable to the fields' shape \(3, 1, 4, 5\), got shape \(7,\)"):
        weighted_rmse(pred, truth, torch.ones(7, dtype=torch.bool), torch.ones(4, 5, dtype=torch.float64))  # bare RuntimeError
    with pytest.raises(InputError, match="weights: expected a tensor broadcastable"):
        weighted_rmse(pred, truth, None, torch.ones(3, dtype=torch.float64))
    for bad, message in ((torch.full((4, 5), torch.nan, dtype=torch.float64), "weights: expected finite weights"),
                         (torch.ones(4, 5, dtype=torch.complex128), "weights: expected a real tensor")):
        with pytest.raises((InputError, InputTypeError), match=message):
            weighted_rmse(pred, truth, weights=bad)


@pytest.mark.parametrize("score", [weighted_rmse, explained_variance])
def test_scores_refuse_nan_at_valid_points_and_ignore_it_at_masked_ones(score):
    pred, truth = _fields()
    mask = torch.ones(pred.shape, dtype=torch.bool)
    pred[1, 0, 2, 3] = torch.nan
    with pytest.raises(InputError, match=r"pred: expected finite values at the valid points .* got 1 NaN or inf there"):
        score(pred, truth, mask)  # returned NaN
    mask[1, 0, 2, 3] = False
    clean = pred.clone()
    clean[1, 0, 2, 3] = 123.0  # what a masked point holds does not matter
    assert torch.isfinite(score(pred, truth, mask)) and score(pred, truth, mask) == score(clean, truth, mask)


def test_scores_of_values_whose_squares_overflow_are_exact():
    """Errors near 1e200 square beyond float64; the RMSE of scaled errors is the same number (it was inf)."""
    pred, truth = _fields()
    big = weighted_rmse(pred * 1e200, truth * 1e200)
    assert torch.isfinite(big) and float(big) == pytest.approx(1e200 * float(weighted_rmse(pred, truth)), rel=1e-12)
    np.testing.assert_allclose(weighted_rmse(pred * 1e200, truth * 1e200, per_time=True).numpy(),
                               1e200 * weighted_rmse(pred, truth, per_time=True).numpy(), rtol=1e-12)
    ratio = explained_variance(pred * 1e200, truth * 1e200)
    assert float(ratio) == pytest.approx(float(explained_variance(pred, truth)), rel=1e-12)
    with pytest.raises(InputError, match="pred: expected values within float64's range of truth's"):
        weighted_rmse(torch.full((1, 1, 1, 1), 1.5e308, dtype=torch.float64), torch.full((1, 1, 1, 1), -1.5e308, dtype=torch.float64))
    huge = torch.full((4, 5), 1e308, dtype=torch.float64)  # their sum overflows; only their ratios count
    assert float(weighted_rmse(pred, truth, weights=huge)) == pytest.approx(float(weighted_rmse(pred, truth)), rel=1e-12)


def test_anomaly_correlation_of_huge_or_tiny_anomalies_is_exact():
    """The product of the two norms overflowed (ACC 0) or underflowed (undefined) at 1e160 and 1e-170."""
    from geonn.fields import anomaly_correlation

    pred, truth = _fields()
    plain = anomaly_correlation(pred, truth, per_time=True)
    for factor in (1e160, 1e-170):
        torch.testing.assert_close(anomaly_correlation(pred * factor, truth * factor, per_time=True), plain, rtol=1e-12, atol=0)
    climatology = torch.zeros(1, 1, 4, 5, dtype=torch.float64)
    climatology[0, 0, 1, 1] = torch.nan
    with pytest.raises(InputError, match="climatology: expected finite anomalies at the valid points"):
        anomaly_correlation(pred, truth, climatology)  # returned NaN
    with pytest.raises(InputError, match="climatology: expected a real tensor"):
        anomaly_correlation(pred, truth, True)


# ---------------------------------------------------------------- EOF reducer


def weighted_anomalies(seed=0, n_times=12, land=False):
    da = make_field(n_times=n_times, n_lat=4, n_lon=5, land=land, level=2, dtype=np.float64, seed=seed)
    values, mask, grid = to_tensor(da)
    return values, mask, area_weights(grid, dtype=torch.float64)


def test_eof_matches_numpy_svd():
    values, mask, weights = weighted_anomalies()
    reducer = EOFReducer(modes=4).fit(values, mask, weights)
    x = values.numpy().reshape(12, -1)
    sw = np.sqrt(np.broadcast_to(weights.numpy(), (2, 4, 5)).reshape(-1))
    _, s, vh = np.linalg.svd((x - x.mean(0)) * sw, full_matrices=False)
    np.testing.assert_allclose(reducer.explained_variance_ratio.numpy(), s[:4] ** 2 / (s**2).sum())
    patterns = reducer.patterns.reshape(4, -1).numpy()
    for k in range(4):  # equal up to sign
        np.testing.assert_allclose(abs(patterns[k] @ vh[k]), 1.0, rtol=1e-10)
    latent = reducer.encode(values).numpy()
    np.testing.assert_allclose(np.abs(latent), np.abs(((x - x.mean(0)) * sw) @ vh[:4].T), atol=1e-10)
    reconstruction = reducer.decode(reducer.encode(values))
    torch.testing.assert_close(explained_variance(reconstruction, values, mask, weights), reducer.explained_variance_ratio.sum())


def test_eof_with_all_modes_reconstructs_exactly_and_skips_masked_points():
    values, mask, weights = weighted_anomalies(land=True)
    reducer = EOFReducer(modes=12).fit(values, mask, weights)
    used = mask.all(0)
    assert reducer.patterns.shape == (12, 2, 4, 5) and (reducer.patterns[:, ~used] == 0).all()
    torch.testing.assert_close(reducer.decode(reducer.encode(values))[:, used], values[:, used])
    torch.testing.assert_close(reducer.explained_variance_ratio.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_eof_state_and_errors(tmp_path):
    values, mask, weights = weighted_anomalies()
    with pytest.raises(NotFittedError, match="EOFReducer: call fit"):
        EOFReducer(modes=2).encode(values)
    with pytest.raises(InputError, match=r"modes: expected at most min\(time, used points\) = min\(12, 40\), got 13"):
        EOFReducer(modes=13).fit(values, mask, weights)
    reducer = EOFReducer(modes=3).fit(values, mask, weights)
    save_checkpoint({"eof": reducer.state_dict()}, tmp_path / "eof.pt")
    restored = EOFReducer(modes=3).load_state_dict(load_checkpoint(tmp_path / "eof.pt")["eof"])
    torch.testing.assert_close(restored.decode(restored.encode(values)), reducer.decode(reducer.encode(values)))
    with pytest.raises(InputError, match=r"latent: expected a tensor \(time, 3\)"):
        reducer.decode(torch.zeros(2, 4))


A1B_BASELINE = {2: 0.626, 5: 0.498, 10: 0.401}  # K: area-weighted test RMSE (K), last 20% held out


@pytest.mark.slow
def test_eof_on_a1b_matches_the_measured_baselines():
    iris_sample_data = pytest.importorskip("iris_sample_data")
    path = os.path.join(iris_sample_data.path, "A1B_north_america.nc")
    da = xr.open_dataset(path, decode_times=xr.coders.CFDatetimeCoder(use_cftime=True))["air_temperature"]
    values, mask, grid = to_tensor(da)
    assert values.shape == (240, 1, 37, 49) and grid.latitudes[0] == 15.0
    xr.testing.assert_identical(from_tensor(values, like=da, grid=grid, mask=mask), da)
    split = time_split(da, 0.2)
    anomalies = Normaliser(scale=None).fit(values, mask, split.train, calendar_groups(da)).transform(values, mask)
    weights = area_weights(grid)
    for modes, baseline in A1B_BASELINE.items():
        reducer = EOFReducer(modes=modes).fit(anomalies[split.train], mask[split.train], weights)
        test = anomalies[split.test]
        rmse = float(weighted_rmse(reducer.decode(reducer.encode(test)), test, mask[split.test], weights))
        assert rmse == pytest.approx(baseline, abs=0.002), (modes, rmse)
