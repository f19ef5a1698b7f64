"""`ipasdctl calibrate`: temperature scaling (Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural
Networks", ICML 2017) of a run's checkpoint, fitted on its validation split.

One scalar T > 0 divides the logits: p = softmax(z / T). T minimises the negative log-likelihood of the
validation split, -(1/n) sum_i log softmax(z_i / T)[y_i], found by L-BFGS (strong Wolfe line search) on
log T so that T stays positive. Dividing by T never changes the argmax: accuracy stays what it was, only
the confidences move (T > 1 softens an overconfident model, T < 1 sharpens an underconfident one, as IPASD's
soft targets leave it). The validation split (`data.val_split`) is training images the model never trained
on; fitting T on the test set would make the reported test calibration optimistic, so a run without one is
refused. The result goes into the run folder (runs/: temperature.json, per checkpoint, with the epoch it
belongs to), and `ipasdctl export` folds it into the exported graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..runs import RunFolder
from ..safe_io import check_checkpoint
from . import metrics
from .evaluation import collect_outputs, load_run_and_data


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 that minimises NLL(softmax(logits / T), labels), by L-BFGS on log T (float64)."""
    logits, labels = logits.detach().double(), labels.detach()
    log_t = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().exp())


def calibration_figures(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict:
    """NLL and ECE (15 bins) of the logits before and after dividing by `temperature`, and the top-1."""
    figures = {"top1": metrics.topk_accuracy(logits, labels, (1,))[1]}
    for when, scaled in (("before", logits), ("after", logits / temperature)):
        confidence, correct = metrics.confidence_and_correct(scaled, labels)
        figures[f"nll_{when}"] = metrics.negative_log_likelihood(scaled, labels)
        figures[f"ece_{when}"] = metrics.expected_calibration_error(confidence, correct)
        figures[f"mean_confidence_{when}"] = confidence.mean().item()
    return figures


def calibrate_run(run_dir: Path, checkpoint: str = "best", data_root: Optional[Path] = None, device: str = "auto",
                  batch_size: Optional[int] = None) -> dict:
    """Fit the temperature of a run's checkpoint on its validation split, record it in the run folder
    (temperature.json) and return it with NLL and ECE before and after, on the validation and the test set."""
    check_checkpoint(checkpoint)
    folder = RunFolder(run_dir).check()
    config = folder.read_config() or {}
    if not (config.get("data") or {}).get("val_split"):
        raise UserError(f"{folder.path} has no validation split to fit the temperature on (fitting it on the test "
                        "set would make its calibration figures optimistic); train with --set data.val_split=N")
    run_dir, torch_device, model, state, recipe, data = load_run_and_data(run_dir, checkpoint, data_root, device)
    size = batch_size or recipe.train.eval_batch_size
    val_logits, _, val_labels = collect_outputs(model, data, torch_device, size, split="val")
    test_logits, _, test_labels = collect_outputs(model, data, torch_device, size)
    temperature = fit_temperature(val_logits, val_labels)
    entry = {
        "temperature": temperature,
        "checkpoint": checkpoint,
        "epoch": int(state.get("epoch", 0)),
        "fitted_on": "val",
        "method": "temperature scaling: NLL on the validation split, L-BFGS on log T",
        "val_images": int(val_labels.numel()),
        "val": calibration_figures(val_logits, val_labels, temperature),
        "test_images": int(test_labels.numel()),
        "test": calibration_figures(test_logits, test_labels, temperature),
        "ece_bins": metrics.ECE_BINS,
    }
    folder.write_temperature(checkpoint, entry)
    return {"run_dir": str(run_dir), **entry}


def format_calibration(result: dict) -> str:
    test = result["test"]
    return (f"temperature {result['temperature']:.4f} (fitted on {result['val_images']} validation images, "
            f"{result['checkpoint']} checkpoint, epoch {result['epoch']})\n"
            f"test ({result['test_images']} images, top-1 {test['top1']:.2f}% unchanged): "
            f"NLL {test['nll_before']:.4f} -> {test['nll_after']:.4f}  "
            f"ECE {100 * test['ece_before']:.2f}% -> {100 * test['ece_after']:.2f}%  "
            f"mean confidence {100 * test['mean_confidence_before']:.1f}% -> {100 * test['mean_confidence_after']:.1f}%")
