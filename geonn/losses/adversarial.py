"""Wasserstein GAN objectives with a gradient penalty (WGAN-GP), for states or gridded fields.

The critic ``D`` scores samples; the critic minimises ``E[D(fake)] - E[D(real)]`` plus a penalty
that keeps ``|grad D| ~ 1`` (the 1-Lipschitz constraint of arjovsky2017, as gulrajani2017), and
the generator minimises ``-E[D(fake)]``. Samples are shaped ``(batch, ...)``: states
``(batch, d)`` or fields ``(batch, channels, lat, lon)``; interpolation and gradient norms run
over every non-batch dimension, so the same functions serve both. Any ``nn.Module`` (or
callable) mapping ``(batch, ...)`` to scores ``(batch,)`` or ``(batch, 1)`` can be the critic;
it must score each sample independently (no batch normalisation), or the penalty is wrong.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError, InputTypeError, describe
from ..operators.networks import mlp_layers
from ._inputs import check_finite, float_tensor, number, positive_int


class Critic(nn.Module):
    """A small MLP critic over states: ``(..., state_dim) -> (...)`` scores.

    Args:
        state_dim: size of the state.
        hidden: widths of the hidden layers.
        activation: ``"tanh"``, ``"relu"``, ``"gelu"`` or ``"silu"`` (smooth ones suit the gradient
            penalty, which differentiates the critic twice).
    """

    def __init__(self, state_dim: int, hidden: tuple[int, ...] = (64, 64), activation: str = "silu"):
        super().__init__()
        self.state_dim = positive_int("state_dim", state_dim)
        self.net = mlp_layers([state_dim, *(positive_int("hidden", h) for h in hidden), 1], activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.state_dim:
            raise InputError(f"x: expected last dimension {self.state_dim} for Critic, got shape {tuple(x.shape)}")
        return self.net(x).squeeze(-1)


def _scores(critic, samples: torch.Tensor) -> torch.Tensor:
    """The critic's scores as ``(batch,)``, with the checks every loss here needs."""
    if not callable(critic):
        raise InputTypeError(f"critic: expected an nn.Module or callable (batch, ...) -> (batch,), got {describe(critic)}")
    scores = critic(samples)
    batch = samples.shape[0]
    if not isinstance(scores, torch.Tensor) or scores.shape not in ((batch,), (batch, 1)):
        raise InputError(f"critic: expected scores of shape ({batch},) or ({batch}, 1), got {describe(scores)}")
    return scores.reshape(batch)


def _samples(name: str, value) -> torch.Tensor:
    value = float_tensor(name, value)
    if value.dim() < 2 or value.shape[0] == 0:
        raise InputError(
            f"{name}: expected a non-empty batch of shape (batch, ...) with at least 2 dimensions, got {tuple(value.shape)}"
        )
    check_finite(name, value)
    return value


def gradient_penalty(
    critic,
    real: torch.Tensor,
    fake: torch.Tensor,
    generator: torch.Generator | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``E[(|grad D(x_hat)| - 1)^2]`` on random interpolates ``x_hat = u real + (1 - u) fake``.

    One ``u ~ U(0, 1)`` per sample, shared by all its non-batch entries; the gradient norm is the
    Euclidean norm over all non-batch dimensions. The graph is kept (``create_graph=True``), so
    the penalty trains the critic. ``real`` and ``fake`` are detached.

    Args:
        critic: maps ``(batch, ...)`` to ``(batch,)`` or ``(batch, 1)``.
        real: samples ``(batch, ...)``.
        fake: samples of the shape, dtype and device of ``real``.
        generator: a ``torch.Generator`` (on the samples' device, or the CPU) for ``u``;
            None uses torch's global one.
        weights: ``u`` drawn beforehand, shape ``(batch,)`` or ``(batch, 1, ...)``, values in
            ``[0, 1]`` (e.g. drawn for a global batch and sharded across ranks); then
            ``generator`` is unused. None: drawn here.

    Returns:
        A scalar (dimensionless when the critic's scores are per unit of sample).
    """
    real, fake = _samples("real", real).detach(), _samples("fake", fake).detach()
    if fake.shape != real.shape or fake.dtype != real.dtype or fake.device != real.device:
        raise InputError(
            f"fake: expected real's shape {tuple(real.shape)}, dtype and device, got {describe(fake)} on {fake.device}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InputTypeError(f"generator: expected a torch.Generator or None, got {describe(generator)}")
    shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    if weights is None:
        device = generator.device if generator is not None else real.device
        weight = torch.rand(shape, generator=generator, dtype=real.dtype, device=device).to(real.device)
    else:
        if not isinstance(weights, torch.Tensor) or weights.numel() != real.shape[0] or not weights.is_floating_point():
            raise InputError(f"weights: expected {real.shape[0]} interpolation weights in [0, 1], got {describe(weights)}")
        weight = weights.detach().reshape(shape).to(device=real.device, dtype=real.dtype)
        if not bool(((weight >= 0) & (weight <= 1)).all()):
            raise InputError(f"weights: expected interpolation weights in [0, 1], got values from {float(weight.min())} to {float(weight.max())}")
    interpolates = (weight * real + (1 - weight) * fake).requires_grad_(True)
    with torch.enable_grad():
        scores = _scores(critic, interpolates)
        (gradient,) = torch.autograd.grad(scores.sum(), interpolates, create_graph=True)
    return (gradient.flatten(1).norm(dim=1) - 1).pow(2).mean()


def critic_loss(
    critic,
    real: torch.Tensor,
    fake: torch.Tensor,
    gp_weight: float = 10.0,
    generator: torch.Generator | None = None,
    interpolation: torch.Tensor | None = None,
) -> torch.Tensor:
    """The WGAN-GP critic loss ``E[D(fake)] - E[D(real)] + gp_weight * gradient_penalty`` (gulrajani2017).

    Minimising it raises the critic's scores on ``real`` and lowers them on ``fake``; its
    negative (without the penalty) estimates ``W_1`` between the two distributions once the critic
    is trained. ``fake`` is detached: this loss trains the critic only.

    Args:
        critic: maps ``(batch, ...)`` to ``(batch,)`` or ``(batch, 1)``, e.g. :class:`Critic` for states.
        real: data samples ``(batch, ...)``.
        fake: generated samples, the shape of ``real``.
        gp_weight: ``lambda >= 0`` (10 in gulrajani2017; 0 disables the penalty).
        generator: seeds the interpolation weights (see :func:`gradient_penalty`).
        interpolation: the interpolation weights drawn beforehand (``weights`` of
            :func:`gradient_penalty`); None: drawn with ``generator``.

    Returns:
        A scalar in the critic's score units.

    Example:
        >>> fields = (6, 2, 4, 5)  # (batch, channels, lat, lon)
        >>> critic = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 4 * 5, 1))
        >>> real, fake = torch.randn(fields), torch.randn(fields, requires_grad=True)
        >>> critic_loss(critic, real, fake, generator=torch.Generator().manual_seed(0)).backward()  # critic step
        >>> generator_loss(critic, fake).backward()  # generator step: gradients reach fake
        >>> fake.grad.shape
        torch.Size([6, 2, 4, 5])
    """
    gp_weight = number("gp_weight", gp_weight, minimum=0.0)
    real, fake = _samples("real", real), _samples("fake", fake).detach()
    if fake.shape[1:] != real.shape[1:]:
        raise InputError(
            f"fake: expected samples of real's shape (batch, {', '.join(map(str, real.shape[1:]))}), got {tuple(fake.shape)}"
        )
    loss = _scores(critic, fake).mean() - _scores(critic, real).mean()
    if gp_weight > 0:
        loss = loss + gp_weight * gradient_penalty(critic, real, fake, generator, interpolation)
    return loss


def generator_loss(critic, fake: torch.Tensor) -> torch.Tensor:
    """The WGAN generator loss ``-E[D(fake)]``; gradients flow through ``fake`` to the generator.

    Args:
        critic: as in :func:`critic_loss` (its parameters receive gradients too; step only the
            generator's optimiser, or freeze the critic).
        fake: generated samples ``(batch, ...)``.

    Returns:
        A scalar in the critic's score units.
    """
    return -_scores(critic, _samples("fake", fake)).mean()
