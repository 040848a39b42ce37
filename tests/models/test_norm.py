"""Normalisation layers by name (detkit/models/norm.py) and the transfer recipe that places them (conf/transfer/):
BatchNorm to GroupNorm keeps a pretrained encoder's affine parameters, each part takes its norm, the default parts
keep their parameter names (old checkpoints load), and ``transfer=ssl`` builds both detectors normalised throughout,
with GroupNorm below 16 images per device and BatchNorm from 16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from detkit.models.backbones import Backbone, ResNetEncoder, save_encoder
from detkit.models.detection.roi_heads import ConvFCHead, TwoMLPHead
from detkit.models.detection.rpn import RPNHead
from detkit.models.detection.yolo import DecoupledHead
from detkit.models.necks import FPN, PANNeck
from detkit.models.norm import batchnorm_to_groupnorm, group_count, norm2d
from detkit.paths import config_dir
from detkit.run_config import norm_for_batch
from detkit.structures import Targets


def _count(module: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


@pytest.mark.parametrize("channels, groups", [(512, 32), (128, 32), (64, 32), (96, 32), (48, 24), (40, 20),
                                             (72, 24), (32, 32), (24, 24), (3, 3)])
def test_group_count_is_the_largest_divisor_up_to_32(channels, groups):
    assert group_count(channels) == groups and channels % groups == 0


def test_norm2d_by_name():
    assert isinstance(norm2d("bn", 8), nn.BatchNorm2d)
    gn = norm2d("gn", 48)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 24
    assert isinstance(norm2d("none", 8), nn.Identity)
    with pytest.raises(ValueError, match="norm must be one of"):
        norm2d("layer", 8)


def test_norm_for_batch_switches_to_batchnorm_at_16_images_per_device():
    assert [norm_for_batch(b) for b in (1, 2, 8, 15, 16, 64)] == ["gn"] * 4 + ["bn"] * 2


def _encoder_with_distinct_affine(seed: int = 0) -> ResNetEncoder:
    torch.manual_seed(seed)
    enc = ResNetEncoder(depth=18)
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return enc


def test_batchnorm_to_groupnorm_replaces_every_batchnorm_and_keeps_each_affine():
    enc = _encoder_with_distinct_affine()
    before = {n: (m.weight.detach().clone(), m.bias.detach().clone(), m.num_features)
              for n, m in enc.named_modules() if isinstance(m, nn.BatchNorm2d)}
    enc.layer1.requires_grad_(False)  # a frozen stage stays frozen
    batchnorm_to_groupnorm(enc)
    after = {n: m for n, m in enc.named_modules() if isinstance(m, nn.GroupNorm)}
    assert _count(enc, nn.BatchNorm2d) == 0 and set(after) == set(before) and len(before) == 20
    for name, (w, b, c) in before.items():
        gn = after[name]
        assert gn.num_channels == c and torch.equal(gn.weight, w) and torch.equal(gn.bias, b), name
        assert gn.num_groups == 32, name  # ResNet-18's 64-512 channels: the paper's 32 groups
        assert gn.weight.requires_grad == (not name.startswith("layer1")), name


@pytest.mark.parametrize("kind", ["sync", "frozen"])
def test_batchnorm_to_groupnorm_refuses_the_batchnorms_it_would_get_wrong(kind):
    from detkit.models.backbones import FrozenBatchNorm2d

    bn = nn.SyncBatchNorm(8) if kind == "sync" else FrozenBatchNorm2d.from_batchnorm(nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match="cannot turn '1'"):
        batchnorm_to_groupnorm(nn.Sequential(nn.Conv2d(3, 8, 3), bn))


def test_backbone_gn_with_frozen_stages_freezes_their_weights_and_trains_the_rest():
    backbone = Backbone(levels=["c3", "c4", "c5"], neck="fpn", norm="gn", freeze_at=2)
    enc = backbone.encoder
    assert _count(backbone, nn.BatchNorm2d) == 0 and _count(enc, nn.GroupNorm) == 20
    for name, p in enc.named_parameters():
        assert p.requires_grad == (name.split(".")[0] not in ("conv1", "bn1", "layer1")), name


def test_a_groupnorm_encoder_normalises_each_image_alone():
    """What GroupNorm is for at small batches: an image's features do not depend on the other images of its batch
    (with BatchNorm in training mode they do)."""
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.rand(1, 3, 64, 64, generator=g) for _ in range(3))
    for to_gn, same in ((False, False), (True, True)):
        enc = _encoder_with_distinct_affine()
        if to_gn:
            batchnorm_to_groupnorm(enc)
        enc.train()
        with torch.no_grad():
            ab, ac = enc.features(torch.cat([a, b]))["c5"], enc.features(torch.cat([a, c]))["c5"]
        assert torch.allclose(ab[0], ac[0], atol=1e-5) == same


def test_backbone_gn_starts_from_the_encoder_files_affine(tmp_path):
    enc = _encoder_with_distinct_affine(seed=3)
    path = save_encoder(enc, tmp_path / "encoder.pt")
    backbone = Backbone(init=str(path), levels=["c2", "c3", "c4", "c5"], neck="fpn", norm="gn")
    assert _count(backbone.encoder, nn.BatchNorm2d) == 0
    assert torch.equal(backbone.encoder.layer3[1].bn2.weight, enc.layer3[1].bn2.weight)
    assert torch.equal(backbone.encoder.bn1.bias, enc.bn1.bias)
    assert torch.equal(backbone.encoder.layer2[0].conv1.weight, enc.layer2[0].conv1.weight)


def test_the_default_parts_keep_their_parameter_names():
    """norm "none" adds no module with parameters: checkpoints saved before the norm options still load."""
    fpn = FPN([64, 128], 32)
    assert sorted(fpn.state_dict()) == sorted(f"{k}.{i}.{p}" for k in ("lateral", "output") for i in range(2)
                                              for p in ("weight", "bias"))
    assert sorted(RPNHead(32, 6).state_dict()) == sorted(
        f"{k}.{p}" for k in ("conv", "cls_logits", "bbox_pred") for p in ("weight", "bias"))
    assert sorted(TwoMLPHead(32, 7).state_dict()) == ["fc6.bias", "fc6.weight", "fc7.bias", "fc7.weight"]


@pytest.mark.parametrize("norm, kind", [("bn", nn.BatchNorm2d), ("gn", nn.GroupNorm)])
def test_every_conv_of_a_normalised_part_is_followed_by_its_norm(norm, kind):
    parts = {"fpn": (FPN([64, 128, 256], 32, norm=norm), 6), "pan": (PANNeck([64, 128, 256], 32, norm=norm), 9),
             "rpn": (RPNHead(32, 6, norm=norm), 1), "yolo head": (DecoupledHead(32, 3, 3, norm=norm), 15),
             "box head": (ConvFCHead(32, 7, convs=4, fcs=1, norm=norm), 4)}
    for name, (part, n) in parts.items():
        assert _count(part, kind) == n, name
        other = nn.GroupNorm if kind is nn.BatchNorm2d else nn.BatchNorm2d
        assert _count(part, other) == 0, name
        # each normalised conv drops its bias (the norm's shift replaces it); the prediction convs keep theirs
        assert sum(isinstance(m, nn.Conv2d) and m.bias is None for m in part.modules()) == n, name


def test_conv_fc_head_shapes_and_its_4conv1fc_form():
    x = torch.randn(5, 32, 7, 7)
    head = ConvFCHead(32, 7, convs=4, conv_channels=16, fcs=1, hidden=24, norm="gn")
    assert head(x).shape == (5, 24) and head.fc_names == ["fc6"] and head.fc6.in_features == 16 * 49
    assert TwoMLPHead(32, 7, hidden=24)(x).shape == (5, 24)
    with pytest.raises(ValueError, match="at least one fully connected"):
        ConvFCHead(32, 7, fcs=0)


def _model(overrides: list[str]):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return cfg, instantiate(cfg.model, categories=[{"id": i, "name": str(i)} for i in range(3)], _recursive_=False)


@pytest.mark.parametrize("model", ["faster_rcnn", "yolo"])
def test_transfer_none_is_each_detectors_own_normalisation(model):
    cfg, module = _model([f"model={model}"])
    det = module.detector
    assert cfg.transfer.norm == "bn" and _count(det, nn.GroupNorm) == 0
    if model == "faster_rcnn":
        assert _count(det.backbone.neck, nn.BatchNorm2d) == 0 and isinstance(det.rpn.head.norm, nn.Identity)
        assert det.roi_heads.box_head.fc_names == ["fc6", "fc7"] and len(det.roi_heads.box_head.convs) == 0
    else:
        assert _count(det.backbone.neck, nn.BatchNorm2d) == 9 and _count(det.head, nn.BatchNorm2d) == 15


@pytest.mark.parametrize("batch, kind", [(2, nn.GroupNorm), (16, nn.BatchNorm2d)])
@pytest.mark.parametrize("model", ["faster_rcnn", "yolo"])
def test_transfer_ssl_normalises_encoder_neck_and_heads_by_the_per_device_batch(model, batch, kind):
    cfg, module = _model([f"model={model}", "transfer=ssl", f"data.batch_size={batch}"])
    det = module.detector
    other = nn.BatchNorm2d if kind is nn.GroupNorm else nn.GroupNorm
    assert _count(det, other) == 0, "every norm of the detector is the batch's choice"
    assert _count(det.backbone.encoder, kind) == 20
    if model == "faster_rcnn":
        assert _count(det.backbone.neck, kind) == 8  # 4 lateral + 4 output convs (c2-c5)
        assert isinstance(det.rpn.head.norm, kind)
        assert _count(det.roi_heads.box_head, kind) == 4 and det.roi_heads.box_head.fc_names == ["fc6"]
    else:
        assert _count(det.backbone.neck, kind) == 9 and _count(det.head, kind) == 15


@pytest.mark.parametrize("model", ["faster_rcnn", "yolo"])
def test_a_transfer_ssl_detector_trains_a_step(model):
    from tests.test_host_sync import batch
    _, module = _model([f"model={model}", "transfer=ssl", "data.batch_size=2",
                        "model.detector.backbone.neck_channels=32"])
    images, _ = batch()  # [2, 3, 192, 256]
    # boxes for each YOLO level (longer half-side < 64, 64-128, >= 128 px): every branch of every level has positives
    targets = Targets.from_list([
        {"boxes": torch.tensor([[10.0, 20, 100, 120], [20, 10, 200, 180], [0, 0, 256, 190]]),
         "labels": torch.tensor([0, 2, 1])},
        {"boxes": torch.tensor([[30.0, 30, 60, 50]]), "labels": torch.tensor([1])}])
    opt = torch.optim.SGD(module.detector.parameters(), lr=0.01)
    losses = module.detector.loss(images, targets, generator=module.sampling_generator(images.device))
    sum(losses.values()).backward()
    # every norm is in the path of the loss: each trainable tensor, the norms' scale and shift included, gets a gradient
    no_grad = [n for n, p in module.detector.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not no_grad, no_grad
    opt.step()
    assert torch.isfinite(torch.stack(list(losses.values()))).all()
    assert all(torch.isfinite(p).all() for p in module.detector.parameters())


GOLDEN = Path(__file__).parent / "data" / "default_state_dicts.json"


@pytest.mark.parametrize("model", ["faster_rcnn", "yolo"])
def test_the_default_detectors_parameter_names_and_shapes_are_pinned(model):
    """Checkpoints of earlier runs load only if the default detectors keep every parameter's name and shape. The
    file was written at the commit that added the norm options, from the defaults before them (the same names and
    shapes); change it only with a change that means to break old checkpoints:
    ``python -c "from tests.models.test_norm import write_golden; write_golden()"``."""
    expected = json.loads(GOLDEN.read_text())[model]
    assert _names_and_shapes(model) == expected


def _names_and_shapes(model: str) -> dict[str, list[int]]:
    _, module = _model([f"model={model}"])
    return {k: list(v.shape) for k, v in module.detector.state_dict().items()}


def write_golden() -> None:
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({m: _names_and_shapes(m) for m in ("faster_rcnn", "yolo")}, indent=0) + "\n")
