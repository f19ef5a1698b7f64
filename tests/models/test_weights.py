"""model.weights: a state dict file, a safetensors file, a run folder and torchvision's cache each load into a
model and train; what does not fit, or cannot be read, is one line (exit 2, nothing written)."""

from __future__ import annotations

import hashlib
import json
import urllib.error

import pytest
import torch
import yaml
from safetensors.torch import save_file

from ipasdctl.cli import main
from ipasdctl.errors import UserError
from ipasdctl.safe_io import load_checkpoint
from ipasdctl.models import build_model
from ipasdctl.runs.weights import load_weights
from tests.helpers import cli_error as one_error_line

TINY = ["--recipe", "demo", "--epochs", "1", "--batch-size", "32", "--set", "data.train_subset=64", "-q"]


def train_cli(out, name, *extra):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, "--out", str(out), "--name", name, *extra])
    assert exit_info.value.code in (0, None)
    return out / name


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    return train_cli(tmp_path_factory.mktemp("source"), "src")


def best_weights(run) -> dict:
    return load_checkpoint(run / "checkpoints" / "best.pt")["model"]


def assert_same_weights(model, state, skip=("classifier.",)):
    own = model.state_dict()
    for name, tensor in state.items():
        if not name.startswith(skip):
            assert torch.equal(own[name], tensor), name


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_state_dict_file_loads_and_trains_recording_what_it_loaded(source_run, tmp_path):
    state = best_weights(source_run)
    file = tmp_path / "resnet8.pt"
    torch.save({"state_dict": state, "epoch": 3}, file)  # a training script's checkpoint: weights under state_dict
    model = build_model("resnet8", 10)
    loaded = load_weights(model, str(file), "resnet8")
    assert_same_weights(model, state, skip=())
    assert loaded.loaded == len(state) and loaded.reinitialised == [] and loaded.sha256 == sha256(file)

    run = train_cli(tmp_path / "runs", "ft", "--set", f"model.weights={file}")
    record = json.loads((run / "summary.json").read_text())["weights"]
    assert record["source"] == str(file) and record["sha256"] == sha256(file)
    assert record["tensors_loaded"] == len(state) and record["tensors_reinitialised"] == []
    config = (run / "config.yaml").read_text()
    assert f"# model.weights sha256: {sha256(file)}" in config
    assert yaml.safe_load(config)["model"]["weights"] == str(file)


def test_safetensors_file_loads_and_trains(source_run, tmp_path):
    state = best_weights(source_run)
    file = tmp_path / "resnet8.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    model = build_model("resnet8", 10)
    load_weights(model, str(file), "resnet8")
    assert_same_weights(model, state, skip=())
    run = train_cli(tmp_path / "runs", "ft", "--weights", str(file))  # --weights: model.weights
    assert json.loads((run / "summary.json").read_text())["weights"]["sha256"] == sha256(file)


def test_run_folder_best_and_last_and_a_new_classifier_for_other_classes(source_run, tmp_path):
    last = load_checkpoint(source_run / "checkpoints" / "last.pt")["model"]
    model = build_model("resnet8", 10)
    load_weights(model, f"{source_run}:last", "resnet8")
    assert_same_weights(model, last, skip=())
    three = build_model("resnet8", 3)
    fresh = three.classifier.weight.detach().clone()
    loaded = load_weights(three, str(source_run), "resnet8")
    assert loaded.reinitialised == ["classifier.weight", "classifier.bias"]
    assert torch.equal(three.classifier.weight, fresh)  # left at its own init
    assert_same_weights(three, best_weights(source_run))
    # and it trains: three of the digits, from the ten-digit run's weights
    run = train_cli(tmp_path / "runs", "three", "--set", f"model.weights={source_run}", "--set",
                    "data.classes=[7, 1, 4]")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_classes"] == 3 and summary["weights"]["tensors_reinitialised"] == ["classifier.weight",
                                                                                           "classifier.bias"]


def test_torchvision_weights_load_from_the_cache_folder_torchvision_reads(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    reference = torchvision.models.mobilenet_v3_small(weights=None)  # stands for the downloaded ImageNet weights
    torch.save(reference.state_dict(), cache / "mobilenet_v3_small-047dcff4.pth")
    model = build_model("tv_mobilenet_v3_small", 5)
    loaded = load_weights(model, "torchvision", "tv_mobilenet_v3_small")
    assert torch.equal(model.body[0][0].weight, reference.features[0][0].weight)
    assert torch.equal(model.head[0].weight, reference.classifier[0].weight)  # the hidden layer is backbone
    assert loaded.reinitialised == ["classifier.weight", "classifier.bias"]
    assert loaded.mean == [0.485, 0.456, 0.406] and loaded.input_size == 224


def test_torchvision_offline_with_nothing_cached_names_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as error:
        load_weights(build_model("tv_mobilenet_v3_small", 5), "torchvision:IMAGENET1K_V1", "tv_mobilenet_v3_small")
    text = str(error.value)
    assert "mobilenet_v3_small-047dcff4.pth" in text and str(tmp_path / "torch" / "hub" / "checkpoints") in text
    with pytest.raises(UserError, match="no weights 'IMAGENET1K_V9'"):
        load_weights(build_model("tv_mobilenet_v3_small", 5), "torchvision:IMAGENET1K_V9", "tv_mobilenet_v3_small")
    with pytest.raises(UserError, match="tv_"):
        load_weights(build_model("resnet8", 5), "torchvision", "resnet8")


class NotATensor:
    """A pickled object: loading it needs more than weights_only."""


def test_bad_weights_are_one_line_and_leave_nothing(source_run, tmp_path, capsys):
    out = tmp_path / "runs"
    other = tmp_path / "resnet20.pt"
    torch.save(build_model("resnet20", 10).state_dict(), other)
    line = one_error_line(["train", *TINY, "--out", str(out), "--set", f"model.weights={other}"], capsys)
    assert "does not fit resnet8" in line and "'" in line  # names the first tensor that does not fit
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": NotATensor()}, pickled)
    line = one_error_line(["train", *TINY, "--out", str(out), "--set", f"model.weights={pickled}"], capsys)
    assert "weights-only" in line
    torn = tmp_path / "torn.safetensors"
    save_file({k: v.contiguous() for k, v in best_weights(source_run).items()}, str(torn))
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    line = one_error_line(["train", *TINY, "--out", str(out), "--set", f"model.weights={torn}"], capsys)
    assert "truncated or corrupt" in line
    line = one_error_line(["train", *TINY, "--out", str(out), "--arch", "resnet20", "--set",
                           f"model.weights={source_run}"], capsys)
    assert "holds a resnet8" in line
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow  # an ImageNet architecture trained and exported (about a minute on 2 cores)
def test_torchvision_weights_train_and_their_preprocessing_reaches_the_export(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(),
               cache / "mobilenet_v3_small-047dcff4.pth")
    run = train_cli(tmp_path / "runs", "tv", "--arch", "tv_mobilenet_v3_small", "--weights", "torchvision",
                    "--set", "model.freeze_epochs=0")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["weights"]["mean"] == [0.485, 0.456, 0.406]
    stats = load_checkpoint(run / "checkpoints" / "best.pt")["data_stats"]
    assert stats["mean"] == pytest.approx([0.485, 0.456, 0.406]) and stats["std"] == pytest.approx([0.229, 0.224, 0.225])
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(run), "--out", str(tmp_path / "exports"), "-q"])
    assert exit_info.value.code in (0, None)
    meta = json.loads(next((tmp_path / "exports").glob("*.json")).read_text())
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["std"] == pytest.approx([0.229, 0.224, 0.225])
