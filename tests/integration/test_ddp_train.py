"""``detkit-train ... trainer=ddp_cpu`` (README, "Scaling up") trains on 2 CPU processes and writes its run
directory. The strategy was ``ddp_spawn``, whose workers train and evaluate while the main process, which writes the
evaluation files after ``fit``, is left without the evaluation (``model.last_eval`` None: an AttributeError in
``write_evaluation``). Both DDP configs now use ``ddp``: Lightning re-runs the command once per extra rank, every
process evaluates the gathered results, and rank 0 alone writes the files."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from detkit.paths import config_dir
from tests.helpers import run


@pytest.mark.parametrize("trainer", ["ddp", "ddp_cpu"])
def test_the_ddp_configs_keep_every_process_through_the_job(trainer):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"trainer={trainer}"])
    assert cfg.trainer.strategy == "ddp"


@pytest.mark.slow
def test_the_readme_ddp_cpu_command_trains_on_two_processes_and_writes_its_evaluation(tmp_path):
    """The README's command on the embedded BCCD set, 2 steps per process (tiny: 128 px, batches of 4)."""
    r = run(["detkit-train", "data=bccd", "trainer=ddp_cpu", "+trainer.max_steps=2", "debug=tiny_frcnn",
             f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and "AP" in metrics and len(metrics["per_class"]) == 3
    assert (tmp_path / "run.json").is_file() and (tmp_path / "report.html").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "train_ddp_process_1.log").is_file()  # rank 1 was a process of its own, in this run directory
