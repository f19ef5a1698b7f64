"""`ipasdctl eval`: evaluate a run folder's checkpoint on the test set and write the results beside it.

A run folder gets eval.json (top-1/top-5 %, NLL, ECE over 15 bins with the reliability bins, feature
compactness: see metrics.py for the formulas), per_class.csv, reliability.png, embedding_tsne.csv (the 2-D
t-SNE coordinates, so reports can redraw them) and embedding_tsne.png. An exported .onnx model is evaluated
with onnxruntime through deploy.onnx_test_accuracy and gets <model>.eval.json beside it.
The forward passes run in fp32 on the chosen device; every metric is computed on whole tensors.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import runtime
from ..data import build_data
from ..deploy import onnx_test_accuracy
from ..errors import UserError
from ..files import atomic_write_json, atomic_write_text
from ..runs import RunFolder, load_model, read_json
from . import metrics, plots

EVAL_FILES = ("eval.json", "per_class.csv", "reliability.png", "embedding_tsne.png", "embedding_tsne.csv")
TSNE_POINTS = 2000
REQUIRED_EVAL_KEYS = {"checkpoint", "epoch", "top1", "top5", "nll", "ece", "reliability", "compactness"}


@torch.no_grad()
def collect_outputs(model, data, device: torch.device, batch_size: int,
                    split: str = "test") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits N x C, embeddings N x D, labels N) of the whole test (or validation) split, left on the device."""
    model.eval()
    logits, embeddings, labels = [], [], []
    for x, y in data.held_out_batches(split, batch_size, device):
        batch_logits, batch_embeddings, _stages = model(x, with_features=True)
        logits.append(batch_logits.float())
        embeddings.append(batch_embeddings.float())
        labels.append(y)
    if not labels:
        raise UserError(f"data set '{data.name}' has no {'validation' if split == 'val' else 'test'} images; check --data")
    return torch.cat(logits), torch.cat(embeddings), torch.cat(labels)


def compute_eval(logits: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 num_bins: int = metrics.ECE_BINS) -> tuple[dict, dict]:
    """(the scalar results and reliability bins, the per-class columns) of one set of test outputs."""
    top = metrics.topk_accuracy(logits, labels, (1, 5))
    confidence, correct = metrics.confidence_and_correct(logits, labels)
    predictions = logits.argmax(1)
    per_class = metrics.per_class_accuracy(predictions, labels, num_classes)
    cosine = metrics.cosine_to_class_mean(embeddings, labels, num_classes)
    count = per_class["count"].clamp_min(1).double()
    class_confidence = torch.zeros(num_classes, dtype=torch.float64, device=labels.device)
    class_confidence.index_add_(0, labels, confidence.double())
    class_cosine = torch.zeros(num_classes, dtype=torch.float64, device=labels.device)
    class_cosine.index_add_(0, labels, cosine.double())
    empty = per_class["count"] == 0
    nan = torch.full_like(class_confidence, float("nan"))
    result = {
        "top1": top[1],
        "top5": top[5],
        "nll": metrics.negative_log_likelihood(logits, labels),
        "ece": metrics.expected_calibration_error(confidence, correct, num_bins),
        "mean_confidence": confidence.mean().item(),
        "ece_bins": num_bins,
        "reliability": metrics.reliability_bins(confidence, correct, num_bins),
        "compactness": metrics.compactness(embeddings, labels, num_classes),
        "per_class_top1_min": float(np.nanmin(per_class["accuracy"].cpu().numpy())),
        "per_class_top1_max": float(np.nanmax(per_class["accuracy"].cpu().numpy())),
    }
    columns = {
        "count": per_class["count"].cpu(),
        "correct": per_class["correct"].cpu(),
        "top1": per_class["accuracy"].cpu(),
        "mean_confidence": torch.where(empty, nan, class_confidence / count).cpu(),
        "mean_cosine_to_class_mean": torch.where(empty, nan, class_cosine / count).cpu(),
    }
    return result, columns


def tsne_coordinates(embeddings: torch.Tensor, labels: torch.Tensor, max_points: int = TSNE_POINTS,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE of at most `max_points` embeddings (a seeded random subset), PCA to 50 dimensions first."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = labels.numel()
    chosen = torch.arange(n)
    if n > max_points:
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_points].sort().values
    points = embeddings.detach().float().cpu()[chosen].numpy().astype(np.float32)
    chosen_labels = labels.detach().cpu()[chosen].numpy()
    if points.shape[0] < 3:
        return np.zeros((points.shape[0], 2), dtype=np.float32), chosen_labels
    if points.shape[1] > 50 and points.shape[0] > 50:
        points = PCA(n_components=50, random_state=seed).fit_transform(points)
    perplexity = float(min(30.0, max(2.0, (points.shape[0] - 1) / 3.0)))
    # Half the cores: sklearn's OpenMP gradient spins when cores are oversubscribed and then runs 10-50x
    # slower (measured on a shared 2-core machine: 60 points 16 s with 2 threads, 0.2 s with 1).
    with threadpool_limits(limits=max(1, available_cpus() // 2)):
        coords = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                      random_state=seed).fit_transform(points)
    return coords.astype(np.float32), chosen_labels


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def per_class_csv(class_names: list[str], columns: dict) -> str:
    import pandas as pd

    frame = pd.DataFrame({"class_index": range(len(class_names)), "class_name": class_names,
                          **{k: v.numpy() for k, v in columns.items()}})
    return frame.to_csv(index=False, float_format="%.6g")


def tsne_csv(coords: np.ndarray, labels: np.ndarray) -> str:
    import pandas as pd

    frame = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "label": labels})
    return frame.to_csv(index=False, float_format="%.5g")


def read_tsne_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    frame = pd.read_csv(path)
    return frame[["x", "y"]].to_numpy(np.float32), frame["label"].to_numpy(np.int64)


def load_run_and_data(run_dir: Path, checkpoint: str, data_root: Optional[Path], device: str):
    """(run folder path, device, model in eval mode, checkpoint state, recipe, data set as the run derived it)."""
    run_dir = RunFolder(run_dir).check().path
    torch_device = runtime.resolve_device(device)
    model, state, recipe = load_model(run_dir, checkpoint, str(torch_device))
    if data_root is not None:
        recipe.data.root = str(data_root)
    data = build_data(recipe.data)
    num_classes = int(state["num_classes"])
    if data.num_classes != num_classes:
        raise UserError(f"{run_dir} was trained on {num_classes} classes but the data set at "
                        f"{recipe.data.root or 'its default place'} has {data.num_classes}; pass the run's data with --data")
    return run_dir, torch_device, model, state, recipe, data


def eval_run(run_dir: Path, checkpoint: str = "best", data_root: Optional[Path] = None, device: str = "auto",
             batch_size: Optional[int] = None, tsne_points: int = TSNE_POINTS) -> dict:
    """Evaluate a run folder's checkpoint on its test set; writes EVAL_FILES into the folder, returns eval.json."""
    started = time.perf_counter()
    run_dir, torch_device, model, state, recipe, data = load_run_and_data(run_dir, checkpoint, data_root, device)
    num_classes = int(state["num_classes"])
    class_names = list(state.get("class_names") or data.class_names)
    logits, embeddings, labels = collect_outputs(model, data, torch_device, batch_size or recipe.train.eval_batch_size)
    result, columns = compute_eval(logits, embeddings, labels, num_classes)
    coords, tsne_labels = tsne_coordinates(embeddings, labels, tsne_points, seed=recipe.train.seed)

    method = recipe.method.get("name", "?")
    summary = {
        "run_dir": str(run_dir),
        "checkpoint": checkpoint,
        "epoch": int(state.get("epoch", 0)),
        "dataset": recipe.data.name,
        "arch": recipe.model.arch,
        "method": method,
        "seed": recipe.train.seed,
        "num_test": int(labels.numel()),
        "num_classes": num_classes,
        **result,
        "tsne_points": int(tsne_labels.size),
        "units": {"top1": "%", "top5": "%", "nll": "nats per image", "ece": "fraction (0-1)",
                  "mean_confidence": "fraction (0-1)",
                  "compactness": "on L2-normalised embeddings; distances Euclidean"},
        "device": runtime.device_description(torch_device),
        "seconds": 0.0,
    }
    title = f"{recipe.data.name}, {recipe.model.arch}, {method} (seed {recipe.train.seed}, {checkpoint} checkpoint)"
    atomic_write_text(run_dir / "per_class.csv", per_class_csv(class_names, columns))
    atomic_write_text(run_dir / "embedding_tsne.csv", tsne_csv(coords, tsne_labels))
    plots.plot_reliability(result["reliability"], result["ece"], run_dir / "reliability.png", title)
    plots.plot_tsne(coords, tsne_labels, class_names, run_dir / "embedding_tsne.png", title)
    summary["seconds"] = time.perf_counter() - started
    atomic_write_json(run_dir / "eval.json", summary)
    return summary


def eval_onnx_model(model_path: Path, data_root: Optional[Path] = None, batch_size: int = 256) -> dict:
    """Top-1/top-5 of an exported model through onnxruntime; writes <model>.eval.json beside it."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise UserError(f"{model_path} does not exist; export a run first (ipasdctl export RUN_FOLDER --onnx)")
    result = onnx_test_accuracy(model_path, data_root, batch_size)
    result = {"model": str(model_path), **dict(result)}
    atomic_write_json(model_path.with_suffix(".eval.json"), result)
    return result


def format_summary(result: dict) -> str:
    c = result["compactness"]
    return (f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  NLL {result['nll']:.4f}  "
            f"ECE {100 * result['ece']:.2f}%  cos-to-class-mean {c['mean_cosine_to_class_mean']:.4f}  "
            f"intra/inter distance {c['intra_inter_distance_ratio']:.4f}  ({result['num_test']} test images)")


def load_eval(run_dir: Path) -> Optional[dict]:
    result = read_json(Path(run_dir) / "eval.json")
    if result is None or not REQUIRED_EVAL_KEYS <= set(result):
        return None  # not written by this version: evaluate again
    return result
