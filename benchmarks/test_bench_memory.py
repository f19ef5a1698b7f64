"""Target 3: IPASD's per-sample memories cost <= 2 bytes per sample and class (float16; uint8 halves it),
with the accuracy effect measured on a short CIFAR-10 run (float32 vs float16 vs uint8 memories).

    IPASDCTL_CIFAR=../shared/data .venv/bin/python -m pytest benchmarks/test_bench_memory.py --benchmark-only -s
"""

import json
import os

import pytest
from conftest import report

from ipasdctl.config import load_recipe
from ipasdctl.training import Progress, train
from benchmarks.support import memory_table_bytes

IMAGENET = (1_281_167, 1_000)


def test_memory_table_sizes(benchmark):
    rows = benchmark.pedantic(lambda: [memory_table_bytes(*IMAGENET, dtype) for dtype in ("float32", "float16", "uint8")],
                              rounds=1, iterations=1)
    for row in rows:
        row["imagenet_total_GiB"] = row.pop("total_bytes") / 2**30
    report("IPASD memories (2 tables) at ImageNet scale, N=1,281,167, K=1,000", rows)
    assert rows[1]["bytes_per_sample_and_class_per_table"] == 2


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
def test_memory_dtype_accuracy(benchmark, cifar_root, tmp_path, dtype):
    if not cifar_root:
        pytest.skip("set IPASDCTL_CIFAR to the folder holding cifar-10-batches-py/ for the accuracy effect")
    epochs = int(os.environ.get("IPASDCTL_BENCH_EPOCHS", "15"))
    recipe = load_recipe("cifar10_resnet8_cpu", {"data": {"root": cifar_root, "train_subset": 5000},
                                                 "train": {"epochs": epochs},
                                                 "method": {"name": "ipasd", "memory_dtype": dtype}})
    run_dir = benchmark.pedantic(lambda: train(recipe, tmp_path, progress=Progress(enabled=False)), rounds=1, iterations=1)
    summary = json.loads((run_dir / "summary.json").read_text())
    report(f"IPASD with {dtype} memories, CIFAR-10 5k subset, {epochs} epochs",
           [{"dtype": dtype, "best_top1": summary["best_top1"], "last_top1": summary["last_top1"]}])
    benchmark.extra_info.update({"best_top1": summary["best_top1"], "last_top1": summary["last_top1"]})
