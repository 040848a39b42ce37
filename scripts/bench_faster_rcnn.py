"""detkit's Faster R-CNN against torchvision's FasterRCNN: same backbone, image size, RoI counts and schedule.

    python scripts/bench_faster_rcnn.py [--epochs 6] [--image-size 320] [--batch-size 4] [--threads 2]
                                        [--impls detkit,torchvision,yolo]

Each implementation runs in its own process (so peak memory is its own): it trains on BCCD's train split (the copy
embedded in data/), measuring training images/s after a few warm-up steps, then measures inference images/s and
COCO AP on the val split with the same evaluator. Both models share: the detkit ResNet-18 + FPN backbone (c3-c5,
128 channels; torchvision gets it wrapped, normalisation in the backbone), anchors, RPN pre/post-NMS top-n,
256 RPN and 256 RoI samples per image, RoIAlign 7x7 (sampling ratio 2), a 2x512 FC box head, SGD with momentum,
warm-up + cosine decay, the same data order and augmentation.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT / "data" / "bccd"
SIZES = [[16, 32], [64, 96], [128, 192]]
RATIOS = [[0.5, 1.0, 2.0]] * 3
PRE, POST = {"train": 1000, "test": 500}, {"train": 1000, "test": 500}


def build_detkit(num_classes: int):
    from detkit.models.backbones import Backbone
    from detkit.models.detection.anchors import AnchorGenerator
    from detkit.models.detection.faster_rcnn import FasterRCNN
    from detkit.models.detection.roi_heads import RoIHeads, RoIPooler, TwoMLPHead
    from detkit.models.detection.rpn import RegionProposalNetwork
    from detkit.models.detection.sampler import BalancedSampler

    torch.manual_seed(0)
    backbone = Backbone(depth=18, levels=["c3", "c4", "c5"], neck="fpn", neck_channels=128)
    return FasterRCNN(backbone, num_classes,
                      partial(RegionProposalNetwork, anchor_generator=AnchorGenerator(SIZES, RATIOS),
                              pre_nms_top_n=PRE, post_nms_top_n=POST),
                      partial(RoIHeads, pooler=partial(RoIPooler, aligned=False), box_head=partial(TwoMLPHead, hidden=512),
                              sampler=BalancedSampler(256, 0.25)))


def build_yolo(num_classes: int):
    """detkit's YOLO-style detector with its default settings (for issue 5's side-by-side figure)."""
    from detkit.models.backbones import Backbone
    from detkit.models.detection.yolo import YOLO

    torch.manual_seed(0)
    return YOLO(Backbone(depth=18, neck="pan", neck_channels=96), num_classes)


class _TVBackbone(torch.nn.Module):
    """detkit's backbone behind torchvision's contract (``out_channels``, feature dict)."""

    def __init__(self, backbone) -> None:
        super().__init__()
        self.body, self.out_channels = backbone, backbone.out_channels

    def forward(self, x):
        return self.body(x)


def build_torchvision(num_classes: int, image_size: int):
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    from detkit.models.backbones import Backbone

    torch.manual_seed(0)
    backbone = _TVBackbone(Backbone(depth=18, levels=["c3", "c4", "c5"], neck="fpn", neck_channels=128))
    return FasterRCNN(
        backbone, num_classes=None, min_size=image_size, max_size=image_size, image_mean=[0.0] * 3,
        image_std=[1.0] * 3, rpn_anchor_generator=AnchorGenerator(SIZES, RATIOS),
        rpn_pre_nms_top_n_train=PRE["train"], rpn_pre_nms_top_n_test=PRE["test"],
        rpn_post_nms_top_n_train=POST["train"], rpn_post_nms_top_n_test=POST["test"],
        box_roi_pool=MultiScaleRoIAlign(["p3", "p4", "p5"], 7, 2),
        box_head=TwoMLPHead(128 * 49, 512), box_predictor=FastRCNNPredictor(512, num_classes + 1),
        box_batch_size_per_image=256, box_detections_per_img=100)


def padded(dets: list[dict]):
    """torchvision's per-image detection dicts as detkit's padded Detections."""
    from detkit.structures import Detections, Targets

    t = Targets.from_list([{"boxes": d["boxes"], "labels": d["labels"]} for d in dets], pad_multiple=1)
    scores = torch.zeros(t.valid.shape)
    for i, d in enumerate(dets):
        scores[i, : len(d["scores"])] = d["scores"]
    return Detections(t.boxes, scores, t.labels, t.valid)


def run_one(impl: str, args: argparse.Namespace) -> dict:
    """Train + measure one implementation in this process."""
    from detkit.data.datamodule import DetectionDataModule
    from detkit.eval.coco_eval import detections_to_results, evaluate_coco
    from detkit.lit.detection_module import to_original_pixels
    from detkit.lit.optim import WarmupSchedule, param_groups

    from detkit.data.transforms import DetectionTransform

    torch.set_num_threads(args.threads)
    augment = {} if not args.no_augment else {"train_transform": DetectionTransform(
        args.image_size, train=True, hflip=0.0, vflip=0.0, scale_range=(1.0, 1.0), color_jitter=0.0)}
    train_ann = first_images(args.train_ann, args.max_images) if args.max_images else args.train_ann
    val = (args.val_ann, args.val_images) if args.val_ann else (train_ann, args.train_images)
    dm = DetectionDataModule(train_ann, args.train_images, *val, image_size=args.image_size,
                             batch_size=args.batch_size, num_workers=1, **augment)
    dm.setup("fit")
    cats = dm.categories
    builders = {"detkit": lambda: build_detkit(len(cats)), "yolo": lambda: build_yolo(len(cats)),
                "torchvision": lambda: build_torchvision(len(cats), args.image_size)}
    model = builders[impl]()
    loader = dm.train_dataloader()  # one loader for the run; set_epoch gives each epoch its order, as Lightning does
    steps = args.epochs * len(loader)
    opt = torch.optim.SGD(param_groups(model.named_parameters(), 1e-4, args.lr), lr=args.lr, momentum=0.9)
    sched = WarmupSchedule("cosine", warmup=args.warmup, min_ratio=args.min_lr_ratio).build(opt, steps)
    curve, diverged = [], None
    torch.manual_seed(1)
    train_time, train_images, step = 0.0, 0, 0
    model.train()
    for epoch in range(args.epochs):
        loader.sampler.set_epoch(epoch)
        for images, targets in loader:
            t0 = time.perf_counter()
            if impl != "torchvision":
                losses = model.loss(images, targets)
            else:
                tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1}
                              for t in map(targets.image, range(targets.num_images))]
                losses = model(list(images.float()), tv_targets)
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip or float("inf"))
            opt.step()
            sched.step()
            if step >= args.warmup_steps:
                train_time += time.perf_counter() - t0
                train_images += len(images)
            curve.append({**{k: float(v) for k, v in losses.items()}, "grad_norm": float(grad_norm)})
            step += 1
            if not torch.isfinite(loss):
                diverged = step
                break
        print(f"[{impl}] epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f}", file=sys.stderr, flush=True)
        if diverged:
            print(f"[{impl}] non-finite loss at step {diverged}", file=sys.stderr, flush=True)
            return {"impl": impl, "train_img_s": train_images / max(train_time, 1e-9), "infer_img_s": float("nan"),
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "AP": float("nan"),
                    "AP50": float("nan"), "steps": step, "diverged_at": diverged, "curve": curve}
    model.eval()
    results, infer_time, n = [], 0.0, 0
    with torch.no_grad():
        for images, targets in dm.val_dataloader():
            t0 = time.perf_counter()
            if impl != "torchvision":
                dets = model.predict(images)
            else:
                dets = padded([{**d, "labels": d["labels"] - 1} for d in model(list(images.float()))])
            infer_time += time.perf_counter() - t0
            n += len(images)
            boxes = to_original_pixels(dets, targets)
            for i, (d, image_id) in enumerate(zip(dets.to_list(), targets.image_ids.tolist())):
                results += detections_to_results(boxes[i][dets.valid[i]], d["scores"], cats.ids_of(d["labels"]),
                                                 image_id)
    stats = evaluate_coco(dm.datasets["val"].coco_data, results).stats
    return {"impl": impl, "train_img_s": train_images / train_time, "infer_img_s": n / infer_time,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "AP": stats["AP"], "AP50": stats["AP50"], "steps": step, "diverged_at": None, "curve": curve}


def first_images(ann: str, n: int) -> str:
    """A copy of COCO file ``ann`` with its first ``n`` images (and their boxes), in a temporary file."""
    import tempfile
    data = json.loads(Path(ann).read_text())
    images = data["images"][:n]
    ids = {im["id"] for im in images}
    subset = {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
    path = Path(tempfile.mkdtemp()) / f"{Path(ann).stem}_first{n}.json"
    path.write_text(json.dumps(subset))
    return str(path)


def total_loss(step: dict) -> float:
    return sum(v for k, v in step.items() if k.startswith("loss"))


def write_curves(rows: list[dict], path: Path) -> None:
    """Every step's total loss per implementation: json and a log-scale plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({r["impl"]: r["curve"] for r in rows}))
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        ax.plot([total_loss(c) for c in r["curve"]], label=r["impl"])
    ax.set(xlabel="step", ylabel="total loss", yscale="log", title=path.stem)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--image-size", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--train-ann", default=str(BCCD / "annotations/train.json"))
    p.add_argument("--train-images", default=str(BCCD / "images"))
    p.add_argument("--val-ann", default=str(BCCD / "annotations/val.json"), help="'' = the training set")
    p.add_argument("--val-images", default=str(BCCD / "images"))
    p.add_argument("--max-images", type=int, default=0, help="train on the first N images only (0: all)")
    p.add_argument("--no-augment", action="store_true", help="no flips, rescaling or colour jitter")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up: a fraction of the steps, or steps if >= 1")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine decays to this fraction of lr")
    p.add_argument("--clip", type=float, default=0.0, help="gradient-norm clipping (0: none)")
    p.add_argument("--curves", help="write every step's loss terms per implementation to this json (+ .png plot)")
    p.add_argument("--impl", choices=["detkit", "torchvision", "yolo"], help=argparse.SUPPRESS)
    p.add_argument("--impls", default="detkit,torchvision",
                   help="comma-separated: detkit (Faster R-CNN), torchvision (its FasterRCNN), yolo (detkit YOLO)")
    args = p.parse_args()
    if args.impl:
        print(json.dumps(run_one(args.impl, args)))
        return
    rows = []
    for impl in args.impls.split(","):
        forwarded = {k: v for k, v in vars(args).items() if k not in ("impl", "impls", "curves") and v is not None}
        cmd = [sys.executable, __file__, "--impl", impl]
        for k, v in forwarded.items():
            flag = f"--{k.replace('_', '-')}"
            cmd += ([flag] if v else []) if isinstance(v, bool) else [f"{flag}={v}"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            sys.exit(f"{impl} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{Path(args.train_ann).name}{f' (first {args.max_images} images)' if args.max_images else ''} {args.epochs} epochs at {args.image_size}px, batch {args.batch_size}, lr "
          f"{args.lr}, warm-up {args.warmup}, clip {args.clip or 'none'}, {args.threads} threads, torch {torch.__version__}")
    print("| impl | train img/s | infer img/s | peak RSS MB | val AP | val AP50 | steps | max loss | grad norm median "
          "/ p99 / max | diverged at |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        max_loss = max(total_loss(c) for c in r["curve"]) if r["curve"] else float("nan")
        norms = sorted(c["grad_norm"] for c in r["curve"] if math.isfinite(c["grad_norm"])) or [float("nan")]
        gn = f"{norms[len(norms) // 2]:.3g} / {norms[int(0.99 * (len(norms) - 1))]:.3g} / {norms[-1]:.3g}"
        print(f"| {r['impl']} | {r['train_img_s']:.2f} | {r['infer_img_s']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['AP']:.4f} | {r['AP50']:.4f} | {r['steps']} | {max_loss:.3g} | {gn} | {r['diverged_at'] or '-'} |")
    if args.curves:
        write_curves(rows, Path(args.curves))
    by = {r["impl"]: r for r in rows}
    if "detkit" in by and "torchvision" in by:
        d, t = by["detkit"], by["torchvision"]
        print(f"| ratio detkit/torchvision | {d['train_img_s'] / t['train_img_s']:.2f}x | "
              f"{d['infer_img_s'] / t['infer_img_s']:.2f}x | {d['peak_rss_mb'] / t['peak_rss_mb']:.2f}x | "
              f"{d['AP'] - t['AP']:+.4f} | {d['AP50'] - t['AP50']:+.4f} |")


if __name__ == "__main__":
    main()
