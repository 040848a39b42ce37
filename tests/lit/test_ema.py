"""The detector's EMA (``model.ema_decay``; YOLO's default) moves once per optimiser step, inside
``optimizer_step``, before any callback sees the step: a mid-epoch checkpoint holds the EMA of its step, so a run
resumed from it ends bit-identical (weights and EMA weights) to the uninterrupted run, and under gradient
accumulation the EMA counts optimiser steps, not micro-batches. (Updated in ``on_train_batch_end``, which Lightning
calls after the checkpoint callback's, the checkpoint held an EMA one update behind that the resumed run never
made.) In-process runs of a tiny YOLO on 8 images of 64 px, batches of 2: 4 steps per epoch."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.helpers import TINY, compose_train

# seed 5; a decay low enough (and ramp short enough) that each update visibly moves the EMA
RUN = ["model=yolo", "model.ema_decay=0.9", "seed=5"]


def fit(cfg, max_steps: int, ckpt_dir=None, ckpt_path=None, **trainer_kw):
    """``(module, trainer)`` after training ``cfg`` to ``max_steps`` as ``detkit-train`` does (seeded, the config's
    trainer), with a checkpoint every 2 steps into ``ckpt_dir`` when given, resumed from ``ckpt_path`` when given."""
    L.seed_everything(cfg.seed, workers=True)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    model = instantiate(cfg.model, categories=dm.categories.to_list(), image_size=cfg.data.image_size,
                        seed=cfg.seed, _recursive_=False)
    model.ema.ramp = 2.0
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=2, save_top_k=-1)] \
        if ckpt_dir else []
    trainer = instantiate(cfg.trainer, logger=False, callbacks=callbacks, enable_checkpointing=bool(ckpt_dir),
                          default_root_dir=None, max_epochs=-1, max_steps=max_steps, limit_val_batches=0,
                          num_sanity_val_steps=0, enable_progress_bar=False, **trainer_kw)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, trainer


def same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b  # the EMA's counter is extra state


@pytest.mark.parametrize("workers", [1, 0])
def test_a_run_resumed_from_a_mid_epoch_checkpoint_ends_with_the_uninterrupted_weights_and_ema(synthetic_set,
                                                                                                tmp_path, workers):
    # augmentations are seeded per item from the epoch's seed, which the sampler sends with each index: in a
    # worker and in the main process alike, so a resume redraws exactly what the interrupted run drew
    cfg = compose_train(synthetic_set, *RUN, f"data.num_workers={workers}", fast=TINY)
    full, trainer = fit(cfg, 3, ckpt_dir=tmp_path / "ckpt")  # a checkpoint at step 2, mid-epoch
    assert trainer.global_step == 3
    saved = torch.load(tmp_path / "ckpt" / "step=2.ckpt", map_location="cpu", weights_only=True)
    assert saved["state_dict"]["ema._extra_state"] == {"updates": 2}, "the checkpoint's EMA is not that of its step"

    resumed, trainer = fit(cfg, 3, ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")
    assert trainer.global_step == 3
    a, b = full.state_dict(), resumed.state_dict()
    assert any(k.startswith("ema.module.") for k in a) and a.keys() == b.keys()
    different = [k for k in a if not same(a[k], b[k])]
    assert not different, different[:5]
    assert a["ema._extra_state"] == {"updates": 3}
    # not vacuous: the EMA lags the weights
    assert any(not torch.equal(p, q) for p, q in zip(full.detector.parameters(), full.ema.module.parameters()))


@pytest.mark.parametrize("accumulate", [2, 3])
def test_under_gradient_accumulation_the_ema_counts_optimiser_steps(synthetic_set, accumulate):
    """4 batches per epoch: accumulating 2, steps after batches 2 and 4 of each epoch; accumulating 3, after
    batches 3 and 4 (the epoch's last, uneven group)."""
    cfg = compose_train(synthetic_set, *RUN, fast=TINY)
    model, trainer = fit(cfg, 3, accumulate_grad_batches=accumulate)
    updates = model.ema.updates
    assert trainer.global_step == 3 and updates == 3
