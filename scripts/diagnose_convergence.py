"""Why does a detector learn a few images slowly? Per-step losses and gradient norms, and what the two stages can do.

    python scripts/diagnose_convergence.py --ann ANN --images DIR [--max-images 6] [--steps 30,60,90]
        [--batch-size 2] [--name base] [--out runs/diagnose] [-- hydra overrides ...]

Trains what ``detkit-train model=faster_rcnn`` trains on the first ``--max-images`` images of ``--ann`` (train =
eval, as ``scripts/bench_convergence.py``), with any Hydra overrides after ``--``, and records for every optimiser
step each loss term, the learning rate and the gradient norm of the backbone, the RPN and the RoI heads (before
clipping). At each listed step it measures:

* ``AP50`` and ``AP50_agnostic`` (every class merged: does the detector find the objects at all?);
* ``rpn_recall50``: the fraction of ground-truth boxes that one of the top 100 proposals covers at IoU >= 0.5;
* ``gt_cls_acc``: the fraction of ground-truth boxes the box head, given the true box, labels with their class
  (its argmax over the classes and background);
* ``head_dead_units``: the fraction of the box head's output units (what the classifier reads) that are 0 after
  ReLU on every true box, and ``head_spread``: their standard deviation across the true boxes over their mean
  magnitude (near 0: the classifier is given one vector for every box).

Together they tell a stalled RPN from a box classifier that calls every object background. Writes
``OUT/NAME.json`` (the per-step records) and, given several names, ``--plot A,B,...`` draws their curves into
``OUT/curves.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def stage_probes(module, dm) -> dict:
    """RPN recall at IoU 0.5 (top 100 proposals) and the box head's accuracy on the ground-truth boxes."""
    from torchvision.ops import box_iou

    hits, correct, feats = [], [], []
    detector = module.inference_model
    with torch.no_grad():
        for images, targets in dm.val_dataloader():
            x = module._images(images)
            features = detector.backbone(x)
            proposals, _ = detector.rpn(features, tuple(x.shape[-2:]))
            for b in range(len(x)):  # evaluation only: a loop over a few images
                gt, props = targets.boxes[b][targets.valid[b]], proposals.boxes[b][proposals.valid[b]][:100]
                if len(gt) and len(props):
                    hits += (box_iou(gt, props).max(1).values >= 0.5).tolist()
                elif len(gt):
                    hits += [False] * len(gt)
            heads = detector.roi_heads
            pooled = heads.pooler(list(features.values()), targets.boxes)
            hidden = heads.box_head(pooled)  # [B * G, hidden]: what the classifier sees
            feats.append(hidden.view(*targets.boxes.shape[:2], -1)[targets.valid])
            logits = heads.box_predictor(hidden)[0].view(*targets.boxes.shape[:2], -1)
            correct += (logits.argmax(-1)[targets.valid] == targets.labels[targets.valid]).tolist()
    feats = torch.cat(feats)
    # the box head's units that answer to no true box (ReLU outputs 0 on all of them), and how much its output
    # varies between boxes relative to its size: a collapsed head gives the classifier one vector for every box
    dead = float((feats.amax(0) <= 0).float().mean())
    spread = float(feats.std(0).mean() / feats.abs().mean().clamp_min(1e-12))
    return {"rpn_recall50": sum(hits) / max(len(hits), 1), "gt_cls_acc": sum(correct) / max(len(correct), 1),
            "head_dead_units": dead, "head_spread": spread}


def run(args, overrides: list[str]) -> list[dict]:
    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from bench_convergence import evaluate, subset_ann
    from detkit.cli.train import _check_init_choice, build_datamodule, fit_priors
    from detkit.eval.coco_eval import detections_to_results
    from detkit.paths import config_dir

    steps = sorted(int(s) for s in args.steps.split(","))
    ann = subset_ann(args.ann, args.max_images, Path(tempfile.mkdtemp()))
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"data.train_ann={ann}", f"data.train_images={args.images}", f"data.val_ann={ann}",
            f"data.val_images={args.images}", f"data.batch_size={args.batch_size}", "data.num_workers=1",
            "model=faster_rcnn", "paths.output_dir=/tmp/x", f"+trainer.max_steps={max(steps)}",
            "trainer.max_epochs=-1", *overrides])
    L.seed_everything(cfg.seed, workers=True)
    _check_init_choice(cfg)
    dm = build_datamodule(cfg)
    fit_priors(cfg, dm.datasets["train"].coco_data)
    module = instantiate(cfg.model, categories=dm.categories.to_list(), image_size=cfg.data.image_size,
                         seed=cfg.seed, _recursive_=False)
    gt = dm.datasets["val"].coco_data
    agnostic = copy.deepcopy(gt)
    one = agnostic["categories"][0]["id"]
    for a in agnostic["annotations"]:
        a["category_id"] = one
    log: list[dict] = []

    class Record(L.Callback):
        norms: dict = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.norms = {}
            for part in ("backbone", "rpn", "roi_heads"):
                grads = [p.grad for n, p in pl_module.detector.named_parameters()
                         if n.startswith(part) and p.grad is not None]
                self.norms[f"grad_{part}"] = float(torch.linalg.vector_norm(
                    torch.stack([g.norm() for g in grads]))) if grads else 0.0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            base_lr = max(g["lr"] for g in trainer.optimizers[0].param_groups)  # the highest group's: the base rate unless a multiplier > 1
            rec = {"step": trainer.global_step, "lr": base_lr, **self.norms,
                   **{k.removeprefix("train/"): float(v) for k, v in trainer.callback_metrics.items()
                      if k.startswith("train/")}}
            if trainer.global_step in steps:
                pl_module.eval()
                results = []
                with torch.no_grad():
                    for images, targets in dm.val_dataloader():
                        for det in pl_module.predict_batch(images, targets):
                            results += detections_to_results(det["boxes"], det["scores"], det["category_ids"],
                                                             det["image_id"])
                rec["AP50"] = evaluate(gt, results)["AP50"]
                rec["AP50_agnostic"] = evaluate(agnostic, [dict(r, category_id=one) for r in results])["AP50"]
                rec.update(stage_probes(pl_module, dm))
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}),
                      flush=True)
                pl_module.train()
            log.append(rec)

    trainer = instantiate(cfg.trainer, limit_val_batches=0, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, callbacks=[Record()])
    trainer.fit(module, datamodule=dm)
    return log


def plot(out: Path, names: list[str]) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["loss_objectness", "loss_classifier", "loss_box_reg", "grad_backbone", "grad_rpn", "grad_roi_heads"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for name in names:
        log = json.loads((out / f"{name}.json").read_text())
        for ax, key in zip(axes.flat, keys):
            ax.plot([r["step"] for r in log], [r.get(key, float("nan")) for r in log], label=name, lw=1)
            ax.set_title(key)
            ax.set_yscale("log")
    axes.flat[0].legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("optimiser step")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    return out / "curves.png"


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ann")
    p.add_argument("--images")
    p.add_argument("--max-images", type=int, default=6)
    p.add_argument("--steps", default="30,60,90")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--name", default="base")
    p.add_argument("--out", default=str(ROOT / "runs" / "diagnose"))
    p.add_argument("--plot", help="comma-separated names of earlier runs in --out: draw their curves and stop")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot:
        print(plot(out, args.plot.split(",")))
        return
    if not (args.ann and args.images):
        p.error("--ann and --images are required (or --plot)")
    log = run(args, overrides)
    (out / f"{args.name}.json").write_text(json.dumps(log))
    print(out / f"{args.name}.json")


if __name__ == "__main__":
    main()
