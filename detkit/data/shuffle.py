"""Training-set shuffling that depends only on ``(seed, epoch)``, so a run resumed at any epoch boundary draws
exactly what the uninterrupted run drew."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from detkit.data.transforms import epoch_base


class EpochShuffle(Sampler[int]):
    """A random permutation of ``range(num_items)`` per epoch, plus the data-loader workers' base seed.

    ``RandomSampler`` with a loader generator draws each epoch from a stream that continues across epochs. When a
    run is resumed from an end-of-epoch checkpoint, Lightning does not restore the (exhausted) loader's state, so
    the resumed run would start that stream over and replay epoch 0's order and augmentations. Here Lightning's
    ``set_epoch(epoch)`` call (made before each epoch's iterator is created) reseeds the permutation, the epoch's
    augmentation base seed (:meth:`base_seed`, sent with every index by :class:`SeededIndices`, from which
    :func:`detkit.data.transforms.item_seed` derives each item's seed) and ``generator``, the loader's own
    generator. Mid-epoch resumes still go through ``StatefulDataLoader``'s saved state, which replays this sampler
    to the saved position.

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

    def base_seed(self) -> int:
        """This epoch's augmentation base seed: the first number ``generator`` gives after :meth:`set_epoch`, which
        is the base seed a non-persistent loader iterator draws for its workers, so runs made when workers restarted
        every epoch (and took their item seeds from it) are reproduced exactly."""
        g = torch.Generator().manual_seed(self._epoch_seed())
        return int(torch.empty((), dtype=torch.int64).random_(generator=g))

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


class SeededIndices(Sampler[tuple[int, int]]):
    """Yields ``(index, base_seed)`` for each index of an :class:`EpochShuffle` (or :class:`EpochStream`): the
    epoch's augmentation seed travels with the index to whichever process loads it, so the loader's workers can
    persist across epochs. ``set_epoch`` is forwarded (Lightning calls it on the loader's sampler, and on the
    sampler inside its DDP wrapper)."""

    def __init__(self, sampler: EpochShuffle) -> None:
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = self.sampler.base_seed()
        drawn: dict[int, int] = {}
        for index in self.sampler:
            # An EpochStream over fewer items than an epoch draws gives an index more than once: its k-th draw in
            # the epoch (k >= 1) gets its own base, so it is a new augmentation, not a copy of the first draw.
            k = drawn.get(index, 0)
            drawn[index] = k + 1
            yield index, base if k == 0 else hash((base, k)) % 2**63


class SeededItems(Dataset):
    """``SeededItems(dataset)[(index, base_seed)]`` is ``dataset[index]`` loaded with :func:`item_seed
    <detkit.data.transforms.item_seed>` derived from ``base_seed`` (see :class:`SeededIndices`)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, base = key
        with epoch_base(base):
            return self.dataset[index]


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
    """The training loader of both data modules: :class:`EpochShuffle` order, its generator as the loader's, each
    index sent with the epoch's augmentation base seed (:class:`SeededIndices`, :class:`SeededItems`), and
    persistent workers (started once per run, not once per epoch: on a small dataset, whose epochs last a few
    steps, restarting them dominated the run time). ``per_epoch``: draw that many items per epoch from an
    :class:`EpochStream` instead (no batch dropped)."""
    generator = torch.Generator()
    epoch = starting_epoch(trainer)
    if per_epoch is not None:
        sampler: EpochShuffle = EpochStream(len(dataset), per_epoch, seed, generator, epoch)
        drop_last = False
    else:
        sampler, drop_last = EpochShuffle(len(dataset), seed, generator, epoch), len(dataset) > batch_size
    return StatefulDataLoader(SeededItems(dataset), batch_size=batch_size, sampler=SeededIndices(sampler),
                              drop_last=drop_last, persistent_workers=kwargs.get("num_workers", 0) > 0,
                              generator=generator, **kwargs)
