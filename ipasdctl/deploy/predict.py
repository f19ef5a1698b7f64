"""`ipasdctl predict`: class probabilities of image files, from an exported .onnx model or a run folder.

The preprocessing is the evaluation transform of the data the model was trained on, read from the model's
metadata (input size, mean, std; NCHW): images of at most 64 pixels a side are resized to the input size, larger
ones have their shorter side resized to size / 0.875 and the centre crop taken (data/transforms.py); then
x = (pixel / 255 - mean) / std per channel. A run folder's checkpoint records the same facts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..bounds import MAX_IMAGE_SIDE
from ..data import build_data
from ..data.decode import open_image
from ..data.transforms import transforms_for
from ..errors import UserError
from ..runs import RunFolder, load_model
from .formats import model_session
from .onnx_files import read_metadata

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# PIL modes that hold ordinary 8-bit pictures (converted to RGB); others (16-bit, float) are refused
PICTURE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
MAX_IMAGES = 100_000


@dataclass
class Prediction:
    image: str
    classes: list[str]  # the top-k class names, most probable first
    probabilities: list[float]

    def to_dict(self) -> dict:
        return {"image": self.image, "top_k": [{"class": c, "probability": p}
                                               for c, p in zip(self.classes, self.probabilities)]}


@dataclass
class Preprocessing:
    input_size: list[int]  # C, H, W
    mean: list[float]
    std: list[float]
    class_names: list[str]


def image_files(paths: Sequence[Path]) -> list[Path]:
    """The given image files, and the image files in the given folders (sorted); a UserError for the rest."""
    if not paths:
        raise UserError("predict needs at least one image file or folder: ipasdctl predict MODEL IMAGE...")
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)}); give images or a "
                                "folder of them")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path} {_not_a_file(path)}; give image files or folders of them")
        if len(files) > MAX_IMAGES:
            raise UserError(f"more than {MAX_IMAGES} images given; predict on fewer at a time")
    return files


def _not_a_file(path: Path) -> str:
    """What a path that is neither a regular file nor a folder is: missing, a FIFO, a device, a dangling link."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError:
        return f"is a symlink to {os.readlink(path)}, which does not exist" if path.is_symlink() else "does not exist"
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    link = f"a symlink to {os.readlink(path)}, which is " if path.is_symlink() else ""
    return f"is {link}{kind}, not an image file"


def load_image(path: Path, channels: int):
    """The image as a PIL image in RGB (or L for one-channel models); a UserError when it is no picture."""
    try:
        with open_image(path, path) as image:
            image.load()
            mode = image.mode
            if mode not in PICTURE_MODES:
                raise UserError(f"{path} is a {mode} image (not 8-bit colour or grey); convert it to an 8-bit RGB "
                                "PNG or JPEG")
            return image.convert("L" if channels == 1 else "RGB")
    except UserError:
        raise
    except (OSError, ValueError, SyntaxError):
        raise UserError(f"{path} is not an image PIL can read; give PNG, JPEG or another image file") from None


def preprocess(image, prep: Preprocessing) -> np.ndarray:
    """C x H x W float32, the evaluation transform of the training data, normalised."""
    channels, height, width = prep.input_size
    if height != width:
        raise UserError(f"the model takes {height}x{width} images; predict supports square inputs only")
    pixels = transforms_for(height)[1](image, None).float() / 255.0  # C, H, W in 0..1
    if pixels.shape[0] != channels:
        pixels = pixels[:1] if channels == 1 else pixels.expand(channels, -1, -1)
    mean = torch.tensor(prep.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float32).view(-1, 1, 1)
    return ((pixels - mean) / std).numpy().astype(np.float32)


def onnx_preprocessing(model_path: Path) -> Preprocessing:
    meta = read_metadata(model_path)
    try:
        prep = Preprocessing([int(v) for v in meta["input_size"]], [float(v) for v in meta["mean"]],
                             [float(v) for v in meta["std"]], [str(c) for c in meta["class_names"]])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{model_path} has no ipasdctl preprocessing metadata (input_size, mean, std, class_names); "
                        "predict with models written by `ipasdctl export --onnx`") from None
    _check_preprocessing(prep, model_path)
    return prep


def _check_preprocessing(prep: Preprocessing, source: Path) -> None:
    channels = prep.input_size[0] if prep.input_size else 0
    if len(prep.input_size) != 3 or channels not in (1, 3) or not 8 <= prep.input_size[1] <= MAX_IMAGE_SIDE \
            or len(prep.mean) != channels or len(prep.std) != channels or min(prep.std) <= 0 or not prep.class_names:
        raise UserError(f"{source} has malformed preprocessing metadata (input_size {prep.input_size}, "
                        f"{len(prep.mean)} means, {len(prep.std)} stds); export the model again")


def predict_onnx(model_path: Path, images: Sequence[Path], top_k: int = 5, batch_size: int = 64) -> list[Prediction]:
    """Top-k classes and probabilities (softmax of the logits) of each image, through onnxruntime."""
    model_path = Path(model_path)
    prep = onnx_preprocessing(model_path)
    session = model_session(model_path)  # its format's session: float32 images in, float32 logits out
    input_name = session.get_inputs()[0].name
    return _predict(lambda x: session.run(None, {input_name: x})[0], prep, images, top_k, batch_size)


def predict_run(run_dir: Path, images: Sequence[Path], top_k: int = 5, checkpoint: str = "best",
                batch_size: int = 64) -> list[Prediction]:
    """The same from a run folder's checkpoint, in PyTorch (to check an export against its source)."""
    RunFolder(run_dir).check()
    model, state, recipe = load_model(run_dir, checkpoint, device="cpu")
    stats, class_names = state.get("data_stats"), state.get("class_names")
    if not stats or not class_names:  # a checkpoint from before they were recorded: ask the data set
        data = build_data(recipe.data)
        stats = stats or {"mean": list(data.mean), "std": list(data.std), "image_shape": list(data.image_shape)}
        class_names = class_names or list(data.class_names)
    prep = Preprocessing([int(v) for v in stats["image_shape"]], [float(v) for v in stats["mean"]],
                         [float(v) for v in stats["std"]], [str(c) for c in class_names])
    _check_preprocessing(prep, Path(run_dir))
    temperature = RunFolder(run_dir).fitted_temperature(checkpoint, state) or 1.0  # as the export folds it in

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return (model(torch.from_numpy(x)).float() / temperature).numpy()

    return _predict(forward, prep, images, top_k, batch_size)


def _predict(forward, prep: Preprocessing, images: Sequence[Path], top_k: int, batch_size: int) -> list[Prediction]:
    if top_k < 1:
        raise UserError(f"--top-k must be 1 or more, got {top_k}")
    files = image_files(images)
    k = min(top_k, len(prep.class_names))
    predictions: list[Prediction] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        batch = np.stack([preprocess(load_image(f, prep.input_size[0]), prep) for f in chunk])
        logits = forward(batch)
        if logits.ndim != 2 or logits.shape[1] != len(prep.class_names):
            raise UserError(f"the model returns {logits.shape[1:]} outputs per image but names "
                            f"{len(prep.class_names)} classes; export the model again")
        probabilities = torch.from_numpy(np.asarray(logits, dtype=np.float32)).softmax(1)
        values, indices = probabilities.topk(k, dim=1)
        for path, p, i in zip(chunk, values.tolist(), indices.tolist()):
            predictions.append(Prediction(str(path), [prep.class_names[c] for c in i], p))
    return predictions


def predict(source: Path, images: Sequence[Path], top_k: int = 5, checkpoint: Optional[str] = None) -> list[Prediction]:
    """From an exported .onnx model or a run folder (whose `checkpoint`, default best, is used)."""
    source = Path(source)
    if source.suffix.lower() == ".onnx" or source.is_file():
        if checkpoint is not None:
            raise UserError("--checkpoint applies to run folders, not to an .onnx model; drop it")
        return predict_onnx(source, images, top_k)
    return predict_run(source, images, top_k, checkpoint or "best")
