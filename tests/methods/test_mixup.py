"""mixup against its formula (plain Python on hand-made numbers) and against a transcription of the authors'
loss (facebookresearch/mixup-cifar10 train.py mixup_data / mixup_criterion, eaff31a), plus its draws and step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ipasdctl.data.base import Batch
from ipasdctl.errors import UserError
from ipasdctl.methods import MethodContext, build_method, method_class
from ipasdctl.methods.losses import mixup_draw
from ipasdctl.methods.mixup import mixup_loss

LOGITS = [[2.0, 0.5, -1.0, 0.3], [0.1, 1.5, 0.3, -0.2], [-1.0, 0.0, 1.0, 2.5]]
LABELS = [0, 2, 3]
INDEX = [2, 0, 1]


def log_softmax(row):
    top = max(row)
    total = sum(math.exp(v - top) for v in row)
    return [v - top - math.log(total) for v in row]


# ----------------------------------------------------------------------------------------------- the authors'
# facebookresearch/mixup-cifar10 train.py L132-138, L152-157: outputs = net(mixed_x) only.


def reference_mixup_criterion(criterion, pred, y_a, y_b, lam):
    return lam * criterion(pred, y_a) + (1 - lam) * criterion(pred, y_b)


def reference_mixup_loss(outputs, targets, lam, index):
    criterion = nn.CrossEntropyLoss()
    y_a, y_b = targets, targets[index]
    return reference_mixup_criterion(criterion, outputs, y_a, y_b, lam)


# ----------------------------------------------------------------------------------------------- tests


def test_mixup_loss_by_hand():
    lam = 0.3
    logits = torch.tensor(LOGITS, requires_grad=True)
    result = mixup_loss(logits, torch.tensor(LABELS), lam, torch.tensor(INDEX))
    expected = 0.0
    for i, row in enumerate(LOGITS):
        lp = log_softmax(row)
        expected -= (lam * lp[LABELS[i]] + (1 - lam) * lp[LABELS[INDEX[i]]]) / len(LABELS)
    assert result["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert result["lam"].item() == pytest.approx(lam)
    # the same as cross-entropy against the mixed one-hot targets
    target = lam * F.one_hot(torch.tensor(LABELS), 4) + (1 - lam) * F.one_hot(torch.tensor(LABELS)[INDEX], 4)
    assert result["loss"].item() == pytest.approx(F.cross_entropy(logits, target.float()).item(), rel=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.37, 1.0])
def test_mixup_loss_matches_the_authors_loss_and_gradient(lam):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=generator, requires_grad=True)
    labels = torch.randint(0, 5, (8,), generator=generator)
    index = torch.randperm(8, generator=generator)
    ours = mixup_loss(logits, labels, lam, index)["loss"]
    theirs = reference_mixup_loss(logits, labels, lam, index)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    grad_ours, = torch.autograd.grad(ours, logits)
    grad_theirs, = torch.autograd.grad(theirs, logits)
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-5)


def test_mixup_draw_is_one_seeded_lam_and_permutation_per_step():
    cpu = torch.device("cpu")
    lam, index = mixup_draw(0, 1, 2, 0, 16, 1.0, cpu)
    assert 0.0 <= lam <= 1.0 and sorted(index.tolist()) == list(range(16))
    again = mixup_draw(0, 1, 2, 0, 16, 1.0, cpu)
    assert again[0] == lam and torch.equal(again[1], index)  # a resumed step mixes the same pairs
    others = [mixup_draw(0, 1, 3, 0, 16, 1.0, cpu), mixup_draw(1, 1, 2, 0, 16, 1.0, cpu),
              mixup_draw(0, 1, 2, 1, 16, 1.0, cpu)]  # next step, other seed, other rank
    assert all(lam_other != lam and not torch.equal(index_other, index) for lam_other, index_other in others)
    lams = [mixup_draw(0, 0, step, 0, 4, 0.4, cpu)[0] for step in range(400)]
    # Beta(0.4, 0.4): mean 1/2, variance 1/(4 (2a + 1)) = 0.139
    assert sum(lams) / len(lams) == pytest.approx(0.5, abs=0.06)
    assert sum((v - 0.5) ** 2 for v in lams) / len(lams) == pytest.approx(0.25 / 1.8, abs=0.03)
    assert mixup_draw(0, 0, 0, 0, 4, 0.0, cpu)[0] == 1.0  # alpha 0: no mixing, the authors' reading


class RecordingNet(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits, self.seen = logits, []

    def forward(self, x):
        self.seen.append(x)
        return {"logits": self.logits}


def make_ctx(seed=0):
    return MethodContext(num_classes=4, num_train=3, train_labels=torch.tensor(LABELS), embed_dim=8,
                         stage_channels=[4, 8], epochs=2, batch_size=3, seed=seed, device=torch.device("cpu"))


def test_mixup_step_forwards_only_the_mixed_images_and_counts_the_dominant_label():
    method = build_method({"name": "mixup"}, make_ctx())
    images = torch.randn(3, 3, 4, 4)
    batch = Batch(images=images, labels=torch.tensor(LABELS), indices=torch.arange(3), raw=None, epoch=1, step=5)
    net = RecordingNet(torch.tensor(LOGITS, requires_grad=True))
    result = method.loss(net, batch)
    lam, index = mixup_draw(0, 1, 5, 0, 3, 1.0, torch.device("cpu"))
    assert len(net.seen) == 1 and torch.allclose(net.seen[0], lam * images + (1 - lam) * images[index])
    assert result.loss.item() == pytest.approx(mixup_loss(net.logits, batch.labels, lam, index)["loss"].item())
    dominant = batch.labels if lam >= 0.5 else batch.labels[index]
    assert torch.equal(result.labels, dominant)
    assert method_class("mixup").changes_images and method.params.alpha == 1.0


def test_mixup_refuses_a_negative_alpha():
    with pytest.raises(UserError, match="alpha"):
        build_method({"name": "mixup", "alpha": -0.1}, make_ctx())
