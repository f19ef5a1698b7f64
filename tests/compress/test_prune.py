"""`ipasdctl prune` end to end on tiny runs: the MACs target reached, the pruned run folder read by every command
as any other (weights-only checkpoint, eval, export fp32 and int8 against PyTorch, the selection table),
iterative pruning with taylor and kd from the unpruned run, and pickled modules refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ipasdctl.runs import RunFolder, load_model
from tests.compress.conftest import prune
from tests.helpers import cli_error, copy_run


def macs_of(run: Path) -> int:
    return json.loads(RunFolder(run).summary.read_text())["macs"]


@pytest.mark.parametrize("source, pruned", [("demo_run", "pruned_demo"), ("wrn_run", "pruned_wrn")])
def test_pruning_reaches_the_macs_target_within_5_percent(source, pruned, request):
    source, pruned = request.getfixturevalue(source), request.getfixturevalue(pruned)
    kept = macs_of(pruned) / macs_of(source)
    assert 0.5 * 0.95 <= kept <= 0.5, kept
    model, _, recipe = load_model(pruned)
    from ipasdctl.models import count_macs

    assert count_macs(model, (3, 16, 16), "cpu") == macs_of(pruned)  # what summary.json says is the net's
    record = json.loads(RunFolder(pruned).pruning.read_text())
    assert record["finished"] and record["source"] == str(source.resolve())
    assert record["steps"][0]["macs"] == macs_of(pruned) and record["steps"][0]["macs_fraction"] == pytest.approx(kept)
    assert pruned.name == f"{source.name}-pruned-50" and pruned.parent != source.parent


def test_the_pruned_run_folder_records_its_source_and_holds_weights_only(demo_run, pruned_demo):
    folder = RunFolder(pruned_demo)
    config = folder.read_config()
    assert config["model"]["pruning"] == {"source": str(demo_run.resolve()), "checkpoint": "best", "target_macs": 0.5,
                                          "target_latency_ms": None, "importance": "magnitude", "steps": 1, "step": 1,
                                          "round_to": 8}
    assert config["model"]["weights"] == str(folder.pruned_weights.resolve())
    # the recovery's optimiser: the source's lr x 0.1, no warm-up, cosine
    source_optim = RunFolder(demo_run).read_config()["optim"]
    assert config["optim"]["lr"] == pytest.approx(source_optim["lr"] * 0.1)
    assert config["optim"]["warmup_epochs"] == 0 and config["optim"]["schedule"] == "cosine"
    assert config["method"]["name"] == "ipasd" and config["train"]["epochs"] == 1
    for which in ("best", "last"):
        state = torch.load(folder.checkpoint(which), weights_only=True)  # plain tensors and plain data
        assert state["config"]["model"]["structure"] == config["model"]["structure"]
        assert all(isinstance(v, torch.Tensor) for v in state["model"].values())
    conv1 = config["model"]["structure"]["conv1"]
    assert state["model"]["conv1.weight"].shape[0] == conv1["out_channels"] < 16


def test_eval_and_the_export_of_the_pruned_run_agree_with_pytorch(pruned_demo, tmp_path):
    import onnxruntime as ort

    from ipasdctl import evaluate
    from ipasdctl.data import build_data
    from ipasdctl.deploy.export import export_onnx

    model, _, recipe = load_model(pruned_demo)
    result = evaluate(pruned_demo)
    assert result["top1"] == pytest.approx(json.loads(RunFolder(pruned_demo).summary.read_text())["best_top1"])
    record = export_onnx(pruned_demo, tmp_path, int8=True, calib_samples=32, validation_batch_sizes=(1, 8))
    images, _ = next(iter(build_data(recipe.data).test_batches(64, torch.device("cpu"))))
    with torch.no_grad():
        expected = model(images).numpy()
    got = {}
    for key, path in (("fp32", record["onnx_path"]), ("int8", record["int8"]["onnx_path"])):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got[key] = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    np.testing.assert_allclose(got["fp32"], expected, atol=1e-4, rtol=1e-3)
    spread = expected.max() - expected.min()
    assert np.abs(got["int8"] - expected).max() < 0.1 * spread  # quantised: near, not equal
    assert Path(record["onnx_path"]).name.startswith("digits-resnet8-pruned-50-ipasd-s0")  # not the source's name


def test_the_selection_table_tells_pruned_from_unpruned_rows(demo_run, pruned_demo):
    from ipasdctl.analysis.selection import selection_table

    table = selection_table([], None, None, run_dirs=[demo_run, pruned_demo])
    rows = {row["pruning"]: row for row in table.to_dict("records")}
    assert set(rows) == {"none", "macs 50% magnitude round 8"}
    assert rows["macs 50% magnitude round 8"]["macs"] == macs_of(pruned_demo) and rows["none"]["macs"] == macs_of(demo_run)


def test_the_pruning_label_names_the_target_importance_steps_and_rounding():
    from ipasdctl.runs.schemas import pruning_label

    assert pruning_label(None) == "none"
    assert pruning_label({"target_macs": 0.5, "importance": "magnitude", "steps": 1}) == "macs 50% magnitude"
    assert pruning_label({"target_macs": 0.25, "importance": "taylor", "steps": 3, "round_to": 8}) == \
        "macs 25% taylor 3 steps round 8"
    assert pruning_label({"target_latency_ms": 0.8, "importance": "bn-scale", "round_to": 1}) == "latency 0.8ms bn-scale"


def test_a_prune_recorded_before_round_to_existed_is_still_the_same_prune(demo_run, pruned_demo, tmp_path):
    from ipasdctl.compress import PruneSettings
    from ipasdctl.compress.prune import _same_prune
    from tests.compress.conftest import PRUNE

    folder = RunFolder(copy_run(pruned_demo, tmp_path / pruned_demo.name))
    written = json.loads(folder.pruning.read_text())
    record = json.loads(json.dumps({key: written[key] for key in ("format", "source", "source_sha256", "settings")}))
    assert record["settings"] == PruneSettings(**PRUNE).to_dict()
    del written["settings"]["round_to"]  # as a version without the option wrote it: it pruned exact counts
    folder.pruning.write_text(json.dumps(written))
    assert _same_prune(folder, {**record, "settings": {**record["settings"], "round_to": 1}}) is not None
    assert _same_prune(folder, record) is None  # today's default, 8, is another prune


def test_iterative_taylor_pruning_recovers_each_step_with_kd_from_the_unpruned_run(demo_run, tmp_path):
    from ipasdctl import prune as prune_api  # the Python API

    pruned = prune_api(demo_run, target_macs=0.4, steps=2, importance="taylor", method="kd", epochs=1, out=tmp_path,
                       overrides={"train": {"batch_size": 32, "device": "cpu"}}, round_to=1)  # exact: within 5 %
    record = json.loads(RunFolder(pruned).pruning.read_text())
    assert record["macs_fractions"] == pytest.approx([0.7, 0.4])  # linear in MACs: 1 - 0.6 k / 2
    first, second = record["steps"]
    assert first["run_dir"] == str(RunFolder(pruned).prune_step(1).path) and second["run_dir"] == str(pruned)
    assert 0.95 * 0.7 <= first["macs_fraction"] <= 0.7 and 0.95 * 0.4 <= second["macs_fraction"] <= 0.4
    step1 = RunFolder(first["run_dir"])
    assert step1.state() == "finished" and step1.read_config()["model"]["pruning"]["step"] == 1
    config = RunFolder(pruned).read_config()
    assert config["method"]["name"] == "kd" and config["method"]["teacher"] == str(demo_run.resolve())
    assert config["model"]["pruning"]["step"] == 2 and config["model"]["pruning"]["importance"] == "taylor"
    summary = json.loads(RunFolder(pruned).summary.read_text())
    assert summary["teacher"] == str(demo_run.resolve()) and summary["macs"] == second["macs"]
    # step 2 pruned step 1's recovered network, not the source: its shapes are a subset of step 1's
    shapes = [RunFolder(run).read_config()["model"]["structure"] for run in (first["run_dir"], pruned)]
    assert all(shapes[1][k]["out_channels"] <= shapes[0][k]["out_channels"] for k in shapes[1] if k in shapes[0]
               and "out_channels" in shapes[1][k])


def test_a_checkpoint_holding_pickled_modules_is_refused(demo_run, tmp_path, capsys):
    """torch-pruning's own examples save the whole pruned module (torch.save(model)): never loaded here."""
    run = copy_run(demo_run, tmp_path / "pickled")
    state = torch.load(RunFolder(run).best, weights_only=True)
    model, _, _ = load_model(demo_run)
    state["model"] = model  # a pickled nn.Module instead of its state dict
    torch.save(state, RunFolder(run).best)
    for args in (["prune", str(run), "--target-macs", "0.5", "--out", str(tmp_path / "out")], ["eval", str(run)]):
        line = cli_error(args, capsys)
        assert "is not a weights-only checkpoint" in line and "CifarResNet" in line, line
    assert not (tmp_path / "out").exists()
