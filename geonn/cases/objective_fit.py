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

from ..errors import InputError
from ..io import load_checkpoint, save_checkpoint
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
    if resume and path.is_file():
        state = load_checkpoint(path)
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

    bar = tqdm(total=config.epochs, initial=epoch, desc=desc, unit="epoch", disable=not progress, dynamic_ncols=True)
    try:
        while epoch < config.epochs:
            started = time.perf_counter()
            order = torch.randperm(n_samples, generator=generator)
            running = 0.0
            for b in range(n_batches):
                idx = order[b * config.batch_size : (b + 1) * config.batch_size]
                adam.zero_grad(set_to_none=True)
                value = _backward(batch_loss(idx, epoch * n_batches + b), parameters)
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
            if path is not None:
                save_checkpoint(
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
    main_grads = torch.autograd.grad(main, parameters, allow_unused=True)
    auxiliary_grads = torch.autograd.grad(auxiliary, parameters, allow_unused=True)
    main_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, main_grads)]
    auxiliary_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, auxiliary_grads)]
    main_norm = torch.sqrt(sum(g.pow(2).sum() for g in main_grads))
    auxiliary_norm = torch.sqrt(sum(g.pow(2).sum() for g in auxiliary_grads))
    scale = ratio * main_norm / auxiliary_norm if bool(auxiliary_norm > 0) else torch.zeros(())
    for p, g_main, g_auxiliary in zip(parameters, main_grads, auxiliary_grads):
        p.grad = g_main + scale * g_auxiliary
    return main.item()
