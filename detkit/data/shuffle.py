"""Training-set shuffling that depends only on ``(seed, epoch)``, so a run resumed at any epoch boundary draws
exactly what the uninterrupted run drew."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import Sampler
from torchdata.stateful_dataloader import StatefulDataLoader


class EpochShuffle(Sampler[int]):
    """A random permutation of ``range(num_items)`` per epoch, plus the data-loader workers' base seed.

    ``RandomSampler`` with a loader generator draws each epoch from a stream that continues across epochs. When a
    run is resumed from an end-of-epoch checkpoint, Lightning does not restore the (exhausted) loader's state, so
    the resumed run would start that stream over and replay epoch 0's order and augmentations. Here Lightning's
    ``set_epoch(epoch)`` call (made before each epoch's iterator is created) reseeds both the permutation and
    ``generator`` — the loader's own generator, from which PyTorch draws the workers' base seed, i.e. the
    augmentation seeds of :func:`detkit.data.transforms.item_seed`. Mid-epoch resumes still go through
    ``StatefulDataLoader``'s saved state, which replays this sampler to the saved position.

    Lightning creates a run's first iterator before its first ``set_epoch`` call, so the sampler must be built
    with the epoch the run starts at (:func:`starting_epoch`), not 0.

    Args:
        num_items: dataset length.
        seed: run seed.
        generator: the ``generator`` passed to the data loader (reseeded per epoch).
        epoch: the epoch the first iterator draws.
    """

    def __init__(self, num_items: int, seed: int, generator: torch.Generator, epoch: int = 0) -> None:
        self.num_items, self.seed, self.generator = num_items, seed, generator
        self.set_epoch(epoch)

    def _epoch_seed(self) -> int:
        return (self.seed * 1_000_003 + self.epoch) % 2**63

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator.manual_seed(self._epoch_seed())

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[int]:
        order = torch.Generator().manual_seed(self._epoch_seed() ^ 0x5EED)
        yield from torch.randperm(self.num_items, generator=order).tolist()


class EpochStream(EpochShuffle):
    """``per_epoch`` items per epoch from an endless stream of shuffled passes over ``range(num_items)``: the
    stream is the concatenation of permutations seeded by ``(seed, pass)``, and epoch ``e`` takes its items
    ``[e * per_epoch, (e + 1) * per_epoch)``. So a dataset larger than ``per_epoch`` is seen across epochs (not the
    same head every epoch), a smaller one is cycled, and, as with :class:`EpochShuffle`, what an epoch draws (and
    the loader generator's reseed, hence the augmentations) depends only on ``(seed, epoch)``. Used for the
    unlabeled images of self-training, whose epoch follows the labeled loader's length.
    """

    def __init__(self, num_items: int, per_epoch: int, seed: int, generator: torch.Generator, epoch: int = 0) -> None:
        if num_items < 1:
            raise ValueError("EpochStream needs at least one item")
        self.per_epoch = int(per_epoch)
        super().__init__(num_items, seed, generator, epoch)

    def __len__(self) -> int:
        return self.per_epoch

    def _pass(self, index: int) -> list[int]:
        order = torch.Generator().manual_seed((self.seed * 1_000_003 + index) % 2**63 ^ 0x57AEA)
        return torch.randperm(self.num_items, generator=order).tolist()

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * self.per_epoch
        first, offset = divmod(start, self.num_items)
        items: list[int] = []
        index = first
        while len(items) < offset + self.per_epoch:
            items += self._pass(index)
            index += 1
        yield from items[offset: offset + self.per_epoch]


def starting_epoch(trainer) -> int:
    """The epoch a Lightning ``trainer`` is about to train (after restoring a checkpoint), or 0 outside ``fit``.

    This is the value Lightning passes to ``set_epoch`` (the fit loop's processed-epoch count), read at the time
    ``train_dataloader()`` is called, which is after the checkpoint's loop state has been restored.
    """
    try:
        return int(trainer.fit_loop.epoch_progress.current.processed)
    except (AttributeError, RuntimeError):
        return 0


def epoch_shuffled_loader(dataset, seed: int, trainer, batch_size: int, per_epoch: int | None = None,
                          **kwargs: Any) -> StatefulDataLoader:
    """The training loader of both data modules: :class:`EpochShuffle` order, its generator as the loader's, and
    non-persistent workers (each epoch draws a new base seed for :func:`detkit.data.transforms.item_seed`).
    ``per_epoch``: draw that many items per epoch from an :class:`EpochStream` instead (no batch dropped)."""
    generator = torch.Generator()
    epoch = starting_epoch(trainer)
    if per_epoch is not None:
        sampler: EpochShuffle = EpochStream(len(dataset), per_epoch, seed, generator, epoch)
        drop_last = False
    else:
        sampler, drop_last = EpochShuffle(len(dataset), seed, generator, epoch), len(dataset) > batch_size
    return StatefulDataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                              persistent_workers=False, generator=generator, **kwargs)
