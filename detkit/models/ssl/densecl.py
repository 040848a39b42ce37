"""DenseCL (Wang et al., CVPR 2021, "Dense Contrastive Learning for Self-Supervised Visual Pre-Training"):
SimCLR's global loss plus a contrastive loss between the cells of the two views' last feature grids.

Pieces (the encoder, the global :class:`~detkit.models.ssl.simclr.Projector` and NT-Xent are SimCLR's):

* :class:`DenseProjector` -- ``1x1 conv -> ReLU -> 1x1 conv`` on the encoder's last map (``c5``), as the paper's
  dense projection head: one ``out_dim`` vector per grid cell.
* :func:`dense_correspondence` -- for each cell of one view, the cell of the other view whose *backbone* feature
  (``c5``, before any projection) is most similar by cosine similarity (argmax over the other view's cells), as
  the paper does; computed without gradient, in both directions from one batched similarity matrix.
* :class:`DenseContrastiveLoss` -- InfoNCE per cell: the positive is the matched cell's dense projection in the other
  view, the negatives are the pooled dense projections of every *other* image in the batch (see below).
* :class:`DenseCLLoss` -- ``(1 - dense_weight) * global + dense_weight * dense`` (``dense_weight`` is the paper's
  lambda, 0.5 by default), returned with both parts for logging.

**Negatives: in-batch, pooled dense features of the other images.** The paper's negatives for a cell are a MoCo
queue (65,536 entries) of *pooled* dense projections (one vector per image, ``avgpooled_x2`` in its code) made by a
momentum encoder. detkit has no momentum encoder, and a queue filled by the online encoder itself holds features of
earlier, drifted weights: they are inconsistent with the current queries (the very problem MoCo's momentum encoder
exists to solve), so a queue without it would trade quality for count. Here every cell of every view is contrasted
with the pooled, L2-normalised dense projections of the two views of every other image in the global batch -- the
same kind of vector as the paper's queue entries, current instead of stale, and gathered across processes under DDP
with gradients exactly like SimCLR's negatives (``2 * N_global - 2`` negatives per cell). The image's own two pooled
vectors are masked out (the paper's queue never holds the current image). The alternative in-batch choice, every
other image's individual grid cells, would make the logits ``[2N S^2, 2N S^2]`` (2.5 GB at batch 256 and a 7x7 grid)
for negatives that are strongly correlated within an image; the pooled ones keep them ``[2N S^2, 2N]``.
Everything is batched with fixed shapes (``bmm``, ``gather``, one masked cross-entropy): no Python loop over
images, no host read in the step.

Without a momentum (key) encoder both views are queries and keys: the loss is symmetric (cells of view 1 against
view 2 and the reverse, averaged) and gradients flow through positives and negatives, as in SimCLR.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detkit.models.ssl.simclr import NTXentLoss, gather_with_grad


class DenseProjector(nn.Module):
    """``Conv1x1 -> ReLU -> Conv1x1``: ``[N, in_dim, H, W] -> [N, out_dim, H, W]`` (the paper's dense head; no
    normalisation layers, as there)."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden_dim, out_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@torch.no_grad()
def dense_correspondence(b1: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Match the cells of two views by the cosine similarity of their backbone features.

    Args:
        b1, b2: ``[N, C, H1, W1]`` and ``[N, C, H2, W2]`` backbone feature maps of the two views of the same images.

    Returns:
        ``(idx12, idx21)``: ``idx12[n, i]`` is the flat index (row-major, ``r * W2 + c``) of the cell of view 2 most
        similar to cell ``i`` of view 1 of image ``n`` (``[N, H1 * W1]``), ``idx21`` the reverse (``[N, H2 * W2]``).
        Ties go to the first (lowest) index.
    """
    f1 = F.normalize(b1.flatten(2).float(), dim=1)  # [N, C, S1]
    f2 = F.normalize(b2.flatten(2).float(), dim=1)  # [N, C, S2]
    sim = torch.bmm(f1.transpose(1, 2), f2)  # [N, S1, S2]
    return sim.argmax(dim=2), sim.argmax(dim=1)


def _pick_cells(d: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``d: [N, D, S]``, ``idx: [N, S']`` -> ``[N, D, S']`` (``d[n, :, idx[n, j]]``)."""
    return torch.gather(d, 2, idx.unsqueeze(1).expand(-1, d.shape[1], -1))


class DenseContrastiveLoss(nn.Module):
    """The dense InfoNCE loss over the cells of both views (see the module docstring)::

        l(n, i) = -log( exp(q_i . k_m(i) / tau) / (exp(q_i . k_m(i) / tau) + sum_{u != n} exp(q_i . p_u / tau)) )

    for every cell ``i`` of every view of image ``n``: ``q_i`` its normalised dense projection, ``k_m(i)`` the
    normalised dense projection of its matched cell in the other view of the same image, ``p_u`` the normalised
    average-pooled dense projections of both views of every other image ``u`` of the (global) batch. Averaged over
    all ``2 * N * S`` cells of this process.

    Args:
        temperature: ``tau > 0`` (the paper: 0.2).
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, d1: torch.Tensor, d2: torch.Tensor, idx12: torch.Tensor, idx21: torch.Tensor) -> torch.Tensor:
        """``d1, d2: [N, D, H, W]`` dense projections of the two views; ``idx12, idx21`` from
        :func:`dense_correspondence` -> scalar loss."""
        n, dim = d1.shape[:2]
        q1 = F.normalize(d1.flatten(2).float(), dim=1)  # [N, D, S1]
        q2 = F.normalize(d2.flatten(2).float(), dim=1)  # [N, D, S2]
        pos1 = (q1 * _pick_cells(q2, idx12)).sum(1)  # [N, S1]: each view-1 cell with its matched view-2 cell
        pos2 = (q2 * _pick_cells(q1, idx21)).sum(1)  # [N, S2]
        s1, s2 = q1.shape[2], q2.shape[2]
        queries = torch.cat([q1.transpose(1, 2).reshape(n * s1, dim), q2.transpose(1, 2).reshape(n * s2, dim)])
        positives = torch.cat([pos1.reshape(-1), pos2.reshape(-1)])  # [N S1 + N S2]
        pooled = F.normalize(torch.cat([d1.mean((2, 3)), d2.mean((2, 3))]).float(), dim=1)  # [2N, D]
        everyone, rank = gather_with_grad(pooled)  # [W * 2N, D]
        negatives = queries @ everyone.T  # [N S1 + N S2, W * 2N]
        # Mask the query's own image (both of its pooled views): column c is image (c - offset) % N of this process
        # when offset <= c < offset + 2N.
        device = queries.device
        row_image = torch.cat([torch.arange(n, device=device).repeat_interleave(s1),
                               torch.arange(n, device=device).repeat_interleave(s2)])
        col = torch.arange(everyone.shape[0], device=device) - rank * 2 * n
        col_image = torch.where((col >= 0) & (col < 2 * n), col % n, -1)
        negatives = negatives.masked_fill(row_image[:, None] == col_image[None, :], float("-inf"))
        logits = torch.cat([positives[:, None], negatives], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=device))


class DenseCLLoss(nn.Module):
    """``(1 - dense_weight) * NT-Xent(z1, z2) + dense_weight * dense``, with the cell correspondence taken from the
    backbone maps.

    Args:
        temperature: of both parts (the paper uses 0.2 for both).
        dense_weight: the paper's lambda in ``[0, 1]`` (0.5: its default; 0 is SimCLR).
    """

    def __init__(self, temperature: float = 0.2, dense_weight: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= dense_weight <= 1.0:
            raise ValueError(f"dense_weight must be in [0, 1], got {dense_weight}")
        self.dense_weight = dense_weight
        self.global_loss = NTXentLoss(temperature)
        self.dense_loss = DenseContrastiveLoss(temperature)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, b1: torch.Tensor,
                b2: torch.Tensor) -> dict[str, torch.Tensor]:
        """``z: [N, P]`` global projections, ``d: [N, D, H, W]`` dense projections, ``b: [N, C, H, W]`` backbone
        maps of the two views -> ``{"loss", "loss_global", "loss_dense"}`` (scalars)."""
        loss_global = self.global_loss(z1, z2)
        loss_dense = self.dense_loss(d1, d2, *dense_correspondence(b1, b2))
        loss = (1.0 - self.dense_weight) * loss_global + self.dense_weight * loss_dense
        return {"loss": loss, "loss_global": loss_global, "loss_dense": loss_dense}
