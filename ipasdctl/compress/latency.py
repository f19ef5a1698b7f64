"""The batch-1 latency `prune --target-latency-ms` aims at: the p50 of onnxruntime's CPU provider on the fp32
ONNX graph of the network, as `ipasdctl bench` measures an export (and the selection table reads), with the
thread count of the command (--threads) or onnxruntime's own.

The graph is written with the TorchScript exporter into a temporary folder: it takes a fraction of a second,
where the dynamo exporter `ipasdctl export` uses takes seconds, and both give onnxruntime the same layers to
run once it has optimised the graph. Each measurement is WARMUP untimed calls, then RUNS timed ones
(deploy.bench.time_calls), so a search of twenty candidates stays within seconds for a small network.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import runtime
from ..deploy.bench import time_calls
from ..errors import UserError, one_line

RUNS = 50
WARMUP = 10


def batch1_latency_ms(model: nn.Module, image_shape, runs: int = RUNS, warmup: int = WARMUP) -> float:
    """p50 (ms) of `runs` onnxruntime CPU calls of `model` on one image of `image_shape` (C, H, W)."""
    import onnxruntime as ort

    example = torch.zeros(1, *image_shape)
    with tempfile.TemporaryDirectory(prefix="ipasdctl-prune-") as folder:
        path = Path(folder) / "candidate.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model.eval(), (example,), str(path), input_names=["input"],
                                  output_names=["logits"], opset_version=17, dynamo=False)
        except Exception as exc:
            raise UserError(f"--target-latency-ms: the pruned network could not be written as ONNX to time it "
                            f"({one_line(exc, 160, named=True)}); use --target-macs instead") from None
        options = ort.SessionOptions()
        options.log_severity_level = 4
        threads = runtime.requested_threads()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    image = np.zeros((1, *image_shape), dtype=np.float32)
    times = time_calls(lambda: session.run(None, {"input": image}), runs, warmup)
    return float(np.percentile(times, 50))
