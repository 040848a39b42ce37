"""``detkit-probe ENCODER.pt TRAIN_DIR VAL_DIR``: measure an encoder file without fine-tuning it.

Reports cosine kNN accuracy and linear-probe accuracy (a linear classifier on frozen features) on an ImageFolder
classification set (one sub-folder per class), as JSON. ``--random`` measures a randomly initialised encoder of the
file's architecture instead (the baseline any pretraining must beat); ``--pixels`` measures raw pixels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from detkit.data.unlabeled import ImageFolderDataset, ResizeImage
from detkit.errors import USER_ERRORS
from detkit.eval.ssl_eval import extract_features, knn_accuracy, linear_probe
from detkit.models.backbones import build_encoder, load_encoder, read_encoder_file


class _Pixels(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1).float() / 255.0


def main(argv: list[str] | None = None) -> int:
    """Entry point: a user-input error (a missing or unfit encoder file, a folder with no readable images) is one
    line on stderr and exit status 1, as for the Hydra commands."""
    try:
        return _probe(argv)
    except USER_ERRORS as e:
        print(f"detkit-probe: error: {e}", file=sys.stderr)
        return 1


def _probe(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="detkit-probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("encoder", help="encoder file written by detkit-pretrain (encoder.pt)")
    p.add_argument("train_dir", help="ImageFolder tree: the kNN bank / probe training set")
    p.add_argument("val_dir", help="ImageFolder tree: the evaluation set")
    p.add_argument("--size", type=int, default=32, help="images are resized to size x size (default 32)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--per-class", type=int, default=None, help="use at most this many images per class")
    p.add_argument("--probe-epochs", type=int, default=100)
    p.add_argument("--random", action="store_true", help="a random encoder of the file's architecture")
    p.add_argument("--pixels", action="store_true", help="raw pixels instead of an encoder")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if args.pixels:
        encoder: torch.nn.Module = _Pixels()
    elif args.random:
        torch.manual_seed(0)
        encoder = build_encoder(read_encoder_file(args.encoder)["arch"])
    else:
        encoder = load_encoder(args.encoder)
    start = time.time()
    transform = ResizeImage(args.size)
    train = ImageFolderDataset(args.train_dir, transform, args.per_class)
    val = ImageFolderDataset(args.val_dir, transform, args.per_class)
    xtr, ytr = extract_features(encoder, train, num_workers=args.workers)
    xte, yte = extract_features(encoder, val, num_workers=args.workers)
    result = {
        "encoder": "pixels" if args.pixels else ("random " if args.random else "") + str(args.encoder),
        "knn_top1": knn_accuracy(xtr, ytr, xte, yte, k=args.k),
        "knn_top1_k1": knn_accuracy(xtr, ytr, xte, yte, k=1),
        "linear_probe_top1": linear_probe(xtr, ytr, xte, yte, epochs=args.probe_epochs),
        "train_images": len(train), "val_images": len(val), "wall_time_s": round(time.time() - start, 1),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
