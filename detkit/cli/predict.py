"""``detkit-predict checkpoint=CKPT input=FILE_OR_DIR``: detections on new images.

Writes ``OUT/predictions.json`` (COCO-style: ``images``, ``annotations`` with xywh boxes in original pixels and
scores, ``categories``, and ``info``: the input folder, how many images were predicted, and every unreadable file
skipped, by name with the reason) and, with ``draw=true``, ``OUT/visualizations/<image path under the input folder>.jpg`` with boxes, labels
and scores.

The input is checked before the model is loaded (:mod:`detkit.data.image_files`): files without an image suffix
are ignored, files that do not decode are named and skipped (``skip_invalid=false``: refused), and an empty folder
or one where nothing decodes is a one-line error. A file that becomes unreadable during the run is skipped with a
warning and listed in ``info`` too. Images are read by detkit's one reading policy (stored pixels, EXIF
orientation ignored), so the boxes and the drawings match the files' pixels.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from torchvision.io import write_jpeg
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

from detkit.cli.common import check_torchvision_ops, clean_errors, output_dir
from detkit.data.collate import detection_collate
from detkit.data.convert import IMAGE_SUFFIXES
from detkit.data.image_files import ImageCheck, check_image_files, check_image_folder, read_rgb
from detkit.data.transforms import LetterboxImage
from detkit.eval.coco_eval import detections_to_results
from detkit.paths import config_dir

log = logging.getLogger("detkit")
PALETTE = ["yellow", "cyan", "magenta", "lime", "orange", "red", "blue", "white"]


class ImageFiles(Dataset):
    """Image files -> ``(letterboxed uint8 [3, S, S], {"image_id", "orig_size", "scale", "boxes", "labels"})``,
    the image id being the file's index (no boxes: the batch's :class:`~detkit.data.collate.Targets` carry only
    the mapping back to original pixels).

    A file that cannot be decoded any more (deleted or replaced since the check) gives a blank image with
    ``orig_size`` ``(0, 0)`` and a warning, instead of an exception that would end the run from inside a loader
    worker: the batch keeps its shape and :func:`predict` leaves that image out and lists it as skipped."""

    def __init__(self, files: list[Path], size: int) -> None:
        self.files, self.letterbox = files, LetterboxImage(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            image = read_rgb(self.files[i])
        except OSError:
            reason = "deleted" if not self.files[i].exists() else "no longer decodes"
            log.warning("image file %r became unreadable during the run (%s); skipped", str(self.files[i]), reason)
            size = self.letterbox.size
            meta = {"image_id": i, "orig_size": torch.zeros(2, dtype=torch.int64), "scale": 1.0,
                    "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
            return torch.zeros(3, size, size, dtype=torch.uint8), meta
        boxed, scale = self.letterbox(image)
        meta = {"image_id": i, "orig_size": torch.tensor(image.shape[:2]), "scale": scale,
                "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
        return torch.from_numpy(boxed.transpose(2, 0, 1).copy()), meta


def input_files(path: str, skip_invalid: bool = True) -> ImageCheck:
    """The checked input: one image file, or every image under a folder (see the module docstring)."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise FileNotFoundError(f"{p} is not an image file ({', '.join(IMAGE_SUFFIXES)})")
        return check_image_files(p.parent, [p.name], skip_invalid, what="predict input")
    return check_image_folder(p, skip_invalid, what="predict input")


def draw(image_path: Path, det: dict, names: list[str], out: Path) -> None:
    image = torch.from_numpy(read_rgb(image_path)).permute(2, 0, 1).contiguous()
    labels = [f"{names[int(c)]} {float(s):.2f}" for c, s in zip(det["labels"], det["scores"])]
    colors = [PALETTE[int(c) % len(PALETTE)] for c in det["labels"]]
    drawn = draw_bounding_boxes(image, det["boxes"], labels=labels, colors=colors, width=2)
    write_jpeg(drawn, str(out), quality=90)


def predict(cfg: DictConfig, out: Path) -> Path:
    """Predict on ``cfg.input`` (a predict config) into ``out``; return the path of ``predictions.json``."""
    from detkit.lit.detection_module import DetectionModule

    check = input_files(cfg.input, cfg.get("skip_invalid", True))  # before any work: the model is not loaded yet
    files = check.files
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    check_torchvision_ops("gpu" if device.type == "cuda" else "cpu")
    module = DetectionModule.from_checkpoint(cfg.checkpoint).to(device).eval()
    size = cfg.image_size or module.hparams.get("image_size") or 320
    loader = DataLoader(ImageFiles(files, size), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                        collate_fn=detection_collate, pin_memory=device.type == "cuda")
    names = module.categories.names
    images, results, broke = [], [], []
    vis_dir = out / "visualizations"
    vis_dir.mkdir(parents=True, exist_ok=True)
    for batch, targets in tqdm(loader, desc="predict", unit="batch"):
        dets = module.predict_batch(batch.to(device, non_blocking=True), targets)
        for det, (h, w) in zip(dets, targets.orig_sizes.tolist()):
            path = files[det["image_id"]]
            if h == 0 or w == 0:  # became unreadable during the run (ImageFiles warned): no predictions
                broke.append(path)
                continue
            keep = det["scores"] >= cfg.score_threshold
            det = {k: v[keep] if torch.is_tensor(v) else v for k, v in det.items()}
            images.append({"id": det["image_id"], "file_name": str(path), "width": w, "height": h})
            results += detections_to_results(det["boxes"], det["scores"], det["category_ids"], det["image_id"])
            if cfg.draw:
                try:
                    # the image's path under the input folder, plus .jpg: a.jpg, a.png and sub/a.jpg stay three
                    # drawings (the checked files all lie inside the folder, so this stays inside vis_dir)
                    rel = path.relative_to(check.root) if path.is_relative_to(check.root) else Path(path.name)
                    target = vis_dir / rel.parent / f"{rel.name}.jpg"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    draw(path, det, names, target)
                except OSError as e:  # changed between prediction and drawing: the predictions stand
                    log.warning("image file %r: not drawn (%s)", str(path), e)
    for i, r in enumerate(results):
        r["id"] = i + 1
    for path in broke:
        name = path.relative_to(check.root).as_posix() if path.is_relative_to(check.root) else str(path)
        check.skipped.append((name, "became unreadable during the run"))
    info = {**check.summary(), "images": len(images)}
    info["skipped"] = len(info["skipped_files"])
    coco = {"info": info, "images": images, "annotations": results, "categories": module.categories.to_list()}
    (out / "predictions.json").write_text(json.dumps(coco))
    skipped = f"; {info['skipped']} unreadable file(s) skipped (listed in its info)" if info["skipped"] else ""
    log.info("%d detections on %d images -> %s%s%s", len(results), len(images), out / "predictions.json", skipped,
             f"; drawings in {vis_dir}" if cfg.draw else "")
    return out / "predictions.json"


@hydra.main(config_path=str(config_dir()), config_name="predict", version_base="1.3")
@clean_errors
def main(cfg: DictConfig) -> None:
    predict(cfg, output_dir())


if __name__ == "__main__":
    main()
