"""Count the operations of a piece of code that make a GPU wait for the host (or the host for the GPU).

On a GPU these stall the pipeline: the host cannot queue more work until the device has produced a value whose
*size* or *content* the host needs (``nonzero``, boolean-mask indexing, ``.item()``, ``unique`` ...), or it blocks
on a host-to-device copy of a tensor built from Python numbers. :class:`HostSyncCounter` records every ATen call
with ``torch.profiler`` (CPU activity), so the same count is taken on a CPU-only machine and a test can keep the
training and inference paths free of them without a GPU.

Why the profiler and not a ``TorchDispatchMode``: while a Python dispatch mode is active, autograd takes its
"tensor subclass" branches, and some backward formulas differ there. ``prod``'s backward, for one, reads
``(input == 0).sum().item()`` to pick a formula -- a host synchronisation per call on a GPU -- but under a
dispatch mode it takes the sync-free branch, so a counter built on a mode sees 0 where the GPU waits (this hid
the two synchronisations per YOLO step measured on an H100, both from ``prod(-1)`` in the IoU loss). The profiler
observes the code as it runs, backward included, without changing it.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

#: ATen ops that read a value back to the host or whose output shape depends on tensor values.
SYNC_OPS = {
    "aten::nonzero": "nonzero",
    "aten::_local_scalar_dense": "item",  # .item(), int(t), float(t), bool(t), .tolist() element reads
    "aten::is_nonzero": "item",
    "aten::masked_select": "masked_select",
    "aten::_unique2": "unique",
    "aten::unique_dim": "unique",
    "aten::unique_consecutive": "unique",
    "aten::equal": "equal",
    "aten::lift_fresh": "tensor_from_host_data",  # torch.tensor(python data): a blocking copy to a GPU
}
#: Ops that synchronise through a sync op they call (boolean-mask indexing calls nonzero; repeat_interleave
#: without ``output_size`` reads the total back): the count names the outer op.
WRAPPERS = {
    "aten::index": "bool_mask_index",
    "aten::index_put_": "bool_mask_index",
    "aten::_index_put_impl_": "bool_mask_index",
    "aten::repeat_interleave": "repeat_interleave",
}


class HostSyncCounter:
    """Counts host-synchronising ATen calls by kind while active::

        with HostSyncCounter() as sync:
            loss = model.loss(images, targets)
            loss.backward()
        assert sync.total == 0, sync.counts  # sync.sites names the ops (or backward nodes) they came from

    Counted: ``nonzero``, ``.item()``-like reads, ``masked_select``, ``unique``, ``equal``, boolean-mask
    ``index``/``index_put_``, ``repeat_interleave`` without ``output_size``, and ``lift_fresh`` (a tensor made from
    Python data). Calls made inside autograd's backward formulas are seen too (``sites`` gives the backward node).
    Nested calls count once, for the outermost op.
    """

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.sites: Counter = Counter()
        self._prof: profile | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> "HostSyncCounter":
        self._prof = profile(activities=[ProfilerActivity.CPU])
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        counted: set[int] = set()
        for event in self._prof.events():
            if event.name not in SYNC_OPS:
                continue
            chain, parent = [], event.cpu_parent
            while parent is not None:
                chain.append(parent)
                parent = parent.cpu_parent
            if any(p.name in SYNC_OPS for p in chain):
                continue  # counted with the outer sync op
            wrappers = [p for p in chain if p.name in WRAPPERS]
            outer = wrappers[-1] if wrappers else event
            if id(outer) in counted:
                continue
            counted.add(id(outer))
            kind = WRAPPERS[outer.name] if wrappers else SYNC_OPS[event.name]
            self.counts[kind] += 1
            self.sites[chain[-1].name if chain else event.name] += 1
        self._prof = None
