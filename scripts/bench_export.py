"""onnxruntime (CPU) against detkit's PyTorch predict on the same images: img/s at batch 1 and 4.

    python scripts/bench_export.py [--checkpoint RUN/checkpoints/best.ckpt] [--model faster_rcnn|yolo]

Without a checkpoint a randomly initialised model of the default config (3 classes, 320 px) is exported; speed
does not depend on the weights beyond the number of detections, so a trained checkpoint gives the more realistic
figure. Images: BCCD val (data/bccd), letterboxed as detkit does.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT / "data" / "bccd"


def images(n: int, size: int) -> torch.Tensor:
    from detkit.data.coco import read_rgb
    from detkit.data.transforms import LetterboxImage
    val = json.loads((BCCD / "annotations" / "val.json").read_text())
    box = LetterboxImage(size)
    return torch.stack([torch.from_numpy(box(read_rgb(BCCD / "images" / im["file_name"]))[0].transpose(2, 0, 1)
                                         .copy()) for im in val["images"][:n]])


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--model", default="faster_rcnn")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from detkit.export import export_onnx, load_detector
    from detkit.paths import config_dir
    if args.checkpoint:
        module = load_detector(args.checkpoint)
    else:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            cfg = compose("train", overrides=[f"model={args.model}"])
        cats = [{"id": i, "name": n} for i, n in enumerate(["WBC", "RBC", "Platelets"])]
        module = instantiate(cfg.model, categories=cats, image_size=320, _recursive_=False)
    module.eval()
    size = int(module.hparams.get("image_size") or 320)
    path = export_onnx(module, Path(tempfile.mkdtemp()) / "model.onnx", size)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    print(f"{args.checkpoint or args.model + ' (random init)'}, {size} px, {args.threads} threads, torch "
          f"{torch.__version__}, onnxruntime {ort.__version__}")
    print("| batch | detkit PyTorch img/s | onnxruntime img/s | ratio ort/PyTorch |")
    print("| --- | --- | --- | --- |")
    for b in (1, 4):
        x = images(b, size)
        with torch.no_grad():
            t_pt = timed(lambda: module.inference_model.predict(x), args.reps)
        feed = {"images": x.numpy()}
        t_ort = timed(lambda: session.run(None, feed), args.reps)
        print(f"| {b} | {b / t_pt:.2f} | {b / t_ort:.2f} | {t_pt / t_ort:.2f}x |")


if __name__ == "__main__":
    main()
