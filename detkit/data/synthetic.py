"""Deterministic synthetic COCO detection data: coloured rectangles on a noisy background (fast tests, demos)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

#: One colour per synthetic class (RGB).
COLORS = ((220, 40, 40), (40, 200, 40), (40, 60, 220), (220, 200, 40))


def make_synthetic_coco(out_dir: str | Path, num_images: int = 8, size: tuple[int, int] = (128, 96),
                        num_classes: int = 3, max_objects: int = 4, first_id: int = 0, empty_every: int = 0,
                        seed: int = 0) -> tuple[Path, Path]:
    """Write ``out_dir/images/*.png`` and ``out_dir/annotations.json``; return ``(ann_file, image_root)``.

    Args:
        size: ``(width, height)`` of every image.
        first_id: first image, annotation and category id (0 exercises the ids labelling tools export).
        empty_every: every k-th image has no objects (0: none empty).
    """
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    w, h = size
    images, annotations = [], []
    for i in range(num_images):
        canvas = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        n = 0 if empty_every and i % empty_every == 0 else int(rng.integers(1, max_objects + 1))
        for _ in range(n):
            bw, bh = int(rng.integers(w // 8, w // 2)), int(rng.integers(h // 8, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            c = int(rng.integers(0, num_classes))
            canvas[y:y + bh, x:x + bw] = COLORS[c % len(COLORS)]
            annotations.append({"id": first_id + len(annotations), "image_id": first_id + i,
                                "category_id": first_id + c, "bbox": [x, y, bw, bh], "area": bw * bh,
                                "iscrowd": 0})
        name = f"img_{i:04d}.png"
        cv2.imwrite(str(image_dir / name), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        images.append({"id": first_id + i, "file_name": name, "width": w, "height": h})
    categories = [{"id": first_id + c, "name": f"class{c}"} for c in range(num_classes)]
    ann_file = out_dir / "annotations.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file, image_dir
