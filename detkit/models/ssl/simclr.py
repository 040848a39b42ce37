"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations"):
projector MLP and the NT-Xent / InfoNCE loss, with negatives gathered across processes."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    """``Linear -> BatchNorm1d -> ReLU -> Linear -> BatchNorm1d``: ``[N, in_dim] -> [N, out_dim]``.

    The output BatchNorm (no bias before it, as before the hidden one) is the projection head of SimCLR's own code
    and of lightly's ``SimCLRProjectionHead``; ``out_bn=False`` gives the paper's text version (a plain last
    ``Linear``).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128, out_bn: bool = True) -> None:
        super().__init__()
        last: list[nn.Module] = [nn.Linear(hidden_dim, out_dim, bias=not out_bn)]
        if out_bn:
            last.append(nn.BatchNorm1d(out_dim))
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                                 nn.ReLU(inplace=True), *last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def gather_with_grad(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All processes' ``z`` concatenated (``[W * N, D]``), differentiable, and this process's rank.

    Gradients flow back to every process's projections (``torch.distributed.nn`` all-gather), so the negatives of
    the loss span the global batch. Without an initialised process group, returns ``(z, 0)``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z), dim=0), dist.get_rank()


class NTXentLoss(nn.Module):
    """Normalised-temperature cross-entropy (NT-Xent / InfoNCE).

    For ``2N`` views (``z1[i]`` and ``z2[i]`` are two views of image ``i``), each view's positive is its partner
    and the other ``2N - 2`` views are negatives::

        l(i) = -log( exp(s(i, p(i)) / tau) / sum_{k != i} exp(s(i, k) / tau) ),  s = cosine similarity

    averaged over all ``2N`` views, computed with log-sum-exp (cross-entropy) for stability. Under DDP the
    projections of all processes are gathered with gradients, so ``N`` is the global batch.

    Args:
        temperature: ``tau > 0`` (default 0.2).
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """``z1, z2: [N, D]`` projections of the two views -> scalar loss (mean over this process's views)."""
        n = z1.shape[0]
        local = F.normalize(torch.cat([z1, z2], dim=0).float(), dim=1)  # [2N, D]
        everyone, rank = gather_with_grad(local)
        logits = local @ everyone.T / self.temperature  # [2N, W * 2N]
        offset = rank * 2 * n
        # A view is not its own negative: entries (r, offset + r) are the diagonal starting at column ``offset``
        # (a fill through a view: no index tensor, no value tensor copied from the host).
        logits.diagonal(offset).fill_(float("-inf"))
        rows = torch.arange(2 * n, device=local.device)
        positives = offset + (rows + n) % (2 * n)
        return F.cross_entropy(logits, positives)
