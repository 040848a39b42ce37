"""Conversion of Pascal VOC xml and YOLO txt annotations to COCO json.

Both converters return ``(coco_dict, problems)``: boxes that cannot be represented (zero or negative size after
conversion, unparseable numbers, unknown class indices) are listed in ``problems`` with the file and object index
that holds them, and are left out of the json unless ``keep_invalid`` is set — never dropped silently.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _coco(images: list, annotations: list, names: Sequence[str], first_id: int) -> dict:
    categories = [{"id": first_id + i, "name": n, "supercategory": "none"} for i, n in enumerate(names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _annotation(ann_id: int, image_id: int, category_id: int, xyxy: Sequence[float]) -> dict:
    x0, y0, x1, y1 = xyxy
    w, h = x1 - x0, y1 - y0
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [x0, y0, w, h],
            "area": w * h, "iscrowd": 0}


def voc_to_coco(
    ann_dir: str | Path,
    image_dir: str | Path,
    ids: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    keep_invalid: bool = False,
) -> tuple[dict, list[str]]:
    """Convert a folder of Pascal VOC xml files.

    Args:
        ann_dir: folder of ``<id>.xml``.
        image_dir: folder the COCO ``file_name`` values will be relative to (the xml ``filename``).
        ids: image ids (xml stems) to convert, e.g. the lines of ``ImageSets/Main/train.txt``; all xml by default.
        classes: category names in id order (ids ``1..K``); by default the sorted names found in the xml files.
        keep_invalid: keep boxes with non-positive size instead of leaving them out.

    VOC pixel indexes are 1-based: ``xmin``/``ymin`` are shifted by -1 (as detectron2 does), so a box spanning a
    whole ``W``-pixel-wide image becomes ``[0, W]`` in continuous ``xyxy`` coordinates.
    """
    ann_dir, image_dir = Path(ann_dir), Path(image_dir)
    stems = list(ids) if ids is not None else sorted(p.stem for p in ann_dir.glob("*.xml"))
    parsed, problems = [], []
    for stem in stems:
        xml = ann_dir / f"{stem}.xml"
        root = ET.parse(xml).getroot()
        size = root.find("size")
        width, height = int(float(size.findtext("width"))), int(float(size.findtext("height")))
        file_name = root.findtext("filename") or f"{stem}.jpg"
        objects = []
        for k, obj in enumerate(root.findall("object")):
            box = obj.find("bndbox")
            try:
                x0, y0, x1, y1 = (float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError, AttributeError):
                problems.append(f"{xml.name}: object #{k} ({obj.findtext('name')}): unreadable bndbox, left out")
                continue
            objects.append((obj.findtext("name").strip(), [x0 - 1, y0 - 1, x1, y1], k,
                            int(obj.findtext("difficult") or 0)))
        parsed.append((stem, file_name, width, height, objects))
    names = list(classes) if classes is not None else sorted({o[0] for *_, objs in parsed for o in objs})
    cat_of = {n: i + 1 for i, n in enumerate(names)}
    images, annotations = [], []
    for image_id, (stem, file_name, width, height, objects) in enumerate(parsed, start=1):
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for name, xyxy, k, difficult in objects:
            where = f"{stem}.xml: object #{k} ({name}, xyxy {xyxy})"
            if name not in cat_of:
                problems.append(f"{where}: class {name!r} is not in the class list, left out")
                continue
            if (xyxy[2] <= xyxy[0] or xyxy[3] <= xyxy[1]) and not keep_invalid:
                problems.append(f"{where}: box has zero or negative size, left out")
                continue
            ann = _annotation(len(annotations) + 1, image_id, cat_of[name], xyxy)
            if difficult:
                ann["difficult"] = 1
            annotations.append(ann)
    return _coco(images, annotations, names, first_id=1), problems


def yolo_to_coco(
    label_dir: str | Path,
    image_dir: str | Path,
    classes: Sequence[str],
    keep_invalid: bool = False,
) -> tuple[dict, list[str]]:
    """Convert YOLO txt labels (``class cx cy w h`` per line, normalised to [0, 1]).

    Category ids keep YOLO's class indices (``0..K-1``). Every image in ``image_dir`` becomes a COCO image; one
    without a label file has no annotations. Image sizes are read from the file headers.
    """
    label_dir, image_dir = Path(label_dir), Path(image_dir)
    image_files = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    images, annotations, problems = [], [], []
    for image_id, path in enumerate(image_files, start=1):
        rel = path.relative_to(image_dir).as_posix()
        try:
            with Image.open(path) as im:
                width, height = im.size
        except (OSError, SyntaxError, ValueError) as e:  # one broken file must not end the conversion
            problems.append(f"{rel}: not a readable image ({e}), left out with its labels")
            continue
        images.append({"id": image_id, "file_name": rel, "width": width, "height": height})
        label_file = label_dir / Path(rel).with_suffix(".txt")
        if not label_file.is_file():
            continue
        for k, line in enumerate(label_file.read_text().splitlines()):
            if not line.strip():
                continue
            where = f"{label_file.name}: line {k + 1}"
            parts = line.split()
            try:
                cls, cx, cy, w, h = int(parts[0]), *(float(v) for v in parts[1:5])
            except (ValueError, IndexError):
                problems.append(f"{where}: expected 'class cx cy w h', got {line!r}, left out")
                continue
            if not 0 <= cls < len(classes):
                problems.append(f"{where}: class index {cls} outside 0..{len(classes) - 1}, left out")
                continue
            xyxy = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
            if (w <= 0 or h <= 0) and not keep_invalid:
                problems.append(f"{where}: box has zero or negative size, left out")
                continue
            annotations.append(_annotation(len(annotations) + 1, image_id, cls, xyxy))
    return _coco(images, annotations, classes, first_id=0), problems
