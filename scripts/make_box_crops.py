"""Crop every box of a COCO detection set into an ImageFolder classification tree, so that an encoder can be probed
(``detkit-probe ENCODER.pt TRAIN_DIR VAL_DIR``: kNN and linear probe) on the objects of the detection domain.

    python scripts/make_box_crops.py ANN.json IMAGES_DIR OUT_DIR [--pad 0.1] [--min-side 4] [--per-class N]

One sub-folder per category, named ``<category id>_<name>`` with every character outside ``[A-Za-z0-9_-]`` replaced
(category names come from the dataset and never become a path of their own); one PNG per annotation,
``<annotation id>.png``, the box grown by ``--pad`` of its side on each side and clipped to the image. Crowd boxes,
boxes under ``--min-side`` pixels and image files outside ``IMAGES_DIR`` are skipped and counted. ``--per-class``
keeps the first N crops of each class (by annotation id).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import cv2

from detkit.data.validate import resolve_image_path


def folder_name(category: dict) -> str:
    """``<id>_<name>`` with anything but letters, digits, ``_`` and ``-`` replaced by ``_``."""
    return f"{int(category['id'])}_{re.sub(r'[^A-Za-z0-9_-]', '_', str(category['name']))[:64]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ann", type=Path)
    p.add_argument("images", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--pad", type=float, default=0.1)
    p.add_argument("--min-side", type=float, default=4.0)
    p.add_argument("--per-class", type=int, default=0, help="at most N crops per class (0: all)")
    args = p.parse_args()
    data = json.loads(args.ann.read_text())
    names = {c["id"]: folder_name(c) for c in data["categories"]}
    by_image = defaultdict(list)
    for a in sorted(data["annotations"], key=lambda a: a["id"]):
        by_image[a["image_id"]].append(a)
    written, skipped = Counter(), Counter()
    for im in data["images"]:
        path, problem = resolve_image_path(args.images, im["file_name"])
        if problem:
            skipped["image outside the root or missing"] += len(by_image[im["id"]])
            continue
        image = None
        for a in by_image[im["id"]]:
            cls = names.get(a["category_id"])
            if cls is None or a.get("iscrowd", 0):
                skipped["crowd or unknown category"] += 1
                continue
            if args.per_class and written[cls] >= args.per_class:
                continue
            x, y, w, h = a["bbox"]
            if min(w, h) < args.min_side:
                skipped[f"side under {args.min_side:g} px"] += 1
                continue
            if image is None:
                image = cv2.imread(str(path), cv2.IMREAD_COLOR)
                if image is None:
                    skipped["image does not decode"] += len(by_image[im["id"]])
                    break
            H, W = image.shape[:2]
            x0, y0 = max(0, int(x - args.pad * w)), max(0, int(y - args.pad * h))
            x1, y1 = min(W, int(round(x + w + args.pad * w))), min(H, int(round(y + h + args.pad * h)))
            if x1 <= x0 or y1 <= y0:
                skipped["box outside the image"] += 1
                continue
            folder = args.out / cls
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{int(a['id'])}.png"), image[y0:y1, x0:x1])
            written[cls] += 1
    print(json.dumps({"written": dict(written), "skipped": dict(skipped)}, indent=2))


if __name__ == "__main__":
    main()
