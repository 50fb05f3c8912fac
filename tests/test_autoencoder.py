"""The convolutional autoencoder reducer (geonn.emulators.autoencoder): any grid size, masked and
area-weighted loss, the EOF solution as its starting point, weights-only state, bit-for-bit resume,
and selection on the end of the training steps only."""

from __future__ import annotations

import pytest
import torch

from geonn.emulators import AutoencoderReducer, AutoencoderTraining, EOFReducer
from geonn.emulators import autoencoder as autoencoder_module
from geonn.emulators.autoencoder import masked_mse
from geonn.errors import InputError, NotFittedError
from geonn.io import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fields(n_times=24, channels=1, lat=7, lon=11, seed=0):
    """Smooth random fields with a nonlinear mode, a static land mask and cos-latitude weights."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(-1, 1, lat)[:, None]
    x = torch.linspace(-1, 1, lon)[None]
    a, b = torch.randn(2, n_times, 1, 1, 1, generator=g)
    values = a * torch.cos(2 * x + y) + b * torch.sin(3 * y) + 0.5 * (a ** 2) * x * y
    values = values.expand(n_times, channels, lat, lon) + 0.1 * torch.randn(n_times, channels, lat, lon, generator=g)
    mask = torch.ones(1, channels, lat, lon, dtype=torch.bool)
    mask[..., : max(lat // 3, 1), : max(lon // 4, 1)] = False  # "land"
    weights = torch.cos(torch.deg2rad(torch.linspace(-60, 60, lat)))[:, None].expand(lat, lon).contiguous()
    return values.float(), mask.expand(n_times, -1, -1, -1).clone(), weights


def small(modes=2, epochs=2, **training):
    return AutoencoderReducer(modes, hidden=4, depth=2, training=AutoencoderTraining(epochs=epochs, **training))


@pytest.mark.parametrize("channels, lat, lon, residual", [(1, 7, 11, True), (2, 37, 49, True), (1, 5, 3, False), (1, 1, 9, True)])
def test_any_grid_encodes_to_time_by_modes_and_decodes_to_the_input_shape(channels, lat, lon, residual):
    values, mask, weights = fields(12, channels, lat, lon)
    reducer = AutoencoderReducer(2, hidden=4, depth=3, residual=residual, training=AutoencoderTraining(epochs=1))
    reducer.fit(values, mask, weights)
    latent = reducer.encode(values, mask)
    assert latent.shape == (12, 2) and latent.dtype == values.dtype
    rebuilt = reducer.decode(latent)
    assert rebuilt.shape == values.shape and bool(torch.isfinite(rebuilt).all())
    assert reducer.decode(latent.double()).dtype == torch.float64


def test_it_starts_from_the_eof_solution():
    values, mask, weights = fields(30)
    reducer = small(modes=3, epochs=0).fit(values, mask, weights)  # no epoch: the refit stage's initial network
    eof = EOFReducer(3).fit(values, mask, weights)
    assert reducer.best_epoch == 0
    ours = reducer.decode(reducer.encode(values, mask))
    theirs = eof.decode(eof.encode(values))
    assert torch.allclose(ours[mask], theirs[mask], atol=1e-4)
    scale = eof.state_dict()["singular_values"] / (30 - 1) ** 0.5
    assert torch.allclose(reducer.encode(values, mask), (eof.encode(values.double()) / scale).float(), atol=1e-4)


def test_masked_mse_is_area_weighted_and_ignores_masked_points():
    values, mask, weights = fields(4)
    pred = values + torch.randn_like(values)
    expected = ((pred - values) ** 2 * weights * mask).sum((1, 2, 3)) / (weights * mask).sum((1, 2, 3))
    assert torch.allclose(masked_mse(pred, values, mask, weights), expected)
    garbage = torch.where(mask, values, torch.nan)
    assert torch.equal(masked_mse(pred, garbage, mask, weights), masked_mse(pred, values, mask, weights))
    assert torch.equal(masked_mse(torch.where(mask, pred, 1e6), values, mask, weights), masked_mse(pred, values, mask, weights))
    none = torch.zeros_like(mask)
    assert torch.equal(masked_mse(pred, values, none, weights), torch.zeros(4))


def test_values_under_the_mask_change_nothing():
    values, mask, weights = fields(20)
    a = small(epochs=2).fit(values, mask, weights)
    garbage = torch.where(mask, values, torch.full_like(values, 1e4))
    garbage[0, 0, 0, 0] = torch.nan
    b = small(epochs=2).fit(garbage, mask, weights)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert torch.equal(a.encode(values, mask), b.encode(garbage, mask))


def test_state_dict_round_trip_through_a_weights_only_checkpoint(tmp_path):
    values, mask, weights = fields(20, channels=2)
    reducer = small(epochs=2).fit(values, mask, weights)
    state = reducer.state_dict()
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    save_checkpoint({"reducer": state}, tmp_path / "model.pt")
    loaded = AutoencoderReducer.from_state_dict(load_checkpoint(tmp_path / "model.pt")["reducer"])
    assert (loaded.modes, loaded.hidden, loaded.depth, loaded.residual) == (2, 4, 2, True)
    assert torch.equal(loaded.decode(loaded.encode(values, mask)), reducer.decode(reducer.encode(values, mask)))
    with pytest.raises(InputError, match="state: expected an autoencoder with"):
        AutoencoderReducer(3, hidden=4, depth=2).load_state_dict(state)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("stages, epoch", [(("select",), 2), (("refit",), 0), (("refit", "done"), 1)])
def test_resume_after_an_interruption_gives_the_uninterrupted_weights(tmp_path, monkeypatch, stages, epoch):
    values, mask, weights = fields(20)
    settings = {"epochs": 4, "patience": 0, "noise": 0.1}
    reference = AutoencoderReducer(2, hidden=4, depth=2, dropout=0.2, training=AutoencoderTraining(**settings))
    reference.fit(values, mask, weights)
    assert reference.best_epoch >= 1, "the refit stage runs at least one epoch in this scenario"
    real_save = autoencoder_module.save_checkpoint

    def save_then_stop(state, path):
        real_save(state, path)
        if state["stage"] in stages and state["epoch"] == epoch:
            raise Interrupted

    monkeypatch.setattr(autoencoder_module, "save_checkpoint", save_then_stop)
    interrupted = AutoencoderReducer(2, hidden=4, depth=2, dropout=0.2, training=AutoencoderTraining(**settings))
    with pytest.raises(Interrupted):
        interrupted.fit(values, mask, weights, checkpoint_dir=tmp_path)
    monkeypatch.undo()
    torch.manual_seed(12345)  # the caller's random state does not matter
    resumed = AutoencoderReducer(2, hidden=4, depth=2, dropout=0.2, training=AutoencoderTraining(**settings))
    resumed.fit(values, mask, weights, checkpoint_dir=tmp_path, resume=True)
    assert resumed.history == reference.history and resumed.best_epoch == reference.best_epoch
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    with pytest.raises(InputError, match="was written with other settings"):
        small(epochs=4).fit(values, mask, weights, checkpoint_dir=tmp_path, resume=True)


def test_selection_uses_the_end_of_the_training_steps():
    values, mask, weights = fields(20)
    reducer = small(epochs=3, patience=0, refit=False).fit(values, mask, weights)
    assert [h["stage"] for h in reducer.history] == ["select"] * 3
    changed = values.clone()
    changed[16:] += 5.0  # the validation slice: the last 4 of 20 steps
    other = small(epochs=3, patience=0, refit=False).fit(changed, mask, weights)
    assert [h["loss"] for h in other.history] == [h["loss"] for h in reducer.history]  # trained on the same steps
    assert [h["validation_rmse"] for h in other.history] != [h["validation_rmse"] for h in reducer.history]


def test_bad_inputs_and_unfitted_use():
    values, mask, weights = fields(12)
    with pytest.raises(NotFittedError):
        small().encode(values)
    with pytest.raises(InputError, match="modes: expected an int >= 1"):
        AutoencoderReducer(0)
    with pytest.raises(InputError, match=r"values: expected a floating tensor \(time, channel, lat, lon\)"):
        small().fit(values[0], mask[0], weights)
    with pytest.raises(InputError, match="weights: expected a tensor"):
        small().fit(values, mask, weights[:3])
    with pytest.raises(InputError, match="resume: resuming needs checkpoint_dir"):
        small().fit(values, mask, weights, resume=True)
    with pytest.raises(InputError, match="modes: expected at most the 2 training steps"):
        small(modes=3).fit(values[:3], mask[:3], weights)
    with pytest.raises(InputError, match="learning_rate: expected a finite number"):
        AutoencoderTraining(learning_rate=-1)
    reducer = small(epochs=0).fit(values, mask, weights)
    with pytest.raises(InputError, match=r"values: expected a floating tensor \(time, \*\(1, 7, 11\)\)"):
        reducer.encode(values[..., :5])
    with pytest.raises(InputError, match=r"latent: expected a floating tensor \(time, 2\)"):
        reducer.decode(torch.zeros(3, 4))
