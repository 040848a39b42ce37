"""detkit-train, detkit-eval and detkit-predict as a user runs them, in-process (the entry points themselves, on
``sys.argv``; tests/cli/test_commands.py runs each console script once as a subprocess): configs compose, runs
write their outputs, a checkpoint alone drives prediction and evaluation, and errors are one clear message with
exit status 1."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from detkit.eval.coco_eval import STAT_KEYS
from detkit.paths import config_dir
from tests.helpers import TINY_FRCNN, cli, data_args, dump, load


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


def test_the_default_data_config_is_the_generic_one_and_names_what_is_missing(tmp_path):
    """A user's paths never inherit the demo set's settings (vertical flips, a fixed size); with no data given, the
    error names the settings and what to type, before anything is built."""
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["data.train_ann=a.json", "data.train_images=img"])
        demo = compose("train", overrides=["experiment=pipeline"])
    assert cfg.data.train_transform.vflip == 0.0 and cfg.data.image_size is None and cfg.data.val_ann is None
    assert demo.data.train_ann.endswith("bccd/annotations/train.json") and demo.data.train_transform.vflip == 0.5
    r = cli("detkit-train", f"hydra.run.dir={tmp_path / 'a'}")
    assert r.returncode == 1 and "Traceback" not in r.output, r.output[-2000:]
    assert "required settings not given: data.train_ann, data.train_images" in r.output and "data=bccd" in r.output
    assert not (tmp_path / "a" / "checkpoints").exists()
    r = cli("detkit-train", "experiment=simclr_frcnn", f"hydra.run.dir={tmp_path / 'b'}")  # via ${data...}
    assert r.returncode == 1 and "Traceback" not in r.output and "data.train_images" in r.output


def test_train_writes_config_checkpoints_and_metrics(trained_run):
    out = trained_run
    metrics = load(out / "metrics.json")
    assert all(isinstance(metrics[k], float) for k in STAT_KEYS)
    assert [c["id"] for c in metrics["per_class"]] == [0, 1, 2]
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "pr_curves.png").is_file()
    # the anchors are measured against the training boxes before training; the ones trained with are in the config
    assert "best possible recall" in (out / "train.log").read_text()
    priors = load(out / "run.json")["priors"]["anchors"]
    assert 0.0 <= priors["coverage"]["bpr"] <= 1.0
    saved = OmegaConf.load(out / ".hydra" / "config.yaml").model.detector.rpn.anchor_generator
    trained_with = priors["fitted"] or priors["configured"]
    assert OmegaConf.to_container(saved.sizes) == trained_with["sizes"]


def best_checkpoint(run) -> str:
    """The checkpoint detkit-train evaluated for its metrics.json (best by val AP)."""
    return load(run / "run.json")["checkpoint"]


def test_the_checkpoint_alone_drives_prediction_and_evaluation(trained_run, synthetic_set, tmp_path):
    ann, root = synthetic_set
    r = cli("detkit-predict", f"checkpoint={trained_run / 'checkpoints' / 'last.ckpt'}", f"input={root}",
            "score_threshold=0.0", "device=cpu", f"hydra.run.dir={tmp_path / 'pred'}")
    assert r.returncode == 0, r.output[-3000:]
    preds = load(tmp_path / "pred" / "predictions.json")
    assert len(preds["images"]) == 8 and len(list((tmp_path / "pred" / "visualizations").glob("*.jpg"))) == 8
    r = cli("detkit-eval", f"checkpoint={best_checkpoint(trained_run)}", f"data.val_ann={ann}",
            f"data.val_images={root}", "device=cpu", f"hydra.run.dir={tmp_path / 'ev'}")
    assert r.returncode == 0, r.output[-3000:]
    evaluated = load(tmp_path / "ev" / "metrics.json")
    assert evaluated["AP"] == pytest.approx(load(trained_run / "metrics.json")["AP"], abs=1e-9)
    assert evaluated["device"] == "cpu"


def test_eval_refuses_a_dataset_with_other_categories_and_maps_them_by_name(trained_run, synthetic_set, tmp_path):
    """detkit-eval compares the checkpoint's categories with the dataset's; by_name maps renumbered ids."""
    ann, root = synthetic_set
    data = load(ann)
    shifted = {**data, "categories": [{**c, "id": c["id"] + 10} for c in data["categories"]],
               "annotations": [{**a, "category_id": a["category_id"] + 10} for a in data["annotations"]]}
    shifted_ann = dump(shifted, tmp_path / "shifted.json")
    args = [f"checkpoint={best_checkpoint(trained_run)}", f"data.val_ann={shifted_ann}", f"data.val_images={root}",
            "device=cpu"]
    r = cli("detkit-eval", *args, f"hydra.run.dir={tmp_path / 'ev2'}")
    assert r.returncode == 1 and "Traceback" not in r.output, r.output
    assert "categories of checkpoint" in r.output and "'id': 10" in r.output and "'id': 0" in r.output  # both lists
    r = cli("detkit-eval", *args, "category_mapping=by_name", f"hydra.run.dir={tmp_path / 'ev3'}")
    assert r.returncode == 0, r.output[-3000:]
    assert load(tmp_path / "ev3" / "metrics.json")["AP"] == pytest.approx(load(trained_run / "metrics.json")["AP"],
                                                                          abs=1e-9)
    renamed = {**data, "categories": [{**c, "name": c["name"] + "_x"} for c in data["categories"]]}
    args[1] = f"data.val_ann={dump(renamed, tmp_path / 'renamed.json')}"
    r = cli("detkit-eval", *args, "category_mapping=by_name", f"hydra.run.dir={tmp_path / 'ev4'}")
    assert r.returncode == 1 and "no category named" in r.output


def test_eval_files_mode_and_its_errors(synthetic, tmp_path):
    ann, _ = synthetic
    gt = load(ann)
    preds = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
             for a in gt["annotations"]]
    good = dump(preds, tmp_path / "preds.json")
    r = cli("detkit-eval", f"ground_truth={ann}", f"predictions={good}", f"hydra.run.dir={tmp_path / 'e'}")
    assert r.returncode == 0, r.output[-3000:]
    metrics = load(tmp_path / "e" / "metrics.json")
    assert metrics["AP"] == pytest.approx(1.0) and set(STAT_KEYS) <= set(metrics) and "per_class" in metrics
    bad = dump([{**preds[0], "image_id": 4242}, *preds[1:]], tmp_path / "bad.json")
    r = cli("detkit-eval", f"ground_truth={ann}", f"predictions={bad}", f"hydra.run.dir={tmp_path / 'e2'}")
    assert r.returncode == 1
    assert "image_id 4242" in r.output and "Traceback" not in r.output


def test_train_refuses_a_broken_dataset_before_training(synthetic, tmp_path):
    ann, root = synthetic
    data = load(ann)
    data["annotations"][3]["bbox"] = [1, 1, 0, 5]
    broken = dump(data, tmp_path / "broken.json")
    r = cli("detkit-train", *data_args(broken, root), *TINY_FRCNN, f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 1
    assert f"annotation id {data['annotations'][3]['id']}" in r.output and "bbox_nonpositive" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "run" / "checkpoints").exists()


def test_pretrain_writes_an_encoder_the_detector_loads(synthetic, tmp_path):
    ann, root = synthetic
    out = tmp_path / "pre"
    r = cli("detkit-pretrain", f"data.images={root}", "debug=tiny_pretrain", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.output[-3000:]
    assert (out / "encoder.pt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    r = cli("detkit-train", *data_args(ann, root), *TINY_FRCNN, f"model.detector.backbone.init={out / 'encoder.pt'}",
            "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1", f"hydra.run.dir={tmp_path / 'ft'}")
    assert r.returncode == 0, r.output[-3000:]
    assert load(tmp_path / "ft" / "run.json")["encoder_init"] == str(out / "encoder.pt")
