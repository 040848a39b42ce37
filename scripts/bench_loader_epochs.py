"""Training-loader time per run on a small labeled set: detkit's loader (workers started once, each epoch's
augmentation seed sent with the indices) against the loader it replaces (workers restarted every epoch, their
base seed giving the augmentation seeds), same dataset, batches and seeds.

    python scripts/bench_loader_epochs.py [--epochs 150] [--workers 2] [overrides ...]

The overrides compose ``detkit-train``'s config (default: the CPU study's 5% YOLO job, ``experiment=study_bccd_cpu
data.train_fraction=0.05 model=yolo``: 10 images, batch 4, so an epoch is 2 steps and a 300-step run is 150
epochs). Both loaders iterate ``--epochs`` epochs with ``set_epoch`` called before each, as Lightning does; no model
runs, so the time is the loader's alone. The script also checks that both deliver identical batches (same images,
same augmentations) in every epoch, and prints the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torchdata.stateful_dataloader import StatefulDataLoader

from detkit.data.collate import detection_collate
from detkit.data.shuffle import EpochShuffle, epoch_shuffled_loader
from detkit.paths import config_dir


def per_epoch_restart_loader(dataset, seed: int, batch_size: int, workers: int):
    """The loader before this change: non-persistent workers whose base seed (drawn from the reseeded loader
    generator) gave the item seeds."""
    generator = torch.Generator()
    sampler = EpochShuffle(len(dataset), seed, generator)
    return StatefulDataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=len(dataset) > batch_size,
                              persistent_workers=False, generator=generator, num_workers=workers,
                              collate_fn=detection_collate), sampler


def run(loader, sampler, epochs: int) -> tuple[float, list[torch.Tensor]]:
    """Seconds for ``epochs`` epochs, and a checksum of every batch's images."""
    sums = []
    start = time.perf_counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for images, _targets in loader:
            sums.append(images.double().sum())
    return time.perf_counter() - start, sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("overrides", nargs="*",
                        default=["experiment=study_bccd_cpu", "data.train_fraction=0.05", "model=yolo"])
    args = parser.parse_args()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    print(f"{len(dataset)} training images, batch {dm.batch_size}, {args.epochs} epochs, {args.workers} workers, "
          f"torch threads {torch.get_num_threads()}")
    new = epoch_shuffled_loader(dataset, dm.seed, None, dm.batch_size, num_workers=args.workers,
                                collate_fn=detection_collate)
    t_new, s_new = run(new, new.sampler, args.epochs)
    t_old, s_old = run(*per_epoch_restart_loader(dataset, dm.seed, dm.batch_size, args.workers), args.epochs)
    same = len(s_new) == len(s_old) and all(torch.equal(a, b) for a, b in zip(s_new, s_old))
    print(f"{'loader':<44} {'total s':>8} {'ms/epoch':>9}")
    print(f"{'detkit (persistent workers, seeds in sampler)':<44} {t_new:8.1f} {1000 * t_new / args.epochs:9.0f}")
    print(f"{'workers restarted every epoch':<44} {t_old:8.1f} {1000 * t_old / args.epochs:9.0f}")
    print(f"ratio (restarting / detkit): {t_old / t_new:.1f}x; identical batches in every epoch: {same}")
    if not same:
        raise SystemExit("the two loaders delivered different batches")


if __name__ == "__main__":
    main()
