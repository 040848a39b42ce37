"""Validation of COCO-format detection datasets, with one readable line per problem.

The same check backs ``detkit-data-check`` and runs before any training starts, so a broken dataset is refused with
a report that names the image id or annotation id and what is wrong, instead of failing later inside a data-loader
worker. Images are opened only when their ``file_name`` resolves inside the image root the user named.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from PIL import Image, UnidentifiedImageError

from detkit.errors import UserError

#: Boxes may overhang the image border by this many pixels (rounding in labelling tools) before it is a problem.
BORDER_TOLERANCE = 1.0

IMAGE_KEYS = ("id", "file_name", "width", "height")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
CATEGORY_KEYS = ("id", "name")


class UnusableInputError(UserError, ValueError):
    """The file is not a COCO detection json at all (``detkit-data-check`` exits with 2)."""


class DatasetError(UserError, ValueError):
    """A dataset failed validation; ``str(error)`` is the full report."""

    def __init__(self, report: "ValidationReport") -> None:
        self.report = report
        super().__init__(report.format())


@dataclass(frozen=True)
class Problem:
    """One problem in a dataset.

    Attributes:
        level: ``"image"`` (the image and its annotations are unusable), ``"annotation"`` (one annotation is
            unusable) or ``"dataset"`` (the category list is broken: nothing can be trained).
        kind: short machine-readable name, e.g. ``"bbox_nonpositive"``.
        message: what is wrong, in words.
        image_id / annotation_id / category_id: the offending ids, where they apply.
    """

    level: str
    kind: str
    message: str
    image_id: Any = None
    annotation_id: Any = None
    category_id: Any = None

    def where(self) -> str:
        if self.annotation_id is not None:
            suffix = f" (image id {self.image_id})" if self.image_id is not None else ""
            return f"annotation id {self.annotation_id}{suffix}"
        if self.image_id is not None:
            return f"image id {self.image_id}"
        if self.category_id is not None:
            return f"category id {self.category_id}"
        return "dataset"

    def __str__(self) -> str:
        return f"{self.where()}: {self.message} [{self.kind}]"


@dataclass
class ValidationReport:
    """All problems found in one annotation file."""

    ann_file: Path
    image_root: Path
    num_images: int = 0
    num_annotations: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_image_ids(self) -> set:
        return {p.image_id for p in self.problems if p.level == "image"}

    @property
    def bad_annotation_ids(self) -> set:
        return {p.annotation_id for p in self.problems if p.level == "annotation"}

    @property
    def fatal(self) -> list[Problem]:
        """Problems that no skipping can work around (a broken category list)."""
        return [p for p in self.problems if p.level == "dataset"]

    def counts(self) -> Counter:
        return Counter(p.kind for p in self.problems)

    def format(self, max_lines: int | None = None) -> str:
        head = (
            f"{self.ann_file} (images under {self.image_root}): {len(self.problems)} problem(s) in "
            f"{self.num_images} images and {self.num_annotations} annotations"
        )
        lines = [str(p) for p in self.problems]
        if max_lines is not None and len(lines) > max_lines:
            lines = lines[:max_lines] + [f"... and {len(self.problems) - max_lines} more"]
        return "\n".join([head, *lines])


def load_coco_json(ann_file: str | Path) -> dict:
    """Read a COCO detection json; raise :class:`UnusableInputError` if it is not json or not COCO-shaped."""
    path = Path(ann_file)
    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise UnusableInputError(f"{path}: file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnusableInputError(f"{path}: not valid json ({e})") from e
    if not isinstance(data, dict):
        raise UnusableInputError(f"{path}: not a COCO file (top level is {type(data).__name__}, expected an object)")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise UnusableInputError(f"{path}: not a COCO detection file (no top-level '{key}' list)")
        if not isinstance(data[key], list):
            raise UnusableInputError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def resolve_image_path(image_root: Path, file_name: Any) -> tuple[Path | None, str | None]:
    """Map a COCO ``file_name`` to a path inside ``image_root``.

    Returns ``(path, None)``, or ``(None, reason)`` when the name is not a relative path that stays inside the
    root (absolute paths, ``..`` escapes and symlinks leading outside are all refused, and never opened).
    """
    if not isinstance(file_name, str) or not file_name.strip():
        return None, f"file_name must be a non-empty string, got {file_name!r}"
    if Path(file_name).is_absolute() or file_name.startswith(("/", "\\")) or ":" in Path(file_name).parts[0]:
        return None, f"file_name {file_name!r} is an absolute path; it must be relative to the image root"
    root = image_root.resolve()
    path = (root / file_name).resolve()
    if not path.is_relative_to(root):
        return None, f"file_name {file_name!r} escapes the image root {root}"
    return path, None


def _check_categories(categories: list, report: ValidationReport) -> set:
    ids: Counter = Counter()
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict):
            report.problems.append(Problem("dataset", "category_not_object", f"categories[{i}] is not an object"))
            continue
        missing = [k for k in CATEGORY_KEYS if k not in cat]
        if missing:
            report.problems.append(Problem("dataset", "category_missing_keys", f"categories[{i}] lacks {missing}",
                                           category_id=cat.get("id")))
            continue
        if not _is_int(cat["id"]):
            report.problems.append(Problem("dataset", "category_id_type", f"category id must be an integer, "
                                           f"got {cat['id']!r}", category_id=cat["id"]))
            continue
        ids[cat["id"]] += 1
    for cid, n in ids.items():
        if n > 1:
            report.problems.append(Problem("dataset", "duplicate_category_id", f"{n} categories share this id",
                                           category_id=cid))
    if not categories:
        report.problems.append(Problem("dataset", "no_categories", "the categories list is empty"))
    return set(ids)


def _check_images(images: list, image_root: Path, report: ValidationReport) -> dict:
    """Check image records (keys, ids, file names); return ``{id: (record, path)}`` for the usable ones."""
    counts = Counter(img.get("id") for img in images if isinstance(img, dict) and _is_int(img.get("id")))
    usable: dict = {}
    for i, img in enumerate(images):
        if not isinstance(img, dict):
            report.problems.append(Problem("image", "image_not_object", f"images[{i}] is not an object",
                                           image_id=f"<images[{i}]>"))
            continue
        image_id = img.get("id", f"<images[{i}]>")
        missing = [k for k in IMAGE_KEYS if k not in img]
        if missing:
            report.problems.append(Problem("image", "image_missing_keys", f"lacks keys {missing}", image_id=image_id))
            continue
        if not _is_int(image_id):
            report.problems.append(Problem("image", "image_id_type", f"image id must be an integer, got {image_id!r}",
                                           image_id=image_id))
            continue
        if counts[image_id] > 1:
            report.problems.append(Problem("image", "duplicate_image_id",
                                           f"{counts[image_id]} images share this id", image_id=image_id))
            continue
        w, h = img["width"], img["height"]
        if not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
            report.problems.append(Problem("image", "image_size_invalid", f"width/height must be positive integers, "
                                           f"got {w!r} x {h!r}", image_id=image_id))
            continue
        path, reason = resolve_image_path(image_root, img["file_name"])
        if path is None:
            report.problems.append(Problem("image", "unsafe_file_name", reason, image_id=image_id))
            continue
        usable[image_id] = (img, path)
    return usable


def _check_annotations(annotations: list, images: dict, category_ids: set, report: ValidationReport) -> None:
    counts = Counter(a.get("id") for a in annotations if isinstance(a, dict) and _is_int(a.get("id")))
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            report.problems.append(Problem("annotation", "annotation_not_object",
                                           f"annotations[{i}] is not an object", annotation_id=f"<annotations[{i}]>"))
            continue
        ann_id = ann.get("id", f"<annotations[{i}]>")
        image_id = ann.get("image_id")

        def add(kind: str, message: str) -> None:
            report.problems.append(Problem("annotation", kind, message, image_id=image_id, annotation_id=ann_id))

        missing = [k for k in ANNOTATION_KEYS if k not in ann]
        if missing:
            add("annotation_missing_keys", f"lacks keys {missing}")
            continue
        if not _is_int(ann_id):
            add("annotation_id_type", f"annotation id must be an integer, got {ann_id!r}")
            continue
        if counts[ann_id] > 1:
            add("duplicate_annotation_id", f"{counts[ann_id]} annotations share this id")
            continue
        if ann["category_id"] not in category_ids:
            add("unknown_category", f"category_id {ann['category_id']!r} is not in the categories list")
            continue
        if image_id not in images:
            add("unknown_image", f"image_id {image_id!r} is not a (valid) image in the images list")
            continue
        bbox = ann["bbox"]
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            add("bbox_malformed", f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
            continue
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            add("bbox_nonpositive", f"bbox {bbox} has width or height <= 0")
            continue
        img = images[image_id][0]
        tol = BORDER_TOLERANCE
        if x < -tol or y < -tol or x + w > img["width"] + tol or y + h > img["height"] + tol:
            add("bbox_outside_image", f"bbox {bbox} (xywh) extends outside the {img['width']}x{img['height']} image")


def _check_image_file(image_id: Any, record: dict, path: Path) -> Problem | None:
    if not path.is_file():
        return Problem("image", "image_file_missing", f"file {record['file_name']!r} not found under the image root",
                       image_id=image_id)
    try:
        with Image.open(path) as im:
            size = im.size
            im.load()  # decodes the pixels: catches truncated and corrupt files, not only bad headers
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return Problem("image", "image_file_unreadable", f"file {record['file_name']!r} is not a readable image ({e})",
                       image_id=image_id)
    if size != (record["width"], record["height"]):
        return Problem("image", "image_size_mismatch", f"json says {record['width']}x{record['height']} but file "
                       f"{record['file_name']!r} is {size[0]}x{size[1]}", image_id=image_id)
    return None


def validate_coco(
    ann_file: str | Path,
    image_root: str | Path,
    check_images: bool = True,
    workers: int = 8,
    data: dict | None = None,
) -> ValidationReport:
    """Check a COCO detection dataset and return every problem found.

    Args:
        ann_file: the annotation json.
        image_root: directory the images' ``file_name`` values are relative to; nothing outside it is opened.
        check_images: also open every image (existence, decodability, size against the json).
        workers: threads used to decode images (PIL releases the GIL while decoding).
        data: the already-loaded json, to avoid reading the file twice.

    Raises:
        UnusableInputError: the file is not json or not COCO-shaped.
    """
    ann_file, image_root = Path(ann_file), Path(image_root)
    data = load_coco_json(ann_file) if data is None else data
    report = ValidationReport(ann_file, image_root, len(data["images"]), len(data["annotations"]))
    category_ids = _check_categories(data["categories"], report)
    images = _check_images(data["images"], image_root, report)
    if check_images and not image_root.is_dir():
        raise UnusableInputError(f"image root {image_root} is not a directory")
    if check_images and images:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            found = pool.map(lambda item: _check_image_file(item[0], *item[1]), images.items())
            for problem in found:
                if problem is not None:
                    report.problems.append(problem)
                    images.pop(problem.image_id)
    _check_annotations(data["annotations"], images, category_ids, report)
    return report


def drop_invalid(data: dict, report: ValidationReport) -> tuple[dict, str]:
    """Return a copy of ``data`` without the images and annotations the report marks as bad, and a summary.

    Annotations of a dropped image are dropped with it. Dataset-level problems (a broken category list) cannot be
    skipped and raise :class:`DatasetError`.
    """
    if report.fatal:
        raise DatasetError(report)
    bad_images, bad_anns = report.bad_image_ids, report.bad_annotation_ids
    images = [im for im in data["images"] if not (isinstance(im, dict) and im.get("id") in bad_images)
              and isinstance(im, dict) and _is_int(im.get("id"))]
    kept_ids = {im["id"] for im in images}
    anns = [a for a in data["annotations"] if isinstance(a, dict) and a.get("id") not in bad_anns
            and a.get("image_id") in kept_ids and _is_int(a.get("id"))]
    cleaned = {**data, "images": images, "annotations": anns}
    reasons = ", ".join(f"{kind}: {n}" for kind, n in sorted(report.counts().items()))
    summary = (f"{report.ann_file}: skipped {len(data['images']) - len(images)} image(s) and "
               f"{len(data['annotations']) - len(anns)} annotation(s) as invalid ({reasons})")
    return cleaned, summary


def group_by_image(annotations: Iterable[dict]) -> dict:
    """``{image_id: [annotation, ...]}`` in file order."""
    groups: dict = defaultdict(list)
    for ann in annotations:
        groups[ann["image_id"]].append(ann)
    return groups
