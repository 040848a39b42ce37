"""detkit.eval.ssl_eval: the cosine kNN monitor on hand-built features whose votes are known, the linear probe on
separable and on label-free features, and feature extraction in eval mode."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from detkit.eval.ssl_eval import extract_features, knn_accuracy, linear_probe


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_knn_votes_by_cosine_similarity_weighted_by_temperature():
    """One class-0 neighbour at 1 degree and two class-1 neighbours at 30 degrees: k=3 with a low temperature
    follows the near one (exp(0.9998/0.07) outweighs 2 exp(0.866/0.07)), a plain majority vote the two far ones."""
    train = torch.tensor([unit(1), unit(30), unit(-30), unit(180)])
    labels = torch.tensor([0, 1, 1, 2])
    test, truth = torch.tensor([unit(0)]), torch.tensor([0])
    assert knn_accuracy(train, labels, test, truth, k=3, temperature=0.07) == 1.0
    assert knn_accuracy(train, labels, test, truth, k=3, temperature=None) == 0.0
    assert knn_accuracy(train, labels, test, truth, k=1) == 1.0


def test_knn_is_cosine_k_is_capped_and_chunks_do_not_change_the_result():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 8, generator=g), torch.randn(30, 8, generator=g)
    labels, truth = torch.randint(0, 3, (50,), generator=g), torch.randint(0, 3, (30,), generator=g)
    base = knn_accuracy(train, labels, test, truth, k=5)
    scale = torch.rand(50, 1, generator=g) * 10 + 0.1  # lengths do not matter, only directions
    assert knn_accuracy(train * scale, labels, test * 3, truth, k=5) == base
    assert knn_accuracy(train, labels, test, truth, k=5, chunk=7) == base
    assert knn_accuracy(train, labels, test, truth, k=500) == knn_accuracy(train, labels, test, truth, k=50)
    exact = torch.tensor([unit(10 * i) for i in range(5)])  # every test point is also a training point
    assert knn_accuracy(exact, torch.arange(5), exact, torch.arange(5), k=1) == 1.0


def _blobs(n: int, offset: float, seed: int, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    feats = torch.randn(n, dim, generator=g)
    feats[:, 0] += offset * (2 * labels - 1)  # the classes differ along one direction only
    return feats * 50 + 1000, labels  # far from standardised: the probe standardises


def test_linear_probe_separates_separable_features_and_is_at_chance_without_signal():
    xtr, ytr = _blobs(2048, 8.0, seed=1)  # 8 batches of 256 per epoch: the probe's steps are sized for real sets
    xte, yte = _blobs(200, 8.0, seed=2)
    assert linear_probe(xtr, ytr, xte, yte) == 1.0
    ntr, nte = _blobs(200, 0.0, seed=3), _blobs(400, 0.0, seed=4)
    assert abs(linear_probe(*ntr, *nte) - 0.5) < 0.1  # no signal: a coin toss


def test_linear_probe_is_a_function_of_its_seed():
    xtr, ytr = _blobs(120, 0.7, seed=5)  # overlapping classes: the result depends on the run
    xte, yte = _blobs(120, 0.7, seed=6)
    torch.manual_seed(1)
    first = linear_probe(xtr, ytr, xte, yte, epochs=5, seed=3)
    torch.manual_seed(2)  # the global generator must not matter
    assert linear_probe(xtr, ytr, xte, yte, epochs=5, seed=3) == first


class _BatchStats(nn.Module):
    """Outputs its input through a BatchNorm: in train mode the output depends on the batch, in eval mode not."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.bn.running_mean.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_features_are_extracted_in_eval_mode_and_the_mode_is_restored(batch_size):
    encoder = _BatchStats().train()
    images = torch.arange(30, dtype=torch.float32).reshape(10, 3)
    feats, labels = extract_features(encoder, TensorDataset(images, torch.arange(10) % 3), batch_size=batch_size,
                                     num_workers=0)
    assert encoder.training  # restored
    torch.testing.assert_close(feats, encoder.eval()(images))  # running statistics, not the batch's
    assert labels.tolist() == [i % 3 for i in range(10)] and feats.shape == (10, 3)
    assert encoder.bn.num_batches_tracked.item() == 0  # nothing was trained
