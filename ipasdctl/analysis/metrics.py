"""Evaluation metrics as pure tensor functions (no files, no models): accuracy, calibration, compactness.

- Top-k accuracy (%): the share of samples whose label is among the k largest logits (accuracy.py).
- Negative log-likelihood (nats): NLL = -(1/n) sum_i log softmax(z_i)[y_i].
- Expected calibration error (Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural Networks",
  ICML 2017): the confidence c_i = max_k softmax(z_i)_k falls into one of M = 15 equal-width bins
  B_m = ((m-1)/M, m/M];  ECE = sum_m (|B_m| / n) * |acc(B_m) - conf(B_m)|, with acc(B_m) the share of
  correct argmax predictions in the bin and conf(B_m) its mean confidence. The reliability diagram plots
  acc(B_m) against the bin.
- Feature compactness, on the L2-normalised embeddings g_i = f_i / ||f_i|| (the geometry IPASD's prototypes
  live in, see ipasd.md), with mu_c = mean of g_i over the samples of class c (not re-normalised):
    mean cosine to the class mean  = (1/n) sum_i cos(g_i, mu_{y_i})             (higher: tighter classes)
    intra/inter distance ratio     = mean_{i!=j, y_i=y_j} ||g_i - g_j|| / mean_{y_i!=y_j} ||g_i - g_j||
                                                                                (lower: tighter, better separated)
  The pairwise means go over every ordered pair of distinct samples, computed in row chunks with a matrix
  product (||g_i - g_j||^2 = 2 - 2 g_i.g_j for unit vectors), never a loop over samples.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..accuracy import topk_hits

ECE_BINS = 15


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """{k: accuracy in %} for each k (k larger than the number of classes counts every sample correct; ties
    broken by class index, see accuracy.py)."""
    n = max(labels.numel(), 1)
    return {k: 100.0 * hits / n for k, hits in zip(ks, topk_hits(logits, labels, ks).tolist())}


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean -log p(y_i | x_i) in nats."""
    return F.cross_entropy(logits.float(), labels, reduction="mean").item()


def confidence_and_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max softmax probability, whether the argmax is the label) per sample."""
    probabilities = logits.float().softmax(dim=1)
    confidence, prediction = probabilities.max(dim=1)
    return confidence, prediction == labels


def bin_index(confidences: torch.Tensor, num_bins: int = ECE_BINS) -> torch.Tensor:
    """The bin ((m-1)/M, m/M] of each confidence, as 0..M-1 (a confidence of exactly 0 goes to bin 0)."""
    return (torch.ceil(confidences.double() * num_bins).long() - 1).clamp(0, num_bins - 1)


def reliability_bins(confidences: torch.Tensor, correct: torch.Tensor, num_bins: int = ECE_BINS) -> dict:
    """Per equal-width bin: lower/upper edge, sample count, accuracy and mean confidence (None where empty)."""
    index = bin_index(confidences, num_bins)
    count = torch.bincount(index, minlength=num_bins).double()
    correct_sum = torch.bincount(index, weights=correct.double(), minlength=num_bins)
    confidence_sum = torch.bincount(index, weights=confidences.double(), minlength=num_bins)
    filled = count > 0
    accuracy = torch.where(filled, correct_sum / count.clamp_min(1), torch.zeros_like(count))
    mean_confidence = torch.where(filled, confidence_sum / count.clamp_min(1), torch.zeros_like(count))
    edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)
    return {
        "lower": edges[:-1].tolist(),
        "upper": edges[1:].tolist(),
        "count": [int(c) for c in count.tolist()],
        "accuracy": [a if f else None for a, f in zip(accuracy.tolist(), filled.tolist())],
        "confidence": [c if f else None for c, f in zip(mean_confidence.tolist(), filled.tolist())],
    }


def expected_calibration_error(confidences: torch.Tensor, correct: torch.Tensor, num_bins: int = ECE_BINS) -> float:
    """ECE = sum_m |B_m|/n |acc(B_m) - conf(B_m)|  ==  (1/n) sum_m |sum_{B_m} correct - sum_{B_m} confidence|."""
    index = bin_index(confidences, num_bins)
    correct_sum = torch.bincount(index, weights=correct.double(), minlength=num_bins)
    confidence_sum = torch.bincount(index, weights=confidences.double(), minlength=num_bins)
    return ((correct_sum - confidence_sum).abs().sum() / max(confidences.numel(), 1)).item()


def ece_from_bins(bins: dict) -> float:
    """The ECE of reliability bins (possibly pooled over several runs)."""
    n = sum(bins["count"])
    if n == 0:
        return float("nan")
    return sum(c * abs(a - p) for c, a, p in zip(bins["count"], bins["accuracy"], bins["confidence"]) if c) / n


def pool_reliability_bins(bins_list: list[dict]) -> dict:
    """Reliability bins of several runs on the same bin edges, pooled as if one run had made every prediction."""
    first = bins_list[0]
    count = [0] * len(first["count"])
    correct = [0.0] * len(count)
    confidence = [0.0] * len(count)
    for bins in bins_list:
        for m, c in enumerate(bins["count"]):
            if c:
                count[m] += c
                correct[m] += c * bins["accuracy"][m]
                confidence[m] += c * bins["confidence"][m]
    return {
        "lower": list(first["lower"]),
        "upper": list(first["upper"]),
        "count": count,
        "accuracy": [correct[m] / count[m] if count[m] else None for m in range(len(count))],
        "confidence": [confidence[m] / count[m] if count[m] else None for m in range(len(count))],
    }


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """count, correct and accuracy (%, NaN for a class with no test sample) per class."""
    count = torch.bincount(labels, minlength=num_classes)
    correct = torch.bincount(labels, weights=(predictions == labels).double(), minlength=num_classes).long()
    accuracy = torch.where(count > 0, 100.0 * correct.double() / count.clamp_min(1).double(),
                           torch.full_like(count, float("nan"), dtype=torch.float64))
    return {"count": count, "correct": correct, "accuracy": accuracy}


def class_means(unit_embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C x D: the mean of the (normalised) embeddings of each class; a class without samples gets zeros."""
    sums = torch.zeros(num_classes, unit_embeddings.shape[1], dtype=unit_embeddings.dtype,
                       device=unit_embeddings.device)
    sums.index_add_(0, labels, unit_embeddings)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(unit_embeddings.dtype)
    return sums / counts[:, None]


def cosine_to_class_mean(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """cos(g_i, mu_{y_i}) per sample, g_i = f_i / ||f_i||, mu_c = mean of g over class c."""
    unit = F.normalize(embeddings.float(), dim=1)
    means = class_means(unit, labels, num_classes)
    return F.cosine_similarity(unit, means[labels], dim=1, eps=1e-12)


def pairwise_distance_means(embeddings: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 2048) -> tuple[float, float]:
    """(mean ||g_i - g_j|| over same-class pairs i != j, mean over different-class pairs), g normalised."""
    unit = F.normalize(embeddings.float(), dim=1)
    n = unit.shape[0]
    columns = torch.arange(n, device=unit.device)
    intra_sum = torch.zeros((), dtype=torch.float64, device=unit.device)
    inter_sum = torch.zeros((), dtype=torch.float64, device=unit.device)
    intra_pairs = torch.zeros((), dtype=torch.float64, device=unit.device)
    inter_pairs = torch.zeros((), dtype=torch.float64, device=unit.device)
    for start in range(0, n, chunk_rows):
        rows = unit[start:start + chunk_rows]
        distances = (2.0 - 2.0 * rows @ unit.T).clamp_min(0.0).sqrt()
        row_ids = columns[start:start + chunk_rows]
        same = labels[row_ids][:, None] == labels[None, :]
        not_self = row_ids[:, None] != columns[None, :]
        intra = same & not_self
        inter = ~same
        intra_sum += (distances * intra).double().sum()
        inter_sum += (distances * inter).double().sum()
        intra_pairs += intra.sum()
        inter_pairs += inter.sum()
    intra_mean = (intra_sum / intra_pairs).item() if intra_pairs > 0 else float("nan")
    inter_mean = (inter_sum / inter_pairs).item() if inter_pairs > 0 else float("nan")
    return intra_mean, inter_mean


def compactness(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int,
                max_pairwise: Optional[int] = 10_000, seed: int = 0) -> dict:
    """Mean cosine to the class mean (all samples) and the intra/inter distance ratio.

    The pairwise distances cost O(n^2): above `max_pairwise` samples they use a seeded random subset of that
    size (the test sets of CIFAR and Tiny ImageNet, 10,000 images, are used whole).
    """
    mean_cosine = cosine_to_class_mean(embeddings, labels, num_classes).mean().item()
    n = labels.numel()
    pair_embeddings, pair_labels = embeddings, labels
    if max_pairwise is not None and n > max_pairwise:
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(n, generator=generator)[:max_pairwise].to(labels.device)
        pair_embeddings, pair_labels = embeddings[chosen], labels[chosen]
    intra, inter = pairwise_distance_means(pair_embeddings, pair_labels)
    return {
        "mean_cosine_to_class_mean": mean_cosine,
        "mean_intra_class_distance": intra,
        "mean_inter_class_distance": inter,
        "intra_inter_distance_ratio": intra / inter if inter > 0 else float("nan"),
        "pairwise_samples": int(pair_labels.numel()),
    }
