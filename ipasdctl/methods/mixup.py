"""mixup: training on convex combinations of pairs of images and of their labels.

Zhang, Cisse, Dauphin, Lopez-Paz, "mixup: Beyond Empirical Risk Minimization", ICLR 2018 (release:
facebookresearch/mixup-cifar10, train.py mixup_data / mixup_criterion; also winycg/Self-KD-Lib methods/mixup.py).
Per batch, one lam ~ Beta(alpha, alpha) and one random permutation pi of the batch:
    x~ = lam x + (1 - lam) x[pi],    loss = lam CE(z(x~), y) + (1 - lam) CE(z(x~), y[pi])
Only x~ is forwarded (BatchNorm sees mixed images only); the network is tested on clean images as it is.
Not a self-distillation method: it is here because MixSKD trains on mixed images, and mixup alone is a strong
regulariser, so a comparison needs it to show what MixSKD adds beyond the mixing. Default alpha 1 (the
authors'); Self-KD-Lib hard-codes 0.4 (`--set method.alpha=0.4`). Readings chosen:
- alpha = 0 means no mixing (lam = 1, plain cross-entropy), the authors' reading (Self-KD-Lib takes 0.5).
- lam and pi are drawn on the host from the step's seed (the authors' NumPy is never seeded), so a run is
  reproducible and resumes mid-epoch with the same pairs; under several processes each rank mixes its own
  sub-batch.
- The training accuracy is counted against the dominant label (y where lam >= 0.5, else y[pi]); the authors'
  is lam-weighted.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..params import param
from .base import METHODS, Method, StepResult
from .losses import mixed_cross_entropy, mixup_draw


@dataclass
class MixupParams:
    alpha: float = param(1.0, ge=0)  # Beta(alpha, alpha); 0: no mixing


def mixup_loss(logits, labels, lam: float, index) -> dict:
    """logits: z(x~) of the mixed batch; index: the permutation the batch was mixed with."""
    loss = mixed_cross_entropy(logits, labels, lam, index)
    return {"loss": loss, "loss_mixup": loss, "lam": loss.new_full((), lam)}


@METHODS.register
class Mixup(Method):
    name = "mixup"
    summary = "mixup: trains on convex mixes of image pairs and of their labels (Zhang et al. 2018)"
    Params = MixupParams
    changes_images = True

    def loss(self, net, batch) -> StepResult:
        images, labels = batch.images, batch.labels
        lam, index = mixup_draw(self.ctx.seed, batch.epoch, batch.step, self.ctx.collectives.rank, labels.shape[0],
                                self.params.alpha, images.device)
        logits = net(lam * images + (1 - lam) * images[index])["logits"]
        result = mixup_loss(logits, labels, lam, index)
        return StepResult.of(result, logits, labels if lam >= 0.5 else labels[index])
