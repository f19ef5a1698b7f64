"""Experiment tracking (--track / train.track): what a run logs is read back from TensorBoard's event files and
from the MLflow store; a missing extra or an unknown backend is one line before anything trains."""

from __future__ import annotations

import importlib.util
import json
import os
import signal

import pandas as pd
import pytest

from ipasdctl import training
from ipasdctl.cli import main
from ipasdctl.training import trainer as trainer_module
from ipasdctl.training.tracking import board_tag
from ipasdctl.version import install_command
from tests.helpers import tiny_recipe


def tracked(track: str):
    """ce, 2 epochs of 4 steps (64 digits, batch 16), logged to `track`."""
    return tiny_recipe("ce", epochs=2, batch_size=16, train={"track": track})


def logged_columns(run_dir) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")


def test_tensorboard_holds_the_recipe_every_metrics_column_and_the_summary(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir = training.train(tracked("tensorboard"), tmp_path, progress=training.Progress(enabled=False))
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    metrics = logged_columns(run_dir)
    tags = {column: board_tag(column) for column in metrics.columns.drop("epoch")}
    for column, tag in tags.items():
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2], column
        assert [s.value for s in scalars] == pytest.approx(metrics[column].tolist(), rel=1e-4, abs=1e-6), column
    # grouped by split in TensorBoard's sidebar: train/..., test/... (val/... with a validation split)
    assert {tags[c] for c in ("train_loss", "loss_ce", "train_top1", "lr", "test_top1", "test_loss")} == \
        {"train/loss", "train/loss_ce", "train/top1", "train/lr", "test/top1", "test/loss"}
    assert {tag.split("/")[0] for tag in events.Tags()["scalars"]} == {"train", "test", "summary"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert events.Scalars("summary/best_top1")[0].value == pytest.approx(summary["best_top1"], rel=1e-6)
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    params = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert params["train.epochs"].number_value == 2 and params["method.name"].string_value == "ce"
    assert params["optim.lr"].number_value == pytest.approx(tracked("x").optim.lr) and params["train.track"].string_value == "tensorboard"


def _interrupt_after_first_epoch(monkeypatch):
    real_evaluate = trainer_module.test_metrics
    calls = []

    def evaluate_then_press_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # Ctrl-C during epoch 1's evaluation: checkpoint after epoch 1, then stop
            os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "test_metrics", evaluate_then_press_ctrl_c)


def test_mlflow_holds_the_recipe_every_metrics_column_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    _interrupt_after_first_epoch(monkeypatch)
    with pytest.raises(training.Interrupted) as stopped:
        training.train(tracked("mlflow"), tmp_path, progress=training.Progress(enabled=False))
    run_dir = stopped.value.run_dir
    training.resume(run_dir, progress=training.Progress(enabled=False))

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the default store: beside the run folder
    experiment = client.get_experiment_by_name("demo")  # the recipe's name
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2" and run.data.params["method.name"] == "ce"
    assert float(run.data.params["optim.lr"]) == tracked("x").optim.lr
    metrics = logged_columns(run_dir)
    for column in metrics.columns.drop("epoch"):
        history = sorted(client.get_metric_history(run.info.run_id, column), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2], column  # each epoch once, across the two sessions
        assert [m.value for m in history] == pytest.approx(metrics[column].tolist(), rel=1e-4, abs=1e-6), column
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.data.metrics["summary/best_top1"] == pytest.approx(summary["best_top1"])


def _one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize("backend", ["tensorboard", "mlflow"])
def test_a_missing_extra_is_one_line_before_anything_trains(backend, tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == backend else real_find_spec(name, *a))
    err = _one_line_error(capsys, ["train", "--track", backend, "--epochs", "1", "--out", str(tmp_path / "runs")])
    assert err.endswith(f"needs the {backend} package: {install_command(backend)}")
    assert not (tmp_path / "runs").exists()


def test_the_install_hint_fits_how_ipasdctl_is_installed(tmp_path, monkeypatch):
    """From a source checkout (an editable install, or PYTHONPATH) the extra comes from the checkout: `pip install
    'ipasdctl[x]'` would fetch another copy from the package index beside it. Installed from a wheel: the index."""
    checkout = tmp_path / "ipasdctl-src"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text("[project]\nname = 'ipasdctl'\n")
    monkeypatch.chdir(checkout)
    assert install_command("tensorboard", checkout) == "pip install -e '.[tensorboard]'"
    monkeypatch.chdir(tmp_path)
    assert install_command("mlflow", checkout) == f"pip install -e '{checkout}[mlflow]'"
    site_packages = tmp_path / "site-packages"  # a wheel's package has no pyproject.toml beside it
    site_packages.mkdir()
    assert install_command("tensorboard", site_packages) == "pip install 'ipasdctl[tensorboard]'"


def test_an_unknown_tracker_is_one_line(tmp_path, capsys):
    err = _one_line_error(capsys, ["train", "--track", "wandb", "--out", str(tmp_path / "runs")])
    assert "train.track must be one of tensorboard, mlflow" in err
