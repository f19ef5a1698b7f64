"""`ipasdctl eval`: evaluate a run folder's checkpoint on the test set and write the results beside it.

A run folder gets eval.json (top-1/top-5 %, NLL, ECE over 15 bins with the reliability bins, feature
compactness: see metrics.py for the formulas), per_class.csv, reliability.png, embedding_tsne.csv (the 2-D
t-SNE coordinates, so reports can redraw them) and embedding_tsne.png. An exported .onnx model is evaluated
with onnxruntime (deploy.session_batches, CPU) and gets the same files beside it, named after it
(<model>.eval.json, <model>.per_class.csv, <model>.reliability.png) with the same keys, less what needs the
embeddings an exported model does not expose (compactness, t-SNE).
The forward passes run in fp32 on the chosen device; every metric is computed on whole tensors.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import runtime
from ..data import build_data
from ..deploy import model_session, onnx_test_data, session_batches
from ..errors import UserError
from ..runs import RunFolder, load_model, read_json
from ..safe_io import atomic_write_json, atomic_write_text, csv_text
from . import metrics, plots

EVAL_FILES = ("eval.json", "per_class.csv", "reliability.png", "embedding_tsne.png", "embedding_tsne.csv")
TSNE_POINTS = 2000
ONNX_EVAL_FILES = ("eval.json", "per_class.csv", "reliability.png")  # <model>.<name> beside a .onnx model
REQUIRED_EVAL_KEYS = {"checkpoint", "epoch", "top1", "top5", "nll", "ece", "reliability", "compactness"}
UNITS = {"top1": "%", "top5": "%", "nll": "nats per image", "ece": "fraction (0-1)", "mean_confidence": "fraction (0-1)",
         "compactness": "on L2-normalised embeddings; distances Euclidean"}


def counted(batches, total: int, enabled: bool):
    """`batches`, counted on a bar on stderr when `enabled` and stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(batches, total=total, desc="test", file=sys.stderr, leave=False, dynamic_ncols=True,
                mininterval=0.5, disable=None if enabled else True)  # None: off when not a terminal


@torch.no_grad()
def collect_outputs(model, data, device: torch.device, batch_size: int,
                    progress: bool = False, split: str = "test") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits N x C, embeddings N x D, labels N) of the whole test (or validation) split, left on the device.
    `progress`: a bar over the batches on a terminal."""
    model.eval()
    logits, embeddings, labels = [], [], []
    total = math.ceil(data.held_out_size(split) / batch_size)
    for x, y in counted(data.held_out_batches(split, batch_size, device), total, progress):
        batch_logits, batch_embeddings, _stages = model(x, with_features=True)
        logits.append(batch_logits.float())
        embeddings.append(batch_embeddings.float())
        labels.append(y)
    if not labels:
        raise UserError(f"data set '{data.name}' has no {'validation' if split == 'val' else 'test'} images; check --data")
    return torch.cat(logits), torch.cat(embeddings), torch.cat(labels)


def compute_eval(logits: torch.Tensor, embeddings: Optional[torch.Tensor], labels: torch.Tensor, num_classes: int,
                 num_bins: int = metrics.ECE_BINS) -> tuple[dict, dict]:
    """(the scalar results and reliability bins, the per-class columns) of one set of test outputs. Without
    `embeddings` (an exported model gives logits only) the compactness figures are left out."""
    top = metrics.topk_accuracy(logits, labels, (1, 5))
    confidence, correct = metrics.confidence_and_correct(logits, labels)
    predictions = logits.argmax(1)
    per_class = metrics.per_class_accuracy(predictions, labels, num_classes)
    count = per_class["count"].clamp_min(1).double()
    empty = per_class["count"] == 0

    def class_mean(values: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros(num_classes, dtype=torch.float64, device=labels.device)
        sums.index_add_(0, labels, values.double())
        return torch.where(empty, torch.full_like(sums, float("nan")), sums / count).cpu()

    result = {
        "top1": top[1],
        "top5": top[5],
        "nll": metrics.negative_log_likelihood(logits, labels),
        "ece": metrics.expected_calibration_error(confidence, correct, num_bins),
        "mean_confidence": confidence.mean().item(),
        "ece_bins": num_bins,
        "reliability": metrics.reliability_bins(confidence, correct, num_bins),
        "per_class_top1_min": float(np.nanmin(per_class["accuracy"].cpu().numpy())),
        "per_class_top1_max": float(np.nanmax(per_class["accuracy"].cpu().numpy())),
    }
    columns = {
        "count": per_class["count"].cpu(),
        "correct": per_class["correct"].cpu(),
        "top1": per_class["accuracy"].cpu(),
        "mean_confidence": class_mean(confidence),
    }
    if embeddings is not None:
        result["compactness"] = metrics.compactness(embeddings, labels, num_classes)
        columns["mean_cosine_to_class_mean"] = class_mean(metrics.cosine_to_class_mean(embeddings, labels, num_classes))
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
    with threadpool_limits(limits=max(1, runtime.available_cpus() // 2)):
        coords = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                      random_state=seed).fit_transform(points)
    return coords.astype(np.float32), chosen_labels


def per_class_csv(class_names: list[str], columns: dict) -> str:
    import pandas as pd

    frame = pd.DataFrame({"class_index": range(len(class_names)), "class_name": class_names,
                          **{k: v.numpy() for k, v in columns.items()}})
    return csv_text(frame)


def tsne_csv(coords: np.ndarray, labels: np.ndarray) -> str:
    import pandas as pd

    frame = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "label": labels})
    return csv_text(frame, "%.5g")


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
             batch_size: Optional[int] = None, tsne_points: int = TSNE_POINTS, progress: bool = False) -> dict:
    """Evaluate a run folder's checkpoint on its test set; writes EVAL_FILES into the folder, returns eval.json.
    `tsne_points` 0: no t-SNE (`report --no-tsne`; an older checkpoint's t-SNE files are removed).
    `progress`: a bar over the test batches on a terminal."""
    folder = RunFolder(run_dir).check().path
    if not os.access(folder, os.W_OK | os.X_OK):  # fail before the evaluation, not at its first file
        raise UserError(f"{folder} is not writable, and eval writes its results into the run folder; make it "
                        "writable, or evaluate a copy of the folder")
    started = time.perf_counter()
    run_dir, torch_device, model, state, recipe, data = load_run_and_data(run_dir, checkpoint, data_root, device)
    num_classes = int(state["num_classes"])
    class_names = list(state.get("class_names") or data.class_names)
    logits, embeddings, labels = collect_outputs(model, data, torch_device, batch_size or recipe.train.eval_batch_size,
                                                 progress)
    result, columns = compute_eval(logits, embeddings, labels, num_classes)
    coords, tsne_labels = (tsne_coordinates(embeddings, labels, tsne_points, seed=recipe.train.seed) if tsne_points
                           else (None, np.zeros(0)))

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
        "units": UNITS,
        "device": runtime.device_description(torch_device),
    }
    title = f"{recipe.data.name}, {recipe.model.arch}, {method} (seed {recipe.train.seed}, {checkpoint} checkpoint)"
    if coords is not None:
        atomic_write_text(run_dir / "embedding_tsne.csv", tsne_csv(coords, tsne_labels))
        plots.plot_tsne(coords, tsne_labels, class_names, run_dir / "embedding_tsne.png", title)
    else:
        for stale in ("embedding_tsne.csv", "embedding_tsne.png"):
            (run_dir / stale).unlink(missing_ok=True)
    return write_eval({name: run_dir / name for name in EVAL_FILES}, summary, columns, class_names, title, started)


def onnx_eval_paths(model_path: Path) -> dict[str, Path]:
    """Where `eval MODEL.onnx` writes: ONNX_EVAL_FILES named after the model, beside it."""
    return {name: Path(model_path).with_suffix("." + name) for name in ONNX_EVAL_FILES}


def eval_onnx_model(model_path: Path, data_root: Optional[Path] = None, batch_size: int = 256,
                    progress: bool = False) -> dict:
    """Evaluate an exported model with onnxruntime (CPU) on the test set named in its metadata: the keys of a
    run's eval.json but those that need embeddings; writes ONNX_EVAL_FILES beside it (onnx_eval_paths)."""
    model_path = Path(model_path)
    if model_path.is_dir():
        raise UserError(f"{model_path} is a folder, not a file; give an exported .onnx model, or a run folder "
                        "without the .onnx in its name")
    if not model_path.is_file():
        raise UserError(f"{model_path} does not exist; export a run first (ipasdctl export RUN_FOLDER --onnx)")
    started = time.perf_counter()
    data, meta = onnx_test_data(model_path, data_root)
    session = model_session(model_path)  # its format's session (onnxruntime's CPU provider)
    logits, labels = [], []
    for batch_logits, y in counted(session_batches(session, data, batch_size), math.ceil(data.num_test / batch_size),
                                   progress):
        logits.append(batch_logits.float())
        labels.append(y)
    if not labels:
        raise UserError(f"data set '{data.name}' has no test images; check --data")
    labels_all = torch.cat(labels)
    num_classes = int(meta.get("num_classes") or logits[0].shape[1])
    result, columns = compute_eval(torch.cat(logits), None, labels_all, num_classes)
    class_names = [str(c) for c in (meta.get("class_names") or data.class_names)]
    precision = meta.get("precision", "fp32")
    summary = {
        "model": str(model_path),
        "checkpoint": meta.get("checkpoint"),
        "epoch": meta.get("epoch"),
        "dataset": meta.get("dataset"),
        "arch": meta.get("arch"),
        "method": meta.get("method"),
        "source_run": meta.get("source_run"),
        "precision": precision,
        "num_test": int(labels_all.numel()),
        "num_classes": num_classes,
        **result,
        "units": {k: v for k, v in UNITS.items() if k != "compactness"},
        "device": "onnxruntime CPUExecutionProvider",
    }
    title = (f"{meta.get('dataset')}, {meta.get('arch')}, {meta.get('method')} ({precision} ONNX, "
             f"{meta.get('checkpoint')} checkpoint)")
    return write_eval(onnx_eval_paths(model_path), summary, columns, class_names, title, started)


def write_eval(paths: dict[str, Path], summary: dict, columns: dict, class_names: list[str], title: str,
               started: float) -> dict:
    """per_class.csv, reliability.png, then eval.json (last: its presence means a whole evaluation)."""
    atomic_write_text(paths["per_class.csv"], per_class_csv(class_names, columns))
    plots.plot_reliability(summary["reliability"], summary["ece"], paths["reliability.png"], title)
    summary["seconds"] = time.perf_counter() - started
    atomic_write_json(paths["eval.json"], summary)
    return summary


def format_summary(result: dict) -> str:
    c = result.get("compactness")
    compact = (f"cos-to-class-mean {c['mean_cosine_to_class_mean']:.4f}  intra/inter distance "
               f"{c['intra_inter_distance_ratio']:.4f}  " if c else "")
    return (f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  NLL {result['nll']:.4f}  "
            f"ECE {100 * result['ece']:.2f}%  {compact}({result['num_test']} test images)")


def load_eval(run_dir: Path) -> Optional[dict]:
    result = read_json(Path(run_dir) / "eval.json")
    if result is None or not REQUIRED_EVAL_KEYS <= set(result):
        return None  # not written by this version: evaluate again
    return result
