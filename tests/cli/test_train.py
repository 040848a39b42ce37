"""The console scripts as a user runs them: configs compose, runs write their outputs, errors are clean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from detkit.eval.coco_eval import STAT_KEYS
from detkit.paths import config_dir
from tests.helpers import TINY_FRCNN, data_args, dump, load, run

@pytest.mark.parametrize("overrides", [
    [], ["model=faster_rcnn", "backbone@model.detector.backbone=resnet18_c4",
         "model.detector.rpn.anchor_generator.sizes=[[32,64,128]]",
         "model.detector.rpn.anchor_generator.aspect_ratios=[[0.5,1.0,2.0]]"],
    ["optimizer=adamw", "scheduler=step", "logger=tensorboard"], ["experiment=pipeline"], ["model=yolo"],
    ["experiment=scratch_frcnn"], ["experiment=scratch_yolo"], ["experiment=simclr_frcnn"],
    ["experiment=simclr_yolo"],
])
def test_train_configs_compose_and_instantiate(overrides):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        # the demo sets BCCD itself; the other configs run on the data a user names (here the embedded BCCD set)
        data = [] if "experiment=pipeline" in overrides else ["data=bccd"]
        cfg = compose("train", overrides=[*data, *overrides, "paths.output_dir=/tmp/x"])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    model = instantiate(cfg.model, categories=dm.categories.to_list(), _recursive_=False)
    assert model.detector.num_classes == 3
    if "pretrain" in " ".join(overrides) or "simclr" in " ".join(overrides) or "pipeline" in " ".join(overrides):
        assert cfg.pretrain.data.images == cfg.data.train_images
    for node in cfg.callbacks.values():
        instantiate(node)


def test_the_default_data_config_is_the_generic_one_and_names_what_is_missing():
    """A user's paths never inherit the demo set's settings (vertical flips, a fixed size); with no data given, the
    error names the settings and what to type, before anything is built."""
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["data.train_ann=a.json", "data.train_images=img"])
        demo = compose("train", overrides=["experiment=pipeline"])
    assert cfg.data.train_transform.vflip == 0.0 and cfg.data.image_size is None and cfg.data.val_ann is None
    assert demo.data.train_ann.endswith("bccd/annotations/train.json") and demo.data.train_transform.vflip == 0.5
    r = run(["detkit-train", "hydra.run.dir=/tmp/detkit_missing_data"])
    text = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in text, text[-2000:]
    assert "required settings not given: data.train_ann, data.train_images" in text and "data=bccd" in text
    r = run(["detkit-train", "experiment=simclr_frcnn", "hydra.run.dir=/tmp/detkit_missing_data"])  # via ${data...}
    assert r.returncode == 1 and "Traceback" not in r.stderr and "data.train_images" in r.stdout + r.stderr


@pytest.mark.parametrize("name", ["gpu", "ddp", "ddp_cpu"])
def test_scale_up_trainer_configs_compose(name):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"trainer={name}"])
    assert cfg.trainer._target_ == "lightning.Trainer"
    assert cfg.trainer.accelerator in ("gpu", "cpu")


def test_train_writes_config_checkpoints_and_metrics(synthetic, tmp_path):
    ann, root = synthetic
    out = tmp_path / "run"
    r = run(["detkit-train", *data_args(ann, root), *TINY_FRCNN, f"hydra.run.dir={out}"])
    assert r.returncode == 0, r.stdout + r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(isinstance(metrics[k], float) for k in STAT_KEYS)
    assert [c["id"] for c in metrics["per_class"]] == [0, 1, 2]
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "pr_curves.png").is_file()
    # the anchors are measured against the training boxes before training; the ones trained with are in the config
    assert "best possible recall" in r.stdout + r.stderr
    priors = json.loads((out / "run.json").read_text())["priors"]["anchors"]
    assert 0.0 <= priors["coverage"]["bpr"] <= 1.0
    saved = OmegaConf.load(out / ".hydra" / "config.yaml").model.detector.rpn.anchor_generator
    trained_with = priors["fitted"] or priors["configured"]
    assert OmegaConf.to_container(saved.sizes) == trained_with["sizes"]
    # the checkpoint alone drives prediction and evaluation
    r = run(["detkit-predict", f"checkpoint={out / 'checkpoints' / 'last.ckpt'}", f"input={root}",
             "score_threshold=0.0", "device=cpu", f"hydra.run.dir={tmp_path / 'pred'}"])
    assert r.returncode == 0, r.stderr
    preds = load(tmp_path / "pred" / "predictions.json")
    assert len(preds["images"]) == 8 and len(list((tmp_path / "pred" / "visualizations").glob("*.jpg"))) == 8
    ckpt = out / "checkpoints" / "last.ckpt"
    r = run(["detkit-eval", f"checkpoint={ckpt}", f"data.val_ann={ann}", f"data.val_images={root}", "device=cpu",
             f"hydra.run.dir={tmp_path / 'ev'}"])
    assert r.returncode == 0, r.stderr
    assert load(tmp_path / "ev" / "metrics.json")["AP"] == pytest.approx(metrics["AP"], abs=1e-9)
    assert load(tmp_path / "ev" / "metrics.json")["device"] == "cpu"
    check_eval_refuses_other_categories(ckpt, ann, root, tmp_path, metrics["AP"])


def check_eval_refuses_other_categories(ckpt: Path, ann: Path, root: Path, tmp_path: Path, ap: float) -> None:
    """detkit-eval compares the checkpoint's categories with the dataset's; by_name maps renumbered ids."""
    data = load(ann)
    shifted = {**data, "categories": [{**c, "id": c["id"] + 10} for c in data["categories"]],
               "annotations": [{**a, "category_id": a["category_id"] + 10} for a in data["annotations"]]}
    shifted_ann = dump(shifted, tmp_path / "shifted.json")
    args = [f"checkpoint={ckpt}", f"data.val_ann={shifted_ann}", f"data.val_images={root}", "device=cpu"]
    r = run(["detkit-eval", *args, f"hydra.run.dir={tmp_path / 'ev2'}"])
    text = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in text, text
    assert "categories of checkpoint" in text and "'id': 10" in text and "'id': 0" in text  # both lists shown
    r = run(["detkit-eval", *args, "category_mapping=by_name", f"hydra.run.dir={tmp_path / 'ev3'}"])
    assert r.returncode == 0, r.stderr
    assert load(tmp_path / "ev3" / "metrics.json")["AP"] == pytest.approx(ap, abs=1e-9)
    renamed = {**data, "categories": [{**c, "name": c["name"] + "_x"} for c in data["categories"]]}
    args[1] = f"data.val_ann={dump(renamed, tmp_path / 'renamed.json')}"
    r = run(["detkit-eval", *args, "category_mapping=by_name", f"hydra.run.dir={tmp_path / 'ev4'}"])
    assert r.returncode == 1 and "no category named" in r.stdout + r.stderr


def test_eval_files_mode_and_its_errors(synthetic, tmp_path):
    ann, _ = synthetic
    gt = load(ann)
    preds = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
             for a in gt["annotations"]]
    good = dump(preds, tmp_path / "preds.json")
    r = run(["detkit-eval", f"ground_truth={ann}", f"predictions={good}", f"hydra.run.dir={tmp_path / 'e'}"])
    assert r.returncode == 0, r.stderr
    metrics = load(tmp_path / "e" / "metrics.json")
    assert metrics["AP"] == pytest.approx(1.0) and set(STAT_KEYS) <= set(metrics) and "per_class" in metrics
    bad = dump([{**preds[0], "image_id": 4242}, *preds[1:]], tmp_path / "bad.json")
    r = run(["detkit-eval", f"ground_truth={ann}", f"predictions={bad}", f"hydra.run.dir={tmp_path / 'e2'}"])
    assert r.returncode == 1
    assert "image_id 4242" in r.stdout + r.stderr and "Traceback" not in r.stdout + r.stderr


def test_train_refuses_a_broken_dataset_before_training(synthetic, tmp_path):
    ann, root = synthetic
    data = load(ann)
    data["annotations"][3]["bbox"] = [1, 1, 0, 5]
    broken = dump(data, tmp_path / "broken.json")
    r = run(["detkit-train", *data_args(broken, root), *TINY_FRCNN, f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 1
    text = r.stdout + r.stderr
    assert f"annotation id {data['annotations'][3]['id']}" in text and "bbox_nonpositive" in text
    assert "Traceback" not in text and not (tmp_path / "run" / "checkpoints").exists()


def test_pretrain_writes_an_encoder_the_detector_loads(synthetic, tmp_path):
    ann, root = synthetic
    out = tmp_path / "pre"
    r = run(["detkit-pretrain", f"data.images={root}", "data.image_size=32", "data.batch_size=4",
             "data.num_workers=0", "trainer.max_epochs=1", f"hydra.run.dir={out}"])
    assert r.returncode == 0, r.stderr
    assert (out / "encoder.pt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    r = run(["detkit-train", *data_args(ann, root), *TINY_FRCNN, f"model.detector.backbone.init={out / 'encoder.pt'}",
             f"hydra.run.dir={tmp_path / 'ft'}"])
    assert r.returncode == 0, r.stderr
    assert load(tmp_path / "ft" / "run.json")["encoder_init"] == str(out / "encoder.pt")
