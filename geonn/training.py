"""Fit a learned tendency inside a (fixed or learnable) Runge-Kutta scheme on trajectories.

The loss compares an ``unroll``-step rollout of the model from each training state with the
next ``unroll`` states of the data (``unroll = 1`` is the one-step loss of fablet2018). Training
runs Adam with an optional cosine schedule, then optionally refines with full-batch L-BFGS.
A checkpoint is written after every epoch; ``resume=True`` continues from it and ends with the
same weights, bit for bit, as a run that was never interrupted.

Under ``torchrun`` (:mod:`geonn.distributed`) the Adam phase runs data-parallel: every global
batch is sharded over the ranks, DistributedDataParallel all-reduces the gradients, and the
result equals a one-process run with the same global batch up to floating-point summation order.
The L-BFGS refinement shards its full batch the same way (every rank sees the global loss and
gradient, so every rank takes the same step); the Levenberg-Marquardt refinement shards its
samples and exchanges the R factors of their Jacobians (see :func:`_levenberg_marquardt`), so
every rank solves the same damped problem. Rank 0 writes the checkpoints and shows the progress
bar; on resume every rank starts from rank 0's checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .errors import InputError, InputTypeError, NonFiniteError, describe
from .integrators import GRADIENTS, RungeKuttaStep, rollout
from .io import load_checkpoint, remove_temporaries, save_checkpoint

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
REFINERS = ("none", "lbfgs", "lm")


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`fit`.

    Attributes:
        epochs: Adam epochs (passes over the training windows).
        batch_size: windows per Adam step.
        learning_rate: Adam's initial learning rate.
        schedule: ``"cosine"`` (decay to ``learning_rate * final_lr_fraction``) or ``"constant"``.
        final_lr_fraction: the cosine schedule's end point as a fraction of ``learning_rate``.
        weight_decay: Adam's (L2) weight decay.
        unroll: steps in the rollout loss (1 = one-step loss).
        gradient: ``"backprop"``, ``"checkpoint"`` or ``"adjoint"`` (see :func:`geonn.integrate`).
        refine: a full-batch refinement after Adam: ``"none"``, ``"lbfgs"`` (any model size) or
            ``"lm"`` (Levenberg-Marquardt on the residuals; for models of up to a few hundred
            parameters, where it converges to machine precision if the model can represent the
            data exactly).
        refine_epochs: refinement epochs (each one checkpointed).
        refine_iterations: L-BFGS iterations, or LM function evaluations, per refinement epoch.
        seed: seeds the batch order.
    """

    epochs: int = 100
    batch_size: int = 256
    learning_rate: float = 1e-2
    schedule: str = "cosine"
    final_lr_fraction: float = 1e-2
    weight_decay: float = 0.0
    unroll: int = 1
    gradient: str = "backprop"
    refine: str = "none"
    refine_epochs: int = 0
    refine_iterations: int = 50
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size", "unroll", "refine_epochs", "refine_iterations", "seed"):
            value = getattr(self, name)
            minimum = 1 if name in ("batch_size", "unroll", "refine_iterations") else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum or value >= 2**63:
                raise InputError(f"{name}: expected an integer >= {minimum} (and < 2**63), got {describe(value)}")
        for name in ("learning_rate", "final_lr_fraction", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"{name}: expected a finite number >= 0, got {describe(value)}")
        if self.schedule not in ("cosine", "constant"):
            raise InputError(f"schedule: expected 'cosine' or 'constant', got {self.schedule!r}")
        if self.refine not in REFINERS:
            raise InputError(f"refine: expected one of {REFINERS}, got {self.refine!r}")
        if self.gradient not in GRADIENTS:
            raise InputError(f"gradient: expected one of {GRADIENTS}, got {self.gradient!r}")


@dataclass
class FitResult:
    """What :func:`fit` returns: per-epoch losses and timing."""

    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    resumed_from_epoch: int = 0

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else float("nan")


def make_windows(trajectory: torch.Tensor, unroll: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut trajectories ``(time, ..., D)`` into starts ``(S, D)`` and targets ``(S, unroll, D)``."""
    if not isinstance(trajectory, torch.Tensor) or not trajectory.is_floating_point():
        raise InputTypeError(f"trajectory: expected a floating-point tensor (time, ..., state_dim), got {describe(trajectory)}")
    if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
        raise InputError(f"unroll: expected an integer >= 1, got {describe(unroll)}")
    if trajectory.dim() < 2 or trajectory.shape[0] <= unroll or trajectory.numel() == 0:
        raise InputError(
            f"trajectory: expected shape (time, ..., state_dim) with more than unroll={unroll} times, got {tuple(trajectory.shape)}"
        )
    if not bool(torch.isfinite(trajectory).all()):
        raise InputError("trajectory: expected finite values, got NaN or inf")
    d = trajectory.shape[-1]
    flat = trajectory.reshape(trajectory.shape[0], -1, d)  # (time, traj, D)
    windows = flat.unfold(0, unroll + 1, 1)  # (S_t, traj, D, unroll+1)
    windows = windows.permute(0, 1, 3, 2).reshape(-1, unroll + 1, d)
    return windows[:, 0].contiguous(), windows[:, 1:].contiguous()


def fit(
    model: nn.Module,
    trajectory: torch.Tensor,
    dt: float,
    *,
    step: RungeKuttaStep | None = None,
    config: TrainConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    loss_scale: torch.Tensor | None = None,
) -> FitResult:
    """Train ``model`` (and a learnable ``step``) so its rollouts match ``trajectory``.

    Args:
        model: the learned tendency ``f(t, x)`` (an operator from :mod:`geonn.operators`).
        trajectory: data on a uniform grid of spacing ``dt``, shape ``(time, ..., state_dim)``;
            extra dimensions are independent trajectories.
        dt: the data's time step (model time units).
        step: the scheme (default classic RK4); if learnable, its coefficients train too.
        config: hyperparameters (:class:`TrainConfig`).
        checkpoint_dir: where ``checkpoint.pt`` is written after every epoch (atomically).
        resume: continue from ``checkpoint_dir/checkpoint.pt`` if it exists.
        progress: show a tqdm progress bar with the loss.
        loss_scale: per-component scale of the errors, shape ``(state_dim,)``; default the data's std.

    Returns:
        :class:`FitResult` with the per-epoch history. ``model`` and ``step`` are trained in place.
    """
    config = TrainConfig() if config is None else config
    step = RungeKuttaStep("rk4") if step is None else step
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model: expected a torch.nn.Module tendency, got {describe(model)}")
    if not isinstance(config, TrainConfig):
        raise InputTypeError(f"config: expected a geonn.training.TrainConfig, got {describe(config)}")
    if not isinstance(step, RungeKuttaStep):
        raise InputTypeError(f"step: expected a geonn.RungeKuttaStep, got {describe(step)}")
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, Path)):
        raise InputTypeError(f"checkpoint_dir: expected a folder path or None, got {describe(checkpoint_dir)}")
    if resume and checkpoint_dir is None:
        raise InputError("resume: resuming needs checkpoint_dir, got None")
    starts, targets = make_windows(trajectory, config.unroll)
    state_dim = getattr(model, "state_dim", None)
    if state_dim is not None and starts.shape[-1] != state_dim:
        raise InputError(f"trajectory: expected last dimension {state_dim} for the model, got {tuple(trajectory.shape)}")
    loss_scale = _loss_scale(loss_scale, trajectory)

    def batch_loss(idx):
        x0 = starts[idx]
        try:
            pred = rollout(model, x0, config.unroll, dt, step, gradient=config.gradient)[1:]  # (unroll, B, D)
        except NonFiniteError as diverged:
            raise NonFiniteError(
                f"training diverged at epoch {epoch}: the model's rollout became non-finite at step {diverged.step} of "
                "a window; lower learning_rate or check the data", step=diverged.step, time=diverged.time,
            ) from None
        err = (pred.transpose(0, 1) - targets[idx]) / loss_scale
        return err.pow(2).mean()

    parameters = [p for p in [*model.parameters(), *step.parameters()] if p.requires_grad]
    if not parameters:
        raise InputError(f"model: expected trainable parameters (a learned operator), got none in {type(model).__name__} or its step")
    device = parameters[0].device if parameters else torch.device("cpu")
    context = distributed.setup(device)
    ddp = None
    if context.distributed and parameters:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(_WindowLoss(model, step, config.unroll, dt, config.gradient, loss_scale),
                                      device_ids=[device] if device.type == "cuda" else None)

    def shard_loss(idx):
        """This rank's share of the global batch's mean loss, and the global batch's mean loss."""
        if ddp is None:
            loss = batch_loss(idx)
            return loss, loss.detach()
        local = distributed.shard(idx, context)
        denominator = idx.numel() * config.unroll * starts.shape[-1]
        # DDP averages gradients over ranks: scale by world so the average is the global mean's gradient
        loss = ddp(starts[local], targets[local], denominator / context.world)
        return loss, distributed.all_reduce_sum(loss.detach()) / context.world
    adam = torch.optim.Adam(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    n_batches = math.ceil(starts.shape[0] / config.batch_size)
    total_adam_steps = max(1, config.epochs * n_batches)
    floor = config.final_lr_fraction

    def lr_factor(k):
        if config.schedule == "constant":
            return 1.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(k, total_adam_steps) / total_adam_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(adam, lr_factor)
    lbfgs = torch.optim.LBFGS(parameters, lr=1.0, max_iter=config.refine_iterations, history_size=50,
                              tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe")
    generator = torch.Generator().manual_seed(config.seed)
    result = FitResult()
    epoch = 0
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if path is not None and context.is_main:
        remove_temporaries(path)  # what a run killed while writing its checkpoint left behind
    state = load_checkpoint(path) if resume and context.is_main and path.is_file() else None
    if context.distributed and resume:
        state = distributed.broadcast_object(state)  # every rank starts from rank 0's checkpoint
    if state is not None:
        _check_resumable(state, config, path)
        model.load_state_dict(state["model"])
        step.load_state_dict(state["step"])
        adam.load_state_dict(state["adam"])
        scheduler.load_state_dict(state["scheduler"])
        if state["lbfgs"]:
            lbfgs.load_state_dict(state["lbfgs"])
        generator.set_state(state["generator"])
        epoch = int(state["epoch"])
        result.history = list(state["history"])
        result.train_seconds = float(state["train_seconds"])
        result.resumed_from_epoch = epoch

    total_epochs = config.epochs + (config.refine_epochs if config.refine != "none" else 0)
    bar = tqdm(total=total_epochs, initial=epoch, desc="fit", unit="epoch", disable=not (progress and context.is_main),
               dynamic_ncols=True)
    try:
        while epoch < total_epochs:
            started = time.perf_counter()
            if epoch < config.epochs:
                order = torch.randperm(starts.shape[0], generator=generator)
                running = 0.0
                for b in range(n_batches):
                    idx = order[b * config.batch_size : (b + 1) * config.batch_size]
                    adam.zero_grad(set_to_none=True)
                    loss, value = shard_loss(idx)
                    loss.backward()
                    adam.step()
                    scheduler.step()
                    running += value.item() * idx.numel()
                epoch_loss = running / starts.shape[0]
                phase = "adam"
            else:
                everything = torch.arange(starts.shape[0])
                if config.refine == "lbfgs":

                    def closure(everything=everything):
                        lbfgs.zero_grad(set_to_none=True)
                        loss, value = shard_loss(everything)  # under torchrun: this rank's share, gradients all-reduced
                        loss.backward()
                        return value

                    lbfgs.step(closure)
                else:
                    mine = distributed.shard(everything, context)  # all of them outside torchrun
                    _levenberg_marquardt(model, step, starts[mine], targets[mine], dt, loss_scale, config.refine_iterations,
                                         sharded=context.distributed)
                with torch.no_grad():
                    epoch_loss = float(batch_loss(everything))
                phase = config.refine
            if not math.isfinite(epoch_loss):
                raise InputError(
                    f"training diverged at epoch {epoch}: the loss is {epoch_loss}; lower learning_rate or check the data"
                )
            epoch += 1
            result.train_seconds += time.perf_counter() - started
            result.history.append({"epoch": epoch, "loss": epoch_loss, "phase": phase, "lr": adam.param_groups[0]["lr"]})
            if path is not None and context.is_main:
                save_checkpoint(
                    {
                        "format": CHECKPOINT_FORMAT,
                        "model": model.state_dict(),
                        "step": step.state_dict(),
                        "adam": adam.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "lbfgs": lbfgs.state_dict() if epoch > config.epochs else {},
                        "generator": generator.get_state(),
                        "epoch": epoch,
                        "history": result.history,
                        "train_seconds": result.train_seconds,
                        "config": dataclasses.asdict(config),
                    },
                    path,
                )
            distributed.barrier()  # no rank runs ahead of the last complete checkpoint
            bar.set_postfix(loss=f"{epoch_loss:.3e}", phase=phase)
            bar.update(1)
    finally:
        bar.close()
    return result


def _loss_scale(loss_scale, trajectory: torch.Tensor) -> torch.Tensor:
    """The per-component error scale ``(state_dim,)``: given, or the data's std; positive and finite."""
    d = trajectory.shape[-1]
    if loss_scale is None:
        scale = trajectory.reshape(-1, d).std(dim=0)
        constant = (~(scale > 0) | ~torch.isfinite(scale)).nonzero().flatten().tolist()
        if constant:
            raise InputError(
                f"trajectory: components {constant} do not vary (std 0) or overflow, so the default loss_scale "
                "(the data's std) cannot weigh their errors; pass loss_scale"
            )
        return scale
    if isinstance(loss_scale, torch.Tensor) and (loss_scale.is_complex() or loss_scale.dtype == torch.bool):
        raise InputTypeError(f"loss_scale: expected a real tensor of shape ({d},), got {describe(loss_scale)}")
    if not isinstance(loss_scale, torch.Tensor):
        try:
            loss_scale = torch.as_tensor(loss_scale, dtype=trajectory.dtype)
        except (TypeError, ValueError, RuntimeError):
            raise InputTypeError(f"loss_scale: expected a tensor of shape ({d},), got {describe(loss_scale)}") from None
    scale = loss_scale.to(trajectory.dtype)
    if scale.shape not in ((), (1,), (d,)) or not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise InputError(f"loss_scale: expected positive finite values of shape ({d},), got {describe(loss_scale)}")
    return scale


class _WindowLoss(nn.Module):
    """Sum of squared scaled rollout errors over windows, divided by ``denominator`` (for DDP)."""

    def __init__(self, model, step, unroll, dt, gradient, loss_scale):
        super().__init__()
        self.model, self.step = model, step
        self.unroll, self.dt, self.gradient = unroll, dt, gradient
        self.register_buffer("loss_scale", loss_scale, persistent=False)

    def forward(self, x0, target, denominator: float):
        pred = rollout(self.model, x0, self.unroll, self.dt, self.step, gradient=self.gradient)[1:]
        return ((pred.transpose(0, 1) - target) / self.loss_scale).pow(2).sum() / denominator


class _Rollout(nn.Module):
    """``unroll`` steps of ``step`` with ``model`` from one state, for per-sample Jacobians."""

    def __init__(self, model, step, unroll, dt):
        super().__init__()
        self.model, self.step, self.unroll, self.dt = model, step, unroll, dt

    def forward(self, x):
        t = torch.zeros((), dtype=x.dtype, device=x.device)
        states = []
        for _ in range(self.unroll):
            x = self.step(self.model, t, x, self.dt)
            states.append(x)
        return torch.stack(states)


def _levenberg_marquardt(model, step, starts, targets, dt, loss_scale, max_evaluations: int, sharded: bool = False) -> None:
    """Minimise the full-batch rollout residuals by Levenberg-Marquardt (more1978), in torch.

    The Jacobian of the residuals w.r.t. the trainable parameters is built per sample with
    ``vmap(jacrev)`` (size (samples x unroll x state_dim) x n_params); each trial step solves the
    damped least-squares problem ``[J; sqrt(lambda) D] delta = [-r; 0]`` by Householder QR, which
    stays accurate when J is rank deficient (the bilinear network has continuous weight
    symmetries). Deterministic, so a resumed refinement repeats bit for bit. (scipy's MINPACK
    wrapper reads past its Jacobian buffer for rank-deficient problems, and LAPACK's gelsy behind
    ``torch.linalg.lstsq`` is not repeatable on them either.)

    ``sharded`` (under ``torchrun``): ``starts`` and ``targets`` are this rank's samples. Each rank
    factors its rows of the Jacobian, ``J_i = Q_i R_i``, and the ranks exchange ``R_i`` and
    ``Q_i^T r_i`` (``n_params`` rows each): the stacked factors have the normal equations of the
    whole problem (``sum R_i^T R_i = J^T J``, ``sum R_i^T Q_i^T r_i = J^T r``), so every rank solves
    the same damped problem by the same QR (a tall-skinny QR) and takes the single-process step,
    up to rounding. Costs and the column scaling are summed over the ranks.
    """
    wrapper = _Rollout(model, step, targets.shape[1], dt)
    named = [(n, p) for n, p in wrapper.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    fixed = {n: p for n, p in wrapper.named_parameters() if not p.requires_grad}
    fixed.update(dict(wrapper.named_buffers()))
    n_residuals = targets.numel()
    if sharded:
        n_residuals = int(distributed.all_reduce_sum(torch.tensor(n_residuals, dtype=torch.float64, device=targets.device)))
    n_params = sum(sizes)
    if n_params > n_residuals:
        raise InputError(f"refine: 'lm' needs at least as many residuals ({n_residuals}) as parameters ({n_params}); use 'lbfgs'")

    def residual_one(theta, x0, target):
        params = {n: c.reshape(s) for n, c, s in zip(names, torch.split(theta, sizes), shapes)}
        pred = torch.func.functional_call(wrapper, (params, fixed), (x0,))
        return ((pred - target) / loss_scale).reshape(-1)

    batched = torch.func.vmap(residual_one, in_dims=(None, 0, 0))
    jacobian = torch.func.vmap(torch.func.jacrev(residual_one), in_dims=(None, 0, 0))

    def residuals(theta):
        with torch.no_grad():
            return batched(theta, starts, targets).reshape(-1)

    def total(r):
        square = r @ r
        return float(distributed.all_reduce_sum(square) if sharded else square)

    theta = torch.cat([p.detach().reshape(-1) for _, p in named]).to(torch.float64)
    r = residuals(theta)
    cost = total(r)
    damping = 1e-3
    evaluations = 1
    while evaluations < max_evaluations and cost > 0.0:
        jac = jacobian(theta, starts, targets).reshape(-1, n_params).detach().to(torch.float64)
        squares = jac.pow(2).sum(0)
        scale = (distributed.all_reduce_sum(squares) if sharded else squares).clamp_min(1e-30).sqrt()  # Marquardt's scaling
        design, target = jac, -r
        if sharded:  # the ranks' R factors and rotated residuals stacked: the same least-squares problem
            q, upper = torch.linalg.qr(jac)
            parts = distributed.all_gather((upper.cpu(), (q.T @ target).cpu()))
            design = torch.cat([p[0] for p in parts]).to(jac.device)
            target = torch.cat([p[1] for p in parts]).to(jac.device)
        improved = False
        while evaluations < max_evaluations:
            augmented = torch.cat((design, math.sqrt(damping) * torch.diag(scale)))
            rhs = torch.cat((target, torch.zeros(n_params, dtype=r.dtype, device=r.device)))
            q, upper = torch.linalg.qr(augmented)  # Householder QR: repeatable bit for bit (lstsq's gelsy is not, here)
            delta = torch.linalg.solve_triangular(upper, (q.T @ rhs).unsqueeze(-1), upper=True).squeeze(-1)
            trial = theta + delta
            r_trial = residuals(trial)
            evaluations += 1
            cost_trial = total(r_trial)
            if math.isfinite(cost_trial) and cost_trial < cost:
                relative_gain = (cost - cost_trial) / cost
                theta, r, cost = trial, r_trial, cost_trial
                damping = max(damping / 3.0, 1e-12)
                improved = True
                break
            damping *= 4.0
            if damping > 1e12:
                break
        if not improved or relative_gain < 1e-14:
            break
    with torch.no_grad():
        for (_, p), chunk, shape in zip(named, torch.split(theta, sizes), shapes):
            p.copy_(chunk.reshape(shape).to(p.dtype))


def _check_resumable(state: dict, config: TrainConfig, path: Path) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"checkpoint {str(path)!r}: format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
    saved = state.get("config", {})
    current = dataclasses.asdict(config)
    changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise InputError(f"resume: the checkpoint {str(path)!r} was written with another training config ({detail})")
