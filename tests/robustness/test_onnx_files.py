"""Hostile ONNX files: malformed deployment metadata and a model onnxruntime fails on at run time are one
line for bench, eval and predict.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper, TensorProto

from ipasdctl.deploy import onnx_test_accuracy
from ipasdctl.errors import UserError
from tests.helpers import cli_error, DIGITS, picture, tiny_onnx


@pytest.mark.parametrize("key,value,expected", [
    ("input_size", "not json", "'input_size' is 'not json'"),
    ("data_image_size", "big", "'data_image_size' is 'big'"),
    ("class_names", "5", "'class_names' is 5"),
    ("dataset", "[1]", None),  # a string key: kept as given, an unknown data set then
])
def test_malformed_onnx_metadata_is_one_line_for_bench_and_eval(key, value, expected, tmp_path, capsys):
    model = tiny_onnx(tmp_path / "m.onnx", {"dataset": "digits", "input_size": "[3, 8, 8]", key: value})
    if expected is None:
        assert "unknown dataset '[1]'" in cli_error(["eval", model], capsys)
        return
    assert expected in cli_error(["bench", model, "--runs", "1", "--no-torch"], capsys)
    with pytest.raises(UserError, match=expected.replace("[", r"\[")):
        onnx_test_accuracy(model, None)


def bad_bias_onnx(path: Path) -> Path:
    """A model that loads but fails inside session.run: its Conv has 10 channels and a bias of 11 values."""
    weight = numpy_helper.from_array(np.zeros((10, 3, 3, 3), np.float32), "weight")
    bias = numpy_helper.from_array(np.zeros(11, np.float32), "bias")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "weight", "bias"], ["features"], pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["features"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["logits"])],
        "bad-bias", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], initializer=[weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in DIGITS.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def test_an_onnxruntime_error_at_run_time_is_one_line_in_bench_eval_and_predict(tmp_path, capfd):
    model = str(bad_bias_onnx(tmp_path / "bad.onnx"))
    image = str(picture(tmp_path / "a.png"))
    for args in (["bench", model, "--runs", "1", "--warmup", "0", "--batch-sizes", "1", "--no-torch", "-q"], ["eval", model],
                 ["predict", model, image]):
        line = cli_error(args, capfd)  # capfd: onnxruntime logs on file descriptor 2, below Python's sys.stderr
        assert f"onnxruntime cannot run {model}: Non-zero status code returned while running Conv node" in line, args
        assert "export it again with `ipasdctl export --onnx`" in line
