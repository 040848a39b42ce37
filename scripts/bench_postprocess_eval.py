"""Evaluation and post-processing speed, detkit against its peers, in one run.

    python scripts/bench_postprocess_eval.py [--images 1000] [--batch 16] [--boxes 1000] [--classes 80]
                                             [--device cpu|cuda] [--repeats 5]

(a) COCO evaluation of N synthetic images: pycocotools (the reference) against detkit's evaluator with the
    faster-coco-eval backend; the 12 statistics must be identical.
(b) Post-processing of a batch of B images x K boxes x C classes with a realistic score distribution (most
    class scores near zero, as after a softmax): detkit's path (threshold, top-k per image, class-aware NMS by the
    per-device strategy) against a per-image loop (threshold, top-k, torchvision batched_nms per image). Both keep
    the same boxes (checked). The single-call strategy is timed too, to show why detkit picks per device.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torchvision.ops import batched_nms

from detkit.eval.coco_eval import STAT_KEYS, evaluate_coco
from detkit.models.detection.postprocess import batched_multiclass_nms, resolve_strategy


def synthetic_coco(n_images: int, n_cats: int = 80, seed: int = 0) -> tuple[dict, list]:
    rng = np.random.default_rng(seed)
    images = [{"id": i + 1, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in range(n_images)]
    cats = [{"id": c + 1, "name": f"c{c}"} for c in range(n_cats)]
    anns, results = [], []
    for im in images:
        for _ in range(rng.integers(1, 15)):
            w, h = rng.uniform(4, 300, 2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            c = int(rng.integers(n_cats)) + 1
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": c, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            for _ in range(rng.integers(0, 3)):
                j = rng.normal(0, 0.1 * min(w, h), 4)
                results.append({"image_id": im["id"], "category_id": c, "score": float(rng.random()),
                                "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])]})
        for _ in range(rng.integers(20, 80)):
            results.append({"image_id": im["id"], "category_id": int(rng.integers(n_cats)) + 1,
                            "score": float(rng.random() * 0.5),
                            "bbox": [*rng.uniform(0, 400, 2).tolist(), *rng.uniform(4, 200, 2).tolist()]})
    return {"images": images, "annotations": anns, "categories": cats}, results


def bench_eval(n_images: int) -> None:
    gt, results = synthetic_coco(n_images)
    times, stats = {}, {}
    for backend in ("pycocotools", "faster_coco_eval"):
        t0 = time.perf_counter()
        stats[backend] = evaluate_coco(gt, results, backend=backend).stats
        times[backend] = time.perf_counter() - t0
    same = all(stats["pycocotools"][k] == stats["faster_coco_eval"][k] for k in STAT_KEYS)
    print(f"(a) COCO evaluation, {n_images} images, {len(gt['annotations'])} gt boxes, {len(results)} detections")
    print("| evaluator | time s | AP | identical 12 stats |")
    print("| --- | --- | --- | --- |")
    print(f"| pycocotools | {times['pycocotools']:.2f} | {stats['pycocotools']['AP']:.4f} | reference |")
    print(f"| detkit (faster-coco-eval) | {times['faster_coco_eval']:.2f} | {stats['faster_coco_eval']['AP']:.4f} | "
          f"{same} |")
    print(f"speed-up: {times['pycocotools'] / times['faster_coco_eval']:.1f}x\n")
    if not same:
        raise SystemExit("statistics differ between backends")


def make_batch(b: int, k: int, c: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, k, 1, 2, generator=g) * 600
    wh = torch.rand(b, k, 1, 2, generator=g) * 150 + 8
    jitter = torch.randn(b, k, c, 4, generator=g) * 3
    boxes = (torch.cat([xy, xy + wh], -1) + jitter).clamp(min=0)
    logits = torch.randn(b, k, c + 1, generator=g) * 2
    logits[..., :c] -= 3.0  # background dominates, as for most proposals
    logits[:, : k // 10, torch.randint(c, (1,), generator=g)] += 8  # a few confident objects
    scores = logits.softmax(-1)[..., :c]
    return boxes.to(device), scores.to(device)


def detkit_path(boxes, scores, strategy, thresh=0.05, topk=1000, iou=0.5, max_det=100):
    b, k, c, _ = boxes.shape
    flat_scores = scores.reshape(b, k * c)
    labels = torch.arange(c, device=boxes.device).repeat(k)[None].expand(b, -1)
    masked = flat_scores.masked_fill(flat_scores <= thresh, -1.0)
    top = masked.topk(min(topk, masked.shape[1]), dim=1).indices  # as PostProcess: [B, K] sorted by score
    s = flat_scores.gather(1, top)
    bx = boxes.reshape(b, k * c, 4).gather(1, top[..., None].expand(-1, -1, 4))
    return batched_multiclass_nms(bx, s, labels.gather(1, top), s > thresh, iou, max_det, strategy)


def loop_path(boxes, scores, thresh=0.05, topk=1000, iou=0.5, max_det=100):
    b, k, c, _ = boxes.shape
    out = []
    for i in range(b):
        s = scores[i].reshape(-1)
        bx = boxes[i].reshape(-1, 4)
        lab = torch.arange(c, device=boxes.device).repeat(k)
        keep = (s > thresh).nonzero(as_tuple=True)[0]
        s, bx, lab = s[keep], bx[keep], lab[keep]
        top = s.topk(min(topk, len(s))).indices
        s, bx, lab = s[top], bx[top], lab[top]
        kept = batched_nms(bx, s, lab, iou)[:max_det]
        out.append((bx[kept], s[kept], lab[kept]))
    return out


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def bench_postprocess(b: int, k: int, c: int, device: str, repeats: int) -> None:
    boxes, scores = make_batch(b, k, c, device)
    reference = loop_path(boxes, scores)
    auto = resolve_strategy("auto", torch.device(device))
    for strategy in ("torchvision", "cluster"):
        dets = detkit_path(boxes, scores, strategy).to_list()
        for d, (rb, rs, rl) in zip(dets, reference):
            assert torch.equal(d["boxes"], rb) and torch.equal(d["scores"], rs) and torch.equal(d["labels"], rl)
    t_loop = timed(lambda: loop_path(boxes, scores), repeats, device)
    rows = [("per-image loop (top-k + torchvision batched_nms)", t_loop)]
    for strategy in ("torchvision", "cluster"):
        mark = " <- auto" if strategy == auto else ""
        rows.append((f"detkit strategy={strategy}{mark}", timed(lambda: detkit_path(boxes, scores, strategy),
                                                                 repeats, device)))
    print(f"(b) post-processing on {device}: {b} images x {k} boxes x {c} classes (same kept boxes: checked)")
    print("| path | median ms | speed-up vs loop |")
    print("| --- | --- | --- |")
    for name, t in rows:
        print(f"| {name} | {t * 1000:.1f} | {t_loop / t:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--boxes", type=int, default=1000)
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-eval", action="store_true")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if not args.skip_eval:
        bench_eval(args.images)
    bench_postprocess(args.batch, args.boxes, args.classes, args.device, args.repeats)


if __name__ == "__main__":
    main()
