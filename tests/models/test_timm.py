"""--arch timm:<name>: a tiny timm model (built with pretrained=False, offline) follows the model contract, trains
with ipasd, byot and kd, exports, benches and predicts; list --models 'timm:*...*'; unknown names are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("timm")

from ipasdctl.cli import main  # noqa: E402
from ipasdctl.models import build_model  # noqa: E402
from tests.helpers import cli_error as one_error_line

TINY = ["--recipe", "demo", "--epochs", "1", "--batch-size", "32", "--set", "data.train_subset=64", "-q"]


def run_cli(args, capsys=None) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out if capsys is not None else ""


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_vit"])
def test_timm_models_follow_the_contract(name):
    model = build_model(f"timm:{name}", 5).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, embedding, stages = model(x, with_features=True)
    assert logits.shape == (2, 5) and embedding.shape == (2, model.embed_dim)
    assert [s.shape[1] for s in stages] == model.stage_channels
    assert torch.allclose(torch.flatten(F.adaptive_avg_pool2d(stages[-1], 1), 1), embedding, atol=1e-5)
    assert torch.allclose(model(x), logits, atol=1e-5)
    assert torch.allclose(model.classifier(embedding), logits, atol=1e-5)


def test_a_tiny_timm_model_trains_with_ipasd_byot_and_kd_then_exports_benches_predicts(tmp_path, capsys):
    from PIL import Image

    out, arch = tmp_path / "runs", "timm:test_resnet"
    for method in ("ipasd", "byot"):
        run_cli(["train", *TINY, "--arch", arch, "--method", method, "--out", str(out), "--name", method])
    run_cli(["train", *TINY, "--arch", arch, "--method", "kd", "--set", f"method.teacher={out / 'byot'}",
             "--out", str(out), "--name", "kd"])
    summary = json.loads((out / "kd" / "summary.json").read_text())
    assert summary["arch"] == arch and summary["teacher_arch"] == arch and summary["finished"]
    assert json.loads((out / "byot" / "summary.json").read_text())["params"] == summary["params"]
    capsys.readouterr()
    onnx = run_cli(["export", str(out / "kd"), "--out", str(tmp_path / "exports"), "-q"], capsys).strip().splitlines()[-1]
    meta = json.loads((tmp_path / "exports" / "digits-timm-test_resnet-kd-s0.json").read_text())
    assert meta["arch"] == arch and onnx.endswith(".onnx")
    table = run_cli(["bench", onnx, "--batch-sizes", "1", "--runs", "3", "--warmup", "1", "--no-torch", "-q"], capsys)
    assert "onnxruntime" in table
    image = tmp_path / "x.png"
    Image.fromarray(np.full((16, 16, 3), 120, dtype=np.uint8)).save(image)
    predicted = run_cli(["predict", onnx, str(image)], capsys)
    assert str(image) in predicted and "%" in predicted


def test_list_models_takes_a_timm_pattern(capsys):
    out = run_cli(["list", "--models", "timm:test_res*", "-q"], capsys)
    assert "timm:test_resnet" in out and "timm:test_vit" not in out


def test_unknown_timm_name_suggests_the_closest(tmp_path, capsys):
    line = one_error_line(["train", *TINY, "--arch", "timm:test_resnett", "--out", str(tmp_path / "runs")], capsys)
    assert "timm has no model 'test_resnett'" in line and "test_resnet" in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_model_without_stages_refuses_a_method_that_needs_them(tmp_path, capsys, monkeypatch):
    import timm

    body = timm.create_model("test_resnet", num_classes=0)
    monkeypatch.delattr(type(body), "forward_intermediates")  # as a timm model that cannot give its stages
    model = build_model("timm:test_resnet", 3)
    assert model.stage_channels == [model.embed_dim]  # the embedding alone, as a 1x1 stage
    line = one_error_line(["train", *TINY, "--arch", "timm:test_resnet", "--method", "byot",
                           "--out", str(tmp_path / "runs")], capsys)
    assert "at least 2 stages" in line


def test_timm_weights_come_through_timms_own_loader_and_offline_is_one_line(monkeypatch):
    import timm

    from ipasdctl.errors import UserError
    from ipasdctl.runs.weights import load_weights

    create = timm.create_model
    made = {}

    def from_cache(name, pretrained=False, **kwargs):  # stands for timm's download into its cache
        net = create(name, pretrained=False, **kwargs)
        if pretrained:
            made["name"], made["net"] = name, net
        return net

    monkeypatch.setattr(timm, "create_model", from_cache)
    model = build_model("timm:test_resnet", 3)
    loaded = load_weights(model, "timm:r160_in1k", "timm:test_resnet")
    assert made["name"] == "test_resnet.r160_in1k"
    assert all(torch.equal(model.body.state_dict()[k], v) for k, v in made["net"].state_dict().items())
    assert loaded.reinitialised == ["classifier.weight", "classifier.bias"] and loaded.input_size == 160

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("cannot reach the hub")
        return create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError, match="place the Hugging Face repo timm/test_resnet"):
        load_weights(build_model("timm:test_resnet", 3), "timm", "timm:test_resnet")
    with pytest.raises(UserError, match="for timm architectures"):
        load_weights(build_model("resnet8", 3), "timm", "resnet8")
