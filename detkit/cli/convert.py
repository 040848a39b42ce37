"""``detkit-convert``: Pascal VOC xml or YOLO txt annotations to a COCO json (plus a category list file).

  detkit-convert voc  ANN_DIR IMAGE_DIR OUT.json [--ids ImageSets/Main/train.txt] [--classes a,b,c]
  detkit-convert yolo LABEL_DIR IMAGE_DIR OUT.json --classes classes.txt|a,b,c

Boxes that cannot be converted are listed one per line and left out (``--keep-invalid`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from detkit.data.convert import voc_to_coco, yolo_to_coco


def _classes(value: str | None) -> list[str] | None:
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [c.strip() for c in value.split(",") if c.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="detkit-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=["voc", "yolo"])
    parser.add_argument("ann_dir", help="VOC Annotations/ folder, or YOLO labels/ folder")
    parser.add_argument("image_dir", help="image folder (COCO file_name values are relative to it)")
    parser.add_argument("out", help="output COCO json")
    parser.add_argument("--ids", help="VOC: a file with one image id (xml stem) per line, e.g. ImageSets/Main/train.txt")
    parser.add_argument("--classes", help="class names: a file with one per line, or a comma-separated list")
    parser.add_argument("--keep-invalid", action="store_true", help="keep zero/negative-size boxes")
    args = parser.parse_args(argv)
    classes = _classes(args.classes)
    if args.format == "voc":
        ids = None
        if args.ids:
            ids = [s.strip() for s in Path(args.ids).read_text().splitlines() if s.strip()]
        coco, problems = voc_to_coco(args.ann_dir, args.image_dir, ids=ids, classes=classes,
                                     keep_invalid=args.keep_invalid)
    else:
        if classes is None:
            parser.error("yolo needs --classes (a classes.txt file or a comma-separated list)")
        coco, problems = yolo_to_coco(args.ann_dir, args.image_dir, classes, keep_invalid=args.keep_invalid)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(coco))
    cat_file = out.with_name(out.stem + "_categories.txt")
    cat_file.write_text("".join(f"{c['id']}\t{c['name']}\n" for c in coco["categories"]))
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    names = ", ".join(f"{c['id']}={c['name']}" for c in coco["categories"])
    print(f"wrote {out}: {len(coco['images'])} images, {len(coco['annotations'])} annotations, categories {names} "
          f"(also in {cat_file}); {len(problems)} box(es) left out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
