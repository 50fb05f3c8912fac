"""Training objectives: values against numpy/scipy/closed forms, gradients, and refusal of bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import multivariate_normal

from geonn.errors import InputError, InputTypeError
from geonn.losses import (
    Critic,
    LearnedCovariance,
    critic_loss,
    gaussian_nll,
    generator_loss,
    gradient_penalty,
    lp_loss,
    sinkhorn_divergence,
    sliced_wasserstein,
)

DTYPE = torch.float64


def randn(*shape, seed=0, dtype=DTYPE):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assignment_cost(x: np.ndarray, y: np.ndarray, p: float) -> float:
    """Exact W_p^p between equal-size uniform point sets: the optimal assignment's mean |x_i - y_j|^p."""
    cost = np.linalg.norm(x[:, None, :] - y[None, :, :], axis=-1) ** p
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


# ---------------------------------------------------------------- lp_loss


@pytest.mark.parametrize("p", [1, 2, 3, 1.5])
def test_lp_loss_matches_numpy_with_mask_and_weights(p):
    pred, target = randn(4, 5, 6, seed=1), randn(4, 5, 6, seed=2)
    mask = randn(4, 5, 6, seed=3) > -0.3
    weights = torch.cos(torch.linspace(-1.2, 1.2, 5, dtype=DTYPE))[:, None]  # like cos(lat), (lat, 1)
    value = lp_loss(pred, target, p=p, mask=mask, weights=weights)
    m, w = mask.numpy(), np.broadcast_to(weights.numpy(), mask.shape)
    error = np.abs(pred.numpy() - target.numpy()) ** p
    np.testing.assert_allclose(float(value), np.sum(m * w * error) / np.sum(m * w), rtol=1e-13)
    np.testing.assert_allclose(float(lp_loss(pred, target, p=p, mask=mask)), error[m].mean(), rtol=1e-13)
    np.testing.assert_allclose(float(lp_loss(pred, target, p=p)), error.mean(), rtol=1e-13)


def test_lp_loss_p2_is_mse_and_weights_scale_free():
    pred, target = randn(7, 3, seed=4), randn(7, 3, seed=5)
    torch.testing.assert_close(lp_loss(pred, target), torch.nn.functional.mse_loss(pred, target))
    weights = torch.rand(7, 1, generator=torch.Generator().manual_seed(6), dtype=DTYPE)
    torch.testing.assert_close(lp_loss(pred, target, weights=weights), lp_loss(pred, target, weights=1e3 * weights))


def test_lp_loss_mask_ignores_nan_in_unobserved_entries():
    pred = randn(10, 4, seed=7).requires_grad_(True)
    target = randn(10, 4, seed=8)
    mask = torch.ones(10, 4, dtype=torch.bool)
    mask[::3, 1] = False
    gappy = target.clone()
    gappy[~mask] = float("nan")
    pred_with_inf = pred.detach().clone()
    pred_with_inf[~mask] = float("inf")
    value = lp_loss(pred, gappy, p=2, mask=mask)
    value.backward()
    assert math.isfinite(value.item())
    np.testing.assert_allclose(value.item(), (pred.detach() - target)[mask].pow(2).mean().item(), rtol=1e-14)
    assert torch.isfinite(pred.grad).all() and (pred.grad[~mask] == 0).all() and (pred.grad[mask] != 0).all()
    assert float(lp_loss(pred_with_inf, gappy, mask=mask)) == pytest.approx(value.item(), rel=1e-14)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"target": torch.zeros(3, 5)}, "target"),
        ({"p": 0.5}, "p"),
        ({"p": float("inf")}, "p"),
        ({"mask": torch.zeros(3, 4, dtype=torch.bool)}, "mask"),
        ({"mask": torch.ones(2, 4, dtype=torch.bool)}, "mask"),
        ({"target": torch.tensor([[0.0, float("nan"), 0, 0]] * 3)}, "target"),
        ({"weights": -torch.ones(4)}, "weights"),
        ({"weights": torch.zeros(4)}, "weights"),
        ({"weights": torch.ones(5)}, "weights"),
    ],
)
def test_lp_loss_refuses_bad_input(kwargs, argument):
    args = {"pred": torch.ones(3, 4), "target": torch.zeros(3, 4)} | kwargs
    with pytest.raises(InputError, match=rf"^{argument}:"):
        lp_loss(**args)


def test_lp_loss_refuses_wrong_types():
    with pytest.raises(InputTypeError, match="^mask:"):
        lp_loss(torch.ones(3), torch.zeros(3), mask=torch.ones(3))
    with pytest.raises(InputTypeError, match="^pred:"):
        lp_loss(np.ones(3), torch.zeros(3))


# ---------------------------------------------------------------- gaussian_nll


def test_gaussian_nll_diagonal_matches_scipy():
    pred, target = randn(20, 4, seed=10), randn(20, 4, seed=11)
    log_variance = 0.7 * randn(4, seed=12)
    variance = log_variance.exp().numpy()
    expected = np.array(
        [-multivariate_normal.logpdf(t, mean=f, cov=np.diag(variance)) for f, t in zip(pred.numpy(), target.numpy())]
    )
    per_sample = gaussian_nll(pred, target, log_variance=log_variance, reduction="none")
    np.testing.assert_allclose(per_sample.numpy(), expected, rtol=0, atol=1e-10)
    assert float(gaussian_nll(pred, target, log_variance=log_variance)) == pytest.approx(expected.mean(), abs=1e-10)
    by_std = gaussian_nll(target - pred, std=(0.5 * log_variance).exp(), reduction="none")  # residual form
    np.testing.assert_allclose(by_std.numpy(), expected, rtol=0, atol=1e-10)
    without_constant = gaussian_nll(pred, target, log_variance=log_variance, constant=False)
    assert float(without_constant) == pytest.approx(expected.mean() - 2 * math.log(2 * math.pi), abs=1e-10)


def test_gaussian_nll_full_matches_scipy_with_per_sample_factors():
    d, n = 3, 8
    raw = randn(n, d, d, seed=13)
    factor = torch.tril(raw, diagonal=-1) + torch.diag_embed(torch.nn.functional.softplus(raw.diagonal(dim1=-2, dim2=-1)) + 0.1)
    pred, target = randn(n, d, seed=14), randn(n, d, seed=15)
    covariance = (factor @ factor.transpose(-1, -2)).numpy()
    expected = np.array(
        [-multivariate_normal.logpdf(target[i].numpy(), mean=pred[i].numpy(), cov=covariance[i]) for i in range(n)]
    )
    per_sample = gaussian_nll(pred, target, scale_tril=factor, reduction="none")
    np.testing.assert_allclose(per_sample.numpy(), expected, rtol=0, atol=1e-10)
    shared = gaussian_nll(pred, target, scale_tril=factor[0], reduction="none")  # one factor broadcast over samples
    expected_shared = np.array(
        [-multivariate_normal.logpdf(t, mean=f, cov=covariance[0]) for f, t in zip(pred.numpy(), target.numpy())]
    )
    np.testing.assert_allclose(shared.numpy(), expected_shared, rtol=0, atol=1e-10)


def test_gaussian_nll_gradient_matches_finite_differences():
    factor = torch.tensor([[1.3, 0.0], [0.4, 0.7]], dtype=DTYPE, requires_grad=True)
    residual = randn(5, 2, seed=16).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda r, f: gaussian_nll(r, scale_tril=torch.tril(f)), (residual, factor))


@pytest.mark.parametrize("kind", ["diagonal", "full"])
@pytest.mark.parametrize("state_dependent", [False, True])
def test_gradient_reaches_every_learned_covariance_parameter(kind, state_dependent):
    torch.manual_seed(0)
    covariance = LearnedCovariance(3, kind=kind, state_dependent=state_dependent, hidden=8).to(DTYPE)
    state = randn(16, 3, seed=17)
    factor = covariance(state)
    assert factor.shape == ((16, 3, 3) if state_dependent else (3, 3))
    gaussian_nll(randn(16, 3, seed=18), 0.3 * randn(16, 3, seed=19), scale_tril=factor).backward()
    for name, parameter in covariance.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().max() > 0, name


def test_learned_covariance_recovers_the_maximum_likelihood_covariance():
    """For zero-mean residuals the NLL's minimiser is the sample second moment (1/N) sum r r^T."""
    true_factor = torch.tensor([[1.0, 0.0], [0.8, 0.5]], dtype=DTYPE)
    residual = randn(400, 2, seed=20) @ true_factor.T
    covariance = LearnedCovariance(2, kind="full").to(DTYPE)
    optimiser = torch.optim.LBFGS(covariance.parameters(), max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = gaussian_nll(residual, scale_tril=covariance())
        loss.backward()
        return loss

    optimiser.step(closure)
    factor = covariance().detach()
    torch.testing.assert_close(factor @ factor.T, residual.T @ residual / 400, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("diagonal", [0.0, -0.5])
def test_non_positive_definite_factor_raises(diagonal):
    factor = torch.tensor([[1.0, 0.0], [0.3, diagonal]])
    with pytest.raises(InputError, match="^scale_tril: .*not positive definite"):
        gaussian_nll(torch.zeros(4, 2), scale_tril=factor)
    with pytest.raises(InputError, match="^std: .*not positive definite"):
        gaussian_nll(torch.zeros(4, 2), std=torch.tensor([1.0, diagonal]))


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({}, "log_variance, std, scale_tril"),
        ({"log_variance": torch.zeros(2), "std": torch.ones(2)}, "log_variance, std, scale_tril"),
        ({"log_variance": torch.zeros(3)}, "log_variance"),
        ({"scale_tril": torch.eye(3)}, "scale_tril"),
        ({"scale_tril": torch.tensor([[1.0, 0.2], [0.0, 1.0]])}, "scale_tril"),
        ({"log_variance": torch.zeros(2), "reduction": "max"}, "reduction"),
        ({"log_variance": torch.zeros(2), "target": torch.zeros(4, 3)}, "target"),
        ({"log_variance": torch.zeros(2), "target": torch.full((4, 2), float("nan"))}, r"pred - target"),
    ],
)
def test_gaussian_nll_refuses_bad_input(kwargs, argument):
    with pytest.raises(InputError, match=rf"^{argument}:"):
        gaussian_nll(torch.zeros(4, 2), **kwargs)


def test_learned_covariance_refuses_bad_arguments():
    with pytest.raises(InputError, match="^kind:"):
        LearnedCovariance(3, kind="banded")
    with pytest.raises(InputError, match="^state_dim:"):
        LearnedCovariance(0)
    with pytest.raises(InputError, match="^state:"):
        LearnedCovariance(3, state_dependent=True)()
    with pytest.raises(InputError, match="^state:"):
        LearnedCovariance(3, state_dependent=True)(torch.zeros(5, 2))


# ---------------------------------------------------------------- sinkhorn_divergence


def test_sinkhorn_divergence_is_zero_on_identical_sets_and_symmetric():
    x, y = randn(40, 2, seed=30), randn(30, 2, seed=31) + 0.5
    assert abs(float(sinkhorn_divergence(x, x.clone(), blur=0.1))) < 1e-9
    forward, backward = sinkhorn_divergence(x, y, blur=0.1), sinkhorn_divergence(y, x, blur=0.1)
    assert float(forward) > 0.1
    assert float(forward) == pytest.approx(float(backward), rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("p, blur, scaling", [(2, 0.01, 0.9), (1, 0.001, 0.95)])
def test_sinkhorn_divergence_approaches_exact_wasserstein_for_small_blur(p, blur, scaling):
    """n = 64 points in 2-D against the exact W_p^p of the optimal assignment (p = 1 needs a smaller blur)."""
    x, y = randn(64, 2, seed=32), randn(64, 2, seed=33) + torch.tensor([1.0, 0.5], dtype=DTYPE)
    exact = assignment_cost(x.numpy(), y.numpy(), p)
    assert float(sinkhorn_divergence(x, y, blur=blur, p=p, scaling=scaling)) == pytest.approx(exact, rel=0.02)
    assert float(sinkhorn_divergence(x, y, blur=1.0, p=p)) < 0.97 * exact  # large blur smooths distances away


def test_sinkhorn_divergence_translation_identity_and_gradient():
    """For p = 2 and any blur, S(x + c, y) = S(x, y) + |c|^2 + 2 c . (mean x - mean y): cross terms are separable."""
    x, y = randn(50, 2, seed=34), randn(40, 2, seed=35) + 0.3
    shift = torch.tensor([0.7, -0.4], dtype=DTYPE)
    base = float(sinkhorn_divergence(x, y, blur=0.3))
    moved = x + shift
    moved.requires_grad_(True)
    value = sinkhorn_divergence(moved, y, blur=0.3)
    expected = base + float(shift @ shift) + 2 * float(shift @ (x.mean(0) - y.mean(0)))
    assert value.item() == pytest.approx(expected, abs=1e-3)  # geomloss runs a fixed annealing, not to convergence
    (gradient,) = torch.autograd.grad(value, moved)
    # d/dt S(x + t e, y) = 2 e . (c + mean x - mean y): the gradients summed over points. geomloss's
    # gradient comes from the last (not fully converged) dual potentials: ~1-2% off at scaling 0.9.
    expected_sum = 2 * (shift + x.mean(0) - y.mean(0))
    assert float((gradient.sum(0) - expected_sum).norm() / expected_sum.norm()) < 0.03


@pytest.mark.parametrize(
    "x, y, kwargs, argument",
    [
        (torch.zeros(0, 2), torch.zeros(3, 2), {}, "x"),
        (torch.zeros(3, 2), torch.zeros(0, 2), {}, "y"),
        (torch.zeros(3, 2), torch.zeros(3, 3), {}, "y"),
        (torch.full((3, 2), float("nan")), torch.zeros(3, 2), {}, "x"),
        (torch.zeros(3), torch.zeros(3, 1), {}, "x"),
        (torch.zeros(3, 2), torch.zeros(3, 2), {"blur": 0.0}, "blur"),
        (torch.zeros(3, 2), torch.zeros(3, 2), {"p": 3}, "p"),
        (torch.zeros(3, 2), torch.zeros(3, 2), {"scaling": 1.0}, "scaling"),
    ],
)
def test_sinkhorn_divergence_refuses_bad_input(x, y, kwargs, argument):
    with pytest.raises(InputError, match=rf"^{argument}:"):
        sinkhorn_divergence(x, y, **kwargs)


# ---------------------------------------------------------------- sliced_wasserstein


@pytest.mark.parametrize("p", [1, 2, 3])
def test_sliced_wasserstein_in_1d_is_the_exact_assignment_cost(p):
    x, y = randn(50, 1, seed=40), 2 * randn(50, 1, seed=41) + 1
    value = sliced_wasserstein(x, y, n_projections=3, p=p, seed=0)
    assert float(value) == pytest.approx(assignment_cost(x.numpy(), y.numpy(), p), rel=1e-12)


@pytest.mark.parametrize("d", [1, 2])
def test_sliced_wasserstein_unequal_sizes_match_replicated_equal_sizes(d):
    """Uniform measures on 6 and 4 points equal those on each set repeated 2 and 3 times (12 points each)."""
    x, y = randn(6, d, seed=42), randn(4, d, seed=43) + 0.5
    value = sliced_wasserstein(x, y, n_projections=16, seed=1)
    replicated = sliced_wasserstein(x.repeat(2, 1), y.repeat(3, 1), n_projections=16, seed=1)
    assert float(value) == pytest.approx(float(replicated), rel=1e-12)
    if d == 1:
        assert float(value) == pytest.approx(assignment_cost(x.repeat(2, 1).numpy(), y.repeat(3, 1).numpy(), 2), rel=1e-12)


def test_sliced_wasserstein_1d_gaussians_closed_form():
    m1, s1, m2, s2 = 0.0, 1.0, 1.5, 2.0
    x, y = m1 + s1 * randn(20000, 1, seed=44), m2 + s2 * randn(20000, 1, seed=45)
    exact_w2 = math.sqrt((m1 - m2) ** 2 + (s1 - s2) ** 2)
    assert float(sliced_wasserstein(x, y, n_projections=1, seed=0)) ** 0.5 == pytest.approx(exact_w2, rel=0.02)


def whitened(n, d, seed):
    """n standard-normal draws with sample mean exactly 0 and sample covariance exactly I."""
    z = randn(n, d, seed=seed)
    z = z - z.mean(0)
    factor = torch.linalg.cholesky(z.T @ z / n)
    return torch.linalg.solve_triangular(factor, z.T, upper=False).T


def test_sliced_wasserstein_isotropic_gaussians_closed_form():
    """SW_2^2(N(m1, s1^2 I), N(m2, s2^2 I)) = |m1 - m2|^2 / d + (s1 - s2)^2."""
    d, s1, s2 = 3, 1.0, 2.0
    m2 = torch.tensor([0.9, 0.0, 0.0], dtype=DTYPE)
    x, y = s1 * whitened(2000, d, seed=46), m2 + s2 * whitened(2000, d, seed=47)
    exact = float(m2 @ m2) / d + (s1 - s2) ** 2
    assert float(sliced_wasserstein(x, y, n_projections=500, seed=0)) == pytest.approx(exact, rel=0.03)


def test_sliced_wasserstein_gradient_seed_and_zero():
    x, y = randn(12, 3, seed=48).requires_grad_(True), randn(9, 3, seed=49)
    assert torch.autograd.gradcheck(lambda a: sliced_wasserstein(a, y, n_projections=4, seed=2), (x,))
    x = x.detach()
    assert float(sliced_wasserstein(x, x.clone(), seed=3)) == 0.0
    assert float(sliced_wasserstein(x, y, seed=5)) == float(sliced_wasserstein(x, y, seed=5))
    assert float(sliced_wasserstein(x, y, seed=5)) != float(sliced_wasserstein(x, y, seed=6))


@pytest.mark.parametrize(
    "x, y, kwargs, argument",
    [
        (torch.zeros(0, 2), torch.zeros(3, 2), {}, "x"),
        (torch.zeros(3, 2), torch.zeros(0, 2), {}, "y"),
        (torch.zeros(3, 2), torch.zeros(3, 3), {}, "y"),
        (torch.zeros(3, 2), torch.tensor([[0.0, float("nan")]]), {}, "y"),
        (torch.zeros(3, 2), torch.zeros(3, 2), {"n_projections": 0}, "n_projections"),
        (torch.zeros(3, 2), torch.zeros(3, 2), {"p": 0.5}, "p"),
        (torch.zeros(3, 2), torch.zeros(3, 2), {"seed": 1.5}, "seed"),
    ],
)
def test_sliced_wasserstein_refuses_bad_input(x, y, kwargs, argument):
    with pytest.raises(InputError, match=rf"^{argument}:"):
        sliced_wasserstein(x, y, **kwargs)


# ---------------------------------------------------------------- adversarial


class LinearCritic(torch.nn.Module):
    """D(x) = <w, x> over all non-batch dimensions; |grad D| = |w| everywhere."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x):
        return (x * self.weight).flatten(1).sum(1)


@pytest.mark.parametrize("shape", [(5,), (2, 6, 8)])  # states (batch, d) and fields (batch, channels, lat, lon)
def test_gradient_penalty_vanishes_for_a_unit_norm_linear_critic(shape):
    weight = randn(*shape, seed=50)
    real, fake = randn(16, *shape, seed=51), randn(16, *shape, seed=52)
    unit = LinearCritic(weight / weight.norm())
    assert gradient_penalty(unit, real, fake).item() < 1e-20
    double = LinearCritic(2 * weight / weight.norm())
    assert gradient_penalty(double, real, fake).item() == pytest.approx(1.0, rel=1e-12)  # (|2 w| - 1)^2 = 1
    scores_gap = (unit(fake).mean() - unit(real).mean()).item()
    assert critic_loss(unit, real, fake).item() == pytest.approx(scores_gap, abs=1e-12)


def test_critic_and_generator_losses_have_the_right_signs():
    direction = torch.tensor([1.0, 0.0], dtype=DTYPE)
    real = randn(64, 2, seed=53) + 2 * direction
    fake = (randn(64, 2, seed=54) - 2 * direction).requires_grad_(True)
    critic = LinearCritic(direction.clone())  # scores real high, fake low: a good critic
    assert critic_loss(critic, real, fake, gp_weight=0).item() < -3  # E D(fake) - E D(real) ~ -4
    generated = generator_loss(critic, fake)
    assert generated.item() > 1  # -E D(fake) ~ 2
    (push,) = torch.autograd.grad(generated, fake)
    assert (push @ direction < 0).all()  # gradient descent moves fake towards the real side
    critic_loss(critic, real, fake).backward()
    assert fake.grad is None  # the critic loss trains the critic only
    assert critic.weight.grad @ direction < 0  # descent raises the real-fake score gap further


def test_critic_loss_trains_an_mlp_critic_and_is_reproducible_with_a_generator():
    torch.manual_seed(0)
    critic = Critic(3, hidden=(16, 16)).to(DTYPE)
    real, fake = randn(32, 3, seed=55), randn(32, 3, seed=56) + 1
    first = critic_loss(critic, real, fake, generator=torch.Generator().manual_seed(7))
    second = critic_loss(critic, real, fake, generator=torch.Generator().manual_seed(7))
    assert first.item() == second.item()
    first.backward()
    for name, parameter in critic.named_parameters():  # the output bias cancels in E D(fake) - E D(real)
        assert parameter.grad is not None and (name == "net.4.bias" or parameter.grad.abs().max() > 0), name
    optimiser = torch.optim.Adam(critic.parameters(), lr=1e-2)
    for _ in range(30):
        optimiser.zero_grad()
        critic_loss(critic, real, fake, generator=torch.Generator().manual_seed(8)).backward()
        optimiser.step()
    with torch.no_grad():
        assert float(critic(real).mean() - critic(fake).mean()) > 0.5  # it learned to tell them apart


def test_adversarial_losses_refuse_bad_input():
    critic = Critic(3)
    with pytest.raises(InputError, match="^fake:"):
        critic_loss(critic, torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(InputError, match="^fake:"):
        gradient_penalty(critic, torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(InputError, match="^gp_weight:"):
        critic_loss(critic, torch.zeros(4, 3), torch.zeros(4, 3), gp_weight=-1)
    with pytest.raises(InputError, match="^real:"):
        critic_loss(critic, torch.full((4, 3), float("nan")), torch.zeros(4, 3))
    with pytest.raises(InputError, match="^critic:"):
        generator_loss(lambda x: x, torch.zeros(4, 3))  # scores (4, 3), not (4,)
    with pytest.raises(InputTypeError, match="^critic:"):
        generator_loss("critic", torch.zeros(4, 3))
    with pytest.raises(InputError, match="^x:"):
        critic(torch.zeros(4, 2))
