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
    img[:, :, 0] = np.arange(100, dtype=np.uint8)  # a ramp along x: the repeated last row keeps it
    out, size = SourceImage(64)(img)
    assert out.shape == (3, 64, 64) and size.tolist() == [64.0, 32.0]
    assert (out[1:, :32] == 200).all() and (out[:, 32:] == out[:, 31:32]).all()  # padding repeats the last row


def test_pretraining_with_device_views_trains_on_two_distinct_views_of_every_image(tmp_path):
    """Through Lightning: the batches the training step sees are two views per image made on the device, of the
    view size, in pixel range, each view distinct from every other in the step and from the previous step's."""
    import lightning as L

    from detkit.data.datamodule import PretrainDataModule
    from detkit.data.synthetic import make_synthetic_coco
    from detkit.lit.pretrain_module import SimCLRModule

    class Record(L.Callback):
        def __init__(self) -> None:
            self.batches = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.batches.append(tuple(t.clone() for t in batch))

    _, root = make_synthetic_coco(tmp_path / "syn", num_images=8)
    dm = PretrainDataModule(str(root), image_size=32, batch_size=4, num_workers=0, augment_on="device")
    model = SimCLRModule(small_stem=True, proj_hidden=64, proj_dim=32)
    record = Record()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[record])
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 and math.isfinite(float(trainer.callback_metrics["pretrain/loss"]))
    views = []
    for v1, v2 in record.batches:
        assert v1.shape == v2.shape == (4, 3, 32, 32) and v1.dtype == torch.float32
        assert 0 <= float(torch.cat([v1, v2]).min()) and float(torch.cat([v1, v2]).max()) <= 255
        views += [v1, v2]
    flat = torch.cat(views).flatten(1)
    assert len(torch.unique(flat, dim=0)) == len(flat) == 16


def test_device_views_read_nothing_back_to_the_host():
    from detkit.host_sync import HostSyncCounter

    views = DeviceSimCLRViews(size=32, solarize_p=0.2)
    images = torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8)
    sizes = torch.tensor([[64.0, 48.0]] * 4)
    g = torch.Generator().manual_seed(0)
    with HostSyncCounter() as sync:
        views(images, sizes, g)
    assert sync.total == 0, dict(sync.counts)


def _plain_views(size: int, **kw) -> DeviceSimCLRViews:
    """Crops and flips only: what is left in a view is the crop-and-resize itself."""
    return DeviceSimCLRViews(size=size, jitter_p=0.0, gray_p=0.0, blur_p=0.0, **kw)


def test_views_of_a_letterboxed_image_never_show_the_padding():
    """A 40 x 23 noise image placed in a 64 px source canvas: its views (crops up to the valid area's edge,
    upsampled to 32 px) equal the views of the bare image drawn with the same generator, where there is nothing
    beyond the edge to sample. Padding that bleeds in, or a crop that reaches past the valid area, would differ."""
    image = np.random.default_rng(0).integers(0, 256, (23, 40, 3), dtype=np.uint8)
    src, size = SourceImage(64)(image)
    bare = torch.from_numpy(image).permute(2, 0, 1)
    views = _plain_views(32, crop_scale=(0.08, 1.0))
    on_canvas = views(src[None].repeat(64, 1, 1, 1), size[None].repeat(64, 1), torch.Generator().manual_seed(0))
    alone = views(bare[None].repeat(64, 1, 1, 1), size[None].repeat(64, 1), torch.Generator().manual_seed(0))
    torch.testing.assert_close(on_canvas, alone, atol=1e-3, rtol=0)
    plain_zero_pad = torch.zeros_like(src)
    plain_zero_pad[:, :23, :40] = bare  # the old letterbox: black beyond the image
    padded = views(plain_zero_pad[None].repeat(64, 1, 1, 1), size[None].repeat(64, 1), torch.Generator().manual_seed(0))
    assert (padded - alone).abs().amax() > 10  # the comparison can tell padding from image


def test_the_source_is_never_upsampled():
    """A 32 px image in a 64 px source keeps its own pixels (valid size 32 x 32, pixels unchanged), and a view at
    the image's own size with the whole image as crop is the image, not a resampled copy."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    src, size = SourceImage(64)(image)
    assert size.tolist() == [32.0, 32.0]
    assert torch.equal(src[:, :32, :32], torch.from_numpy(image).permute(2, 0, 1))
    views = _plain_views(32, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0))
    out = views(src[None].repeat(4, 1, 1, 1), size[None].repeat(4, 1), torch.Generator().manual_seed(0))
    ref = torch.from_numpy(image).permute(2, 0, 1).float()
    for v in out:
        assert min((v - ref).abs().max(), (v - ref.flip(-1)).abs().max()) < 1e-3


def test_a_large_image_is_shrunk_to_fit_the_source():
    image = np.full((300, 120, 3), 90, dtype=np.uint8)
    src, size = SourceImage(64)(image)
    assert src.shape == (3, 64, 64) and size.tolist() == [26.0, 64.0]
    assert (src[:, :, :26] == 90).all()


def test_small_views_default_to_no_blur_like_the_cpu_path():
    from detkit.data.unlabeled import SimCLRViews

    assert DeviceSimCLRViews(size=32).blur_p == SimCLRViews(32).blur_p == 0.0
    assert DeviceSimCLRViews(size=96).blur_p == SimCLRViews(96).blur_p == 0.5
    assert DeviceSimCLRViews(size=32, blur_p=0.3).blur_p == 0.3


def test_every_micro_batch_and_every_rank_draws_its_own_views(tmp_path):
    """With gradient accumulation the micro-batches of one optimiser step, and under DDP the ranks, must not share
    a generator seed (a seed of data seed and global step alone repeats across both)."""
    import lightning as L

    from detkit.data.datamodule import PretrainDataModule
    from detkit.data.device_views import device_view_seed
    from detkit.lit.pretrain_module import SimCLRModule

    seeds = {device_view_seed(0, b, r) for b in range(64) for r in range(8)}
    assert len(seeds) == 64 * 8 and device_view_seed(0, 3, 1) == device_view_seed(0, 3, 1)

    class Record(L.Callback):
        def __init__(self) -> None:
            self.views = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.views.append(batch[0].clone())

    import cv2

    root = tmp_path / "copies"  # the same image in every batch of one: a repeated seed would repeat the views
    root.mkdir()
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for i in range(4):
        cv2.imwrite(str(root / f"{i}.png"), image)
    dm = PretrainDataModule(str(root), image_size=32, batch_size=1, num_workers=0, augment_on="device")
    record = Record()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[record])
    trainer.fit(SimCLRModule(small_stem=True, proj_hidden=32, proj_dim=16), datamodule=dm)
    assert len(record.views) == 4
    assert len(torch.unique(torch.cat(record.views).flatten(1), dim=0)) == 4
