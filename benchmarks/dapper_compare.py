"""DAPPER vs geonn: the same twin experiments, the same observations, each library's published tuning.

For each setup and seed the truth and the observations are made once, by geonn's
``twin_experiment`` (the data of the ``lorenz63-da`` / ``lorenz96-da`` cases for the default
seeds), and the very same arrays are handed to both libraries: DAPPER gets the full true
trajectory ``xx (K + 1, Nx)`` (integrated from the twin's initial truth with geonn's RK4, checked
against the twin at the observation times) and the observations ``yy (Ko + 1, Nx)`` through a
``HiddenMarkovModel`` whose ``Chronology``, model step (DAPPER's own RK4 of the same equations),
observation operator, noise, burn-in and initial ensemble distribution ``N(truth_0,
prior_spread^2 I)`` mirror the twin. Both are scored by DAPPER's ``rmse.a`` convention: the RMSE
over components at each analysis time, averaged over the times after the burn-in (DAPPER's own
``avrgs.err.rms.a``; geonn's ``rmse_time_mean``; ``rmse.s`` for the smoothers' smoothed estimates).

Setups (DAPPER's ``mods``):

* ``l63``: Lorenz-63 of sakov2012 (``Lorenz63/sakov2012.py``): dt 0.01, every component observed
  every 25 steps, R = 2 I, 1000 cycles, burn-in 16 time units, the truth from DAPPER's ``x0``.
* ``l96``: Lorenz-96 of sakov2008 (``Lorenz96/sakov2008.py``): 40 variables, F 8, dt 0.05,
  every variable observed every step, R = I, 1000 cycles, burn-in 20; the truth spun up 1000 steps.
* ``l96-every4``: the same observed every 4 steps (bocquet2013/bocquet2014's regime).

Methods, DAPPER's tuning beside geonn's (geonn's are the cases' ``[[methods]]``):

======================  =============================================  ==================================================
row                     DAPPER 1.7.1                                   geonn
======================  =============================================  ==================================================
l63 Var3D               ``Var3D(xB=0.1)`` (B: the truth's covariance)  ``Var3D(B='climatology', scale=0.1)`` (model's)
l63 ETKF N=10           ``EnKF('Sqrt', N=10, infl=1.02, rot=True)``    ``ETKF(10, inflation=1.02, rotate=True)``
l63 EnKF-N N=10         ``EnKF_N(N=10, rot=True)``                     ``EnKFN(10, rotate=True)``
l63 IEnKS N=10          ``iEnKS('Sqrt', N=10, infl=1.02, rot=True)``   ``IEnKS(10, lag=1, inflation=1.02, rotate=True)``
l63 4D-Var              ``Var4D(Lag=1, xB=0.002)`` (see below)         ``Var4D(window=1, scale=0.002, GN 10, tol 0)``
l96 ETKF N=24           ``EnKF('Sqrt', N=24, infl=1.013, rot=True)``   ``ETKF(24, inflation=1.013, rotate=True)``
l96 LETKF N=7           ``LETKF(N=7, infl=1.04, rot=True, loc_rad=4)``  ``LETKF(7, radius=7.28, inflation=1.04, rotate=True)``
l96-every4 IEnKS N=20   ``iEnKS('Sqrt', N=20, Lag=4, xN=2)``           ``IEnKS(20, lag=4, xN=2.0)``
l96-every4 EnKF-N N=20  ``EnKF_N(N=20)``                               ``EnKFN(20)``
======================  =============================================  ==================================================

DAPPER's ``mods`` list no 4D-Var tuning for sakov2012; ``Var4D(Lag=1, xB=0.002)`` was the best of
Lag 1, 2, 4 x xB 0.0002-0.1 on twin seed 1 (500 cycles; not a default twin; docs/benchmarks.md). DAPPER 1.7.1's
``Var4D`` calls ``Obs(ko)(ko).linear`` (a bug: the operator applied to the integer ``ko``); the HMM
built here lets the observation operator, called with an integer, return itself, which is what the
code means. geonn's Var4D runs in DAPPER's cycling (one observation time per window, 10
Gauss-Newton iterations, the same B scale), the lorenz63-da case's setting: like for like in
RMSE and time. (An earlier case setting, windows of 4 cycles sliding by 2 at scale 0.01, gave 0.42
on twin seed 3 but 0.64-1.00 on seeds 1, 2 and 4.)

Timing: ``time.process_time`` around each library's ``assimilate`` (DAPPER's includes the
statistics it computes while cycling, as its own ``duration``), one thread for numpy and torch.
geonn runs with ``compile=True`` (its forecasts fused by ``torch.compile``; ``--eager`` for the
plain eager loop): each geonn method first runs on the first few cycles, untimed, to compile, and
that warm-up's CPU and wall seconds are reported apart ("compile") — once per shape in a process,
cached on disk by inductor across processes.

    python benchmarks/dapper_compare.py                 # 1000 cycles, twin seeds 3 (l63) and 2 (l96), compiled geonn
    python benchmarks/dapper_compare.py --quick         # 100 cycles (burn-in capped at half the run)
    python benchmarks/dapper_compare.py --seeds 1 2 3 4 --only l96-every4 --methods IEnKS
    python benchmarks/dapper_compare.py --eager         # geonn without torch.compile

Needs the ``bench`` extra (``pip install -e '.[bench]'``: DAPPER 1.7.1, the last for Python 3.11).
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # before numpy: DAPPER's BLAS on one thread, as geonn's torch

import argparse
import contextlib
import io
import math
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from _common import environment_line, table

import geonn
from geonn.assimilation import (
    ETKF,
    LETKF,
    EnKFN,
    IEnKS,
    ObservationError,
    Observations,
    Subset,
    Var3D,
    Var4D,
    read_observations,
    rmse_time_mean,
    twin_experiment,
)
from geonn.integrators import RungeKuttaStep, rollout

QUICK_CYCLES = 100
WARMUP_CYCLES = 8  # enough for every window length and chunk the full run compiles


# --- setups ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    key: str
    title: str
    model: str  # "lorenz63" | "lorenz96"
    dt: float
    every: int
    obs_std: float
    prior_spread: float
    spinup_steps: int
    burn_in: float
    seed: int  # the case's twin seed


SETUPS = {
    "l63": Setup("l63", "Lorenz-63, sakov2012: dt 0.01, all observed every 25 steps, R = 2 I", "lorenz63",
                 0.01, 25, math.sqrt(2.0), math.sqrt(2.0), 0, 16.0, 3),
    "l96": Setup("l96", "Lorenz-96 (40), sakov2008: dt 0.05, all observed every step, R = I", "lorenz96",
                 0.05, 1, 1.0, 1.0, 1000, 20.0, 2),
    "l96-every4": Setup("l96-every4", "Lorenz-96 (40), the same observed every 4 steps (0.2 time units)", "lorenz96",
                        0.05, 4, 1.0, 1.0, 1000, 20.0, 2),
}


@dataclass(frozen=True)
class Method:
    setup: str
    label: str
    dapper_text: str  # the DAPPER constructor call, built with dapper.da_methods as `da`
    geonn: object  # () -> a geonn method
    geonn_text: str
    smoothed: bool = False
    rmse_target: float | None = None  # the absolute bound, beside "no worse than DAPPER"
    speed_target: float | None = None  # DAPPER CPU / geonn CPU at least this
    dapper_shim: bool = False


def _var3d():
    return Var3D(B="climatology", scale=0.1)


def _var4d_case():
    return Var4D(window=1, B="climatology", scale=0.002, optimizer="gauss-newton", iterations=10, tolerance=0.0)


METHODS = [
    Method("l63", "Var3D", "da.Var3D(xB=0.1)", _var3d, "Var3D(B='climatology', scale=0.1)"),
    Method("l63", "ETKF N=10", "da.EnKF('Sqrt', N=10, infl=1.02, rot=True)", lambda: ETKF(10, inflation=1.02, rotate=True),
           "ETKF(10, inflation=1.02, rotate=True)", rmse_target=0.60, speed_target=1.0),
    Method("l63", "EnKF-N N=10", "da.EnKF_N(N=10, rot=True)", lambda: EnKFN(10, rotate=True), "EnKFN(10, rotate=True)"),
    Method("l63", "IEnKS N=10", "da.iEnKS('Sqrt', N=10, infl=1.02, rot=True)",
           lambda: IEnKS(10, lag=1, inflation=1.02, rotate=True, iterations=10),
           "IEnKS(10, lag=1, inflation=1.02, rotate=True, iterations=10)", smoothed=True, rmse_target=0.30, speed_target=2.0),
    Method("l63", "4D-Var", "da.Var4D(Lag=1, xB=0.002)", _var4d_case,
           "Var4D(window=1, B='climatology', scale=0.002, gauss-newton, iterations=10, tolerance=0)",
           rmse_target=0.50, speed_target=2.0, dapper_shim=True),
    Method("l96", "ETKF N=24", "da.EnKF('Sqrt', N=24, infl=1.013, rot=True)", lambda: ETKF(24, inflation=1.013, rotate=True),
           "ETKF(24, inflation=1.013, rotate=True)", speed_target=1.0),
    Method("l96", "LETKF N=7", "da.LETKF(N=7, infl=1.04, rot=True, loc_rad=4)",
           lambda: LETKF(7, radius=1.82 * 4, inflation=1.04, rotate=True), "LETKF(7, radius=7.28, inflation=1.04, rotate=True)"),
    Method("l96-every4", "IEnKS N=20 lag 4", "da.iEnKS('Sqrt', N=20, Lag=4, xN=2)", lambda: IEnKS(20, lag=4, xN=2.0, iterations=10),
           "IEnKS(20, lag=4, xN=2.0, iterations=10)", smoothed=True, rmse_target=0.29, speed_target=2.0),
    Method("l96-every4", "EnKF-N N=20", "da.EnKF_N(N=20)", lambda: EnKFN(20), "EnKFN(20)"),
]


# --- the data, made once and handed to both ---------------------------------------------------------


@dataclass
class Twin:
    setup: Setup
    seed: int
    cycles: int
    burn_in: float  # the setup's, capped at half the run
    model: torch.nn.Module
    observations: Observations
    truth: torch.Tensor  # (cycles, Nx) at the observation times
    xx: np.ndarray  # (K + 1, Nx) every step, for DAPPER
    yy: np.ndarray  # (cycles, Nx)
    skip: int  # rows not scored
    prior_mean: torch.Tensor


def make_twin(setup: Setup, seed: int, cycles: int) -> Twin:
    model = (geonn.Lorenz63() if setup.model == "lorenz63" else geonn.Lorenz96(40, 8.0)).double()
    n = model.state_dim
    n_steps = setup.every * cycles
    ds = twin_experiment(model, setup.dt, n_steps, Subset.all(n), ObservationError(std=setup.obs_std), every=setup.every,
                         spinup_steps=setup.spinup_steps, seed=seed)
    x0 = torch.as_tensor(ds.initial_truth.values)
    with torch.no_grad():
        xx = rollout(model, x0, n_steps, setup.dt, RungeKuttaStep("rk4")).numpy()
    if not np.array_equal(xx[setup.every :: setup.every], ds.truth.values):
        raise RuntimeError("the full truth does not reproduce the twin at the observation times")
    observations = read_observations(ds)
    burn_in = min(setup.burn_in, 0.5 * float(observations.times[-1]))
    skip = int((observations.times <= burn_in + 1e-9).sum())
    return Twin(setup, seed, cycles, burn_in, model, observations, torch.as_tensor(ds.truth.values), xx,
                np.array(ds.observations.values), skip, x0)


# --- DAPPER --------------------------------------------------------------------------------------------


def import_dapper():
    with contextlib.redirect_stdout(io.StringIO()):  # its import warns about live plotting under Agg
        import dapper
        import dapper.da_methods as da
        import dapper.mods as modelling
        from dapper.dpr_config import rc
        from dapper.tools import progressbar
        from dapper.tools.seeding import set_seed
    rc.liveplotting = False
    progressbar.disable_progbar = True
    return dapper, da, modelling, set_seed


def dapper_hmm(twin: Twin, modelling, shim: bool):
    setup = twin.setup
    if setup.model == "lorenz63":
        from dapper.mods.Lorenz63 import dstep_dx, step
    else:
        from dapper.mods.Lorenz96 import dstep_dx, step
    from dapper.tools.localization import nd_Id_localization

    nx = twin.xx.shape[1]
    tseq = modelling.Chronology(setup.dt, dko=setup.every, Ko=twin.cycles - 1, BurnIn=twin.burn_in)
    dyn = {"M": nx, "model": step, "linear": dstep_dx, "noise": 0}
    x0 = modelling.GaussRV(mu=twin.xx[0].copy(), C=setup.prior_spread**2)
    obs = modelling.partial_Id_Obs(nx, np.arange(nx))
    obs["noise"] = setup.obs_std**2
    if setup.model == "lorenz96":
        obs["localizer"] = nd_Id_localization((nx,), (2,))  # as sakov2008.py
    hmm = modelling.HiddenMarkovModel(dyn, obs, tseq, x0)
    if shim:
        operator = hmm.Obs.Op1
        apply = operator.model

        def model(x, *args, **kwargs):  # DAPPER 1.7.1's Var4D calls Obs(ko)(ko).linear (see the docstring)
            if isinstance(x, (int, np.integer)):
                return operator
            return apply(x, *args, **kwargs)

        operator.model = model
    return hmm


def run_dapper(method: Method, twin: Twin, dapper_mods) -> dict:
    _, da, modelling, set_seed = dapper_mods
    hmm = dapper_hmm(twin, modelling, method.dapper_shim)
    xp = eval(method.dapper_text, {"da": da})  # the constructor calls of METHODS, literal strings
    set_seed(1000 + twin.seed)
    cpu, wall = time.process_time(), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        xp.assimilate(hmm, twin.xx, twin.yy, liveplots=False)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    xp.stats.average_in_time()
    out = {"rmse_a": float(xp.avrgs.err.rms.a.val), "cpu": cpu, "wall": wall}
    # the same score recomputed by geonn from DAPPER's analysis means (a check of the convention)
    out["rmse_a_check"] = rmse_time_mean(torch.as_tensor(np.asarray(xp.stats.mu.a)), twin.truth, twin.skip)
    if method.smoothed:
        out["rmse_s"] = float(xp.avrgs.err.rms.s.val)
    return out


# --- geonn ----------------------------------------------------------------------------------------------


def _prefix(observations: Observations, n: int) -> Observations:
    return Observations(times=observations.times[:n], values=observations.values[:n], error=observations.error,
                        operator=observations.operator, model=observations.model, dt=observations.dt)


def run_geonn(method: Method, twin: Twin, compile: bool) -> dict:
    setup = twin.setup
    kwargs = {"prior_mean": twin.prior_mean, "prior_spread": setup.prior_spread, "compile": compile}
    out = {"compile_cpu": 0.0, "compile_wall": 0.0}
    if compile:  # untimed warm-up on the first cycles: compiles every shape the run needs
        cpu, wall = time.process_time(), time.perf_counter()
        method.geonn().assimilate(twin.model, _prefix(twin.observations, min(WARMUP_CYCLES, twin.cycles)), setup.dt, **kwargs)
        out["compile_cpu"], out["compile_wall"] = time.process_time() - cpu, time.perf_counter() - wall
    da_method = method.geonn()
    cpu, wall = time.process_time(), time.perf_counter()
    result = da_method.assimilate(twin.model, twin.observations, setup.dt, **kwargs)
    out["cpu"], out["wall"] = time.process_time() - cpu, time.perf_counter() - wall
    out["rmse_a"] = rmse_time_mean(result.analysis_mean, twin.truth, twin.skip)
    if method.smoothed:
        out["rmse_s"] = rmse_time_mean(result.smoothed_mean, twin.truth, twin.skip)
    return out


# --- report ----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    method: Method
    dapper: list = field(default_factory=list)  # one dict per seed
    geonn: list = field(default_factory=list)


def _mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def report(outcomes: list[Outcome], seeds_by_setup: dict, cycles: int, compile: bool) -> str:
    lines = []
    head = ["setup", "method", "DAPPER rmse.a", "geonn rmse.a", "geonn <= DAPPER", "issue target", "met",
            "DAPPER CPU [s]", "geonn CPU [s]", "speed-up", "speed target", "met", "geonn compile CPU / wall [s]"]
    rows = []
    for o in outcomes:
        m = o.method
        d_rmse, g_rmse = _mean(o.dapper, "rmse_a"), _mean(o.geonn, "rmse_a")
        d_cpu, g_cpu = _mean(o.dapper, "cpu"), _mean(o.geonn, "cpu")
        speed = d_cpu / g_cpu
        target = f"<= {m.rmse_target:g}" if m.rmse_target is not None else "-"
        met = _yes(g_rmse <= m.rmse_target) if m.rmse_target is not None else "-"
        speed_target = f">= {m.speed_target:g}x" if m.speed_target is not None else "-"
        speed_met = _yes(speed >= m.speed_target) if m.speed_target is not None else "-"
        compile_text = f"{_mean(o.geonn, 'compile_cpu'):.1f} / {_mean(o.geonn, 'compile_wall'):.1f}" if compile else "-"
        rows.append([m.setup, m.label, f"{d_rmse:.3f}", f"{g_rmse:.3f}", _yes(g_rmse <= d_rmse + 5e-4), target, met,
                     f"{d_cpu:.2f}", f"{g_cpu:.2f}", f"{speed:.1f}x", speed_target, speed_met, compile_text])
        if m.smoothed:
            d_s, g_s = _mean(o.dapper, "rmse_s"), _mean(o.geonn, "rmse_s")
            rows.append([m.setup, m.label + " (smoothed, rmse.s)", f"{d_s:.3f}", f"{g_s:.3f}", _yes(g_s <= d_s + 5e-4),
                         "-", "-", "", "", "", "", "", ""])
    seeds = ", ".join(f"{k}: {v}" for k, v in seeds_by_setup.items())
    lines.append(f"## DAPPER vs geonn, {cycles} cycles, twin seeds ({seeds}); mean over seeds\n")
    lines.append(table(head, rows))
    lines.append("")
    if any(len(o.geonn) > 1 for o in outcomes):
        per_seed = []
        for o in outcomes:
            for d, g, seed in zip(o.dapper, o.geonn, seeds_by_setup[o.method.setup]):
                per_seed.append([o.method.setup, o.method.label, seed, f"{d['rmse_a']:.4f}", f"{g['rmse_a']:.4f}",
                                 f"{d['cpu']:.2f}", f"{g['cpu']:.2f}"])
        lines.append("## Per seed\n")
        lines.append(table(["setup", "method", "twin seed", "DAPPER rmse.a", "geonn rmse.a", "DAPPER CPU [s]", "geonn CPU [s]"],
                           per_seed))
        lines.append("")
    lines.append("Tunings (DAPPER | geonn):\n")
    for o in outcomes:
        lines.append(f"- {o.method.setup} {o.method.label}: `{o.method.dapper_text.removeprefix('da.')}` | `{o.method.geonn_text}`")
    worst = max(abs(r["rmse_a"] - r["rmse_a_check"]) for o in outcomes for r in o.dapper)
    lines.append(f"\nCheck: DAPPER's rmse.a recomputed by geonn's rmse_time_mean from DAPPER's analysis means differs by "
                 f"at most {worst:.1e}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_CYCLES} cycles instead of 1000")
    parser.add_argument("--cycles", type=int, default=None, help="observation cycles per run (default 1000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="twin seeds for every setup (default: each case's, 3 for l63 and 2 for l96)")
    parser.add_argument("--only", nargs="+", choices=sorted(SETUPS), default=None, help="setups to run")
    parser.add_argument("--methods", nargs="+", default=None, help="methods whose label starts with one of these")
    parser.add_argument("--eager", action="store_true", help="geonn without torch.compile")
    args = parser.parse_args()
    cycles = args.cycles or (QUICK_CYCLES if args.quick else 1000)
    torch.set_num_threads(1)
    dapper_mods = import_dapper()
    compile = not args.eager
    methods = [m for m in METHODS if (args.only is None or m.setup in args.only)
               and (args.methods is None or any(m.label.startswith(p) for p in args.methods))]
    if not methods:
        parser.error("no method selected")
    print(f"Environment: {environment_line()}; DAPPER {dapper_mods[0].__version__}, numpy {np.__version__}, geonn "
          f"{geonn.__version__}; torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}; "
          f"geonn {'compiled (torch.compile)' if compile else 'eager'}\n", flush=True)
    seeds_by_setup = {m.setup: args.seeds or [SETUPS[m.setup].seed] for m in methods}
    outcomes = {m.label + m.setup: Outcome(m) for m in methods}
    started = time.perf_counter()
    for key, seeds in seeds_by_setup.items():
        for seed in seeds:
            twin = make_twin(SETUPS[key], seed, cycles)
            for m in (m for m in methods if m.setup == key):
                outcome = outcomes[m.label + m.setup]
                d = run_dapper(m, twin, dapper_mods)
                g = run_geonn(m, twin, compile)
                outcome.dapper.append(d)
                outcome.geonn.append(g)
                print(f"  {key} seed {seed} {m.label}: rmse.a DAPPER {d['rmse_a']:.4f} geonn {g['rmse_a']:.4f}; "
                      f"CPU DAPPER {d['cpu']:.2f} s geonn {g['cpu']:.2f} s (compile {g['compile_cpu']:.1f} s)", flush=True)
    print()
    print(report(list(outcomes.values()), seeds_by_setup, cycles, compile))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nTotal wall time {time.perf_counter() - started:.0f} s; end load average {load}")


if __name__ == "__main__":
    main()
