"""detkit-probe: an encoder file measured by kNN and a linear probe on an ImageFolder tree; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from detkit.cli.probe import main
from detkit.models.backbones import ResNetEncoder, save_encoder


def _tree(root: Path, per_class: int = 4) -> Path:
    """Two classes a probe can tell apart: dark images and bright images."""
    rng = np.random.default_rng(0)
    for name, base in (("dark", 30), ("bright", 220)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(base + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / name / f"{i}.png"), img)
    return root


def test_probe_measures_an_encoder_and_separates_an_easy_pair_of_classes(tmp_path, capsys):
    enc = save_encoder(ResNetEncoder(depth=18, small_stem=True), tmp_path / "encoder.pt")
    tree = _tree(tmp_path / "tree")
    assert main([str(enc), str(tree), str(tree), "--size", "16", "--k", "3", "--workers", "0",
                 "--probe-epochs", "50"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["train_images"] == result["val_images"] == 8
    assert result["knn_top1"] == 1.0 and result["linear_probe_top1"] == 1.0  # brightness alone separates them


def test_probe_bad_input_is_one_line_and_exit_status_1(tmp_path, capsys):
    assert main([str(tmp_path / "missing.pt"), str(tmp_path), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "detkit-probe: error:" in err and "missing.pt" in err and "Traceback" not in err
    enc = save_encoder(ResNetEncoder(depth=18, small_stem=True), tmp_path / "encoder.pt")
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "broken.jpg").write_bytes(b"not an image")
    assert main([str(enc), str(empty), str(empty), "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert "detkit-probe: error:" in err and "Traceback" not in err
