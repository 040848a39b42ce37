"""SimCLR views made on the device: the crop distribution is the CPU path's (torchvision's / albumentations'
random-resized-crop algorithm), every view draws its own parameters, a seed reproduces a batch, and pretraining runs
with data.augment_on=device."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from detkit.data.device_views import DeviceSimCLRViews, SourceImage, _hsv_to_rgb, _rgb_to_hsv, sample_crops


def test_crop_area_and_aspect_follow_the_random_resized_crop_distribution():
    torch.manual_seed(0)
    sizes = torch.tensor([[200.0, 120.0]]).repeat(4000, 1)
    boxes = sample_crops(sizes, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(1))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ours_area, ours_ratio = (w * h / (200 * 120)).numpy(), torch.log(w / h).numpy()
    ref = RandomResizedCrop(32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    img = torch.zeros(1, 120, 200)
    params = [ref.get_params(img, ref.scale, ref.ratio) for _ in range(4000)]
    ref_area = np.array([ph * pw / (200 * 120) for _, _, ph, pw in params])
    ref_ratio = np.log(np.array([pw / ph for _, _, ph, pw in params]))
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):  # the same distribution (torchvision rounds to whole pixels)
        assert abs(np.quantile(ours_area, q) - np.quantile(ref_area, q)) < 0.03, q
        assert abs(np.quantile(ours_ratio, q) - np.quantile(ref_ratio, q)) < 0.03, q
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 200 + 1e-3).all() and (boxes[:, 3] <= 120 + 1e-3).all()
    assert ours_ratio.min() >= math.log(3 / 4) - 1e-4 and ours_ratio.max() <= math.log(4 / 3) + 1e-4


def test_a_crop_that_never_fits_falls_back_to_the_whole_image_in_the_ratio_range():
    boxes = sample_crops(torch.tensor([[400.0, 20.0]]), (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    w, h = boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]
    assert h == pytest.approx(20.0) and w == pytest.approx(20.0 * 4 / 3)


def test_hsv_round_trip():
    x = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(_hsv_to_rgb(_rgb_to_hsv(x)), x, atol=1e-5, rtol=1e-5)


def test_views_are_independent_per_image_and_view_and_reproducible_from_a_seed():
    views = DeviceSimCLRViews(size=32)
    base = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)
    images = base.repeat(8, 1, 1, 1)  # the same picture 8 times
    sizes = torch.tensor([[64.0, 64.0]]).repeat(8, 1)
    out = views(images, sizes, torch.Generator().manual_seed(3))
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 255
    flat = out.flatten(1)
    distinct = torch.cdist(flat, flat) > 1.0
    assert distinct.sum() == 16 * 15  # every view of the same image differs from every other
    again = views(images, sizes, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, again)
    assert not torch.allclose(out, views(images, sizes, torch.Generator().manual_seed(4)))


def test_identity_settings_reproduce_a_plain_resize():
    views = DeviceSimCLRViews(size=16, crop_scale=(1.0, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0,
                              ratio=(1.0, 1.0))
    img = torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8)
    out = views(img, torch.tensor([[16.0, 16.0]] * 2), torch.Generator().manual_seed(0))
    for v in out:  # either the image or its mirror image
        assert min((v - img[0].float()).abs().max(), (v - img[0].float().flip(-1)).abs().max(),
                   (v - img[1].float()).abs().max(), (v - img[1].float().flip(-1)).abs().max()) < 1e-3


def test_source_image_letterboxes_and_reports_the_valid_size():
    img = np.full((50, 100, 3), 200, dtype=np.uint8)
    out, size = SourceImage(64)(img)
    assert out.shape == (3, 64, 64) and size.tolist() == [64.0, 32.0]
    assert out[:, :32].float().mean() == 200 and out[:, 32:].sum() == 0


def test_pretraining_runs_with_device_views(tmp_path):
    import lightning as L

    from detkit.data.datamodule import PretrainDataModule
    from detkit.data.synthetic import make_synthetic_coco
    from detkit.lit.pretrain_module import SimCLRModule

    _, root = make_synthetic_coco(tmp_path / "syn", num_images=8)
    dm = PretrainDataModule(str(root), image_size=32, batch_size=4, num_workers=0, augment_on="device")
    model = SimCLRModule(small_stem=True, proj_hidden=64, proj_dim=32)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 and math.isfinite(float(trainer.callback_metrics["pretrain/loss"]))


def test_device_views_read_nothing_back_to_the_host():
    from detkit.host_sync import HostSyncCounter

    views = DeviceSimCLRViews(size=32, solarize_p=0.2)
    images = torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8)
    sizes = torch.tensor([[64.0, 48.0]] * 4)
    g = torch.Generator().manual_seed(0)
    with HostSyncCounter() as sync:
        views(images, sizes, g)
    assert sync.total == 0, dict(sync.counts)
