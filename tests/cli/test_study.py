"""The study (issue 29 item 4, issue 32 item 4): every arm on one schedule, the unlabeled sets, the intervals, the
checks, and the table built from the sweeps' own summaries."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import math
import os
import re

import pytest
from hydra import compose, initialize_config_dir

from detkit.cli.study import (aggregate, budget_checks, pretrain_summary, report, t_interval, t_quantile, table,
                              welch_interval)
from detkit.config_check import check_config_keys
from detkit.paths import config_dir
from tests.helpers import TINY, TINY_FRCNN, cli, data_args


def compose_train(overrides: list[str]):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_study_experiment_sweeps_every_arm_on_one_schedule():
    cfg = compose_train(["experiment=study_bccd", "init=simclr", "encoder=/x/encoder.pt", "study.scale=3"])
    assert cfg.model.detector.backbone.init == "/x/encoder.pt"
    assert cfg.trainer.max_steps == 450 and cfg.trainer.max_epochs == -1  # steps x scale, epochs unbounded
    assert cfg.data.batch_size == 16 and cfg.data.subset_seed == 0
    params = {k: v.split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert params == {"seed": ["0", "1", "2", "3", "4"], "model": ["faster_rcnn", "yolo"],
                      "init": ["scratch", "simclr"], "data.train_fraction": ["0.1", "1.0"]}
    assert list(params)[0] == "seed"  # varies slowest: a sweep cut short has every arm at fewer seeds
    assert math.prod(len(v) for v in params.values()) == 40
    scratch = compose_train(["experiment=study_bccd", "model=yolo", "encoder=/x/encoder.pt"])
    assert scratch.model.detector.backbone.init is None and scratch.trainer.max_steps == 150


def test_the_cpu_and_gpu_presets_compose_and_pass_the_key_check():
    cpu = compose_train(["experiment=study_bccd_cpu"])
    assert cpu.trainer.max_steps == 300 and cpu.data.batch_size == 4 and cpu.trainer.accelerator == "cpu"
    assert {k: v for k, v in cpu.hydra.sweeper.params.items()} == {
        "seed": "0,1,2,3,4", "model": "yolo", "init": "scratch,simclr", "data.train_fraction": "0.05,1.0"}
    gpu = compose_train(["experiment=study_bccd_gpu", "semi=teacher", "semi.unlabeled_images=/x"])
    assert gpu.trainer.accelerator == "gpu" and gpu.trainer.precision == "32-true" and gpu.data.num_workers == 0
    assert gpu.callbacks.last_checkpoint is None and gpu.report is False and gpu.trainer.max_steps == 150
    assert gpu.semi.enabled and gpu.semi.teacher_decay == 0.95  # the experiment's teacher, for a 150-step run
    for cfg in (cpu, gpu, compose_train(["experiment=study_bccd", "init=densecl", "encoder=/x/e.pt"])):
        check_config_keys(cfg)


@pytest.mark.parametrize("init", ["simclr", "densecl"])
def test_init_from_an_encoder_without_one_is_a_clear_error(synthetic, tmp_path, init):
    ann, root = synthetic
    r = cli("detkit-train", *data_args(ann, root), *TINY_FRCNN, f"init={init}", f"hydra.run.dir={tmp_path / 'x'}")
    assert r.returncode == 1
    assert f"init={init} needs the encoder file: add encoder=PATH/encoder.pt" in r.output
    assert "Traceback" not in r.output


# ---------------------------------------------------------------------------------------------------- statistics
def test_t_quantiles_and_intervals_match_the_tables():
    # t(0.975, df) from the tables, and a real (Welch) df
    for df, t in [(1, 12.706204736), (2, 4.302652730), (4, 2.776445105), (10, 2.228138852), (30, 2.042272456)]:
        assert math.isclose(t_quantile(0.975, df), t, rel_tol=1e-8), df
    assert math.isclose(t_quantile(0.025, 4), -2.776445105, rel_tol=1e-8)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 1.7, 2, 3, 3.7167, 4, 7, 29, 200):
        for p in (0.9, 0.975, 0.995):
            assert math.isclose(t_quantile(p, df), scipy_stats.t.ppf(p, df), rel_tol=1e-8), (p, df)


def test_t_interval_and_welch_by_hand():
    s = t_interval([0.4, 0.5, 0.6])
    assert math.isclose(s["mean"], 0.5) and math.isclose(s["std"], 0.1)
    assert math.isclose(s["ci95"], 4.302652730 * 0.1 / math.sqrt(3), rel_tol=1e-8)  # 0.2484
    assert math.isclose(s["lo"], 0.5 - s["ci95"]) and math.isclose(s["hi"], 0.5 + s["ci95"])
    one = t_interval([0.3])
    assert one["mean"] == 0.3 and one["ci95"] is None and one["std"] == 0.0
    # Welch: a = 1..4 (variance 5/3), b = 2, 2.5 (variance 1/8): df = (va + vb)^2 / (va^2/3 + vb^2/1) = 3.7167
    w = welch_interval([1, 2, 3, 4], [2, 2.5])
    va, vb = (5 / 3) / 4, 0.125 / 2
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2)
    assert math.isclose(w["diff"], 0.25) and math.isclose(w["df"], df) and math.isclose(df, 3.7167, rel_tol=1e-4)
    assert math.isclose(w["ci95"], t_quantile(0.975, df) * math.sqrt(va + vb), rel_tol=1e-10)
    scipy_stats = pytest.importorskip("scipy.stats")
    ci = scipy_stats.ttest_ind([1, 2, 3, 4], [2, 2.5], equal_var=False).confidence_interval(0.95)
    assert math.isclose(w["lo"], ci.low, rel_tol=1e-8) and math.isclose(w["hi"], ci.high, rel_tol=1e-8)
    assert welch_interval([0.5], [0.2, 0.3])["ci95"] is None  # one seed on a side: the difference alone


# ---------------------------------------------------------------------------------------------------- tables
def _fake_sweep(tmp_path, results: dict[tuple[str, str, str, int], float | None], name: str = "finetune",
                shared: tuple[str, ...] = ()):
    """A sweep folder as detkit-train -m writes it: job dirs with job_status.json and metrics.json, and summary.csv
    whose overrides column keeps only what varies (here the fraction and ``shared`` are shared by all jobs, so they
    are absent from the column). ``results``: (model, init, fraction, seed) -> AP50 (None: a failed job); AP = AP50 / 2,
    AP75 = AP50 / 4."""
    sweep = tmp_path / "study" / name
    rows = []
    for job, ((model, init, fraction, seed), ap50) in enumerate(results.items()):
        out = sweep / str(job)
        out.mkdir(parents=True)
        overrides = [f"seed={seed}", f"model={model}", f"init={init}", f"data.train_fraction={fraction}", *shared]
        status = "completed" if ap50 is not None else "failed"
        (out / "job_status.json").write_text(json.dumps({"job": job, "overrides": overrides, "status": status}))
        if ap50 is not None:
            (out / "metrics.json").write_text(json.dumps({"AP": ap50 / 2, "AP50": ap50, "AP75": ap50 / 4}))
        rows.append({"job": job, "overrides": " ".join(overrides[:3]), "status": status,
                     "AP": "" if ap50 is None else ap50 / 2, "AP50": "" if ap50 is None else ap50,
                     "AP75": "" if ap50 is None else ap50 / 4, "output_dir": str(out)})
    with (sweep / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return sweep.parent


def test_aggregate_gives_mean_and_95_interval_per_arm_and_counts_failures(tmp_path):
    ap50 = {("faster_rcnn", "scratch", "0.25", 0): 0.40, ("faster_rcnn", "scratch", "0.25", 1): 0.50,
            ("faster_rcnn", "scratch", "0.25", 2): 0.60, ("faster_rcnn", "simclr", "0.25", 0): 0.70,
            ("faster_rcnn", "simclr", "0.25", 1): 0.70, ("faster_rcnn", "simclr", "0.25", 2): None}
    study = _fake_sweep(tmp_path, ap50)
    arms = aggregate(study / "finetune" / "summary.csv")
    assert [(a["model"], a["init"], a["semi"], a["transfer"], a["fraction"], a["n"], a["failed"]) for a in arms] == [
        ("faster_rcnn", "scratch", "none", "none", 0.25, 3, 0), ("faster_rcnn", "simclr", "none", "none", 0.25, 2, 1)]
    scratch, simclr = arms
    assert math.isclose(scratch["AP50"]["mean"], 0.5) and math.isclose(scratch["AP50"]["std"], 0.1)
    assert math.isclose(scratch["AP50"]["ci95"], 0.248414, rel_tol=1e-5)  # t(0.975, 2) 4.3027 x 0.1 / sqrt 3
    assert math.isclose(scratch["AP"]["mean"], 0.25) and math.isclose(simclr["AP75"]["mean"], 0.175)
    assert simclr["AP50"]["std"] == 0.0 and simclr["AP50"]["ci95"] == 0.0 and simclr["seeds"] == ["0", "1"]
    md = table(arms)
    assert "| faster_rcnn | scratch | 25% | 3 | 0.250 ± 0.124 | 0.500 ± 0.248 | 0.125 ± 0.062 |  |" in md
    # gain: 0.7 - 0.5 with Welch's interval; the simclr side has no spread, so df = n_scratch - 1 = 2
    assert "| faster_rcnn | simclr | 25% | 2 (1 failed) | 0.350 ± 0.000 | 0.700 ± 0.000 | 0.175 ± 0.000 | " \
           "+0.200 [-0.048, +0.448] |" in md
    assert "self-training" not in md and "transfer" not in md.splitlines()[0]  # columns only when used


def test_densecl_self_training_and_transfer_arms_get_their_rows_gains_and_the_budget_check(tmp_path):
    seeds = range(3)
    main = {(m, i, f, s): base + 0.01 * s
            for m, i, f, s, base in [(m, i, f, s, {("scratch", "0.1"): 0.30, ("scratch", "1.0"): 0.50,
                                                   ("simclr", "0.1"): 0.35, ("simclr", "1.0"): 0.52}[(i, f)])
                                     for m in ("yolo",) for i in ("scratch", "simclr") for f in ("0.1", "1.0")
                                     for s in seeds]}
    study = _fake_sweep(tmp_path, main)
    _fake_sweep(tmp_path, {("yolo", "densecl", f, s): (0.31 if f == "0.1" else 0.51) + 0.01 * s
                           for f in ("0.1", "1.0") for s in seeds}, name="finetune_densecl")
    _fake_sweep(tmp_path, {("yolo", i, "0.1", s): (0.40 if i == "scratch" else 0.45) + 0.01 * s
                           for i in ("scratch", "simclr") for s in seeds}, name="finetune_semi_f10",
                shared=("semi=teacher", "semi.unlabeled_images=/d", "semi.unlabeled_ann=/d/c.json"))
    _fake_sweep(tmp_path, {("yolo", i, "0.1", s): 0.33 + 0.01 * s for i in ("scratch", "simclr") for s in seeds},
                name="finetune_transfer", shared=("transfer=ssl",))
    md_path = report(study)
    md = md_path.read_text()
    head = next(ln for ln in md.splitlines() if ln.startswith("| detector"))
    assert head == ("| detector | init | self-training | transfer | labels | seeds | AP | AP50 | AP75 | "
                    "AP50 gain vs scratch |")
    rows = [ln for ln in md.splitlines() if ln.startswith("| yolo")]
    assert [ln.split(" | ")[1:5] for ln in rows] == [
        ["scratch", "none", "none", "10%"], ["scratch", "none", "none", "100%"], ["simclr", "none", "none", "10%"],
        ["simclr", "none", "none", "100%"], ["densecl", "none", "none", "10%"], ["densecl", "none", "none", "100%"],
        ["scratch", "teacher", "none", "10%"], ["simclr", "teacher", "none", "10%"],
        ["scratch", "none", "ssl", "10%"], ["simclr", "none", "ssl", "10%"]]
    # each arm is compared with scratch without self-training at its own budget and transfer recipe
    spread = welch_interval([0.01 * s for s in seeds], [0.01 * s for s in seeds])["ci95"]  # the same in every pair
    assert math.isclose(spread, t_quantile(0.975, 4) * math.sqrt(2 * 0.0001 / 3), rel_tol=1e-9)
    for row, diff in [(rows[6], 0.10), (rows[7], 0.15), (rows[4], 0.01), (rows[2], 0.05), (rows[9], 0.0)]:
        assert row.endswith(f"| {diff:+.3f} [{diff - spread:+.3f}, {diff + spread:+.3f}] |"), row
    assert rows[0].endswith("|  |") and rows[8].endswith("|  |")  # the baselines themselves
    data = json.loads((study / "study.json").read_text())
    assert len(data["arms"]) == 10 and len(data["sweeps"]) == 4
    checks = data["checks"]["label_budget"]
    assert [(c["model"], c["transfer"], c["large"], c["small"], c["beats"]) for c in checks] == [
        ("yolo", "none", 1.0, 0.1, True)]
    assert math.isclose(checks[0]["diff"], 0.2) and "- yolo, scratch: 100% vs 10% of the labels" in md
    assert "**passes**" in md


def test_the_budget_check_needs_the_interval_above_zero():
    def arm(fraction, values):
        return {"model": "yolo", "init": "scratch", "semi": "none", "transfer": "none", "fraction": fraction,
                "n": len(values), "AP50": {"values": values}}

    close = budget_checks([arm(0.25, [0.40, 0.50, 0.60]), arm(1.0, [0.45, 0.55, 0.65])])
    assert close[0]["diff"] > 0 and not close[0]["beats"] and close[0]["lo"] < 0
    clear = budget_checks([arm(0.25, [0.40, 0.41, 0.42]), arm(1.0, [0.50, 0.52, 0.51])])
    assert clear[0]["beats"] and clear[0]["lo"] > 0


def _fake_pretraining(folder, losses, batch=64, target="detkit.lit.pretrain_module.SimCLRModule"):
    (folder / "logs").mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text(
        f"data:\n  batch_size: {batch}\ntrainer:\n  devices: 1\nmodel:\n  _target_: {target}\n")
    with (folder / "logs" / "metrics.csv").open("w") as f:
        f.write("epoch,pretrain/loss,step\n" + "".join(f"0,{v},{i}\n" for i, v in enumerate(losses)))
    (folder / "pretrain_metrics.json").write_text(json.dumps({"epochs": 1, "wall_time_s": 1.0}))


def test_the_pretraining_loss_check_against_chance(tmp_path):
    falling = [5.5 - 0.05 * i for i in range(60)]  # 5.50 -> 2.55; the last tenth (6 steps) averages 2.675
    _fake_pretraining(tmp_path / "a", falling)
    s = pretrain_summary(tmp_path / "a", margin=1.0)
    assert s["method"] == "simclr" and s["batch_size"] == 64 and s["logged_steps"] == 60
    assert math.isclose(s["chance"], math.log(127)) and math.isclose(s["final_loss"], 2.675)
    assert s["below"] and math.isclose(s["margin"], math.log(127) - 2.675)
    _fake_pretraining(tmp_path / "b", [5.0] * 20, target="detkit.lit.pretrain_module.DenseCLModule")
    flat = pretrain_summary(tmp_path / "b")
    assert flat["method"] == "densecl" and not flat["below"] and flat["margin"] < 0  # 5.0 > ln 127 = 4.84
    assert pretrain_summary(tmp_path / "missing") is None


def test_report_writes_checks_table_json_and_both_plots(tmp_path):
    results = {(m, i, f, s): 0.1 + 0.1 * s + (0.05 if i == "simclr" else 0)
               for m, i, f, s in itertools.product(("faster_rcnn", "yolo"), ("scratch", "simclr"), ("0.25", "1.0"),
                                                   range(3))}
    study = _fake_sweep(tmp_path, results)
    _fake_pretraining(study / "pretrain" / "simclr", [5.5 - 0.05 * i for i in range(60)])
    md = report(study)
    text = md.read_text()
    assert text.count("\n| faster_rcnn") + text.count("\n| yolo") == 8
    assert "| simclr | 64 | 60 | 2.675 | 4.84 | **well below chance**" in text
    assert "![pretraining loss](study_pretrain_loss.png) ![AP50 vs label budget](study_ap50.png)" in text
    assert "t(0.975, n-1)·s/√n" in text and "Welch" in text
    assert "faster_rcnn, scratch: 100% vs 25% of the labels, AP50 difference +0.000" in text  # budgets level here
    assert (study / "study_ap50.png").stat().st_size > 10_000
    assert (study / "study_pretrain_loss.png").stat().st_size > 10_000
    data = json.loads((study / "study.json").read_text())
    assert len(data["arms"]) == 8 and all(a["n"] == 3 for a in data["arms"])
    assert data["checks"]["pretraining_loss_below_chance"] == {"simclr": True}
    assert not any(c["beats"] for c in data["checks"]["label_budget"])


# ---------------------------------------------------------------------------------------------------- the plan
def test_the_unlabeled_sets_keep_val_out_and_self_training_gets_the_complement(tmp_path):
    from hydra.utils import instantiate

    from detkit.cli.study import plan_sweeps, write_complement, write_pretrain_pool
    from detkit.cli.train import add_unlabeled_images

    data = compose_train(["experiment=study_bccd"]).data
    pool, root, info = write_pretrain_pool(data, tmp_path)
    images = json.loads(pool.read_text())["images"]
    val = {im["file_name"] for im in json.loads(open(data.val_ann).read())["images"]}
    assert info["images"] == len(images) == 205 + 72 and not {im["file_name"] for im in images} & val
    assert root == (config_dir().parent / "data" / "bccd" / "images").resolve()
    assert write_pretrain_pool(data, tmp_path / "t", "train")[2]["images"] == 205
    assert write_pretrain_pool(data, tmp_path / "all", "all")[2]["images"] == 364
    assert [p.name for p in (pool, write_pretrain_pool(data, tmp_path, "train")[0],
                             write_pretrain_pool(data, tmp_path, "all")[0])] == [
        "pretrain_pool.json", "pretrain_pool_train.json", "pretrain_pool_all.json"]  # one file per pool

    path, counts = write_complement(data, 0.1, tmp_path)
    unlabeled = json.loads(path.read_text())
    ids = {im["id"] for im in unlabeled["images"]}
    assert path.name == "train_complement_f10_s0.json" and counts == {
        "fraction": 0.1, "subset_seed": 0, "labeled": 20, "unlabeled": 185, "val_left_out": 0}
    assert {a["image_id"] for a in unlabeled["annotations"]} <= ids  # labels kept to measure pseudo-labels only
    # against the data module itself: the semi fine-tuning's labeled images (its own draw of the subset) and the
    # unlabeled ones the training adds (from the complement) split the train set, never sharing an image
    semi_cfg = compose_train(["experiment=study_bccd", "semi=teacher", f"semi.unlabeled_images={data.train_images}",
                              f"semi.unlabeled_ann={path}", "data.train_fraction=0.1"])
    datamodule = instantiate(semi_cfg.data)
    datamodule.setup("fit")
    labeled = {r.image_id for r in datamodule.datasets["train"].records}
    add_unlabeled_images(semi_cfg, datamodule)
    assert set(datamodule.unlabeled.image_ids) == ids and len(labeled) == counts["labeled"]
    train_ids = {im["id"] for im in json.loads(open(data.train_ann).read())["images"]}
    assert not labeled & ids and labeled | ids == train_ids

    enc = {"simclr": tmp_path / "s.pt", "densecl": tmp_path / "d.pt"}
    sweeps = plan_sweeps(["simclr", "densecl"], ["scratch", "simclr", "densecl"], [0.1], enc, {0.1: path},
                         data.train_images)
    assert [(s.name, s.encoder) for s in sweeps] == [
        ("finetune", enc["simclr"]), ("finetune_densecl", enc["densecl"]), ("finetune_semi_f10", enc["simclr"]),
        ("finetune_semi_f10_densecl", enc["densecl"])]
    assert sweeps[0].overrides == ["init=scratch,simclr"] and sweeps[1].overrides == ["init=densecl"]
    semi = sweeps[2].overrides
    assert semi[-1] == "init=scratch,simclr" and "data.train_fraction=0.1" in semi
    cfg = compose_train(["experiment=study_bccd", *semi[:-1], "init=simclr", f"encoder={enc['simclr']}"])
    assert cfg.semi.enabled and cfg.semi.unlabeled_ann == str(path) and cfg.data.train_fraction == 0.1
    assert cfg.semi.unlabeled_images == data.train_images and cfg.model.detector.backbone.init == str(enc["simclr"])
    scratch_only = plan_sweeps([], ["scratch"], [0.1], {}, {0.1: path}, data.train_images)
    assert [(s.name, s.encoder, s.overrides[-1]) for s in scratch_only] == [
        ("finetune", None, "init=scratch"), ("finetune_semi_f10", None, "init=scratch")]


def test_self_training_needs_its_encoder_in_ssl(tmp_path):
    from detkit.cli.study import main

    with pytest.raises(SystemExit, match="needs its encoder: add it to --ssl"):
        main(["--out", str(tmp_path), "--ssl", "densecl", "--semi-inits", "scratch,simclr"])
    with pytest.raises(SystemExit, match=r"unknown \['moco'\]"):
        main(["--out", str(tmp_path), "--ssl", "moco"])


def test_detkit_study_runs_end_to_end_on_a_tiny_dataset(synthetic, tmp_path):
    ann, root = synthetic
    out = tmp_path / "study"
    # SimCLR and one pretraining arm at tiny size (the DenseCL and self-training sweeps: the plan test above);
    # the synthetic set is its own val set, so the pool must include val (--pretrain-pool all)
    r = cli("detkit-study", "--out", str(out), "--ssl", "simclr", "--semi-inits", "none", "--pretrain-pool", "all",
            "--pretrain-epochs", "1", "--pretrain-size", "32", "--pretrain-batch", "4",
            "--pretrain-override", "data.num_workers=0",
            "--arm", "tau05 model.temperature=0.5 data.crop_scale=[0.2,0.6]", "--",
            *data_args(ann, root), *TINY, "study.steps=2", "model=yolo", "seed=0", "data.train_fraction=1.0")
    assert r.returncode == 0, r.output[-3000:]
    arms = json.loads((out / "study.json").read_text())["arms"]
    assert [(a["model"], a["init"], a["n"]) for a in arms] == [("yolo", "scratch", 1), ("yolo", "simclr", 1),
                                                                ("yolo", "simclr:tau05", 1)]
    encoder = out / "pretrain" / "simclr" / "encoder.pt"
    runs = [json.loads((out / "finetune" / str(job) / "run.json").read_text()) for job in (0, 1)]
    assert [r["encoder_init"] for r in runs] == [None, str(encoder)]
    text = (out / "study.md").read_text()
    assert (out / "study_ap50.png").is_file() and "| yolo | simclr | 100% | 1 of 1 |" in text
    # the pool json, the loss logged every step, and the check reported (1 tiny epoch: not below chance)
    assert len(json.loads((out / "unlabeled" / "pretrain_pool_all.json").read_text())["images"]) == 8
    assert "| simclr | 4 | 2 |" in text and "not" in text.split("| simclr | 4 | 2 |")[1].splitlines()[0]
    # the study's crops (0.4-1 of the image: two crops of one field share cells) unless an arm sets its own
    shared_cfg = (out / "pretrain" / "simclr" / ".hydra" / "config.yaml").read_text()
    assert "crop_scale:\n  - 0.4\n  - 1.0\n" in shared_cfg, shared_cfg
    # the pretraining arm: its own encoder from its overrides, fine-tuned from it only (scratch rows are shared)
    arm = out / "arms" / "tau05"
    arm_cfg = (arm / "pretrain" / ".hydra" / "config.yaml").read_text()
    assert "temperature: 0.5" in arm_cfg and "- 0.2\n  - 0.6" in arm_cfg and "num_workers: 0" in arm_cfg
    assert not list((arm / "finetune").glob("1/run.json"))  # one job: init=simclr only
    arm_run = json.loads((arm / "finetune" / "0" / "run.json").read_text())
    assert arm_run["encoder_init"] == str(arm / "pretrain" / "encoder.pt")
    assert "| yolo | simclr:tau05 | 100% | 1 of 1 |" in text
    info = json.loads((out / "study.json").read_text())["pretraining_arms"]["tau05"]
    assert "model.temperature=0.5" in info["pretrain_overrides"] and "pretrain" in info
    stages = json.loads((out / "study.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["pretrain simclr", "finetune", "arm tau05: pretrain", "arm tau05: finetune"]
    assert all(s["status"] == "ok" for s in stages)
    # the study's plan of each sweep is the grid its multirun.yaml launched (every job matched, none left out)
    from detkit.cli.study import _planned_grid, multirun_grid

    planned = json.loads((out / "study.json").read_text())["planned_sweeps"]
    assert set(planned) == {"finetune", "arms/tau05/finetune"}
    for rel, spec in planned.items():
        assert _planned_grid(spec) == multirun_grid(out / rel) and len(multirun_grid(out / rel)) == 2 - ("arms" in rel)
    assert [(a["n"], a["expected"], a["missing"]) for a in arms] == [(1, 1, 0)] * 3


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is None,
                    reason='needs hydra-joblib-launcher (pip install "detkit[study-gpu]")')
def test_the_gpu_preset_runs_its_jobs_through_the_joblib_launcher_on_a_cpu(synthetic, tmp_path, monkeypatch):
    """The GPU preset's shape on a CPU: both pretrainings and every sweep (DenseCL, self-training) side by side in
    loky workers, loader workers inside them (the ForkLoaderWorkers callback); ~90 s of CPU."""
    from detkit.cli import study

    ann, root = synthetic
    monkeypatch.setitem(study.PRESETS["gpu"], "sweep_launcher", [*study._JOBLIB, "hydra.launcher.n_jobs=2"])
    monkeypatch.setitem(study.PRESETS["gpu"], "pretrain_overrides", ["data.num_workers=1"])
    out = tmp_path / "study"
    r = cli("detkit-study", "--preset", "gpu", "--out", str(out), "--pretrain-epochs", "1", "--pretrain-size", "32",
            "--pretrain-batch", "4", "--pretrain-pool", "all", "--budget-s", "600", "--",
            *data_args(ann, root), *TINY, "study.steps=2", "model=yolo", "seed=0", "data.train_fraction=0.5,1.0",
            "trainer=cpu", "data.num_workers=1")
    assert r.returncode == 0, r.output[-3000:]
    arms = json.loads((out / "study.json").read_text())["arms"]
    assert [(a["init"], a["semi"], a["fraction"], a["n"]) for a in arms] == [
        ("scratch", "none", 0.5, 1), ("scratch", "none", 1.0, 1), ("simclr", "none", 0.5, 1),
        ("simclr", "none", 1.0, 1), ("densecl", "none", 0.5, 1), ("densecl", "none", 1.0, 1),
        ("scratch", "teacher", 0.5, 1), ("simclr", "teacher", 0.5, 1)]


def test_a_pretraining_arm_needs_a_name_and_overrides():
    from detkit.cli.study import arm_method, merge_overrides, parse_arm

    assert parse_arm("lars model.optimizer._target_=detkit.lit.lars.LARS") == (
        "lars", ["model.optimizer._target_=detkit.lit.lars.LARS"])
    for bad in ("model.temperature=0.5", "tau05", "bad/name x=1"):
        with pytest.raises(SystemExit, match="--arm"):
            parse_arm(bad)
    assert merge_overrides(["a=1", "b=2", "+c=3"], ["b=5", "c=4"]) == ["a=1", "b=5", "c=4"]
    assert arm_method(["model.temperature=0.5"]) == "simclr" and arm_method(["pretrain_job=densecl"]) == "densecl"


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


# ---------------------------------------------------------------------------------------------------- review fixes
def _grid_sweep(study, params: dict[str, str], ap50, shared: tuple[str, ...] = (), absent: tuple[int, ...] = (),
                name: str = "finetune"):
    """A sweep as Hydra's basic sweeper launches it: ``multirun.yaml`` (the sweeper's ``params``, then ``shared``,
    the command line's task overrides), job k the k-th element of their product, each job's ``job_status.json`` and
    ``metrics.json``, and the sweep machinery's own ``summary.csv``. ``ap50(overrides)`` -> AP50 (None: a failed
    job); the jobs in ``absent`` never wrote anything (stopped at the budget, never started)."""
    from detkit.cli.sweep import collect_rows, write_tables

    sweep = study / name
    sweep.mkdir(parents=True)
    lines = ["hydra:", "  sweeper:", "    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
             "    params:", *(f"      {k}: {v}" for k, v in params.items()), "  overrides:", "    task:",
             *(f"    - {o}" for o in shared)]
    (sweep / "multirun.yaml").write_text("\n".join(lines) + "\n")
    grid = [[f"{k}={v}" for k, v in zip(params, values)] + list(shared)
            for values in itertools.product(*(v.split(",") for v in params.values()))]
    for job, overrides in enumerate(grid):
        if job in absent:
            continue
        out = sweep / str(job)
        out.mkdir()
        value = ap50(dict(o.split("=", 1) for o in overrides))
        status = "completed" if value is not None else "failed"
        (out / "job_status.json").write_text(json.dumps({"job": job, "overrides": overrides, "status": status}))
        if value is not None:
            (out / "metrics.json").write_text(json.dumps({"AP": value / 2, "AP50": value, "AP75": value / 4}))
    write_tables(collect_rows(sweep), sweep)
    return sweep


SEMI = ("semi=teacher", "semi.unlabeled_images=/d", "semi.unlabeled_ann=/d/c.json", "data.train_fraction=0.1")


def _labels(arms):
    return [(a["model"], a["init"], a["semi"], a["fraction"], a["n"]) for a in arms]


def test_a_moved_study_folder_keeps_its_arm_labels(tmp_path):
    """summary.csv lists only the overrides that vary; the shared ones (semi=teacher, the 10% budget) are read from
    the job folders, found under the sweep folder when the recorded absolute paths are gone (a study moved, or
    unpacked from study_runs.tar.gz), never replaced by the defaults (scratch, no self-training, 100%)."""
    import shutil

    from detkit.cli.study import aggregate

    study = _fake_sweep(tmp_path, {("yolo", i, "0.1", s): 0.4 + 0.01 * s for i in ("scratch", "simclr")
                                   for s in range(2)}, name="finetune_semi_f10", shared=SEMI[:3])
    moved = tmp_path / "elsewhere"
    shutil.move(str(study), str(moved))
    arms = aggregate(moved / "finetune_semi_f10" / "summary.csv")
    assert _labels(arms) == [("yolo", "scratch", "teacher", 0.1, 2), ("yolo", "simclr", "teacher", 0.1, 2)]
    assert _labels(json.loads((report(moved).parent / "study.json").read_text())["arms"]) == _labels(arms)


def test_without_job_folders_the_shared_overrides_come_from_multirun_yaml_else_an_error(tmp_path):
    import shutil

    from detkit.cli.study import aggregate

    sweep = _grid_sweep(tmp_path / "study", {"seed": "0,1", "model": "yolo", "init": "scratch,simclr"},
                        lambda o: 0.4, shared=SEMI, name="finetune_semi_f10")
    for job in range(4):
        shutil.rmtree(sweep / str(job))  # only summary.csv and multirun.yaml left
    arms = aggregate(sweep / "summary.csv")
    assert _labels(arms) == [("yolo", "scratch", "teacher", 0.1, 2), ("yolo", "simclr", "teacher", 0.1, 2)]
    assert [a["seeds"] for a in arms] == [["0", "1"], ["0", "1"]]
    (sweep / "multirun.yaml").unlink()
    with pytest.raises(SystemExit, match=f"{sweep}.*multirun.yaml"):
        aggregate(sweep / "summary.csv")


def test_jobs_that_never_reported_are_counted_missing_and_an_arm_without_results_keeps_its_row(tmp_path):
    study = tmp_path / "study"
    # 3 seeds x scratch/simclr: job 4 (seed 2, scratch) failed, jobs 3 and 5 (seeds 1 and 2, simclr) never wrote
    # anything; DenseCL's sweep started but no job reported; the self-training sweep never started (its planned grid)
    _grid_sweep(study, {"seed": "0,1,2", "model": "yolo", "init": "scratch,simclr"},
                lambda o: None if o["seed"] == "2" else 0.4 + 0.01 * int(o["seed"]), absent=(3, 5))
    _grid_sweep(study, {"seed": "0,1,2", "model": "yolo", "init": "densecl"}, lambda o: 0.5,
                absent=(0, 1, 2), name="finetune_densecl")
    planned = {"finetune_semi_f10": {"params": {"seed": "0,1,2", "model": "yolo", "init": "scratch"},
                                     "overrides": list(SEMI)}}
    report(study, {"planned_sweeps": planned})
    arms = json.loads((study / "study.json").read_text())["arms"]
    got = [(a["init"], a["semi"], a["n"], a["failed"], a["missing"], a["expected"]) for a in arms]
    assert got == [("scratch", "none", 2, 1, 0, 3), ("simclr", "none", 1, 0, 2, 3), ("densecl", "none", 0, 0, 3, 3),
                   ("scratch", "teacher", 0, 0, 3, 3)]
    md = (study / "study.md").read_text()
    assert "| yolo | scratch | none | 100% | 2 of 3 (1 failed) |" in md
    assert "| yolo | simclr | none | 100% | 1 of 3 (2 missing) |" in md
    assert "| yolo | densecl | none | 100% | 0 of 3 (3 missing) | - | - | - |" in md
    assert "| yolo | scratch | teacher | 10% | 0 of 3 (3 missing) | - | - | - |" in md


def test_a_summary_older_than_the_jobs_is_never_read(tmp_path):
    """A study rerun into its folder and stopped again: the sweep's summary.csv is the earlier launch's (2 jobs);
    the report rebuilds it from the 4 job folders."""
    study = tmp_path / "study"
    sweep = _grid_sweep(study, {"seed": "0,1", "model": "yolo", "init": "scratch,simclr"}, lambda o: 0.4)
    rows = (sweep / "summary.csv").read_text().splitlines()
    (sweep / "summary.csv").write_text("\n".join(rows[:3]) + "\n")  # the header and the first 2 jobs
    report(study)
    arms = json.loads((study / "study.json").read_text())["arms"]
    assert [(a["init"], a["n"]) for a in arms] == [("scratch", 2), ("simclr", 2)]
    assert len((sweep / "summary.csv").read_text().splitlines()) == 5


def test_report_only_keeps_the_earlier_runs_stages_unlabeled_sets_and_command(tmp_path):
    from detkit.cli.study import main

    study = _fake_sweep(tmp_path, {("yolo", i, "1.0", s): 0.4 for i in ("scratch", "simclr") for s in range(2)})
    run = {"stages": [{"stage": "pretrain simclr", "status": "ok", "seconds": 9.0},
                      {"stage": "finetune", "status": "stopped at the budget after 300 s", "seconds": 300.0}],
           "unlabeled": "pretraining pool 277 images", "unlabeled_sets": {"pretrain": {"images": 277}},
           "command": "detkit-study --preset gpu --budget-s 450", "wall_time_s": 440.0, "preset": "gpu"}
    report(study, run)
    assert main(["--report-only", "--out", str(study)]) == 0
    data = json.loads((study / "study.json").read_text())
    assert {k: data.get(k) for k in run} == run
    md = (study / "study.md").read_text()
    assert "## Incomplete" in md and "- finetune: stopped at the budget after 300 s" in md
    assert "`detkit-study --preset gpu --budget-s 450` (440 s)" in md and "pretraining pool 277 images" in md


def _tiny_coco(folder, split: str, names: list[str]):
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, name in enumerate(names):
        path = folder / "images" / name
        if not path.is_file():
            Image.new("RGB", (16, 12), (i * 40, 80, 120)).save(path)
        images.append({"id": i + 1, "file_name": name, "width": 16, "height": 12})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 6, 5], "area": 30,
                     "iscrowd": 0})
    ann = folder / f"{split}.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "cell"}]}))
    return str(ann)


def test_a_val_image_listed_in_train_stays_out_of_the_pool_and_the_complement(tmp_path):
    """BCCD's splits do not overlap, so this is the case that can fail: train lists e.png, which is also a val image
    (the one the detectors are scored on)."""
    from detkit.cli.study import write_complement, write_pretrain_pool

    root = str(tmp_path / "images")
    data = {"train_ann": _tiny_coco(tmp_path, "train", ["a.png", "b.png", "c.png", "d.png", "e.png"]),
            "train_images": root, "val_ann": _tiny_coco(tmp_path, "val", ["e.png", "f.png"]), "val_images": root,
            "subset_seed": 1}
    pool, _, info = write_pretrain_pool(data, tmp_path / "u")
    assert sorted(im["file_name"] for im in json.loads(pool.read_text())["images"]) == ["a.png", "b.png", "c.png",
                                                                                     "d.png"]
    assert info["left_out"] == 1
    path, counts = write_complement(data, 0.4, tmp_path / "u")  # seed 1 labels b.png and c.png
    unlabeled = json.loads(path.read_text())
    assert sorted(im["file_name"] for im in unlabeled["images"]) == ["a.png", "d.png"]
    assert {a["image_id"] for a in unlabeled["annotations"]} == {im["id"] for im in unlabeled["images"]}
    assert counts == {"fraction": 0.4, "subset_seed": 1, "labeled": 2, "unlabeled": 2, "val_left_out": 1}


def test_the_chance_level_uses_the_effective_batch_when_the_pool_is_smaller(tmp_path):
    _fake_pretraining(tmp_path / "p", [3.0] * 10, batch=64)
    metrics = tmp_path / "p" / "pretrain_metrics.json"
    metrics.write_text(json.dumps({"epochs": 1, "input_check": {"images": 10, "skipped": 0}}))
    s = pretrain_summary(tmp_path / "p")
    assert s["images"] == 10 and s["effective_batch"] == 10 and math.isclose(s["chance"], math.log(19))


def test_a_comparison_without_spread_is_no_interval():
    from detkit.cli.study import _budget_line, _gain_cell

    w = welch_interval([0.5, 0.5, 0.5], [0.3, 0.3, 0.3])
    assert math.isclose(w["diff"], 0.2) and w["ci95"] is None and w["lo"] is None and w["no_spread"]
    assert _gain_cell(w) == "+0.200 (no spread)"
    arm = {"model": "yolo", "init": "scratch", "semi": "none", "transfer": "none", "n": 3}
    checks = budget_checks([{**arm, "fraction": 0.25, "AP50": {"values": [0.3] * 3}},
                            {**arm, "fraction": 1.0, "AP50": {"values": [0.5] * 3}}])
    assert not checks[0]["beats"] and "no spread" in _budget_line(checks[0])
    assert "passes" not in _budget_line(checks[0])


def test_a_rerun_reuses_a_sweep_only_when_every_planned_job_completed(tmp_path):
    """``detkit-study`` rerun into its folder (e.g. with ``--semi-inits`` added) skips a fine-tuning sweep that
    already holds every planned job, completed; a failed or missing job, or another grid, runs it again."""
    from detkit.cli.study import sweep_complete

    params = {"seed": "0,1", "model": "yolo", "init": "scratch,simclr"}
    done = _grid_sweep(tmp_path / "a", params, lambda o: 0.4)
    spec = {"params": {"init": "scratch,simclr", "seed": "0,1", "model": "yolo"}, "overrides": []}  # any key order
    assert sweep_complete(done, spec)
    assert not sweep_complete(done, {**spec, "params": {**spec["params"], "seed": "0,1,2"}})  # more seeds planned
    assert not sweep_complete(done, {**spec, "overrides": ["data.train_fraction=0.1"]})  # other jobs planned
    failed = _grid_sweep(tmp_path / "b", params, lambda o: None if o["seed"] == "1" and o["init"] == "simclr" else 0.4)
    assert not sweep_complete(failed, spec)
    missing = _grid_sweep(tmp_path / "c", params, lambda o: 0.4, absent=(3,))
    assert not sweep_complete(missing, spec)
    assert not sweep_complete(tmp_path / "never_started", spec)
    # the encoder the sweep fine-tuned from, pretrained again after the jobs finished: they are stale
    encoder = tmp_path / "encoder.pt"
    encoder.write_bytes(b"")
    os.utime(encoder, (1_000, 1_000))
    assert sweep_complete(done, spec, encoder)
    os.utime(encoder, (4_000_000_000, 4_000_000_000))
    assert not sweep_complete(done, spec, encoder)


def test_the_pool_file_is_named_by_its_pool_so_another_pools_encoder_is_refused(tmp_path):
    """An encoder pretrained with --pretrain-pool all (val images included) must not be reused by a rerun with the
    default pool: the pool's file name is in the recorded overrides."""
    from detkit.cli.study import check_reused_encoder

    encoder = tmp_path / "pretrain" / "simclr" / "encoder.pt"
    (encoder.parent / ".hydra").mkdir(parents=True)
    encoder.write_bytes(b"")
    (encoder.parent / ".hydra" / "overrides.yaml").write_text(
        "- pretrain_job=simclr\n- data.ann_file=/s/unlabeled/pretrain_pool_all.json\n")
    with pytest.raises(SystemExit, match=r"it had \[data.ann_file=/s/unlabeled/pretrain_pool_all.json\], the study "
                                         r"sets \[data.ann_file=/s/unlabeled/pretrain_pool.json\]"):
        check_reused_encoder(encoder, ["pretrain_job=simclr", "data.ann_file=/s/unlabeled/pretrain_pool.json"])
    # a record without the override the study now sets (an earlier study's default crops) names it
    (encoder.parent / ".hydra" / "overrides.yaml").write_text("- pretrain_job=simclr\n")
    with pytest.raises(SystemExit, match=r"it had \[their defaults\], the study sets \[data.crop_scale=\[0.4,1.0\]\]"):
        check_reused_encoder(encoder, ["pretrain_job=simclr", "data.crop_scale=[0.4,1.0]"])


def test_a_crop_scale_that_is_not_lo_hi_is_refused_before_anything_runs(tmp_path):
    from detkit.cli.study import main

    for bad in ("0.4", "[0.4,1]", "0.5,0.2", "0,1", "0.4,1.5"):
        with pytest.raises(SystemExit, match=f"--pretrain-crop-scale {re.escape(repr(bad))}: "):
            main(["--out", str(tmp_path / "s"), "--pretrain-crop-scale", bad])
    assert not (tmp_path / "s").exists()


def test_an_encoder_pretrained_with_other_settings_is_not_reused(tmp_path, capsys):
    from detkit.cli.study import check_reused_encoder

    encoder = tmp_path / "pretrain" / "simclr" / "encoder.pt"
    (encoder.parent / ".hydra").mkdir(parents=True)
    encoder.write_bytes(b"")
    planned = ["pretrain_job=simclr", "trainer.max_epochs=200", "data.crop_scale=[0.4,1.0]"]
    (encoder.parent / ".hydra" / "overrides.yaml").write_text(
        "- pretrain_job=simclr\n- trainer.max_epochs=200\n- data.crop_scale=[0.08,1.0]\n- hydra.sweep.dir=/x\n")
    with pytest.raises(SystemExit, match=r"it had \[data.crop_scale=\[0.08,1.0\]\], the study sets "
                                         r"\[data.crop_scale=\[0.4,1.0\]\]"):
        check_reused_encoder(encoder, planned)
    (encoder.parent / ".hydra" / "overrides.yaml").write_text(
        "- pretrain_job=simclr\n- data.crop_scale=[0.4,1.0]\n- trainer.max_epochs=200\n- hydra.sweep.dir=/y\n")
    check_reused_encoder(encoder, [*planned, "hydra.sweep.dir=/z"])  # same settings, any order: reused
    assert "reusing" in capsys.readouterr().out


def test_dense_pseudo_labels_are_an_arm_of_their_own():
    from detkit.cli.study import _arm_of

    base = ["model=yolo", "init=simclr", "semi=teacher", "data.train_fraction=0.1", "seed=2"]
    assert _arm_of(base, None) == (("yolo", "simclr", "teacher", "none", 0.1), "2")
    assert _arm_of([*base, "semi.pseudo_labels=boxes"], None)[0] == ("yolo", "simclr", "teacher", "none", 0.1)
    assert _arm_of([*base, "semi.pseudo_labels=dense"], None)[0] == ("yolo", "simclr", "teacher:dense", "none", 0.1)
    assert _arm_of([*base, "semi.pseudo_labels=dense", "semi.dense_per_class=true"], None)[0][2] == \
        "teacher:dense:per_class"
    assert _arm_of(["model=faster_rcnn", "init=simclr", "semi=teacher", "semi.soft_background=true"], None)[0][2] == \
        "teacher:soft_background"
    assert _arm_of(["model=faster_rcnn", "semi=teacher", "semi.soft_background=1"], None)[0][2] == \
        "teacher:soft_background"  # a switch written as 1 trains soft weights: it names the arm too
    # without self-training the setting means nothing: still the plain arm
    assert _arm_of(["model=yolo", "semi=none", "semi.pseudo_labels=dense"], None)[0][2] == "none"
