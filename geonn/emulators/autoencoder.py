"""A convolutional autoencoder reducer of gridded fields, built on top of the EOF solution.

Fields ``(time, channel, lat, lon)`` are encoded to ``K`` latent coordinates and decoded back:

    z     = PC(x) / s + E(x)            E: strided convolutions -> dense -> K  (the encoder)
    x_hat = EOF(z * s) + D(z)           D: dense -> upsampling convolutions    (the decoder)

``PC``/``EOF`` are the projection on and the expansion in the leading ``K`` area-weighted EOFs of
the training fields (:class:`~geonn.emulators.EOFReducer`), ``s`` the standard deviation of each
principal component, so the latent coordinates are standardised principal components refined by
the network. The last layers of ``E`` and ``D`` start at zero: training starts from the EOF
solution and the convolutional parts learn the nonlinear corrections. ``residual=False`` drops
the EOF path (a plain convolutional autoencoder).

Any grid works: the network pads ``(lat, lon)`` up to a multiple of ``2**depth`` (zeros, split
between both sides) and crops the decoded field back. Missing points (``mask`` False, e.g. NaN
over land) enter the encoder as zeros beside a mask channel and weigh nothing in the loss, which
is the area-weighted mean squared error over each field's valid points (:func:`masked_mse`).

:func:`AutoencoderReducer.fit` trains with Adam (weight decay, dropout, input noise) in two
stages, as the CNN emulator does: *select* trains on the training steps before a validation slice
(the last ``validation_fraction`` of them) and records the validation RMSE after every epoch
(epoch 0 is the EOF solution itself), stopping after ``patience`` epochs without a better one;
*refit* retrains from scratch on all the training steps, the EOFs included, for the best number
of epochs. Held-out test steps never enter. A checkpoint is written after every epoch and a
resumed run ends with the same weights, bit for bit, as one never interrupted.

Under ``torchrun`` (:mod:`geonn.distributed`) training is data-parallel: every rank draws the same
batch order, input noise and dropout masks for the whole global batch and keeps its share
``batch[rank::world]``; each rank's mean loss is weighted by its share and the gradients are summed
over ranks, so N processes end with the weights of one (up to floating-point summation order).
Rank 0 alone writes the checkpoint and shows the bar; on resume every rank starts from its checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..errors import InputError, NotFittedError, describe
from ..io import save_checkpoint
from .eof import EOFReducer
from .linear import validation_slice

CHECKPOINT_NAME = "autoencoder_checkpoint.pt"
CHECKPOINT_FORMAT = 1
_ARCHITECTURE = ("modes", "channels", "lat", "lon", "hidden", "depth", "residual")


def masked_mse(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Area-weighted mean squared error over each field's valid points, per field ``(time,)``.

    Args:
        pred, truth: ``(time, channel, lat, lon)``.
        mask: bool, broadcastable to ``truth`` (True = valid); values under False never matter.
        weights: ``(lat, lon)`` area weights (any normalisation).

    Returns:
        ``sum(w m e^2) / sum(w m)`` over channel, lat and lon for each time; 0 for a field
        without valid points.
    """
    weight = torch.broadcast_to(weights.to(pred.dtype) * mask, pred.shape)
    error = torch.where(mask, pred - truth, 0)
    total = weight.sum((-3, -2, -1)).clamp_min(torch.finfo(pred.dtype).tiny)
    return (weight * error.square()).sum((-3, -2, -1)) / total


class BatchDropout(nn.Dropout):
    """:class:`torch.nn.Dropout` whose mask can be drawn for a whole global batch and sharded.

    With ``shard = (rank, world, total)`` set (while training), the mask is drawn for ``total``
    samples (the global batch, the same draws as ``nn.Dropout`` on it) and this rank keeps rows
    ``[rank::world]``, so a data-parallel step sees the masks of a single-process one.
    ``shard = None``: plain ``nn.Dropout``.
    """

    shard: tuple[int, int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.shard is None:
            return super().forward(x)
        rank, world, total = self.shard
        keep = x.new_empty((total, *x.shape[1:])).bernoulli_(1 - self.p)[rank::world]
        return x * keep.div_(1 - self.p)


@dataclass
class AutoencoderTraining:
    """Hyperparameters of :meth:`AutoencoderReducer.fit`.

    Attributes:
        epochs: at most this many epochs of the *select* stage.
        patience: stop *select* after this many epochs without a better validation RMSE (0: never).
        batch_size: fields per Adam step.
        learning_rate: Adam's learning rate.
        weight_decay: decoupled weight decay (AdamW) on the network weights.
        noise: standard deviation of Gaussian noise added to the encoder's input during training,
            in the units of the fields (the normalised anomalies: about 1 is their spread).
        validation_fraction: the last share of the training steps held out for the selection.
        refit: retrain on all training steps for the selected number of epochs (else keep the
            selected network, fitted without the validation steps).
        seed: seeds the initial weights, the batch order, dropout and noise.
    """

    epochs: int = 150
    patience: int = 30
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    noise: float = 0.0
    validation_fraction: float = 0.2
    refit: bool = True
    seed: int = 0

    def __post_init__(self):
        for name, minimum in (("epochs", 0), ("patience", 0), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise InputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
        for name in ("learning_rate", "weight_decay", "noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"{name}: expected a finite number >= 0, got {value!r}")
        if not isinstance(self.validation_fraction, (int, float)) or not 0 < self.validation_fraction < 1:
            raise InputError(f"validation_fraction: expected a number in (0, 1), got {self.validation_fraction!r}")
        if not isinstance(self.refit, bool):
            raise InputError(f"refit: expected true or false, got {self.refit!r}")


class ConvAutoencoder(nn.Module):
    """The network: convolutional encoder to ``modes`` numbers and decoder back, with an optional EOF path.

    Args:
        modes: K, the latent size.
        channels, lat, lon: the field's shape.
        hidden: channels of the first convolution level; each level down doubles them.
        depth: levels of stride-2 convolutions (the grid is padded to a multiple of ``2**depth``).
        dropout: dropout before the encoder's and after the decoder's dense layers.
        residual: add the EOF path (buffers ``components``, ``mean``, ``sqrt_weights``, ``scale``,
            set by :meth:`set_eof`).
    """

    def __init__(self, modes: int, channels: int, lat: int, lon: int, *, hidden: int = 8, depth: int = 3,
                 dropout: float = 0.5, residual: bool = True):
        super().__init__()
        self.modes, self.channels, self.lat, self.lon = modes, channels, lat, lon
        self.hidden, self.depth, self.residual = hidden, depth, residual
        step = 2 ** depth
        pad_lat, pad_lon = -lat % step, -lon % step
        self.padding = (pad_lon // 2, pad_lon - pad_lon // 2, pad_lat // 2, pad_lat - pad_lat // 2)  # F.pad order
        self.bottom = (hidden * 2 ** (depth - 1), (lat + pad_lat) // step, (lon + pad_lon) // step)
        encoder, width = [], 2 * channels  # values and mask
        for level in range(depth):
            out = hidden * 2 ** level
            encoder += [nn.Conv2d(width, out, 3, padding=1), nn.GELU(), nn.Conv2d(out, out, 3, stride=2, padding=1), nn.GELU()]
            width = out
        self.encoder = nn.Sequential(*encoder, nn.Flatten(), BatchDropout(dropout))
        size = math.prod(self.bottom)
        self.to_latent = nn.Linear(size, modes)
        self.from_latent = nn.Sequential(nn.Linear(modes, size), nn.GELU(), BatchDropout(dropout))
        decoder = []
        for level in reversed(range(depth)):
            out = hidden * 2 ** max(level - 1, 0)
            decoder += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, out, 3, padding=1), nn.GELU()]
            width = out
        self.decoder = nn.Sequential(*decoder)
        self.to_field = nn.Conv2d(width, channels, 3, padding=1)
        if residual:
            for layer in (self.to_latent, self.to_field):  # start at the EOF solution
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        points = channels * lat * lon
        self.register_buffer("components", torch.zeros(modes, points))   # EOFs (K, points), 0 at unused points
        self.register_buffer("mean", torch.zeros(points))
        self.register_buffer("sqrt_weights", torch.zeros(points))        # sqrt(area weight), 0 at unused points
        self.register_buffer("scale", torch.ones(modes))                  # std of each principal component

    def set_eof(self, eof: EOFReducer, n_times: int) -> None:
        """Copy a fitted EOF reducer (same K and field shape) into the EOF path."""
        state = eof.state_dict()
        used = state["used"].flatten()
        components = torch.zeros(self.modes, used.numel(), dtype=torch.float64)
        components[:, used] = state["components"]
        self.components.copy_(components)
        self.mean.copy_(state["mean"].flatten())
        self.sqrt_weights.copy_(torch.where(used, state["sqrt_weights"].flatten(), 0))
        self.scale.copy_((state["singular_values"] / math.sqrt(max(n_times - 1, 1))).clamp_min(1e-12))

    def encode(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(batch, K)`` latent coordinates of fields ``(batch, channel, lat, lon)`` with their bool mask."""
        values = torch.where(mask, values, 0)
        inputs = F.pad(torch.cat([values, mask.to(values.dtype)], 1), self.padding)
        latent = self.to_latent(self.encoder(inputs))
        if self.residual:
            anomaly = (values.flatten(1) - self.mean) * self.sqrt_weights
            latent = latent + anomaly @ self.components.T / self.scale
        return latent

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Fields ``(batch, channel, lat, lon)`` from latent coordinates ``(batch, K)``."""
        hidden = self.from_latent(latent).reshape(latent.shape[0], *self.bottom)
        top, left = self.padding[2], self.padding[0]
        out = self.to_field(self.decoder(hidden))[..., top:top + self.lat, left:left + self.lon]
        if self.residual:
            inverse = torch.where(self.sqrt_weights > 0, 1 / self.sqrt_weights.clamp_min(1e-30), 0)
            linear = self.mean + (latent * self.scale) @ self.components * inverse
            out = out + linear.reshape(out.shape)
        return out

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(values, mask))


class AutoencoderReducer:
    """Encode fields to ``modes`` latent coordinates with a convolutional autoencoder, and decode them.

    The same interface as :class:`~geonn.emulators.EOFReducer`: ``fit``, ``encode``, ``decode``,
    ``state_dict`` (tensors only), ``load_state_dict``.

    Args:
        modes: K, the number of latent coordinates.
        hidden: channels of the first convolution level (doubling at each level down).
        depth: stride-2 levels; the grid is padded to a multiple of ``2**depth`` inside.
        dropout: dropout rate at the dense layers while training.
        residual: build on the EOF solution (see the module docstring); False: a plain autoencoder.
        training: :class:`AutoencoderTraining`.

    Attributes (after :meth:`fit`):
        history: one dict per epoch: ``stage`` (select/refit), ``epoch``, ``loss`` (training,
            normalised units squared) and, in *select*, ``validation_rmse`` (area-weighted).
        best_epoch: the selected number of epochs (0: the EOF solution was best on validation).
        validation_rmse, validation_rmse_eof: the selected network's and the EOFs' (fitted on the
            same steps) validation RMSE, in the units of the fields.

    Example:
        >>> reducer = AutoencoderReducer(modes=5).fit(anomalies[split.train], mask[split.train], area_weights(grid))
        >>> latent = reducer.encode(anomalies[split.test], mask[split.test])     # (time, 5)
        >>> fields = reducer.decode(latent)                                      # (time, channel, lat, lon)
    """

    def __init__(self, modes: int, *, hidden: int = 8, depth: int = 3, dropout: float = 0.5, residual: bool = True,
                 training: AutoencoderTraining | None = None):
        for name, value in (("modes", modes), ("hidden", hidden), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name}: expected an int >= 1, got {value!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise InputError(f"dropout: expected a number in [0, 1), got {dropout!r}")
        if not isinstance(residual, bool):
            raise InputError(f"residual: expected true or false, got {residual!r}")
        if training is not None and not isinstance(training, AutoencoderTraining):
            raise InputError(f"training: expected an AutoencoderTraining, got {describe(training)}")
        self.modes, self.hidden, self.depth, self.dropout, self.residual = modes, hidden, depth, float(dropout), residual
        self.training = training or AutoencoderTraining()
        self.network: ConvAutoencoder | None = None
        self.history: list[dict] = []
        self.best_epoch = 0
        self.validation_rmse = self.validation_rmse_eof = float("nan")
        self.train_seconds = 0.0

    def __repr__(self) -> str:
        return (f"AutoencoderReducer(modes={self.modes}, hidden={self.hidden}, depth={self.depth}, "
                f"dropout={self.dropout}, residual={self.residual})")

    # --- fitting ---------------------------------------------------------------------------------

    def _build(self, channels: int, lat: int, lon: int) -> ConvAutoencoder:
        return ConvAutoencoder(self.modes, channels, lat, lon, hidden=self.hidden, depth=self.depth,
                               dropout=self.dropout, residual=self.residual)

    def fit(self, values: torch.Tensor, mask: torch.Tensor | None = None, weights: torch.Tensor | None = None, *,
            checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = False) -> AutoencoderReducer:
        """Train on fields ``values`` ``(time, channel, lat, lon)`` in time order (the last steps validate).

        Args:
            values: the training fields (normalised anomalies work best); float.
            mask: bool, broadcastable to ``values``, True where valid; ``None``: where finite.
            weights: ``(lat, lon)`` area weights, ``None``: equal.
            checkpoint_dir: where ``autoencoder_checkpoint.pt`` is written after every epoch.
            resume: continue from that checkpoint if it exists.
            progress: show a tqdm bar.

        Returns:
            ``self``.

        Raises:
            InputError: bad shapes, too few steps for the validation slice and K, or a
                checkpoint written with other settings.
        """
        values, mask, weights = self._inputs(values, mask, weights)
        if resume and checkpoint_dir is None:
            raise InputError("resume: resuming needs checkpoint_dir, got None")
        config = self.training
        n_times = values.shape[0]
        validation = validation_slice(n_times, config.validation_fraction)
        if self.modes > validation.start:
            raise InputError(f"modes: expected at most the {validation.start} training steps before the validation slice, got {self.modes}")
        select, refit = slice(0, validation.start), slice(0, n_times)
        settings = {"architecture": self._architecture(values), **asdict(config)}
        path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
        context = distributed.setup(values.device)

        with torch.random.fork_rng(devices=[]):
            saved = distributed.resume_state(path, resume)  # rank 0's checkpoint, on every rank
            if saved is not None and (saved.get("format") != CHECKPOINT_FORMAT or saved.get("settings") != settings):
                raise InputError(f"resume: {str(path)!r} was written with other settings ({saved.get('settings')}); start afresh")
            stage = saved["stage"] if saved else "select"
            network, optimizer = self._start(stage, values, mask, weights, select if stage == "select" else refit)
            state = {"stage": stage, "epoch": 0, "best_epoch": 0, "best_rmse": math.inf, "eof_rmse": math.inf,
                     "best_network": None, "history": [], "train_seconds": 0.0}
            if saved:
                network.load_state_dict(saved["network"])
                optimizer.load_state_dict(saved["optimizer"])
                torch.set_rng_state(saved["torch_rng"])
                state = {key: saved[key] for key in state}
                state["history"] = list(state["history"])
            else:
                eof = EOFReducer(self.modes).fit(values[select], mask[select], weights)
                reconstruction = eof.decode(eof.encode(values[validation])).to(values.dtype)
                eof_rmse = float(masked_mse(reconstruction, values[validation], mask[validation], weights).sqrt().mean())
                rmse = self._rmse(network, values[validation], mask[validation], weights)
                state.update(best_rmse=rmse, eof_rmse=eof_rmse, best_network=_copy(network.state_dict()))

            def save():  # rank 0 writes; every rank waits for it
                distributed.save_on_main({"format": CHECKPOINT_FORMAT, "settings": settings, "network": network.state_dict(),
                                          "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), **state},
                                         path, save=save_checkpoint)

            bar = tqdm(total=config.epochs, initial=state["epoch"], desc=f"autoencoder K={self.modes} {state['stage']}",
                       unit="epoch", disable=not distributed.show_progress(progress), dynamic_ncols=True)
            try:
                while state["stage"] == "select":
                    stalled = config.patience and state["epoch"] - state["best_epoch"] >= config.patience
                    if state["epoch"] >= config.epochs or stalled:
                        if config.refit:
                            state.update(stage="refit", epoch=0)
                            network, optimizer = self._start("refit", values, mask, weights, refit)
                            bar.reset(total=state["best_epoch"])
                            bar.set_description(f"autoencoder K={self.modes} refit")
                        else:
                            network.load_state_dict(state["best_network"])
                            state["stage"] = "done"
                        save()
                        break
                    loss, seconds = self._epoch(network, optimizer, values[select], mask[select], weights, context)
                    rmse = self._rmse(network, values[validation], mask[validation], weights)
                    state["epoch"] += 1
                    if rmse < state["best_rmse"]:
                        state.update(best_rmse=rmse, best_epoch=state["epoch"], best_network=_copy(network.state_dict()))
                    state["history"].append({"stage": "select", "epoch": state["epoch"], "loss": loss, "validation_rmse": rmse})
                    state["train_seconds"] += seconds
                    save()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4g}", val=f"{rmse:.4g}", best=state["best_epoch"])
                while state["stage"] == "refit" and state["epoch"] < state["best_epoch"]:
                    loss, seconds = self._epoch(network, optimizer, values[refit], mask[refit], weights, context)
                    state["epoch"] += 1
                    state["history"].append({"stage": "refit", "epoch": state["epoch"], "loss": loss})
                    state["train_seconds"] += seconds
                    if state["epoch"] == state["best_epoch"]:
                        state["stage"] = "done"
                    save()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4g}")
                if state["stage"] == "refit":  # zero selected epochs: the EOF solution of all training steps
                    state["stage"] = "done"
                    save()
            finally:
                bar.close()
        network.eval()
        self.network = network
        self.history = state["history"]
        self.best_epoch = state["best_epoch"]
        self.validation_rmse, self.validation_rmse_eof = state["best_rmse"], state["eof_rmse"]
        self.train_seconds = state["train_seconds"]
        return self

    def _architecture(self, values: torch.Tensor) -> dict:
        return {"modes": self.modes, "shape": list(values.shape[1:]), "hidden": self.hidden, "depth": self.depth,
                "dropout": self.dropout, "residual": self.residual}

    def _inputs(self, values, mask, weights):
        if not isinstance(values, torch.Tensor) or values.dim() != 4 or not values.is_floating_point():
            raise InputError(f"values: expected a floating tensor (time, channel, lat, lon), got {describe(values)}")
        finite = torch.isfinite(values)
        if mask is None:
            mask = finite
        elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise InputError(f"mask: expected a bool tensor broadcastable to {tuple(values.shape)}, got {describe(mask)}")
        else:
            try:
                mask = torch.broadcast_to(mask, values.shape) & finite
            except RuntimeError:
                raise InputError(f"mask: expected a shape broadcastable to {tuple(values.shape)}, got {describe(mask)}") from None
        if weights is None:
            weights = torch.ones(values.shape[-2:])
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != tuple(values.shape[-2:]):
            raise InputError(f"weights: expected a tensor (lat, lon) = {tuple(values.shape[-2:])}, got {describe(weights)}")
        if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
            raise InputError("weights: expected finite non-negative area weights")
        values = torch.where(mask, values, 0).to(torch.float32)
        return values, mask, weights.to(torch.float32)

    def _start(self, stage: str, values, mask, weights, steps: slice):
        """A fresh network (seeded per stage) with the EOFs of ``steps``, and its optimiser."""
        torch.manual_seed(self.training.seed + (stage != "select"))
        network = self._build(*values.shape[1:])
        if self.residual:
            eof = EOFReducer(self.modes).fit(values[steps], mask[steps], weights)
            network.set_eof(eof, values[steps].shape[0])
        trainable = [p for p in network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.training.learning_rate, weight_decay=self.training.weight_decay)
        return network, optimizer

    def _epoch(self, network, optimizer, values, mask, weights, context: distributed.Context) -> tuple[float, float]:
        """One shuffled pass; returns the mean training loss (over every rank's samples) and the seconds taken.

        Every rank draws the same order, noise and dropout masks for each global batch and computes
        the loss of its share ``batch[rank::world]``, weighted by its share of the global batch;
        the gradients are summed over ranks before each step (a no-op in one process).
        """
        start = time.perf_counter()
        network.train()
        dropouts = [module for module in network.modules() if isinstance(module, BatchDropout)]
        parameters = [p for p in network.parameters() if p.requires_grad]
        order = torch.randperm(values.shape[0])
        total, count = 0.0, 0
        try:
            for first in range(0, len(order), self.training.batch_size):
                batch = order[first:first + self.training.batch_size]
                truth, valid = values[batch], mask[batch]
                inputs = truth + self.training.noise * torch.randn_like(truth) if self.training.noise else truth
                local = slice(context.rank, None, context.world)
                truth, valid, inputs = truth[local], valid[local], inputs[local]
                for module in dropouts:  # masks drawn for the global batch, this rank's rows kept
                    module.shard = (context.rank, context.world, len(batch))
                # this rank's share of the global mean; run even on an empty share, so the dropout draws stay in step
                loss = masked_mse(network(inputs, valid), truth, valid, weights).sum() / len(batch)
                optimizer.zero_grad()
                loss.backward()
                distributed.all_reduce_gradients(parameters)
                optimizer.step()
                total += loss.item() * len(batch)
                count += len(batch)
        finally:
            for module in dropouts:
                module.shard = None
        if context.distributed:
            total = float(distributed.all_reduce_sum(torch.tensor(total, dtype=torch.float64)))
        network.eval()
        return total / count, time.perf_counter() - start

    @staticmethod
    def _rmse(network, values, mask, weights) -> float:
        """Area-weighted RMSE of each field's reconstruction, averaged over fields (as geonn.fields.weighted_rmse)."""
        network.eval()
        with torch.no_grad():
            return float(masked_mse(network(values, mask), values, mask, weights).sqrt().mean())

    # --- use -------------------------------------------------------------------------------------

    def _fitted(self) -> ConvAutoencoder:
        if self.network is None:
            raise NotFittedError("AutoencoderReducer: call fit(values, mask, weights) (or load_state_dict) before encode/decode")
        return self.network

    def encode(self, values: torch.Tensor, mask: torch.Tensor | None = None, *, batch_size: int = 256) -> torch.Tensor:
        """Latent coordinates ``(time, K)`` of fields ``(time, channel, lat, lon)``, in their dtype.

        ``mask`` (bool, broadcastable; True = valid) marks the missing points; ``None``: the non-finite ones.
        """
        network = self._fitted()
        shape = (network.channels, network.lat, network.lon)
        if not isinstance(values, torch.Tensor) or values.dim() != 4 or tuple(values.shape[1:]) != shape or not values.is_floating_point():
            raise InputError(f"values: expected a floating tensor (time, *{shape}), got {describe(values)}")
        finite = torch.isfinite(values)
        if mask is None:
            mask = finite
        elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise InputError(f"mask: expected a bool tensor broadcastable to {tuple(values.shape)}, got {describe(mask)}")
        else:
            mask = torch.broadcast_to(mask, values.shape) & finite
        inputs = torch.where(mask, values, 0).to(torch.float32)
        with torch.no_grad():
            latent = [network.encode(inputs[i:i + batch_size], mask[i:i + batch_size]) for i in range(0, values.shape[0], batch_size)]
        return torch.cat(latent).reshape(values.shape[0], self.modes).to(values.dtype)

    def decode(self, latent: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
        """Fields ``(time, channel, lat, lon)`` from latent coordinates ``(time, K)``, in the latent's dtype."""
        network = self._fitted()
        if not isinstance(latent, torch.Tensor) or latent.dim() != 2 or latent.shape[1] != self.modes or not latent.is_floating_point():
            raise InputError(f"latent: expected a floating tensor (time, {self.modes}), got {describe(latent)}")
        with torch.no_grad():
            z = latent.to(torch.float32)
            fields = [network.decode(z[i:i + batch_size]) for i in range(0, z.shape[0], batch_size)]
        shape = (network.channels, network.lat, network.lon)
        return torch.cat(fields).reshape(latent.shape[0], *shape).to(latent.dtype)

    # --- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (weights-only loadable): the network's parameters and EOF buffers, and
        the architecture as integer tensors ``architecture.<name>`` (see :meth:`from_state_dict`)."""
        network = self._fitted()
        state = {f"network.{key}": value.detach().clone() for key, value in network.state_dict().items()}
        for name in _ARCHITECTURE:
            state[f"architecture.{name}"] = torch.tensor(int(getattr(network, name)))
        state["architecture.dropout"] = torch.tensor(self.dropout, dtype=torch.float64)
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> AutoencoderReducer:
        """Rebuild a fitted reducer from :meth:`state_dict` alone."""
        if not isinstance(state, dict) or any(f"architecture.{name}" not in state for name in _ARCHITECTURE):
            raise InputError(f"state: expected an AutoencoderReducer state with architecture.* entries, got {describe(state)}")
        sizes = {name: int(state[f"architecture.{name}"]) for name in _ARCHITECTURE}
        dropout = float(state.get("architecture.dropout", torch.tensor(0.0)))
        reducer = cls(sizes["modes"], hidden=sizes["hidden"], depth=sizes["depth"], dropout=dropout, residual=bool(sizes["residual"]))
        return reducer.load_state_dict(state)

    def load_state_dict(self, state: dict) -> AutoencoderReducer:
        if not isinstance(state, dict) or any(f"architecture.{name}" not in state for name in _ARCHITECTURE):
            raise InputError(f"state: expected an AutoencoderReducer state with architecture.* entries, got {describe(state)}")
        sizes = {name: int(state[f"architecture.{name}"]) for name in _ARCHITECTURE}
        mine = {"modes": self.modes, "hidden": self.hidden, "depth": self.depth, "residual": int(self.residual)}
        if any(sizes[name] != value for name, value in mine.items()):
            raise InputError(f"state: expected an autoencoder with {mine}, got {sizes}")
        network = self._build(sizes["channels"], sizes["lat"], sizes["lon"])
        prefix = "network."
        network.load_state_dict({key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)})
        network.eval()
        self.network = network
        return self


def _copy(state: dict) -> dict:
    return {key: value.detach().clone() for key, value in state.items()}


def fit_autoencoder(data, modes: int, options, folder: str | Path, *, seed: int = 0, progress: bool = True,
                    resume: bool = False) -> AutoencoderReducer:
    """Fit an :class:`AutoencoderReducer` to a :class:`~geonn.pipelines.FieldData`'s training anomalies.

    Args:
        data: the variable (its ``anomalies``, ``mask``, ``weights`` and ``split`` are used; the
            held-out part never).
        modes: K.
        options: an object with the attributes ``hidden``, ``depth``, ``dropout``, ``residual``,
            ``epochs``, ``patience``, ``batch_size``, ``learning_rate``, ``weight_decay``,
            ``noise``, ``validation_fraction`` (``geonn.pipelines.reduce.Options``); missing ones,
            or ``None``, keep the defaults.
        folder: the checkpoint goes to ``folder/autoencoder/``.
        seed: seeds the training.
        progress: show a tqdm bar.
        resume: continue from the checkpoint in ``folder/autoencoder/``.
    """
    defaults = AutoencoderTraining()

    def option(name, default):
        value = getattr(options, name, None)
        return default if value is None else value

    training = AutoencoderTraining(**{name: option(name, getattr(defaults, name)) for name in
                                      ("epochs", "patience", "batch_size", "learning_rate", "weight_decay", "noise",
                                       "validation_fraction", "refit")}, seed=seed)
    reducer = AutoencoderReducer(modes, hidden=option("hidden", 8), depth=option("depth", 3), dropout=option("dropout", 0.5),
                                 residual=option("residual", True), training=training)
    train = data.split.train
    return reducer.fit(data.anomalies[train], data.mask[train], data.weights, checkpoint_dir=Path(folder) / "autoencoder",
                       resume=resume, progress=progress)
