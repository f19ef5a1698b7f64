"""Every registered architecture: parameters, MACs (at its default input size) and CPU training images/s
(forward + backward + SGD step on random data, batch 16 at 32x32 and 8 at 224x224, median of timed steps) in
three settings: NCHW fp32, channels-last fp32 (what `train` does on CPU by default) and channels-last with
bfloat16 autocast (`--precision bf16`; fast where the CPU has native bf16, e.g. AVX512-BF16 or AMX).

    .venv/bin/python -m pytest benchmarks/test_bench_models.py --benchmark-only -s
"""

import os
import statistics
import time

import torch
import torch.nn.functional as F
from conftest import report

from ipasdctl.models import build_model
from ipasdctl.models.catalog import model_row
from ipasdctl.models import MODELS


def training_rate(name: str, steps: int, channels_last: bool = True, bf16: bool = False) -> float:
    row = model_row(name)
    size, classes = row["input_size"], row["num_classes"]
    batch = 16 if size <= 64 else 8
    torch.manual_seed(0)
    model = build_model(name, classes).train()
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    y = torch.randint(0, classes, (batch,))
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def test_model_table(benchmark):
    steps = int(os.environ.get("IPASDCTL_BENCH_STEPS", "3"))

    def measure():
        rows = []
        for name in MODELS.names():
            row = model_row(name)
            rows.append({"model": name, "input": f"{row['input_size']}x{row['input_size']}",
                         "classes": row["num_classes"], "params_M": row["params"] / 1e6, "MACs_M": row["macs"] / 1e6,
                         "nchw_fp32_img_s": training_rate(name, steps, channels_last=False),
                         "cl_fp32_img_s": training_rate(name, steps),
                         "cl_bf16_img_s": training_rate(name, steps, bf16=True)})
        return rows

    rows = benchmark.pedantic(measure, rounds=1, iterations=1)
    report(f"models on CPU ({torch.get_num_threads()} threads)", rows)
