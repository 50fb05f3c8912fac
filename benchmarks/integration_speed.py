"""Integration speed: Lorenz-63 ensembles with classic RK4, geonn vs numpy vs torchdiffeq.

Integrates ``--trajectories`` independent Lorenz-63 trajectories for ``--steps`` steps of size
``--dt`` in float64 and stores every state, with

* geonn, eager:           ``geonn.rollout(Lorenz63(), x0, n, dt, "rk4")``
* geonn, compiled:        the same with ``compile=True`` (10 steps fused per ``torch.compile`` call)
* numpy:                  a hand-written vectorised classic RK4 (state laid out ``(3, trajectories)``
                          so each component is a contiguous row; in-place updates, no per-step allocation)
* torchdiffeq:            ``torchdiffeq.odeint(Lorenz63(), x0, t, method="rk4")`` on the same grid.
                          NOTE: torchdiffeq's ``"rk4"`` is the 3/8 rule, not classic RK4; both take
                          4 tendency evaluations per step, so the cost comparison is like for like.

geonn and torchdiffeq call the same tendency module (``geonn.Lorenz63``), so the difference is the
integrator. Each thread setting (``--threads``) runs in its own fresh interpreter, because
``torch.compile`` bakes the thread count into the generated code. Timings are wall clock
(``time.perf_counter``), warm-up excluded; the first compiled call (compilation, or loading the
on-disk inductor cache) is reported in its own column.

    python benchmarks/integration_speed.py            # full: 1000 trajectories x 10^4 steps
    python benchmarks/integration_speed.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from _common import emit, environment_line, run_worker, set_threads, summary, table, time_runs

TARGET_VS_TORCHDIFFEQ = 5.0
TARGET_VS_NUMPY = 2.0
SIGMA, RHO, BETA = 10.0, 28.0, 8.0 / 3.0


# --- numpy reference --------------------------------------------------------------------------


def _lorenz_np(s: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Lorenz-63 tendency of ``s`` (3, m) written into ``out`` (3, m)."""
    x, y, z = s
    np.subtract(y, x, out=out[0])
    out[0] *= SIGMA
    np.subtract(RHO, z, out=out[1])
    out[1] *= x
    out[1] -= y
    np.multiply(x, y, out=out[2])
    out[2] -= BETA * z
    return out


def rk4_numpy(x0: np.ndarray, n_steps: int, dt: float) -> np.ndarray:
    """Classic RK4, all states stored; returns ``(n_steps + 1, m, 3)`` (a view of a ``(n+1, 3, m)`` array)."""
    m = x0.shape[0]
    traj = np.empty((n_steps + 1, 3, m))
    traj[0] = x0.T
    k1, k2, k3, k4, tmp = (np.empty((3, m)) for _ in range(5))
    half, sixth = 0.5 * dt, dt / 6.0
    for i in range(n_steps):
        x = traj[i]
        _lorenz_np(x, k1)
        np.multiply(k1, half, out=tmp)
        tmp += x
        _lorenz_np(tmp, k2)
        np.multiply(k2, half, out=tmp)
        tmp += x
        _lorenz_np(tmp, k3)
        np.multiply(k3, dt, out=tmp)
        tmp += x
        _lorenz_np(tmp, k4)
        k2 += k3
        k2 *= 2.0
        k2 += k1
        k2 += k4
        k2 *= sixth
        np.add(x, k2, out=traj[i + 1])
    return traj.transpose(0, 2, 1)


# --- worker: one thread setting in a fresh interpreter ---------------------------------------------


def worker(args) -> None:
    threads = set_threads(args.threads)
    import torchdiffeq

    import geonn

    rng = np.random.default_rng(args.seed)
    x0_np = np.array([1.509, -1.531, 25.46]) + rng.standard_normal((args.trajectories, 3))
    x0 = torch.from_numpy(x0_np.copy())
    f = geonn.Lorenz63()
    n, dt = args.steps, args.dt
    t_grid = dt * torch.arange(n + 1, dtype=torch.float64)

    def geonn_eager(steps=n):
        return geonn.rollout(f, x0, steps, dt, "rk4")

    def geonn_compiled(steps=n):
        return geonn.rollout(f, x0, steps, dt, "rk4", compile=True)

    def numpy_rk4(steps=n):
        return rk4_numpy(x0_np, steps, dt)

    def tdq(steps=n):
        with torch.no_grad():
            return torchdiffeq.odeint(f, x0, t_grid[: steps + 1], method="rk4")

    results = {"threads": threads, "methods": {}}
    warm = min(n, 50)
    # first compiled call: compilation (or the on-disk inductor cache) for this shape and thread count
    t0 = time.perf_counter()
    geonn_compiled(warm)
    results["compile_first_call"] = time.perf_counter() - t0
    methods = {"geonn eager": geonn_eager, "numpy": numpy_rk4, "torchdiffeq": tdq}
    if not args.no_compile:
        methods["geonn compile"] = geonn_compiled
    for fn in methods.values():  # warm-up, excluded
        fn(warm)
    # interleave the repeats so background load hits every method alike
    runs = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            if runs[name] and sum(runs[name]) > args.max_seconds:
                continue  # pathologically slow (e.g. OpenMP under oversubscription): fewer repeats
            runs[name] += time_runs(fn, 1)
    for name in methods:
        results["methods"][name] = summary(runs[name])

    # agreement on a short horizon (before chaos amplifies round-off)
    k = min(n, args.check_steps)
    g = geonn_eager(k).numpy()
    results["check_steps"] = k
    results["diff_numpy"] = float(np.abs(g - numpy_rk4(k)).max())
    results["diff_compile"] = float(np.abs(g - geonn_compiled(k).numpy()).max()) if k >= 10 else float("nan")
    results["diff_torchdiffeq"] = float(np.abs(g - tdq(k).numpy()).max())
    g38 = geonn.rollout(f, x0, k, dt, "rk38").numpy()
    results["diff_rk38_torchdiffeq"] = float(np.abs(g38 - tdq(k).numpy()).max())
    results["scale"] = float(np.abs(g).max())
    emit(results)


# --- parent: run the workers, print the tables -----------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced size for a smoke test (500 steps, 1 repeat, default threads)")
    p.add_argument("--trajectories", type=int, default=1000)
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--dt", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (best and median reported)")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="stop repeating a method once its timed runs add up to this many seconds")
    p.add_argument("--threads", default="0,1", help="comma-separated torch thread counts, 0 = torch's default")
    p.add_argument("--check-steps", type=int, default=100, help="horizon of the agreement check")
    p.add_argument("--no-compile", action="store_true", help="skip geonn compile=True")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.threads = min(args.steps, 500), 1, "0"
    if args.worker:
        args.threads = int(args.threads)
        return worker(args)

    print(f"# Integration speed: Lorenz-63, {args.trajectories} trajectories x {args.steps} steps, dt = {args.dt}, "
          "float64, all states stored\n")
    print(f"Environment: {environment_line()}\n")
    common = ["--trajectories", str(args.trajectories), "--steps", str(args.steps), "--dt", str(args.dt),
              "--repeats", str(args.repeats), "--max-seconds", str(args.max_seconds), "--check-steps", str(args.check_steps), "--seed", str(args.seed)]
    if args.no_compile:
        common.append("--no-compile")
    script = os.path.abspath(__file__)
    results = [run_worker(script, ["--worker", "--threads", t, *common]) for t in args.threads.split(",")]

    labels = {
        "geonn compile": "geonn `rollout(..., compile=True)`",
        "geonn eager": "geonn `rollout(...)` (eager)",
        "numpy": "numpy, vectorised classic RK4",
        "torchdiffeq": "torchdiffeq `odeint(method='rk4')`",
    }
    schemes = {"geonn compile": "classic RK4", "geonn eager": "classic RK4", "numpy": "classic RK4",
               "torchdiffeq": "3/8 rule (torchdiffeq's 'rk4')"}
    work = args.trajectories * args.steps
    rows = []
    for r in results:
        for name in ("geonn compile", "geonn eager", "numpy", "torchdiffeq"):
            if name not in r["methods"]:
                continue
            m = r["methods"][name]
            first = f"{r['compile_first_call']:.1f}" if name == "geonn compile" else "-"
            rows.append([labels[name], r["threads"], schemes[name], m["runs"], f"{m['best']:.3f}", f"{m['median']:.3f}",
                         f"{1e6 * m['best'] / args.steps:.1f}", f"{work / m['best'] / 1e6:.1f}", first])
    print(f"## Time (up to {args.repeats} timed runs each after a warm-up; best and median wall-clock seconds)\n")
    print(table(["implementation", "torch threads", "scheme", "runs", "best [s]", "median [s]", "us / step",
                 "M trajectory-steps / s", "first compiled call [s] (not in timings)"], rows))

    rows = []
    for r in results:
        m = r["methods"]
        for geo in ("geonn compile", "geonn eager"):
            if geo not in m:
                continue
            for peer, target in (("torchdiffeq", TARGET_VS_TORCHDIFFEQ), ("numpy", TARGET_VS_NUMPY)):
                ratio = m[peer]["best"] / m[geo]["best"]
                ok = "yes" if ratio >= target else "no"
                rows.append([f"{geo} vs {peer}", r["threads"], f"{m[peer]['best']:.3f}", f"{m[geo]['best']:.3f}",
                             f"{ratio:.2f}x", f">= {target:g}x", ok])
    print("\n## Speed-up of geonn (peer time / geonn time, best runs)\n")
    print(table(["comparison", "torch threads", "peer [s]", "geonn [s]", "speed-up", "target", "met"], rows))

    r = results[0]
    print(f"\n## Agreement after {r['check_steps']} steps (t = {r['check_steps'] * args.dt:g}; max |state| = {r['scale']:.1f})\n")
    print(table(["pair", "max abs difference", "expected"], [
        ["geonn eager vs numpy (both classic RK4)", f"{r['diff_numpy']:.2e}", "round-off (< 1e-10)"],
        ["geonn compile vs geonn eager", f"{r['diff_compile']:.2e}", "round-off"],
        ["geonn classic RK4 vs torchdiffeq 3/8 rule", f"{r['diff_torchdiffeq']:.2e}",
         "truncation-error difference of two 4th-order schemes"],
        ["geonn `'rk38'` vs torchdiffeq `'rk4'` (both the 3/8 rule)", f"{r['diff_rk38_torchdiffeq']:.2e}",
         "round-off"],
    ]))
    print("\nNotes: torchdiffeq's `method='rk4'` is the 3/8 rule (geonn's `'rk38'`); it costs the same 4 tendency "
          "evaluations per step as classic RK4. numpy stores the trajectory as (steps+1, 3, trajectories) and returns "
          "a transposed view. Timings on a shared machine are noisy; compare ratios within one run.")
    print(f"\nEnd load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(main())
