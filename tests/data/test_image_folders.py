"""The image-file data sets (imagefolder, imagenet, tiny-imagenet) on tiny fixtures written in their on-disk
layouts: classes, counts, labels, which file each index is, augmentation against an independent reference,
seeding and resume, worker processes, errors, and one epoch of training end to end."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ipasdctl.config import DataConfig, load_recipe
from ipasdctl.data.base import ImageData, RandomBatches
from ipasdctl.data.file_loader import FileImageData
from ipasdctl.data.imagefolder import load_image_folder
from ipasdctl.data.imagenet import load_imagenet
from ipasdctl.data.tiny_imagenet import TINY_MEAN, TINY_STD, load_tiny_imagenet
from ipasdctl.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, RandomResizedCropFlip, ResizeCenterCrop,
                                      SmallImageTransform)
from ipasdctl.errors import UserError
from ipasdctl.data import DATASETS, build_data

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def noise_image(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_image(path, array: np.ndarray, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def file_pixels(path) -> torch.Tensor:
    """The file decoded by PIL, as uint8 C x H x W (the reference the loaders must reproduce)."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


def denormalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Back to uint8 pixels: x = (p / 255 - mean) / std."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return ((x * s + m) * 255).round().clamp(0, 255).to(torch.uint8)


def make_image_folder(root, counts: dict, size=(16, 16), seed=0, fmt="PNG") -> list:
    """root/<class>/img_<k>.png with noise pixels; returns the written paths in class, then name order."""
    paths = []
    for c, (name, n) in enumerate(sorted(counts.items())):
        for k in range(n):
            path = root / name / f"img_{k}.{fmt.lower()}"
            write_image(path, noise_image(seed + 100 * c + k, size[1], size[0]), fmt)
            paths.append(path)
    return paths


@pytest.fixture()
def split_folder(tmp_path):
    """train/ (cat 4, dog 3, emu 5; one cat image one folder deeper) and val/ (cat 2, dog 1, no emu)."""
    root = tmp_path / "plants"
    make_image_folder(root / "train", {"cat": 3, "dog": 3, "emu": 5})
    write_image(root / "train" / "cat" / "more" / "deep.png", noise_image(999, 16, 16))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "dog" / ".hidden.png").write_bytes(b"not decoded")
    make_image_folder(root / "val", {"cat": 2, "dog": 1}, seed=500)
    return root


def load_split(root, **kwargs) -> FileImageData:
    return load_image_folder(str(root), image_size=16, num_workers=kwargs.pop("num_workers", 0), **kwargs)


# ------------------------------------------------------------------------------------------------ imagefolder


def test_imagefolder_train_val_layout_classes_counts_and_files(split_folder):
    cfg = DataConfig(name="imagefolder", root=str(split_folder), params={"image_size": 16, "num_workers": 0})
    data = build_data(cfg)
    assert isinstance(data, FileImageData)
    assert data.class_names == ["cat", "dog", "emu"]
    assert (data.num_classes, data.num_train, data.num_test) == (3, 12, 3)
    assert data.train_labels.tolist() == [0] * 4 + [1] * 3 + [2] * 5
    assert data.train_labels.dtype == torch.long
    assert data.test_labels.tolist() == [0, 0, 1]
    assert data.image_shape == (3, 16, 16)
    assert (tuple(data.mean), tuple(data.std)) == (IMAGENET_MEAN, IMAGENET_STD)
    # the recursive scan: cat's images are img_0..2 and more/deep.png, sorted by relative path
    assert [data.train_path(i).split("plants/train/")[1] for i in range(4)] == \
        ["cat/img_0.png", "cat/img_1.png", "cat/img_2.png", "cat/more/deep.png"]
    assert isinstance(data.train_transform, SmallImageTransform) and data.train_transform.pad == 4


def test_file_loader_follows_the_plan_and_returns_the_files_pixels(split_folder):
    data = load_split(split_folder)
    plan = [torch.tensor([5, 0, 11]), torch.tensor([3, 7])]
    loader = data.train_loader(lambda epoch: plan, seed=0, device=CPU, channels_last=False, augment=False)
    assert loader.steps(0) == 2
    batches = list(loader.epoch(0))
    assert [b.step for b in batches] == [0, 1] and all(b.epoch == 0 for b in batches)
    for batch, indices in zip(batches, plan):
        assert batch.indices.tolist() == indices.tolist()
        assert batch.labels.tolist() == data.train_labels[indices].tolist()
        assert batch.images.dtype == torch.float32 and batch.images.shape == (len(indices), 3, 16, 16)
        assert batch.raw is None
        pixels = denormalise(batch.images, data.mean, data.std)
        for row, index in enumerate(indices.tolist()):
            assert torch.equal(pixels[row], file_pixels(data.train_path(index)))
    with pytest.raises(UserError, match="tensor-resident"):
        batches[0].view(batches[0].raw, 0)


def test_test_batches_are_in_order_and_normalised(split_folder):
    data = load_split(split_folder)
    batches = list(data.test_batches(2, CPU))
    assert [x.shape[0] for x, _ in batches] == [2, 1]
    assert torch.cat([y for _, y in batches]).tolist() == [0, 0, 1]
    x = torch.cat([x for x, _ in batches])
    expected = torch.stack([file_pixels(split_folder / "val" / "cat" / "img_0.png"),
                            file_pixels(split_folder / "val" / "cat" / "img_1.png"),
                            file_pixels(split_folder / "val" / "dog" / "img_0.png")])
    assert torch.equal(denormalise(x, data.mean, data.std), expected)
    # the normalisation itself: (p / 255 - mean) / std, checked on one value
    p = expected[0, 1, 3, 5].item()
    assert x[0, 1, 3, 5].item() == pytest.approx((p / 255 - IMAGENET_MEAN[1]) / IMAGENET_STD[1], abs=1e-5)


def _is_padded_crop(image: torch.Tensor, original: torch.Tensor, pad: int) -> bool:
    """Is `image` some size x size window of `original` zero-padded by `pad`, possibly mirrored?"""
    size = original.shape[-1]
    padded = torch.nn.functional.pad(original, (pad,) * 4)
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[:, dy:dy + size, dx:dx + size]
            if torch.equal(window, image) or torch.equal(window.flip(2), image):
                return True
    return False


def test_small_image_augmentation_is_pad_crop_flip_seeded_per_step_and_resumable(split_folder):
    data = load_split(split_folder)
    plan = RandomBatches(data.train_labels, 4, seed=3)

    def epoch(e, start=0, seed=3):
        loader = data.train_loader(plan, seed=seed, device=CPU, channels_last=False, augment=True)
        return [(b.indices.clone(), b.images.clone()) for b in loader.epoch(e, start)]

    first = epoch(0)
    assert sorted(torch.cat([i for i, _ in first]).tolist()) == list(range(12))
    moved = 0
    for indices, images in first:
        pixels = denormalise(images, data.mean, data.std)
        for row, index in enumerate(indices.tolist()):
            original = file_pixels(data.train_path(index))
            assert _is_padded_crop(pixels[row], original, 4)
            moved += not torch.equal(pixels[row], original)
    assert moved > 6  # most samples are shifted or mirrored (81 * 2 outcomes, 1 of them the identity)
    again = epoch(0)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, again))  # same seed: same augmentation
    resumed = epoch(0, start=1)  # a run resumed at step 1 sees exactly the uninterrupted run's later steps
    assert len(resumed) == 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first[1:], resumed))
    other_seed = epoch(0, seed=4)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(first, other_seed))


def test_worker_processes_give_the_same_batches_across_epochs(split_folder):
    plan = RandomBatches(torch.zeros(12), 5, seed=1)
    in_process = load_split(split_folder, num_workers=0).train_loader(plan, 7, CPU, False, True)
    workers = load_split(split_folder, num_workers=2).train_loader(plan, 7, CPU, False, True)
    for e in (0, 1):  # the second epoch reuses the persistent workers with a new plan
        a, b = list(in_process.epoch(e)), list(workers.epoch(e))
        assert len(a) == len(b) == 3
        for x, y in zip(a, b):
            assert torch.equal(x.indices, y.indices) and torch.equal(x.images, y.images)
    assert workers.loader._iterator is not None  # persistent: the same worker pool served both epochs


def test_single_tree_gets_a_seeded_stratified_split(tmp_path):
    root = tmp_path / "leaves"
    make_image_folder(root, {"a": 10, "b": 6})
    data = load_image_folder(str(root), image_size=16, val_fraction=0.3, split_seed=0, num_workers=0)
    assert data.class_names == ["a", "b"]
    # round(0.3 * 10) = 3 and round(0.3 * 6) = 2 held out
    assert data.test_labels.bincount().tolist() == [3, 2]
    assert data.train_labels.bincount().tolist() == [7, 4]
    train = {f.decode() for f in data.train_files}
    test = {f.decode() for f in data.test_files}
    assert not train & test and len(train | test) == 16
    for f, label in zip(data.train_files, data.train_labels.tolist()):
        assert f.decode().split("/")[0] == data.class_names[label]
    same = load_image_folder(str(root), image_size=16, val_fraction=0.3, split_seed=0, num_workers=0)
    assert {f.decode() for f in same.test_files} == test
    other = load_image_folder(str(root), image_size=16, val_fraction=0.3, split_seed=1, num_workers=0)
    assert {f.decode() for f in other.test_files} != test


def test_file_data_subset_is_class_balanced(split_folder):
    data = load_split(split_folder).subset(6, seed=0)
    assert data.num_train == 6 and data.train_labels.bincount().tolist() == [2, 2, 2]
    for i, label in enumerate(data.train_labels.tolist()):
        assert f"/{data.class_names[label]}/" in data.train_path(i)


def test_imagefolder_refuses_bad_layouts_with_one_line(tmp_path):
    with pytest.raises(UserError, match="needs --data"):
        load_image_folder(None)
    with pytest.raises(UserError, match="missing does not exist"):
        load_image_folder(str(tmp_path / "missing"))
    (tmp_path / "loose").mkdir()
    write_image(tmp_path / "loose" / "a.png", noise_image(0, 8, 8))
    with pytest.raises(UserError, match="no class folders"):
        load_image_folder(str(tmp_path / "loose"))
    make_image_folder(tmp_path / "empty_class", {"a": 2})
    (tmp_path / "empty_class" / "b").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        load_image_folder(str(tmp_path / "empty_class"))
    make_image_folder(tmp_path / "ok", {"a": 3, "b": 3})
    with pytest.raises(UserError, match="val_fraction"):
        load_image_folder(str(tmp_path / "ok"), val_fraction=1.5)
    with pytest.raises(UserError, match="num_workers"):
        load_image_folder(str(tmp_path / "ok"), num_workers=-1)
    make_image_folder(tmp_path / "mismatch" / "train", {"a": 2, "b": 2})
    make_image_folder(tmp_path / "mismatch" / "val", {"a": 1, "zebra": 1})
    with pytest.raises(UserError, match="zebra"):
        load_image_folder(str(tmp_path / "mismatch"))


def test_unreadable_image_is_one_line_naming_the_file_even_from_a_worker(tmp_path):
    make_image_folder(tmp_path / "broken", {"a": 2, "b": 2})
    (tmp_path / "broken" / "b" / "img_1.png").write_bytes(b"\x89PNG truncated")
    data = load_image_folder(str(tmp_path / "broken"), image_size=16, val_fraction=0.5, num_workers=2)
    loader = data.train_loader(lambda e: [torch.arange(data.num_train)], 0, CPU, False, False)
    names = [data.train_path(i) for i in range(data.num_train)] + \
        [str(tmp_path / "broken" / f.decode()) for f in data.test_files]
    broken = str(tmp_path / "broken" / "b" / "img_1.png")
    assert broken in names
    with pytest.raises(UserError) as info:
        list(loader.epoch(0))
        list(data.test_batches(4, CPU))
    message = str(info.value)
    assert "\n" not in message and "img_1.png" in message and "cannot decode" in message


# ------------------------------------------------------------------------------------------------ transforms


def test_resize_center_crop_matches_torchvision():
    from torchvision import transforms as T

    image = Image.fromarray(noise_image(3, 50, 80))  # 80 wide, 50 high
    ours = ResizeCenterCrop(37, 32)(image)
    reference = T.Compose([T.Resize(37), T.CenterCrop(32), T.PILToTensor()])(image)
    assert ours.shape == (3, 32, 32) and torch.equal(ours, reference)


def test_random_resized_crop_matches_torchvision_for_its_box_and_respects_the_ranges():
    from torchvision.transforms import functional as TF

    image = Image.fromarray(noise_image(4, 60, 90))
    transform = RandomResizedCropFlip(24)
    flips = 0
    for seed in range(40):
        probe = random.Random(seed)
        left, top, w, h = transform.crop_box(90, 60, probe)
        flipped = probe.random() < 0.5
        flips += flipped
        assert 0 <= left and left + w <= 90 and 0 <= top and top + h <= 60
        assert 0.08 * 0.9 <= w * h / (90 * 60) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
        expected = TF.pil_to_tensor(TF.resized_crop(image, top, left, h, w, [24, 24]))
        if flipped:
            expected = expected.flip(2)
        assert torch.equal(transform(image, random.Random(seed)), expected)
    assert 8 < flips < 32
    # an image too elongated for any sampled box falls back to the central crop of the widest allowed aspect
    left, top, w, h = transform.crop_box(400, 10, random.Random(0))
    assert (w, h) == (13, 10) and left == (400 - 13) // 2 and top == 0


def test_large_images_use_the_imagenet_style_transforms(tmp_path):
    make_image_folder(tmp_path / "big", {"a": 3, "b": 3}, size=(100, 80))
    data = load_image_folder(str(tmp_path / "big"), image_size=72, val_fraction=0.34, num_workers=0)
    assert data.train_transform == RandomResizedCropFlip(72)
    assert data.eval_transform == ResizeCenterCrop(82, 72)  # 72 / 0.875
    batch = next(iter(data.train_loader(RandomBatches(data.train_labels, 4, 0), 0, CPU, False, True).epoch(0)))
    assert batch.images.shape == (4, 3, 72, 72)
    x, y = next(iter(data.test_batches(8, CPU)))
    assert x.shape == (2, 3, 72, 72) and y.tolist() == [0, 1]


# ------------------------------------------------------------------------------------------------ imagenet


def make_imagenet(root, flat_val=False):
    make_image_folder(root / "train", {"n01440764": 3, "n01443537": 2}, size=(40, 30), fmt="JPEG")
    if flat_val:
        write_image(root / "val" / "ILSVRC2012_val_00000001.JPEG", noise_image(0, 30, 40), "JPEG")
    else:
        make_image_folder(root / "val", {"n01440764": 1, "n01443537": 2}, size=(30, 40), seed=7, fmt="JPEG")
    return root


def test_imagenet_layout_and_standard_transforms(tmp_path):
    root = make_imagenet(tmp_path / "ilsvrc")
    data = build_data(DataConfig(name="imagenet", root=str(root), params={"image_size": 32, "num_workers": 0}))
    assert data.class_names == ["n01440764", "n01443537"]
    assert (data.num_train, data.num_test) == (5, 3)
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1] and data.test_labels.tolist() == [0, 1, 1]
    assert data.train_transform == RandomResizedCropFlip(32)
    assert data.eval_transform == ResizeCenterCrop(37, 32)  # 256 / 224 * 32
    batches = list(data.train_loader(RandomBatches(data.train_labels, 2, 0), 0, CPU, False, True).epoch(0))
    assert [b.images.shape for b in batches] == [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)]
    x, y = next(iter(data.test_batches(3, CPU)))
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [0, 1, 1]
    default = load_imagenet(str(root), num_workers=0)
    assert default.image_shape == (3, 224, 224) and default.eval_transform == ResizeCenterCrop(256, 224)


def test_imagenet_refuses_a_flat_val_folder(tmp_path):
    root = make_imagenet(tmp_path / "flat", flat_val=True)
    with pytest.raises(UserError, match="valprep"):
        load_imagenet(str(root))
    make_image_folder(tmp_path / "noval" / "train", {"a": 1})
    with pytest.raises(UserError, match="lacks val/"):
        load_imagenet(str(tmp_path / "noval"))


# ------------------------------------------------------------------------------------------------ tiny imagenet


def make_tiny_imagenet(parent, size=16):
    folder = parent / "tiny-imagenet-200"
    wnids = ["n02124075", "n04067472", "n01443537"]  # label order is wnids.txt's, not sorted
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn02124075\tEgyptian cat\n"
                                      "n04067472\treel\nn09999999\tunused\n")
    counts = {"n02124075": 3, "n04067472": 2, "n01443537": 4}
    for label, wnid in enumerate(wnids):
        for k in range(counts[wnid]):
            write_image(folder / "train" / wnid / "images" / f"{wnid}_{k}.JPEG",
                        noise_image(10 * label + k, size, size), "JPEG")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    write_image(folder / "train" / "n00000001" / "images" / "x.JPEG", noise_image(1, size, size), "JPEG")  # extra
    rows = [("val_0.JPEG", "n04067472"), ("val_1.JPEG", "n01443537"), ("val_2.JPEG", "n02124075"),
            ("val_3.JPEG", "n00000001"), ("val_4.JPEG", "n01443537")]
    for k, (name, _) in enumerate(rows):
        write_image(folder / "val" / "images" / name, noise_image(200 + k, size, size), "JPEG")
    (folder / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t0\t0\t{size}\t{size}\n" for n, w in rows))
    return folder


def test_tiny_imagenet_is_decoded_into_the_tensor_pipeline(tmp_path):
    folder = make_tiny_imagenet(tmp_path)
    data = build_data(DataConfig(name="tiny-imagenet", root=str(tmp_path),
                                 params={"image_size": 16, "num_workers": 2}))  # decoded by worker processes
    assert isinstance(data, ImageData) and data.name == "tiny-imagenet"
    assert data.class_names == ["Egyptian cat", "reel", "goldfish"]
    assert (data.num_train, data.num_test) == (9, 4)  # the extra class and its val image are ignored
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert data.test_labels.tolist() == [1, 2, 0, 2]  # val_0, val_1, val_2, val_4
    assert data.train_images.shape == (9, 3, 16, 16) and data.train_images.dtype == torch.uint8
    first_goldfish = folder / "train" / "n01443537" / "images" / "n01443537_0.JPEG"
    assert torch.equal(data.train_images[5], file_pixels(first_goldfish))
    assert torch.equal(data.test_images[3], file_pixels(folder / "val" / "images" / "val_4.JPEG"))
    assert (tuple(data.mean), tuple(data.std)) == (TINY_MEAN, TINY_STD) and (data.pad, data.hflip) == (4, True)
    batch = next(iter(data.train_loader(RandomBatches(data.train_labels, 4, 0), 0, CPU, False, True).epoch(0)))
    assert batch.images.shape == (4, 3, 16, 16) and batch.raw.shape == (4, 3, 16, 16)
    assert batch.view(batch.raw, 0).shape == (4, 3, 16, 16)  # extra views work on the tensor pipeline
    # the folder itself is accepted too, and the default size is Tiny ImageNet's 64
    assert load_tiny_imagenet(str(folder), num_workers=0).image_shape == (3, 64, 64)


def test_tiny_imagenet_refuses_incomplete_folders(tmp_path):
    with pytest.raises(UserError, match="tiny-imagenet-200"):
        load_tiny_imagenet(str(tmp_path))
    folder = make_tiny_imagenet(tmp_path)
    for path in sorted((folder / "train" / "n04067472" / "images").iterdir()):
        path.unlink()
    (folder / "train" / "n04067472" / "images").rmdir()
    with pytest.raises(UserError, match="n04067472"):
        load_tiny_imagenet(str(tmp_path), num_workers=0)


# ------------------------------------------------------------------------------------------------ end to end


def test_one_epoch_of_training_on_an_image_folder(tmp_path, split_folder):
    from ipasdctl import training

    recipe = load_recipe(None, {
        "name": "files", "data": {"name": "imagefolder", "root": str(split_folder), "image_size": 16,
                                  "num_workers": 0},
        "model": {"arch": "resnet8"}, "method": {"name": "ipasd"},
        "optim": {"lr": 0.05, "warmup_epochs": 0, "schedule": "constant"},
        "train": {"epochs": 1, "batch_size": 4, "device": "cpu", "eval_batch_size": 2},
    })
    run_dir = training.train(recipe, tmp_path / "runs", progress=training.Progress(enabled=False))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dataset"] == "imagefolder" and summary["train_images"] == 12 and summary["num_classes"] == 3
    assert summary["finished"] and 0.0 <= summary["last_top1"] <= 100.0
    assert summary["macs"] > 0  # counted at the data set's 3 x 16 x 16
    assert (run_dir / "checkpoints" / "last.pt").is_file()


def test_recipes_of_the_new_data_sets():
    import ipasdctl.models  # noqa: F401  (registration)

    tiny = load_recipe("tinyimagenet_resnet18_ipasd")
    plant = load_recipe("plantvillage_resnet18_ipasd")
    imagenet = load_recipe("imagenet_resnet18_ipasd")
    assert (tiny.data.name, plant.data.name, imagenet.data.name) == ("tiny-imagenet", "imagefolder", "imagenet")
    for recipe in (tiny, plant, imagenet):
        assert recipe.data.name in DATASETS and recipe.method["name"] == "ipasd"
        assert (recipe.method["w_div"], recipe.method["w_con"], recipe.method["tau"]) == (0.8, 0.01, 0.3)
    for recipe in (tiny, plant):  # the paper's schedule
        assert recipe.model.arch == "preact_resnet18" and recipe.train.epochs == 200
        assert recipe.optim.milestones == [100, 150] and recipe.optim.warmup_epochs == 5 and recipe.optim.nesterov
    assert plant.data.params["image_size"] == 64 and plant.data.params["val_fraction"] == 0.2
    # the standard 90-epoch ImageNet schedule
    assert imagenet.model.arch == "tv_resnet18" and imagenet.train.epochs == 90 and imagenet.train.batch_size == 256
    assert (imagenet.optim.lr, imagenet.optim.weight_decay, imagenet.optim.milestones) == (0.1, 1e-4, [30, 60])
    assert imagenet.optim.warmup_epochs == 0 and not imagenet.optim.nesterov


def test_a_method_that_needs_extra_views_stops_with_one_clear_line(tmp_path, split_folder):
    from ipasdctl import training
    from ipasdctl.methods import METHODS
    if "ddgsd" not in METHODS:
        pytest.skip("no ddgsd method registered")
    recipe = load_recipe(None, {
        "data": {"name": "imagefolder", "root": str(split_folder), "image_size": 16, "num_workers": 0},
        "model": {"arch": "resnet8"}, "method": {"name": "ddgsd"},
        "train": {"epochs": 1, "batch_size": 4, "device": "cpu"},
    })
    with pytest.raises(UserError, match="extra augmented views") as info:
        training.train(recipe, tmp_path / "runs", progress=training.Progress(enabled=False))
    assert "\n" not in str(info.value) and "tiny-imagenet" in str(info.value)
