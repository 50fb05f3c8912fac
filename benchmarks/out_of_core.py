"""Data larger than memory: ``geonn fields reduce --method eof`` and ``emulate`` over a multi-file collection.

The script writes a synthetic collection of daily fields (``--size-gb`` of float32 over one netCDF
file per year, 180 x 360 grid, a 365-day calendar, a seasonal cycle, a few large-scale modes,
noise and a land mask) into a temporary folder (deleted at the end), then runs each verb in a
fresh subprocess per configuration and prints, for each, the peak resident memory of that process
(``ru_maxrss`` of the child, from ``os.wait4``), the wall time and the throughput in time steps
(of the whole collection) per second:

* reduce, streamed: ``geonn fields reduce 'DIR/*.nc' --stream`` (normaliser by block sums,
  randomised SVD over time blocks, reconstruction written block by block through dask);
* emulate, streamed: one epoch of the CNN emulator (``epochs=1``, no refit) with ``--stream``:
  batches read a block of 64 time steps at a time and normalised on the fly, then the held-out
  part forecast, scored and written block by block (a small CNN, ``--cnn``, so the epoch takes
  minutes on one thread);
* in memory: the same verbs with the variable loaded (``run_verb(..., stream=False)``), run only
  where this machine has the memory for it (reduce: about 7x the data size; emulate: about 8x,
  with the ridge baseline on EOFs), else reported as skipped.

    OMP_NUM_THREADS=1 python benchmarks/out_of_core.py                 # 4 GB, as the issue asks (20-30 minutes)
    OMP_NUM_THREADS=1 python benchmarks/out_of_core.py --size-gb 0.5   # every configuration on a small machine
    OMP_NUM_THREADS=1 python benchmarks/out_of_core.py --quick         # smoke test (0.1 GB)
"""

from __future__ import annotations

import argparse
import json
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

EMULATE = r"""
import json, sys, torch
torch.set_num_threads(1)
from geonn.pipelines import run_verb
from geonn.pipelines.verbs import make_options
options = make_options("emulate", epochs=1, refit=False, patience=None, ridge_basis="eof", **json.loads(sys.argv[4]))
run_verb("emulate", sys.argv[1], "tas", options, sys.argv[2], progress=False, stream=sys.argv[3] == "stream", device="cpu")
"""
CNN = {"history": 2, "width": 4, "depth": 2, "batch_size": 16}


def measure(command: list[str], env: dict) -> dict:
    """Run ``command``; its peak RSS (MB), wall seconds and exit status."""
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    output = child.stdout.read().decode(errors="replace")
    child.returncode = os.waitstatus_to_exitcode(status)
    return {"rss_mb": usage.ru_maxrss / 1024, "seconds": seconds, "rc": child.returncode, "output": output}


def memory_available_gb() -> float:
    """``MemAvailable`` of /proc/meminfo (GB), or the free pages where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9


def reduce_rows(args, pattern: str, scratch: Path, gb: float, available: float, env: dict) -> list:
    """``geonn fields reduce --method eof`` streamed, and in memory where it fits."""
    streamed = measure([sys.executable, "-m", "geonn", "fields", "reduce", pattern, "--var", "tas", "--modes",
                        str(args.modes), "--stream", "--quiet", "--device", "cpu", "--out", str(scratch / "streamed")], env)
    rows = [("reduce --method eof, streamed (--stream)", streamed)]
    if available > 7 * gb:  # 6x was measured too little: killed at 23 GB with 4 GB of data
        memory = measure([sys.executable, "-c", IN_MEMORY, pattern, str(scratch / "memory"), str(args.modes)], env)
        rows.append(("reduce --method eof, in memory", memory))
    else:
        rows.append(("reduce --method eof, in memory", {"skipped": f"needs about {7 * gb:.0f} GB, {available:.0f} GB available"}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--modes", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cnn", default=json.dumps(CNN), help=f"the emulator's settings, JSON (default {json.dumps(CNN)})")
    parser.add_argument("--skip-emulate", action="store_true", help="run reduce only")
    parser.add_argument("--skip-reduce", action="store_true", help="run emulate only")
    parser.add_argument("--keep", help="write the collection here and keep it, or reuse the one already there "
                                       "(default: a temporary folder, deleted at the end)")
    args = parser.parse_args()
    size = 0.1 if args.quick else args.size_gb
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(environment_line())
    available = memory_available_gb()  # before the collection fills the page cache
    with tempfile.TemporaryDirectory(prefix="geonn-ooc-") as scratch:
        folder = Path(args.keep) if args.keep else Path(scratch) / "data"
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        existing = sorted(folder.glob("tas_*.nc"))
        if args.keep and existing:  # the collection an earlier --keep wrote
            n_files, n_times = len(existing), len(existing) * DAYS
            what = "reused"
        else:
            n_files, n_times = write_collection(folder, size)
            what = "wrote"
        gb = n_times * N_LAT * N_LON * 4 / 1e9
        print(f"{what} {n_files} files, {n_times} daily fields of {N_LAT} x {N_LON}, {gb:.2f} GB of float32 values, "
              f"in {time.perf_counter() - t0:.0f} s")
        pattern = str(folder / "tas_*.nc")
        rows = []
        if not args.skip_reduce:
            rows += reduce_rows(args, pattern, Path(scratch), gb, available, env)
        if not args.skip_emulate:
            for mode, factor in (("stream", None), ("memory", 8)):
                name = f"emulate, 1 epoch, {'streamed (--stream)' if mode == 'stream' else 'in memory'}"
                if factor is not None and available <= factor * gb:
                    rows.append((name, {"skipped": f"needs about {factor * gb:.0f} GB, {available:.0f} GB available"}))
                    continue
                run = measure([sys.executable, "-c", EMULATE, pattern, str(Path(scratch) / f"emulate-{mode}"), mode, args.cnn], env)
                metrics = Path(scratch) / f"emulate-{mode}" / "metrics.json"
                if metrics.is_file():
                    found = json.loads(metrics.read_text())
                    run["note"] = (f"train {found['train_seconds']:.0f} s, RMSE {found['rmse_lead1']:.3f} K "
                                   f"(persistence {found['rmse_lead1_persistence']:.3f} K)")
                rows.append((name, run))
    printed = []
    for name, r in rows:
        if "skipped" in r:
            printed.append([name, "skipped", "", "", r["skipped"]])
        else:
            status = (r.get("note") or "ok") if r["rc"] == 0 else f"failed (exit {r['rc']}): {r['output'][-300:]}"
            printed.append([name, f"{r['rss_mb']:.0f}", f"{r['seconds']:.1f}", f"{n_times / r['seconds']:.0f}", status])
    print(f"\ngeonn fields reduce --method eof --modes {args.modes} and emulate (one epoch, CNN {args.cnn}), "
          f"{gb:.2f} GB in {n_files} files (target: streamed peak RSS < 1500 MB)")
    print(table(["run", "peak RSS (MB)", "wall (s)", "time steps / s", "status"], printed))


if __name__ == "__main__":
    main()
