"""Does structured pruning make a network faster in onnxruntime? resnet20 and wrn16_2 (untrained: latency does
not depend on the weights) pruned by magnitude to 50 % and 25 % of their MACs, with the exact channel counts
of the ranking (`prune --round-to 1`) and rounded to multiples of 8 and 16, exported to fp32 ONNX and timed on
onnxruntime's CPU provider with one thread: blocks of calls alternated between the models, 5 rounds, the median
of each block's median (docs/performance.md, section 7).

    .venv/bin/python -m pytest benchmarks/test_bench_prune_rounding.py --benchmark-only -s
"""

import os
import statistics
import time
import warnings

import numpy as np
import torch
from conftest import report

from ipasdctl.compress.pruning import prune_to_macs
from ipasdctl.errors import UserError
from ipasdctl.models import build_model, count_macs

SHAPE = (3, 32, 32)
ARCHS = os.environ.get("IPASDCTL_BENCH_ARCHS", "resnet20,wrn16_2").split(",")


def variants(arch: str) -> dict:
    """name -> (network, share of the unpruned MACs, channel counts)."""
    torch.manual_seed(0)
    base = build_model(arch, 10).eval()
    full = count_macs(base, SHAPE, "cpu")
    made = {"unpruned": (base, 1.0)}
    for fraction in (0.5, 0.25):
        for round_to in (1, 8, 16):
            try:
                model, _ = prune_to_macs(base, int(fraction * full), "magnitude", SHAPE, arch, round_to)
            except UserError:  # a layer rounded to zero keeps all its channels: too coarse for the target
                continue
            made[f"{fraction:.0%} round {round_to}"] = (model, count_macs(model, SHAPE, "cpu") / full)
    return made


def session(model: torch.nn.Module, path: str):
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, *SHAPE), path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def latencies(sessions: dict, batch_size: int, calls: int, rounds: int = 5) -> dict:
    x = np.random.default_rng(0).random((batch_size, *SHAPE), dtype=np.float32)
    blocks = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, runner in sessions.items():
            for _ in range(2):
                runner.run(None, {"x": x})
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                runner.run(None, {"x": x})
                times.append(time.perf_counter() - start)
            blocks[name].append(statistics.median(times) * 1e3)
    return {name: statistics.median(values) for name, values in blocks.items()}


def test_prune_rounding_table(benchmark, tmp_path):
    def measure():
        rows = []
        for arch in ARCHS:
            made = variants(arch)
            sessions = {name: session(model, str(tmp_path / f"{arch}-{i}.onnx"))
                        for i, (name, (model, _)) in enumerate(made.items())}
            b1, b64 = latencies(sessions, 1, 100), latencies(sessions, 64, 8)
            for name, (model, share) in made.items():
                counts = sorted({m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)})
                rows.append({"arch": arch, "model": name, "macs_share": share, "b1_ms": b1[name],
                             "speedup_b1": b1["unpruned"] / b1[name], "b64_ms": b64[name],
                             "speedup_b64": b64["unpruned"] / b64[name], "channel_counts": counts})
        return rows

    rows = benchmark.pedantic(measure, rounds=1, iterations=1)
    report("pruned networks in onnxruntime, CPU provider, 1 thread, fp32", rows)
