"""Hydra multirun sweeps: one table per sweep, failed jobs recorded without stopping the others; the Optuna
sweeper and SLURM launcher configs compose."""

from __future__ import annotations

import csv

import pytest
from hydra import compose, initialize_config_dir

from detkit.paths import config_dir
from tests.helpers import TINY, TINY_FRCNN, cli, data_args


def read_summary(sweep_dir):
    with (sweep_dir / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def test_two_by_two_multirun_writes_one_table(synthetic, tmp_path):
    ann, root = synthetic
    sweep = tmp_path / "sweep"
    r = cli("detkit-train", "-m", *data_args(ann, root), *TINY, "model=faster_rcnn,yolo", "seed=0,1",
            f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.output[-3000:]
    rows = read_summary(sweep)
    assert [row["overrides"] for row in rows] == ["model=faster_rcnn seed=0", "model=faster_rcnn seed=1",
                                                  "model=yolo seed=0", "model=yolo seed=1"]
    assert all(row["status"] == "completed" and float(row["AP"]) >= 0 and float(row["wall_time_s"]) > 0
               for row in rows)
    md = (sweep / "summary.md").read_text()
    assert md.count("\n") == 2 + 4 and "| model=yolo seed=1 | completed |" in md


def test_a_failing_job_is_recorded_and_the_others_complete(synthetic, tmp_path):
    ann, root = synthetic
    sweep = tmp_path / "sweep"
    r = cli("detkit-train", "-m", *data_args(ann, root), *TINY_FRCNN, "data.train_fraction=1.0,7.0,0.5",
            f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.output[-3000:]
    rows = {row["overrides"]: row for row in read_summary(sweep)}
    assert rows["data.train_fraction=7.0"]["status"] == "failed"
    assert "subset_fraction must be in (0, 1]" in rows["data.train_fraction=7.0"]["error"]
    assert rows["data.train_fraction=1.0"]["status"] == rows["data.train_fraction=0.5"]["status"] == "completed"
    assert (sweep / "2" / "metrics.json").is_file() and not (sweep / "1" / "metrics.json").exists()


def test_optuna_sweeper_and_slurm_launcher_configs_compose():
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna_lr_wd", "hydra/launcher=slurm"],
                      return_hydra_config=True)
    sweeper, launcher = cfg.hydra.sweeper, cfg.hydra.launcher
    assert sweeper.direction == "maximize" and set(sweeper.params) == {"model.optimizer.lr",
                                                                       "model.optimizer.weight_decay"}
    assert launcher.gpus_per_node == 1 and "submitit" in launcher._target_


@pytest.mark.slow
def test_optuna_sweep_runs_two_trials(synthetic, tmp_path):
    ann, root = synthetic
    sweep = tmp_path / "optuna"
    r = cli("detkit-train", "-m", "hparams_search=optuna_lr_wd", "hydra.sweeper.n_trials=2", *data_args(ann, root),
            *TINY_FRCNN, f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.output[-3000:]
    assert len(read_summary(sweep)) == 2 and (sweep / "optimization_results.yaml").is_file()
