"""The training loader's augmentation seeds: carried by the sampler, so workers persist across epochs while every
epoch still draws new augmentations, and runs made when workers restarted every epoch are reproduced exactly."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from detkit.data.shuffle import EpochShuffle, EpochStream, epoch_shuffled_loader
from detkit.data.transforms import item_seed


class Seeds(Dataset):
    """Item ``i`` is ``(i, item_seed(i), worker pid)``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        info = torch.utils.data.get_worker_info()
        return index, item_seed(index), (0 if info is None else __import__("os").getpid())


def _collate(items):
    return items


def _epochs(loader, sampler, epochs: int) -> list[list[tuple[int, int, int]]]:
    out = []
    for e in range(epochs):
        sampler.set_epoch(e)  # what Lightning does before each epoch's iterator
        out.append([item for batch in loader for item in batch])
    return out


def _old_loader(n: int, seed: int, per_epoch: int | None = None):
    """The loader as it was before persistent workers: the item seed came from the workers' base seed, which
    each epoch's (non-persistent) iterator drew from the reseeded loader generator."""
    g = torch.Generator()
    sampler = EpochShuffle(n, seed, g) if per_epoch is None else EpochStream(n, per_epoch, seed, g)
    return StatefulDataLoader(Seeds(n), batch_size=3, sampler=sampler, num_workers=2, persistent_workers=False,
                              drop_last=per_epoch is None,
                              generator=g, collate_fn=_collate), sampler


def _new_loader(n: int, seed: int, per_epoch: int | None = None, num_workers: int = 2):
    loader = epoch_shuffled_loader(Seeds(n), seed, None, 3, per_epoch=per_epoch, num_workers=num_workers,
                                   collate_fn=_collate)
    return loader, loader.sampler


def _without_pid(epochs):
    return [[item[:2] for item in epoch] for epoch in epochs]


def _first_draws(epochs):
    """Each epoch's draws without the pid, an index's repeats within the epoch dropped."""
    out = []
    for epoch in _without_pid(epochs):
        seen: set[int] = set()
        out.append([d for d in epoch if not (d[0] in seen or seen.add(d[0]))])
    return out


def test_item_seeds_equal_those_of_the_per_epoch_worker_loader_in_every_epoch():
    for per_epoch in (None, 7):
        old = _epochs(*_old_loader(10, seed=5, per_epoch=per_epoch), epochs=3)
        new = _epochs(*_new_loader(10, seed=5, per_epoch=per_epoch), epochs=3)
        # the same items in the same order, and each item's first draw in an epoch has the old loader's seed (the
        # old loader repeated that seed when the stream drew an item twice in an epoch: see the test below)
        assert [[i for i, _ in e] for e in _without_pid(new)] == [[i for i, _ in e] for e in _without_pid(old)]
        assert _first_draws(new) == _first_draws(old), per_epoch
        if per_epoch is None:
            assert _without_pid(new) == _without_pid(old)
        assert all(s is not None for epoch in new for _, s, _ in epoch)
        # every epoch draws new seeds for the same item
        for a, b in zip(new, new[1:]):
            assert {i: s for i, s, _ in a} != {i: s for i, s, _ in b}


def test_workers_persist_across_epochs():
    loader, sampler = _new_loader(10, seed=1)
    assert loader.persistent_workers
    pids = [{pid for _, _, pid in epoch} for epoch in _epochs(loader, sampler, 3)]
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]


def test_the_main_process_draws_the_workers_seeds():
    """With ``num_workers=0`` the items get the same seeds as from workers (so a resumed run is exact there too)."""
    workers = _epochs(*_new_loader(10, seed=2), epochs=2)
    main = _epochs(*_new_loader(10, seed=2, num_workers=0), epochs=2)
    assert _without_pid(main) == _without_pid(workers)
    assert item_seed(3) is None  # outside a training loader the main process has no epoch seed


def test_an_item_drawn_twice_in_an_epoch_gets_a_new_augmentation_each_time():
    """A stream of 7 draws per epoch over 3 unlabeled images gives each image 2 or 3 times per epoch: every draw
    has its own seed (first draws keep the epoch's seed, as checked against the old loader above)."""
    old = _epochs(*_old_loader(3, seed=4, per_epoch=7), epochs=1)[0]
    assert len({s for _, s, _ in old}) == 3  # the old loader: 7 draws, 3 augmentations
    for num_workers in (0, 2):
        epochs = _epochs(*_new_loader(3, seed=4, per_epoch=7, num_workers=num_workers), epochs=3)
        for epoch in epochs:
            assert sorted(i for i, _, _ in epoch) != sorted(set(i for i, _, _ in epoch))  # repeats happen
            seeds = [s for _, s, _ in epoch]
            assert len(set(seeds)) == len(seeds) == 7, epoch
