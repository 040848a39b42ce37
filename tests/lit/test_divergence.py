"""A diverging run stops at once with a message naming the step, the loss terms and what to try, and keeps the
last good checkpoint; the check itself reads nothing back from a GPU per step."""

from __future__ import annotations

import pytest
import torch

from detkit.lit.divergence import DivergenceMonitor, TrainingDivergedError
from tests.helpers import TINY_FRCNN, cli, data_args


def test_monitor_names_the_step_and_every_term():
    monitor = DivergenceMonitor(hint="What to try: lower the learning rate.")
    monitor.record(6, {"loss_a": torch.tensor(1.5), "loss_b": torch.tensor(0.25)},
                   {"nonfinite_proposals": torch.tensor(0)})
    with pytest.raises(TrainingDivergedError) as e:
        monitor.record(7, {"loss_a": torch.tensor(float("nan")), "loss_b": torch.tensor(2.0e5)},
                       {"nonfinite_proposals": torch.tensor(3)})
    text = str(e.value)
    assert "step 7" in text and "non-finite loss (loss_a)" in text and "nonfinite_proposals > 0" in text
    assert "loss_b=200000" in text and "lower the learning rate" in text


def test_monitor_reads_every_nth_step_and_names_the_first_bad_one():
    monitor = DivergenceMonitor(every=5)
    monitor.record(3, {"loss": torch.tensor(float("inf"))}, {})  # not a read step: recorded, not yet raised
    with pytest.raises(TrainingDivergedError, match="step 3"):
        monitor.record(5, {"loss": torch.tensor(float("inf"))}, {})


def test_a_diverging_training_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(synthetic, tmp_path):
    ann, root = synthetic
    out = tmp_path / "run"
    r = cli("detkit-train", *data_args(ann, root), *TINY_FRCNN, "data.batch_size=2", "trainer.max_epochs=3",
            "callbacks.last_checkpoint.every_n_train_steps=1", "+callbacks.poison._target_=tests.helpers.PoisonAtStep",
            "+callbacks.poison.step=3", f"hydra.run.dir={out}")
    text = r.output
    assert r.returncode == 1, text[-3000:]
    assert "training diverged at step 3" in text and "loss_rpn_box_reg=" in text and "Traceback" not in text
    assert "model.optimizer.lr" in text and "trainer.gradient_clip_val" in text
    saved = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3  # the state after step 2's update, saved before step 3 ran
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
