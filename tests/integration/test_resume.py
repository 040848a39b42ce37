"""Reproducibility and resume: same seed -> identical metrics.json; a run killed mid-epoch and resumed ends with
the same weights as an uninterrupted run (CPU)."""

from __future__ import annotations

import signal
import subprocess

import torch

from detkit.data.synthetic import make_synthetic_coco
from tests.helpers import ROOT, env_with_path
from tests.helpers import BIN, TINY_FRCNN, data_args

# 12 images, batch 2: 6 steps per epoch; a checkpoint every 4 steps lands mid-epoch (steps 4 and 8).
RUN = [*TINY_FRCNN, "data.batch_size=2", "data.num_workers=1", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=2",
       "callbacks.last_checkpoint.every_n_train_steps=4", "data.mosaic=0.5"]


def weights(ckpt) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def train_cmd(ann, root, out, *extra) -> list[str]:
    return [str(BIN / "detkit-train"), *data_args(ann, root), *RUN, f"hydra.run.dir={out}", *extra]


def test_same_seed_gives_identical_metrics_and_weights(tmp_path):
    ann, root = make_synthetic_coco(tmp_path / "d", num_images=12, seed=3)
    for name in ("a", "b"):
        r = subprocess.run(train_cmd(ann, root, tmp_path / name, "seed=5"), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "a" / "metrics.json").read_bytes() == (tmp_path / "b" / "metrics.json").read_bytes()
    wa, wb = weights(tmp_path / "a/checkpoints/last.ckpt"), weights(tmp_path / "b/checkpoints/last.ckpt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_killed_mid_epoch_and_resumed_equals_uninterrupted(tmp_path):
    ann, root = make_synthetic_coco(tmp_path / "d", num_images=12, seed=3)
    r = subprocess.run(train_cmd(ann, root, tmp_path / "full"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]

    out = tmp_path / "killed"  # SIGKILL at the start of step 5: epoch 0, batch 5 of 6; last checkpoint at step 4
    r = subprocess.run(train_cmd(ann, root, out, "+callbacks.kill._target_=tests.helpers.KillAtStep",
                                 "+callbacks.kill.step=5"), capture_output=True, text=True,
                       env=env_with_path(ROOT))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    last = out / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4, "the last checkpoint should be the mid-epoch one at step 4"

    r = subprocess.run(train_cmd(ann, root, out, "ckpt_path=last"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    full, resumed = weights(tmp_path / "full/checkpoints/last.ckpt"), weights(last)
    different = [k for k in full if not torch.equal(full[k], resumed[k])]
    assert not different, different[:5]
