"""Property-based fuzz of the public API and the ``geonn`` command (hypothesis).

Every generated call must either give a correct result (finite, of the right shape) or raise a geonn
error (:mod:`geonn.errors`: ``InputError``/``ConfigError``/``NonFiniteError`` are ``ValueError``\\ s,
``InputTypeError`` a ``TypeError``, ``NotFittedError`` a ``RuntimeError``) whose message names the
argument; never another exception, a hang (each call has a time limit), or a NaN presented as a
result. The command must exit with code 2 and ``geonn: error:`` (or argparse's ``error: argument``).

Inputs: wrong shapes, dtypes and types, NaN, inf, empty arrays, huge values, zero-length time axes,
duplicate or non-monotonic coordinates, unknown config keys, wrong types in config files, malformed
netCDF files. Deterministic (``derandomize=True``); the last test prints the number of generated cases
and entry points (docs/reliability.md gives the figures and the command).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import os
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import geonn
from geonn import fields, losses
from geonn.assimilation import (
    ETKF,
    EnKF,
    Function,
    Linear,
    ObservationError,
    Observations,
    Schedule,
    Subset,
    Var3D,
    read_observations,
    twin_experiment,
)
from geonn.cases import load_case
from geonn.cli import main
from geonn.emulators import EOFReducer
from geonn.errors import GeonnError
from geonn.integrators import TABLEAUX
from geonn.io import load_checkpoint, save_checkpoint, write_netcdf
from geonn.metrics import forecast_rmse, lyapunov_max
from geonn.training import TrainConfig, fit, make_windows

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FUZZ = settings(
    max_examples=30,
    phases=[Phase.explicit, Phase.reuse, Phase.generate] + ([] if os.environ.get("GEONN_FUZZ_NO_SHRINK") else [Phase.shrink]),
    report_multiple_bugs=False,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)
TIME_LIMIT = 30.0  # seconds per generated call: longer is a hang

RESULTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
ENTRIES: set[str] = set()
FAILED: set[str] = set()  # entry points with a failing case (each fails its test too)

SCALE = float(os.environ.get("GEONN_FUZZ_SCALE", "1"))  # e.g. 10 for a deeper run (the figures in the docs use 1)
DERANDOMIZE = not os.environ.get("GEONN_FUZZ_RANDOM")  # set it (with --hypothesis-seed=N) to draw other cases


def fuzz(entry: str, examples: int = 30):
    """Register a fuzz test of ``entry`` and give it ``examples`` generated cases (times GEONN_FUZZ_SCALE)."""
    ENTRIES.add(entry)
    return settings(FUZZ, max_examples=max(1, round(examples * SCALE)), derandomize=DERANDOMIZE)


class Hang(BaseException):
    """A call ran past TIME_LIMIT (BaseException, so the code under test cannot swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def failing(entry: str):
    """Record ``entry`` as failed when the body raises (an unexpected exception, a check, a hang); re-raise."""
    try:
        yield
    except BaseException:
        FAILED.add(entry)
        raise


def check(entry: str, call, names, validate=None):
    """Run ``call()``: a geonn error naming one of ``names`` or a result that ``validate`` accepts."""
    with failing(entry):
        return _check(entry, call, names, validate)


def _check(entry: str, call, names, validate):
    RESULTS[entry]["cases"] += 1
    bad = list(LAST_BAD)
    LAST_BAD[:] = ["?"]  # a later check of the same example did not draw its arguments through arguments()
    try:
        with time_limit(TIME_LIMIT):
            result = call()
    except GeonnError as err:
        assert isinstance(err, (ValueError, TypeError, RuntimeError, OSError)), type(err)
        message = str(err)
        assert any(name in message for name in names), f"{entry}: {type(err).__name__} names none of {names}: {message}"
        RESULTS[entry]["refused"] += 1
        if os.environ.get("GEONN_FUZZ_DEBUG") and not bad:
            print(f"\nREFUSED-GOOD {entry}: {message[:300]}")
        return None
    if validate is not None:
        validate(result)
    RESULTS[entry]["accepted"] += 1
    return result


def finite(value, shape=None) -> None:
    """``value`` is a tensor (or number) with only finite entries, of ``shape`` when given."""
    if isinstance(value, (int, float)):
        assert math.isfinite(value), f"non-finite result {value}"
        return
    assert isinstance(value, torch.Tensor), type(value)
    if shape is not None:
        assert tuple(value.shape) == tuple(shape), f"shape {tuple(value.shape)}, expected {tuple(shape)}"
    assert bool(torch.isfinite(value).all()), "a NaN or inf presented as a result"


def nice(*values) -> bool:
    """Floating tensors with finite, moderate entries: then a tendency or operator must give a finite result.
    (With NaN, inf or huge entries in, NaN or inf out is arithmetic, not an error: integrate and rollout are
    where non-finite states are caught, with NonFiniteError.)"""
    return all(isinstance(v, torch.Tensor) and v.dtype in (torch.float32, torch.float64) and bool(torch.isfinite(v).all())
               and (v.numel() == 0 or float(v.abs().max()) < 1e3) for v in values)


def shaped(out, shape, *inputs) -> None:
    """``out`` has ``shape``; finite when every input is :func:`nice`."""
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(shape), (type(out), getattr(out, "shape", None), shape)
    if nice(*inputs):
        finite(out)


# --- strategies -----------------------------------------------------------------------------------------

NICE = st.floats(-5, 5, allow_nan=False, allow_infinity=False)
ODD = st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, 3e38, 1e-310])
VALUES = st.one_of(NICE, ODD)
DTYPES = st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool,
                          torch.complex128])
FLOAT_DTYPES = st.sampled_from([torch.float64, torch.float32])
JUNK = st.one_of(
    # (integers are small, or beyond 2**63: a huge but valid size would only measure the machine's memory)
    st.none(), st.text(max_size=3), st.booleans(), st.integers(-9, 9), st.sampled_from([2**63, 2**70, -(2**70)]), ODD,
    st.lists(st.integers(-2, 5), max_size=3),
    st.just(object()), st.just(np.float64(2.0)), st.just(np.int64(3)), st.just(b"\xff"),
)
OMIT = object()  # leave the argument out: its default is used


@st.composite
def tensors(draw, shape=None, dims=(0, 3), side=(0, 4), dtypes=DTYPES, elements=VALUES):
    """Tensors of random shape, dtype and values (NaN, inf, huge, subnormal, negative zero)."""
    if shape is None:
        shape = tuple(draw(st.lists(st.integers(*side), min_size=dims[0], max_size=dims[1])))
    array = draw(hnp.arrays(np.float64, shape, elements=elements))
    dtype = draw(dtypes)
    tensor = torch.as_tensor(array)
    if dtype.is_floating_point or dtype.is_complex:
        return tensor.to(dtype)
    return torch.nan_to_num(tensor).clamp(-1e6, 1e6).to(dtype)


def good(shape, dtype=torch.float64, elements=NICE):
    return tensors(shape=shape, dtypes=st.just(dtype), elements=elements)


def good_state(d):
    """States ``(d,)`` or ``(n, d)``, float64, moderate values."""
    return st.sampled_from([(d,), (1, d), (2, d)]).flatmap(good)


def bad_tensor(shape):
    """A tensor of ``shape`` with NaN/inf/huge values or a wrong dtype, a tensor of any shape, or not a tensor."""
    return st.one_of(
        tensors(shape=shape, dtypes=FLOAT_DTYPES, elements=ODD),
        tensors(shape=shape, dtypes=st.sampled_from([torch.int64, torch.bool, torch.complex128, torch.float16])),
        tensors(), JUNK,
    )


def bad_state(d):
    return st.one_of(bad_tensor((2, d)), tensors(shape=(0, d), dtypes=FLOAT_DTYPES), tensors(shape=(d + 1,), dtypes=FLOAT_DTYPES),
                     tensors(shape=(), dtypes=FLOAT_DTYPES), tensors(shape=(2, d), dtypes=st.just(torch.float32)))


def arguments(data, **spec):
    """Draw every argument from its good strategy except 0, 1 or 2 of them, drawn from their bad one.

    ``spec``: name -> (good, bad). Arguments drawn as OMIT are left out. Returns ``(kwargs, bad names)``.
    """
    names = list(spec)
    n_bad = data.draw(st.sampled_from([0, 0, 1, 1, 1, 2]))
    bad = set(data.draw(st.permutations(names))[:n_bad]) if names else set()
    values = {name: data.draw(spec[name][1] if name in bad else spec[name][0]) for name in names}
    LAST_BAD[:] = sorted(bad)
    return {k: v for k, v in values.items() if v is not OMIT}, bad


LAST_BAD: list[str] = []


def opt(strategy):
    """A good optional argument: a value or left out."""
    return st.one_of(st.just(OMIT), strategy)


L63 = geonn.Lorenz63()
L96 = geonn.Lorenz96(5)


def tiny_mlp() -> geonn.MLP:
    torch.manual_seed(0)
    return geonn.MLP(3, hidden=(4,)).double()


def tendency(name):
    torch.manual_seed(0)
    return {
        "l63": L63, "l96": L96, "mlp": tiny_mlp(), "bilinear": geonn.BilinearResidual(3).double(),
        "conv": geonn.PeriodicConv1d(1, 1, 1).double(), "lambda": lambda t, x: -x, "float32": geonn.MLP(3, hidden=(2,)),
        "diverging": lambda t, x: 1e4 * x * x,  # a learned model gone wrong: blows up within a few steps
    }[name]


GOOD_F3 = st.sampled_from(["l63", "mlp", "bilinear", "conv", "lambda"]).map(tendency)
BAD_F3 = st.one_of(st.sampled_from(["l96", "float32"]).map(tendency), JUNK)
GOOD_SCHEMES = st.one_of(
    st.sampled_from(["euler", "heun", "midpoint", "rk4", "rk38", "RK4"]), st.sampled_from(list(TABLEAUX.values())),
    st.builds(geonn.RungeKuttaStep, st.sampled_from(["rk4", "heun"]), learnable=st.booleans(), learn_dt=st.booleans()),
)
BAD_SCHEMES = st.one_of(st.sampled_from(["rk5", "", "dopri5"]), JUNK)
GOOD_DT = st.sampled_from([0.01, 0.05, 0.001, 1])
BAD_DT = st.one_of(st.sampled_from([0.0, -0.01, math.nan, math.inf, 1e300]), st.just(torch.tensor([0.01, 0.02])), JUNK)


# --- integrators ----------------------------------------------------------------------------------------

GOOD_TIMES = st.integers(1, 6).flatmap(lambda n: st.sampled_from([
    torch.linspace(0, 0.01 * (n - 1), n), [0.02 * k for k in range(n)], np.arange(n) * 0.01 + 1.0,
]))
BAD_TIMES = st.one_of(st.sampled_from([[0.0, 0.01, 0.01, 0.02], [0.0, 0.02, 0.01], [], [[0.0, 0.1]], [0.0, math.nan],
                                       [0.0, math.inf], ["a", "b"]]), tensors(dims=(2, 2)), JUNK)


@fuzz("integrate")
@given(st.data())
def test_integrate(data):
    args, _ = arguments(
        data, f=(GOOD_F3, BAD_F3), x0=(good_state(3), bad_state(3)), times=(GOOD_TIMES, BAD_TIMES),
        scheme=(opt(GOOD_SCHEMES), BAD_SCHEMES),
        gradient=(opt(st.sampled_from(["backprop", "checkpoint", "adjoint"])), st.one_of(st.just("none"), JUNK)),
        nonfinite=(opt(st.sampled_from(["raise", "keep"])), JUNK), segments=(opt(st.sampled_from([None, 1, 2, 3])), JUNK),
    )

    def validate(out):
        assert out.shape == (len(args["times"]), *args["x0"].shape)
        if args.get("nonfinite", "raise") == "raise":
            finite(out)

    check("integrate", lambda: geonn.integrate(**args), ["f", "x0", "x:", "times", "scheme", "gradient", "nonfinite",
                                                         "segments", "trajectory"], validate)


@fuzz("rollout")
@given(st.data())
def test_rollout(data):
    args, _ = arguments(
        data, f=(GOOD_F3, BAD_F3), x0=(good_state(3), bad_state(3)), n_steps=(st.integers(0, 20), st.one_of(st.just(-1), JUNK)),
        dt=(GOOD_DT, BAD_DT), scheme=(opt(GOOD_SCHEMES), BAD_SCHEMES), t0=(opt(NICE), JUNK),
    )
    check("rollout", lambda: geonn.rollout(**args), ["f", "x0", "x:", "n_steps", "dt", "scheme", "t0", "trajectory", "times"],
          lambda out: finite(out, (args["n_steps"] + 1, *args["x0"].shape)))


@fuzz("RungeKuttaStep")
@given(st.data())
def test_runge_kutta_step(data):
    args, _ = arguments(data, scheme=(opt(st.sampled_from(["euler", "heun", "rk4", "rk38"])), BAD_SCHEMES),
                        learnable=(opt(st.booleans()), JUNK), learn_dt=(opt(st.booleans()), JUNK))
    step = check("RungeKuttaStep", lambda: geonn.RungeKuttaStep(**args), ["scheme", "learnable", "learn_dt"])
    if step is None:
        return
    call, _ = arguments(data, f=(GOOD_F3, BAD_F3), t=(st.sampled_from([0.0, 1, torch.tensor(0.5)]), JUNK),
                        x=(good_state(3), bad_state(3)), dt=(st.sampled_from([0.01, 0.1, torch.tensor(0.01)]), JUNK))
    shape = call["x"].shape if isinstance(call["x"], torch.Tensor) else None
    check("RungeKuttaStep", lambda: step(**call), ["f", "t", "x", "dt"], lambda out: shaped(out, shape, call["x"]))


@fuzz("get_tableau", 40)
@given(st.one_of(st.sampled_from(["euler", "heun", "midpoint", "rk4", "rk38", "Heun"]), BAD_SCHEMES, st.text(max_size=6)))
def test_get_tableau(scheme):
    check("get_tableau", lambda: geonn.get_tableau(scheme), ["scheme"], lambda t: isinstance(t, geonn.ButcherTableau))


@fuzz("ButcherTableau", 40)
@given(st.data())
def test_butcher_tableau(data):
    s = data.draw(st.integers(1, 4))
    lower = st.lists(st.lists(NICE, min_size=s, max_size=s), min_size=s, max_size=s).map(
        lambda rows: tuple(tuple(v if j < i else 0.0 for j, v in enumerate(row)) for i, row in enumerate(rows)))
    weights = st.lists(NICE, min_size=s, max_size=s).map(tuple)
    wrong = st.one_of(st.lists(st.one_of(NICE, ODD, st.text(max_size=1), st.none()), max_size=s + 1).map(tuple), JUNK)
    args, _ = arguments(data, a=(lower, st.one_of(st.just(((0.0, 1.0), (0.0, 0.0))), st.lists(wrong, min_size=s, max_size=s).map(tuple), JUNK)),
                        b=(weights, wrong), c=(weights, wrong), order=(st.integers(1, 4), st.one_of(st.just(0), JUNK)))

    def validate(tableau):
        step = geonn.RungeKuttaStep(tableau)
        finite(step(L63, 0.0, torch.ones(3, dtype=torch.float64), 0.001), (3,))

    check("ButcherTableau", lambda: geonn.ButcherTableau("fuzz", **args), ["tableau", "a", "b", "c", "order"], validate)


@fuzz("diverged_members")
@given(st.one_of(tensors(dims=(2, 4), side=(1, 3), dtypes=FLOAT_DTYPES), tensors(), JUNK))
def test_diverged_members(trajectory):
    def validate(flags):
        assert flags.dtype == torch.bool and flags.shape == trajectory.shape[1:-1]
        assert torch.equal(geonn.integrators.divergence_steps(trajectory) >= 0, flags)
        assert torch.equal(flags, ~torch.isfinite(trajectory).all(-1).all(0))

    check("diverged_members", lambda: geonn.diverged_members(trajectory), ["trajectory"], validate)


# --- dynamics -----------------------------------------------------------------------------------------


@fuzz("Lorenz63")
@given(st.data())
def test_lorenz63(data):
    params, _ = arguments(data, sigma=(opt(NICE), JUNK), rho=(opt(NICE), JUNK), beta=(opt(NICE), JUNK))
    model = check("Lorenz63", lambda: geonn.Lorenz63(**params), ["sigma", "rho", "beta"])
    if model is None:
        return
    x = data.draw(st.one_of(good_state(3), bad_state(3)))
    shape = x.shape if isinstance(x, torch.Tensor) else None
    check("Lorenz63", lambda: model(0.0, x), ["x"], lambda out: shaped(out, shape, x))
    check("Lorenz63", lambda: model.jacobian(x), ["x"], lambda out: shaped(out, (*shape, 3), x))


@fuzz("Lorenz96")
@given(st.data())
def test_lorenz96(data):
    params, _ = arguments(data, n=(st.integers(4, 8), st.one_of(st.sampled_from([3, 0, -1, 4.0, True]), JUNK)),
                          forcing=(opt(NICE), JUNK))
    model = check("Lorenz96", lambda: geonn.Lorenz96(**params), ["n", "forcing"])
    if model is None:
        return
    x = data.draw(st.one_of(good_state(model.state_dim), bad_state(model.state_dim)))
    shape = x.shape if isinstance(x, torch.Tensor) else None
    check("Lorenz96", lambda: model(0.0, x), ["x"], lambda out: shaped(out, shape, x))
    check("Lorenz96", lambda: model.jacobian(x), ["x"], lambda out: shaped(out, (*shape, model.state_dim), x))


@fuzz("simulate", 25)
@given(st.data())
def test_simulate(data):
    args, _ = arguments(
        data, model=(st.sampled_from([L63, L96]), st.one_of(st.sampled_from(["lorenz63", tiny_mlp()]), JUNK)),
        n_steps=(st.integers(0, 10), st.one_of(st.just(-1), JUNK)), dt=(st.sampled_from([0.01, 0.02]), BAD_DT),
        x0=(st.just(OMIT), st.one_of(bad_state(3), JUNK)), members=(opt(st.sampled_from([None, 1, 3])), st.one_of(st.just(0), JUNK)),
        spinup_steps=(opt(st.integers(0, 5)), st.one_of(st.just(-1), JUNK)),
        perturbation=(opt(st.floats(0, 2)), st.one_of(ODD, JUNK)), scheme=(opt(st.sampled_from(["rk4", "euler"])), BAD_SCHEMES),
        seed=(opt(st.integers(0, 1000)), st.one_of(st.just(2**70), JUNK)),
        dtype=(opt(FLOAT_DTYPES), st.one_of(st.sampled_from([torch.int64, torch.bool, "float32"]), JUNK)),
    )

    def validate(ds):
        state = torch.as_tensor(ds.state.values)
        assert state.shape[0] == args["n_steps"] + 1 and state.shape[-1] == args["model"].state_dim
        finite(state)

    check("simulate", lambda: geonn.simulate(**args), ["model", "n_steps", "dt", "x0", "members", "spinup_steps",
                                                        "perturbation", "scheme", "seed", "dtype", "trajectory"], validate)


# --- operators ----------------------------------------------------------------------------------------


def _call_operator(entry, model, data, width):
    x = data.draw(st.one_of(good_state(width), bad_state(width)))
    shape = x.shape if isinstance(x, torch.Tensor) else None
    check(entry, lambda: model(0.0, x), ["x"], lambda out: shaped(out, shape, x))


SIZE = st.integers(1, 4)
BAD_SIZE = st.one_of(st.sampled_from([0, -1, 2.5, True, "3"]), JUNK)


@fuzz("MLP")
@given(st.data())
def test_mlp(data):
    args, _ = arguments(data, state_dim=(SIZE, BAD_SIZE),
                        hidden=(opt(st.lists(SIZE, max_size=2).map(tuple)), st.one_of(st.sampled_from([(0,), (-1, 2), 3, ("a",)]), JUNK)),
                        activation=(opt(st.sampled_from(["tanh", "relu", "gelu", "silu"])), st.one_of(st.just("sigmoid"), JUNK)))
    model = check("MLP", lambda: geonn.MLP(**args), ["state_dim", "hidden", "activation"])
    if model is not None:
        _call_operator("MLP", model.double(), data, args["state_dim"])


@fuzz("BilinearResidual")
@given(st.data())
def test_bilinear_residual(data):
    args, _ = arguments(data, state_dim=(SIZE, BAD_SIZE), n_linear=(opt(SIZE), BAD_SIZE), n_bilinear=(opt(SIZE), BAD_SIZE))
    model = check("BilinearResidual", lambda: geonn.BilinearResidual(**args), ["state_dim", "n_linear", "n_bilinear"])
    if model is not None:
        _call_operator("BilinearResidual", model.double(), data, args["state_dim"])


@fuzz("PeriodicConv1d")
@given(st.data())
def test_periodic_conv1d(data):
    args, _ = arguments(data, n_linear=(opt(SIZE), BAD_SIZE), n_bilinear=(opt(SIZE), BAD_SIZE), radius=(opt(SIZE), BAD_SIZE))
    model = check("PeriodicConv1d", lambda: geonn.PeriodicConv1d(**args), ["n_linear", "n_bilinear", "radius"])
    if model is not None:
        _call_operator("PeriodicConv1d", model.double(), data, data.draw(st.integers(1, 8)))


@fuzz("Standardised")
@given(st.data())
def test_standardised(data):
    positive = good((3,), elements=st.floats(0.1, 5))
    args, _ = arguments(data, operator=(st.just(tiny_mlp()), JUNK), mean=(good((3,)), bad_tensor((3,))),
                        scale=(positive, st.one_of(good((3,), elements=st.floats(-1, 0)), bad_tensor((3,)))),
                        tendency_scale=(positive, st.one_of(bad_tensor((3,)), good((4,)))))
    model = check("Standardised", lambda: geonn.Standardised(**args), ["operator", "mean", "scale", "tendency_scale"])
    if model is not None:
        _call_operator("Standardised", model, data, 3)


# --- training -----------------------------------------------------------------------------------------

TRAIN_FIELDS = {  # field: (good, bad)
    "epochs": (st.integers(0, 5), st.one_of(st.sampled_from([-1, 2.5, True, "10"]), JUNK)),
    "batch_size": (st.integers(1, 64), st.one_of(st.just(0), JUNK)),
    "learning_rate": (st.floats(1e-6, 1), st.one_of(st.sampled_from([-1.0, math.nan, math.inf, True]), JUNK)),
    "schedule": (st.sampled_from(["cosine", "constant"]), st.one_of(st.just("linear"), JUNK)),
    "final_lr_fraction": (st.floats(0, 1), st.one_of(ODD, JUNK)),
    "weight_decay": (st.floats(0, 1), st.one_of(st.just(-1.0), JUNK)),
    "unroll": (st.integers(1, 4), st.one_of(st.just(0), JUNK)),
    "gradient": (st.sampled_from(["backprop", "checkpoint", "adjoint"]), st.one_of(st.just("none"), JUNK)),
    "refine": (st.sampled_from(["none", "lbfgs", "lm"]), st.one_of(st.sampled_from([None, "adam"]), JUNK)),
    "refine_epochs": (st.integers(0, 3), st.one_of(st.just(-1), JUNK)),
    "refine_iterations": (st.integers(1, 50), st.one_of(st.just(0), JUNK)),
    "seed": (st.integers(0, 2**63 - 1), st.one_of(st.sampled_from([-1, 2**64]), JUNK)),
}


@fuzz("TrainConfig", 50)
@given(st.data())
def test_train_config(data):
    args, _ = arguments(data, **{k: (opt(good_), bad_) for k, (good_, bad_) in TRAIN_FIELDS.items()})
    check("TrainConfig", lambda: TrainConfig(**args), list(TRAIN_FIELDS))


@fuzz("make_windows", 40)
@given(st.data())
def test_make_windows(data):
    unroll_good = st.integers(1, 3)
    args, _ = arguments(
        data, trajectory=(st.sampled_from([(5, 3), (6, 2, 3), (4, 1)]).flatmap(good), st.one_of(bad_tensor((5, 3)), tensors(shape=(5, 0)))),
        unroll=(unroll_good, st.one_of(st.sampled_from([0, -1, 2.5, 5, 9]), JUNK)))

    def validate(out):
        starts, targets = out
        trajectory, unroll = args["trajectory"], args["unroll"]
        assert targets.shape[1:] == (unroll, trajectory.shape[-1]) and starts.shape == (targets.shape[0], trajectory.shape[-1])
        assert starts.shape[0] == (trajectory.shape[0] - unroll) * (trajectory[0].numel() // trajectory.shape[-1])
        finite(starts), finite(targets)

    check("make_windows", lambda: make_windows(**args), ["trajectory", "unroll"], validate)


def _lorenz_like(n):
    return torch.as_tensor(geonn.simulate(L63, n - 1, 0.01, spinup_steps=20).state.values)


@fuzz("fit", 15)
@given(st.data())
def test_fit(data):
    args, _ = arguments(
        data, model=(st.sampled_from(["mlp", "bilinear", "conv"]).map(tendency), st.one_of(st.sampled_from(["l63", "float32"]).map(tendency), JUNK)),
        trajectory=(st.integers(4, 10).map(_lorenz_like), st.one_of(bad_tensor((6, 3)), good((6, 3), elements=st.just(1.0)))),
        dt=(st.just(0.01), BAD_DT),
        config=(opt(st.builds(TrainConfig, epochs=st.integers(0, 2), batch_size=st.integers(1, 8), unroll=st.integers(1, 2),
                              refine=st.sampled_from(["none", "lbfgs", "lm"]), refine_epochs=st.integers(0, 1),
                              refine_iterations=st.integers(1, 2), learning_rate=st.sampled_from([1e-3, 1e-2]),
                              gradient=st.sampled_from(["backprop", "checkpoint"]))),
                st.one_of(st.builds(TrainConfig, epochs=st.just(1), learning_rate=st.just(1e6)), JUNK)),
        loss_scale=(opt(st.sampled_from([None, torch.ones(3, dtype=torch.float64)])), st.one_of(bad_tensor((3,)), good((3,), elements=st.just(0.0)))),
        step=(opt(st.sampled_from([None, geonn.RungeKuttaStep("heun", learnable=True)])), JUNK),
        progress=(st.just(False), st.just(False)),
    )

    def validate(result):
        assert all(math.isfinite(entry["loss"]) for entry in result.history)
        for p in args["model"].parameters():
            finite(p.detach())

    check("fit", lambda: fit(**args), ["model", "trajectory", "dt", "config", "loss_scale", "step", "refine",
                                       "training diverged", "x:", "x0"], validate)


# --- metrics (geonn/metrics.py) -------------------------------------------------------------------------


@fuzz("forecast_rmse", 25)
@given(st.data())
def test_forecast_rmse(data):
    args, _ = arguments(
        data, f=(st.sampled_from(["diverging", "l63", "mlp"]).map(tendency), BAD_F3),
        truth=(st.integers(5, 10).map(_lorenz_like), st.one_of(bad_tensor((6, 3)), good((2, 3)))),
        dt=(st.just(0.01), BAD_DT), leads=(opt(st.lists(st.integers(1, 3), min_size=1, max_size=3)), st.one_of(st.just([0]), st.just([]), JUNK)),
    )

    def validate(rmse):
        assert sorted(rmse) == sorted({int(k) for k in args.get("leads", (1, 4, 8))})
        for value in rmse.values():
            finite(value)

    check("forecast_rmse", lambda: forecast_rmse(**args), ["f", "truth", "dt", "leads", "x0", "x:", "trajectory"], validate)


@fuzz("lyapunov_max", 20)
@given(st.data())
def test_lyapunov_max(data):
    args, _ = arguments(
        data, f=(st.sampled_from(["l63", "mlp", "diverging"]).map(tendency), BAD_F3), x0=(good_state(3), bad_state(3)),
        dt=(st.just(0.01), BAD_DT), n_steps=(st.integers(1, 20), st.one_of(st.just(0), JUNK)),
        spinup_steps=(st.integers(0, 5), st.one_of(st.just(-1), JUNK)),
    )

    def validate(out):
        finite(out[0]), finite(out[1])

    check("lyapunov_max", lambda: lyapunov_max(**args), ["f", "x0", "x:", "dt", "n_steps", "spinup_steps", "trajectory"],
          validate)


# --- losses -------------------------------------------------------------------------------------------


@fuzz("lp_loss", 40)
@given(st.data())
def test_lp_loss(data):
    shape = data.draw(st.sampled_from([(3,), (2, 3), (2, 2, 3)]))
    args, _ = arguments(
        data, pred=(good(shape), bad_tensor(shape)), target=(good(shape), st.one_of(bad_tensor(shape), good((5,)))),
        p=(opt(st.sampled_from([1, 2, 1.5, 3])), st.one_of(st.sampled_from([0.5, 0, -1]), JUNK)),
        mask=(opt(st.one_of(st.none(), good(shape, torch.bool, st.just(True)))), st.one_of(tensors(shape=shape), good((5,), torch.bool), JUNK)),
        weights=(opt(st.one_of(st.none(), good(shape[-1:], elements=st.floats(0.1, 2)))), st.one_of(good(shape[-1:], elements=st.just(-1.0)), bad_tensor(shape[-1:]))),
    )
    check("lp_loss", lambda: losses.lp_loss(**args), ["pred", "target", "p:", "mask", "weights", "loss"],
          lambda out: finite(out, ()))


def _cholesky(d):
    return good((d, d), elements=st.floats(-1, 1)).map(lambda m: torch.tril(m, -1) + torch.diag(m.diagonal().abs() + 0.5))


@fuzz("gaussian_nll", 40)
@given(st.data())
def test_gaussian_nll(data):
    shape = data.draw(st.sampled_from([(3,), (4, 2), (2, 2, 1)]))
    d = shape[-1]
    which = data.draw(st.sampled_from(["log_variance", "std", "scale_tril"]))
    cov_good = {"log_variance": good((d,)), "std": good((d,), elements=st.floats(0.1, 3)), "scale_tril": _cholesky(d)}[which]
    cov_bad = st.one_of(bad_tensor((d,)), good((d, d)), good((d,), elements=st.just(-1.0)), good((d + 1,)))
    args, _ = arguments(
        data, pred=(good(shape), bad_tensor(shape)), target=(opt(st.one_of(st.none(), good(shape))), st.one_of(bad_tensor(shape), good((5,)))),
        reduction=(opt(st.sampled_from(["mean", "sum", "none"])), st.one_of(st.just("max"), JUNK)), **{which: (cov_good, cov_bad)},
    )
    if data.draw(st.booleans()) and data.draw(st.booleans()) and data.draw(st.booleans()):  # two covariances, or none
        args.pop(which) if data.draw(st.booleans()) else args.update(std=torch.ones(d), log_variance=torch.zeros(d))
    check("gaussian_nll", lambda: losses.gaussian_nll(**args), ["pred", "target", "log_variance", "std", "scale_tril",
                                                                 "reduction", "nll"], lambda out: finite(out))


@fuzz("LearnedCovariance")
@given(st.data())
def test_learned_covariance(data):
    args, _ = arguments(
        data, state_dim=(SIZE, BAD_SIZE), kind=(opt(st.sampled_from(["diagonal", "full"])), st.one_of(st.just("dense"), JUNK)),
        state_dependent=(opt(st.booleans()), st.one_of(st.text(max_size=2), st.none())), hidden=(opt(SIZE), BAD_SIZE),
        initial_std=(opt(st.floats(0.1, 3)), st.one_of(st.sampled_from([0.0, -1.0]), ODD, JUNK)),
        min_std=(opt(st.floats(0, 0.05)), st.one_of(st.sampled_from([-1.0, math.inf]), JUNK)),
    )
    cov = check("LearnedCovariance", lambda: losses.LearnedCovariance(**args),
                ["state_dim", "kind", "state_dependent", "hidden", "initial_std", "min_std"])
    if cov is None:
        return
    d = args["state_dim"]
    state = data.draw(st.one_of(st.none(), good_state(d).map(lambda x: x.float()), bad_state(d)))
    constant = state is None or not isinstance(state, torch.Tensor) or not args.get("state_dependent", False)
    expected = (d, d) if constant else (*state.shape[:-1], d, d)
    check("LearnedCovariance", lambda: cov(state), ["state"], lambda out: shaped(out, expected, *([] if state is None else [state])))


def points(dtype=torch.float64):
    return st.tuples(st.integers(1, 5), st.integers(1, 3)).flatmap(lambda s: good(s, dtype))


@fuzz("sinkhorn_divergence", 25)
@given(st.data())
def test_sinkhorn_divergence(data):
    x = data.draw(points())
    args, _ = arguments(
        data, x=(st.just(x), st.one_of(bad_tensor(tuple(x.shape)), good((0, x.shape[1])))),
        y=(good((3, x.shape[1])), st.one_of(bad_tensor((3, x.shape[1])), good((3, x.shape[1] + 1)), good((3, x.shape[1]), torch.float32))),
        blur=(opt(st.floats(0.05, 1)), st.one_of(st.sampled_from([0.0, -1.0]), ODD, JUNK)), p=(opt(st.sampled_from([1, 2])), st.one_of(st.just(3), JUNK)),
        scaling=(opt(st.floats(0.5, 0.95)), st.one_of(st.sampled_from([0.0, 1.0, 2.0]), JUNK)),
    )
    check("sinkhorn_divergence", lambda: losses.sinkhorn_divergence(**args), ["x", "y", "blur", "p:", "scaling"],
          lambda out: finite(out, ()))


@fuzz("sliced_wasserstein", 40)
@given(st.data())
def test_sliced_wasserstein(data):
    x = data.draw(points())
    args, _ = arguments(
        data, x=(st.just(x), st.one_of(bad_tensor(tuple(x.shape)), good((0, x.shape[1])))),
        y=(st.integers(1, 6).flatmap(lambda n: good((n, x.shape[1]))), st.one_of(bad_tensor((3, x.shape[1])), good((3, x.shape[1] + 1)))),
        n_projections=(opt(st.integers(1, 16)), st.one_of(st.just(0), JUNK)), p=(opt(st.sampled_from([1, 2, 1.5])), st.one_of(st.just(0.5), JUNK)),
        seed=(opt(st.one_of(st.none(), st.integers(0, 100))), st.one_of(st.text(max_size=2), st.just(1.5))),
    )
    check("sliced_wasserstein", lambda: losses.sliced_wasserstein(**args), ["x", "y", "n_projections", "p:", "seed"],
          lambda out: finite(out, ()))


# --- fields -------------------------------------------------------------------------------------------

DIM_NAMES = ["time", "t", "lat", "latitude", "y", "lon", "longitude", "x", "level", "member"]
COORD_ATTRS = [{}, {"units": "degrees_north"}, {"units": "degrees_east"}, {"axis": "T"}, {"axis": "Y"},
               {"standard_name": "latitude"}, {"standard_name": "longitude"}, {"units": "days since 2000-01-01"}]
COORD_KINDS = ["none", "increasing", "decreasing", "duplicate", "nan", "wide", "strings"]


@st.composite
def data_arrays(draw, odd=None):
    """Gridded DataArrays: a time/lat/lon grid (any order, maybe a level), sensible coordinates and values; or,
    when ``odd``, random dimensions, coordinates (decreasing, duplicate, NaN, beyond 90 degrees, strings),
    attributes and values (NaN, inf, huge), zero-length time axes."""
    if odd is None:
        odd = draw(st.booleans())
    if odd and draw(st.booleans()):
        names = draw(st.lists(st.sampled_from(DIM_NAMES), max_size=4, unique=True))
    else:
        names = ["time", draw(st.sampled_from(["lat", "latitude"])), draw(st.sampled_from(["lon", "longitude"]))]
        if draw(st.booleans()):
            names.insert(draw(st.integers(0, 3)), "level")
        names = draw(st.permutations(names))
    sizes = [draw(st.integers(0 if odd else 2, 5)) if name in ("time", "t") else draw(st.integers(1, 4)) for name in names]
    elements = st.one_of(NICE, st.sampled_from([math.nan, 1e300, math.inf])) if odd else st.one_of(NICE, st.just(math.nan))
    values = draw(hnp.arrays(np.float64, tuple(sizes), elements=elements))
    coords = {}
    for name, size in zip(names, sizes):
        kind = draw(st.sampled_from(COORD_KINDS if odd else ["none", "increasing", "decreasing"]))
        if kind == "none":
            continue
        base = np.linspace(-60.0, 60.0, size) if size else np.zeros(0)
        coord = {"increasing": base, "decreasing": base[::-1], "duplicate": np.zeros(size), "wide": base * 5,
                 "nan": np.where(np.arange(size) == 0, np.nan, base), "strings": np.array([f"c{i}" for i in range(size)])}[kind]
        coords[name] = (name, coord, draw(st.sampled_from(COORD_ATTRS)) if odd else {})
    return xr.DataArray(values, dims=names, coords=coords, name=draw(st.sampled_from([None, "tas", ""])),
                        attrs=draw(st.sampled_from([{}, {"units": "K"}])))


GRID_NAMES = ["da", "time", "lat", "lon", "variable", "tas", "grid", "like", "dtype"]


BAD_ARRAYS = st.one_of(data_arrays(odd=True), JUNK, st.just(xr.Dataset({"a": ("time", [1.0])})))


@fuzz("find_grid", 40)
@given(st.data())
def test_find_grid(data):
    args, _ = arguments(data, da=(data_arrays(odd=False), BAD_ARRAYS),
                        lat=(opt(st.none()), st.one_of(st.sampled_from(DIM_NAMES), JUNK)))
    check("find_grid", lambda: fields.find_grid(**args), GRID_NAMES, lambda g: isinstance(g, fields.Grid))


@fuzz("to_tensor", 40)
@given(st.data())
def test_to_tensor(data):
    args, _ = arguments(data, da=(data_arrays(odd=False), BAD_ARRAYS),
                        dtype=(opt(st.one_of(st.none(), FLOAT_DTYPES)), st.one_of(st.sampled_from([torch.int64, torch.bool, "float32"]), JUNK)))

    def validate(out):
        values, mask, grid = out
        assert values.shape == mask.shape == grid.tensor_shape() and mask.dtype == torch.bool
        finite(values.to(torch.float64))  # missing values are 0 in the values, False in the mask

    check("to_tensor", lambda: fields.to_tensor(**args), GRID_NAMES, validate)


@fuzz("from_tensor", 30)
@given(st.data())
def test_from_tensor(data):
    like = data.draw(data_arrays())
    try:
        grid = fields.find_grid(like)
        shape = grid.tensor_shape()
    except GeonnError:
        grid, shape = None, (1, 1, 1, 1)
    args, _ = arguments(data, values=(good(shape), st.one_of(bad_tensor(shape), good((1, 2)))),
                        mask=(opt(st.sampled_from(["like", None])), st.one_of(good((7,), torch.bool), good(shape, torch.float64), JUNK)))

    def validate(out):
        assert isinstance(out, xr.DataArray) and out.dims == like.dims and out.shape == like.shape

    check("from_tensor", lambda: fields.from_tensor(like=like, grid=grid, **args), [*GRID_NAMES, "values", "mask"], validate)


@fuzz("time_split", 40)
@given(st.data())
def test_time_split(data):
    args, _ = arguments(data, n_times=(st.one_of(st.integers(2, 100), data_arrays(odd=False)), st.one_of(st.sampled_from([0, 1, -2]), data_arrays(odd=True), JUNK)),
                        test_fraction=(opt(st.floats(0.1, 0.9)), st.one_of(st.sampled_from([0.0, 1.0, -0.1, math.nan]), JUNK)))

    def validate(split):
        assert split.train.start == 0 and split.train.stop == split.test.start >= 1 and split.test.stop > split.test.start

    check("time_split", lambda: fields.time_split(**args), ["n_times", "test_fraction", *GRID_NAMES], validate)


FIELD_SHAPES = st.tuples(st.integers(1, 5), st.integers(1, 2), st.integers(1, 3), st.integers(1, 3))


@fuzz("Normaliser", 40)
@given(st.data())
def test_normaliser(data):
    scale = data.draw(st.one_of(st.sampled_from(["global", "channel", "point", None]), st.sampled_from(["pixel", 3])))
    normaliser = check("Normaliser", lambda: fields.Normaliser(scale=scale), ["scale"])
    if normaliser is None:
        return
    shape = data.draw(FIELD_SHAPES)
    n = shape[0]
    args, _ = arguments(
        data, values=(good(shape), st.one_of(bad_tensor(shape), good(shape, torch.float32, elements=st.just(3e38)))),
        mask=(st.one_of(st.none(), good(shape, torch.bool, st.booleans())), st.one_of(good(shape), good((7,), torch.bool), JUNK)),
        train_index=(st.sampled_from([slice(0, max(1, n - 1)), slice(None), [0], range(n)]),
                     st.one_of(st.sampled_from([slice(0, 0), [n + 3], [], [-n - 1]]), good((n + 1,), torch.bool), JUNK)),
        groups=(st.none(), st.one_of(good((n,), torch.int64, st.just(-1.0)), good((n + 1,), torch.int64), good((n,)), JUNK)),
    )
    fitted = check("Normaliser", lambda: normaliser.fit(**args), ["values", "mask", "train_index", "groups"])
    if fitted is None:
        return
    values, mask = args["values"], args["mask"]

    def validate(out):
        finite(out, shape)

    out = check("Normaliser", lambda: fitted.transform(values, mask), ["values", "mask", "groups"], validate)
    if out is not None:
        back = check("Normaliser", lambda: fitted.inverse(out, mask), ["values", "mask", "groups"], validate)
        valid = mask if mask is not None else torch.ones(shape, dtype=torch.bool)
        torch.testing.assert_close(back[valid], values[valid], rtol=1e-6, atol=1e-6)


@fuzz("area_weights", 30)
@given(st.data())
def test_area_weights(data):
    da = data.draw(data_arrays())
    try:
        grid = fields.find_grid(da)
    except GeonnError:
        grid = data.draw(JUNK)
    shape = grid.tensor_shape() if isinstance(grid, fields.Grid) else (1, 1, 1, 1)
    args, _ = arguments(data, mask=(opt(st.one_of(st.none(), good(shape, torch.bool, st.booleans()))), st.one_of(good((7,), torch.bool), good(shape), JUNK)),
                        dtype=(opt(FLOAT_DTYPES), st.one_of(st.sampled_from([torch.int64, "float32"]), JUNK)))

    def validate(out):
        finite(out)
        assert out.shape[-2:] == shape[-2:] and bool((out >= 0).all())

    check("area_weights", lambda: fields.area_weights(grid, **args), ["grid", "mask", "dtype"], validate)


@fuzz("weighted_rmse", 40)
@given(st.data())
def test_weighted_rmse(data):
    shape = data.draw(FIELD_SHAPES)
    args, _ = arguments(
        data, pred=(good(shape), st.one_of(bad_tensor(shape), good(shape[1:]))), truth=(good(shape), bad_tensor(shape)),
        mask=(opt(st.one_of(st.none(), good(shape, torch.bool, st.just(True)))), st.one_of(good(shape), good((7,), torch.bool), JUNK)),
        weights=(opt(st.one_of(st.none(), good(shape[-2:], elements=st.floats(0.1, 1)))), st.one_of(bad_tensor(shape[-2:]), good(shape[-2:], elements=st.just(-1.0)))),
    )
    check("weighted_rmse", lambda: fields.weighted_rmse(**args), ["pred", "truth", "mask", "weights"], lambda out: finite(out, ()))


@fuzz("EOFReducer", 40)
@given(st.data())
def test_eof_reducer(data):
    shape = data.draw(FIELD_SHAPES)
    modes = data.draw(st.one_of(st.integers(1, 3), st.one_of(st.sampled_from([0, -1, 2.5]), JUNK)))
    reducer = check("EOFReducer", lambda: EOFReducer(modes), ["modes"])
    if reducer is None:
        return
    if data.draw(st.booleans()):
        check("EOFReducer", lambda: reducer.encode(torch.zeros(shape, dtype=torch.float64)), ["EOFReducer", "fit"])  # not fitted
    args, _ = arguments(
        data, values=(good(shape), st.one_of(bad_tensor(shape), good(shape[1:]))),
        mask=(opt(st.one_of(st.none(), good(shape, torch.bool, st.just(True)))), st.one_of(good(shape), good((7,), torch.bool), JUNK)),
        weights=(opt(st.one_of(st.none(), good(shape[-2:], elements=st.floats(0.1, 1)))), st.one_of(bad_tensor(shape[-2:]), good(shape[-2:], elements=st.just(-1.0)))),
    )
    fitted = check("EOFReducer", lambda: reducer.fit(**args), ["values", "mask", "weights", "modes"])
    if fitted is None:
        return
    new = data.draw(st.one_of(good(shape), bad_tensor(shape), good((2, 9))))
    latent = check("EOFReducer", lambda: fitted.encode(new), ["values"], lambda out: shaped(out, (new.shape[0], modes), new))
    other = data.draw(st.one_of(st.just(latent), good((2, modes)), bad_tensor((2, modes)), good((2, modes + 1))))
    shape_out = (other.shape[0], *shape[1:]) if isinstance(other, torch.Tensor) and other.dim() else None
    check("EOFReducer", lambda: fitted.decode(other), ["latent"], lambda out: shaped(out, shape_out, other))


@fuzz("trajectory_to_dataset", 30)
@given(st.data())
def test_trajectory_datasets(data):
    n = data.draw(st.integers(1, 4))
    args, _ = arguments(
        data, trajectories=(st.sampled_from([(n, 3), (n, 2, 3)]).map(lambda s: {"state": torch.zeros(s)}),
                            st.one_of(bad_tensor((n, 3)).map(lambda t: {"state": t}), good((n, 4)).map(lambda t: {"state": t}), JUNK)),
        times=(st.just(np.arange(n) * 0.1), st.one_of(st.just(np.zeros((n, 2))), st.just(np.arange(n + 1.0)), st.just(["a"] * n), JUNK)),
        component_names=(st.just(["x", "y", "z"]), st.one_of(st.just(["x"]), st.just("xyz"), JUNK)),
    )
    ds = check("trajectory_to_dataset", lambda: fields.trajectory_to_dataset(**args), ["trajectories", "times", "component_names", "state"],
               lambda out: isinstance(out, xr.Dataset))
    if ds is not None:
        variable = data.draw(st.sampled_from(["state", "state", "other", 3]))
        check("trajectory_to_dataset", lambda: fields.dataset_to_trajectory(ds, variable), ["variable", "ds", "state"],
              lambda out: shaped(out[0], args["trajectories"]["state"].shape, args["trajectories"]["state"]))


# --- assimilation -----------------------------------------------------------------------------------------


@fuzz("observation operators", 40)
@given(st.data())
def test_observation_operators(data):
    kind = data.draw(st.sampled_from(["subset", "linear", "function"]))
    if kind == "subset":
        args, _ = arguments(data, indices=(st.sampled_from([[0], [2, 0], [0, 1, 2]]), st.one_of(st.sampled_from([[], [3], [0, 0], [-1], [0.5]]), JUNK)),
                            state_dim=(st.just(3), st.one_of(st.sampled_from([0, 2]), JUNK)),
                            positions=(opt(st.none()), st.one_of(st.just([math.nan]), JUNK)))
        make, names = (lambda: Subset(**args)), ["indices", "state_dim", "positions"]
    elif kind == "linear":
        args, _ = arguments(data, H=(st.integers(1, 3).flatmap(lambda p: good((p, 3))), st.one_of(bad_tensor((2, 3)), good((0, 3)))))
        make, names = (lambda: Linear(**args)), ["H"]
    else:
        args, _ = arguments(data, fn=(st.sampled_from([lambda x: x[..., :2] ** 2]), st.one_of(st.just(lambda x: x), JUNK)),
                            obs_dim=(st.just(2), st.one_of(st.sampled_from([0, 3]), JUNK)), state_dim=(opt(st.sampled_from([None, 3])), BAD_SIZE))
        make, names = (lambda: Function(**args)), ["fn", "obs_dim", "state_dim"]
    operator = check("observation operators", make, names)
    if operator is None:
        return
    x = data.draw(st.one_of(good_state(3), bad_state(3)))
    shape = tuple(x.shape[:-1]) if isinstance(x, torch.Tensor) and x.dim() else None
    check("observation operators", lambda: operator(x), ["x", "fn", "obs_dim"],
          lambda out: shaped(out, (*shape, operator.obs_dim), x))
    check("observation operators", lambda: operator.linearise(x), ["x", "fn", "obs_dim"],
          lambda out: shaped(out, (*shape, operator.obs_dim, x.shape[-1]), x))


@fuzz("ObservationError", 40)
@given(st.data())
def test_observation_error(data):
    if data.draw(st.booleans()):
        args, _ = arguments(data, std=(st.one_of(st.floats(0.1, 3), good((2,), elements=st.floats(0.1, 3))),
                                       st.one_of(st.sampled_from([0.0, -1.0]), bad_tensor((2,)), good((2, 2)), good((0,)))))
    else:
        args, _ = arguments(data, covariance=(_cholesky(2).map(lambda f: f @ f.T), st.one_of(good((2, 2), elements=st.just(-1.0)),
                                                                                           bad_tensor((2, 2)), good((2, 3)))))
    error = check("ObservationError", lambda: ObservationError(**args), ["std", "covariance", "ObservationError"])
    if error is None:
        return
    k = error.dim or 2
    v = data.draw(st.one_of(good((3, k)), bad_tensor((3, k)), good((3, k + 1))))
    shape = v.shape if isinstance(v, torch.Tensor) else None
    check("ObservationError", lambda: error.whiten(v), ["dim", "v"], lambda out: shaped(out, shape, v))
    size = data.draw(st.one_of(st.tuples(st.integers(0, 3), st.just(k)), st.sampled_from([(), (2, k + 1), (-1, k), "ab", (2.5, k)])))
    check("ObservationError", lambda: error.sample(size, torch.Generator().manual_seed(0)), ["shape", "dim"],
          lambda out: finite(out, size))


@functools.cache
def twin() -> xr.Dataset:
    return twin_experiment(L63, 0.01, 50, Subset([0, 1, 2], 3), ObservationError(std=1.0), every=10, spinup_steps=50)


def _set_time(values):
    return lambda ds, draw: ds.assign_coords(time=("time", np.asarray(values(ds.sizes["time"])), ds.time.attrs))


CORRUPTIONS = [
    _set_time(lambda n: np.arange(n)[::-1] * 0.1),  # decreasing
    _set_time(lambda n: np.zeros(n)),  # duplicates
    _set_time(lambda n: np.where(np.arange(n) == 1, np.nan, 0.1 * np.arange(n))),
    _set_time(lambda n: 0.1 * np.arange(n) + np.where(np.arange(n) == 2, np.inf, 0)),
    _set_time(lambda n: 0.1 * np.arange(n) + 0.003),  # off the model grid
    _set_time(lambda n: np.array([f"t{i}" for i in range(n)])),
    _set_time(lambda n: np.datetime64("2000-01-01") + np.arange(n).astype("timedelta64[D]")),
    lambda ds, draw: ds.isel(time=slice(0, 0)),  # zero-length time axis
    lambda ds, draw: ds.drop_vars("observations"),
    lambda ds, draw: ds.assign(observations=ds.observations.where(ds.time > 0.15)),  # rows all NaN
    lambda ds, draw: ds.assign(observations=ds.observations + np.where(ds.time > 0.3, np.inf, 0)),
    lambda ds, draw: ds.assign(observations=ds.observations * 1e300),
    lambda ds, draw: ds.assign(observations=ds.observations.astype(str)),
    lambda ds, draw: ds.assign(observations=ds.observations.expand_dims(extra=2)),
    lambda ds, draw: ds.rename({"component": "obs"}),
    lambda ds, draw: ds.isel(component=slice(0, 2)),  # 2 components: no model has 2
    lambda ds, draw: ds.isel(component=slice(0, 0)),
    lambda ds, draw: ds.assign_attrs(obs_error_std=draw(st.sampled_from([0.0, -1.0, math.nan, "one", [1.0, 2.0], 1e300]))),
    lambda ds, draw: ds.drop_attrs() if hasattr(ds, "drop_attrs") else ds.assign_attrs(obs_error_std=None),
    lambda ds, draw: ds.assign(obs_error_std=("component", draw(st.sampled_from([[1.0, -1.0, 1.0], [np.nan] * 3, [1.0, 1.0, 1.0]])))),
    lambda ds, draw: ds.assign_attrs(dt=draw(st.sampled_from([0.0, -0.01, math.nan, "x", 1e300, 0.02, [0.01, 0.02]]))),
    lambda ds, draw: ds.assign_attrs(model=draw(st.sampled_from(["lorenz96", "☃" * 100, "", "lorenz63"]))),
    lambda ds, draw: ds.assign_attrs(model_sigma=draw(st.sampled_from(["ten", math.nan, 1e300, -5.0, [1.0, 2.0]]))),
    lambda ds, draw: ds.assign_attrs(scheme=draw(st.sampled_from(["rk5", "", "euler", "☃"]))),
    lambda ds, draw: ds.assign_attrs(**{f"junk{i}": "x" * 10_000 for i in range(20)}),
    lambda ds, draw: ds.assign(initial_truth=("component", [np.nan, 1e300, 0.0])),
]


@st.composite
def observation_datasets(draw, broken=True):
    """The observation file format (docs/assimilation.md), whole or broken in random ways."""
    ds = twin().copy(deep=True)
    if broken:
        for corruption in draw(st.lists(st.sampled_from(CORRUPTIONS), min_size=1, max_size=3, unique=True)):
            with contextlib.suppress(TypeError, ValueError, KeyError, AttributeError):  # one can rule out the next
                ds = corruption(ds, draw)
    return ds


def _write(ds_or_bytes, folder: Path, name="obs.nc") -> Path:
    path = folder / name
    if isinstance(ds_or_bytes, bytes):
        path.write_bytes(ds_or_bytes)
    else:
        try:
            ds_or_bytes.to_netcdf(path)
        except (ValueError, TypeError):  # not storable as it stands: store its bytes truncated instead
            write_netcdf(twin(), path)
            path.write_bytes(path.read_bytes()[:100])
    return path


@functools.cache
def valid_file_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        return _write(twin(), Path(folder)).read_bytes()


def observation_source(data, folder: Path, good_: bool):
    if good_:
        return _write(twin(), folder)
    kind = data.draw(st.sampled_from(["dataset", "dataset", "dataset", "truncated", "garbage", "empty", "folder", "missing"]))
    if kind == "dataset":
        return _write(data.draw(observation_datasets()), folder)
    if kind == "truncated":
        whole = valid_file_bytes()
        return _write(whole[: data.draw(st.integers(0, len(whole) - 1))], folder)
    if kind == "garbage":
        return _write(data.draw(st.binary(max_size=200)), folder)
    if kind == "empty":
        return _write(b"", folder)
    if kind == "folder":
        (folder / "dir.nc").mkdir()
        return folder / "dir.nc"
    return folder / "missing.nc"


OBS_NAMES = ["source", "observation file", "observations", "time", "obs_error_std", "dt", "values", "operator"]


@fuzz("read_observations", 40)
@given(st.data())
def test_read_observations(data):
    with tempfile.TemporaryDirectory() as folder:
        bad = data.draw(st.sampled_from([None, None, "source", "source", "operator"]))
        source = observation_source(data, Path(folder), bad != "source")
        if data.draw(st.booleans()) and source.is_file():
            with contextlib.suppress(Exception):  # not a dataset: read the path instead
                source = xr.open_dataset(source).load()
        operator = data.draw(st.one_of(st.just(Subset([0, 2], 3)), JUNK) if bad == "operator" else
                             st.sampled_from([None, Subset.all(3)]))

        def validate(obs):
            assert obs.values.shape == (obs.times.numel(), obs.obs_dim)
            finite(obs.times)
            assert not bool(torch.isinf(obs.values).any())

        check("read_observations", lambda: read_observations(source, operator), OBS_NAMES, validate)


@fuzz("Observations", 30)
@given(st.data())
def test_observations(data):
    n = data.draw(st.integers(1, 3))
    args, _ = arguments(
        data, times=(st.just(0.1 * torch.arange(1, n + 1, dtype=torch.float64)), st.one_of(bad_tensor((n,)), st.just(torch.zeros(n + 1)))),
        values=(good((n, 3)), st.one_of(bad_tensor((n, 3)), good((n, 3), elements=st.just(math.nan)))),
        error=(st.just(ObservationError(std=1.0)), st.one_of(st.just(ObservationError(std=torch.ones(2))), JUNK)),
        operator=(opt(st.sampled_from([None, Subset.all(3)])), st.one_of(st.just(Subset([0], 3)), JUNK)),
    )
    check("Observations", lambda: Observations(**args), ["times", "values", "error", "operator"],
          lambda obs: obs.values.shape == args["values"].shape)


def _observations(data) -> Observations:
    n = data.draw(st.integers(1, 3))
    values = data.draw(good((n, 3), elements=st.one_of(NICE, st.just(math.nan))))
    values[:, 1] = torch.nan_to_num(values[:, 1])  # every row has an observation
    operator = data.draw(st.sampled_from([Subset.all(3), Subset([1], 3)]))
    values = values if operator.obs_dim == 3 else values[:, 1:2]
    return Observations(0.05 * torch.arange(1, n + 1, dtype=torch.float64), values, ObservationError(std=1.0), operator)


ASSIMILATE_NAMES = ["model", "observations", "dt", "prior_mean", "prior_spread", "t0", "ensemble", "x0", "x:",
                    "trajectory", "members", "inflation", "seed", "scale", "background_std", "B", "iterations"]


def _assimilate(entry, data, method):
    observations = _observations(data)
    args, _ = arguments(
        data, model=(st.sampled_from(["l63", "mlp"]).map(tendency), BAD_F3), observations=(st.just(observations), JUNK),
        dt=(st.sampled_from([0.01, 0.05]), st.one_of(st.sampled_from([0.0, -0.01, 0.03, math.nan]), JUNK)),
        prior_mean=(st.just(L63.default_initial_state()), st.one_of(bad_tensor((3,)), good((4,)))),
        prior_spread=(st.one_of(st.sampled_from([1.0, 0.5]), good((3,), elements=st.floats(0.1, 2))), st.one_of(st.sampled_from([0.0, -1.0]), bad_tensor((3,)))),
        t0=(opt(st.just(0.0)), st.one_of(st.sampled_from([0.1, math.nan]), JUNK)),
    )

    def validate(result):
        assert result.analysis_mean.shape == (len(observations), 3)
        finite(result.analysis_mean)

    check(entry, lambda: method.assimilate(**args), ASSIMILATE_NAMES, validate)


@fuzz("ETKF/EnKF assimilate", 30)
@given(st.data())
def test_ensemble_assimilate(data):
    cls = data.draw(st.sampled_from([ETKF, EnKF]))
    args, _ = arguments(data, members=(st.integers(2, 5), st.one_of(st.sampled_from([1, 0, 2.5]), JUNK)),
                        inflation=(opt(st.floats(1, 1.2)), st.one_of(st.sampled_from([0.0, -1.0, math.inf, math.nan]), JUNK)),
                        seed=(opt(st.integers(0, 3)), st.one_of(st.just(-1), JUNK)), rotate=(opt(st.booleans()), st.one_of(st.just(1), JUNK)))
    method = check("ETKF/EnKF assimilate", lambda: cls(**args), ["members", "inflation", "seed", "rotate"])
    if method is not None:
        _assimilate("ETKF/EnKF assimilate", data, method)


@fuzz("Var3D assimilate", 20)
@given(st.data())
def test_var3d_assimilate(data):
    args, _ = arguments(data, background_std=(st.one_of(st.floats(0.5, 2), good((3,), elements=st.floats(0.5, 2))), st.one_of(st.sampled_from([0.0, -1.0, math.nan]), bad_tensor((3,)))),
                        scale=(opt(st.floats(0.5, 2)), st.one_of(st.sampled_from([0.0, -2.0, math.inf]), JUNK)),
                        iterations=(opt(st.integers(1, 3)), st.one_of(st.just(0), JUNK)))
    method = check("Var3D assimilate", lambda: Var3D(**args), ASSIMILATE_NAMES)
    if method is not None:
        _assimilate("Var3D assimilate", data, method)


@fuzz("Schedule/twin_experiment", 30)
@given(st.data())
def test_twin_experiment(data):
    steps = data.draw(st.one_of(st.sampled_from([[2, 4], [0, 5, 6], [10]]), st.sampled_from([[], [3, 3], [-1, 2], [4, 2], [1.5]]), JUNK))
    schedule = check("Schedule/twin_experiment", lambda: Schedule(steps), ["steps"])
    args, _ = arguments(
        data, model=(st.just(L63), st.one_of(st.just(tiny_mlp()), JUNK)), dt=(st.just(0.01), BAD_DT),
        n_steps=(st.integers(10, 12), st.one_of(st.sampled_from([0, -1, 5]), JUNK)),
        operator=(st.sampled_from([Subset([0, 2], 3), Linear(torch.ones(2, 3, dtype=torch.float64))]), st.one_of(st.just(Subset([0], 4)), JUNK)),
        error=(st.sampled_from([ObservationError(std=0.5), ObservationError(std=torch.tensor([0.5, 1.0]))]),
               st.one_of(st.just(ObservationError(covariance=torch.eye(2))), st.just(ObservationError(std=torch.ones(3))), JUNK)),
        every=(st.one_of(st.integers(1, 5), st.just(schedule) if schedule is not None else st.just(2)), st.one_of(st.just(0), JUNK)),
        x0=(opt(st.just(L63.default_initial_state())), st.one_of(bad_state(3), good((2, 3)))),
        spinup_steps=(opt(st.integers(0, 5)), st.one_of(st.just(-1), JUNK)), seed=(opt(st.integers(0, 5)), st.one_of(st.just(-1), JUNK)),
    )

    def validate(ds):
        finite(torch.as_tensor(ds["truth"].values))

    check("Schedule/twin_experiment", lambda: twin_experiment(**args), ["model", "dt", "n_steps", "operator", "error", "every",
                                                                         "x0", "steps", "spinup_steps", "seed", "trajectory"], validate)


# --- files ---------------------------------------------------------------------------------------------


@fuzz("load_checkpoint", 30)
@given(st.data())
def test_load_checkpoint(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "checkpoint.pt"
        kind = data.draw(st.sampled_from(["state", "state", "state", "truncated", "garbage", "tensor", "folder", "missing"]))
        state = {"model": {"w": torch.ones(3)}, "epoch": 3, "history": [{"loss": 0.5}], "name": "☃"}
        if kind in ("state", "truncated"):
            save_checkpoint(state, path)
            if kind == "truncated":
                raw = path.read_bytes()
                path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
        elif kind == "garbage":
            path.write_bytes(data.draw(st.binary(max_size=300)))
        elif kind == "tensor":
            torch.save(torch.zeros(2), path)
        elif kind == "folder":
            path.mkdir()

        def validate(out):
            assert out.keys() == state.keys() and torch.equal(out["model"]["w"], state["model"]["w"])
            assert {k: out[k] for k in ("epoch", "history", "name")} == {k: state[k] for k in ("epoch", "history", "name")}

        check("load_checkpoint", lambda: load_checkpoint(path), ["checkpoint"], validate)


GOOD_OVERRIDES = st.sampled_from([
    "training.epochs=1", "training.learning_rate=0.005", "training.batch_size=32", 'training.refine="lbfgs"', "training.seed=3",
    "data.dt=0.02", "data.n_train=100", 'data.model="lorenz96"', "data.model_parameters={ sigma = 9.0 }", "data.spinup_steps=10",
    'model.operator="mlp"', 'model.scheme="heun"', "model.hidden=[8]", "model.n_linear=2", 'model.activation="relu"',
    "metrics.leads=[1, 2]", "metrics.curve_leads=[1]", "metrics.lyapunov_steps=10", "metrics.forecast_steps=5", "seed=2",
    'description="☃ anything"', "expected.max={ rmse_lead1 = 0.1 }",
])
BAD_KEYS = st.sampled_from([
    "training.epochs", "training.learning_rate", "training.batch_size", "training.refine", "training.seed", "data.dt",
    "data.n_train", "data.model", "data.model_parameters", "data.spinup_steps", "model.operator", "model.scheme",
    "model.hidden", "model.n_linear", "model.activation", "model.radius", "metrics.leads", "metrics.curve_leads",
    "metrics.lyapunov_steps", "metrics.lyapunov_trajectories", "metrics.forecast_steps", "seed", "name", "kind",
    "training.epoch", "data", "nosuchkey", "training.epochs.deeper",
])
BAD_VALUES = st.sampled_from([
    "-1", "0", "1.5", "nan", "inf", "-inf", "1e300", "true", '"text"', "ten", "[]", "[0]", '["a"]', "{}", "{ sigma = nan }",
    "{ foo = 1 }", '{ sigma = "x" }', '"rk5"', "[1, -2]", '"sigmoid"', "[[1]]", "1979-05-27", "",
])
BAD_OVERRIDES = st.one_of(st.tuples(BAD_KEYS, BAD_VALUES).map("=".join), st.sampled_from(["training.epochs", "=3", ".=1", "a..b=2"]))


def _case_check(config) -> None:
    """A loaded identification case holds only finite numbers where the run needs them."""
    for section in (config.data, config.model, config.training, config.metrics):
        for item in dataclasses.fields(section):
            value = getattr(section, item.name)
            if isinstance(value, float):
                assert math.isfinite(value), f"{item.name} = {value} accepted"


def _overrides(data):
    good_ = data.draw(st.lists(GOOD_OVERRIDES, max_size=3))
    bad = data.draw(st.lists(BAD_OVERRIDES, max_size=2)) if data.draw(st.integers(0, 2)) else []
    return data.draw(st.permutations(good_ + bad))


OVERRIDE_NAMES = ["--set", "unknown key", "kind", "training", "data", "model", "metrics", "seed", "name", "expected", "case"]


@fuzz("load_case", 50)
@given(st.data())
def test_load_case_with_overrides(data):
    overrides = _overrides(data)
    check("load_case", lambda: load_case("lorenz63", overrides), OVERRIDE_NAMES, _case_check)


@fuzz("case files", 40)
@given(st.data())
def test_case_files(data):
    """A case file holding random TOML (or not TOML at all)."""
    text = 'name = "fuzz"\n' + "".join(f"{line}\n" for line in _overrides(data))
    if data.draw(st.integers(0, 3)) == 0:
        text = data.draw(st.sampled_from(["[training]\nepochs = 'x'\n", "[[data]]\n", "\x00\udcff", "= 3", "[training\n",
                                          "kind = 'nosuchkind'\n", "kind = 3\n", "name = 3\n"])) + text
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.toml"
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        check("case files", lambda: load_case(str(path)), ["case file", *OVERRIDE_NAMES], _case_check)


# --- the command -----------------------------------------------------------------------------------------


def run_cli(entry: str, argv, capsys, names) -> int:
    """``main(argv)``: 0, or 2 with one ``geonn: error:`` line naming one of ``names`` (or argparse's usage error)."""
    with failing(entry):
        return _run_cli(entry, argv, capsys, names)


def _run_cli(entry: str, argv, capsys, names) -> int:
    RESULTS[entry]["cases"] += 1
    capsys.readouterr()
    try:
        with time_limit(TIME_LIMIT):
            code = main(argv)
    except SystemExit as exit_:
        err = capsys.readouterr().err
        assert exit_.code == 2 and "error: argument" in err, err
        RESULTS[entry]["refused"] += 1
        return 2
    err = capsys.readouterr().err
    if code == 0:
        RESULTS[entry]["accepted"] += 1
        return 0
    assert code == 2, (code, err)
    assert err.startswith("geonn: error: ") and "Traceback" not in err, err
    assert any(name in err for name in names), f"{entry}: the message names none of {names}: {err}"
    RESULTS[entry]["refused"] += 1
    return 2


@pytest.fixture
def stub_case_run(monkeypatch):
    """``geonn case`` loads, checks and prepares everything, but the training itself is replaced by a stub."""
    from geonn.cases import identification

    metrics = {"rmse_lead1": 0.5, "rmse_lead4": 0.5, "rmse_lead8": 0.5, "lyapunov_max": 0.9, "lyapunov_max_true": 0.9}
    monkeypatch.setattr(identification, "run", lambda case, out, **kwargs: dict(metrics))


@fuzz("cli: geonn case", 40)
@given(data=st.data())
def test_cli_case(data, capsys, stub_case_run):
    name = data.draw(st.sampled_from(["lorenz63", "lorenz63", "lorenz63", "nosuchcase", "", "../etc/passwd"]))
    with tempfile.TemporaryDirectory() as folder:
        argv = ["case", name, "--out", str(Path(folder) / "out"), "--quiet"]
        for override in _overrides(data):
            argv += ["--set", override]
        run_cli("cli: geonn case", argv, capsys, OVERRIDE_NAMES)


OPTION_VALUES = {  # option: (good values, bad values)
    "--members": (["3", "4"], ["0", "1", "-3", "x", "2.5"]), "--inflation": (["1.05", "1"], ["nan", "inf", "-1", "0", "x"]),
    "--dt": (["0.01"], ["0", "-0.01", "nan", "inf", "0.03", "x"]), "--burn-in": (["0", "0.1"], ["nan", "-1", "1e300"]),
    "--seed": (["0", "7"], ["-1", "x", "99999999999999999999"]), "--lag": (["2"], ["0", "-1", "x"]),
}


@fuzz("cli: geonn assimilate", 20)
@given(data=st.data())
def test_cli_assimilate(data, capsys):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        n_bad = data.draw(st.sampled_from([0, 1, 1, 1, 2]))
        parts = data.draw(st.permutations(["file", "method", "model", "options", "truth"]))[:n_bad]
        source = observation_source(data, folder, "file" not in parts)
        method = data.draw(st.sampled_from(["nosuch", "4dvarnet"] if "method" in parts else ["etkf", "enkf", "3dvar"]))
        model = data.draw(st.sampled_from(["nosuch", "lorenz96", str(folder)] if "model" in parts else ["lorenz63"]))
        argv = ["assimilate", str(source), "--model", model, "--method", method, "--out", str(folder / "out")]
        options = data.draw(st.lists(st.sampled_from(sorted(OPTION_VALUES)), max_size=2, unique=True))
        for option in options:
            argv += [option, data.draw(st.sampled_from(OPTION_VALUES[option]["options" in parts]))]
        if "--members" not in options and method != "3dvar":
            argv += ["--members", "3"]
        if data.draw(st.booleans()) or "truth" in parts:
            (folder / "truth").mkdir()
            argv += ["--truth", str(observation_source(data, folder / "truth", "truth" not in parts))]
        run_cli("cli: geonn assimilate", argv, capsys,
                [*OBS_NAMES, "--model", "--method", "--truth", *OPTION_VALUES, "--out", "method", "checkpoint", "members",
                 "inflation", "seed", "lag", "window", str(source)])


@st.composite
def field_files(draw, folder: Path, good_: bool):
    """A gridded variable ``tas`` in a netCDF file, whole or broken in random ways (or not a netCDF file at all)."""
    kind = "field" if good_ else draw(st.sampled_from(["field", "field", "field", "garbage", "missing", "label"]))
    path = folder / "field.nc"
    if kind == "garbage":
        path.write_bytes(draw(st.binary(max_size=100)))
        return path
    if kind == "missing":
        return folder / "missing.nc"
    if good_:
        sizes = (draw(st.integers(8, 12)), draw(st.integers(2, 3)), draw(st.integers(2, 4)))
        values = draw(hnp.arrays(np.float64, sizes, elements=NICE))
        da = xr.DataArray(values, dims=("time", "lat", "lon"), name="tas", attrs={"units": "K"},
                          coords={"lat": ("lat", np.linspace(-40, 40, sizes[1]), {"units": "degrees_north"}),
                                  "time": ("time", np.arange(sizes[0]), {"units": "days since 2000-01-01"})})
    else:
        da = draw(data_arrays(odd=True)).rename("tas")
    ds = da.to_dataset()
    if kind == "label":
        ds["label"] = ("time", np.array(["a"] * ds.sizes["time"])) if "time" in ds.dims else ("x", ["a"])
    ds.to_netcdf(path)
    return path


@fuzz("cli: geonn fields reduce", 12)
@given(data=st.data())
def test_cli_fields_reduce(data, capsys):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        bad = data.draw(st.sampled_from([None, None, "file", "var", "modes", "fraction"]))
        path = data.draw(field_files(folder, bad != "file"))
        var = data.draw(st.sampled_from(["label", "nosuch"] if bad == "var" else ["tas"]))
        modes = data.draw(st.sampled_from(["0", "-1", "100", "x"] if bad == "modes" else ["1", "2"]))
        argv = ["fields", "reduce", str(path), "--var", var, "--out", str(folder / "out"), "--quiet", "--modes", modes]
        if bad == "fraction" or data.draw(st.booleans()):
            argv += ["--train-fraction", data.draw(st.sampled_from(["0", "1", "nan", "-0.5", "x"] if bad == "fraction" else ["0.5", "0.75"]))]
        run_cli("cli: geonn fields reduce", argv, capsys,
                ["IN.nc", "--var", "--modes", "modes:", "--train-fraction", "--method", "--out", "tas", "label", str(path)])


# --- the count -----------------------------------------------------------------------------------------


def test_fuzz_totals(capsys):
    """Prints (and checks) how many cases were generated over how many entry points; runs last in this file."""
    missing = ENTRIES - set(RESULTS)
    if missing:
        pytest.skip(f"only part of the fuzz ran (not: {sorted(missing)})")
    total = sum(counts["cases"] for counts in RESULTS.values())
    accepted = sum(counts["accepted"] for counts in RESULTS.values())
    refused = sum(counts["refused"] for counts in RESULTS.values())
    with capsys.disabled():
        print(f"\nfuzz: {total} generated cases over {len(RESULTS)} entry points: {accepted} gave a checked result, "
              f"{refused} a geonn error naming the argument, {len(FAILED)} failures")
        for entry in sorted(RESULTS):
            counts = RESULTS[entry]
            print(f"  {entry:28s} {counts['cases']:5d} cases {counts['accepted']:5d} results {counts['refused']:5d} refused"
                  f"{'  FAILED' if entry in FAILED else ''}")
    assert not FAILED, f"failing entry points: {sorted(FAILED)}"
    assert len(RESULTS) >= 25
    assert total >= 1000
