"""Weighted kNN monitor (InstDisc / the CIFAR-10 Colab): cosine similarity, top-k neighbours,
votes weighted by exp(sim / t). Chunked over queries so memory stays bounded (chunk x N)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = 200, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores (Q, num_classes) of L2-normalised `query` features against a labelled bank."""
    query, bank = F.normalize(query, dim=1), F.normalize(bank, dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for lo in range(0, query.shape[0], chunk):
        sim = query[lo:lo + chunk] @ bank.T  # chunk x N
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / t).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int, k: int = 200,
                 t: float = 0.1) -> float:
    scores = knn_predict(test_feats, train_feats, train_labels, num_classes, k, t)
    return (scores.argmax(1) == test_labels).float().mean().item()
