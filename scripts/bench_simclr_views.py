"""SimCLR view making alone: albumentations one image at a time (what each loader worker does, data.augment_on=cpu)
against detkit's batched device views (data.augment_on=device) on the same decoded images, views/s.

    python scripts/bench_simclr_views.py [--size 32] [--batch 512] [--device cpu|cuda] [--threads 2]

Images: cifar10/train JPEGs (../shared/datasets) or, without them, BCCD from data/. The CPU path is timed in this
process on one core (a loader with W workers makes about W times as many); the device path includes the
host-to-device copy of the letterboxed uint8 batch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from detkit.data.coco import read_rgb
    from detkit.data.device_views import DeviceSimCLRViews, SourceImage
    from detkit.data.unlabeled import SimCLRViews, list_images

    cifar = ROOT.parent / "shared" / "datasets" / "cifar10" / "train"
    files = list_images(cifar if cifar.is_dir() else ROOT / "data" / "bccd" / "images")[: args.batch]
    images = [read_rgb(f) for f in files]
    n = len(images)
    cpu_views = SimCLRViews(args.size, blur_p=0.0)
    t = time.perf_counter()
    for i, im in enumerate(images):
        cpu_views(im, seed=i)
    cpu_rate = 2 * n / (time.perf_counter() - t)
    source = SourceImage(args.size if cifar.is_dir() else 2 * args.size)
    batch = [source(im) for im in images]
    x, sizes = torch.stack([b[0] for b in batch]).pin_memory() if args.device == "cuda" else \
        torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
    dev = torch.device(args.device)
    views = DeviceSimCLRViews(args.size, blur_p=0.0)
    g = torch.Generator(device=dev).manual_seed(0)
    views(x.to(dev), sizes.to(dev), g)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.reps):
        out = views(x.to(dev, non_blocking=True), sizes.to(dev), g)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dev_rate = 2 * n * args.reps / (time.perf_counter() - t)
    print(f"{n} images -> {args.size} px views, torch {torch.__version__}, {args.threads} threads, {args.device}")
    print("| path | views/s |\n| --- | --- |")
    print(f"| albumentations, one image at a time (one worker) | {cpu_rate:.0f} |")
    print(f"| detkit device views, batch of {n} on {args.device} | {dev_rate:.0f} |")
    print(f"| ratio | {dev_rate / cpu_rate:.1f}x |")
    assert np.isfinite(out.sum().item())


if __name__ == "__main__":
    main()
