"""A convolutional emulator of gridded fields: one step ``t -> t+1`` and autoregressive rollouts.

The model reads the last ``history`` anomaly fields ``(batch, history, channel, lat, lon)`` and
forecasts the next one as a residual on an anchor built from them:

    anchor = x(t) + sum_l theta_l (x(t-l) - x(t))          (an affine lag combination: a 1x1 convolution
                                                           whose weights sum to one, initialised to the mean)
    x(t+1) = anchor + CNN(x - anchor)                      (the CNN sees the history's deviations from it)

Adding any fixed field to every input step moves the forecast with it (``offset_invariant``),
so the emulator does not pull forecasts back towards the training climatology: under a warming
scenario (A1B) the held-out anomalies lie well outside the training range, where a network fed
raw anomalies with free lag weights extrapolates worse (docs/fields-emulate.md: 0.685 K against
0.634 K one-step RMSE on A1B; 0.729 K against 0.718 K on the validation slice that chose the
design). The CNN's last layer starts at zero, so training starts from the lag mean.

Convolutions pad longitude periodically where the grid is global (:func:`is_periodic_longitude`),
so a field shifted in longitude gives the shifted forecast; otherwise both directions replicate
the edge (or pad zeros). :func:`fit_emulator` trains it with a masked, area-weighted loss (Adam),
early stopping on a validation slice at the end of the training series, checkpoints every epoch
and resumes bit for bit.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..errors import InputError, describe
from ..io import load_checkpoint, save_checkpoint
from .linear import validation_slice

PADDINGS = ("periodic", "replicate", "zeros")
CHECKPOINT_NAME = "emulator_checkpoint.pt"
CHECKPOINT_FORMAT = 1


def is_periodic_longitude(longitudes, tolerance: float = 0.5) -> bool:
    """Whether 1-D longitudes in degrees cover the whole circle (the grid wraps around).

    True when the points are evenly spaced by ``d`` and ``n * d`` is 360 degrees within
    ``tolerance * d`` (so ``0, 2.5, ..., 357.5`` is global and ``225 ... 315`` is not).
    """
    lon = np.asarray(longitudes, dtype=np.float64).ravel()
    if lon.size < 3 or not np.all(np.isfinite(lon)):
        return False
    steps = np.diff(np.unwrap(np.deg2rad(lon))) * 180 / np.pi
    spacing = float(np.median(np.abs(steps)))
    if spacing == 0 or not np.allclose(np.abs(steps), spacing, rtol=0.01, atol=1e-6):
        return False
    return abs(lon.size * spacing - 360.0) <= tolerance * spacing


class GridPad(nn.Module):
    """Pad ``(batch, channel, lat, lon)`` by ``width``: longitude periodic (or replicate/zeros), latitude replicate (or zeros)."""

    def __init__(self, width: int, padding: str = "replicate"):
        super().__init__()
        if padding not in PADDINGS:
            raise InputError(f"padding: expected one of {PADDINGS}, got {padding!r}")
        self.width, self.padding = width, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.width
        if w == 0:
            return x
        if self.padding == "zeros":
            return F.pad(x, (w, w, w, w))
        if self.padding == "periodic":
            x = F.pad(x, (w, w, 0, 0), mode="circular")
            return F.pad(x, (0, 0, w, w), mode="replicate")
        return F.pad(x, (w, w, w, w), mode="replicate")

    def extra_repr(self) -> str:
        return f"width={self.width}, padding={self.padding!r}"


class CNNEmulator(nn.Module):
    """One step of a gridded field: the last ``history`` anomaly fields -> the next one.

    Args:
        channels: channels of the field (levels, variables).
        history: the number of past steps read (``1``: the anchor is the current field).
        width: feature maps of the hidden convolutions.
        depth: convolution layers of the correction (>= 1; 0 keeps only the anchor, no CNN).
        kernel_size: odd size of the square kernels.
        padding: ``"periodic"`` (global grids: longitude wraps, latitude replicates),
            ``"replicate"`` or ``"zeros"``.
        dropout: channel dropout before the last layer.
        offset_invariant: ``True``: the anchor's lag weights sum to one and the CNN reads the
            deviations from the anchor, so a fixed field added to the inputs moves the forecast
            with it. ``False`` (an ablation): free lag weights and the CNN reads the raw anomalies.

    Shapes: ``forward(history)`` takes ``(batch, history, channel, lat, lon)`` and returns
    ``(batch, channel, lat, lon)``, in the units of the (normalised) anomalies.

    Example:
        >>> model = CNNEmulator(channels=1, history=8, padding="replicate")
        >>> next_field = model(anomalies[t - 8:t].unsqueeze(0))       # (1, 1, lat, lon)
        >>> path = model.rollout(anomalies[t - 8:t].unsqueeze(0), 10)   # (1, 10, 1, lat, lon)
    """

    def __init__(self, channels: int = 1, history: int = 8, *, width: int = 16, depth: int = 3, kernel_size: int = 3,
                 padding: str = "replicate", dropout: float = 0.0, offset_invariant: bool = True):
        super().__init__()
        for name, value, low in (("channels", channels, 1), ("history", history, 1), ("width", width, 1),
                                 ("depth", depth, 0), ("kernel_size", kernel_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{name}: expected an int >= {low}, got {value!r}")
        if kernel_size % 2 == 0:
            raise InputError(f"kernel_size: expected an odd size, got {kernel_size}")
        if padding not in PADDINGS:
            raise InputError(f"padding: expected one of {PADDINGS}, got {padding!r}")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise InputError(f"dropout: expected a number in [0, 1), got {dropout!r}")
        self.channels, self.history, self.padding, self.offset_invariant = channels, history, padding, bool(offset_invariant)
        # invariant: theta[c, l] weighs x(t - 1 - l) - x(t) in the anchor of channel c; otherwise phi[c, l] weighs
        # x(t - l); the mean to start with
        self.lag_weights = nn.Parameter(torch.full((channels, history - 1 if offset_invariant else history), 1.0 / history))
        layers: list[nn.Module] = []
        inputs = history * channels
        for k in range(depth):
            last = k == depth - 1
            conv = nn.Conv2d(inputs, channels if last else width, kernel_size)
            if last:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
                if dropout:
                    layers.append(nn.Dropout2d(dropout))
            layers += [GridPad(kernel_size // 2, padding), conv]
            if not last:
                layers.append(nn.GELU())
            inputs = width
        self.correction = nn.Sequential(*layers) if layers else None

    def anchor(self, history: torch.Tensor) -> torch.Tensor:
        """The affine lag combination ``(batch, channel, lat, lon)`` of ``history``."""
        latest = history[:, -1]
        if not self.offset_invariant:
            return torch.einsum("blcyx,cl->bcyx", history.flip(1), self.lag_weights)
        if self.history == 1:
            return latest
        earlier = history[:, :-1].flip(1) - latest.unsqueeze(1)  # (batch, history - 1, channel, ...): x(t-1-l) - x(t)
        return latest + torch.einsum("blcyx,cl->bcyx", earlier, self.lag_weights)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        if not isinstance(history, torch.Tensor) or history.dim() != 5 or history.shape[1:3] != (self.history, self.channels):
            raise InputError(
                f"history: expected a tensor (batch, {self.history}, {self.channels}, lat, lon), got {describe(history)}"
            )
        anchor = self.anchor(history)
        if self.correction is None:
            return anchor
        inputs = history - anchor.unsqueeze(1) if self.offset_invariant else history
        return anchor + self.correction(inputs.flatten(1, 2))

    def rollout(self, x0: torch.Tensor, n_steps: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Autoregressive forecasts ``(batch, n_steps, channel, lat, lon)``, each step fed back as input.

        Args:
            x0: the starting history ``(batch, history, channel, lat, lon)``; with ``history == 1``
                a state ``(batch, channel, lat, lon)`` is accepted.
            n_steps: the number of steps forecast.
            mask: optional bool ``(channel, lat, lon)`` or broadcastable (True = valid); invalid
                points are set to 0 (the climatology) before each forecast is fed back.
        """
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise InputError(f"n_steps: expected an int >= 1, got {n_steps!r}")
        if isinstance(x0, torch.Tensor) and x0.dim() == 4 and self.history == 1:
            x0 = x0.unsqueeze(1)
        window, out = x0, []
        for _ in range(n_steps):
            step = self(window)
            if mask is not None:
                step = torch.where(mask, step, torch.zeros((), dtype=step.dtype))
            out.append(step)
            window = torch.cat([window[:, 1:], step.unsqueeze(1)], dim=1)
        return torch.stack(out, dim=1)


def history_windows(series: torch.Tensor, targets, history: int) -> torch.Tensor:
    """The inputs ``(n, history, channel, lat, lon)`` of the one-step forecasts of ``series[targets]``.

    Args:
        series: ``(time, channel, lat, lon)``.
        targets: the forecast time steps (a slice or indices); each needs ``history`` steps before it.
    """
    index = torch.arange(series.shape[0])[targets] if isinstance(targets, slice) else torch.as_tensor(targets, dtype=torch.long)
    if index.numel() == 0 or int(index.min()) < history:
        raise InputError(f"targets: expected time steps >= history={history}, got {describe(targets)}")
    offsets = torch.arange(-history, 0)
    return series[index[:, None] + offsets]


class SeriesPairs:
    """The one-step pairs of a series held in memory (a tensor, or dask-backed data read in blocks).

    :func:`fit_emulator` reads its batches through :meth:`pairs`. With ``block`` set, an epoch
    visits the targets a block of ``block`` consecutive time steps at a time (the blocks in a
    shuffled order, each shuffled within, :func:`epoch_batches`), so a source that reads from
    disk (:class:`StreamedPairs`) reads each block once per epoch; ``block=None`` shuffles over
    the whole series.

    Args:
        series: ``(time, channel, lat, lon)`` normalised anomalies.
        mask: bool, same shape (True = valid).
        block: time steps per block of targets, or ``None``.
    """

    def __init__(self, series: torch.Tensor, mask: torch.Tensor, block: int | None = None):
        self.series, self.mask, self.block = series, mask, _check_block(block)

    @property
    def n_steps(self) -> int:
        return self.series.shape[0]

    @property
    def channels(self) -> int:
        return self.series.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.series.dtype

    def pairs(self, index: torch.Tensor, history: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(inputs (n, history, channel, lat, lon), targets (n, channel, lat, lon), target mask)`` of ``index``."""
        return history_windows(self.series, index, history), self.series[index], self.mask[index]


class StreamedPairs(SeriesPairs):
    """One-step pairs read from a source larger than memory, one block of time steps at a time.

    Args:
        read: ``read(steps: slice) -> (anomalies, mask)``, each ``(steps, channel, lat, lon)``
            (normalised on the fly, e.g. :meth:`geonn.pipelines.source.StreamedField.read`).
        n_steps: the length of the series (targets and their histories stay below it).
        channels: channels of the fields.
        block: time steps per block of targets; a read spans the block and the ``history`` steps before it.
        dtype: of the anomalies.

    Memory holds one block (``block + history`` fields) at a time.
    """

    def __init__(self, read, n_steps: int, channels: int, block: int = 64, dtype: torch.dtype = torch.float32):
        self.read, self._n_steps, self._channels, self.block, self._dtype = read, n_steps, channels, _check_block(block), dtype
        self._cache = None  # (start, stop, anomalies, mask)

    n_steps = property(lambda self: self._n_steps)
    channels = property(lambda self: self._channels)
    dtype = property(lambda self: self._dtype)

    def pairs(self, index: torch.Tensor, history: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(index, dtype=torch.long)
        low, high = int(index.min()) - history, int(index.max()) + 1
        if low < 0 or high > self._n_steps:
            raise InputError(f"index: expected targets in [{history}, {self._n_steps}), got {describe(index)}")
        cached = self._cache
        if cached is None or low < cached[0] or high > cached[1]:
            first = int(index.min()) // self.block * self.block  # the block of targets the batch lies in
            start, stop = max(0, first - history), min(self._n_steps, first + self.block)
            if high > stop:  # a batch across blocks: read just its span
                start, stop = low, high
            self._cache = cached = (start, stop, *self.read(slice(start, stop)))
        start, _, series, mask = cached
        local = index - start
        return history_windows(series, local, history), series[local], mask[local]


def _check_block(block):
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise InputError(f"block: expected an int >= 1 or None, got {block!r}")
    return block


def epoch_batches(targets: torch.Tensor, batch_size: int, generator: torch.Generator, block: int | None = None) -> list[torch.Tensor]:
    """The batches of one shuffled pass over ``targets`` (time steps).

    ``block=None``: one permutation of all targets, cut into batches of ``batch_size``. Otherwise
    the targets are grouped by block of time steps (``t // block``), the blocks visited in a random
    order and each block's targets shuffled and cut into batches within the block (its last batch
    may be smaller), so every batch reads one block of the series.
    """
    if block is None:
        order = targets[torch.randperm(targets.numel(), generator=generator)]
        return [order[i:i + batch_size] for i in range(0, order.numel(), batch_size)]
    keys = targets // block
    groups = [targets[keys == key] for key in torch.unique(keys)]
    batches = []
    for g in torch.randperm(len(groups), generator=generator).tolist():
        group = groups[g][torch.randperm(groups[g].numel(), generator=generator)]
        batches += [group[i:i + batch_size] for i in range(0, group.numel(), batch_size)]
    return batches


@dataclass
class EmulatorTraining:
    """Hyperparameters of :func:`fit_emulator`.

    Attributes:
        epochs: the most Adam epochs (passes over the training pairs).
        batch_size: pairs per Adam step.
        learning_rate: Adam's learning rate (cosine decay to 1% over ``epochs``).
        weight_decay: decoupled weight decay (AdamW).
        validation_fraction: the share at the end of the training series held out for early stopping.
        patience: stop after this many epochs without a better validation RMSE (``None``: never).
        refit: after choosing the epoch count on the validation slice, retrain from the same
            initial weights on the whole training series for that many epochs (the validation
            years are the latest, most relevant ones); otherwise keep the best-on-validation weights.
        seed: seeds the initial weights, the batch order and dropout.
    """

    epochs: int = 60
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    validation_fraction: float = 0.2
    patience: int | None = 20
    refit: bool = True
    seed: int = 0

    def __post_init__(self):
        for name, low in (("epochs", 1), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{name}: expected an int >= {low}, got {value!r}")
        if self.patience is not None and (isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1):
            raise InputError(f"patience: expected an int >= 1 or None, got {self.patience!r}")
        for name in ("learning_rate", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"{name}: expected a finite number >= 0, got {value!r}")
        validation_slice(10, self.validation_fraction)
        if not isinstance(self.refit, bool):
            raise InputError(f"refit: expected true or false, got {self.refit!r}")


@dataclass
class EmulatorFit:
    """What :func:`fit_emulator` returns: the epoch chosen on validation and per-epoch losses."""

    best_epoch: int = 0
    validation_rmse: float = float("nan")   # best validation RMSE (units of the series), selection phase
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    resumed_from: str = ""


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum w m (pred - target)^2 / sum w m``: area-weighted mean squared error over valid points."""
    weight = weights * mask
    return (weight * (pred - target).pow(2)).sum() / weight.sum().clamp_min(1e-12)


def _weighted_rmse(pred, target, mask, weights) -> float:
    """Mean over samples of the per-sample area-weighted RMSE (the scores' convention)."""
    weight = (weights * mask).to(torch.float64)
    total = weight.sum((1, 2, 3))
    rmse = ((weight * (pred - target).double().pow(2)).sum((1, 2, 3)) / total.clamp_min(1e-300)).sqrt()
    return float(rmse[total > 0].mean())


def fit_emulator(model: CNNEmulator, series: torch.Tensor | SeriesPairs, mask: torch.Tensor | None, weights: torch.Tensor,
                 config: EmulatorTraining | None = None, *, checkpoint_dir: str | Path | None = None, resume: bool = False,
                 progress: bool = True) -> EmulatorFit:
    """Train ``model`` in place on the one-step pairs of a training series.

    Phase ``select``: train on the pairs whose target lies before the validation slice (the last
    ``validation_fraction`` of ``series``), score the validation pairs after every epoch, stop
    after ``patience`` epochs without improvement. Phase ``refit`` (when ``config.refit``):
    restart from the same initial weights and train on every pair for the best epoch count.
    Without refit the best-on-validation weights are kept. A checkpoint is written after every
    epoch; ``resume=True`` continues from it and ends with the same weights, bit for bit.

    Batches are moved to the model's device. Under ``torchrun`` (:mod:`geonn.distributed`) every
    rank draws the same batches, takes its share ``batch[rank::world]`` of each, and
    DistributedDataParallel all-reduces the gradients, so N processes equal one with the same
    ``batch_size`` up to floating-point summation order; rank 0 alone writes the checkpoint and
    shows the bar, and on resume every rank starts from rank 0's checkpoint.

    Args:
        model: the emulator (its weights are the initial ones; seed them before calling).
        series: the training anomalies ``(time, channel, lat, lon)`` in time order; never the test
            part. Or a :class:`SeriesPairs` (e.g. :class:`StreamedPairs` over data larger than
            memory, read a block at a time), with ``mask=None``.
        mask: bool, same shape (True = valid); masked targets count for nothing in the loss.
        weights: area weights ``(lat, lon)``.
        config: :class:`EmulatorTraining`.
        checkpoint_dir: where ``emulator_checkpoint.pt`` goes; ``None``: no checkpoints.
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one.
        progress: show a tqdm bar.
    """
    config = config or EmulatorTraining()
    if not isinstance(model, CNNEmulator):
        raise InputError(f"model: expected a CNNEmulator, got {describe(model)}")
    if isinstance(series, SeriesPairs):
        if mask is not None:
            raise InputError(f"mask: expected None with series given as {type(series).__name__} (it holds the mask), got {describe(mask)}")
        source = series
        if source.channels != model.channels:
            raise InputError(f"series: expected {model.channels} channels, got {source.channels}")
    else:
        if not isinstance(series, torch.Tensor) or series.dim() != 4 or series.shape[1] != model.channels:
            raise InputError(f"series: expected a tensor (time, {model.channels}, lat, lon), got {describe(series)}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != series.shape:
            raise InputError(f"mask: expected a bool tensor of shape {tuple(series.shape)}, got {describe(mask)}")
        source = SeriesPairs(series, mask)
    if resume and checkpoint_dir is None:
        raise InputError("resume: resuming needs checkpoint_dir, got None")
    n_steps = source.n_steps
    validation = validation_slice(n_steps, config.validation_fraction)
    h = model.history
    if validation.start - h < 2:
        raise InputError(
            f"series: {n_steps} training steps leave {validation.start - h} pairs before the validation slice "
            f"with history={h}; expected at least 2 (fewer history steps, or a longer series)"
        )
    device = next(model.parameters()).device
    context = distributed.setup(device)
    weights = weights.to(device=device, dtype=source.dtype)
    pairs = {
        "select": torch.arange(h, validation.start),
        "validation": torch.arange(validation.start, validation.stop),
        "refit": torch.arange(h, n_steps),
    }
    initial = copy.deepcopy(model.state_dict())
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    state = {"phase": "select", "epoch": 0, "best_epoch": 0, "best_rmse": float("inf"), "best_model": initial,
             "history": [], "train_seconds": 0.0}
    optimizer, scheduler = _optimizer(model, config)
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    resumed_from = ""
    saved = load_checkpoint(path) if resume and context.is_main and path.is_file() else None
    if context.distributed and resume:
        saved = distributed.broadcast_object(saved)  # every rank starts from rank 0's checkpoint
    if saved is not None:
        if saved.get("format") != CHECKPOINT_FORMAT or saved.get("config") != asdict(config):
            raise InputError(f"resume: {str(path)!r} was written with other settings ({saved.get('config')}); start afresh")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        initial = saved["initial"]
        state = {k: saved[k] for k in state}
        state["history"] = list(state["history"])
        resumed_from = f"{state['phase']} epoch {state['epoch']}"
    step = _PairLoss(model)
    if context.distributed:
        from torch.nn.parallel import DistributedDataParallel

        step = DistributedDataParallel(step, device_ids=[device] if device.type == "cuda" else None)

    def save():
        if path is not None and context.is_main:
            save_checkpoint({"format": CHECKPOINT_FORMAT, "config": asdict(config), "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "initial": initial,
                             **state}, path)
        distributed.barrier()  # no rank runs ahead of the last complete checkpoint

    def epoch(targets):
        return _epoch(step, source, weights, targets, optimizer, scheduler, generator, config, context)

    bar = tqdm(total=config.epochs, desc="emulator", unit="epoch", disable=not (progress and context.is_main), dynamic_ncols=True)
    bar.update(state["epoch"] if state["phase"] == "select" else state["best_epoch"])
    try:
        while state["phase"] == "select":
            if state["epoch"] >= config.epochs or (config.patience and state["epoch"] - state["best_epoch"] >= config.patience):
                if config.refit:  # restart from the initial weights on every pair
                    model.load_state_dict(initial)
                    optimizer, scheduler = _optimizer(model, config)
                    generator.manual_seed(config.seed + 1)
                    torch.manual_seed(config.seed + 1)
                    state.update(phase="refit", epoch=0)
                    bar.reset(total=max(state["best_epoch"], 1))
                    bar.set_description("emulator refit")
                else:
                    model.load_state_dict(state["best_model"])
                    state["phase"] = "done"
                save()
                break
            loss, seconds = epoch(pairs["select"])
            model.eval()
            rmse = _validation_rmse(model, source, pairs["validation"], weights, config.batch_size)
            model.train()
            state["epoch"] += 1
            state["train_seconds"] += seconds
            state["history"].append({"phase": "select", "epoch": state["epoch"], "loss": loss, "validation_rmse": rmse})
            if rmse < state["best_rmse"]:
                state.update(best_rmse=rmse, best_epoch=state["epoch"], best_model=copy.deepcopy(model.state_dict()))
            if not math.isfinite(loss):
                raise InputError(f"training diverged at epoch {state['epoch']}: the loss is {loss}; lower the learning rate")
            save()
            bar.set_postfix(loss=f"{loss:.3g}", val=f"{rmse:.3g}", best=state["best_epoch"])
            bar.update(1)
        while state["phase"] == "refit" and state["epoch"] < state["best_epoch"]:
            loss, seconds = epoch(pairs["refit"])
            state["epoch"] += 1
            state["train_seconds"] += seconds
            state["history"].append({"phase": "refit", "epoch": state["epoch"], "loss": loss})
            if not math.isfinite(loss):
                raise InputError(f"refit diverged at epoch {state['epoch']}: the loss is {loss}; lower the learning rate")
            save()
            bar.set_postfix(loss=f"{loss:.3g}")
            bar.update(1)
    finally:
        bar.close()
    model.eval()
    return EmulatorFit(best_epoch=state["best_epoch"], validation_rmse=state["best_rmse"], history=state["history"],
                       train_seconds=state["train_seconds"], resumed_from=resumed_from)


class _PairLoss(nn.Module):
    """``sum w m (model(inputs) - target)^2 / denominator``: one rank's share of a batch's masked MSE."""

    def __init__(self, model: CNNEmulator):
        super().__init__()
        self.model = model

    def forward(self, inputs, target, weight, denominator):
        return (weight * (self.model(inputs) - target).pow(2)).sum() / denominator


def _validation_rmse(model, source: SeriesPairs, targets: torch.Tensor, weights: torch.Tensor, batch: int) -> float:
    """:func:`_weighted_rmse` of the one-step forecasts of ``targets``; by batches within blocks when the source has blocks."""
    device = weights.device
    if source.block is None:
        chunks = [targets]
    else:  # each block's targets in batches of `batch`: memory holds one block and one batch's activations
        keys = targets // source.block
        chunks = [part for key in torch.unique(keys) for part in targets[keys == key].split(batch)]
    squared, totals = [], []
    with torch.no_grad():
        for chunk in chunks:
            inputs, target, mask = source.pairs(chunk, model.history)
            pred = model(inputs.to(device))
            weight = (weights * mask.to(device)).to(torch.float64)
            totals.append(weight.sum((1, 2, 3)).cpu())
            squared.append((weight * (pred - target.to(device)).double().pow(2)).sum((1, 2, 3)).cpu())
    total, squared = torch.cat(totals), torch.cat(squared)
    rmse = (squared / total.clamp_min(1e-300)).sqrt()
    return float(rmse[total > 0].mean())


def _optimizer(model: nn.Module, config: EmulatorTraining):
    anchor = [model.lag_weights]  # no decay: it would pull the anchor towards persistence
    others = [p for name, p in model.named_parameters() if name != "lag_weights"]
    groups = [{"params": anchor, "weight_decay": 0.0}, {"params": others, "weight_decay": config.weight_decay}]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs, eta_min=config.learning_rate / 100)
    return optimizer, scheduler


def _epoch(step, source: SeriesPairs, weights, targets, optimizer, scheduler, generator, config, context) -> tuple[float, float]:
    """One shuffled pass over ``targets`` (:func:`epoch_batches`); returns the mean loss and the seconds taken.

    ``step`` is a :class:`_PairLoss`, or its DistributedDataParallel wrapper under ``torchrun``:
    then each rank computes its share of every global batch's loss (scaled by the number of
    ranks, since DDP averages the gradients) and the loss reported is the global batch's.
    """
    started = time.perf_counter()
    step.train()
    device = weights.device
    total = 0.0
    for index in epoch_batches(targets, config.batch_size, generator, source.block):
        inputs, target, mask = source.pairs(index, step.module.model.history if context.distributed else step.model.history)
        weight = weights * mask.to(device)
        optimizer.zero_grad(set_to_none=True)
        if context.distributed:
            local = slice(context.rank, None, context.world)
            denominator = weight.sum().clamp_min(1e-12) / context.world
            loss = step(inputs[local].to(device), target[local].to(device), weight[local], denominator)
            value = distributed.all_reduce_sum(loss.detach()) / context.world
        else:
            loss = step(inputs.to(device), target.to(device), weight, weight.sum().clamp_min(1e-12))
            value = loss
        loss.backward()
        optimizer.step()
        total += value.item() * index.numel()
    scheduler.step()
    return total / targets.numel(), time.perf_counter() - started
