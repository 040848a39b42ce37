"""Backbone freezing: what `norm` and `freeze_at` promise must hold whatever mode a trainer leaves the modules in."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from detkit.models.backbones import Backbone, FrozenBatchNorm2d, ResNetEncoder


def _stats(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in backbone.state_dict().items() if "running_" in k}


def _images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255


def test_bn_updates_statistics_in_training_mode():
    backbone = Backbone(levels=["c5"], neck="none", norm="bn").train()
    before = _stats(backbone)
    backbone(_images())
    assert any(not torch.equal(before[k], v) for k, v in _stats(backbone).items())


@pytest.mark.parametrize("norm", ["frozen_stats", "frozen"])
def test_frozen_norm_keeps_statistics_even_in_training_mode(norm):
    backbone = Backbone(levels=["c5"], neck="none", norm=norm)
    backbone.train()  # what a trainer does; the statistics must not move anyway
    before = _stats(backbone)
    out = backbone(_images())["c5"]
    after = _stats(backbone)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # training-mode output equals eval-mode output: the stored statistics normalise
    assert torch.allclose(out, backbone.eval()(_images())["c5"])


def test_frozen_stats_trains_the_affine_parameters_and_frozen_does_not():
    fs = Backbone(levels=["c5"], neck="none", norm="frozen_stats")
    fz = Backbone(levels=["c5"], neck="none", norm="frozen")
    fs(_images())["c5"].sum().backward()
    assert fs.encoder.bn1.weight.requires_grad and fs.encoder.bn1.weight.grad is not None
    assert not fz.encoder.bn1.weight.requires_grad and not fz.encoder.layer4[1].bn2.bias.requires_grad
    assert fz.encoder.conv1.weight.requires_grad  # only normalisation is frozen


def test_frozen_norm_keeps_the_state_dict_keys_of_the_encoder():
    assert Backbone(norm="frozen").state_dict().keys() == Backbone(norm="bn").state_dict().keys()
    assert set(ResNetEncoder().state_dict()) <= {k.removeprefix("encoder.") for k in Backbone(norm="frozen").state_dict()}


def test_freeze_at_freezes_weights_and_statistics_of_the_early_stages_only():
    backbone = Backbone(levels=["c5"], neck="none", freeze_at=2).train()  # stem + layer1
    enc = backbone.encoder
    assert not any(p.requires_grad for m in (enc.conv1, enc.bn1, enc.layer1) for p in m.parameters())
    assert all(p.requires_grad for p in enc.layer2.parameters())
    before = _stats(backbone)
    backbone(_images())
    after = _stats(backbone)
    frozen = [k for k in before if k.startswith(("encoder.bn1.", "encoder.layer1."))]
    moving = [k for k in before if k.startswith("encoder.layer2.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert moving and any(not torch.equal(before[k], after[k]) for k in moving)


class _Fit(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone(levels=["c5"], neck="none", norm="frozen_stats")

    def training_step(self, batch, batch_idx):
        return self.backbone(batch[0])["c5"].square().mean()

    def validation_step(self, batch, batch_idx):
        self.backbone(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_frozen_stats_hold_through_a_lightning_fit_with_validation():
    """Lightning keeps and restores each module's own train/eval mode; freezing must not depend on `.eval()`."""
    module = _Fit()
    before = _stats(module.backbone)
    weight = module.backbone.encoder.bn1.weight.detach().clone()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(_images()), batch_size=2)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data, data)
    after = _stats(module.backbone)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(weight, module.backbone.encoder.bn1.weight)  # the affine part did train
    assert isinstance(module.backbone.encoder.bn1, FrozenBatchNorm2d)


@pytest.mark.parametrize("options", [{"norm": "frozen_stats"}, {"norm": "frozen"}, {"freeze_at": 3}])
def test_frozen_norms_survive_the_sync_batchnorm_conversion_of_ddp(options):
    """`trainer=ddp` sets sync_batchnorm, and Lightning then runs SyncBatchNorm.convert_sync_batchnorm, which
    turns every _BatchNorm into a trainable SyncBatchNorm: frozen layers must not be among them."""
    backbone = Backbone(levels=["c5"], neck="none", **options)
    frozen_before = {n for n, m in backbone.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    assert frozen_before
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    frozen_after = {n for n, m in converted.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    assert frozen_after == frozen_before
    synced = {n for n, m in converted.named_modules() if isinstance(m, nn.SyncBatchNorm)}
    assert not synced & frozen_before
    assert bool(synced) == ("freeze_at" in options)  # the stages left trainable still synchronise
    # a training step of the converted model (SyncBatchNorm runs as plain BatchNorm without a process group)
    # leaves the frozen statistics where they were, while the synchronised ones move
    converted.train()
    before = {k: v.clone() for k, v in converted.state_dict().items() if "running_" in k}
    opt = torch.optim.SGD([p for p in converted.parameters() if p.requires_grad], lr=0.1)
    converted(_images())["c5"].square().mean().backward()
    opt.step()
    after = converted.state_dict()
    frozen_keys = [k for k in before if k.rsplit(".", 1)[0] in frozen_before]
    assert frozen_keys and all(torch.equal(before[k], after[k]) for k in frozen_keys)
    assert all(not torch.equal(before[k], after[k]) for k in before if k not in frozen_keys)


@pytest.mark.parametrize("kwargs", [{}, {"levels": ["c4"], "neck": "none"}, {"extra_pool": True},
                                    {"neck": "pan", "small_stem": True}, {"levels": ["c2", "c3"], "neck": "fpn"}])
def test_backbone_strides_are_known_before_it_is_built(kwargs):
    """The anchor fit reads the strides from Backbone.strides_for, which must equal what the built backbone has."""
    from detkit.models.backbones import Backbone

    assert Backbone.strides_for(**kwargs, depth=18, init=None) == Backbone(**kwargs).strides
