"""detkit's SimCLR against lightly's on the same images, encoder, schedule and view recipe, probed the same way.

    python scripts/bench_simclr_peer.py [--per-class 100] [--epochs 3] [--batch-size 128] [--augment-on cpu|device]
                                        [--device cpu|cuda] [--impls detkit,lightly,random,lightly_detkit_views]
                                        [--stem small|standard]
                                        [--no-probe]   # throughput only: no test images needed

Both train detkit's ResNet-18 encoder (3x3 stem for 32 px, or ``--stem standard``: torchvision's 7x7/2 stem and
max-pool, 16x fewer FLOPs, for CPU-scale runs) + a 512-512-128 projector (Linear-BN-ReLU-Linear-BN, lightly's
``SimCLRProjectionHead`` and detkit's ``Projector``) with NT-Xent (temperature
0.2) on the first ``--per-class`` images of each class of cifar10/train (labels unused), SGD momentum 0.9,
lr 0.6 x batch / 256, weight decay 1e-4 (none on norms and biases), 10% warm-up + cosine, the SimCLR views at
32 px (crop 0.08-1, flip, colour jitter 0.4/0.4/0.4/0.1 p 0.8, grayscale 0.2, no blur at 32 px). detkit runs its
own ``SimCLRModule`` under Lightning (views on the CPU workers or on the device, ``--augment-on``); lightly runs
its ``SimCLRTransform``, ``SimCLRProjectionHead`` and ``NTXentLoss`` in a plain PyTorch loop (as its tutorials
do) with the same loader settings. Each runs in its own process; then ``detkit-probe`` measures both encoders
(kNN k=20 and k=1, linear probe) on cifar10/train -> cifar10/test; the ``random`` arm probes the same encoder
untrained (the floor both must clear); the ``lightly_detkit_views`` arm is lightly's loop, head and loss fed by
detkit's ``SimCLRViews`` (the view swap: it lands near lightly when the views are not the cause). lightly is a benchmark-only dependency (``pip install lightly``), never one
of detkit's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10"
BIN = Path(sys.executable).parent


def subset(train_dir: Path, per_class: int, out: Path) -> Path:
    """A copy of the first ``per_class`` images of each class (copies, not links: detkit reads no file outside the
    folder it is given, and a link into ../shared points outside)."""
    for cls in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        (out / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[:per_class]:
            if not (out / cls.name / f.name).exists():
                shutil.copyfile(f, out / cls.name / f.name)
    return out


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_detkit(args, images: Path, out: Path) -> dict:
    import lightning as L

    from detkit.data.datamodule import PretrainDataModule
    from detkit.lit.pretrain_module import SimCLRModule
    from detkit.models.backbones import save_encoder

    L.seed_everything(args.seed, workers=True)
    dm = PretrainDataModule(str(images), image_size=args.size, crop_scale=(0.08, 1.0), blur_p=0.0,
                            batch_size=args.batch_size, num_workers=args.workers, augment_on=args.augment_on,
                            seed=args.seed)
    model = SimCLRModule(depth=18, small_stem=args.stem == "small", proj_hidden=512, proj_dim=128, temperature=args.temperature,
                         optimizer={"_target_": "torch.optim.SGD", "lr": args.lr, "momentum": 0.9,
                                    "weight_decay": 1e-4}, scale_lr=True)  # schedule: 10% warm-up, cosine to 0
    trainer = L.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_epochs=args.epochs,
                        precision=args.precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    wall = time.perf_counter() - start
    save_encoder(model.encoder, out / "detkit_encoder.pt", {"method": "simclr", "impl": "detkit"})
    return {"impl": f"detkit ({args.augment_on} views)", "wall_s": wall,
            "img_s": trainer.global_step * args.batch_size / wall, "peak_mb": peak_memory_mb(args.device),
            "final_loss": float(trainer.callback_metrics["pretrain/loss"]), "encoder": str(out / "detkit_encoder.pt")}


def run_lightly(args, images: Path, out: Path, views: str = "lightly") -> dict:
    """lightly's loop, head and loss; ``views="detkit"`` swaps its ``SimCLRTransform`` for detkit's ``SimCLRViews``
    (the view-swap arm: which side of the gap the views are on)."""
    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform

    from detkit.lit.optim import WarmupSchedule, param_groups
    from detkit.models.backbones import ResNetEncoder, save_encoder

    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    transform = SimCLRTransform(input_size=args.size, cj_prob=0.8, cj_strength=0.5, min_scale=0.08,
                                random_gray_scale=0.2, gaussian_blur=0.0, normalize=None)
    if views == "detkit":
        from detkit.data.unlabeled import SimCLRViews, UnlabeledImages

        # detkit's item seeds come from each epoch's worker base seed: workers must not persist across epochs
        dataset = UnlabeledImages(images, SimCLRViews(args.size, (0.08, 1.0), blur_p=0.0))
        generator = torch.Generator().manual_seed(args.seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                             num_workers=args.workers, persistent_workers=False,
                                             pin_memory=args.device == "cuda", generator=generator)
    else:
        dataset = torchvision.datasets.ImageFolder(str(images), transform=transform)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                             num_workers=args.workers, persistent_workers=args.workers > 0,
                                             pin_memory=args.device == "cuda")
    encoder = ResNetEncoder(depth=18, small_stem=args.stem == "small").to(dev)
    head = SimCLRProjectionHead(encoder.out_dim, 512, 128).to(dev)
    criterion = NTXentLoss(temperature=args.temperature)
    params = [(f"encoder.{n}", p) for n, p in encoder.named_parameters()] + \
        [(f"head.{n}", p) for n, p in head.named_parameters()]
    lr = args.lr * args.batch_size / 256
    optimizer = torch.optim.SGD(param_groups(params, 1e-4, lr), lr=lr, momentum=0.9)
    scheduler = WarmupSchedule("cosine", warmup=0.1, min_ratio=0.0).build(optimizer, len(loader) * args.epochs)
    amp = args.precision.startswith(("16", "bf16")) and args.device == "cuda"
    start = time.perf_counter()
    loss = torch.zeros(())
    for _ in range(args.epochs):
        for batch in loader:
            if views == "detkit":  # uint8 views
                x = torch.cat(batch).to(dev, non_blocking=True).float()
            else:  # (views in 0..1, labels); detkit's encoder normalises 0..255 input
                x = torch.cat(batch[0]).to(dev, non_blocking=True) * 255.0
            with torch.autocast(dev.type, dtype=torch.bfloat16 if "bf16" in args.precision else torch.float16,
                                enabled=amp):
                z = head(encoder(x))
                loss = criterion(*z.float().chunk(2))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    name = "lightly" if views == "lightly" else "lightly_detkit_views"
    save_encoder(encoder, out / f"{name}_encoder.pt", {"method": "simclr", "impl": name})
    return {"impl": "lightly" if views == "lightly" else "lightly loop + detkit views", "wall_s": wall, "img_s": len(loader) * args.batch_size * args.epochs / wall,
            "peak_mb": peak_memory_mb(args.device), "final_loss": float(loss),
            "encoder": str(out / f"{name}_encoder.pt")}


def run_random(args, images: Path, out: Path) -> dict:
    """The floor: the same encoder at its random initialisation, probed the same way."""
    from detkit.models.backbones import ResNetEncoder, save_encoder

    torch.manual_seed(args.seed)
    encoder = ResNetEncoder(depth=18, small_stem=args.stem == "small")
    save_encoder(encoder, out / "random_encoder.pt", {"method": "random", "impl": "random"})
    return {"impl": "random init (no training)", "wall_s": float("nan"), "img_s": float("nan"),
            "peak_mb": peak_memory_mb("cpu"), "final_loss": float("nan"), "encoder": str(out / "random_encoder.pt")}


def probe(encoder: str, cifar: Path, per_class: int, workers: int) -> dict:
    r = subprocess.run([str(BIN / "detkit-probe"), encoder, str(cifar / "train"), str(cifar / "test"),
                        "--per-class", str(per_class), "--workers", str(workers)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout[r.stdout.index("{"):])


IMPLS = {"detkit": run_detkit, "lightly": run_lightly, "random": run_random,
         "lightly_detkit_views": lambda args, images, out: run_lightly(args, images, out, views="detkit")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar", default=str(CIFAR))
    p.add_argument("--per-class", type=int, default=100, help="training images per class (1000 = all 10,000)")
    p.add_argument("--probe-per-class", type=int, default=100)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.6)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="32-true", help="Lightning precision (16-mixed / bf16-mixed on a GPU)")
    p.add_argument("--augment-on", default="cpu", choices=["cpu", "device"])
    p.add_argument("--impls", default="detkit,lightly,random")
    p.add_argument("--stem", default="small", choices=["small", "standard"])
    p.add_argument("--seed", type=int, default=0, help="initialisation, data order and augmentation seed (both)")
    p.add_argument("--no-probe", action="store_true", help="skip detkit-probe (throughput only; no cifar10/test)")
    p.add_argument("--in-process", action="store_true", help="every implementation in this process (quick dry runs)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_simclr_peer"))
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--images", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.impl:  # child process: train one implementation
        fn = {**IMPLS}[args.impl]
        print(json.dumps(fn(args, Path(args.images), out)))
        return
    images = subset(Path(args.cifar) / "train", args.per_class, Path(tempfile.mkdtemp()) / "train")
    rows = []
    fns = IMPLS
    for impl in args.impls.split(","):
        if args.in_process:
            row = json.loads(json.dumps(fns[impl](args, images, out)))
        else:
            cmd = [sys.executable, __file__, "--impl", impl, "--images", str(images)] + \
                [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k not in ("impl", "images", "impls", "no_probe", "in_process")]  # the children never probe
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{impl} failed:\n{r.stderr[-3000:]}")
            row = json.loads(r.stdout.strip().splitlines()[-1])
        if not args.no_probe:
            row.update(probe(row["encoder"], Path(args.cifar), args.probe_per_class, args.workers))
        rows.append(row)
    n = sum(1 for f in images.rglob("*") if f.is_file())
    print(f"SimCLR on {n} cifar10/train images, {args.epochs} epochs, batch {args.batch_size}, {args.size} px, "
          f"ResNet-18 {args.stem} stem, "
          f"{args.device}, {args.precision}, torch {torch.__version__}; " + ("no probe" if args.no_probe else
          f"probe: {args.probe_per_class}/class train -> {args.probe_per_class}/class test"))
    print("| impl | img/s | wall s | peak MB | final loss | kNN k=20 | kNN k=1 | linear probe |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    acc = lambda r, k: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
    for r in rows:
        print(f"| {r['impl']} | {r['img_s']:.1f} | {r['wall_s']:.1f} | {r['peak_mb']:.0f} | {r['final_loss']:.3f} | "
              f"{acc(r, 'knn_top1')} | {acc(r, 'knn_top1_k1')} | {acc(r, 'linear_probe_top1')} |")
    if len(rows) >= 2 and rows[0]["impl"].startswith("detkit") and rows[1]["impl"] == "lightly":
        print(f"| ratio {rows[0]['impl']} / {rows[1]['impl']} | {rows[0]['img_s'] / rows[1]['img_s']:.2f}x | | "
              f"{rows[0]['peak_mb'] / rows[1]['peak_mb']:.2f}x | | | | |")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
