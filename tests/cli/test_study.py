"""The pretraining study (issue 8): every arm on one schedule, the table built from the sweep's own summary."""

from __future__ import annotations

import csv
import itertools
import json
import math

import pytest
from hydra import compose, initialize_config_dir

from detkit.cli.study import aggregate, report, table
from detkit.paths import config_dir
from tests.helpers import TINY, TINY_FRCNN, cli, data_args


def compose_train(overrides: list[str]):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_study_experiment_sweeps_every_arm_on_one_schedule():
    cfg = compose_train(["experiment=study_bccd", "init=simclr", "encoder=/x/encoder.pt", "study.scale=3"])
    assert cfg.model.detector.backbone.init == "/x/encoder.pt"
    assert cfg.trainer.max_steps == 180 and cfg.trainer.max_epochs == -1  # steps x scale, epochs unbounded
    params = {k: v.split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert params == {"model": ["faster_rcnn", "yolo"], "init": ["scratch", "simclr"],
                      "data.train_fraction": ["0.25", "1.0"], "seed": ["0", "1", "2"]}
    assert math.prod(len(v) for v in params.values()) == 24
    scratch = compose_train(["experiment=study_bccd", "model=yolo", "encoder=/x/encoder.pt"])
    assert scratch.model.detector.backbone.init is None and scratch.trainer.max_steps == 60


@pytest.mark.parametrize("init", ["simclr", "densecl"])
def test_init_from_an_encoder_without_one_is_a_clear_error(synthetic, tmp_path, init):
    ann, root = synthetic
    r = cli("detkit-train", *data_args(ann, root), *TINY_FRCNN, f"init={init}", f"hydra.run.dir={tmp_path / 'x'}")
    assert r.returncode == 1
    assert f"init={init} needs the encoder file: add encoder=PATH/encoder.pt" in r.output
    assert "Traceback" not in r.output


def _fake_sweep(tmp_path, results: dict[tuple[str, str, str, int], float | None]):
    """A sweep folder as detkit-train -m writes it: job dirs with job_status.json, and summary.csv whose overrides
    column keeps only what varies (here the fraction is shared by all jobs, so it is absent from the column)."""
    sweep = tmp_path / "study" / "finetune"
    rows = []
    for job, ((model, init, fraction, seed), ap50) in enumerate(results.items()):
        out = sweep / str(job)
        out.mkdir(parents=True)
        overrides = [f"model={model}", f"init={init}", f"data.train_fraction={fraction}", f"seed={seed}"]
        status = "completed" if ap50 is not None else "failed"
        (out / "job_status.json").write_text(json.dumps({"job": job, "overrides": overrides, "status": status}))
        rows.append({"job": job, "overrides": " ".join(overrides[:2] + overrides[3:]), "status": status,
                     "AP": "" if ap50 is None else ap50 / 2, "AP50": "" if ap50 is None else ap50,
                     "AP75": "" if ap50 is None else ap50 / 4, "output_dir": str(out)})
    with (sweep / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return sweep.parent


def test_aggregate_gives_mean_and_std_per_arm_and_counts_failures(tmp_path):
    ap50 = {("faster_rcnn", "scratch", "0.25", 0): 0.40, ("faster_rcnn", "scratch", "0.25", 1): 0.50,
            ("faster_rcnn", "scratch", "0.25", 2): 0.60, ("faster_rcnn", "simclr", "0.25", 0): 0.70,
            ("faster_rcnn", "simclr", "0.25", 1): 0.70, ("faster_rcnn", "simclr", "0.25", 2): None}
    study = _fake_sweep(tmp_path, ap50)
    arms = aggregate(study / "finetune" / "summary.csv")
    assert [(a["model"], a["init"], a["fraction"], a["n"], a["failed"]) for a in arms] == [
        ("faster_rcnn", "scratch", 0.25, 3, 0), ("faster_rcnn", "simclr", 0.25, 2, 1)]
    scratch, simclr = arms
    assert math.isclose(scratch["AP50"]["mean"], 0.5) and math.isclose(scratch["AP50"]["std"], 0.1)
    assert math.isclose(scratch["AP"]["mean"], 0.25) and math.isclose(simclr["AP75"]["mean"], 0.175)
    assert simclr["AP50"]["std"] == 0.0 and simclr["seeds"] == ["0", "1"]
    md = table(arms)
    assert "| faster_rcnn | scratch | 25% | 3 | 0.250 ± 0.050 | 0.500 ± 0.100 | 0.125 ± 0.025 |  |" in md
    assert "| faster_rcnn | simclr | 25% | 2 (1 failed) |" in md and md.rstrip().endswith("| +0.200 |")


def test_report_writes_table_json_and_plot(tmp_path):
    results = {(m, i, f, s): 0.1 + 0.1 * s + (0.05 if i == "simclr" else 0)
               for m, i, f, s in itertools.product(("faster_rcnn", "yolo"), ("scratch", "simclr"), ("0.25", "1.0"),
                                                   range(3))}
    study = _fake_sweep(tmp_path, results)
    md = report(study)
    text = md.read_text()
    assert text.count("\n| ") == 2 + 8  # header, separator, 8 arms
    assert (study / "study_ap50.png").stat().st_size > 10_000
    arms = json.loads((study / "study.json").read_text())["arms"]
    assert len(arms) == 8 and all(a["n"] == 3 for a in arms)


def test_detkit_study_runs_end_to_end_on_a_tiny_dataset(synthetic, tmp_path):
    ann, root = synthetic
    out = tmp_path / "study"
    r = cli("detkit-study", "--out", str(out), "--pretrain-epochs", "1", "--pretrain-size", "32",
            "--pretrain-batch", "4", "--pretrain-override", "data.num_workers=0",
            "--arm", "tau05 model.temperature=0.5 data.crop_scale=[0.2,0.6]", "--",
            *data_args(ann, root), *TINY, "study.steps=2", "model=yolo", "seed=0", "data.train_fraction=1.0")
    assert r.returncode == 0, r.output[-3000:]
    arms = json.loads((out / "study.json").read_text())["arms"]
    assert [(a["model"], a["init"], a["n"]) for a in arms] == [("yolo", "scratch", 1), ("yolo", "simclr", 1),
                                                                ("yolo", "simclr:tau05", 1)]
    runs = [json.loads((out / "finetune" / str(job) / "run.json").read_text()) for job in (0, 1)]
    assert [r["encoder_init"] for r in runs] == [None, str(out / "pretrain" / "encoder.pt")]
    text = (out / "study.md").read_text()
    assert (out / "study_ap50.png").is_file() and "| yolo | simclr | 100% | 1 |" in text
    # the pretraining arm: its own encoder from its overrides, fine-tuned from it only (scratch rows are shared)
    arm = out / "arms" / "tau05"
    arm_cfg = (arm / "pretrain" / ".hydra" / "config.yaml").read_text()
    assert "temperature: 0.5" in arm_cfg and "- 0.2\n  - 0.6" in arm_cfg and "num_workers: 0" in arm_cfg
    assert not list((arm / "finetune").glob("1/run.json"))  # one job: init=simclr only
    arm_run = json.loads((arm / "finetune" / "0" / "run.json").read_text())
    assert arm_run["encoder_init"] == str(arm / "pretrain" / "encoder.pt")
    assert "| yolo | simclr:tau05 | 100% | 1 |" in text
    info = json.loads((out / "study.json").read_text())["pretraining_arms"]["tau05"]
    assert "model.temperature=0.5" in info["pretrain_overrides"] and "pretrain" in info


def test_a_pretraining_arm_needs_a_name_and_overrides():
    import pytest

    from detkit.cli.study import merge_overrides, parse_arm

    assert parse_arm("lars model.optimizer._target_=detkit.lit.lars.LARS") == (
        "lars", ["model.optimizer._target_=detkit.lit.lars.LARS"])
    for bad in ("model.temperature=0.5", "tau05", "bad/name x=1"):
        with pytest.raises(SystemExit, match="--arm"):
            parse_arm(bad)
    assert merge_overrides(["a=1", "b=2", "+c=3"], ["b=5", "c=4"]) == ["a=1", "b=5", "c=4"]


def test_a_study_on_the_users_data_uses_the_generic_data_config(tmp_path):
    """detkit-study -- data.train_ann=... must not inherit the demo set's settings (vertical flips, test split)."""
    from detkit.cli.study import finetune_command

    own = ["data.train_ann=/d/a.json", "data.train_images=/d/img", "data.val_ann=/d/b.json", "data.val_images=/d/img"]
    cmd = finetune_command(tmp_path, tmp_path / "encoder.pt", 1, own)
    overrides = [c for c in cmd[2:] if not c.startswith("hydra.")]
    cfg = compose_train([o for o in overrides if not o.startswith("encoder=")] + [f"encoder={tmp_path}/e.pt"])
    assert cfg.data.train_transform.vflip == 0.0 and cfg.data.test_ann is None and cfg.data.train_ann == "/d/a.json"
    demo = compose_train([c for c in finetune_command(tmp_path, tmp_path / "e.pt", 1, [])[2:]
                          if not c.startswith("hydra.")])
    assert demo.data.train_transform.vflip == 0.5 and demo.data.train_ann.endswith("bccd/annotations/train.json")
