"""Atomic writes, JSON, and checkpoints that cannot run code."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import geonn
from geonn.io import atomic_path, load_checkpoint, save_checkpoint, write_json, write_text


class RunsCode:
    """Pickles to a call of ``os.system``: loading it with plain pickle would run the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# --- atomic writes -------------------------------------------------------------------------------


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        tmp.write_text("new")
        assert target.read_text() == "old"  # not visible until the body finishes
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


@pytest.mark.parametrize("exception", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_path_keeps_the_old_file_when_the_body_raises(tmp_path, exception):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(type(exception)), atomic_path(target) as tmp:
        tmp.write_text("half-written")
        raise exception
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temp file left behind


def test_atomic_path_leaves_nothing_when_there_was_no_file(tmp_path):
    target = tmp_path / "new" / "deeper" / "out.txt"
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_text("x")
        raise ValueError("fail")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_write_text_creates_folders(tmp_path):
    path = write_text(tmp_path / "a" / "b.txt", "héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"


# --- JSON -----------------------------------------------------------------------------------------


def test_write_json_turns_non_finite_into_null(tmp_path):
    data = {"rmse": math.nan, "nested": {"values": [1.5, math.inf, -math.inf, 2]}, "pair": (math.nan, 3), "name": "l63"}
    path = write_json(data, tmp_path / "metrics.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"rmse": None, "nested": {"values": [1.5, None, None, 2]}, "pair": [None, 3], "name": "l63"}
    assert text.endswith("\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_write_json_is_sorted_and_exact(tmp_path):
    path = write_json({"b": 0.1, "a": 1e-300}, tmp_path / "x.json")
    assert list(json.loads(path.read_text())) == ["a", "b"]
    assert json.loads(path.read_text()) == {"a": 1e-300, "b": 0.1}


# --- checkpoints ----------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = geonn.MLP(3, hidden=(8,))
    state = {
        "model": net.state_dict(),
        "x": torch.randn(4, 5, dtype=torch.float64),
        "ints": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "epoch": 7,
        "loss": 0.125,
        "scheme": "rk4",
        "history": [1.0, 0.5, 0.25],
        "config": {"dt": 0.01, "hidden": [8]},
    }
    path = save_checkpoint(state, tmp_path / "ckpt" / "model.pt")
    back = load_checkpoint(path)
    assert set(back) == set(state)
    for key in ("x", "ints"):
        assert back[key].dtype == state[key].dtype and torch.equal(back[key], state[key])
    assert set(back["model"]) == set(state["model"])
    for key, tensor in state["model"].items():
        assert torch.equal(back["model"][key], tensor)
    assert {k: back[k] for k in ("epoch", "loss", "scheme", "history", "config")} == {
        k: state[k] for k in ("epoch", "loss", "scheme", "history", "config")
    }
    clone = geonn.MLP(3, hidden=(8,))
    clone.load_state_dict(back["model"])
    x = torch.randn(2, 3)
    assert torch.equal(clone(0.0, x), net(0.0, x))
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]


def test_checkpoint_refuses_code(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(2), "payload": RunsCode(f"touch {marker}")}, path)
    assert not marker.exists()
    with pytest.raises(geonn.InputError, match="refused") as info:
        load_checkpoint(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value)
    assert not marker.exists(), "loading the checkpoint ran code"
    # control: the payload is live, plain unpickling runs it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_checkpoint_refuses_code_at_top_level(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save(RunsCode(f"touch {marker}"), path)
    with pytest.raises(geonn.InputError):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_truncated_checkpoint(tmp_path, keep):
    path = save_checkpoint({"x": torch.randn(64, 64, dtype=torch.float64), "step": 3}, tmp_path / "ok.pt")
    data = path.read_bytes()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(geonn.InputError) as info:
        load_checkpoint(broken)
    assert "broken.pt" in str(info.value)


@pytest.mark.parametrize("content", [b"x", b"not a checkpoint at all\n" * 10])
def test_garbage_checkpoint(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(geonn.InputError, match="garbage.pt"):
        load_checkpoint(path)


def test_missing_checkpoint_and_non_dict(tmp_path):
    with pytest.raises(geonn.InputError, match="existing file"):
        load_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(geonn.InputError, match="existing file"):
        load_checkpoint(tmp_path)  # a folder
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(geonn.InputError, match="expected a dict"):
        load_checkpoint(tmp_path / "tensor.pt")
