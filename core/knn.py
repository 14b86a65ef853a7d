"""Weighted kNN classification on frozen encoder features (DINO's protocol; docs/method.md: k = 20,
cosine similarity, temperature 0.07).

The train split is the memory bank, val the queries, both as deterministic centre crops
(``data/eval_loader.py``, PIL decode). Each rank encodes its shard of both splits; the bank
is all-gathered so every rank holds all of it, each rank classifies its own queries, and the
hit counts are summed over ranks. The bank lives on the device in fp32: ImageNet-1K with
ViT-B is 1.28M x 768 floats, about 4 GB per rank.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symmim.core.config import DataConfig, EvalConfig
from symmim.core.distributed import DistInfo, all_gather
from symmim.data.eval_loader import eval_batches, train_val_splits


def pool_features(tokens: Tensor, pool: str) -> Tensor:
    """Encoder output ``[B, 1 + N, D]`` -> ``[B, D]``: the CLS token or the mean of the patch tokens."""
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)


@torch.no_grad()
def extract_features(encoder: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], pool: str) -> tuple[Tensor, Tensor]:
    """Pooled fp32 features ``[n, D]`` and labels ``[n]`` of every batch (any encoder dtype)."""
    feats, labels = [], []
    for images, y in batches:
        feats.append(pool_features(encoder(images), pool).float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def knn_scores(bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int, k: int,
               temperature: float, chunk: int = 256) -> Tensor:
    """Class votes ``[Q, C]``: each query's ``k`` most cosine-similar bank entries vote ``exp(sim / T)``."""
    bank = F.normalize(bank, dim=1)  # [M, D]
    k = min(k, bank.shape[0])
    votes = []
    for q in F.normalize(queries, dim=1).split(chunk):  # [q, D]
        sim, idx = (q @ bank.t()).topk(k, dim=1)  # [q, k]
        v = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.append(v.scatter_add_(1, bank_labels[idx], (sim / temperature).exp()))
    return torch.cat(votes)


def topk_hits(scores: Tensor, labels: Tensor, ks: tuple[int, ...]) -> Tensor:
    """How many rows have their label among the ``k`` highest scores, for each ``k``; label -1 rows never count."""
    ranked = scores.topk(max(ks), dim=1).indices  # [Q, max k]
    match = ranked == labels[:, None]  # [Q, max k]
    return torch.stack([match[:, :k].any(dim=1).sum() for k in ks])


def percent_across_ranks(counts: Tensor) -> tuple[float, float]:
    """This rank's ``[top-1 hits, top-5 hits, images]`` summed over ranks -> (top-1 %, top-5 %)."""
    top1, top5, total = all_gather(counts[None]).sum(dim=0).tolist()
    return 100.0 * top1 / total, 100.0 * top5 / total


def knn_accuracy(encoder: nn.Module, e: EvalConfig, data: DataConfig, img_size: int, dist_info: DistInfo) -> dict[str, float]:
    """Top-1 / top-5 (percent) of weighted kNN on ``encoder``'s features; every rank must call it.

    Uses the ``eval`` section (k, temperature, pool, batch size) and the ``data`` section's data
    set (train/ is the bank, val/ the queries) at ``img_size``. Works on a bf16 encoder
    (features cast to fp32) and restores its train/eval mode.
    """
    train, val = train_val_splits(data)

    def batches(items):
        return eval_batches(items, img_size, e.batch_size, dist_info.rank, dist_info.world, data.workers,
                            dist_info.device)

    was_training = encoder.training
    encoder.eval()
    bank, bank_labels = extract_features(encoder, batches(train), e.pool)  # this rank's shard
    queries, labels = extract_features(encoder, batches(val), e.pool)
    encoder.train(was_training)
    bank, bank_labels = all_gather(bank), all_gather(bank_labels)  # [M, D], [M] over all ranks
    real = bank_labels >= 0  # drop the padding
    scores = knn_scores(bank[real], bank_labels[real], queries, len(train.classes), e.knn_k, e.knn_temperature)
    ks = (1, min(5, len(train.classes)))
    top1, top5 = percent_across_ranks(torch.cat([topk_hits(scores, labels, ks), (labels >= 0).sum()[None]]))
    return {"knn_top1": top1, "knn_top5": top5}
