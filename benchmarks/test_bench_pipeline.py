"""Target 2: images per second of a full CIFAR-10 training epoch (resnet8, ce, CPU) with ipasdctl's
device-resident uint8 pipeline vs the common torchvision+PIL DataLoader (2 workers) feeding the same model
and loop. Goal: >= 1.5x on 2 CPU cores.

    IPASDCTL_CIFAR=../shared/data .venv/bin/python -m pytest benchmarks/test_bench_pipeline.py --benchmark-only -s
"""

import os

from conftest import report

from ipasdctl.perf import pipeline_epoch_rates, quick_recipe


def test_pipeline_against_torchvision_pil_dataloader(benchmark, cifar_root):
    dataset = "cifar10" if cifar_root else "synthetic"
    subset = int(os.environ.get("IPASDCTL_BENCH_SUBSET", "0")) or None
    recipe = quick_recipe("ce", dataset=dataset, root=cifar_root, train_subset=subset)
    result = benchmark.pedantic(lambda: pipeline_epoch_rates(recipe, workers=2, epochs=1), rounds=1, iterations=1)
    report(f"full training epoch on {dataset} ({result['images']} images), resnet8, ce, CPU", [result])
    benchmark.extra_info.update(result)
