"""Count the operations of a piece of code that make a GPU wait for the host (or the host for the GPU).

On a GPU these stall the pipeline: the host cannot queue more work until the device has produced a value whose
*size* or *content* the host needs (``nonzero``, boolean-mask indexing, ``.item()``, ``unique`` ...), or it blocks
on a host-to-device copy of a tensor built from Python numbers. :class:`HostSyncCounter` is a
``TorchDispatchMode`` that sees every ATen call, so the same count is taken on a CPU-only machine: a test can keep
the training and inference paths free of them without a GPU.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: Ops whose output shape depends on tensor values, or that read a value back to the host.
DATA_DEPENDENT = {
    aten.nonzero.default: "nonzero",
    aten.nonzero_static.default: None,  # fixed-size: fine
    aten._local_scalar_dense.default: "item",  # .item(), int(t), float(t), bool(t), .tolist() element reads
    aten.masked_select.default: "masked_select",
    aten.unique_dim.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.is_nonzero.default: "item",
    aten.equal.default: "equal",
}


def _has_bool_index(args: Any) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()) if i is not None)


class HostSyncCounter(TorchDispatchMode):
    """Counts host-synchronising ATen calls by kind while active::

        with HostSyncCounter() as sync:
            model.loss(images, targets)
        assert sync.total <= 2, sync.counts

    Counted: ``nonzero``, ``.item()``-like reads, ``masked_select``, ``unique``, ``equal``, boolean-mask
    ``index``/``index_put_``, ``repeat_interleave`` without ``output_size``, and ``lift_fresh`` (a tensor made from
    Python data: on a GPU a blocking host-to-device copy).
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - the dispatcher's signature
        kwargs = kwargs or {}
        name = DATA_DEPENDENT.get(func)
        if name:
            self.counts[name] += 1
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and _has_bool_index(args):
            self.counts["bool_mask_index"] += 1
        elif func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor) \
                and kwargs.get("output_size") is None:
            self.counts["repeat_interleave"] += 1
        elif func is aten.lift_fresh.default:
            self.counts["tensor_from_host_data"] += 1
        return func(*args, **kwargs)
