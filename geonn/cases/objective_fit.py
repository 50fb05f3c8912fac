"""Minibatch training on any differentiable objective, checkpointed every epoch and resumable bit for bit.

:func:`geonn.training.fit` trains on its own loss (the rollout misfit). The cases of issue 3
train on other objectives (a Gaussian likelihood with a learned covariance, a point-wise loss
plus an optimal-transport term on rollouts); :func:`fit_objective` runs them with the same
optimiser, schedule, batch order, checkpoint and resume rules as ``fit``:

- Adam with the :class:`~geonn.training.TrainConfig` learning rate, weight decay and cosine or
  constant schedule; one pass over ``n_samples`` indices per epoch, shuffled by a generator
  seeded with ``config.seed``;
- after every epoch a checkpoint (modules' weights, optimiser, scheduler, batch-order generator,
  epoch, history, time) is written atomically through :func:`geonn.io.save_checkpoint`;
  ``resume=True`` continues from it and ends with the weights of a run never interrupted.

Randomness inside the objective must come from the ``step`` number it is given (e.g. a
``torch.Generator().manual_seed(seed + step)``), never from torch's global generator, so that a
resumed run draws the same numbers.

Under ``torchrun`` (:mod:`geonn.distributed`) the minibatches run data-parallel: every rank draws
the same global batch order, calls ``batch_loss`` on its share ``idx[rank::world]``, weighs it by
its share of the global batch, and the gradients are summed over ranks before the (optional)
term-by-term rescaling, clipping and Adam step, so every rank takes the step of one process
with the same global batch (up to floating-point summation order). A term of the objective that
does not depend on ``idx`` (e.g. a transport distance between rollouts and attractor samples,
seeded by ``step``) is computed the same on every rank and so enters the summed gradient once.
Rank 0 writes the checkpoints and shows the bar; a resume starts every rank from rank 0's
checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..errors import InputError
from ..training import FitResult, TrainConfig

CHECKPOINT_FORMAT = 1


def fit_objective(
    modules: Mapping[str, nn.Module],
    batch_loss: Callable[[torch.Tensor, int], torch.Tensor],
    n_samples: int,
    config: TrainConfig,
    *,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    desc: str = "fit",
    max_grad_norm: float | None = None,
) -> FitResult:
    """Minimise ``batch_loss`` over shuffled minibatches of ``range(n_samples)`` with Adam.

    Args:
        modules: name -> module; all their trainable parameters are optimised and all their
            states are checkpointed.
        batch_loss: ``(indices (B,), step) -> scalar loss``; ``step`` counts Adam steps from 0 and
            seeds any randomness of the objective. It may instead return ``(main, auxiliary,
            ratio)``: the step then follows ``grad(main) + ratio |grad(main)| / |grad(auxiliary)|
            grad(auxiliary)`` (the auxiliary term's gradient rescaled to ``ratio`` times the main
            term's norm), and the main term's value is logged.
        n_samples: number of training samples (indices ``0 .. n_samples - 1``).
        config: uses ``epochs``, ``batch_size``, ``learning_rate``, ``schedule``,
            ``final_lr_fraction``, ``weight_decay`` and ``seed``; ``refine`` must be ``"none"``
            (``unroll`` and ``gradient`` are for the objective to read).
        checkpoint_path: the checkpoint file, written after every epoch; None writes none.
        resume: continue from ``checkpoint_path`` if it exists.
        progress: show a tqdm bar.
        desc: the bar's label.
        max_grad_norm: clip the gradient of each step to this total norm (over all parameters)
            before Adam sees it; None: no clipping.

    Returns:
        :class:`~geonn.training.FitResult` (per-epoch mean loss, learning rate, seconds).
    """
    if config.refine != "none":
        raise InputError(f"training.refine: this objective trains with Adam only; expected 'none', got {config.refine!r}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise InputError(f"n_samples: expected an integer >= 1, got {n_samples!r}")
    if resume and checkpoint_path is None:
        raise InputError("resume: resuming needs checkpoint_path, got None")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise InputError(f"max_grad_norm: expected a norm > 0 or None, got {max_grad_norm!r}")
    parameters = [p for module in modules.values() for p in module.parameters() if p.requires_grad]
    context = distributed.setup(parameters[0].device if parameters else "cpu")
    adam = torch.optim.Adam(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    n_batches = math.ceil(n_samples / config.batch_size)
    total_steps = max(1, config.epochs * n_batches)
    floor = config.final_lr_fraction

    def lr_factor(k):
        if config.schedule == "constant":
            return 1.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(k, total_steps) / total_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(adam, lr_factor)
    generator = torch.Generator().manual_seed(config.seed)
    result = FitResult()
    epoch = 0
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    state = distributed.resume_state(path, resume)
    if state is not None:
        if state.get("format") != CHECKPOINT_FORMAT or state.get("config") != dataclasses.asdict(config):
            raise InputError(f"resume: {str(path)!r} was written by a different training config; remove it or change --out")
        if sorted(state["modules"]) != sorted(modules):
            raise InputError(f"resume: {str(path)!r} holds modules {sorted(state['modules'])}, expected {sorted(modules)}")
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        adam.load_state_dict(state["adam"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        epoch = int(state["epoch"])
        result.history = list(state["history"])
        result.train_seconds = float(state["train_seconds"])
        result.resumed_from_epoch = epoch

    bar = tqdm(total=config.epochs, initial=epoch, desc=desc, unit="epoch", disable=not distributed.show_progress(progress),
               dynamic_ncols=True)
    try:
        while epoch < config.epochs:
            started = time.perf_counter()
            order = torch.randperm(n_samples, generator=generator)
            running = 0.0
            for b in range(n_batches):
                idx = order[b * config.batch_size : (b + 1) * config.batch_size]
                adam.zero_grad(set_to_none=True)
                value = _step_gradient(batch_loss, idx, epoch * n_batches + b, parameters, context)
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
                adam.step()
                scheduler.step()
                running += value * idx.numel()
            epoch_loss = running / n_samples
            if not math.isfinite(epoch_loss):
                raise InputError(f"training diverged at epoch {epoch}: the loss is {epoch_loss}; lower learning_rate or check the data")
            epoch += 1
            result.train_seconds += time.perf_counter() - started
            result.history.append({"epoch": epoch, "loss": epoch_loss, "phase": "adam", "lr": adam.param_groups[0]["lr"]})
            distributed.save_on_main(
                {
                    "format": CHECKPOINT_FORMAT,
                    "modules": {name: module.state_dict() for name, module in modules.items()},
                    "adam": adam.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "generator": generator.get_state(),
                    "epoch": epoch,
                    "history": result.history,
                    "train_seconds": result.train_seconds,
                    "config": dataclasses.asdict(config),
                },
                path,
            )
            bar.set_postfix(loss=f"{epoch_loss:.3e}")
            bar.update(1)
    finally:
        bar.close()
    return result


def _step_gradient(batch_loss, idx: torch.Tensor, step: int, parameters: list[torch.Tensor], context) -> float:
    """Set the parameters' gradients for the global batch ``idx``; return the global batch's logged loss.

    Outside ``torchrun`` this is :func:`_backward` of ``batch_loss(idx, step)``. Under it, each rank
    evaluates its share ``idx[rank::world]`` weighted by ``len(share) / len(idx)`` (a mean over the
    share becomes its part of the global mean), the gradients (of both terms of a balanced loss)
    are summed over ranks, and the balancing is applied to the sums. A rank with an empty share
    contributes zero.
    """
    if not context.distributed:
        return _backward(batch_loss(idx, step), parameters)
    local = distributed.shard(idx, context)
    weight = distributed.share(local.numel(), idx.numel())
    zeros = [torch.zeros_like(p) for p in parameters]
    loss = batch_loss(local, step) if local.numel() else None
    # one collective agrees on the objective's form (a rank with an empty share does not know it) and its ratio
    balance = distributed.all_reduce_max(-1.0 if loss is None or isinstance(loss, torch.Tensor) else float(loss[2]))
    if balance < 0:
        if loss is None:
            grads, value = zeros, torch.zeros((), device=parameters[0].device)
        else:
            grads = _gradients(weight * loss, parameters)
            value = weight * loss.detach()
        *grads, value = distributed.all_reduce_tensors([*grads, value.to(parameters[0].dtype).reshape(1)])
        for p, g in zip(parameters, grads):
            p.grad = g
        return float(value)
    if loss is None:
        main_grads, auxiliary_grads, value = zeros, zeros, torch.zeros((), device=parameters[0].device)
    else:
        main, auxiliary, _ = loss
        main_grads = _gradients(weight * main, parameters)
        auxiliary_grads = _gradients(weight * auxiliary, parameters)
        value = weight * main.detach()
    n = len(parameters)
    summed = distributed.all_reduce_tensors([*main_grads, *auxiliary_grads, value.to(parameters[0].dtype).reshape(1)])
    _balance(parameters, summed[:n], summed[n: 2 * n], balance)
    return float(summed[-1])


def _gradients(loss: torch.Tensor, parameters: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads)]


def _balance(parameters, main_grads, auxiliary_grads, ratio) -> None:
    """``p.grad = g_main + ratio |g_main| / |g_auxiliary| g_auxiliary`` (norms over all parameters)."""
    main_norm = torch.sqrt(sum(g.pow(2).sum() for g in main_grads))
    auxiliary_norm = torch.sqrt(sum(g.pow(2).sum() for g in auxiliary_grads))
    scale = ratio * main_norm / auxiliary_norm if bool(auxiliary_norm > 0) else torch.zeros(())
    for p, g_main, g_auxiliary in zip(parameters, main_grads, auxiliary_grads):
        p.grad = g_main + scale * g_auxiliary


def _backward(loss, parameters: list[torch.Tensor]) -> float:
    """Set the parameters' gradients from ``loss``; return the value to log (the main term's).

    ``loss`` is a scalar, or ``(main, auxiliary, ratio)``: then the gradient is
    ``grad(main) + ratio * |grad(main)| / |grad(auxiliary)| * grad(auxiliary)`` (norms over all
    parameters), so the auxiliary term pulls with ``ratio`` times the main term's strength whatever
    its own scale (gradient-norm balancing, as wang2021 do for the terms of a PINN loss).
    """
    if isinstance(loss, torch.Tensor):
        loss.backward()
        return loss.item()
    main, auxiliary, ratio = loss
    _balance(parameters, _gradients(main, parameters), _gradients(auxiliary, parameters), ratio)
    return main.item()
