"""Misspelled config keys are errors that name the key and the closest valid one, before anything is built."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from detkit.config_check import ConfigKeyError, check_config_keys
from detkit.paths import config_dir
from tests.helpers import cli, data_args


def composed(*overrides: str):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("experiment", ["experiment=pipeline", "model=yolo", "experiment=study_bccd",
                                        "trainer=ddp", "optimizer=adamw", "optimizer=lars", "scheduler=one_cycle",
                                        "callbacks=early_stopping", "data=coco"])
def test_every_shipped_config_passes_the_check(experiment):
    check_config_keys(composed(experiment))


@pytest.mark.parametrize("key, suggestion", [
    ("model.backbone_lr_mul", "model.backbone_lr_mult"),
    ("model.detector.rpn.nms_tresh", "model.detector.rpn.nms_thresh"),
    ("trainer.max_epoch", "trainer.max_epochs"),
    ("data.batchsize", "data.batch_size"),
])
def test_a_misspelled_key_names_itself_and_the_closest_valid_key(key, suggestion):
    with pytest.raises(ConfigKeyError, match=rf"unknown config key {key} .*did you mean {suggestion}\?"):
        check_config_keys(composed(f"+{key}=1"))


def test_the_command_line_stops_on_a_misspelled_key_before_training(synthetic, tmp_path):
    ann, root = synthetic
    r = cli("detkit-train", *data_args(ann, root), "+model.backbone_lr_mul=0.1", f"hydra.run.dir={tmp_path / 'r'}")
    text = r.output
    assert r.returncode == 1, text
    assert "model.backbone_lr_mul" in text and "did you mean model.backbone_lr_mult?" in text
    assert "Traceback" not in text and not (tmp_path / "r" / "checkpoints").exists()
