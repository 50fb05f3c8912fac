"""Data larger than memory: ``geonn fields reduce --method eof`` over a multi-file collection.

The script writes a synthetic collection of daily fields (``--size-gb`` of float32 over one netCDF
file per year, 180 x 360 grid, a 365-day calendar, a seasonal cycle, a few large-scale modes,
noise and a land mask) into a temporary folder, then runs the verb in a fresh subprocess per
configuration and prints, for each, the peak resident memory of that process (``ru_maxrss`` of
the child, from ``os.wait4``), the wall time and the throughput in time steps per second:

* streamed: ``geonn fields reduce 'DIR/*.nc' --stream`` (normaliser by block sums, randomised
  SVD over time blocks, reconstruction written block by block through dask);
* in memory: the same verb with the variable loaded (``run_verb(..., stream=False)``), run only
  where this machine has the memory for it (about 6x the data size), else reported as skipped.

    python benchmarks/out_of_core.py                 # 4 GB, as the issue asks (a few minutes)
    python benchmarks/out_of_core.py --size-gb 0.5   # both configurations on a small machine
    python benchmarks/out_of_core.py --quick         # smoke test (0.1 GB)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
from _common import environment_line, table

N_LAT, N_LON, DAYS = 180, 360, 365


def write_collection(folder: Path, size_gb: float, seed: int = 0) -> tuple[int, int]:
    """Write yearly files until ``size_gb`` of float32 values; returns (files, time steps)."""
    rng = np.random.default_rng(seed)
    lat = np.linspace(89.5, -89.5, N_LAT)  # descending, as in ERA5
    lon = np.arange(N_LON) + 0.5
    y, x = np.meshgrid(np.deg2rad(lat), np.deg2rad(lon), indexing="ij")
    base = 288 - 30 * np.sin(y) ** 2
    patterns = np.stack([np.cos(y) * np.cos(x), np.cos(y) ** 2 * np.sin(2 * x), np.sin(2 * y) * np.cos(3 * x)])
    land = (np.abs(np.rad2deg(y) - 40) < 15) & (np.abs(np.rad2deg(x) - 260) < 30)
    bytes_per_year = DAYS * N_LAT * N_LON * 4
    n_years = max(2, round(size_gb * 1e9 / bytes_per_year))
    for year in range(n_years):
        t = np.arange(DAYS)
        season = 10 * np.cos(2 * np.pi * t / DAYS)[:, None, None] * np.sin(y)
        amplitudes = rng.standard_normal((DAYS, 3)).cumsum(0) * 0.2
        values = base + season + np.einsum("tk,kyx->tyx", amplitudes, patterns)
        values = (values + rng.standard_normal(values.shape).astype(np.float32)).astype(np.float32)
        values[:, land] = np.nan
        times = xr.date_range(f"{1900 + year}-01-01", periods=DAYS, freq="D", calendar="noleap", use_cftime=True)
        da = xr.DataArray(values, dims=("time", "lat", "lon"), name="tas", attrs={"units": "K", "long_name": "air temperature"},
                          coords={"time": times, "lat": ("lat", lat, {"units": "degrees_north"}),
                                  "lon": ("lon", lon, {"units": "degrees_east"})})
        da.to_dataset().to_netcdf(folder / f"tas_{1900 + year}.nc", encoding={"tas": {"dtype": "float32", "_FillValue": np.float32(1e20)}})
    return n_years, n_years * DAYS


IN_MEMORY = r"""
import sys, torch
torch.set_num_threads(1)
from geonn.pipelines import run_verb
from geonn.pipelines.verbs import make_options
run_verb("reduce", sys.argv[1], "tas", make_options("reduce", modes=int(sys.argv[3])), sys.argv[2], progress=False, stream=False)
"""


def measure(command: list[str], env: dict) -> dict:
    """Run ``command``; its peak RSS (MB), wall seconds and exit status."""
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    output = child.stdout.read().decode(errors="replace")
    child.returncode = os.waitstatus_to_exitcode(status)
    return {"rss_mb": usage.ru_maxrss / 1024, "seconds": seconds, "rc": child.returncode, "output": output}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--modes", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", help="write the collection here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    size = 0.1 if args.quick else args.size_gb
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(environment_line())
    with tempfile.TemporaryDirectory(prefix="geonn-ooc-") as scratch:
        folder = Path(args.keep) if args.keep else Path(scratch) / "data"
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        n_files, n_times = write_collection(folder, size)
        gb = n_times * N_LAT * N_LON * 4 / 1e9
        print(f"wrote {n_files} files, {n_times} daily fields of {N_LAT} x {N_LON}, {gb:.2f} GB of float32 values, "
              f"in {time.perf_counter() - t0:.0f} s")
        pattern = str(folder / "tas_*.nc")
        rows = []
        streamed = measure([sys.executable, "-m", "geonn", "fields", "reduce", pattern, "--var", "tas", "--modes",
                            str(args.modes), "--stream", "--quiet", "--out", str(Path(scratch) / "streamed")], env)
        rows.append(("streamed (--stream)", streamed))
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9
        if available > 6 * gb:
            memory = measure([sys.executable, "-c", IN_MEMORY, pattern, str(Path(scratch) / "memory"), str(args.modes)], env)
            rows.append(("in memory", memory))
        else:
            rows.append(("in memory", {"skipped": f"needs about {6 * gb:.0f} GB, {available:.0f} GB available"}))
    printed = []
    for name, r in rows:
        if "skipped" in r:
            printed.append([name, "skipped", "", "", r["skipped"]])
        else:
            status = "ok" if r["rc"] == 0 else f"failed (exit {r['rc']}): {r['output'][-300:]}"
            printed.append([name, f"{r['rss_mb']:.0f}", f"{r['seconds']:.1f}", f"{n_times / r['seconds']:.0f}", status])
    print(f"\ngeonn fields reduce --method eof --modes {args.modes}, {gb:.2f} GB in {n_files} files "
          f"(target: streamed peak RSS < 1500 MB)")
    print(table(["run", "peak RSS (MB)", "wall (s)", "time steps / s", "status"], printed))


if __name__ == "__main__":
    main()
