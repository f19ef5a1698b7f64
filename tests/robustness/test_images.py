"""Issue 19, items 7 and 8: every file or option someone else hands in is untrusted input with a schema.

A size that comes from a file or an option is bounded (the bound in the message), a loop is detected, and a
malformed value is one line (exit 2), never a traceback, a hang or an allocation of 100 GB.
"""

from __future__ import annotations

import json
import pickle
import time

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from ipasdctl.analysis.selection import load_exports
from ipasdctl.data.cifar import load_cifar10
from ipasdctl.data.files import load_rgb
from ipasdctl.data.imagefolder import load_image_folder
from ipasdctl.deploy import onnx_test_accuracy
from ipasdctl.errors import UserError
from ipasdctl.files import load_checkpoint, save_checkpoint
from fuzz_loaders import tiny_onnx_model
from test_bad_input import run_cli
from test_hardening import copy_of, finished  # noqa: F401  (the module's finished run)


def tiny_onnx(path, metadata: dict) -> str:
    """A small valid ONNX model (global average pool of 3 x 8 x 8 images) with the given metadata strings."""
    model = tiny_onnx_model()
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return str(path)


# ---------------------------------------------------------------------------------------- 7. bounded, never hanging


def test_a_yaml_alias_bomb_is_one_line_at_once(tmp_path, capsys):
    levels = ["&a [x, x, x, x, x, x, x, x, x]"] + [
        f"&{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]  # 9^9 leaves if expanded
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(f"name: [{', '.join(levels)}]\n")
    started = time.monotonic()
    line = run_cli(["train", "--recipe", str(recipe), "--out", str(tmp_path / "runs")], capsys)
    assert time.monotonic() - started < 10
    assert "name must be a string, got [" in line and len(line) < 300


def test_a_symlink_loop_in_an_image_folder_is_one_line(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "data" / cls / f"{i}.png")
    (tmp_path / "data" / "b" / "loop").symlink_to(tmp_path / "data")
    with pytest.raises(UserError, match="is a symlink back to .* the image folder loops; remove the link"):
        load_image_folder(str(tmp_path / "data"), image_size=8, num_workers=0)


def test_a_decompression_bomb_image_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 pixels is then a bomb, as 10^10 is by default
    with pytest.raises(UserError, match=r"cannot decode image .*bomb.png: it is too large \(4,096 pixels, beyond the "
                                         r"bound of 100 pixels against decompression bombs\)"):
        load_rgb(str(path))


@pytest.mark.parametrize("option,expected", [
    ("data.image_size=100000", "data.image_size must be from 8 to 4096 pixels, got 100000"),
    ("data.num_workers=500", "data.num_workers must be from 0 (decode in the training process) to 64, got 500"),
])
def test_image_folder_sizes_are_bounded(option, expected, tmp_path, capsys):
    line = run_cli(["train", "--dataset", "imagefolder", "--data", str(tmp_path), "--out", str(tmp_path / "runs"),
                    "--set", option], capsys)
    assert expected in line


def test_bench_threads_and_onnx_input_size_are_bounded(tmp_path, capsys):
    model = tiny_onnx(tmp_path / "m.onnx", {"input_size": "[3, 8, 8]"})
    assert "--threads must be from 1 to " in run_cli(["bench", model, "--threads", "100000", "--no-torch"], capsys)
    huge = tiny_onnx(tmp_path / "huge.onnx", {"input_size": "[3, 100000, 100000]", "dataset": "digits"})
    expected = "has malformed metadata: 'input_size' is [3, 100000, 100000], expected [channels (1-4), height, width (1-4096"
    assert expected in run_cli(["bench", huge, "--runs", "1", "--no-torch"], capsys)
    assert expected in run_cli(["eval", huge], capsys)


# ---------------------------------------------------------------------------------------- 8. one line, not a traceback


@pytest.mark.parametrize("option,expected", [
    ("train.epochs=1180591620717411303424", "train.epochs must be an integer from -2^63 to 2^63-1, got 1180591620717411303424"),
    ("optim.momentum=.inf", "optim.momentum must be a finite number, got inf"),
    ("method.tau=.nan", "method.tau must be a finite number, got nan"),
])
def test_non_finite_and_huge_numbers_are_refused_at_parse_time(option, expected, tmp_path, capsys):
    line = run_cli(["train", "--method", "ipasd", "--out", str(tmp_path / "runs"), "--set", option], capsys)
    assert expected in line


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("name: café\n".encode("latin-1"))
    assert f"recipe {recipe} is not UTF-8 text (byte 9)" in run_cli(["train", "--recipe", str(recipe)], capsys)


def first_float_weight(state):
    return next(k for k, v in state["model"].items() if v.is_floating_point() and v.dim() > 1)


DAMAGES = {
    # damage: (change of the state, expected part of the line of eval/export, of resume)
    "no-config": (lambda s: s.pop("config"), "holds no recipe ('config')", "holds no recipe ('config')"),
    "no-num-classes": (lambda s: s.pop("num_classes"), "'num_classes' is None", "'num_classes' is None"),
    "epoch-not-integer": (lambda s: s.update(epoch=1.5), "'epoch' is 1.5, not a whole number", "'epoch' is 1.5"),
    "wrong-shape": (lambda s: s["model"].update({first_float_weight(s): torch.zeros(1)}),
                    "does not hold the weights of a resnet8 with 10 classes", "is not a complete training checkpoint"),
    "other-class-count": (lambda s: s.update(num_classes=7, class_names=[f"c{i}" for i in range(7)]),
                          "does not hold the weights of a resnet8 with 7 classes", "the checkpoint has 7 classes"),
    "missing-key": (lambda s: s.pop("optimizer"), None, "is not a complete training checkpoint of this recipe (KeyError: 'optimizer')"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_hand_made_checkpoints_are_one_line_for_eval_export_and_resume(damage, finished, tmp_path, capsys):  # noqa: F811
    change, for_model, for_resume = DAMAGES[damage]
    run_dir = copy_of(finished, tmp_path)
    for which in ("best", "last"):
        path = run_dir / "checkpoints" / f"{which}.pt"
        state = load_checkpoint(path)
        change(state)
        save_checkpoint(path, state)
    if for_model is not None:
        assert for_model in run_cli(["eval", str(run_dir), "--device", "cpu"], capsys)
        assert for_model in run_cli(["export", str(run_dir), "--onnx", "--out", str(tmp_path / "x")], capsys)
    assert for_resume in run_cli(["train", "--resume", str(run_dir)], capsys)


@pytest.mark.parametrize("key,value,expected", [
    ("input_size", "not json", "'input_size' is 'not json'"),
    ("data_image_size", "big", "'data_image_size' is 'big'"),
    ("class_names", "5", "'class_names' is 5"),
    ("dataset", "[1]", None),  # a string key: kept as given, an unknown data set then
])
def test_malformed_onnx_metadata_is_one_line_for_bench_and_eval(key, value, expected, tmp_path, capsys):
    model = tiny_onnx(tmp_path / "m.onnx", {"dataset": "digits", "input_size": "[3, 8, 8]", key: value})
    if expected is None:
        assert "unknown dataset '[1]'" in run_cli(["eval", model], capsys)
        return
    assert expected in run_cli(["bench", model, "--runs", "1", "--no-torch"], capsys)
    with pytest.raises(UserError, match=expected.replace("[", r"\[")):
        onnx_test_accuracy(model, None)


def cifar_with(make_tiny_cifar, tmp_path, **entries):
    root = make_tiny_cifar(tmp_path / "data", train=40, test=10)
    path = root / "cifar-10-batches-py" / ("batches.meta" if "label_names" in entries else "test_batch")
    batch = pickle.loads(path.read_bytes(), encoding="latin1")
    batch.update({k.encode(): v for k, v in entries.items()})
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return root


@pytest.mark.parametrize("entries,expected", [
    ({"labels": [2**70] * 10}, "its 'labels' are not a list of integers"),
    ({"labels": 3}, "its 'labels' are not a list of integers"),
    ({"label_names": 5}, "its class names are not a list of names"),
    ({"data": "text"}, "expected uint8 N x 3072 images and N labels, found a str"),
])
def test_absurd_cifar_contents_are_one_line(entries, expected, make_tiny_cifar, tmp_path):
    root = cifar_with(make_tiny_cifar, tmp_path, **entries)
    with pytest.raises(UserError, match=expected.replace("(", r"\(")):
        load_cifar10(str(root))


def test_pathologically_nested_cifar_labels_are_one_line(make_tiny_cifar, tmp_path):
    root = make_tiny_cifar(tmp_path / "data", train=40, test=10)
    depth = 100_000  # nested lists: [[[[...]]]], written opcode by opcode (pickle.dumps would recurse)
    nested = b"]" * depth + b"a" * (depth - 1)
    raw = b"\x80\x02}(X\x06\x00\x00\x00labels" + nested + b"X\x04\x00\x00\x00data]u."
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(raw)
    with pytest.raises(UserError, match="test_batch is corrupt: its 'labels' are not a list of integers"):
        load_cifar10(str(root))


def test_export_records_of_the_wrong_types_are_not_a_crash(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"run_dir": 5, "onnx_file": ["x"]}))
    (tmp_path / "b.json").write_text(json.dumps({"run_dir": "/runs/r", "onnx_file": "b.onnx", "onnx_test": [1],
                                                 "file_size_bytes": "big", "test_top1": "high", "precision": 3}))
    (tmp_path / "c.json").write_text(json.dumps({"run_dir": "/runs/r", "onnx_file": "c.onnx", "test_top1": 10**400}))
    table = load_exports(tmp_path)
    assert list(table["export"]) == ["b.onnx", "c.onnx"]
    assert table["export_top1"].isna().all() and list(table["precision"]) == ["fp32", "fp32"]
    assert np.isnan(table["file_size_bytes"].iloc[0])
