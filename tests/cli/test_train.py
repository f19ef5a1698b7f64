"""The foundation end to end: the CIFAR loader on hand-written files, the data pipeline, and `ipasdctl train`."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import yaml

from ipasdctl.cli import main
from ipasdctl.config import DataConfig, load_recipe
from ipasdctl.data import build_data
from ipasdctl.data.base import Augment, RandomBatches, balanced_subset
from ipasdctl.data.cifar import load_cifar10
from ipasdctl.safe_io import load_checkpoint


def write_cifar10(root, per_batch=20, test=30, seed=0):
    """A tiny CIFAR-10 'python version' folder with known pixels: image k of a batch has every byte = k."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)

    def batch(n, offset):
        data = np.zeros((n, 3072), dtype=np.uint8)
        data[:] = ((np.arange(n) + offset) % 256)[:, None]
        data[:, 1024:2048] = rng.integers(0, 256, (n, 1024))  # the G plane: noise, so augmentation matters
        return {b"batch_label": b"x", b"labels": [int(i % 10) for i in range(offset, offset + n)], b"data": data,
                b"filenames": [b"f%d.png" % i for i in range(n)]}

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as handle:
            pickle.dump(batch(per_batch, (i - 1) * per_batch), handle, protocol=2)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump(batch(test, 0), handle, protocol=2)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072}, handle, protocol=2)
    return root


def test_loader_reads_hand_written_cifar_batches(tmp_path):
    data = load_cifar10(str(write_cifar10(tmp_path)))
    assert data.train_images.shape == (100, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (30, 3, 32, 32)
    # batches concatenated in order; the R plane of image k is k, row-major planes R, G, B
    assert data.train_images[37, 0].unique().tolist() == [37]
    assert data.train_images[37, 2].unique().tolist() == [37]
    assert data.train_labels[:12].tolist() == [i % 10 for i in range(12)]
    assert data.class_names == [f"c{i}" for i in range(10)]
    assert data.num_classes == 10


def test_loader_accepts_the_folder_itself_and_refuses_other_layouts(tmp_path):
    write_cifar10(tmp_path)
    assert load_cifar10(str(tmp_path / "cifar-10-batches-py")).num_train == 100
    from ipasdctl.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        load_cifar10(str(tmp_path / "elsewhere"))


def test_balanced_subset_is_class_balanced_seeded_and_fixed():
    labels = torch.arange(100) % 10
    a = balanced_subset(labels, 30, 10, seed=0)
    assert torch.bincount(labels[a], minlength=10).tolist() == [3] * 10
    assert torch.equal(a, balanced_subset(labels, 30, 10, seed=0))
    assert not torch.equal(a, balanced_subset(labels, 30, 10, seed=1))
    assert a.unique().numel() == 30


def test_augmentation_is_crop_flip_normalise_on_tensors():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    aug = Augment((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), pad=0, hflip=False, device=torch.device("cpu"))
    out = aug(images, torch.Generator().manual_seed(0))
    assert torch.allclose(out, (images.float() / 255 - 0.5) / 0.25)
    # with padding every output is a shifted window of the zero-padded input (and so is its flip)
    aug = Augment((0.0,) * 3, (1.0,) * 3, pad=1, hflip=True, device=torch.device("cpu"))
    out = aug(images, torch.Generator().manual_seed(1)) * 255
    padded = torch.nn.functional.pad(images.float(), (1, 1, 1, 1))
    for b in range(2):
        windows = [padded[b, :, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)]
        windows += [w.flip(2) for w in windows]
        assert any(torch.allclose(out[b], w, atol=1e-3) for w in windows)


def test_batches_cover_each_sample_once_per_epoch_and_depend_on_epoch():
    plan = RandomBatches(torch.zeros(50, dtype=torch.long), batch_size=16, seed=3)
    batches = plan(0)
    assert [b.numel() for b in batches] == [16, 16, 16, 2]
    assert torch.cat(batches).sort().values.tolist() == list(range(50))
    assert not torch.equal(torch.cat(plan(0)), torch.cat(plan(1)))
    assert torch.equal(torch.cat(plan(1)), torch.cat(RandomBatches(torch.zeros(50), 16, 3)(1)))


def test_train_cli_two_epochs_writes_the_whole_run_folder(tmp_path, capsys):
    data_root = write_cifar10(tmp_path / "data")
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "ipasd", "--dataset", "cifar10", "--data", str(data_root), "--arch", "resnet8",
              "--epochs", "2", "--batch-size", "32", "--set", "data.train_subset=60", "--device", "cpu",
              "--out", str(out), "--set", "optim.warmup_epochs=1"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    run_dir = out / "cifar10-resnet8-ipasd-s0"
    assert printed[-1] == str(run_dir)  # the last line is the run folder

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["method"] == {"name": "ipasd", "w_div": 0.8, "w_con": 0.01, "tau": 0.3, "con_grad": True,
                                "memory_dtype": "float16"}
    assert config["train"]["epochs"] == 2 and config["data"]["train_subset"] == 60

    import pandas as pd

    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2]
    for column in ["lr", "train_loss", "loss_soft", "loss_con", "train_top1", "test_loss", "test_top1", "test_top5",
                   "epoch_seconds", "images_per_second"]:
        assert column in metrics and metrics[column].notna().all(), column
    assert metrics["loss_con"].tolist()[0] == 0 and metrics["loss_con"].tolist()[1] > 0  # no prototypes in epoch 0

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_top1"] == metrics["test_top1"].max()
    assert summary["last_top1"] == pytest.approx(metrics["test_top1"].iloc[-1], abs=1e-4)
    assert summary["best_epoch"] == int(metrics["test_top1"].idxmax()) + 1
    assert summary["params"] == 78042 and summary["macs"] > 0
    for key in ["best_top5", "last_top5", "wall_seconds", "device", "torch", "git_commit", "seed"]:
        assert key in summary

    for name in ["last.pt", "best.pt"]:
        state = load_checkpoint(run_dir / "checkpoints" / name)
        for key in ["model", "optimizer", "method", "epoch", "config"]:
            assert key in state
        assert state["method"]["last_softmax"]["table"].shape == (60, 10)
        assert state["method"]["last_softmax"]["table"].dtype == torch.float16
        assert state["method"]["prototypes"]["current"].shape == (10, 64)
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 2
    assert not (run_dir / ".lock").exists()


def test_train_refuses_bad_input_without_leaving_a_run_folder(tmp_path, capsys):
    out = tmp_path / "runs"
    cases = [
        (["--method", "ipasdd"], "unknown method 'ipasdd' (did you mean 'ipasd'?)"),
        (["--arch", "resnet9"], "unknown arch 'resnet9'"),
        (["--dataset", "cifar10", "--data", str(tmp_path / "nowhere")], "does not exist"),
        (["--epochs", "0"], "epochs must be a positive integer"),
        (["--batch-size", "-4"], "batch size must be a positive integer"),
        (["--set", "train.epoch=3"], "unknown recipe key 'train.epoch' (did you mean 'epochs'?)"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--out", str(out), *args])
        assert exit_info.value.code == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (args, err)
    assert not out.exists() or not any(out.iterdir())


def test_recipes_in_the_repo_all_load():
    from ipasdctl.config import RECIPES_DIR
    from ipasdctl.data import DATASETS
    from ipasdctl.methods import METHODS
    from ipasdctl.models import MODELS
    for path in RECIPES_DIR.glob("*.yaml"):
        recipe = load_recipe(str(path))
        assert recipe.data.name in DATASETS and recipe.model.arch in MODELS and recipe.method["name"] in METHODS


def test_paper_recipe_has_the_paper_settings():
    recipe = load_recipe("cifar100_resnet18_ipasd")
    assert (recipe.train.epochs, recipe.train.batch_size, recipe.optim.lr, recipe.optim.weight_decay) == (200, 128, 0.1, 5e-4)
    assert recipe.optim.nesterov and recipe.optim.momentum == 0.9 and recipe.optim.warmup_epochs == 5
    assert recipe.optim.milestones == [100, 150] and recipe.model.arch == "preact_resnet18"


def test_digits_is_embedded_and_split_stratified():
    data = build_data(DataConfig(name="digits"))
    assert data.num_train + data.num_test == 1797
    assert data.image_shape == (3, 16, 16)
    assert torch.bincount(data.test_labels, minlength=10).min() >= 30


def test_channels_last_on_cpu_by_default_and_numerically_the_same_step():
    """NHWC trains 1.02-1.58x faster on CPU (oneDNN): on by default, off with train.channels_last=false, and a
    step in either layout from the same weights on the same batch gives the same weights."""
    from benchmarks.support import StepRunner, quick_recipe

    def runner(channels_last: bool) -> StepRunner:
        torch.manual_seed(0)
        recipe = quick_recipe("ipasd", dataset="digits", batch_size=32, train_subset=128)
        recipe.train.channels_last = channels_last
        return StepRunner(recipe)

    nhwc, nchw = runner(True), runner(False)
    conv = next(m for m in nhwc.trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not next(m for m in nchw.trainer.model.modules()
                    if isinstance(m, torch.nn.Conv2d)).weight.is_contiguous(memory_format=torch.channels_last)
    batch = next(nhwc.trainer.loader.epoch(0))
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    plain = next(nchw.trainer.loader.epoch(0))
    assert plain.images.is_contiguous() and torch.equal(batch.images, plain.images)
    nchw.trainer.model.load_state_dict(nhwc.trainer.model.state_dict())
    for r, b in ((nhwc, batch), (nchw, plain)):
        r.trainer.method.on_epoch_start(0)
        r.step(b)
    for (name, a), (_, b) in zip(nhwc.trainer.model.state_dict().items(), nchw.trainer.model.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-4), name


def test_nproc_relaunches_the_same_command_line_without_nproc(monkeypatch, tmp_path):
    """`train --nproc N` hands each process the options as given (read from the command's own definition)."""
    from ipasdctl.training import launcher

    launched = []
    monkeypatch.setattr(launcher, "launch", lambda nproc, args, recipe: launched.append((nproc, args)) or 0)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--nproc", "2", "--epochs", "1", "--lr", "0.5", "--set", "train.batch_size=8", "--set",
              "data.train_subset=64", "--no-compile", "-q", "--out", str(tmp_path)])
    assert exit_info.value.code == 0
    nproc, args = launched[0]
    assert nproc == 2 and args[0] == "train" and "--nproc" not in args
    def value(flag):
        return args[args.index(flag) + 1]

    assert value("--epochs") == "1" and value("--lr") == "0.5" and value("--out") == str(tmp_path)
    assert args.count("--set") == 2 and "train.batch_size=8" in args and "data.train_subset=64" in args
    assert "--no-compile" in args and "--quiet" in args and "--sync-bn" not in args
