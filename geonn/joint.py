"""Joint estimation of unknown states and a learned tendency: a weak-constraint variational cost.

Observations ``y`` of trajectories are noisy, incomplete (some components never observed) or
both. The states ``x`` at every time are unknowns, trained together with the tendency ``F_theta``
inside a Runge-Kutta step ``Phi_theta`` (one step of ``dt``), by minimising

    J(x, theta) = 1/2 sum_{observed (t, i)} ((x_{t,i} - y_{t,i}) / sigma_o,i)^2
                + 1/2 sum_{k in horizons} sum_t |(x_{t+k} - Phi_theta^k(x_t)) / (sigma_q s sqrt(k))|^2

an observation misfit where observed, plus a dynamical misfit between each state and the model's
``k``-step forecast of an earlier one (``k = 1``; multi-step terms are optional; the ``sqrt(k)``
treats the one-step model errors as independent). ``sigma_q`` is the assumed standard deviation of
the one-step model error: small values make the states a trajectory of the learned model (the
strong-constraint limit); a decreasing schedule of them is a continuation from a smoothed
trajectory towards a dynamically consistent one. Entries observed with ``sigma_o = 0`` are held at
their observed values (exact observations, e.g. the observed component of an augmented state).

Under ``torchrun`` (:mod:`geonn.distributed`) the windows are sharded over the ranks when there
are at least as many as ranks: each rank builds the normal equations of its windows, eliminates
their states, and the Schur complements over the parameters, the right-hand sides and the costs
are summed over the ranks, so every rank takes the Levenberg-Marquardt step of the whole problem
(the states of different windows do not couple). One trajectory (one window) is one banded
system that does not split: it runs replicated, the same computation on every rank. Either
way rank 0 alone writes the checkpoint and shows the bar, and a resume starts every rank from it.

Minimisation is by Levenberg-Marquardt (more1978) on the stacked residuals. The Jacobian is
sparse: each dynamical residual touches two states and the model's parameters, so the damped
normal equations are a banded block over the states bordered by a dense block over the
parameters. Each step eliminates the states with a banded Cholesky factorisation (LAPACK
``pbtrf`` through :func:`scipy.linalg.cholesky_banded`, O(n_states bandwidth^2)) and solves the
small Schur complement for the parameters, so a 10^4-step trajectory with a 57-parameter network
costs about a second per iteration. Per-transition Jacobians come from ``torch.func``
(``vmap(jacrev)``). With ``train_model=False`` the parameters are held: the same cost then infers
states under a known (or learned) model, e.g. the latent components of an augmented state before
a forecast (ouala2020).

References: ouala2020 (latent augmented states learned jointly with the dynamics from one
observed component of Lorenz-63), nguyen2019, nguyen2020 and fablet2021 (joint estimation of
states and a learned model from noisy and partial observations; variational and weak-constraint
formulations), more1978 (Levenberg-Marquardt).

Shapes and units: ``observations`` ``(time, state_dim)`` or ``(window, time, state_dim)``, state
units, NaN allowed where not observed; ``sigma_o`` and ``s`` in state units (scalar or per
component); ``sigma_q`` in units of ``s`` per step of ``dt`` (model time units).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.sparse
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .errors import InputError, InputTypeError, describe
from .integrators import RungeKuttaStep
from .io import save_checkpoint

CHECKPOINT_NAME = "joint.pt"
CHECKPOINT_FORMAT = 1


@dataclass
class JointConfig:
    """Hyperparameters of :func:`estimate_jointly`.

    Attributes:
        model_std: the continuation schedule of ``sigma_q``, the one-step model-error standard
            deviation (units of ``dynamics_scale`` per step), one stage per entry, usually
            decreasing (e.g. ``[1e-1, 1e-2, 1e-3, 1e-4]``).
        epochs_per_stage: epochs (each checkpointed) per entry of ``model_std``.
        iterations: Levenberg-Marquardt iterations (Jacobian evaluations) per epoch.
        horizons: forecast horizons ``k`` (steps) of the dynamical misfit; ``[1]`` is one-step
            consistency, ``[1, 4]`` adds four-step terms.
        train_model: estimate the model's parameters with the states; False holds them.
        tolerance: an epoch ends early once an accepted step lowers the cost by less than this
            relative amount, or no step lowers it.
        initial_damping: the Levenberg-Marquardt damping at the start.
    """

    model_std: list[float] = field(default_factory=lambda: [1e-1, 1e-2, 1e-3, 1e-4])
    epochs_per_stage: int = 1
    iterations: int = 15
    horizons: list[int] = field(default_factory=lambda: [1])
    train_model: bool = True
    tolerance: float = 1e-10
    initial_damping: float = 1e-3

    def __post_init__(self):
        self.model_std = list(self.model_std)
        self.horizons = list(self.horizons)
        if not self.model_std or any(
            isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0 for v in self.model_std
        ):
            raise InputError(f"model_std: expected a non-empty list of positive numbers, got {self.model_std!r}")
        for name in ("epochs_per_stage", "iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name}: expected an integer >= 1, got {describe(value)}")
        if not self.horizons or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.horizons):
            raise InputError(f"horizons: expected a non-empty list of integers >= 1, got {self.horizons!r}")
        if len(set(self.horizons)) != len(self.horizons):
            raise InputError(f"horizons: expected distinct horizons, got {self.horizons!r}")
        for name in ("tolerance", "initial_damping"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise InputError(f"{name}: expected a positive number, got {describe(value)}")
        if not isinstance(self.train_model, bool):
            raise InputError(f"train_model: expected true or false, got {describe(self.train_model)}")

    @property
    def epochs(self) -> int:
        return len(self.model_std) * self.epochs_per_stage


@dataclass
class JointResult:
    """What :func:`estimate_jointly` returns.

    Attributes:
        states: the estimated states, the shape of the observations (state units).
        history: one row per epoch: ``epoch``, ``model_std``, ``cost``, ``observation_cost``,
            ``dynamics_cost`` (the two halves of ``J`` at the end of the epoch), ``damping``,
            ``iterations`` (Jacobians evaluated), ``seconds``.
        seconds: time spent in epochs (all runs, when resumed).
        resumed_from_epoch: the epoch a resumed run started from (0 if not resumed).
    """

    states: torch.Tensor
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_epoch: int = 0


class _Flow(nn.Module):
    """``k`` steps of ``step`` with ``model`` from one state (for per-transition Jacobians)."""

    def __init__(self, model: nn.Module, step: RungeKuttaStep, dt: float):
        super().__init__()
        self.model, self.step, self.dt = model, step, dt

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        t = torch.zeros((), dtype=x.dtype)
        for _ in range(k):
            x = self.step(self.model, t, x, self.dt)
        return x


class _FlatFlow:
    """The ``k``-step map of ``model`` in ``step`` as a function of a flat parameter vector ``theta``."""

    def __init__(self, model: nn.Module, step: RungeKuttaStep, dt: float, trainable: bool = True):
        self.flow = _Flow(model, step, dt)
        named = [(n, p) for n, p in self.flow.named_parameters() if p.requires_grad] if trainable else []
        self.parameters = [p for _, p in named]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.n_params = sum(self.sizes)
        names = set(self.names)
        self.fixed = {n: p.detach() for n, p in self.flow.named_parameters() if n not in names}
        self.fixed.update(dict(self.flow.named_buffers()))

    def theta(self) -> torch.Tensor:
        if not self.parameters:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in self.parameters])

    def load_theta(self, theta: torch.Tensor) -> None:
        with torch.no_grad():
            for p, chunk, shape in zip(self.parameters, torch.split(theta, self.sizes), self.shapes):
                p.copy_(chunk.reshape(shape).to(p.dtype))

    def phi(self, k: int):
        """``phi(theta, x)``: ``x`` ``(D,)`` after ``k`` steps, for ``vmap`` over states."""

        def phi(theta, x):
            params = {n: c.reshape(s) for n, c, s in zip(self.names, torch.split(theta, self.sizes), self.shapes)}
            return torch.func.functional_call(self.flow, (params, self.fixed), (x, k))

        return phi


def _per_component(name: str, value, state_dim: int, *, allow_zero: bool) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float64)
    if tensor.dim() > 1 or (tensor.dim() == 1 and tensor.shape[0] != state_dim):
        raise InputError(f"{name}: expected a number or a tensor of shape ({state_dim},), got {describe(value)}")
    tensor = tensor.expand(state_dim).clone()
    if not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()) or (not allow_zero and bool((tensor == 0).any())):
        bound = ">= 0" if allow_zero else "> 0"
        raise InputError(f"{name}: expected finite values {bound}, got {tensor.tolist()}")
    return tensor


class _Problem:
    """The residuals of ``J`` and their normal equations for fixed data, over (free states, parameters)."""

    def __init__(self, model, step, dt, observations, mask, obs_std, dynamics_scale, horizons, train_model):
        self.horizons = list(horizons)
        self.observations = torch.where(mask, observations, torch.zeros((), dtype=observations.dtype))
        self.windows, self.times, self.state_dim = observations.shape
        self.free = ~(mask & (obs_std == 0))  # exact observations are held, not estimated
        self.weighted = mask & (obs_std > 0)
        self.obs_weight = torch.where(obs_std > 0, 1.0 / obs_std.clamp_min(1e-300), torch.zeros((), dtype=torch.float64))
        self.dynamics_scale = dynamics_scale
        self.n_states = int(self.free.sum())
        self.flat = _FlatFlow(model, step, dt, trainable=train_model)
        self.n_params = self.flat.n_params
        self.theta, self.load_theta, self._phi = self.flat.theta, self.flat.load_theta, self.flat.phi
        self.sharded = False  # True: this rank holds its share of the windows, sums go over the ranks

    # -- residuals ---------------------------------------------------------------------------
    def residual_parts(self, states: torch.Tensor, theta: torch.Tensor, model_std: float) -> list[torch.Tensor]:
        """Observation residuals (weighted observed entries), then one block per horizon."""
        with torch.no_grad():
            misfit = (states - self.observations) * self.obs_weight
            parts = [misfit[self.weighted]]
            for k in self.horizons:
                if self.times <= k:
                    continue
                start = states[:, :-k].reshape(-1, self.state_dim)
                forecast = torch.func.vmap(self._phi(k), in_dims=(None, 0))(theta, start)
                scale = model_std * math.sqrt(k) * self.dynamics_scale
                parts.append(((states[:, k:].reshape(-1, self.state_dim) - forecast) / scale).reshape(-1))
        return parts

    def cost(self, states, theta, model_std) -> tuple[float, float]:
        """``J`` and its observation half (over every rank's windows when sharded)."""
        parts = self.residual_parts(states, theta, model_std)
        r = torch.cat(parts)
        sums = torch.stack((r @ r, parts[0] @ parts[0]))
        if self.sharded:
            sums = distributed.all_reduce_sum(sums)
        total, obs = sums.tolist()
        return 0.5 * total, 0.5 * obs

    # -- normal equations ------------------------------------------------------------------------
    def normal_equations(self, states: torch.Tensor, theta: torch.Tensor, model_std: float):
        """``J^T J`` and ``J^T r`` of the stacked residuals w.r.t. (free states, parameters).

        Returns ``(states_block, coupling, params_block, gradient)``: the sparse banded block over
        the free states ``(n, n)``, the dense coupling ``(n, P)``, the dense parameter block
        ``(P, P)`` and the gradient ``(n + P,)``; built from per-transition Jacobians
        (``vmap(jacrev)``) without forming ``J``.
        """
        W, L, D, P = self.windows, self.times, self.state_dim, self.n_params
        n_all = W * L * D
        with torch.no_grad():
            weight = self.obs_weight.expand(W, L, D) * self.weighted
            diag_blocks = torch.diag_embed(weight.pow(2)).numpy().copy()  # (W, L, D, D)
            grad_states = ((states - self.observations) * weight * weight).numpy().copy()  # (W, L, D)
        coupling = np.zeros((W, L, D, P))
        params_block = np.zeros((P, P))
        grad_params = np.zeros(P)
        off_blocks = {}
        for k in self.horizons:
            if L <= k:
                continue
            start = states[:, :-k].reshape(-1, D)
            argnums = (0, 1) if P else 1
            phi = self._phi(k)
            with torch.no_grad():
                forecast = torch.func.vmap(phi, in_dims=(None, 0))(theta, start)
            jac = torch.func.vmap(torch.func.jacrev(phi, argnums=argnums), in_dims=(None, 0))(theta, start)
            jac_theta, jac_x = jac if P else (None, jac)
            scale = (model_std * math.sqrt(k) * self.dynamics_scale).numpy()  # (D,)
            n = start.shape[0]
            residual = ((states[:, k:].reshape(-1, D) - forecast).numpy() / scale)  # (n, D)
            b_start = -jac_x.numpy() / scale[None, :, None]  # d r / d x_t  (n, D, D)
            b_target = 1.0 / scale  # d r / d x_{t+k}: diagonal
            diag_blocks[:, :-k] += np.einsum("nij,nik->njk", b_start, b_start).reshape(W, L - k, D, D)
            diag_blocks[:, k:] += np.diag(b_target**2)
            off_blocks[k] = off_blocks.get(k, 0.0) + (b_start * b_target[None, :, None]).transpose(0, 2, 1).reshape(W, L - k, D, D)
            grad_states[:, :-k] += np.einsum("nij,ni->nj", b_start, residual).reshape(W, L - k, D)
            grad_states[:, k:] += (residual * b_target).reshape(W, L - k, D)
            if P:
                b_params = -jac_theta.numpy() / scale[None, :, None]  # (n, D, P)
                coupling[:, :-k] += np.einsum("nij,nip->njp", b_start, b_params).reshape(W, L - k, D, P)
                coupling[:, k:] += (b_params * b_target[None, :, None]).reshape(W, L - k, D, P)
                flat = b_params.reshape(n * D, P)
                params_block += flat.T @ flat
                grad_params += flat.T @ residual.reshape(-1)
        # the states block as a sparse matrix over all entries, then restricted to the free ones
        index = np.arange(n_all).reshape(W, L, D)
        rows = [np.broadcast_to(index[..., :, None], (W, L, D, D)).reshape(-1)]
        cols = [np.broadcast_to(index[..., None, :], (W, L, D, D)).reshape(-1)]
        vals = [diag_blocks.reshape(-1)]
        for k, block in off_blocks.items():  # block[j, m]: row x_t component j, column x_{t+k} component m
            r_idx = np.broadcast_to(index[:, :-k, :, None], (W, L - k, D, D)).reshape(-1)
            c_idx = np.broadcast_to(index[:, k:, None, :], (W, L - k, D, D)).reshape(-1)
            rows += [r_idx, c_idx]
            cols += [c_idx, r_idx]
            vals += [block.reshape(-1), block.reshape(-1)]
        full = scipy.sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_all, n_all))
        free = self.free.reshape(-1).numpy()
        states_block = full[free][:, free].tocsr()
        gradient = np.concatenate((grad_states.reshape(-1)[free], grad_params))
        return states_block, coupling.reshape(n_all, P)[free], params_block, gradient


def _damped_step(states_block, coupling, params_block, gradient, damping: float, sharded: bool = False) -> np.ndarray | None:
    """Solve ``(A + damping diag(A)) delta = -g``: banded Cholesky over the states, Schur complement
    over the parameters. Returns None when the damped matrix is not numerically positive definite.

    ``sharded``: the blocks are this rank's windows (its states, and its terms of the parameter
    block and gradient); the states are eliminated rank by rank (windows do not couple states),
    the Schur complements and right-hand sides are summed over the ranks, and every rank solves
    the same parameter step (``J^T J`` and ``J^T r`` of the whole problem, reduced).
    """
    n_states, n_params = coupling.shape
    params_diagonal = np.diag(params_block).copy()
    if sharded and n_params:
        params_diagonal = distributed.all_reduce_sum(torch.as_tensor(params_diagonal)).numpy()
    diagonal = np.concatenate((states_block.diagonal(), params_diagonal))
    top = float(diagonal.max(initial=0.0))
    if sharded:
        top = distributed.all_reduce_max(top)
    diagonal = np.maximum(diagonal, 1e-12 * max(top, 1e-300))
    coo = states_block.tocoo()
    bandwidth = int(np.abs(coo.row - coo.col).max(initial=0))
    banded = np.zeros((bandwidth + 1, n_states))
    for k in range(bandwidth + 1):
        banded[k, : n_states - k] = states_block.diagonal(-k)
    banded[0] += damping * diagonal[:n_states]
    failed = 0.0
    try:
        factor = scipy.linalg.cholesky_banded(banded, lower=True)
        solved = scipy.linalg.cho_solve_banded((factor, True), np.column_stack((coupling, gradient[:n_states])))
    except (np.linalg.LinAlgError, ValueError):
        failed, solved = 1.0, np.zeros((n_states, n_params + 1))
    schur = params_block - coupling.T @ solved[:, :n_params]  # this rank's part of the Schur complement
    rhs = gradient[n_states:] - coupling.T @ solved[:, n_params]
    if sharded:
        reduced = distributed.all_reduce_sum(torch.as_tensor(np.concatenate(([failed], schur.reshape(-1), rhs)))).numpy()
        failed, schur, rhs = reduced[0], reduced[1: 1 + n_params**2].reshape(n_params, n_params), reduced[1 + n_params**2:]
    if failed:
        return None
    if not n_params:
        return -solved[:, 0]
    try:
        delta_theta = scipy.linalg.cho_solve(scipy.linalg.cho_factor(schur + np.diag(damping * diagonal[n_states:]), lower=True),
                                             -rhs)
    except (np.linalg.LinAlgError, ValueError):
        return None
    delta_states = -(solved[:, n_params] + solved[:, :n_params] @ delta_theta)
    return np.concatenate((delta_states, delta_theta))


def _check_inputs(observations, mask, states):
    if not isinstance(observations, torch.Tensor) or not observations.is_floating_point():
        raise InputTypeError(f"observations: expected a floating-point tensor (time, state_dim) or (window, time, state_dim), "
                             f"got {describe(observations)}")
    if observations.dim() not in (2, 3) or observations.shape[-2] < 2 or observations.shape[-1] < 1:
        raise InputError(f"observations: expected shape (time, state_dim) or (window, time, state_dim) with at least 2 times, "
                         f"got {tuple(observations.shape)}")
    if mask is None:
        mask = torch.isfinite(observations)
    else:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise InputTypeError(f"mask: expected a boolean tensor broadcastable to {tuple(observations.shape)}, got {describe(mask)}")
        try:
            mask = mask.expand(observations.shape)
        except RuntimeError:
            raise InputError(f"mask: expected a shape broadcastable to {tuple(observations.shape)}, got {tuple(mask.shape)}") from None
    if not bool(torch.isfinite(observations[mask]).all()):
        raise InputError("observations: expected finite values where observed (mask True), got NaN or inf")
    if not bool(mask.any()):
        raise InputError("mask: expected at least one observed entry, got none")
    if states is None:
        if not bool(mask.all()):
            raise InputError("states: some entries are not observed; give initial states for them (same shape as observations)")
        states = observations.clone()
    elif not isinstance(states, torch.Tensor) or tuple(states.shape) != tuple(observations.shape):
        raise InputError(f"states: expected initial states of shape {tuple(observations.shape)}, got {describe(states)}")
    elif not bool(torch.isfinite(states).all()):
        raise InputError("states: expected finite initial states, got NaN or inf")
    return mask, states


def _prepare(model, observations, dt, mask, states, obs_std, dynamics_scale, step, horizons, train_model, context=None):
    """Checked inputs as a :class:`_Problem` and initial states ``(window, time, state_dim)``.

    With a distributed ``context`` and at least as many windows as ranks, the problem holds this
    rank's windows ``[rank::world]`` (``problem.sharded``); the states returned are still all of them.
    """
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model: expected a torch.nn.Module tendency, got {describe(model)}")
    if isinstance(dt, bool) or not isinstance(dt, int | float) or not math.isfinite(dt) or dt <= 0:
        raise InputError(f"dt: expected a positive step, got {describe(dt)}")
    mask, states = _check_inputs(observations, mask, states)
    single = observations.dim() == 2
    if single:
        observations, mask, states = observations[None], mask[None], states[None]
    observations = observations.to(torch.float64)
    state_dim = observations.shape[-1]
    expected_dim = getattr(model, "state_dim", None)
    if expected_dim is not None and expected_dim != state_dim:
        raise InputError(f"observations: expected last dimension {expected_dim} for the model, got {tuple(observations.shape)}")
    obs_std = _per_component("obs_std", obs_std, state_dim, allow_zero=True)
    dynamics_scale = _per_component("dynamics_scale", dynamics_scale, state_dim, allow_zero=False)
    mask = mask.contiguous()
    sharded = context is not None and context.distributed and observations.shape[0] >= context.world
    if sharded:
        problem = _Problem(model, step, float(dt), distributed.shard(observations, context), distributed.shard(mask, context),
                           obs_std, dynamics_scale, horizons, train_model)
        problem.sharded = True
        free = ~(mask & (obs_std == 0))
    else:
        problem = _Problem(model, step, float(dt), observations, mask, obs_std, dynamics_scale, horizons, train_model)
        free = problem.free
    states = torch.where(free, states.to(torch.float64), observations)  # held entries take the observed values
    return problem, states, single


def estimate_jointly(
    model: nn.Module,
    observations: torch.Tensor,
    dt: float,
    *,
    mask: torch.Tensor | None = None,
    states: torch.Tensor | None = None,
    obs_std=1.0,
    dynamics_scale=1.0,
    step: RungeKuttaStep | None = None,
    config: JointConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> JointResult:
    """Estimate states and (unless ``config.train_model`` is False) ``model`` by minimising ``J``.

    Args:
        model: the learned tendency ``f(t, x)`` (e.g. a ``Standardised(BilinearResidual)``),
            trained in place; batched over the leading dimension.
        observations: ``(time, state_dim)`` or ``(window, time, state_dim)`` on a grid of step
            ``dt`` (state units); windows are independent trajectories, each with its own states.
        dt: the time step (model time units).
        mask: True where observed, broadcastable to ``observations`` (e.g. ``(state_dim,)``);
            default: the finite entries.
        states: initial states, the shape of ``observations`` (needed where not observed; default
            the observations). Entries observed with ``obs_std`` 0 are held at the observations.
        obs_std: observation error standard deviation, a number or ``(state_dim,)`` (state units);
            0 marks exact observations.
        dynamics_scale: per-component unit of the dynamical misfit, a number or ``(state_dim,)``
            (state units); ``sigma_q`` of ``config.model_std`` is counted in it.
        step: the scheme (default classic RK4); a learnable step trains with the model.
        config: :class:`JointConfig`.
        checkpoint_dir: where ``joint.pt`` is written after every epoch (atomically).
        resume: continue from ``checkpoint_dir/joint.pt`` if it exists (bit for bit).
        progress: show a tqdm bar.

    Returns:
        :class:`JointResult` with the estimated states; ``model`` (and a learnable ``step``) hold
        the estimated parameters.

    Example:
        >>> import torch, geonn
        >>> from geonn.joint import JointConfig, estimate_jointly
        >>> truth = torch.as_tensor(geonn.simulate(geonn.Lorenz63(), 200, 0.01, spinup_steps=500).state.values)
        >>> noisy = truth + torch.randn(truth.shape, dtype=torch.float64)
        >>> cfg = JointConfig(model_std=[1e-3], train_model=False, iterations=10)
        >>> result = estimate_jointly(geonn.Lorenz63(), noisy, 0.01, config=cfg, progress=False)
        >>> bool((result.states - truth).pow(2).mean() < (noisy - truth).pow(2).mean())
        True
    """
    config = config or JointConfig()
    step = step or RungeKuttaStep("rk4")
    if resume and checkpoint_dir is None:
        raise InputError("resume: resuming needs checkpoint_dir, got None")
    context = distributed.setup("cpu")
    problem, states, single = _prepare(model, observations, dt, mask, states, obs_std, dynamics_scale, step,
                                       config.horizons, config.train_model, context)
    n_windows = states.shape[0]
    result = JointResult(states=states)
    epoch, damping = 0, config.initial_damping
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    saved = distributed.resume_state(path, resume)
    if saved is not None:
        _check_resumable(saved, config, tuple(states.shape), path)
        model.load_state_dict(saved["model"])
        step.load_state_dict(saved["step"])
        states = saved["states"]
        epoch, damping = int(saved["epoch"]), float(saved["damping"])
        result.history = list(saved["history"])
        result.seconds = float(saved["seconds"])
        result.resumed_from_epoch = epoch

    bar = tqdm(total=config.epochs, initial=epoch, desc="joint", unit="epoch", disable=not distributed.show_progress(progress),
               dynamic_ncols=True)
    try:
        while epoch < config.epochs:
            started = time.perf_counter()
            model_std = float(config.model_std[epoch // config.epochs_per_stage])
            if epoch % config.epochs_per_stage == 0 and epoch > 0:
                damping = config.initial_damping  # a new stage is a new problem
            local = distributed.shard(states, context) if problem.sharded else states
            local, damping, evaluations = _levenberg_marquardt(problem, local, model_std, damping, config)
            total, obs = problem.cost(local, problem.theta(), model_std)
            states = distributed.gather_shards(local, n_windows) if problem.sharded else local
            if not math.isfinite(total):
                raise InputError(f"joint estimation diverged at epoch {epoch}: the cost is {total}; check the data and initial states")
            epoch += 1
            result.seconds += time.perf_counter() - started
            result.history.append({"epoch": epoch, "model_std": model_std, "cost": total, "observation_cost": obs,
                                   "dynamics_cost": total - obs, "damping": damping, "iterations": evaluations,
                                   "seconds": time.perf_counter() - started})
            distributed.save_on_main({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "step": step.state_dict(),
                                      "states": states, "epoch": epoch, "damping": damping, "history": result.history,
                                      "seconds": result.seconds, "config": dataclasses.asdict(config)}, path, save_checkpoint)
            bar.set_postfix(cost=f"{total:.4e}", model_std=f"{model_std:.0e}")
            bar.update(1)
    finally:
        bar.close()
    result.states = states[0] if single else states
    return result


def _levenberg_marquardt(problem: _Problem, states, model_std, damping, config) -> tuple[torch.Tensor, float, int]:
    """``config.iterations`` Jacobians' worth of LM steps from ``states`` and the model's parameters."""
    theta = problem.theta()
    total, _ = problem.cost(states, theta, model_std)
    free = problem.free
    evaluations = 0
    while evaluations < config.iterations:
        blocks = problem.normal_equations(states, theta, model_std)
        evaluations += 1
        improved = False
        while damping < 1e16:
            delta = _damped_step(*blocks, damping, problem.sharded)
            if delta is not None:
                delta = torch.as_tensor(delta)
                trial_states = states.clone()
                trial_states[free] += delta[: problem.n_states]
                trial_theta = theta + delta[problem.n_states:]
                trial_total, _ = problem.cost(trial_states, trial_theta, model_std)
                if math.isfinite(trial_total) and trial_total < total:
                    gain = (total - trial_total) / total
                    states, theta, total = trial_states, trial_theta, trial_total
                    damping = max(damping / 3.0, 1e-15)
                    improved = True
                    break
            damping *= 4.0
        problem.load_theta(theta)
        if not improved or gain < config.tolerance:
            break
    return states, damping, evaluations


def joint_cost(model, states, observations, dt, *, mask=None, obs_std=1.0, dynamics_scale=1.0, model_std=1e-3,
               horizons=(1,), step: RungeKuttaStep | None = None) -> dict[str, float]:
    """The two halves of ``J`` at given states: ``observation``, ``dynamics`` and their sum ``total``.

    Arguments as for :func:`estimate_jointly`; ``model_std`` is one value of ``sigma_q``.
    """
    step = step or RungeKuttaStep("rk4")
    problem, states, _ = _prepare(model, observations, dt, mask, states, obs_std, dynamics_scale, step, list(horizons), False)
    total, obs = problem.cost(states, problem.theta(), float(model_std))
    return {"observation": obs, "dynamics": total - obs, "total": total}


def parameter_covariance(model, states, observations, dt, *, mask=None, obs_std=1.0, dynamics_scale=1.0, model_std=1e-3,
                         horizons=(1,), step: RungeKuttaStep | None = None, rcond: float = 1e-10) -> torch.Tensor:
    """Laplace (Gauss-Newton) covariance of the model's trainable parameters, the states marginalised.

    At a minimum of ``J`` (e.g. the result of :func:`estimate_jointly`), the posterior of
    ``(x, theta)`` is approximated by a Gaussian with precision ``J^T J``; the covariance of
    ``theta`` alone is the pseudo-inverse of the Schur complement of the states block. Directions
    that do not change the model (continuous symmetries of a network) get zero variance.

    Arguments as for :func:`joint_cost`; ``rcond`` cuts the Schur complement's eigenvalues below
    ``rcond`` times the largest. Returns ``(n_params, n_params)`` in the parameters' units squared.
    """
    step = step or RungeKuttaStep("rk4")
    problem, states, _ = _prepare(model, observations, dt, mask, states, obs_std, dynamics_scale, step, list(horizons), True)
    states_block, coupling, params_block, _ = problem.normal_equations(states, problem.theta(), float(model_std))
    coo = states_block.tocoo()
    bandwidth = int(np.abs(coo.row - coo.col).max(initial=0))
    banded = np.zeros((bandwidth + 1, problem.n_states))
    for k in range(bandwidth + 1):
        banded[k, : problem.n_states - k] = states_block.diagonal(-k)
    factor = scipy.linalg.cholesky_banded(banded, lower=True)
    schur = params_block - coupling.T @ scipy.linalg.cho_solve_banded((factor, True), coupling)
    return torch.as_tensor(np.linalg.pinv(0.5 * (schur + schur.T), rcond=rcond, hermitian=True))


def forecast_spread(model, covariance: torch.Tensor, starts: torch.Tensor, dt: float, *, lead: int = 1,
                    step: RungeKuttaStep | None = None) -> float:
    """Root mean square, over ``starts (n, D)`` and components, of the standard deviation of the
    ``lead``-step forecast that the parameter ``covariance`` implies (linearised): the forecast error
    expected from the parameters' uncertainty alone, from exact starting states (state units)."""
    step = step or RungeKuttaStep("rk4")
    flat = _FlatFlow(model, step, float(dt))
    if tuple(covariance.shape) != (flat.n_params, flat.n_params):
        raise InputError(f"covariance: expected shape ({flat.n_params}, {flat.n_params}), got {describe(covariance)}")
    if not isinstance(starts, torch.Tensor) or starts.dim() != 2:
        raise InputError(f"starts: expected a tensor (n, state_dim), got {describe(starts)}")
    jac = torch.func.vmap(torch.func.jacrev(flat.phi(int(lead))), in_dims=(None, 0))(flat.theta(), starts.to(torch.float64))
    variance = torch.einsum("ndp,pq,ndq->nd", jac, covariance.to(torch.float64), jac)
    return float(variance.clamp_min(0).mean().sqrt())


def _check_resumable(saved: dict, config: JointConfig, shape, path: Path) -> None:
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"checkpoint {str(path)!r}: format {saved.get('format')!r} is not {CHECKPOINT_FORMAT}")
    current = dataclasses.asdict(config)
    changed = {k: (saved["config"].get(k), v) for k, v in current.items() if saved["config"].get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise InputError(f"resume: the checkpoint {str(path)!r} was written with another joint config ({detail})")
    if tuple(saved["states"].shape) != shape:
        raise InputError(f"resume: the checkpoint {str(path)!r} holds states of shape {tuple(saved['states'].shape)}, expected {shape}")


__all__ = ["JointConfig", "JointResult", "estimate_jointly", "forecast_spread", "joint_cost", "parameter_covariance"]
