"""Measuring encoders without fine-tuning them: cosine kNN accuracy and a linear probe on frozen features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset: Dataset, batch_size: int = 256, num_workers: int = 2,
                     device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled encoder features ``[N, D]`` and labels ``[N]`` of an ``(image, label)`` dataset (eval mode)."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for images, y in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        feats.append(encoder(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 chunk: int = 1024) -> float:
    """Weighted cosine kNN classification accuracy (Wu et al. 2018; the usual SSL monitor).

    Each test feature votes with its ``k`` most cosine-similar training features, weighted by
    ``exp(similarity / temperature)``; ``temperature=None`` gives a plain majority vote.
    """
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), chunk):  # chunks bound the [chunk, N_train] similarity matrix
        sim, idx = (test[start:start + chunk] @ train.T).topk(k, dim=1)
        weights = (sim / temperature).exp() if temperature else torch.ones_like(sim)
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, train_labels[idx], weights)
        correct += (votes.argmax(1) == test_labels[start:start + chunk]).sum().item()
    return correct / len(test)


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, epochs: int = 100, lr: float = 0.1, weight_decay: float = 1e-4,
                 seed: int = 0) -> float:
    """Accuracy of a linear classifier (multinomial logistic regression) on frozen, standardised features.

    Only the linear layer trains: the features are computed once, so the encoder cannot change. The result is a
    function of ``seed`` (the layer's initialisation and the batch order), not of the global random state.
    """
    g = torch.Generator().manual_seed(seed)
    mean, std = train_feats.mean(0), train_feats.std(0).clamp(min=1e-6)
    xtr, xte = (train_feats - mean) / std, (test_feats - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    with torch.random.fork_rng(devices=[]):  # the initialisation from the seed, the caller's generator untouched
        torch.manual_seed(seed)
        layer = nn.Linear(xtr.shape[1], num_classes)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr * 0.01, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for start in range(0, len(xtr), 256):
            idx = perm[start:start + 256]
            loss = F.cross_entropy(layer(xtr[idx]), train_labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        return (layer(xte).argmax(1) == test_labels).float().mean().item()
