"""Mixup and CutMix (train.mix) on real tiles: what a mixed batch holds, its loss, and training with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_training import final_digest

from conftest import config_for
from jobs.train import run_train
from lymphoma.images import read_rgb
from lymphoma.mixing import BatchMix, batch_mix


@pytest.fixture(scope="module")
def batch(data_root) -> tuple[torch.Tensor, torch.Tensor]:
    paths = sorted((data_root / "lowres").glob("*/*.png"))[::40][:6]
    tiles = np.stack([read_rgb(p)[50:162, 100:212] for p in paths])
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    return x, torch.tensor([0, 1, 2, 0, 1, 2])


def test_mixup_blends_each_tile_with_its_partner_and_mixes_the_loss_alike(batch):
    x, y = batch
    torch.manual_seed(3)
    mixed = BatchMix("mixup", 0.4)(x, y)
    assert 0.0 < mixed.lam < 1.0 and mixed.x.shape == x.shape
    partner = [int(np.flatnonzero([torch.allclose(mixed.x[i], x[i].lerp(x[j], 1 - mixed.lam), atol=1e-6)
                                   for j in range(len(x))])[0]) for i in range(len(x))]
    assert sorted(partner) == list(range(len(x)))  # a permutation of the batch
    assert torch.equal(mixed.y_partner, y[partner])
    criterion = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.1)
    logits = torch.randn(len(x), 3)
    expected = mixed.lam * criterion(logits, y) + (1 - mixed.lam) * criterion(logits, y[partner])
    assert torch.allclose(mixed.loss(criterion, logits), expected)


def test_cutmix_pastes_one_box_from_the_partner_and_weighs_by_its_area(batch):
    x, y = batch
    torch.manual_seed(5)
    mixed = BatchMix("cutmix", 1.0)(x, y)
    changed = (mixed.x != x).any(dim=1)  # [N, H, W]: pixels that came from the partner
    area = None
    for i in range(len(x)):
        rows, cols = torch.nonzero(changed[i], as_tuple=True)
        if len(rows) == 0:  # its partner is itself
            assert torch.equal(mixed.y_partner[i], y[i]) or area == 0
            continue
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        box = (bottom - top) * (right - left)
        assert area in (None, int(box))  # one box, the same for the whole batch
        area = int(box)
        assert len(rows) <= box and len(rows) > 0.9 * box  # a solid box (a few pixels may agree by chance)
    assert area is not None and mixed.lam == pytest.approx(1 - area / (x.shape[-2] * x.shape[-1]))
    assert batch_mix("none", 1.0) is None


def test_training_with_mixing_is_reproducible_and_differs_from_training_without(tiled):
    """train.mix draws from generators the run seeds and resumes: two runs are bit-identical, and not the run
    without mixing."""
    common = ["train.epochs=2", "train.max_steps_per_epoch=3", "train.deterministic=true", "augment.backend=torch"]
    for name, mix in (("cutmix-a", "cutmix"), ("cutmix-b", "cutmix"), ("mixup", "mixup"), ("no-mix", "none")):
        summary = run_train(config_for(tiled, name, *common, f"train.mix={mix}", "train.mix_alpha=1.0"))[0]
        assert summary["epochs"] == 2
    runs = tiled[1]
    assert final_digest(runs, "cutmix-a") == final_digest(runs, "cutmix-b")
    assert len({final_digest(runs, n) for n in ("cutmix-a", "mixup", "no-mix")}) == 3
