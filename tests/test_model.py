"""The DenseNet presets' options that change training only: stochastic depth (model.drop_path)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models.densenet import _DenseLayer

from conftest import config_for, real_tiles
from jobs.train import run_train
from lymphoma.checkpoint import load_checkpoint
from lymphoma.errors import InputError
from lymphoma.model import build_model
from lymphoma.settings import ModelSettings


def test_stochastic_depth_drops_whole_samples_in_training_only(data_root):
    """On real tiles: in training, every dense layer's new features are, per sample, either zero or the plain
    layer's scaled by 1 / (1 - p), with p rising to model.drop_path at the last layer; in evaluation the network
    gives bit for bit what the same weights without stochastic depth give, under the same weight names."""
    x = real_tiles(data_root)
    torch.manual_seed(0)
    plain = build_model(ModelSettings(drop_rate=0.0).architecture(3))
    architecture = ModelSettings(drop_rate=0.0, drop_path=0.5).architecture(3)
    assert architecture["drop_path"] == 0.5 and "drop_path" not in ModelSettings().architecture(3)
    hooked = build_model(architecture)
    hooked.load_state_dict(plain.state_dict())  # the same names: checkpoints load either way
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), hooked.eval()(x))
    layers = [m for m in hooked.modules() if isinstance(m, _DenseLayer)]
    raw: dict[int, torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(layers):  # the plain output before the drop, and what the next layers get
        layer.register_forward_hook(lambda m, a, out, i=i: raw.__setitem__(i, out.detach()), prepend=True)
        layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.detach()))
    with torch.no_grad():
        hooked.train()(x)
    assert len(x) >= 90 and len(layers) == 8
    for i, layer in enumerate(layers):
        p = 0.5 * (i + 1) / len(layers)
        dropped = (seen[i].flatten(1) == 0).all(1)
        kept = ~dropped
        assert torch.allclose(seen[i][kept], raw[i][kept] / (1 - p))
        assert not (raw[i].flatten(1) == 0).all(1).any()  # what was dropped was not zero before
        if i == len(layers) - 1:
            assert 0.3 < float(dropped.float().mean()) < 0.7, float(dropped.float().mean())
    assert sum(int((seen[i].flatten(1) == 0).all(1).sum()) for i in range(2)) < 0.25 * len(x)  # p 1/16, 1/8


def test_drop_path_settings_say_what_is_allowed():
    with pytest.raises(InputError, match=r"model.drop_path must be in \[0, 1\)"):
        ModelSettings(drop_path=1.0)
    with pytest.raises(InputError, match="DenseNet presets"):
        ModelSettings(backbone="timm:resnet10t", drop_path=0.1)


def test_training_with_stochastic_depth_keeps_it_in_the_checkpoint(tiled):
    """End to end on real tiles: the checkpoint's architecture carries drop_path, and prediction's model from it
    is hooked again (and, in evaluation, unaffected)."""
    run = config_for(tiled, "drop-path", "model.drop_path=0.2", "train.epochs=1", "train.max_steps_per_epoch=3")
    summary = run_train(run)[0]
    state = load_checkpoint(Path(summary["checkpoints"]) / "last.pt")
    assert state["architecture"]["drop_path"] == 0.2
    model = build_model(state["architecture"])
    model.load_state_dict(state["model"])
    hooks = [len(m._forward_hooks) for m in model.modules() if isinstance(m, _DenseLayer)]
    assert hooks == [1] * 8
