"""``detkit-export checkpoint=RUN/checkpoints/best.ckpt [format=onnx] [image_size=...] [dynamic_batch=true]``:
the detector as one ONNX graph (uint8 images in, padded detections out, NMS included; see :mod:`detkit.export`),
written to ``OUT/model.onnx`` with ``OUT/model.json`` (categories, input size, output layout). Needs the export
extra: ``pip install "detkit[export]"``.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from detkit.cli.common import clean_errors, output_dir
from detkit.export import ExportError, export_onnx, load_detector
from detkit.paths import config_dir

log = logging.getLogger("detkit")


@hydra.main(config_path=str(config_dir()), config_name="export", version_base="1.3")
@clean_errors
def main(cfg: DictConfig) -> None:
    if cfg.format != "onnx":
        raise ExportError(f"format={cfg.format!r}: only onnx is supported")
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as e:
        raise ExportError(f"ONNX export needs the export extra: pip install \"detkit[export]\" ({e})") from e
    module = load_detector(cfg.checkpoint)
    path = export_onnx(module, output_dir() / "model.onnx", cfg.image_size, cfg.batch_size, cfg.dynamic_batch,
                       cfg.half, cfg.opset)
    onnx.checker.check_model(str(path))
    log.info("ONNX model: %s (checked by onnx.checker)\nits categories and input size: %s", path,
             path.with_suffix(".json"))


if __name__ == "__main__":
    main()
