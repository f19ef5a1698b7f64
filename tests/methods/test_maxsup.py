"""MaxSup against its formula (plain Python on hand-made numbers) and against a transcription of the authors'
loss (ZhouYuxuanYX/Maximum-Suppression-Regularization Conv/common_resnet/train.py L32-37, 5b7c0db)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ipasdctl.data.base import Batch
from ipasdctl.errors import UserError
from ipasdctl.methods import MethodContext, build_method
from ipasdctl.methods.maxsup import maxsup_lambda, maxsup_loss

LOGITS = [[2.0, 0.5, -1.0, 0.3], [0.1, 1.5, 0.3, -0.2], [-1.0, 0.0, 1.0, 2.5]]
LABELS = [0, 2, 3]  # row 1 is misclassified (its largest logit is class 1)


# ----------------------------------------------------------------------------------------------- the authors'


def reference_lambda(epoch, epochs):
    """common_resnet/train.py L33 (epochs == 1 divides by zero there)."""
    return 0.1 + 0.1 * epoch / (epochs - 1)


def reference_maxsup_loss(output, target, lam):
    """common_resnet/train.py L34-37."""
    loss_criterion = nn.CrossEntropyLoss(label_smoothing=0.0)
    z_top1 = output.topk(1, -1)[0]
    reg = z_top1 - output.mean(-1, keepdim=True)
    return loss_criterion(output, target) + lam * reg.mean()


# ----------------------------------------------------------------------------------------------- tests


def test_maxsup_loss_by_hand():
    lam = 0.15
    result = maxsup_loss(torch.tensor(LOGITS), torch.tensor(LABELS), lam)
    ce, penalty = 0.0, 0.0
    for row, y in zip(LOGITS, LABELS):
        top = max(row)
        ce -= (row[y] - top - math.log(sum(math.exp(v - top) for v in row))) / 3
        penalty += (top - sum(row) / 4) / 3
    assert result["loss_ce"].item() == pytest.approx(ce, rel=1e-6)
    assert result["loss_maxsup"].item() == pytest.approx(penalty, rel=1e-6)
    assert result["loss"].item() == pytest.approx(ce + lam * penalty, rel=1e-6)


@pytest.mark.parametrize("epoch,epochs", [(0, 10), (3, 10), (9, 10), (0, 200), (137, 200)])
def test_maxsup_matches_the_authors_loss_gradient_and_ramp(epoch, epochs):
    lam = maxsup_lambda(epoch, epochs, 0.1, 0.2)
    assert lam == pytest.approx(reference_lambda(epoch, epochs), abs=1e-12)
    generator = torch.Generator().manual_seed(epoch)
    logits = torch.randn(16, 10, generator=generator, requires_grad=True)
    labels = torch.randint(0, 10, (16,), generator=generator)
    ours, theirs = maxsup_loss(logits, labels, lam)["loss"], reference_maxsup_loss(logits, labels, lam)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    grad_ours, = torch.autograd.grad(ours, logits)
    grad_theirs, = torch.autograd.grad(theirs, logits)
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-5)
    # the penalty's gradient: lam / B (onehot(argmax) - 1/K), nothing detached
    grad_ce, = torch.autograd.grad(F.cross_entropy(logits, labels), logits)
    expected = lam / 16 * (F.one_hot(logits.detach().argmax(1), 10) - 1 / 10)
    assert torch.allclose(grad_ours - grad_ce, expected, atol=1e-6)


def test_maxsup_is_label_smoothing_on_correct_rows_only():
    logits = torch.tensor(LOGITS)
    lam = 0.2
    correct = [0, 2]
    ours = maxsup_loss(logits[correct], torch.tensor(LABELS)[correct], lam)["loss"]
    smoothed = F.cross_entropy(logits[correct], torch.tensor(LABELS)[correct], label_smoothing=lam)
    assert ours.item() == pytest.approx(smoothed.item(), rel=1e-6)
    wrong = maxsup_loss(logits[[1]], torch.tensor([2]), lam)["loss"]
    assert wrong.item() != pytest.approx(F.cross_entropy(logits[[1]], torch.tensor([2]), label_smoothing=lam).item(),
                                         rel=1e-3)


def make_ctx(epochs=5):
    return MethodContext(num_classes=4, num_train=3, train_labels=torch.tensor(LABELS), embed_dim=8,
                         stage_channels=[4, 8], epochs=epochs, batch_size=3, seed=0, device=torch.device("cpu"))


class FixedNet(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return {"logits": self.logits}


@pytest.mark.parametrize("epoch,expected_lam", [(0, 0.1), (2, 0.15), (4, 0.2)])
def test_maxsup_step_ramps_lambda_over_the_epochs(epoch, expected_lam):
    method = build_method({"name": "maxsup"}, make_ctx(epochs=5))
    batch = Batch(images=torch.zeros(3, 3, 4, 4), labels=torch.tensor(LABELS), indices=torch.arange(3), raw=None,
                  epoch=epoch, step=0)
    result = method.loss(FixedNet(torch.tensor(LOGITS, requires_grad=True)), batch)
    assert result.terms["lam"].item() == pytest.approx(expected_lam)
    expected = maxsup_loss(torch.tensor(LOGITS), torch.tensor(LABELS), expected_lam)["loss"].item()
    assert result.loss.item() == pytest.approx(expected, rel=1e-6)
    assert maxsup_lambda(0, 1, 0.1, 0.2) == 0.1  # one epoch: no division by zero


def test_maxsup_refuses_a_negative_weight():
    with pytest.raises(UserError, match="begin"):
        build_method({"name": "maxsup", "begin": -0.1}, make_ctx())
