"""Reproducibility and resume: same seed -> identical metrics.json and weights; a run killed mid-epoch and resumed
ends with the same weights as an uninterrupted run (CPU). The runs are in-process (tests/helpers.cli) except the
one that must die by SIGKILL, which runs as a user's process would."""

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


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    """The uninterrupted run both tests compare against."""
    out = tmp_path_factory.mktemp("full") / "run"
    r = cli("detkit-train", *data_args(*data), *RUN, f"hydra.run.dir={out}")
    assert r.returncode == 0, r.output[-3000:]
    return out


def test_same_seed_gives_identical_metrics_and_weights(data, full_run, tmp_path):
    r = cli("detkit-train", *data_args(*data), *RUN, f"hydra.run.dir={tmp_path / 'again'}")
    assert r.returncode == 0, r.output[-3000:]
    assert (tmp_path / "again" / "metrics.json").read_bytes() == (full_run / "metrics.json").read_bytes()
    wa, wb = weights(full_run / "checkpoints/last.ckpt"), weights(tmp_path / "again/checkpoints/last.ckpt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_killed_mid_epoch_and_resumed_equals_uninterrupted(data, full_run, tmp_path):
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
    full, resumed = weights(full_run / "checkpoints/last.ckpt"), weights(last)
    different = [k for k in full if not torch.equal(full[k], resumed[k])]
    assert not different, different[:5]
