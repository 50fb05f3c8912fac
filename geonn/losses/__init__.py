"""Training objectives: point-wise, likelihood, distribution-based (optimal transport) and adversarial.

- :func:`lp_loss`: masked, weighted mean of ``|pred - target|^p``.
- :func:`gaussian_nll` with :class:`LearnedCovariance`: Gaussian NLL with a learned covariance.
- :func:`sinkhorn_divergence`, :func:`sliced_wasserstein`: distances between sets of states
  (both the p-th power of a distance, ``~ W_p^p``).
- :class:`Critic`, :func:`critic_loss`, :func:`generator_loss`, :func:`gradient_penalty`: WGAN-GP,
  for states ``(batch, d)`` or fields ``(batch, channels, lat, lon)``.

Formulas, units and references: ``docs/objectives.md``.
"""

from .adversarial import Critic, critic_loss, generator_loss, gradient_penalty
from .likelihood import LearnedCovariance, gaussian_nll
from .pointwise import lp_loss
from .transport import sinkhorn_divergence, sliced_wasserstein

__all__ = [
    "Critic",
    "LearnedCovariance",
    "critic_loss",
    "gaussian_nll",
    "generator_loss",
    "gradient_penalty",
    "lp_loss",
    "sinkhorn_divergence",
    "sliced_wasserstein",
]
