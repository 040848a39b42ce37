"""Reproducibility and resume: a run killed mid-epoch and resumed ends with the same weights and the same
metrics.json, byte for byte, as an uninterrupted run of the same seed (CPU). The runs are in-process
(tests/helpers.cli) except the one that must die by SIGKILL, which runs as a user's process would."""

from __future__ import annotations

import signal
import subprocess

import pytest
import torch

from detkit.data.synthetic import make_synthetic_coco
from tests.helpers import BIN, ROOT, TINY_FRCNN, cli, data_args, env_with_path

# 12 images, batch 2: 6 steps per epoch; a checkpoint every 4 steps lands mid-epoch (steps 4 and 8).
RUN = [*TINY_FRCNN, "data.batch_size=2", "data.num_workers=1", "trainer.max_epochs=2",
       "trainer.check_val_every_n_epoch=2", "callbacks.last_checkpoint.every_n_train_steps=4", "data.mosaic=0.5",
       "seed=5"]


def weights(ckpt) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("d"), num_images=12, seed=3)


def test_killed_mid_epoch_and_resumed_equals_an_uninterrupted_run_of_the_same_seed(data, tmp_path):
    """Two runs of one seed give the same metrics.json and weights, even when one of them is killed mid-epoch and
    resumed: the uninterrupted run's steps 1-12, the killed run's steps 1-4 (in another process) and the resumed
    run's steps 5-12 must all draw the same data order, augmentations and samples for the results to be equal."""
    full = tmp_path / "full"
    r = cli("detkit-train", *data_args(*data), *RUN, f"hydra.run.dir={full}")
    assert r.returncode == 0, r.output[-3000:]

    out = tmp_path / "killed"  # SIGKILL at the start of step 5: epoch 0, batch 5 of 6; last checkpoint at step 4
    r = subprocess.run([str(BIN / "detkit-train"), *data_args(*data), *RUN, f"hydra.run.dir={out}",
                        "+callbacks.kill._target_=tests.helpers.KillAtStep", "+callbacks.kill.step=5"],
                       capture_output=True, text=True, env=env_with_path(ROOT), timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    last = out / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4, "the last checkpoint should be the mid-epoch one at step 4"

    r = cli("detkit-train", *data_args(*data), *RUN, f"hydra.run.dir={out}", "ckpt_path=last")
    assert r.returncode == 0, r.output[-3000:]
    uninterrupted, resumed = weights(full / "checkpoints/last.ckpt"), weights(last)
    different = [k for k in uninterrupted if not torch.equal(uninterrupted[k], resumed[k])]
    assert not different, different[:5]
    assert (out / "metrics.json").read_bytes() == (full / "metrics.json").read_bytes()
