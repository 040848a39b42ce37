"""``detkit-data-check ANN_JSON IMAGE_ROOT``: report every problem in a COCO dataset.

Exit status: 0 clean, 1 problems found (one line each, naming the image or annotation id), 2 unusable input.
"""

from __future__ import annotations

import argparse
import sys

from detkit.data.validate import UnusableInputError, validate_coco


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="detkit-data-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ann_json", help="COCO annotation json")
    parser.add_argument("image_root", help="directory that the images' file_name values are relative to")
    parser.add_argument("--no-images", action="store_true", help="check the json only; do not open images")
    parser.add_argument("--workers", type=int, default=8, help="threads decoding images (default 8)")
    args = parser.parse_args(argv)
    try:
        report = validate_coco(args.ann_json, args.image_root, check_images=not args.no_images,
                               workers=args.workers)
    except UnusableInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if report.ok:
        print(f"{args.ann_json}: OK ({report.num_images} images, {report.num_annotations} annotations)")
        return 0
    print(report.format())
    return 1


if __name__ == "__main__":
    sys.exit(main())
