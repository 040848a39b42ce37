"""How fast does each detector learn a few images at its defaults? detkit's Faster R-CNN and YOLO against
torchvision's FasterRCNN and Ultralytics' YOLOv8n, same images, image size and optimiser steps.

    python scripts/bench_convergence.py --ann data/bccd/annotations/train.json --images data/bccd/images \\
        [--max-images 6] [--steps 30,60,90] [--batch-size 2] [--image-size 320] [--impls ...]

The first ``--max-images`` images of ``--ann`` are trained on and evaluated on (a learning-speed test, as in issue
19), without augmentation for every implementation, at batch 2 and 320 px (letterboxed / longer side 320), from
random init (nothing is downloaded). Each implementation runs in its own process, trains for the largest step
count and is evaluated after each listed step count with detkit's COCO evaluator (score threshold 0.001 / each
model's own inference settings otherwise):

* ``detkit_frcnn`` / ``detkit_yolo``: exactly what ``detkit-train model=faster_rcnn|yolo`` runs on these images:
  its composed defaults (SGD lr 0.02, warm-up + cosine over the run, anchors fitted by ``fit=auto``, its training
  augmentation unless ``--detkit-aug off``), its preparation and its trainer (gradient clipping at norm 10),
  stopped at the largest step count.
* ``torchvision``: ``FasterRCNN`` on ``resnet_fpn_backbone("resnet18", weights=None)`` with that function's
  defaults (FrozenBatchNorm, layer2-4 trainable; the set-up of issue 19's report; with trainable BatchNorm at
  batch 2 it found nothing in 90 steps: AP50 0.000), its anchors, ``min_size=max_size=320``,
  SGD at two rates, one row each (``--tv-lr``, default ``0.02,0.0025``: the reference's rate, set for 16 images
  per step, and that rate scaled linearly to batch 2), momentum 0.9, weight decay 1e-4, the reference's linear
  warm-up (``min(1000, epoch length - 1)`` steps) then constant (its step decays come after 16 epochs), gradients
  clipped at global norm 10 as detkit-train's trainer does (``--tv-clip 0``: off; then lr 0.02 diverges at batch
  2). A non-finite loss is reported as "diverged (step N)" instead of an AP.
* ``ultralytics``: ``YOLO("yolov8n.yaml")`` trained by Ultralytics' own trainer with its defaults except:
  augmentation off (mosaic, HSV, flips, scale, translate), ``nbs`` = batch size (one optimiser step per batch, as
  the others; Ultralytics otherwise accumulates to 64 images), ``amp=False`` (its AMP check downloads weights),
  ``optimizer=SGD`` (its ``auto`` picks AdamW for short runs), checkpoints every epoch. Note its warm-up lasts at
  least 100 iterations whatever the run length.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def subset_ann(ann: str, n: int, out: Path) -> Path:
    data = json.loads(Path(ann).read_text())
    images = data["images"][:n]
    ids = {im["id"] for im in images}
    sub = {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
    path = out / "subset.json"
    path.write_text(json.dumps(sub))
    return path


def evaluate(gt: dict, results: list[dict]) -> dict:
    from detkit.eval.coco_eval import evaluate_coco
    stats = evaluate_coco(gt, results).stats
    return {"AP": stats["AP"], "AP50": stats["AP50"]}


def run_detkit(args, ann: Path, model_name: str) -> dict:
    """What ``detkit-train model=NAME data.train_ann=... data.val_ann=... data.batch_size=B`` runs: its composed
    defaults and its preparation (init check, training size, anchor fit), its trainer (gradient clipping and all),
    stopped at the largest step count with the schedule sized to it. ``--detkit-aug off`` turns the default training
    augmentation off (the peers train without augmentation); ``--image-size`` fixes the size it would choose."""
    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from detkit.cli.train import _check_init_choice, build_datamodule, fit_priors
    from detkit.paths import config_dir

    steps = sorted(int(s) for s in args.steps.split(","))
    aug_off = ["data.train_transform.hflip=0", "data.train_transform.scale_range=[1.0,1.0]",
               "data.train_transform.color_jitter=0"] if args.detkit_aug == "off" else []
    size = [f"data.image_size={args.image_size}"] if args.image_size else []
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"data.train_ann={ann}", f"data.train_images={args.images}", f"data.val_ann={ann}",
            f"data.val_images={args.images}", *size, f"data.batch_size={args.batch_size}", "data.num_workers=1",
            *aug_off, f"model={model_name}", "paths.output_dir=/tmp/x", f"+trainer.max_steps={max(steps)}",
            "trainer.max_epochs=-1", *args.detkit_override])
    L.seed_everything(cfg.seed, workers=True)
    _check_init_choice(cfg)
    dm = build_datamodule(cfg)
    fit_priors(cfg, dm.datasets["train"].coco_data)
    module = instantiate(cfg.model, categories=dm.categories.to_list(), image_size=cfg.data.image_size,
                        seed=cfg.seed, _recursive_=False)
    gt = dm.datasets["val"].coco_data
    points, timing = {}, {"t": 0.0, "n": 0}

    class Checkpoints(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            timing["t0"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timing["t"] += time.perf_counter() - timing["t0"]
            timing["n"] += len(batch[0])
            if trainer.global_step in steps:
                pl_module.eval()
                results = []
                with torch.no_grad():
                    for images, targets in dm.val_dataloader():
                        for det in pl_module.predict_batch(images, targets):
                            from detkit.eval.coco_eval import detections_to_results
                            results += detections_to_results(det["boxes"], det["scores"], det["category_ids"],
                                                             det["image_id"])
                points[trainer.global_step] = evaluate(gt, results)
                pl_module.train()

    trainer = instantiate(cfg.trainer, limit_val_batches=0, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, callbacks=[Checkpoints()])
    trainer.fit(module, datamodule=dm)
    aug = "" if args.detkit_aug == "default" else ", no aug"
    extra = "".join(f", {o}" for o in args.detkit_override)
    return {"impl": f"detkit {model_name} ({cfg.data.image_size} px{aug}, clip {cfg.trainer.gradient_clip_val}{extra})",
            "points": points, "train_img_s": timing["n"] / max(timing["t"], 1e-9)}


def run_torchvision(args, ann: Path) -> dict:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    from bench_faster_rcnn import padded
    from detkit.data.datamodule import DetectionDataModule
    from detkit.data.transforms import DetectionTransform
    from detkit.eval.coco_eval import detections_to_results
    from detkit.lit.detection_module import to_original_pixels

    steps = sorted(int(s) for s in args.steps.split(","))
    torch.manual_seed(args.peer_seed)
    plain = DetectionTransform(args.peer_size, train=True, hflip=0.0, vflip=0.0, scale_range=(1.0, 1.0),
                               color_jitter=0.0)
    dm = DetectionDataModule(str(ann), args.images, str(ann), args.images, image_size=args.peer_size,
                             batch_size=args.batch_size, num_workers=1, train_transform=plain)
    dm.setup("fit")
    cats = dm.categories
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None)  # its defaults: FrozenBN, 3 stages
    model = FasterRCNN(backbone, num_classes=len(cats) + 1, min_size=args.peer_size, max_size=args.peer_size,
                       box_score_thresh=args.tv_score_thresh)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.tv_lr, momentum=0.9, weight_decay=1e-4)
    loader = dm.train_dataloader()  # one loader for the run; set_epoch gives each epoch its order, as Lightning does
    warm = min(1000, len(loader) - 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (0.001 * (1 - s / warm) + s / warm) if s < warm else 1.0)
    gt = dm.datasets["val"].coco_data
    points, t_train, n_train, step, diverged_at = {}, 0.0, 0, 0, None
    epoch = 0
    while step < max(steps):
        loader.sampler.set_epoch(epoch)
        epoch += 1
        for images, targets in loader:
            model.train()
            t0 = time.perf_counter()
            tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1}
                          for t in map(targets.image, range(targets.num_images))]
            losses = model(list(images.float() / 255.0), tv_targets)
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            if args.tv_clip:  # detkit-train's trainer clips at the same global norm
                torch.nn.utils.clip_grad_norm_(params, args.tv_clip)
            opt.step()
            sched.step()
            t_train += time.perf_counter() - t0
            n_train += len(images)
            step += 1
            if diverged_at is None and not torch.isfinite(loss):  # a host read per step: fine in a benchmark
                diverged_at = step
                print(f"[torchvision] non-finite loss at step {step}", file=sys.stderr)
            if step in steps:
                model.eval()
                results = []
                with torch.no_grad():
                    for vimages, vtargets in dm.val_dataloader():
                        out = model(list(vimages.float() / 255.0))
                        dets = padded([{**d, "labels": d["labels"] - 1} for d in out])
                        boxes = to_original_pixels(dets, vtargets)
                        for i, (d, image_id) in enumerate(zip(dets.to_list(), vtargets.image_ids.tolist())):
                            results += detections_to_results(boxes[i][dets.valid[i]], d["scores"],
                                                             cats.ids_of(d["labels"]), image_id)
                points[step] = {**evaluate(gt, results), "detections": len(results)}
                print(f"[torchvision] step {step}: {len(results)} detections, loss {loss.item():.3f}", file=sys.stderr)
            if step >= max(steps):
                break
    clip = f", clip {args.tv_clip:g}" if args.tv_clip else ""
    return {"impl": f"torchvision FasterRCNN (resnet18 FPN, lr {args.tv_lr:g}{clip}, seed {args.peer_seed})",
            "points": points,
            "train_img_s": n_train / t_train, "diverged_at": diverged_at}


def run_ultralytics(args, ann: Path, work: Path) -> dict:
    from ultralytics import YOLO

    data = json.loads(ann.read_text())
    cats = sorted(data["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(cats)}
    root = work / "yolo_data"
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    by_image: dict = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    files = []
    for im in data["images"]:
        src = Path(args.images) / im["file_name"]
        dst = root / "images" / Path(im["file_name"]).name
        if not dst.exists():
            os.symlink(src.resolve(), dst)
        files.append((im, dst))
        w, h = im["width"], im["height"]
        lines = [f"{index[a['category_id']]} {(a['bbox'][0] + a['bbox'][2] / 2) / w:.6f} "
                 f"{(a['bbox'][1] + a['bbox'][3] / 2) / h:.6f} {a['bbox'][2] / w:.6f} {a['bbox'][3] / h:.6f}"
                 for a in by_image.get(im["id"], []) if not a.get("iscrowd", 0)]
        (root / "labels" / f"{dst.stem}.txt").write_text("\n".join(lines) + "\n")
    yaml = work / "data.yaml"
    yaml.write_text(f"path: {root}\ntrain: images\nval: images\nnames:\n"
                    + "".join(f"  {i}: {c['name']}\n" for i, c in enumerate(cats)))
    steps = sorted(int(s) for s in args.steps.split(","))
    per_epoch = -(-len(data["images"]) // args.batch_size)
    if any(s % per_epoch for s in steps):
        raise SystemExit(f"ultralytics checkpoints per epoch ({per_epoch} steps): give step counts divisible by it")
    torch.manual_seed(args.peer_seed)
    model = YOLO("yolov8n.yaml")
    t0 = time.perf_counter()
    model.train(data=str(yaml), epochs=max(steps) // per_epoch, imgsz=args.peer_size, batch=args.batch_size,
                nbs=args.batch_size, optimizer="SGD", amp=False, pretrained=False, device="cpu", workers=1,
                mosaic=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, fliplr=0.0, scale=0.0, translate=0.0, val=False,
                plots=False, save_period=1, project=str(work / "ul_runs"), name="train", exist_ok=True,
                verbose=False, seed=args.peer_seed, deterministic=False, close_mosaic=0)
    wall = time.perf_counter() - t0
    weights = work / "ul_runs" / "train" / "weights"
    points = {}
    for s in steps:
        ckpt = weights / f"epoch{s // per_epoch - 1}.pt"  # Ultralytics numbers epochs from 0
        if not ckpt.exists():  # the last epoch is saved as last.pt
            ckpt = weights / "last.pt"
        m = YOLO(str(ckpt))
        results = []
        for im, path in files:
            r = m.predict(str(path), imgsz=args.peer_size, conf=0.001, iou=0.7, max_det=100, verbose=False,
                          device="cpu")[0]
            for (x1, y1, x2, y2), sc, c in zip(r.boxes.xyxy.tolist(), r.boxes.conf.tolist(), r.boxes.cls.tolist()):
                results.append({"image_id": im["id"], "category_id": cats[int(c)]["id"],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(sc)})
        points[s] = evaluate(data, results)
    n = max(steps) * args.batch_size
    return {"impl": f"Ultralytics YOLOv8n (yaml, seed {args.peer_seed})", "points": points, "train_img_s": n / wall,
            "note": "img/s includes Ultralytics' per-epoch checkpoint saving"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ann", default=str(ROOT / "data" / "bccd" / "annotations" / "train.json"))
    p.add_argument("--images", default=str(ROOT / "data" / "bccd" / "images"))
    p.add_argument("--max-images", type=int, default=6)
    p.add_argument("--steps", default="30,60,90")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--image-size", type=int, default=320,
                   help="every implementation's size; 0: detkit chooses its own as detkit-train does (peers: 320)")
    p.add_argument("--detkit-aug", default="default", choices=["default", "off"],
                   help="detkit's training augmentation: detkit-train's default (what a user runs) or off")
    p.add_argument("--detkit-override", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for detkit's runs (repeatable), e.g. model.detector.backbone.norm=gn")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tv-score-thresh", type=float, default=0.05,
                   help="torchvision's box_score_thresh (its default 0.05; 0.001 = the others' evaluation setting)")
    p.add_argument("--tv-lr", default="0.02,0.0025",
                   help="torchvision's SGD learning rates, one row each (its reference's 0.02 is for 16 images per "
                        "step; 0.0025 is that scaled linearly to batch 2)")
    p.add_argument("--tv-clip", type=float, default=10.0,
                   help="torchvision's gradient clipping (global norm), as detkit-train's trainer; 0: off (at lr "
                        "0.02 and batch 2 it then diverges within 30 steps on every dataset tried)")
    p.add_argument("--peer-seed", type=int, default=0,
                   help="the peers' seed (torchvision's and Ultralytics' init and data order); detkit's is the "
                        "Hydra override seed=N")
    p.add_argument("--impls", default="detkit_frcnn,torchvision,detkit_yolo,ultralytics")
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.peer_size = args.image_size or 320
    torch.set_num_threads(args.threads)
    if args.impl:
        args.tv_lr = float(args.tv_lr)
        work = Path(args.work)
        ann = work / "subset.json"
        run = {"detkit_frcnn": lambda: run_detkit(args, ann, "faster_rcnn"),
               "detkit_yolo": lambda: run_detkit(args, ann, "yolo"),
               "torchvision": lambda: run_torchvision(args, ann),  # one --tv-lr per process
               "ultralytics": lambda: run_ultralytics(args, ann, work)}[args.impl]
        row = run()
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(row))
        return
    work = Path(tempfile.mkdtemp())
    subset_ann(args.ann, args.max_images, work)
    rows = []
    jobs = []
    for impl in args.impls.split(","):
        lrs = args.tv_lr.split(",") if impl == "torchvision" else args.tv_lr.split(",")[:1]
        jobs += [(impl, lr) for lr in lrs]
    for impl, lr in jobs:
        cmd = [sys.executable, __file__, "--impl", impl, "--work", str(work), f"--tv-lr={lr}"] + \
            [f"--{k.replace('_', '-')}={v}" for k, vs in vars(args).items()
             if k not in ("impl", "impls", "work", "peer_size", "tv_lr") for v in (vs if isinstance(vs, list) else [vs])]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            print(f"{impl} failed:\n{r.stderr[-2500:]}", file=sys.stderr)
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    steps = sorted(int(s) for s in args.steps.split(","))
    aug = "detkit with detkit-train's augmentation, peers without" if args.detkit_aug == "default" else \
        "no augmentation"
    print(f"{Path(args.ann).name}: first {args.max_images} images (train = eval), {args.peer_size} px (detkit: "
          f"{args.image_size or 'its own choice'}), batch {args.batch_size}, {aug}, random init, {args.threads} "
          f"threads, torch {torch.__version__}")
    print("| implementation | " + " | ".join(f"AP50 / AP @ {s} steps" for s in steps) + " | train img/s |")
    print("| --- | " + " | ".join("---" for _ in steps) + " | --- |")
    def cell(r: dict, s: int) -> str:
        pts, nan = {int(k): v for k, v in r["points"].items()}, r.get("diverged_at")
        if s not in pts:
            return "-"
        return f"diverged (step {nan})" if nan and s >= nan else f"{pts[s]['AP50']:.3f} / {pts[s]['AP']:.3f}"

    for r in rows:
        print(f"| {r['impl']} | " + " | ".join(cell(r, s) for s in steps) + f" | {r['train_img_s']:.2f} |")
    for r in rows:
        kept = [r["points"][k].get("detections") for k in sorted(r["points"], key=int)]
        if any(k is not None for k in kept):
            print(f"{r['impl']}: detections kept at {'/'.join(map(str, steps))} steps: {'/'.join(map(str, kept))}")


if __name__ == "__main__":
    main()
