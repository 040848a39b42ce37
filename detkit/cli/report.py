"""``detkit-report RUN``: (re)write ``RUN/report.html``, the results browser of an evaluated run (see
:mod:`detkit.eval.html_report`), from the run's ``metrics.json``, ``predictions.json`` and ``.hydra/config.yaml``
(for the ground truth and the images: ``data.val_ann`` and ``data.val_images``, or for a ``data.holdout_fraction``
run ``holdout_ground_truth.json`` and ``data.train_images``; ``--ann``/``--images`` override),
loaded with :func:`detkit.run_config.load_run_config`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from detkit.eval.html_report import build_report
from detkit.run_config import HOLDOUT_GT, load_run_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="detkit-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a detkit-train or detkit-eval output directory")
    p.add_argument("--ann", help="ground-truth COCO json (default: the run's data.val_ann or ground_truth)")
    p.add_argument("--images", help="the images' folder (default: the run's data.val_images)")
    args = p.parse_args(argv)
    run = args.run
    try:
        for name in ("metrics.json", "predictions.json"):
            if not (run / name).is_file():
                raise FileNotFoundError(f"{run / name} does not exist: is {run} an evaluated detkit run?")
        cfg = load_run_config(run)
        if OmegaConf.select(cfg, "data.holdout_fraction"):  # scored on held-out training images
            ann = args.ann or run / HOLDOUT_GT
            if not Path(ann).is_file():
                raise FileNotFoundError(f"{ann} does not exist: {run} was scored on held-out training images "
                                        "(data.holdout_fraction); give --ann GT.json --images DIR")
            images = args.images or OmegaConf.select(cfg, "data.train_images")
        else:
            ann = args.ann or OmegaConf.select(cfg, "data.val_ann") or OmegaConf.select(cfg, "ground_truth")
            images = args.images or OmegaConf.select(cfg, "data.val_images")
        if not ann or not images:
            raise FileNotFoundError(f"{run}: cannot tell the ground truth and images from its config; give --ann "
                                    "GT.json --images DIR")
        results = json.loads((run / "predictions.json").read_text())
        if isinstance(results, dict):
            results = results.get("annotations", [])
        path = build_report(run, json.loads(Path(ann).read_text()), results, Path(images),
                            json.loads((run / "metrics.json").read_text()), title=f"detkit-report {run}")
    except (FileNotFoundError, ValueError) as e:
        print(f"detkit-report: {e}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
