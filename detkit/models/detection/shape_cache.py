"""Constant tensors that depend only on shapes (anchors, cell grids, lookup tables), built once per key.

Eager steps read them from a dict, so a training step builds nothing after the first (on a GPU, building a table
from Python numbers is a host-to-device copy that waits). Under ``torch.compile`` the value is built inside the
graph instead: the compiler folds index arithmetic such as ``arange``/``meshgrid`` into the kernels that use it,
and a dict that the first compiled call filled would fail the compiler's guards on its keys and compile the whole
step a second time.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

T = TypeVar("T")


def cached(cache: dict, key: Hashable, build: Callable[[], T]) -> T:
    """``cache[key]``, made by ``build()`` on first use; always ``build()`` while ``torch.compile`` traces.

    ``key`` should be plain values (ints, strings, tuples of them: ``str(device)``, not a ``torch.device``)."""
    if torch.compiler.is_compiling():
        return build()
    if key not in cache:
        cache[key] = build()
    return cache[key]
