"""Write a deterministic synthetic COCO dataset: python scripts/make_synthetic_coco.py OUT_DIR [N_IMAGES]."""

import sys

from detkit.data.synthetic import make_synthetic_coco

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "synthetic"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    ann, images = make_synthetic_coco(out, num_images=n, first_id=0, empty_every=5)
    print(f"wrote {ann} and {images}")
