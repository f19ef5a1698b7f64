"""Export names say what a model is, wherever its run came from, and an export never replaces another run's
model without being told to (`--overwrite`), which then replaces every file of that model together.

Two comparisons A and B each hold a run `ipasd-s0` (digits, resnet8, ipasd, seed 0; B trained with another lr,
so the two are different models), as `compare` names its runs."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from ipasdctl.config import load_recipe
from ipasdctl.deploy.bench import bench
from ipasdctl.deploy.export import export_onnx
from ipasdctl.errors import UserError
from ipasdctl.training import Progress, train_into
from tests.helpers import run_cli

NAME = "digits-resnet8-ipasd-s0"  # <dataset>-<arch>-<method>-s<seed>, as `train` names the run


def _torchscript_only(monkeypatch):
    """The TorchScript exporter is the quicker one on these tiny models."""
    real_export = torch.onnx.export

    def export(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("dynamo left out to keep the test quick")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)


@pytest.fixture(scope="module")
def comparisons(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("comparisons")
    runs = {}
    for label, lr in (("A", 0.05), ("B", 0.2)):
        recipe = load_recipe("demo", {"train": {"epochs": 1}, "optim": {"lr": lr}, "data": {"train_subset": 64}})
        runs[label] = train_into(recipe, root / label / "ipasd-s0", Progress(enabled=False))
    return runs


def test_another_comparisons_run_of_the_same_name_is_refused_and_overwrite_replaces_every_file(
        comparisons, tmp_path, capsys, monkeypatch):
    from ipasdctl.analysis.evaluation import eval_onnx_model

    _torchscript_only(monkeypatch)
    exports = tmp_path / "exports"
    code, _, err = run_cli(["export", str(comparisons["A"]), "--int8", "--calib-samples", "16", "--out", str(exports),
                          "-q"], capsys)
    assert code == 0, err
    assert (exports / f"{NAME}.onnx").is_file() and (exports / f"{NAME}-int8.onnx").is_file()
    eval_onnx_model(exports / f"{NAME}.onnx")  # eval writes its files beside the model
    bench(exports / f"{NAME}-int8.onnx", [1], threads=1, runs=2, warmup=0, with_torch=False)
    files_of_a = {p.name: p.read_bytes() for p in exports.iterdir() if p.name != "latency.csv"}
    assert {f"{NAME}.eval.json", f"{NAME}.reliability.png", f"{NAME}-int8.json"} <= set(files_of_a)

    # B's ipasd-s0 would take the same name: refused in one line, naming A's run and --overwrite; nothing changes
    code, out, err = run_cli(["export", str(comparisons["B"]), "--out", str(exports)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert str(comparisons["A"].resolve()) in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in exports.iterdir() if p.name != "latency.csv"} == files_of_a

    # --overwrite: B's model, and none of A's files left beside it (no INT8, no eval files, no latency rows)
    code, out, err = run_cli(["export", str(comparisons["B"]), "--out", str(exports), "--overwrite", "-q"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in exports.iterdir()) == sorted([f"{NAME}.onnx", f"{NAME}.json", "latency.csv"])
    record = json.loads((exports / f"{NAME}.json").read_text())
    assert record["run_dir"] == str(comparisons["B"].resolve())
    assert (exports / f"{NAME}.onnx").read_bytes() != files_of_a[f"{NAME}.onnx"]
    assert pd.read_csv(exports / "latency.csv").empty


def test_a_new_export_of_the_same_run_replaces_its_stale_files(comparisons, tmp_path, monkeypatch):
    _torchscript_only(monkeypatch)
    exports = tmp_path / "exports"
    export_onnx(comparisons["A"], exports, int8=True, calib_samples=16, validation_batch_sizes=(1, 2))
    (exports / f"{NAME}-int8.eval.json").write_text("{}")  # as eval of the INT8 model would leave it
    record = export_onnx(comparisons["A"], exports, validation_batch_sizes=(1, 2))  # same run, fp32 only
    assert record["name"] == NAME and "int8" not in record
    assert sorted(p.name for p in exports.iterdir()) == [f"{NAME}.json", f"{NAME}.onnx"]


def test_files_no_json_claims_are_refused_too(comparisons, tmp_path):
    from ipasdctl.deploy.export_names import model_files

    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / f"{NAME}.onnx").write_bytes(b"someone else's model")
    (exports / f"{NAME}-last.onnx").write_bytes(b"another model: not one of this name's files")
    assert [p.name for p in model_files(exports, NAME)] == [f"{NAME}.onnx"]
    with pytest.raises(UserError, match=f"files of '{NAME}' .* --overwrite"):
        export_onnx(comparisons["A"], exports)
    assert (exports / f"{NAME}.onnx").read_bytes() == b"someone else's model"


def test_two_runs_of_one_chain_that_would_share_a_name_are_refused_before_any_export(comparisons, tmp_path):
    from ipasdctl.deploy.export_names import check_targets

    with pytest.raises(UserError, match=f"would both be exported as {NAME}"):
        check_targets([comparisons["A"], comparisons["B"]], tmp_path / "exports")
    assert check_targets([comparisons["A"]], tmp_path / "exports") == [NAME]
    assert check_targets([comparisons["A"]], tmp_path / "exports", checkpoint="last") == [f"{NAME}-last"]
    copy = tmp_path / "renamed-run"
    shutil.copytree(comparisons["A"], copy)  # the folder's name plays no part
    assert check_targets([copy], tmp_path / "exports") == [NAME]
