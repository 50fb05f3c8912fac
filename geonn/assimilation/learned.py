"""A learned variational solver (4DVarNet, fablet2021): a variational cost with a trainable prior,
minimised by a trainable iterative solver, trained end to end on windows of observations.

For a window of states ``x (steps, D)`` and observations ``y`` with a mask ``m`` (1 where observed),
in standardised units ``z = (x - mean) / scale``, the cost is

    ``U(z) = w_obs |m * (y - z)|^2 / |m|  +  w_prior |z - Phi(z)|^2 / (steps D)``

with ``Phi`` the prior: :class:`DynamicalPrior` advances every state one model step with a learned
tendency inside a Runge-Kutta step, so ``z - Phi(z)`` is the dynamical misfit along the window
(fablet2021's ``Phi_ode`` with F_theta in place of the true equations). ``w_obs`` and ``w_prior``
are trainable (as logs). :class:`GradientLSTM` is the solver: from the first guess ``z_0`` (the
linear interpolation of the observations), ``iterations`` updates

    ``g_k = grad U(z_k) / rms(grad U(z_k))``,   ``(u_k, h_k) = LSTM([g_k, z_k], h_{k-1})``,
    ``z_{k+1} = z_k - a_k g_k - u_k``

where the LSTM is a convolutional LSTM over the window's steps (a 1-D convolution of ``kernel``
steps, every state component a channel) and ``a_k`` a trainable step per iteration (fablet2021's
update adds such a gradient term to the LSTM's); the LSTM's output layer starts at zero, so the
untrained solver is normalised gradient descent on ``U``. The gradient is taken by autograd, inside the training
graph (``create_graph``), so the reconstruction loss trains the prior, the cost weights and the
solver together (the supervised setting of fablet2021):

    ``loss = mean |x_hat - x_true|^2 / scale^2  +  prior_weight mean |z_true - Phi(z_true)|^2``

Windows are a tensor dimension throughout: ``(windows, steps, D)``.

Under ``torchrun`` (:mod:`geonn.distributed`) :meth:`LearnedSolver.fit` runs data-parallel: every
rank draws the same global batch order, solves its share of each batch's windows
(``idx[rank::world]``) with the loss weighted by that share, and the gradients are summed over the
ranks before clipping and the Adam step, so every rank takes the step of one process with the
same global batch (up to floating-point summation order; the windows are independent through the
solver). The validation windows are sharded the same way. Rank 0 writes the checkpoints and
shows the bar; a resume starts every rank from rank 0's checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .. import distributed
from ..errors import InputError, InputTypeError, NotFittedError, describe
from ..integrators import RungeKuttaStep
from ..io import load_checkpoint, save_checkpoint
from .windows import _check_windows, interpolate_observations

CHECKPOINT_NAME = "solver.pt"
CHECKPOINT_FORMAT = 1


# --- the prior and the solver --------------------------------------------------------------------------


class DynamicalPrior(nn.Module):
    """``Phi(x)``: every state of a window advanced one model step; the first state kept.

    ``Phi(x)_0 = x_0`` and ``Phi(x)_k = step(f, x_{k-1}, dt)`` for ``k >= 1``, all steps at once
    (one batched Runge-Kutta step over the window), so ``x - Phi(x)`` is the one-step dynamical
    misfit along the window (zero for a trajectory of the model).

    Args:
        tendency: ``f(t, x) -> dx/dt`` over ``(..., D)`` in state units (a learned operator, e.g.
            :class:`~geonn.Standardised` around a :class:`~geonn.BilinearResidual`, or a true model).
        dt: the model step (model time units).
        scheme: a tableau name or a :class:`~geonn.RungeKuttaStep`.

    Call: ``prior(x)`` with ``x (..., steps, D)`` in state units; returns the same shape.
    """

    def __init__(self, tendency: nn.Module, dt: float, scheme="rk4"):
        super().__init__()
        if not callable(tendency):
            raise InputTypeError(f"tendency: expected a tendency f(t, x), got {describe(tendency)}")
        if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0:
            raise InputError(f"dt: expected a positive model step, got {describe(dt)}")
        self.tendency = tendency
        self.dt = float(dt)
        self.step = scheme if isinstance(scheme, RungeKuttaStep) else RungeKuttaStep(scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.zeros((), dtype=x.dtype, device=x.device)
        advanced = self.step(self.tendency, t, x[..., :-1, :], self.dt)
        return torch.cat((x[..., :1, :], advanced), dim=-2)


class GradientLSTM(nn.Module):
    """The iterative solver's update: a convolutional LSTM over the window's steps.

    Input channels: the normalised gradient ``(windows, steps, D)`` and, with ``state_input``, the
    current iterate; hidden state ``hidden`` channels per step; the gates are one 1-D convolution
    of ``kernel`` steps over ``[input, hidden]`` (zero padding); the update is a 1x1 convolution
    of the hidden state back to ``D`` channels (fablet2021's ``model_GradUpdateLSTM``). With
    ``downsample = p > 1`` the LSTM runs on the window averaged over blocks of ``p`` steps and its
    update is interpolated linearly back to every step (as the multi-scale LSTMs of later 4DVarNet
    versions): ``p`` times cheaper, and each iteration reaches ``p`` times further along the window.
    With ``local = w > 0`` a linear convolution of ``w`` steps of the inputs at full resolution is
    added to the update (a learned fine-scale preconditioning of the gradient). The log of the
    gradient's norm (the inputs are normalised per window) is one more input channel. Both output
    layers start at zero.

    Call: ``lstm(gradient, state, memory, log_norm) -> (update, memory)``; ``memory`` is ``None`` at the
    first iteration, then ``(hidden, cell)`` each ``(windows, hidden, ceil(steps / p))``.
    """

    def __init__(self, state_dim: int, hidden: int = 16, kernel: int = 3, downsample: int = 1, local: int = 0,
                 state_input: bool = True):
        super().__init__()
        for name, value in (("state_dim", state_dim), ("hidden", hidden), ("kernel", kernel), ("downsample", downsample)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name}: expected an integer >= 1, got {describe(value)}")
        if isinstance(local, bool) or not isinstance(local, int) or local < 0:
            raise InputError(f"local: expected an integer >= 0, got {describe(local)}")
        if kernel % 2 == 0 or (local and local % 2 == 0):
            raise InputError(f"kernel, local: expected odd numbers of steps (centred), got {kernel} and {local}")
        self.state_dim, self.hidden, self.kernel, self.local = state_dim, hidden, kernel, local
        self.downsample, self.state_input = downsample, bool(state_input)
        inputs = state_dim * (2 if state_input else 1) + 1  # + the log of the gradient's norm
        self.gates = nn.Conv1d(inputs + hidden, 4 * hidden, kernel, padding=kernel // 2)
        self.out = nn.Conv1d(hidden, state_dim, 1, bias=False)
        nn.init.zeros_(self.out.weight)  # at initialisation the solver is plain (normalised) gradient descent
        if local:
            self.fine = nn.Conv1d(inputs, state_dim, local, padding=local // 2, bias=False)
            nn.init.zeros_(self.fine.weight)

    def forward(self, gradient: torch.Tensor, state: torch.Tensor, memory=None, log_norm: torch.Tensor | None = None):
        parts = [gradient, state] if self.state_input else [gradient]
        if log_norm is None:
            log_norm = gradient.new_zeros(gradient.shape[:-2] + (1, 1))
        parts.append(log_norm.expand(*gradient.shape[:-1], 1))
        inputs = torch.cat(parts, -1).transpose(-1, -2)  # (windows, channels, steps)
        steps = inputs.shape[-1]
        coarse = F.avg_pool1d(inputs, self.downsample, ceil_mode=True) if self.downsample > 1 else inputs
        if memory is None:
            zeros = coarse.new_zeros((coarse.shape[0], self.hidden, coarse.shape[-1]))
            memory = (zeros, zeros)
        hidden, cell = memory
        i, f, o, g = self.gates(torch.cat((coarse, hidden), 1)).chunk(4, 1)
        cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
        hidden = torch.sigmoid(o) * torch.tanh(cell)
        update = self.out(hidden)
        if self.downsample > 1:
            update = F.interpolate(update, size=steps, mode="linear", align_corners=False)
        if self.local:
            update = update + self.fine(inputs)
        return update.transpose(-1, -2), (hidden, cell)


# --- training configuration -----------------------------------------------------------------------------


@dataclass
class SolverTrainConfig:
    """Hyperparameters of :meth:`LearnedSolver.fit`.

    Attributes:
        epochs: passes over the training windows (Adam).
        batch_size: windows per Adam step.
        learning_rate: Adam's initial learning rate (cosine decay to ``final_lr_fraction`` of it).
        final_lr_fraction: the end of the cosine schedule, as a fraction of ``learning_rate``.
        prior_weight: weight of the prior's one-step misfit on the true states in the loss.
        clip: largest gradient norm of an Adam step (0: no clipping).
        seed: seeds the batch order.
    """

    epochs: int = 20
    batch_size: int = 128
    learning_rate: float = 1e-3
    final_lr_fraction: float = 0.05
    prior_weight: float = 10.0
    clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size", "seed"):
            value = getattr(self, name)
            minimum = 1 if name == "batch_size" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise InputError(f"{name}: expected an integer >= {minimum}, got {describe(value)}")
        for name in ("learning_rate", "final_lr_fraction", "prior_weight", "clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"{name}: expected a finite number >= 0, got {describe(value)}")


@dataclass
class SolverFitResult:
    """What :meth:`LearnedSolver.fit` returns: the per-epoch history and timing."""

    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    resumed_from_epoch: int = 0

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else float("nan")


@dataclass
class LearnedResult:
    """A learned solver's estimate over one window: every step, and the observation times."""

    times: torch.Tensor  # (n_obs_times,)
    analysis_mean: torch.Tensor  # (n_obs_times, D): the estimate at the observation times
    smoothed: torch.Tensor  # (steps, D): the estimate at every model step of the window
    smoothed_times: torch.Tensor  # (steps,)


# --- the learned solver ----------------------------------------------------------------------------------


class LearnedSolver(nn.Module):
    """4DVarNet (fablet2021): a trainable variational cost minimised by a trainable LSTM solver.

    The parts compose: the prior ``Phi`` (any module mapping windows ``(..., steps, D)`` in state
    units to the same shape; :class:`DynamicalPrior` for learned dynamics) and the solver
    (:class:`GradientLSTM` by default). Observations are of state components: ``values (windows,
    steps, D)`` with NaN where a component is not observed (a :class:`~geonn.assimilation.Subset`
    operator's observations, scattered into the state).

    Args:
        prior: ``Phi``, in state units.
        state_dim: ``D``.
        solver: the update module, called ``solver(gradient, z, memory, log_norm) -> (update, memory)``
            (default ``GradientLSTM(state_dim, hidden, kernel, downsample, local)``).
        iterations: solver iterations (a fixed number, unrolled in training).
        hidden, kernel, downsample, local: the default solver's hidden channels, convolution width,
            coarsening and fine-scale convolution width (steps; see :class:`GradientLSTM`).
        step: the initial gradient step ``a_k`` of every iteration (standardised units).
        prior_cost_weight: the initial ``w_prior`` (``w_obs`` starts at 1). The prior term is a
            mean over every step and the observation term over the observed entries, so a cost
            close to a posterior's needs ``w_prior / w_obs ~ (steps D / n_obs) (sigma / q)^2``
            (``sigma`` the observation error, ``q`` a model error per step, both standardised):
            hundreds to thousands.

    Use :meth:`fit` on training windows (observations and true states) before
    :meth:`reconstruct` or :meth:`assimilate`; using an unfitted solver raises
    :class:`~geonn.NotFittedError`.

    Example:
        >>> import geonn
        >>> from geonn.assimilation.learned import DynamicalPrior, LearnedSolver
        >>> tendency = geonn.BilinearResidual(3)
        >>> solver = LearnedSolver(DynamicalPrior(tendency, dt=0.01), state_dim=3, iterations=10)
        >>> solver.iterations
        10
    """

    def __init__(self, prior: nn.Module, state_dim: int, *, solver: nn.Module | None = None, iterations: int = 10,
                 hidden: int = 16, kernel: int = 3, downsample: int = 1, local: int = 0, step: float = 0.02,
                 prior_cost_weight: float = 1.0):
        super().__init__()
        if not isinstance(prior, nn.Module):
            raise InputTypeError(f"prior: expected a torch.nn.Module Phi(x), got {describe(prior)}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise InputError(f"iterations: expected an integer >= 1, got {describe(iterations)}")
        self.prior = prior
        self.solver = solver if solver is not None else GradientLSTM(state_dim, hidden, kernel, downsample, local)
        self.state_dim = state_dim
        self.iterations = iterations
        if isinstance(prior_cost_weight, bool) or not isinstance(prior_cost_weight, (int, float)) or not prior_cost_weight > 0:
            raise InputError(f"prior_cost_weight: expected a positive number, got {describe(prior_cost_weight)}")
        self.log_weights = nn.Parameter(torch.tensor([0.0, math.log(prior_cost_weight)]))  # log w_obs, log w_prior
        self.log_steps = nn.Parameter(torch.full((iterations,), math.log(step)))  # gradient steps per iteration
        self.register_buffer("mean", torch.zeros(state_dim))
        self.register_buffer("scale", torch.ones(state_dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    # the cost, in standardised units
    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale

    def destandardise(self, z: torch.Tensor) -> torch.Tensor:
        return self.mean + self.scale * z

    def prior_misfit(self, z: torch.Tensor) -> torch.Tensor:
        """``z - Phi(z)`` in standardised units, ``Phi`` acting in state units."""
        return z - self.standardise(self.prior(self.destandardise(z)))

    def cost(self, z: torch.Tensor, observations: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``U(z)`` per window, shape ``(windows,)``: ``z``, ``observations`` (NaN-free) and ``mask``
        ``(windows, steps, D)`` in standardised units."""
        weights = self.log_weights.exp()
        count = mask.sum((-1, -2)).clamp(min=1)
        observed = (mask * (observations - z)).pow(2).sum((-1, -2)) / count
        dynamical = self.prior_misfit(z).pow(2).mean((-1, -2))
        return weights[0] * observed + weights[1] * dynamical

    def _solve(self, values: torch.Tensor, create_graph: bool, return_costs: bool = False):
        """The iterates from the standardised first guess; returns the last ``(windows, steps, D)``
        (standardised) and, with ``return_costs``, ``U`` at every iterate ``(iterations + 1, windows)``."""
        mask = (~torch.isnan(values)).to(values.dtype)
        observations = torch.nan_to_num(self.standardise(values))
        z = interpolate_observations(self.standardise(values), 0.0)
        memory, costs = None, []
        steps = self.log_steps.exp()
        for k in range(self.iterations):
            with torch.enable_grad():
                if not z.requires_grad:
                    z = z.detach().requires_grad_(True)
                cost = self.cost(z, observations, mask)
                (gradient,) = torch.autograd.grad(cost.sum(), z, create_graph=create_graph)
            if return_costs:
                costs.append(cost.detach())
            if not create_graph:
                z, gradient = z.detach(), gradient.detach()
            norm = gradient.pow(2).mean((-1, -2), keepdim=True).add(1e-12).sqrt()  # per window
            gradient = gradient / norm
            update, memory = self.solver(gradient, z, memory, norm.log())
            z = z - steps[k] * gradient - update
        if return_costs:
            with torch.enable_grad():
                costs.append(self.cost(z.detach(), observations, mask).detach())
            return z, torch.stack(costs)
        return z

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """The estimate ``(windows, steps, D)`` in state units from observations ``values`` (NaN = missing),
        differentiable w.r.t. the parameters (the training graph)."""
        return self.destandardise(self._solve(values, create_graph=torch.is_grad_enabled()))

    def _check_fitted(self, name: str) -> None:
        if not bool(self.fitted):
            raise NotFittedError(f"LearnedSolver.{name}: the solver is not fitted; call fit(...) first (or load a checkpoint)")

    def _check_values(self, values) -> torch.Tensor:
        _check_windows("values", values, allow_nan=True)
        if values.shape[-1] != self.state_dim:
            raise InputError(f"values: expected last dimension state_dim={self.state_dim}, got shape {tuple(values.shape)}")
        return values.to(self.mean.dtype)

    def reconstruct(self, values: torch.Tensor, *, batch_size: int = 1000, return_costs: bool = False):
        """The estimate of every window ``(windows, steps, D)`` (state units), in batches of ``batch_size`` windows.

        With ``return_costs``, also ``U`` at every iterate ``(iterations + 1, windows)``.
        """
        self._check_fitted("reconstruct")
        values = self._check_values(values)
        was_training = self.training
        self.eval()
        estimates, costs = [], []
        try:
            with torch.no_grad():
                for chunk in values.split(batch_size):
                    out = self._solve(chunk, create_graph=False, return_costs=return_costs)
                    if return_costs:
                        out, cost = out
                        costs.append(cost)
                    estimates.append(self.destandardise(out))
        finally:
            self.train(was_training)
        estimate = torch.cat(estimates)
        return (estimate, torch.cat(costs, dim=1)) if return_costs else estimate

    def assimilate(self, observations, dt: float, *, t0: float = 0.0, n_steps: int | None = None) -> LearnedResult:
        """Reconstruct one window from an :class:`~geonn.assimilation.Observations` series.

        The window starts at ``t0`` and spans ``n_steps`` model steps of ``dt`` (default: to the
        last observation time); observations are placed on the steps of their times (their
        operator must be a :class:`~geonn.assimilation.Subset` of the state, or ``None`` for all
        components). The solver runs on the whole window at once (it was trained on windows of
        one length; other lengths run, but are out of its training).
        """
        from .observations import Observations

        self._check_fitted("assimilate")
        if not isinstance(observations, Observations):
            raise InputTypeError(f"observations: expected an Observations, got {describe(observations)}")
        steps = observations.steps(dt, t0)
        n_steps = steps[-1] if n_steps is None else n_steps
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < steps[-1]:
            raise InputError(f"n_steps: expected an integer >= the last observation step {steps[-1]}, got {describe(n_steps)}")
        operator = observations.operator
        indices = list(range(self.state_dim)) if operator is None else operator.indices
        if indices is None or (operator is not None and operator.state_dim != self.state_dim):
            raise InputError(f"observations.operator: expected a Subset of the {self.state_dim} state components, got {operator!r}")
        grid = torch.full((1, n_steps + 1, self.state_dim), math.nan, dtype=self.mean.dtype)
        grid[0, torch.tensor(steps).unsqueeze(-1), torch.tensor(indices)] = observations.values.to(grid.dtype)
        estimate = self.reconstruct(grid)[0].double()
        times = t0 + dt * torch.arange(n_steps + 1, dtype=torch.float64)
        return LearnedResult(observations.times.clone(), estimate[torch.tensor(steps)], estimate, times)

    # --- training ---------------------------------------------------------------------------------------

    def fit(self, values: torch.Tensor, truth: torch.Tensor, *, config: SolverTrainConfig | None = None,
            checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
            validation: tuple[torch.Tensor, torch.Tensor] | None = None) -> SolverFitResult:
        """Train the prior, the cost weights and the solver end to end on windows.

        Args:
            values: observations ``(windows, steps, D)``, NaN where missing (state units).
            truth: the true states of the same windows ``(windows, steps, D)``.
            config: :class:`SolverTrainConfig`.
            checkpoint_dir: where ``solver.pt`` is written after every epoch (atomically).
            resume: continue from ``checkpoint_dir/solver.pt`` if it exists; the result is the same,
                bit for bit, as a run never interrupted.
            progress: show a tqdm bar (one tick per batch) with the epoch's loss.
            validation: optional held-out ``(values, truth)`` windows (not the test set): their
                reconstruction RMSE (state units) is recorded after every epoch as ``validation_rmse``.

        The standardisation (``mean``, ``scale`` per component) is taken from ``truth``.
        """
        config = config or SolverTrainConfig()
        values = self._check_values(values)
        _check_windows("truth", truth)
        if truth.shape != values.shape:
            raise InputError(f"truth: expected the shape of values {tuple(values.shape)}, got {tuple(truth.shape)}")
        if resume and checkpoint_dir is None:
            raise InputError("resume: resuming needs checkpoint_dir, got None")
        truth = truth.to(values.dtype)
        with torch.no_grad():
            flat = truth.reshape(-1, truth.shape[-1])
            self.mean.copy_(flat.mean(0))
            self.scale.copy_(flat.std(0))
        target = self.standardise(truth)

        parameters = [p for p in self.parameters() if p.requires_grad]
        context = distributed.setup(self.mean.device)
        adam = torch.optim.Adam(parameters, lr=config.learning_rate)
        n_batches = math.ceil(values.shape[0] / config.batch_size)
        total = max(1, config.epochs * n_batches)
        floor = config.final_lr_fraction
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            adam, lambda k: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(k, total) / total)))
        generator = torch.Generator().manual_seed(config.seed)
        result, epoch = SolverFitResult(), 0
        path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
        state = distributed.resume_state(path, resume)
        if state is not None:
            _check_resumable(state, config, path)
            self.load_state_dict(state["solver"])
            adam.load_state_dict(state["adam"])
            scheduler.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"])
            epoch = int(state["epoch"])
            result.history = list(state["history"])
            result.train_seconds = float(state["train_seconds"])
            result.resumed_from_epoch = epoch

        self.train()
        bar = tqdm(total=config.epochs * n_batches, initial=epoch * n_batches, desc="fit solver", unit="batch",
                   disable=not distributed.show_progress(progress), dynamic_ncols=True)
        try:
            while epoch < config.epochs:
                started = time.perf_counter()
                order = torch.randperm(values.shape[0], generator=generator)
                sums = {"loss": 0.0, "reconstruction": 0.0, "prior": 0.0}
                for b in range(n_batches):
                    idx = order[b * config.batch_size: (b + 1) * config.batch_size]
                    adam.zero_grad(set_to_none=True)
                    local = distributed.shard(idx, context)  # all of idx outside torchrun
                    terms = torch.zeros(3, dtype=values.dtype, device=values.device)  # this share's part of (loss, reconstruction, prior)
                    if local.numel():
                        weight = distributed.share(local.numel(), idx.numel())
                        z = self._solve(values[local], create_graph=True)
                        reconstruction = (z - target[local]).pow(2).mean()
                        prior = self.prior_misfit(target[local]).pow(2).mean()
                        loss = reconstruction + config.prior_weight * prior
                        (weight * loss).backward()
                        terms = weight * torch.stack((loss, reconstruction, prior)).detach()
                    if context.distributed:
                        distributed.all_reduce_gradients(parameters)
                        terms = distributed.all_reduce_sum(terms)
                    if config.clip > 0:
                        nn.utils.clip_grad_norm_(parameters, config.clip)
                    adam.step()
                    scheduler.step()
                    for key, value in zip(("loss", "reconstruction", "prior"), terms.tolist()):
                        sums[key] += value * idx.numel()
                    bar.update(1)
                means = {key: value / values.shape[0] for key, value in sums.items()}
                if not math.isfinite(means["loss"]):
                    raise InputError(f"training diverged at epoch {epoch}: the loss is {means['loss']}; lower learning_rate")
                epoch += 1
                result.train_seconds += time.perf_counter() - started
                record = {"epoch": epoch, **means, "lr": adam.param_groups[0]["lr"],
                          "weights": self.log_weights.detach().exp().tolist()}
                if validation is not None:
                    record["validation_rmse"] = self._validation_rmse(*validation)
                result.history.append(record)
                distributed.save_on_main({
                    "format": CHECKPOINT_FORMAT, "solver": self.state_dict(), "adam": adam.state_dict(),
                    "scheduler": scheduler.state_dict(), "generator": generator.get_state(), "epoch": epoch,
                    "history": result.history, "train_seconds": result.train_seconds,
                    "config": dataclasses.asdict(config),
                }, path, save_checkpoint)
                shown = {"loss": f"{means['loss']:.3e}"}
                if validation is not None:
                    shown["validation_rmse"] = f"{record['validation_rmse']:.3f}"
                bar.set_postfix(shown)
        finally:
            bar.close()
        with torch.no_grad():
            self.fitted.fill_(True)
        self.eval()
        return result

    def _validation_rmse(self, values: torch.Tensor, truth: torch.Tensor) -> float:
        """The RMSE over the validation windows; under ``torchrun`` each rank reconstructs its share."""
        context = distributed.current()
        values, truth = distributed.shard(values, context), distributed.shard(truth, context)
        fitted = bool(self.fitted)
        with torch.no_grad():
            self.fitted.fill_(True)
        try:
            squares = torch.zeros(2, dtype=torch.float64)
            if values.shape[0]:
                estimate = self.reconstruct(values)
                squares = torch.stack((
                    (estimate - truth.to(estimate.dtype)).pow(2).sum().to(torch.float64),
                    torch.tensor(float(estimate.numel()), dtype=torch.float64)))
        finally:
            with torch.no_grad():
                self.fitted.fill_(fitted)
            self.train()
        total, count = distributed.all_reduce_sum(squares).tolist()
        return math.sqrt(total / count)

    def load(self, path: str | Path) -> LearnedSolver:
        """Load the weights (and standardisation) of a :meth:`fit` checkpoint; returns ``self``, fitted."""
        state = load_checkpoint(path)
        if state.get("format") != CHECKPOINT_FORMAT or not isinstance(state.get("solver"), dict):
            raise InputError(f"checkpoint {str(path)!r}: not a LearnedSolver checkpoint (format {state.get('format')!r})")
        try:
            self.load_state_dict(state["solver"])
        except RuntimeError as err:
            raise InputError(f"checkpoint {str(path)!r}: the weights do not fit this solver ({str(err).splitlines()[0]})") from None
        with torch.no_grad():
            self.fitted.fill_(True)
        self.eval()
        return self


def _check_resumable(state: dict, config: SolverTrainConfig, path: Path) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"checkpoint {str(path)!r}: format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
    saved, current = state.get("config", {}), dataclasses.asdict(config)
    changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise InputError(f"resume: the checkpoint {str(path)!r} was written with another training config ({detail})")
