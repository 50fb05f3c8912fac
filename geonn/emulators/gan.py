"""A Wasserstein GAN with gradient penalty (WGAN-GP) that generates gridded fields.

The generator maps Gaussian noise (and, when conditional, the previous time step's field) to a
field ``(channel, lat, lon)``; the critic scores fields (concatenated with their condition along
the channels). Both are small convolutional networks that pad any grid up to a multiple of 4
inside and crop back, so the user never resizes anything. Training minimises the WGAN-GP
objectives of :mod:`geonn.losses.adversarial` (gulrajani2017) on normalised anomalies; points
masked at every training time are set to 0 in the generated fields during training (so the
critic cannot use them) and to NaN in :meth:`FieldGAN.sample`.

Under ``torchrun`` (:mod:`geonn.distributed`) training is data-parallel: every rank draws the same
global batch (indices, noise, the penalty's interpolation weights) from the seeded generator and
keeps its share ``batch[rank::world]``; each rank's losses are weighted by its share and the
gradients summed over ranks after ``backward`` (the penalty's double backward rules out DDP's
hooks), so N processes end with the weights of one up to floating-point summation order. Rank 0
alone writes the checkpoint and shows the bar; on resume every rank starts from its checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..distributed import resolve_device
from ..errors import InputError, NotFittedError, describe
from ..io import save_checkpoint
from ..losses import critic_loss, generator_loss

CONDITIONS = ("none", "previous")
CHECKPOINT_NAME = "gan.pt"
CHECKPOINT_FORMAT = 1


@dataclass
class GANConfig:
    """Hyperparameters of :class:`FieldGAN`.

    Attributes:
        condition: ``"none"`` (fields from noise alone) or ``"previous"`` (the field at time
            ``t`` given the field at ``t - 1``).
        noise_dim: size of the Gaussian noise vector of each sample.
        width: channels of the first convolution (the deeper ones have 2 and 4 times as many).
        epochs: training epochs; one epoch is ``steps_per_epoch`` generator updates.
        steps_per_epoch: generator updates per epoch (a checkpoint is written after each epoch).
        critic_steps: critic updates per generator update (5 in gulrajani2017).
        batch_size: fields per update, drawn with replacement from the training fields.
        learning_rate: Adam's learning rate for both networks.
        beta1, beta2: Adam's moment decays (gulrajani2017 use 0 and 0.9 with a learning rate of
            1e-4; the defaults here, 1e-3 with 0.5 and 0.9, train in fewer steps on small data).
        gp_weight: the gradient penalty's weight lambda.
        ema: decay of the exponential moving average of the generator's weights that
            :meth:`FieldGAN.sample` uses (yazici2019; 0 samples from the last weights). GAN
            weights wander from step to step; their average gives steadier samples. The decay
            at generator update ``k`` is ``min(ema, (1 + k) / (10 + k))``, so the initial
            weights are soon forgotten.
        point_scale: divide the fields by their training standard deviation at each point
            before they meet the networks (and multiply the generated ones back), so both
            networks see unit variance everywhere, over land and sea alike.
        seed: seeds the initial weights, the batches, the noise and the penalty's interpolation.
    """

    condition: str = "none"
    noise_dim: int = 32
    width: int = 16
    epochs: int = 32
    steps_per_epoch: int = 25
    critic_steps: int = 5
    batch_size: int = 32
    learning_rate: float = 1e-3
    beta1: float = 0.5
    beta2: float = 0.9
    gp_weight: float = 10.0
    ema: float = 0.995
    point_scale: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.condition not in CONDITIONS:
            raise InputError(f"condition: expected one of {CONDITIONS}, got {self.condition!r}")
        for name in ("noise_dim", "width", "epochs", "steps_per_epoch", "critic_steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name}: expected an int >= 1, got {describe(value)}")
        if not isinstance(self.point_scale, bool):
            raise InputError(f"point_scale: expected true or false, got {describe(self.point_scale)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"seed: expected an int, got {describe(self.seed)}")
        for name, low, high in (("learning_rate", 0, math.inf), ("beta1", 0, 1), ("beta2", 0, 1), ("gp_weight", 0, math.inf),
                                ("ema", 0, 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value < high) or not math.isfinite(value):
                raise InputError(f"{name}: expected a finite number in [{low}, {high}), got {describe(value)}")


def _on_cpu(state: dict) -> dict:
    return {k: v.cpu() for k, v in state.items()}


def _point_scale(data: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Standard deviation over time at each point ``(channel, lat, lon)``, at least a tenth of the median; 1 where unused."""
    count = mask.sum(0)
    mean = data.sum(0) / count.clamp_min(1)
    variance = torch.where(mask, data - mean, 0.0).pow(2).sum(0) / (count - 1).clamp_min(1)
    std = variance.sqrt()
    usable = (count > 1) & (std > 0)
    if not bool(usable.any()):
        return torch.ones(std.shape)
    floor = 0.1 * float(std[usable].median())
    return torch.where(usable, std.clamp_min(floor), 1.0)


def _padded(size: int) -> int:
    return -(-size // 4) * 4


def _pad(x: torch.Tensor, shape: tuple[int, int], mode: str) -> torch.Tensor:
    """Pad ``(..., lat, lon)`` at the north and east ends up to ``shape``."""
    return F.pad(x, (0, shape[1] - x.shape[-1], 0, shape[0] - x.shape[-2]), mode=mode)


def _icnr_(conv: nn.Conv2d, factor: int = 2) -> None:
    """Initialise a convolution followed by ``pixel_shuffle(factor)`` so that the shuffle starts as a
    nearest-neighbour upsampling (aitken2017, "ICNR"), which avoids checkerboard patterns."""
    out_channels = conv.out_channels // factor**2
    base = torch.empty(out_channels, *conv.weight.shape[1:])
    nn.init.kaiming_uniform_(base, a=5**0.5)
    with torch.no_grad():
        conv.weight.copy_(base.repeat_interleave(factor**2, dim=0))
        if conv.bias is not None:
            conv.bias.copy_(conv.bias[::factor**2].repeat_interleave(factor**2))


class FieldGenerator(nn.Module):
    """Noise ``(batch, noise_dim)`` (and previous fields) -> fields ``(batch, channels, lat, lon)``.

    A linear map puts the noise on a grid 4 times coarser than the (padded) field, with
    ``2 width`` channels; a 3 x 3 convolution and a pixel shuffle bring it to half size (``width``
    channels), another convolution refines it there next to a learned map of the positions (so
    the network can place coast lines and mountains), and a last convolution with a pixel shuffle
    gives the full-size field, whose padding is cropped off. When conditional, the previous field
    is encoded at 1/2 and 1/4 size (pixel unshuffle, 3 x 3 convolutions) and fed to each
    resolution (U-Net skips), and a learned per-point factor times the previous field is added to
    the output (a persistence path). No convolution runs at full size (slow on CPUs for few
    channels); a 37 x 49 field costs about 4 (unconditional) to 9 (conditional) million
    multiply-adds at width 16.
    """

    def __init__(self, channels: int, lat: int, lon: int, noise_dim: int = 32, width: int = 16, conditional: bool = False):
        super().__init__()
        self.channels, self.shape, self.noise_dim, self.conditional = channels, (lat, lon), noise_dim, conditional
        self.padded = (_padded(lat), _padded(lon))
        self.coarse = (self.padded[0] // 4, self.padded[1] // 4)
        w = width
        positions = max(1, w // 4)
        self.project = nn.Linear(noise_dim, 2 * w * self.coarse[0] * self.coarse[1])
        self.position = nn.Parameter(torch.zeros(positions, self.padded[0] // 2, self.padded[1] // 2))
        skip4, skip2 = (2 * w, w) if conditional else (0, 0)
        if conditional:
            self.encode2 = nn.Conv2d(4 * channels, w, 3, padding=1)
            self.encode4 = nn.Conv2d(w, 2 * w, 4, stride=2, padding=1)
            self.persistence = nn.Parameter(torch.zeros(channels, lat, lon))
        self.block4 = nn.Conv2d(2 * w + skip4, 4 * w, 3, padding=1)
        self.block2 = nn.Conv2d(w + skip2 + positions, w, 3, padding=1)
        self.out = nn.Conv2d(w, 4 * channels, 3, padding=1)
        _icnr_(self.block4)
        _icnr_(self.out)

    def forward(self, noise: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        act = nn.functional.leaky_relu
        batch = noise.shape[0]
        h = act(self.project(noise), 0.2).reshape(batch, -1, *self.coarse)
        if self.conditional:
            if previous is None or tuple(previous.shape[1:]) != (self.channels, *self.shape):
                raise InputError(f"previous: expected fields (batch, {self.channels}, {self.shape[0]}, {self.shape[1]}), got {describe(previous)}")
            e2 = act(self.encode2(F.pixel_unshuffle(_pad(previous, self.padded, "replicate"), 2)), 0.2)
            e4 = act(self.encode4(e2), 0.2)
            h = torch.cat((h, e4), 1)
        h = F.pixel_shuffle(act(self.block4(h), 0.2), 2)
        parts = (h, e2) if self.conditional else (h,)
        h = act(self.block2(torch.cat((*parts, self.position.expand(batch, -1, -1, -1)), 1)), 0.2)
        out = F.pixel_shuffle(self.out(h), 2)[..., : self.shape[0], : self.shape[1]]
        if self.conditional:
            out = out + self.persistence * previous
        return out


class FieldCritic(nn.Module):
    """A convolutional critic: fields ``(batch, channels, lat, lon)`` -> scores ``(batch,)``.

    The fields, with two channels of the (fixed) grid positions, are pixel-unshuffled to half
    size, then go through three 3 x 3 convolutions (``width`` channels at 1/2, ``2 width`` at 1/4
    and ``4 width`` at 1/8 size, the last two strided) and a linear layer; no normalisation across
    the batch, as the gradient penalty needs. Any grid size: the input is zero-padded to a
    multiple of 4.
    """

    def __init__(self, channels: int, lat: int, lon: int, width: int = 16):
        super().__init__()
        self.channels, self.shape = channels, (lat, lon)
        self.padded = (_padded(lat), _padded(lon))
        w = width
        last = (-(-self.padded[0] // 8), -(-self.padded[1] // 8))
        rows = torch.linspace(-1, 1, self.padded[0])[:, None].expand(*self.padded)
        cols = torch.linspace(-1, 1, self.padded[1])[None, :].expand(*self.padded)
        self.register_buffer("positions", torch.stack((rows, cols)), persistent=False)
        self.net = nn.Sequential(
            nn.PixelUnshuffle(2),
            nn.Conv2d(4 * (channels + 2), w, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(4 * w * last[0] * last[1], 1),
        )

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        if fields.dim() != 4 or tuple(fields.shape[1:]) != (self.channels, *self.shape):
            raise InputError(f"fields: expected (batch, {self.channels}, {self.shape[0]}, {self.shape[1]}), got {describe(fields)}")
        padded = _pad(fields, self.padded, "constant")
        return self.net(torch.cat((padded, self.positions.expand(fields.shape[0], -1, -1, -1)), 1)).squeeze(-1)


@dataclass
class GANHistory:
    """Per-epoch training record: critic loss, the critic's Wasserstein estimate, generator loss."""

    epochs: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    resumed_from_epoch: int = 0


class FieldGAN:
    """WGAN-GP generator of fields ``(channel, lat, lon)``, unconditional or given the previous field.

    Args:
        config: :class:`GANConfig` (or keyword arguments for one).

    Example:
        >>> gan = FieldGAN(GANConfig(epochs=20)).fit(anomalies[train], mask[train], checkpoint_dir="runs/gan")
        >>> fields = gan.sample(100, generator=torch.Generator().manual_seed(1))   # (100, channel, lat, lon)
        >>> gan = FieldGAN(GANConfig(condition="previous")).fit(anomalies[train], mask[train])
        >>> next_year = gan.sample(10, previous=anomalies[-1:].expand(10, -1, -1, -1))
    """

    def __init__(self, config: GANConfig | None = None, **kwargs):
        if config is not None and kwargs:
            raise InputError("FieldGAN: pass a GANConfig or keyword arguments, not both")
        self.config = config if config is not None else GANConfig(**kwargs)
        if not isinstance(self.config, GANConfig):
            raise InputError(f"config: expected a GANConfig, got {describe(self.config)}")
        self.generator: FieldGenerator | None = None  # the averaged weights that sample (see GANConfig.ema)
        self._training: FieldGenerator | None = None
        self.critic: FieldCritic | None = None
        self.used: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.history = GANHistory()

    def __repr__(self) -> str:
        return f"FieldGAN({self.config!r})"

    @property
    def conditional(self) -> bool:
        return self.config.condition == "previous"

    def _build(self, field_shape: tuple[int, int, int]) -> None:
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.generator = FieldGenerator(*field_shape, noise_dim=c.noise_dim, width=c.width, conditional=self.conditional)
            self._training = copy.deepcopy(self.generator)  # the weights the optimiser moves
            self.generator.requires_grad_(False)
            self.critic = FieldCritic(field_shape[0] * (2 if self.conditional else 1), *field_shape[1:], width=c.width)

    def fit(self, values: torch.Tensor, mask: torch.Tensor | None = None, *, checkpoint_dir: str | Path | None = None,
            resume: bool = False, progress: bool = True, device: str | torch.device = "cpu") -> FieldGAN:
        """Train on consecutive training fields ``(time, channel, lat, lon)`` (normalised anomalies).

        Args:
            values: the training fields in time order (consecutive steps are the conditional
                pairs); 0 or anything at masked points.
            mask: bool, broadcastable to ``values`` (True = valid); masked values are set to 0, and
                points masked at every time are never generated.
            checkpoint_dir: where ``gan.pt`` is written (atomically) after every epoch.
            resume: continue from ``checkpoint_dir/gan.pt`` when it exists; the result is the same,
                bit for bit, as an uninterrupted run.
            progress: show a tqdm bar.
            device: where the networks train (``"cpu"``, ``"cuda"``, ``"auto"``,
                :func:`geonn.distributed.resolve_device`); the random draws stay on the CPU
                generator, so a run is the same draw for draw on any device.

        Returns:
            ``self``, with :attr:`history` filled.
        """
        device = resolve_device(device)
        c = self.config
        if not isinstance(values, torch.Tensor) or values.dim() != 4 or not values.is_floating_point():
            raise InputError(f"values: expected a floating tensor (time, channel, lat, lon), got {describe(values)}")
        minimum = 3 if self.conditional else 2
        if values.shape[0] < minimum:
            raise InputError(f"values: expected at least {minimum} time steps to train on, got {values.shape[0]}")
        if resume and checkpoint_dir is None:
            raise InputError("resume: resuming needs checkpoint_dir, got None")
        if mask is None:
            mask = torch.isfinite(values)
        elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise InputError(f"mask: expected a bool tensor broadcastable to {tuple(values.shape)}, got {describe(mask)}")
        mask = torch.broadcast_to(mask, values.shape) & torch.isfinite(values)
        data = torch.where(mask, values, 0.0).float()
        self.used = mask.any(0)
        if not bool(self.used.any()):
            raise InputError("mask: expected some valid point, got none")
        self.scale = _point_scale(data, mask) if c.point_scale else torch.ones(self.used.shape)
        data = data / self.scale
        valid = self.used.float()
        data, valid = data.to(device), valid.to(device)
        real_all, cond_all = (data[1:], data[:-1]) if self.conditional else (data, None)
        self._build(tuple(values.shape[1:]))
        self.generator, self._training, self.critic = (net.to(device) for net in (self.generator, self._training, self.critic))
        gen, average, critic = self._training, self.generator, self.critic
        opt_g = torch.optim.Adam(gen.parameters(), lr=c.learning_rate, betas=(c.beta1, c.beta2))
        opt_d = torch.optim.Adam(critic.parameters(), lr=c.learning_rate, betas=(c.beta1, c.beta2))
        rng = torch.Generator().manual_seed(c.seed)
        self.history = GANHistory()
        epoch = 0
        path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
        context = distributed.setup(device)
        state = distributed.resume_state(path, resume)  # rank 0's checkpoint, on every rank
        if state is not None:
            self._check_resumable(state, path, tuple(values.shape[1:]))
            gen.load_state_dict(state["generator"])
            average.load_state_dict(state["generator_average"])
            critic.load_state_dict(state["critic"])
            opt_g.load_state_dict(state["opt_generator"])
            opt_d.load_state_dict(state["opt_critic"])
            rng.set_state(state["rng"])
            epoch = int(state["epoch"])
            self.history = GANHistory(list(state["history"]), float(state["train_seconds"]), epoch)

        n = real_all.shape[0]
        local = slice(context.rank, None, context.world)  # this rank's share of every global batch
        share = distributed.share(len(range(c.batch_size)[local]), c.batch_size)
        gen_parameters, critic_parameters = list(gen.parameters()), list(critic.parameters())

        def draw():
            """The global batch (the same on every rank), then this rank's share of it."""
            idx = torch.randint(n, (c.batch_size,), generator=rng)[local].to(device)
            noise = torch.randn((c.batch_size, c.noise_dim), generator=rng)[local].to(device)
            cond = cond_all[idx] if self.conditional else None
            return real_all[idx], cond, noise

        def pair(fields, cond):
            return fields if cond is None else torch.cat((fields, cond), 1)

        bar = tqdm(total=c.epochs, initial=epoch, desc="gan", unit="epoch", disable=not distributed.show_progress(progress),
                   dynamic_ncols=True)
        try:
            while epoch < c.epochs:
                started = time.perf_counter()
                sums = {"critic_loss": 0.0, "wasserstein": 0.0, "generator_loss": 0.0}  # this rank's weighted shares
                for step in range(epoch * c.steps_per_epoch, (epoch + 1) * c.steps_per_epoch):
                    for _ in range(c.critic_steps):
                        real, cond, noise = draw()
                        # the penalty's interpolation weights, drawn for the global batch as critic_loss would
                        weights = torch.rand((c.batch_size,) + (1,) * (real.dim() - 1), generator=rng)[local]
                        opt_d.zero_grad(set_to_none=True)
                        if share:
                            with torch.no_grad():
                                fake = gen(noise, cond) * valid
                            loss = critic_loss(critic, pair(real, cond), pair(fake, cond), c.gp_weight,
                                               interpolation=weights) * share
                            loss.backward()
                        distributed.all_reduce_gradients(critic_parameters)
                        opt_d.step()
                    if share:
                        with torch.no_grad():
                            estimate = (critic(pair(real, cond)).mean() - critic(pair(fake, cond)).mean()) * share
                    real, cond, noise = draw()
                    opt_g.zero_grad(set_to_none=True)
                    if share:
                        fake = gen(noise, cond) * valid
                        g_loss = generator_loss(critic, pair(fake, cond)) * share
                        g_loss.backward()
                    distributed.all_reduce_gradients(gen_parameters)
                    opt_g.step()
                    decay = min(c.ema, (1 + step) / (10 + step))  # a short memory at first, so the start fades
                    with torch.no_grad():
                        for mean, current in zip(average.parameters(), gen.parameters()):
                            mean.lerp_(current, 1 - decay)
                    if share:
                        sums["critic_loss"] += float(loss.detach())
                        sums["wasserstein"] += float(estimate)
                        sums["generator_loss"] += float(g_loss.detach())
                if context.distributed:  # the global batch's values: the sum of the ranks' weighted shares
                    totals = distributed.all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64))
                    sums = dict(zip(sums, totals.tolist()))
                record = {"epoch": epoch + 1, **{k: v / c.steps_per_epoch for k, v in sums.items()}}
                if not all(math.isfinite(v) for v in record.values()):
                    raise InputError(f"GAN training diverged at epoch {epoch + 1}: {record}; lower learning_rate or check the data")
                epoch += 1
                self.history.epochs.append(record)
                self.history.train_seconds += time.perf_counter() - started
                distributed.save_on_main({  # rank 0 writes; every rank waits for it
                    "format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(c), "field_shape": list(values.shape[1:]),
                    "generator": gen.state_dict(), "generator_average": average.state_dict(), "critic": critic.state_dict(),
                    "opt_generator": opt_g.state_dict(), "opt_critic": opt_d.state_dict(), "rng": rng.get_state(),
                    "epoch": epoch, "history": self.history.epochs, "train_seconds": self.history.train_seconds,
                }, path, save=save_checkpoint)
                bar.set_postfix(critic=f"{record['critic_loss']:.3f}", w=f"{record['wasserstein']:.3f}")
                bar.update(1)
        finally:
            bar.close()
        return self

    def _check_resumable(self, state: dict, path: Path, field_shape: tuple) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"checkpoint {str(path)!r}: format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
        saved, current = state.get("config", {}), dataclasses.asdict(self.config)
        changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise InputError(f"resume: the checkpoint {str(path)!r} was written with another GAN config ({detail})")
        if tuple(state.get("field_shape", ())) != field_shape:
            raise InputError(f"resume: the checkpoint {str(path)!r} holds fields {state.get('field_shape')}, got {list(field_shape)}")

    def _fitted(self) -> FieldGenerator:
        if self.generator is None or self.used is None or self.scale is None:
            raise NotFittedError("FieldGAN: call fit(values, mask) (or load_state_dict) before sample")
        return self.generator

    def sample(self, n: int, previous: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
               batch_size: int = 256) -> torch.Tensor:
        """``n`` generated fields ``(n, channel, lat, lon)`` (normalised anomalies), NaN where never valid.

        Args:
            n: how many.
            previous: conditional models only: the fields ``(n, channel, lat, lon)`` each sample
                follows (NaN or masked values count as 0).
            generator: seeds the noise.
            batch_size: fields generated at once.
        """
        gen = self._fitted()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"n: expected an int >= 1, got {n!r}")
        shape = (gen.channels, *gen.shape)
        if self.conditional:
            if not isinstance(previous, torch.Tensor) or tuple(previous.shape) != (n, *shape):
                raise InputError(f"previous: expected the fields the samples follow, shape {(n, *shape)}, got {describe(previous)}")
            previous = torch.nan_to_num(previous.float()) * self.used / self.scale
        elif previous is not None:
            raise InputError("previous: an unconditional GAN (condition='none') takes no previous fields")
        device = next(gen.parameters()).device
        noise = torch.randn((n, self.config.noise_dim), generator=generator).to(device)
        if self.conditional:
            previous = previous.to(device)
        gen.eval()
        with torch.no_grad():
            parts = [gen(noise[i : i + batch_size], previous[i : i + batch_size] if self.conditional else None)
                     for i in range(0, n, batch_size)]
        gen.train()
        return torch.where(self.used, torch.cat(parts).cpu() * self.scale, float("nan"))

    def state_dict(self) -> dict:
        """Weights and mask, plus the config as plain data (loads with ``weights_only=True``)."""
        gen = self._fitted()
        return {"config": dataclasses.asdict(self.config), "field_shape": [gen.channels, *gen.shape],
                "generator": _on_cpu(gen.state_dict()), "critic": _on_cpu(self.critic.state_dict()), "used": self.used.clone(),
                "scale": self.scale.clone()}

    def load_state_dict(self, state: dict) -> FieldGAN:
        keys = {"config", "field_shape", "generator", "critic", "used", "scale"}
        if not isinstance(state, dict) or set(state) != keys:
            raise InputError(f"state: expected keys {sorted(keys)}, got {sorted(state) if isinstance(state, dict) else describe(state)}")
        self.config = GANConfig(**state["config"])
        self._build(tuple(state["field_shape"]))
        self.generator.load_state_dict(state["generator"])
        self.critic.load_state_dict(state["critic"])
        self.used, self.scale = state["used"].clone(), state["scale"].clone()
        return self
