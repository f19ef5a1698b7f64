"""Temperature scaling: the fit on hand-made logits, `ipasdctl calibrate` on a deliberately overconfident run,
and the export that folds the temperature into the ONNX graph (matching PyTorch)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from ipasdctl.analysis.calibration import calibrate_run, calibration_figures, fit_temperature
from ipasdctl.cli import main
from ipasdctl.config import load_recipe
from ipasdctl.deploy import read_metadata
from ipasdctl.deploy.export import export_onnx
from ipasdctl.runs import RunFolder, load_model
from ipasdctl.safe_io import load_checkpoint, save_checkpoint
from ipasdctl.training import Progress, train


def calibrated_logits(n: int = 4000, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is the true label distribution: labels are drawn from it (calibrated at T = 1)."""
    generator = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, classes, generator=generator)
    labels = torch.multinomial(logits.softmax(1), 1, generator=generator).flatten()
    return logits, labels


@pytest.mark.parametrize("scale", [5.0, 0.25])
def test_the_fit_recovers_the_scale_of_over_and_underconfident_logits(scale):
    logits, labels = calibrated_logits()
    temperature = fit_temperature(logits * scale, labels)
    assert temperature == pytest.approx(scale, rel=0.1)
    figures = calibration_figures(logits * scale, labels, temperature)
    assert figures["nll_after"] < figures["nll_before"] and figures["ece_after"] < figures["ece_before"]
    assert figures["nll_after"] == pytest.approx(F.cross_entropy(logits, labels).item(), abs=0.02)


def test_the_fit_is_the_minimum_of_the_nll():
    logits, labels = calibrated_logits(seed=1)
    logits = logits * 3.0
    temperature = fit_temperature(logits, labels)
    nll = lambda t: F.cross_entropy(logits / t, labels).item()  # noqa: E731
    assert nll(temperature) <= min(nll(temperature * 0.97), nll(temperature * 1.03))


@pytest.fixture(scope="module")
def overconfident_run(tmp_path_factory):
    """A tiny run with a validation split whose classifier weights were multiplied by 20 in best.pt."""
    recipe = load_recipe("demo", {"train": {"epochs": 2, "batch_size": 32, "device": "cpu"},
                                  "data": {"train_subset": 96, "val_split": 60}, "optim": {"warmup_epochs": 0}})
    run_dir = train(recipe, tmp_path_factory.mktemp("runs"), progress=Progress(enabled=False))
    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    for key in ("classifier.weight", "classifier.bias"):
        state["model"][key] = state["model"][key] * 20
    save_checkpoint(run_dir / "checkpoints" / "best.pt", state)
    return run_dir


def test_calibrate_lowers_the_test_nll_of_an_overconfident_model_and_records_t(overconfident_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", str(overconfident_run), "--device", "cpu"])
    out = capsys.readouterr().out.strip().splitlines()
    assert exit_info.value.code == 0 and out[-1] == str(overconfident_run / "temperature.json")
    entry = RunFolder(overconfident_run).read_temperature("best")
    assert entry["temperature"] > 3 and entry["fitted_on"] == "val" and entry["val_images"] == 60
    assert entry["epoch"] == load_checkpoint(overconfident_run / "checkpoints" / "best.pt")["epoch"]
    test = entry["test"]
    assert test["nll_after"] < test["nll_before"] and entry["val"]["nll_after"] < entry["val"]["nll_before"]
    assert f"NLL {test['nll_before']:.4f} -> {test['nll_after']:.4f}" in out[1]
    assert RunFolder(overconfident_run).read_temperature("last") is None  # per checkpoint


def test_export_folds_the_temperature_in_and_matches_pytorch(overconfident_run, tmp_path):
    t = calibrate_run(overconfident_run, device="cpu")["temperature"]
    record = export_onnx(overconfident_run, tmp_path, validation_batch_sizes=(1, 5))
    assert record["temperature"] == t and read_metadata(tmp_path / f"{overconfident_run.name}.onnx")["temperature"] == t
    model, _, _ = load_model(overconfident_run, "best")
    x = torch.randn(9, 3, 16, 16)
    session = ort.InferenceSession(record["onnx_path"], providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        expected = (model(x) / t).numpy()
    np.testing.assert_allclose(onnx_out, expected, atol=1e-4, rtol=1e-3)
    assert not np.allclose(onnx_out, expected * t, atol=1e-2)  # the graph does divide


def test_a_temperature_of_another_epoch_is_refused_on_export(overconfident_run, tmp_path, capsys):
    folder = RunFolder(overconfident_run)
    saved = folder.temperature.read_text() if folder.temperature.exists() else None
    folder.write_temperature("best", {"temperature": 2.0, "epoch": 99})
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["export", str(overconfident_run), "--onnx", "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1
        assert "was fitted on the best checkpoint of epoch 99" in err and "ipasdctl calibrate" in err
        assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
    finally:
        if saved is None:
            folder.temperature.unlink()
        else:
            folder.temperature.write_text(saved)


def test_calibrate_refuses_a_run_without_a_validation_split(tmp_path, capsys):
    recipe = load_recipe("demo", {"train": {"epochs": 1, "batch_size": 32, "device": "cpu"},
                                  "data": {"train_subset": 64}})
    run_dir = train(recipe, tmp_path, progress=Progress(enabled=False))
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", str(run_dir)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "has no validation split" in err and "--set data.val_split=N" in err
    assert not (run_dir / "temperature.json").exists()
    assert json.loads((run_dir / "summary.json").read_text())["best_chosen_on"] == "test"
