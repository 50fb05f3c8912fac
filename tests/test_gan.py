"""The WGAN-GP field generator and the EOF-Gaussian sampler on tiny synthetic fields."""

from __future__ import annotations

import math

import pytest
import torch

from geonn import InputError, NotFittedError
from geonn.emulators.gan import FieldCritic, FieldGAN, FieldGenerator, GANConfig
from geonn.emulators.sampler import EOFGaussianSampler
from geonn.io import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"noise_dim": 4, "width": 4, "epochs": 2, "steps_per_epoch": 3, "critic_steps": 2, "batch_size": 8, "seed": 3}


def synthetic(n_times=24, shape=(1, 7, 9)):
    """Smooth random fields (time, channel, lat, lon) with a land corner masked at every time."""
    g = torch.Generator().manual_seed(0)
    lat = torch.linspace(0, 1, shape[1])[:, None]
    lon = torch.linspace(0, 1, shape[2])[None, :]
    amplitude = torch.randn((n_times, shape[0], 2), generator=g)
    values = (amplitude[..., 0, None, None] * torch.sin(3 * lon + lat) + amplitude[..., 1, None, None] * torch.cos(2 * lat))
    mask = torch.ones(values.shape, dtype=torch.bool)
    mask[:, :, :2, :3] = False
    mask[5, :, 4, 4] = False  # a gap at one time only
    return torch.where(mask, values, 0.0), mask


@pytest.mark.parametrize("shape", [(1, 7, 9), (2, 12, 5), (1, 37, 49)])
@pytest.mark.parametrize("conditional", [False, True])
def test_networks_take_any_grid(shape, conditional):
    gen = FieldGenerator(*shape, noise_dim=4, width=4, conditional=conditional)
    previous = torch.randn(3, *shape) if conditional else None
    fields = gen(torch.randn(3, 4), previous)
    assert fields.shape == (3, *shape)
    critic = FieldCritic(shape[0], *shape[1:], width=4)
    assert critic(fields).shape == (3,)


@pytest.mark.parametrize("condition", ["none", "previous"])
def test_gan_trains_and_samples_with_the_mask(condition):
    values, mask = synthetic()
    gan = FieldGAN(GANConfig(condition=condition, **TINY)).fit(values, mask, progress=False)
    assert len(gan.history.epochs) == 2
    for record in gan.history.epochs:
        assert all(math.isfinite(record[k]) for k in ("critic_loss", "wasserstein", "generator_loss"))
    previous = values[-5:] if condition == "previous" else None
    samples = gan.sample(5, previous, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (5, 1, 7, 9)
    never = ~mask.any(0)
    assert torch.isnan(samples[:, never]).all()
    assert torch.isfinite(samples[:, ~never]).all()  # the point missing at one time only is still generated
    again = gan.sample(5, previous, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.nan_to_num(samples), torch.nan_to_num(again))


def test_resume_gives_identical_weights(tmp_path):
    values, mask = synthetic()
    config = GANConfig(condition="previous", **{**TINY, "epochs": 3})
    whole = FieldGAN(config).fit(values, mask, checkpoint_dir=tmp_path / "whole", progress=False)
    # an interrupted run: 1 epoch, then a resume asked for 3
    FieldGAN(GANConfig(condition="previous", **{**TINY, "epochs": 1})).fit(values, mask, checkpoint_dir=tmp_path / "cut",
                                                                          progress=False)
    state = load_checkpoint(tmp_path / "cut" / "gan.pt")
    state["config"]["epochs"] = 3  # as if the first run had been asked for 3 epochs and stopped after 1
    save_checkpoint(state, tmp_path / "cut" / "gan.pt")
    resumed = FieldGAN(config).fit(values, mask, checkpoint_dir=tmp_path / "cut", resume=True, progress=False)
    assert resumed.history.resumed_from_epoch == 1
    for a, b in zip(whole.state_dict()["generator"].values(), resumed.state_dict()["generator"].values()):
        assert torch.equal(a, b)
    for a, b in zip(whole.state_dict()["critic"].values(), resumed.state_dict()["critic"].values()):
        assert torch.equal(a, b)
    assert whole.history.epochs == resumed.history.epochs


def test_resume_refuses_another_config(tmp_path):
    values, mask = synthetic()
    FieldGAN(GANConfig(**{**TINY, "epochs": 1})).fit(values, mask, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(InputError, match=r"another GAN config \(width: 4 -> 5, epochs: 1 -> 2\)"):
        FieldGAN(GANConfig(**{**TINY, "width": 5})).fit(values, mask, checkpoint_dir=tmp_path, resume=True, progress=False)


def test_state_round_trip_and_errors(tmp_path):
    values, mask = synthetic()
    with pytest.raises(NotFittedError):
        FieldGAN(GANConfig(**TINY)).sample(2)
    gan = FieldGAN(GANConfig(**{**TINY, "epochs": 1})).fit(values, mask, progress=False)
    save_checkpoint(gan.state_dict(), tmp_path / "gan.pt")
    loaded = FieldGAN().load_state_dict(load_checkpoint(tmp_path / "gan.pt"))
    g = torch.Generator()
    assert torch.equal(torch.nan_to_num(gan.sample(3, generator=g.manual_seed(0))),
                       torch.nan_to_num(loaded.sample(3, generator=g.manual_seed(0))))
    with pytest.raises(InputError, match="takes no previous"):
        gan.sample(2, values[:2])
    with pytest.raises(InputError, match="condition: expected one of"):
        GANConfig(condition="coarse")
    with pytest.raises(InputError, match="batch_size: expected an int >= 1"):
        GANConfig(batch_size=0)
    conditional = FieldGAN(GANConfig(condition="previous", **{**TINY, "epochs": 1})).fit(values, mask, progress=False)
    with pytest.raises(InputError, match=r"previous: expected the fields the samples follow, shape \(2, 1, 7, 9\)"):
        conditional.sample(2)


def test_eof_gaussian_sampler_has_the_training_covariance():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 1, 4, 5, generator=g, dtype=torch.float64)
    train = torch.einsum("tk,kcyx->tcyx", torch.randn(50, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.3], dtype=torch.float64), basis)
    mask = torch.ones(train.shape, dtype=torch.bool)
    mask[:, :, 0, 0] = False
    sampler = EOFGaussianSampler(modes=3).fit(train, mask)
    fields = sampler.sample(20000, generator=g, dtype=torch.float64)
    assert fields.shape == (20000, 1, 4, 5) and torch.isnan(fields[:, 0, 0, 0]).all()
    flat, data = fields[:, 0].flatten(1)[:, 1:], train[:, 0].flatten(1)[:, 1:]
    torch.testing.assert_close(torch.cov(flat.T), torch.cov(data.T), atol=0.08 * float(torch.cov(data.T).abs().max()), rtol=0)
    # fewer modes: the residual noise puts back the variance of each point
    small = EOFGaussianSampler(modes=1, residual=True).fit(train, mask).sample(20000, generator=g, dtype=torch.float64)
    torch.testing.assert_close(small[:, 0].flatten(1)[:, 1:].var(0), data.var(0), rtol=0.05, atol=0)
    with pytest.raises(NotFittedError):
        EOFGaussianSampler().sample(2)
    state = EOFGaussianSampler().load_state_dict(sampler.state_dict())
    assert torch.equal(torch.nan_to_num(state.sample(4, generator=torch.Generator().manual_seed(1))),
                       torch.nan_to_num(sampler.sample(4, generator=torch.Generator().manual_seed(1))))
