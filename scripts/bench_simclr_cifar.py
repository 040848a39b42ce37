"""SimCLR on CIFAR-10 images (labels ignored), measured by kNN and linear probe against a random encoder and raw
pixels, in one run.

    python scripts/bench_simclr_cifar.py [--epochs 10] [--crop-min 0.08] [--temperature 0.2] [--small-stem]
                                         [--out runs/bench_simclr_cifar]

Needs ../shared/datasets/cifar10 (train/ and test/ ImageFolder trees, 32x32 JPEG). Pretrains a ResNet-18
(ImageNet stem by default; ``--small-stem`` for the 3x3 stem, ~7x slower on CPU) with ``detkit-pretrain`` on
cifar10/train, then runs ``detkit-probe`` on (bank = cifar10/train, queries = cifar10/test) for the pretrained
encoder, a randomly initialised one of the same architecture, and raw pixels.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10"
BIN = Path(sys.executable).parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--small-stem", action="store_true",
                   help="3x3/1 stem without max-pool (7x slower on CPU at 32 px; the default keeps the ImageNet stem)")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--crop-min", type=float, default=0.08, help="smallest random-resized-crop area fraction")
    p.add_argument("--cifar", default=str(CIFAR))
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_simclr_cifar"))
    args = p.parse_args()
    out = Path(args.out)
    cmd = [str(BIN / "detkit-pretrain"), f"data.images={args.cifar}/train", f"data.image_size={args.image_size}", "data.blur_p=0.0",
           f"data.batch_size={args.batch_size}", f"data.knn_train={args.cifar}/train", f"data.knn_val={args.cifar}/test",
           "data.knn_per_class=100", f"model.small_stem={str(args.small_stem).lower()}",
           f"model.temperature={args.temperature}", f"data.crop_scale=[{args.crop_min},1.0]",
           f"trainer.max_epochs={args.epochs}",
           f"hydra.run.dir={out}"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    pre = json.loads((out / "pretrain_metrics.json").read_text())
    rows = []
    for flag in ([], ["--random"], ["--pixels"]):
        probe = [str(BIN / "detkit-probe"), str(out / "encoder.pt"), f"{args.cifar}/train", f"{args.cifar}/test",
                 f"--size={args.image_size}", *flag]
        rows.append(json.loads(subprocess.run(probe, check=True, capture_output=True, text=True).stdout))
    stem = "small stem" if args.small_stem else "ImageNet stem"
    print(f"\nSimCLR ResNet-18 ({stem}, {args.image_size} px), CIFAR-10 train 10,000 images, {pre['epochs']} epochs, batch "
          f"{args.batch_size}, crop scale {args.crop_min}-1, temperature {args.temperature}: "
          f"{pre['wall_time_s']:.0f} s, {pre['images_per_s']:.1f} images/s, final loss "
          f"{pre.get('pretrain/loss', float('nan')):.3f}")
    print("| encoder | kNN top-1 (k=20) | kNN top-1 (k=1) | linear probe top-1 |")
    print("| --- | --- | --- | --- |")
    for name, r in zip(("SimCLR (detkit)", "random init, same architecture", "raw pixels"), rows):
        print(f"| {name} | {r['knn_top1']:.4f} | {r['knn_top1_k1']:.4f} | {r['linear_probe_top1']:.4f} |")


if __name__ == "__main__":
    main()
