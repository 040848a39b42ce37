"""``detkit-predict checkpoint=CKPT input=FILE_OR_DIR``: detections on new images.

Writes ``OUT/predictions.json`` (COCO-style: ``images``, ``annotations`` with xywh boxes in original pixels and
scores, ``categories``) and, with ``draw=true``, ``OUT/visualizations/<image>.jpg`` with boxes, labels and scores.
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
from detkit.data.coco import read_rgb
from detkit.data.collate import detection_collate
from detkit.data.convert import IMAGE_SUFFIXES
from detkit.data.transforms import LetterboxImage
from detkit.data.unlabeled import list_images
from detkit.eval.coco_eval import detections_to_results
from detkit.paths import config_dir

log = logging.getLogger("detkit")
PALETTE = ["yellow", "cyan", "magenta", "lime", "orange", "red", "blue", "white"]


class ImageFiles(Dataset):
    """Image files -> ``(letterboxed uint8 [3, S, S], {"image_id", "orig_size", "scale", "boxes", "labels"})``,
    the image id being the file's index (no boxes: the batch's :class:`~detkit.data.collate.Targets` carry only
    the mapping back to original pixels)."""

    def __init__(self, files: list[Path], size: int) -> None:
        self.files, self.letterbox = files, LetterboxImage(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image = read_rgb(self.files[i])
        boxed, scale = self.letterbox(image)
        meta = {"image_id": i, "orig_size": torch.tensor(image.shape[:2]), "scale": scale,
                "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
        return torch.from_numpy(boxed.transpose(2, 0, 1).copy()), meta


def input_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise FileNotFoundError(f"{p} is not an image file ({', '.join(IMAGE_SUFFIXES)})")
        return [p]
    return list_images(p)


def draw(image_path: Path, det: dict, names: list[str], out: Path) -> None:
    image = torch.from_numpy(read_rgb(image_path)).permute(2, 0, 1).contiguous()
    labels = [f"{names[int(c)]} {float(s):.2f}" for c, s in zip(det["labels"], det["scores"])]
    colors = [PALETTE[int(c) % len(PALETTE)] for c in det["labels"]]
    drawn = draw_bounding_boxes(image, det["boxes"], labels=labels, colors=colors, width=2)
    write_jpeg(drawn, str(out), quality=90)


@hydra.main(config_path=str(config_dir()), config_name="predict", version_base="1.3")
@clean_errors
def main(cfg: DictConfig) -> None:
    from detkit.lit.detection_module import DetectionModule

    out = output_dir()
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    check_torchvision_ops("gpu" if device.type == "cuda" else "cpu")
    module = DetectionModule.from_checkpoint(cfg.checkpoint).to(device).eval()
    files = input_files(cfg.input)
    size = cfg.image_size or module.hparams.get("image_size") or 320
    loader = DataLoader(ImageFiles(files, size), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                        collate_fn=detection_collate, pin_memory=device.type == "cuda")
    names = module.categories.names
    images, results = [], []
    vis_dir = out / "visualizations"
    vis_dir.mkdir(parents=True, exist_ok=True)
    for batch, targets in tqdm(loader, desc="predict", unit="batch"):
        dets = module.predict_batch(batch.to(device, non_blocking=True), targets)
        for det, (h, w) in zip(dets, targets.orig_sizes.tolist()):
            keep = det["scores"] >= cfg.score_threshold
            det = {k: v[keep] if torch.is_tensor(v) else v for k, v in det.items()}
            path = files[det["image_id"]]
            images.append({"id": det["image_id"], "file_name": str(path), "width": w, "height": h})
            results += detections_to_results(det["boxes"], det["scores"], det["category_ids"], det["image_id"])
            if cfg.draw:
                draw(path, det, names, vis_dir / (path.stem + ".jpg"))
    for i, r in enumerate(results):
        r["id"] = i + 1
    coco = {"images": images, "annotations": results, "categories": module.categories.to_list()}
    (out / "predictions.json").write_text(json.dumps(coco))
    log.info("%d detections on %d images -> %s%s", len(results), len(images), out / "predictions.json",
             f"; drawings in {vis_dir}" if cfg.draw else "")


if __name__ == "__main__":
    main()
