"""ipasdctl.analysis.metrics against hand-computed values and plain-Python loop references."""

from __future__ import annotations

import math

import pytest
import torch

from ipasdctl.analysis import metrics


def logits_with_confidences(confidences, correct, num_classes=10):
    """Logits whose softmax has max probability `confidences[i]` at class i % C, labelled right or wrong."""
    rows, labels = [], []
    for i, (confidence, right) in enumerate(zip(confidences, correct)):
        predicted = i % num_classes
        row = [(1.0 - confidence) / (num_classes - 1)] * num_classes
        row[predicted] = confidence
        rows.append(row)
        labels.append(predicted if right else (predicted + 1) % num_classes)
    return torch.tensor(rows, dtype=torch.float64).log().float(), torch.tensor(labels)


# ----------------------------------------------------------------------------------------------- calibration


# Six predictions; bins of width 1/15 = 0.0667:
#   0.95 -> (0.9333, 1]        correct        |1 - 0.95|            = 0.05
#   0.90 -> (0.8667, 0.9333]   wrong          |0 - 0.90|            = 0.90
#   0.70, 0.72 -> (0.6667, 0.7333]  right, wrong: acc 0.5, conf 0.71 -> 2 * |0.5 - 0.71| = 0.42
#   0.45 -> (0.4, 0.4667]      correct        |1 - 0.45|            = 0.55
#   0.25 -> (0.2, 0.2667]      wrong          |0 - 0.25|            = 0.25
#   ECE = (0.05 + 0.90 + 0.42 + 0.55 + 0.25) / 6 = 2.17 / 6 = 0.361667
CONFIDENCES = [0.95, 0.90, 0.70, 0.72, 0.45, 0.25]
CORRECT = [True, False, True, False, True, False]
HAND_ECE = 2.17 / 6


def test_ece_of_hand_made_predictions_equals_hand_value():
    logits, labels = logits_with_confidences(CONFIDENCES, CORRECT)
    confidence, correct = metrics.confidence_and_correct(logits, labels)
    assert confidence.tolist() == pytest.approx(CONFIDENCES, abs=1e-6)
    assert correct.tolist() == CORRECT
    assert metrics.expected_calibration_error(confidence, correct) == pytest.approx(HAND_ECE, abs=1e-6)
    # the bin count matters: with 5 bins 0.95 and 0.90 share (0.8, 1] (acc 0.5, conf 0.925: 2 * 0.425 = 0.85)
    # and the sum becomes 0.85 + 0.42 + 0.55 + 0.25 = 2.07
    assert metrics.expected_calibration_error(confidence, correct, 5) == pytest.approx(2.07 / 6, abs=1e-6)


def test_reliability_bins_of_hand_made_predictions():
    logits, labels = logits_with_confidences(CONFIDENCES, CORRECT)
    bins = metrics.reliability_bins(*metrics.confidence_and_correct(logits, labels))
    assert len(bins["count"]) == 15
    assert bins["lower"][10] == pytest.approx(10 / 15) and bins["upper"][10] == pytest.approx(11 / 15)
    expected_counts = [0] * 15
    for m in (14, 13, 10, 10, 6, 3):
        expected_counts[m] += 1
    assert bins["count"] == expected_counts
    assert bins["accuracy"][10] == pytest.approx(0.5) and bins["confidence"][10] == pytest.approx(0.71, abs=1e-6)
    assert bins["accuracy"][13] == 0.0 and bins["accuracy"][14] == 1.0 and bins["accuracy"][6] == 1.0
    assert bins["accuracy"][0] is None and bins["confidence"][0] is None
    assert metrics.ece_from_bins(bins) == pytest.approx(HAND_ECE, abs=1e-6)


def test_calibrated_predictions_have_zero_ece_and_overconfident_ones_the_gap():
    # four predictions at 0.75, three right: accuracy 0.75 in the one bin -> ECE 0
    confidence = torch.tensor([0.75, 0.75, 0.75, 0.75])
    assert metrics.expected_calibration_error(confidence, torch.tensor([True, True, True, False])) == pytest.approx(0.0)
    # all wrong at 0.75: ECE = 0.75
    assert metrics.expected_calibration_error(confidence, torch.zeros(4, dtype=torch.bool)) == pytest.approx(0.75)


def test_pooled_bins_equal_the_bins_of_all_predictions():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=generator) * 3
    labels = torch.randint(0, 7, (200,), generator=generator)
    confidence, correct = metrics.confidence_and_correct(logits, labels)
    whole = metrics.reliability_bins(confidence, correct)
    pooled = metrics.pool_reliability_bins([metrics.reliability_bins(confidence[:70], correct[:70]),
                                            metrics.reliability_bins(confidence[70:], correct[70:])])
    assert pooled["count"] == whole["count"]
    for a, b in zip(pooled["accuracy"] + pooled["confidence"], whole["accuracy"] + whole["confidence"]):
        assert (a is None and b is None) or a == pytest.approx(b)
    assert metrics.ece_from_bins(pooled) == pytest.approx(metrics.expected_calibration_error(confidence, correct))


# ----------------------------------------------------------------------------------------------- accuracy


def test_topk_nll_and_per_class_accuracy_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [0.5, 0.2, 0.1]])
    labels = torch.tensor([0, 2, 1, 1])
    # argmax: 0, 1, 2, 0 -> one right of four; top-2: {0,1}, {1,2}, {2,0}, {0,1} -> samples 0, 1, 3 right
    top = metrics.topk_accuracy(logits, labels, (1, 2, 5))
    assert top[1] == pytest.approx(25.0)
    assert top[2] == pytest.approx(75.0)
    assert top[5] == pytest.approx(100.0)  # k above the number of classes: every label is in the top-k
    expected_nll = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        expected_nll -= row[y] - math.log(sum(math.exp(v) for v in row))
    assert metrics.negative_log_likelihood(logits, labels) == pytest.approx(expected_nll / 4, rel=1e-6)
    per_class = metrics.per_class_accuracy(logits.argmax(1), labels, 4)
    assert per_class["count"].tolist() == [1, 2, 1, 0]
    assert per_class["correct"].tolist() == [1, 0, 0, 0]
    assert per_class["accuracy"][:3].tolist() == [100.0, 0.0, 0.0]
    assert math.isnan(per_class["accuracy"][3].item())


# ----------------------------------------------------------------------------------------------- compactness


def test_compactness_of_hand_made_embeddings_equals_hand_values():
    # class 0: directions (1,0) and (0,1); class 1: (-1,0) and (0,-1); lengths vary (only directions count)
    embeddings = torch.tensor([[3.0, 0.0], [0.0, 0.5], [-2.0, 0.0], [0.0, -7.0]])
    labels = torch.tensor([0, 0, 1, 1])
    result = metrics.compactness(embeddings, labels, 2)
    # class means of the unit vectors: (0.5, 0.5) and (-0.5, -0.5); cos((1,0), (0.5,0.5)) = 0.5 / 0.7071
    assert result["mean_cosine_to_class_mean"] == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    # same-class pairs: |(1,0)-(0,1)| = sqrt 2 (both classes); different-class pairs: 2, sqrt 2, sqrt 2, 2
    assert result["mean_intra_class_distance"] == pytest.approx(math.sqrt(2), abs=1e-5)
    assert result["mean_inter_class_distance"] == pytest.approx((4 + 2 * math.sqrt(2)) / 4, abs=1e-5)
    assert result["intra_inter_distance_ratio"] == pytest.approx(math.sqrt(2) / (1 + math.sqrt(2) / 2), abs=1e-5)
    assert result["pairwise_samples"] == 4


def clusters(spread: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(8)[:2] * 4.0
    labels = torch.arange(40) % 2
    return centres[labels] + spread * torch.randn(40, 8, generator=generator), labels


def test_tight_clusters_are_more_compact_than_loose_ones():
    tight = metrics.compactness(*clusters(0.2), 2)
    loose = metrics.compactness(*clusters(3.0), 2)
    assert tight["mean_cosine_to_class_mean"] > 0.98 > loose["mean_cosine_to_class_mean"]
    assert tight["intra_inter_distance_ratio"] < 0.3 < loose["intra_inter_distance_ratio"] < 1.0


def test_compactness_matches_a_loop_reference_with_unequal_classes_and_chunks():
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.randn(23, 5, generator=generator, dtype=torch.float64).float()
    labels = torch.tensor([0] * 11 + [1] * 3 + [2] * 9)
    units = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in embeddings.tolist()]
    ys = labels.tolist()
    means = {}
    for c in set(ys):
        members = [u for u, y in zip(units, ys) if y == c]
        means[c] = [sum(col) / len(members) for col in zip(*members)]
    cosines = []
    for u, y in zip(units, ys):
        m = means[y]
        cosines.append(sum(a * b for a, b in zip(u, m)) / math.sqrt(sum(b * b for b in m)))
    intra, inter = [], []
    for i in range(len(units)):
        for j in range(len(units)):
            if i == j:
                continue
            d = math.sqrt(sum((a - b) ** 2 for a, b in zip(units[i], units[j])))
            (intra if ys[i] == ys[j] else inter).append(d)
    result = metrics.compactness(embeddings, labels, 3)
    assert result["mean_cosine_to_class_mean"] == pytest.approx(sum(cosines) / len(cosines), abs=1e-5)
    assert result["mean_intra_class_distance"] == pytest.approx(sum(intra) / len(intra), abs=1e-5)
    assert result["intra_inter_distance_ratio"] == pytest.approx((sum(intra) / len(intra)) / (sum(inter) / len(inter)), abs=1e-5)
    chunked = metrics.pairwise_distance_means(embeddings, labels, chunk_rows=4)
    assert chunked == pytest.approx((sum(intra) / len(intra), sum(inter) / len(inter)), abs=1e-5)
    per_sample = metrics.cosine_to_class_mean(embeddings, labels, 3)
    assert per_sample.tolist() == pytest.approx(cosines, abs=1e-5)


def test_pairwise_distances_use_a_seeded_subset_above_the_cap():
    embeddings, labels = clusters(0.5)
    capped = metrics.compactness(embeddings, labels, 2, max_pairwise=30)
    assert capped["pairwise_samples"] == 30
    assert capped == metrics.compactness(embeddings, labels, 2, max_pairwise=30)  # seeded: the same subset
    whole = metrics.compactness(embeddings, labels, 2)
    assert capped["mean_cosine_to_class_mean"] == whole["mean_cosine_to_class_mean"]  # uses every sample
