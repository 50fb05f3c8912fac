"""The CNN field emulator: periodic padding is exact (a global field shifted in longitude gives the shifted
forecast), the anchor ignores any fixed offset field, rollouts feed forecasts back, the loss ignores masked
points, and training checkpoints every epoch and resumes bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geonn.emulators import cnn
from geonn.emulators.cnn import (
    CNNEmulator,
    EmulatorTraining,
    fit_emulator,
    history_windows,
    is_periodic_longitude,
    masked_mse,
)
from geonn.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_emulator(padding: str, history: int = 2, seed: int = 0) -> CNNEmulator:
    """An emulator whose every weight is random (the last layer starts at zero otherwise)."""
    torch.manual_seed(seed)
    model = CNNEmulator(channels=2, history=history, width=6, depth=3, padding=padding)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    return model.double().requires_grad_(False)


def test_longitudes_spanning_the_circle_are_periodic():
    assert is_periodic_longitude(np.arange(0, 360, 2.5))
    assert is_periodic_longitude(np.arange(-180, 180, 30.0))
    assert is_periodic_longitude(np.arange(0, 360, 1.875)[::-1])  # descending
    assert not is_periodic_longitude(np.linspace(225, 315, 49))  # the A1B North America grid
    assert not is_periodic_longitude(np.arange(0, 350, 10.0))  # one column short of the circle
    assert not is_periodic_longitude([0.0, 10.0, 30.0, 40.0])  # uneven spacing
    assert not is_periodic_longitude([0.0, 120.0])


@pytest.mark.parametrize("shift", [1, 5, 11])
def test_periodic_padding_makes_the_forecast_equivariant_to_longitude_shifts(shift):
    model = random_emulator("periodic")
    history = torch.randn(3, 2, 2, 7, 16, dtype=torch.float64)
    shifted = torch.roll(history, shift, dims=-1)
    torch.testing.assert_close(model(shifted), torch.roll(model(history), shift, dims=-1), rtol=0, atol=1e-12)
    # the rollout too, step after step
    torch.testing.assert_close(model.rollout(shifted, 3), torch.roll(model.rollout(history, 3), shift, dims=-1), rtol=0, atol=1e-12)


def test_without_periodic_padding_the_edges_break_the_equivariance():
    model = random_emulator("replicate")
    history = torch.randn(2, 2, 2, 7, 16, dtype=torch.float64)
    difference = model(torch.roll(history, 5, dims=-1)) - torch.roll(model(history), 5, dims=-1)
    assert float(difference.abs().max()) > 1e-3


@pytest.mark.parametrize("padding", ["periodic", "replicate", "zeros"])
def test_a_fixed_offset_field_moves_the_forecast_with_it(padding):
    model = random_emulator(padding, history=4)
    history = torch.randn(2, 4, 2, 6, 9, dtype=torch.float64)
    offset = torch.randn(1, 1, 2, 6, 9, dtype=torch.float64) * 5
    torch.testing.assert_close(model(history + offset), model(history) + offset[:, 0], rtol=0, atol=1e-10)


def test_a_new_emulator_forecasts_the_mean_of_its_history():
    model = CNNEmulator(channels=1, history=3, width=4, depth=2).double()
    history = torch.randn(2, 3, 1, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(model(history), history.mean(1))
    persistence = CNNEmulator(channels=1, history=1, depth=2).double()
    torch.testing.assert_close(persistence(history[:, -1:]), history[:, -1])


def test_rollout_feeds_each_forecast_back():
    model = random_emulator("replicate", history=2)
    history = torch.randn(2, 2, 2, 5, 6, dtype=torch.float64)
    path = model.rollout(history, 3)
    assert path.shape == (2, 3, 2, 5, 6)
    first = model(history)
    second = model(torch.stack([history[:, 1], first], dim=1))
    third = model(torch.stack([first, second], dim=1))
    torch.testing.assert_close(path, torch.stack([first, second, third], dim=1), rtol=0, atol=0)
    mask = torch.ones(2, 5, 6, dtype=torch.bool)
    mask[:, 0, 0] = False
    masked = model.rollout(history, 2, mask=mask)
    assert bool((masked[:, :, :, 0, 0] == 0).all())
    one_step = CNNEmulator(channels=2, history=1, depth=1).double()
    assert one_step.rollout(history[:, 0], 2).shape == (2, 2, 2, 5, 6)  # a plain state is accepted with history 1


def test_history_windows_and_bad_inputs():
    series = torch.arange(6.0).reshape(6, 1, 1, 1)
    windows = history_windows(series, slice(3, 6), 3)
    assert windows.flatten(1).tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    with pytest.raises(InputError, match="history=3"):
        history_windows(series, [2], 3)
    model = CNNEmulator(channels=1, history=2)
    with pytest.raises(InputError, match=r"history: expected a tensor \(batch, 2, 1, lat, lon\)"):
        model(torch.zeros(1, 3, 1, 4, 4))
    with pytest.raises(InputError, match="padding"):
        CNNEmulator(padding="circular")
    with pytest.raises(InputError, match="kernel_size"):
        CNNEmulator(kernel_size=4)


def test_masked_points_count_for_nothing_in_the_loss():
    pred, target = torch.randn(4, 1, 5, 6), torch.randn(4, 1, 5, 6)
    mask = torch.rand(4, 1, 5, 6) > 0.3
    weights = torch.rand(5, 6)
    garbage = torch.where(mask, target, torch.full_like(target, 1e6))
    assert float(masked_mse(pred, garbage, mask, weights)) == pytest.approx(float(masked_mse(pred, target, mask, weights)))
    expected = (weights * mask * (pred - target) ** 2).sum() / (weights * mask).sum()
    assert float(masked_mse(pred, target, mask, weights)) == pytest.approx(float(expected))


def synthetic_series(n_times=30, seed=0):
    """A smooth random walk plus noise on a 6 x 8 grid, with a masked block."""
    generator = torch.Generator().manual_seed(seed)
    walk = torch.randn(n_times, 1, 6, 8, generator=generator).cumsum(0) * 0.3
    series = walk + 0.5 * torch.randn(n_times, 1, 6, 8, generator=generator)
    mask = torch.ones_like(series, dtype=torch.bool)
    mask[:, :, 1:3, 2:4] = False
    return torch.where(mask, series, 0), mask


def train(tmp_path, config, resume=False):
    series, mask = synthetic_series()
    torch.manual_seed(0)
    model = CNNEmulator(channels=1, history=2, width=4, depth=2)
    fit = fit_emulator(model, series, mask, torch.ones(6, 8) / 48, config, checkpoint_dir=tmp_path, resume=resume, progress=False)
    return model, fit


@pytest.mark.parametrize("refit", [True, False])
def test_training_resumes_bit_for_bit(tmp_path, monkeypatch, refit):
    config = EmulatorTraining(epochs=5, batch_size=8, learning_rate=1e-2, patience=None, refit=refit)
    reference, reference_fit = train(tmp_path / "whole", config)
    assert (tmp_path / "whole" / cnn.CHECKPOINT_NAME).is_file()
    assert [h["phase"] for h in reference_fit.history][:5] == ["select"] * 5
    assert 1 <= reference_fit.best_epoch <= 5
    epoch, calls = cnn._epoch, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in (3, 7):  # once in the selection phase, once in the refit
            raise KeyboardInterrupt
        return epoch(*args, **kwargs)

    monkeypatch.setattr(cnn, "_epoch", interrupted)
    folder = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(folder, config)
    model, fit = None, None
    for _ in range(3):
        try:
            model, fit = train(folder, config, resume=True)
            break
        except KeyboardInterrupt:
            continue
    assert fit is not None and fit.resumed_from
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert fit.best_epoch == reference_fit.best_epoch
    assert [h["loss"] for h in fit.history] == [h["loss"] for h in reference_fit.history]


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    train(tmp_path, EmulatorTraining(epochs=2, patience=None))
    with pytest.raises(InputError, match="other settings"):
        train(tmp_path, EmulatorTraining(epochs=3, patience=None), resume=True)


def test_training_lowers_the_validation_error_below_the_start():
    """On a random walk plus noise, the learned anchor beats the starting lag mean on the validation steps."""
    series, mask = synthetic_series(n_times=80, seed=1)
    torch.manual_seed(0)
    model = CNNEmulator(channels=1, history=4, width=4, depth=2)
    validation = slice(64, 80)
    with torch.no_grad():
        start = float(masked_mse(model(history_windows(series, validation, 4)), series[validation], mask[validation], torch.ones(6, 8)))
    fit = fit_emulator(model, series, mask, torch.ones(6, 8), EmulatorTraining(epochs=30, learning_rate=1e-2, refit=False),
                       progress=False)
    assert fit.validation_rmse ** 2 < start
    assert len(fit.history) <= 30
