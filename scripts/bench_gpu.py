"""Throughput of the detectors on a GPU (or, smaller, on a CPU): detkit Faster R-CNN, detkit YOLO and torchvision's
FasterRCNN with the same parts, side by side, plus device NMS against the per-image loop.

    python scripts/bench_gpu.py                      # GPU: batch 8 and 32 at 640 px, fp32 / 16-mixed / bf16-mixed
    python scripts/bench_gpu.py --device cpu         # CPU: batch 2 at 320 px, fp32 (a smoke-sized run)
    python scripts/bench_gpu.py --impls detkit --precisions 16-mixed --batches 8 --compile
    python scripts/bench_gpu.py --nms-only [--nms-size 16,1000,80]   # the NMS table alone

Each implementation runs in its own process. The models are those of ``scripts/bench_faster_rcnn.py`` (ResNet-18,
random init; torchvision's FasterRCNN gets detkit's backbone, anchors, RPN/RoI counts and box head) on real BCCD
images letterboxed to the image size, one fixed batch resident on the device, so the numbers are the model's own
(no data loading). Per configuration: training images/s (forward + backward + SGD step, GradScaler for fp16),
inference images/s, peak device memory, and from ``torch.profiler`` over a few training steps: the GPU-busy
fraction (union of kernel time over wall time), host synchronisations + memcpys per step and kernel launches per
step. Last, one markdown table (each row is also printed to stderr as JSON as soon as it is measured); the exit
status is 1 when an implementation failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
BCCD = ROOT / "data" / "bccd"
DTYPES = {"32-true": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def load_batch(batch: int, size: int, device: torch.device):
    """``batch`` BCCD train images letterboxed to ``size`` and their padded targets, on ``device``."""
    from detkit.data.coco import CocoDetection
    from detkit.data.collate import detection_collate
    from detkit.data.transforms import DetectionTransform

    ds = CocoDetection(BCCD / "annotations/train.json", BCCD / "images", DetectionTransform(size, train=False),
                       check_images=False)
    images, targets = detection_collate([ds[i % len(ds)] for i in range(batch)])
    return images.to(device), targets.to(device), ds.num_classes


def build(impl: str, num_classes: int, size: int, args: argparse.Namespace):
    import bench_faster_rcnn as fr

    if impl == "detkit":
        model = fr.build_detkit(num_classes)
        model.roi_heads.pooler.impl = args.pooler
    elif impl == "yolo":
        model = fr.build_yolo(num_classes)
    else:
        model = fr.build_torchvision(num_classes, size)
    if args.nms != "auto" and impl != "torchvision":
        for m in model.modules():
            if isinstance(getattr(m, "nms", None), str):  # the RPN
                m.nms = args.nms
            if hasattr(m, "inference"):  # RoI heads, YOLO: their PostProcess
                m.inference.nms = args.nms
    return model


def train_step_fn(impl: str, model, images, targets, dtype, scaler, opt, loss_fn, graphs: bool = False):
    tv_targets = None
    if impl == "torchvision":
        tv_images = list(images.float())
        tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1}
                      for t in map(targets.image, range(targets.num_images))]

    def step() -> torch.Tensor:
        if graphs:  # a new cudagraph-trees generation per step, as DetectionModule.training_step does
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            losses = loss_fn(images, targets) if impl != "torchvision" else model(tv_images, tv_targets)
            loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss.detach()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return time.perf_counter() - t0


def profile(fn, steps: int, top_ops: int = 0) -> dict:
    """GPU-busy fraction, host synchronisations, async memcpys and kernel launches per step, from torch.profiler
    (and, with ``top_ops``, the ops costing the host most time, printed to stderr)."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    intervals, syncs, memcpys, launches = [], 0, 0, 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            intervals.append((e.time_range.start, e.time_range.end))
        elif e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaEventSynchronize"):
            syncs += 1
        elif e.name == "cudaMemcpyAsync":
            memcpys += 1
        elif e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                        "cudaGraphLaunch"):  # a CUDA-graph replay counts as one launch
            launches += 1
    if top_ops:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top_ops), file=sys.stderr)
    intervals.sort()
    busy, end = 0.0, float("-inf")
    for s, e in intervals:  # union of kernel intervals (us)
        if s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return {"gpu_busy": busy / 1e6 / wall, "syncs_per_step": syncs / steps, "memcpy_per_step": memcpys / steps,
            "launches_per_step": launches / steps}


def run_one(impl: str, args: argparse.Namespace) -> list[dict]:
    """Every (precision, batch) of one implementation, in this process."""
    from detkit.lit.detection_module import CUDA_GRAPH_MODES

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    torch.set_num_threads(args.threads) if device.type == "cpu" else None
    rows = []
    for batch in args.batches:
        images, targets, num_classes = load_batch(batch, args.image_size, device)
        for precision in args.precisions:
            dtype = DTYPES[precision]
            torch.manual_seed(0)
            model = build(impl, num_classes, args.image_size, args).to(device)
            if args.channels_last:
                model = model.to(memory_format=torch.channels_last)
                images = images.contiguous(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=1e-4,
                                  fused=args.fused_sgd or None)
            scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
            compiled = bool(args.compile) and impl != "torchvision"
            if compiled:  # each configuration compiles for its own shapes (no dynamic-shape graph from the last one)
                torch._dynamo.reset()
            loss_fn = torch.compile(model.loss, mode=args.compile_mode, backend=args.compile_backend) if compiled \
                else getattr(model, "loss", None)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            model.train()
            graphs = compiled and args.compile_mode in CUDA_GRAPH_MODES
            step = train_step_fn(impl, model, images, targets, dtype, scaler, opt, loss_fn, graphs)
            warm = timed(step, args.warmup, device)
            train_s = timed(step, args.steps, device)
            prof = profile(step, args.profile_steps, args.top_ops) if device.type == "cuda" else {}
            model.eval()

            @torch.no_grad()
            def infer():
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    if impl == "torchvision":
                        return model(list(images.float()))
                    return model.predict(images)

            timed(infer, max(2, args.warmup // 2), device)
            infer_s = timed(infer, args.steps, device)
            row = {"impl": impl, "precision": precision, "batch": batch, "size": args.image_size,
                   "train_img_s": batch * args.steps / train_s, "infer_img_s": batch * args.steps / infer_s,
                   "warmup_s": warm, "compile": compiled, "compile_mode": args.compile_mode if compiled else None,
                   "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                   **prof}
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
            del model, opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def nms_table(args: argparse.Namespace) -> list[dict]:
    """``--nms-size`` (default 16 images x 1,000 boxes x 80 classes, softmax-like scores): the per-image torchvision
    loop against detkit's PostProcess with each NMS strategy; the same kept boxes are checked."""
    from torchvision.ops import batched_nms

    from detkit.models.detection.postprocess import PostProcess

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    b, n, c = args.nms_size
    xy = torch.rand(b, n, 2, generator=g) * 600
    wh = torch.rand(b, n, 2, generator=g) * 120 + 4
    boxes = torch.cat([xy, xy + wh], -1).to(device)
    scores = torch.softmax(torch.randn(b, n, c, generator=g) * 3, -1).to(device)

    def loop():
        out = []
        for i in range(b):
            s = scores[i].flatten()
            top = s.topk(min(1000, s.numel()))
            keep_mask = top.values > 0.05
            idx = top.indices[keep_mask]
            bx, sc, lab = boxes[i][idx // c], s[idx], idx % c
            keep = batched_nms(bx, sc, lab, 0.5)[:100]
            out.append((bx[keep], sc[keep], lab[keep]))
        return out

    rows, ref = [], loop()
    for name, fn in [("per-image loop (top-k + torchvision batched_nms)", loop)] + [
            (f"detkit PostProcess nms={s}", (lambda s=s: PostProcess(0.05, 0.5, 1000, 100, nms=s)(boxes, scores)))
            for s in ("torchvision", "cluster")]:
        for _ in range(3):
            fn()
        times = []
        for _ in range(args.nms_repeats):
            sync(device)
            t0 = time.perf_counter()
            out = fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        same = True
        if not isinstance(out, list):
            same = all(torch.equal(d["labels"], r[2]) and torch.allclose(d["boxes"], r[0])
                       for d, r in zip(out.to_list(), ref))
        rows.append({"path": name, "median_ms": sorted(times)[len(times) // 2] * 1e3, "same_boxes": same})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--impls", default="detkit,torchvision,yolo")
    p.add_argument("--precisions", default=None, help="comma-separated: 32-true,16-mixed,bf16-mixed")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--nms-repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pooler", default="auto", help="detkit RoIAlign kernel: auto | gather | torchvision")
    p.add_argument("--nms", default="auto", help="detkit NMS strategy: auto | cluster | torchvision")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile detkit's loss")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: trace only)")
    p.add_argument("--fused-sgd", action="store_true", help="SGD(fused=True): one kernel per optimiser step")
    p.add_argument("--skip-nms", action="store_true")
    p.add_argument("--nms-only", action="store_true", help="the NMS table alone, no detector")
    p.add_argument("--nms-size", default="16,1000,80", help="NMS table: images,boxes,classes")
    p.add_argument("--top-ops", type=int, default=0, help="print the N ops with the most host time per config")
    p.add_argument("--in-process", action="store_true", help="every implementation in this process (quick dry runs)")
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args()
    gpu = args.device == "cuda"
    args.precisions = (args.precisions or ("32-true,16-mixed,bf16-mixed" if gpu else "32-true")).split(",")
    args.batches = [int(b) for b in (args.batches or ("8,32" if gpu else "2")).split(",")]
    args.image_size = args.image_size or (640 if gpu else 320)
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup or (10 if gpu else 2)
    args.nms_size = [int(v) for v in args.nms_size.split(",")]
    if args.impl:
        print(json.dumps(run_one(args.impl, args)))
        return
    rows, failed = [], []
    for impl in [] if args.nms_only else args.impls.split(","):
        if args.in_process:
            rows += run_one(impl, args)
            continue
        cmd = [sys.executable, __file__, "--impl", impl, "--device", args.device, "--precisions",
               ",".join(args.precisions), "--batches", ",".join(map(str, args.batches)), "--image-size",
               str(args.image_size), "--steps", str(args.steps), "--warmup", str(args.warmup), "--profile-steps",
               str(args.profile_steps), "--threads", str(args.threads), "--pooler", args.pooler, "--nms", args.nms,
               "--top-ops", str(args.top_ops)]
        cmd += ["--channels-last"] * args.channels_last + ["--compile"] * args.compile + ["--fused-sgd"] * args.fused_sgd
        cmd += ["--compile-mode", args.compile_mode] if args.compile_mode else []
        cmd += ["--compile-backend", args.compile_backend]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)  # progress goes to stderr
        if out.returncode != 0:
            print(f"{impl} failed with exit status {out.returncode}", file=sys.stderr)
            failed.append(impl)
            continue
        rows += json.loads(out.stdout.strip().splitlines()[-1])
    name = torch.cuda.get_device_name() if gpu else "CPU"
    if args.nms_only:
        print(f"\n{name}, torch {torch.__version__}")
    else:
        print_table(rows, name, args)
    if not args.skip_nms:
        b, n, c = args.nms_size
        print(f"\n| NMS path ({b} x {n} boxes x {c} classes) | median ms | speed-up vs loop | same boxes |")
        print("| --- | --- | --- | --- |")
        nms_rows = nms_table(args)
        for r in nms_rows:
            print(f"| {r['path']} | {r['median_ms']:.2f} | {nms_rows[0]['median_ms'] / r['median_ms']:.2f}x | "
                  f"{r['same_boxes']} |")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


def print_table(rows: list[dict], name: str, args: argparse.Namespace) -> None:
    print(f"\n{name}, torch {torch.__version__}, {args.image_size} px, BCCD images, random init ResNet-18, "
          f"pooler={args.pooler}, nms={args.nms}, channels_last={args.channels_last}, compile={args.compile} "
          f"({args.compile_mode or 'default'}), fused SGD={args.fused_sgd}")
    print("| impl | precision | batch | train img/s | infer img/s | peak mem GB | GPU busy | syncs/step "
          "| memcpyAsync/step | launches/step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        print(f"| {r['impl']} | {r['precision']} | {r['batch']} | {r['train_img_s']:.1f} | {r['infer_img_s']:.1f} | "
              f"{fmt(r['peak_mem_gb'], '.2f')} | {fmt(r.get('gpu_busy'), '.0%')} | "
              f"{fmt(r.get('syncs_per_step'), '.1f')} | {fmt(r.get('memcpy_per_step'), '.0f')} | "
              f"{fmt(r.get('launches_per_step'), '.0f')} |")
    by = {(r["impl"], r["precision"], r["batch"]): r for r in rows}
    for (impl, prec, batch), r in by.items():
        tv = by.get(("torchvision", prec, batch))
        if impl == "detkit" and tv:
            print(f"detkit/torchvision {prec} batch {batch}: train {r['train_img_s'] / tv['train_img_s']:.2f}x, "
                  f"infer {r['infer_img_s'] / tv['infer_img_s']:.2f}x")


if __name__ == "__main__":
    main()
