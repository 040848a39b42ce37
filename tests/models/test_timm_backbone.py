"""Backbone inits (issue 31): ImageNet weights through torchvision's cache (a local file here: no download in tests),
torchvision-format state dicts, and timm backbones (random init) in both detectors, SimCLR, the encoder-file
hand-off, freezing by stage, predict and ONNX export."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from detkit.models.backbones import IMAGENET_WEIGHTS, Backbone, EncoderLoadError, ResNetEncoder, save_encoder
from detkit.paths import config_dir
from tests.helpers import data_args


def _torchvision_cache(tmp_path: Path, monkeypatch, depth: int = 18) -> tuple[Path, dict]:
    """A torchvision-format ResNet state dict placed where torchvision's download would cache it."""
    from torchvision.models import resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(3)
    # as torchvision's IMAGENET1K_V1 files: saved before BatchNorm had a num_batches_tracked buffer
    state = {k: v for k, v in resnet18(weights=None).state_dict().items() if not k.endswith("num_batches_tracked")}
    name = Path(IMAGENET_WEIGHTS[depth].url).name
    target = tmp_path / "torch" / "hub" / "checkpoints" / name
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    return target, state


def _no_network(*args, **kwargs):
    raise URLError("[Errno -3] Temporary failure in name resolution")


def test_init_imagenet_loads_torchvision_weights_from_its_cache_with_their_normalisation(tmp_path, monkeypatch,
                                                                                          caplog):
    target, state = _torchvision_cache(tmp_path, monkeypatch)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)  # present in the cache: never downloaded
    with caplog.at_level(logging.INFO):
        backbone = Backbone(depth=18, init="imagenet")
    own = backbone.encoder.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert "keys matched" in caplog.text
    meta = IMAGENET_WEIGHTS[18].transforms()
    torch.testing.assert_close(own["pixel_mean"].flatten(), 255 * torch.tensor(meta.mean))
    torch.testing.assert_close(own["pixel_std"].flatten(), 255 * torch.tensor(meta.std))
    # init=PATH: the same file as a torchvision state dict, without the cache
    from_path = Backbone(depth=18, init=str(target))
    assert all(torch.equal(from_path.encoder.state_dict()[k], v) for k, v in own.items())
    # the cached file is read with the restricted unpickler: a file that would run code on loading is refused
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"conv1.weight": Payload()}, target)
    with pytest.raises(EncoderLoadError, match="is not the ResNet18_Weights"):
        Backbone(depth=18, init="imagenet")
    # one override on the command line's config
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["init=imagenet", "model=yolo", "paths.output_dir=/tmp/x"])
    assert cfg.model.detector.backbone.init == "imagenet"


def test_init_imagenet_offline_names_the_file_its_url_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    weights = IMAGENET_WEIGHTS[18]
    with pytest.raises(EncoderLoadError) as e:
        Backbone(depth=18, init="imagenet")
    text = str(e.value)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert weights.url in text and str(folder / Path(weights.url).name) in text
    assert "ResNet18_Weights.IMAGENET1K_V1" in text and "init=PATH" in text
    with pytest.raises(EncoderLoadError, match="small_stem=false"):
        Backbone(depth=18, small_stem=True, init="imagenet")


def test_a_state_dict_that_does_not_fit_lists_its_keys(tmp_path):
    from torchvision.models import resnet34

    torch.save(resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(EncoderLoadError, match=r"does not fit the encoder: missing keys \[\].*unexpected keys "
                                               r"\['layer1.2.bn1.bias'"):
        Backbone(depth=18, init=str(tmp_path / "r34.pth"))


def test_freeze_by_stage_name_works_for_resnets_too():
    from detkit.lit.detection_module import freeze_parameters

    backbone = Backbone(levels=["c5"], neck="none")
    assert freeze_parameters(backbone, ["encoder.stem"]) == 3
    assert not backbone.encoder.conv1.weight.requires_grad and backbone.encoder.layer1[0].conv1.weight.requires_grad


# ---- timm ---------------------------------------------------------------------------------------------------------

FAMILIES = ["convnext_atto", "mobilenetv3_small_050", "cs3darknet_focus_s"]
FAST_FRCNN = ["model.detector.rpn.pre_nms_top_n={train:100,test:100}",
              "model.detector.rpn.post_nms_top_n={train:50,test:50}", "model.detector.roi_heads.box_head.hidden=32",
              "model.detector.roi_heads.sampler.batch_size_per_image=32"]


def _compose(synthetic, model: str, name: str, *overrides: str):
    ann, root = synthetic
    backbone = "timm" if model == "faster_rcnn" else "timm_pan"
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("train", overrides=[
            *data_args(ann, root), "data.image_size=64", "data.batch_size=2", "data.num_workers=0",
            "paths.output_dir=/tmp/x", f"model={model}", f"backbone@model.detector.backbone={backbone}",
            f"model.detector.backbone.name={name}", "model.detector.backbone.neck_channels=32",
            *(FAST_FRCNN if model == "faster_rcnn" else ["model.ema_decay=null"]), *overrides])


@pytest.mark.parametrize("name", FAMILIES)
def test_a_timm_family_pretrains_hands_off_trains_both_detectors_predicts_and_exports(synthetic, tmp_path, name):
    pytest.importorskip("timm")
    from detkit.lit.pretrain_module import SimCLRModule
    from tests.helpers import fit_steps

    # SimCLR: one optimiser step of the timm encoder + projector
    torch.manual_seed(0)
    simclr = SimCLRModule(timm=name, proj_hidden=32, proj_dim=16)
    assert simclr.encoder.arch == {"timm": name}
    views = torch.randint(0, 256, (2, 2, 3, 32, 32), dtype=torch.uint8).float()
    opt = torch.optim.SGD(simclr.parameters(), lr=1e-3)  # small: saturated detector scores would tie in NMS
    before = {k: v.clone() for k, v in simclr.encoder.state_dict().items()}
    loss = simclr.training_step((views[0], views[1]), 0)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and any(not torch.equal(before[k], v) for k, v in simclr.encoder.state_dict().items())
    path = save_encoder(simclr.encoder, tmp_path / "encoder.pt", {"method": "simclr"})
    exported = False
    for model in ("faster_rcnn", "yolo"):
        # the hand-off: every encoder key matched, weights equal
        # YOLO keeps every candidate (no cap, scores low enough that nothing saturates): ONNX vs predict box by box
        keep_all = ["model.detector.inference.score_thresh=1e-6", "model.detector.inference.detections_per_img=300"]
        cfg = _compose(synthetic, model, name, f"model.detector.backbone.init={path}", "model.backbone_lr_mult=0.5",
                       *(keep_all if model == "yolo" else []))
        module, trainer = fit_steps(cfg, steps=1)
        assert trainer.global_step == 1
        groups = trainer.optimizers[0].param_groups
        encoder_params = {id(p) for p in module.detector.backbone.encoder.parameters()}
        lrs = {g["lr"] for g in groups if any(id(p) in encoder_params for p in g["params"])}
        assert len(lrs) == 1 and lrs.pop() == pytest.approx(0.5 * max(g["lr"] for g in groups))
        # predict on the trained model
        module.eval()
        images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
        with torch.no_grad():
            dets = module.inference_model.predict(images)
        assert dets.boxes.shape[0] == 2 and torch.isfinite(dets.boxes).all()
        if model == "yolo":  # the YOLO graph (about 10 s to export; Faster R-CNN's heads are tested elsewhere)
            ort = pytest.importorskip("onnxruntime")
            pytest.importorskip("onnxscript")
            from detkit.export import export_onnx
            from tests.test_export import assert_same_detections

            onnx_path = export_onnx(module, tmp_path / f"{model}.onnx", image_size=64, dynamic_batch=False)
            session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            with torch.no_grad():
                one = module.inference_model.predict(images[:1])
            assert assert_same_detections(one, session.run(None, {"images": images[:1].numpy()})) > 0
            exported = True
    # the hand-off is strict: loaded weights equal the file's; another architecture is refused by name
    fresh = instantiate(_compose(synthetic, "faster_rcnn", name, f"model.detector.backbone.init={path}").model,
                        categories=[{"id": 1, "name": "a"}], _recursive_=False)
    own = fresh.detector.backbone.encoder.state_dict()
    assert all(torch.equal(own[k], v) for k, v in simclr.encoder.state_dict().items())
    other = FAMILIES[(FAMILIES.index(name) + 1) % len(FAMILIES)]
    with pytest.raises(Exception, match="holds a timm encoder .* set model.detector.backbone.name"):
        instantiate(_compose(synthetic, "yolo", other, f"model.detector.backbone.init={path}").model,
                    categories=[{"id": 1, "name": "a"}], _recursive_=False)
    assert exported


def test_timm_freezing_by_stage_norms_and_sync_batchnorm(synthetic):
    pytest.importorskip("timm")
    from detkit.models.backbones import FrozenBatchNorm2d
    from detkit.models.timm_backbone import TimmBackbone

    cfg = _compose(synthetic, "yolo", "mobilenetv3_small_050", "model.detector.backbone.freeze_at=2",
                   "model.freeze=[backbone.encoder.layer3]")
    module = instantiate(cfg.model, categories=[{"id": 1, "name": "a"}], _recursive_=False)
    encoder = module.detector.backbone.encoder
    stages = encoder.stage_parameters()
    params = dict(encoder.named_parameters())
    assert all(stages.values())  # every stage holds parameters
    for stage, names in stages.items():
        frozen = stage in ("stem", "layer1", "layer3")
        assert all(params[n].requires_grad != frozen for n in names), stage
    # frozen stages keep their BatchNorm statistics in training mode; the others move
    backbone = TimmBackbone("mobilenetv3_small_050", levels=["c3", "c4", "c5"], neck="pan", neck_channels=16,
                            freeze_at=2).train()
    stats = {k: v.clone() for k, v in backbone.state_dict().items() if "running_mean" in k and "encoder." in k}
    backbone(torch.rand(2, 3, 64, 64) * 255)
    after = backbone.state_dict()
    stage_of = {f"encoder.body.{m}.running_mean": s for m, s in backbone.encoder.stage_of.items()}
    assert all(torch.equal(stats[k], after[k]) == (stage_of[k] < 2) for k in stats)
    # norm=frozen_stats: every BatchNorm (timm's fused BatchNormAct2d too) keeps its statistics, affine trains
    fs = TimmBackbone("cs3darknet_focus_s", neck="fpn", neck_channels=16, norm="frozen_stats").train()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fs.encoder.modules())
    assert all(m.weight.requires_grad for m in fs.encoder.modules() if isinstance(m, FrozenBatchNorm2d))
    # DDP's SyncBatchNorm conversion keeps timm's activations (BatchNormAct2d is split into BatchNorm + act)
    plain = TimmBackbone("cs3darknet_focus_s", neck="fpn", neck_channels=16).eval()
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(TimmBackbone("cs3darknet_focus_s", neck="fpn",
                                                                        neck_channels=16)).eval()
    synced.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        torch.testing.assert_close(synced(x)["p5"], plain(x)["p5"])


def test_timm_init_imagenet_offline_is_one_clear_error(monkeypatch):
    timm = pytest.importorskip("timm")
    from detkit.models.timm_backbone import TimmBackbone

    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(EncoderLoadError, match=r"timm/convnext_atto\.d2_in1k.*init=PATH"):
        TimmBackbone("convnext_atto", init="imagenet")


def test_the_study_and_sweep_accept_an_imagenet_arm(tmp_path):
    from detkit.cli.study import aggregate, finetune_command, table
    from tests.cli.test_study import _fake_sweep

    cmd = finetune_command(tmp_path, tmp_path / "encoder.pt", 1, ["trainer=gpu"], imagenet=True)
    assert "init=scratch,simclr,imagenet" in cmd and "trainer=gpu" in cmd
    assert "init=scratch,simclr,imagenet" not in finetune_command(tmp_path, tmp_path / "e.pt", 1, [])
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=study_bccd", "init=imagenet", "encoder=/x/encoder.pt"])
    assert cfg.model.detector.backbone.init == "imagenet"
    study = _fake_sweep(tmp_path, {("yolo", "scratch", "1.0", 0): 0.3, ("yolo", "imagenet", "1.0", 0): 0.5,
                                   ("yolo", "simclr", "1.0", 0): 0.4})
    md = table(aggregate(study / "finetune" / "summary.csv"))
    assert "| yolo | imagenet | 100% | 1 |" in md and "| +0.200 |" in md
