"""Pretrained backbones from local weight files, offline: torchvision's legacy DenseNet files and timm models
load bit-exactly, bad files are named with the fix, freezing trains the head alone, and a checkpoint records
the file it started from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import config_for, legacy_densenet_file, real_tiles, tiny_timm_file
from jobs.train import run_train
from lymphoma.backbones import file_digest, load_pretrained
from lymphoma.checkpoint import load_checkpoint
from lymphoma.errors import InputError
from lymphoma.model import build_model
from lymphoma.settings import ModelSettings

pytestmark = pytest.mark.usefixtures("no_network")


def test_torchvision_legacy_densenet_file_loads_bit_exactly(tmp_path):
    source = legacy_densenet_file(tmp_path / "densenet121.pth")
    model = build_model(ModelSettings(backbone="torchvision:densenet121").architecture(3))
    loaded = load_pretrained(model, tmp_path / "densenet121.pth")
    assert loaded.head_skipped == ["classifier.bias", "classifier.weight"]  # 1000 ImageNet classes, here 3
    assert loaded.sha256 == file_digest(tmp_path / "densenet121.pth")
    ours = model.net.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(ours[key], value), key
    model.eval()
    x = torch.rand(2, 3, 112, 112)
    assert torch.equal(model.net.features(x), source.features(x))
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(model.adapter(x), (x - mean) / std)  # ImageNet normalisation inside the model


def test_timm_safetensors_loads_bit_exactly_and_takes_its_input_size(tmp_path):
    source = tiny_timm_file(tmp_path / "vit.safetensors", "vit_tiny_patch16_224")
    model = build_model(ModelSettings(backbone="timm:vit_tiny_patch16_224").architecture(3)).eval()
    loaded = load_pretrained(model, tmp_path / "vit.safetensors")
    assert loaded.head_skipped == [] and loaded.loaded == len(source.state_dict())
    x = torch.rand(2, 3, 224, 224)
    assert torch.equal(model.net(x), source(x))
    assert model.adapter.input_size == 224  # a ViT needs its own input size: 112-px crops are resized to it
    small = torch.rand(2, 3, 112, 112)
    assert model(small).shape == (2, 3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "wrapped.pt")
    again = build_model(ModelSettings(backbone="timm:vit_tiny_patch16_224").architecture(3)).eval()
    load_pretrained(again, tmp_path / "wrapped.pt")  # a DDP-style prefix inside a wrapper dict
    assert torch.equal(again.net(x), source(x))


def test_bad_weight_files_and_names_say_what_to_do(tmp_path):
    legacy_densenet_file(tmp_path / "densenet121.pth")
    with pytest.raises(InputError, match=r"model.weights=.*missing.pth: file not found.*nothing is downloaded"):
        load_pretrained(build_model(ModelSettings(backbone="torchvision:densenet121").architecture(3)),
                        tmp_path / "missing.pth")
    with pytest.raises(InputError, match=r"not weights of this backbone.*missing.*model.backbone"):
        load_pretrained(build_model(ModelSettings(backbone="torchvision:densenet169").architecture(3)),
                        tmp_path / "densenet121.pth")  # another depth: shapes and counts differ
    tiny_timm_file(tmp_path / "resnet.safetensors", "resnet10t")
    with pytest.raises(InputError, match="not weights of this backbone"):
        load_pretrained(build_model(ModelSettings(backbone="torchvision:densenet121").architecture(3)),
                        tmp_path / "resnet.safetensors")
    (tmp_path / "broken.pt").write_bytes(b"not a weight file at all")
    with pytest.raises(InputError, match=r"broken.pt: cannot be read.*damaged"):
        load_pretrained(build_model(ModelSettings(backbone="timm:resnet10t").architecture(3)), tmp_path / "broken.pt")
    with pytest.raises(InputError, match=r"unknown format '.ckpt'"):
        (tmp_path / "w.ckpt").write_bytes(b"x")
        load_pretrained(build_model(ModelSettings(backbone="timm:resnet10t").architecture(3)), tmp_path / "w.ckpt")
    with pytest.raises(InputError, match="timm has no architecture .vit_nonexistent_patch16.; similar: .*vit_tiny_patch16_224"):
        build_model(ModelSettings(backbone="timm:vit_nonexistent_patch16").architecture(3))
    with pytest.raises(InputError, match="torchvision backbones are densenet121, densenet169, densenet201"):
        ModelSettings(backbone="torchvision:resnet50")
    with pytest.raises(InputError, match="need a pretrained backbone"):
        ModelSettings(weights="w.pth")
    with pytest.raises(InputError, match=r"model.freeze='features.nope' is not a block of DenseNet.*features.denseblock1"):
        build_model(ModelSettings(backbone="torchvision:densenet121", freeze="features.nope").architecture(3))


def test_a_fresh_head_on_loaded_weights_starts_at_chance_on_real_tiles(tmp_path, data_root):
    """timm initialises an EfficientNet's 3-class head from +-0.58: its logits on real tiles reached 35 (a first
    loss of 5.4 with ImageNet weights, which wrecked them); the head left fresh by a 1000-class file starts
    near zero instead, while every loaded tensor stays as the file has it."""
    source = tiny_timm_file(tmp_path / "lite0.safetensors", "tf_efficientnet_lite0", num_classes=1000)
    x = real_tiles(data_root)
    model = build_model(ModelSettings(backbone="timm:tf_efficientnet_lite0").architecture(3)).eval()
    loaded = load_pretrained(model, tmp_path / "lite0.safetensors")
    assert loaded.head_skipped == ["classifier.bias", "classifier.weight"]
    assert torch.equal(model.net.conv_head.weight, source.conv_head.weight)
    with torch.no_grad():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, torch.zeros(len(x), dtype=torch.long))
    assert len(x) >= 90 and logits.abs().max() < 3, logits.abs().max()
    assert abs(float(loss) - np.log(3)) < 0.5, float(loss)  # 37 with timm's head
    assert float(model.net.classifier.weight.detach().std()) == pytest.approx(0.01, rel=0.1)
    assert not model.net.classifier.bias.any()


def test_freeze_all_or_up_to_a_block_keeps_frozen_batch_norms_in_eval():
    probe = build_model(ModelSettings(backbone="torchvision:densenet121", freeze="all").architecture(3))
    assert {n for n, p in probe.net.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}
    partial = build_model(ModelSettings(backbone="torchvision:densenet121", freeze="features.denseblock2").architecture(3))
    trainable = {n.split(".")[1] for n, p in partial.net.named_parameters() if p.requires_grad and n.startswith("features.")}
    assert trainable == {"transition2", "denseblock3", "transition3", "denseblock4", "norm5"}
    partial.train()
    modules = dict(partial.net.named_modules())
    assert not modules["features.denseblock1.denselayer1.norm1"].training  # frozen: pretrained statistics kept
    assert modules["features.denseblock3.denselayer1.norm1"].training


def test_training_a_linear_probe_on_a_timm_backbone_records_its_weight_file(tiled, tmp_path):
    """End to end on real tiles: a timm CNN from a local safetensors file, frozen but for its head; the frozen
    weights come out of training unchanged, the checkpoint names the file and its digest, and prediction
    needs only the checkpoint."""
    source = tiny_timm_file(tmp_path / "resnet10t.safetensors", "resnet10t", num_classes=1000)
    run = config_for(tiled, "probe", "model.backbone=timm:resnet10t", f"model.weights={tmp_path / 'resnet10t.safetensors'}",
                     "model.freeze=all", "train.epochs=1", "train.max_steps_per_epoch=3", "train.ema=null")
    summary = run_train(run)[0]
    state = load_checkpoint(Path(summary["checkpoints"]) / "last.pt")
    assert state["architecture"]["backbone"] == "timm:resnet10t" and state["architecture"]["freeze"] == "all"
    assert state["init_weights"]["sha256"] == file_digest(tmp_path / "resnet10t.safetensors")
    assert state["init_weights"]["head"] == ["fc.bias", "fc.weight"]
    trained = {k.removeprefix("net."): v for k, v in state["model"].items()}
    changed = [k for k, v in source.state_dict().items() if not k.startswith("fc.") and not torch.equal(trained[k], v)]
    assert changed == []  # a linear probe: the backbone, batch-norm statistics included, is what the file held
    assert len(state["optimizer"]["state"]) == 2  # only the head's weight and bias were optimised
    (tmp_path / "resnet10t.safetensors").unlink()  # prediction rebuilds the model from the checkpoint alone
    from lymphoma.prediction import Predictor

    predictor = Predictor.from_checkpoint(Path(summary["checkpoints"]) / "last.pt", torch.device("cpu"), 8)
    tiles = torch.randint(0, 255, (4, 64, 64, 3), dtype=torch.uint8).numpy()
    assert predictor.logits(tiles).shape == (4, 3)
