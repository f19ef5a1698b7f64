"""One short GPU check (< 5 minutes on one GPU): images/s of ce and ipasd training steps with the PreAct
ResNet-18 on CIFAR-10-shaped data (real CIFAR-10 with --data, else synthetic), bf16 autocast and channels-last,
and the overhead ratio; then a 2-epoch `train` on a subset to exercise the whole GPU path (AMP, channels-last,
device-resident data, evaluation, checkpoints)."""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from ipasdctl.config import load_recipe
from ipasdctl.training import Progress, train
from benchmarks.support import overhead_ratios, quick_recipe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=None, help="folder holding cifar-10-batches-py/ (default: synthetic)")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--precision", default="bf16")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "gpu_check needs a CUDA device"
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    dataset = "cifar10" if args.data else "synthetic"

    def factory(method: str):
        return quick_recipe(method, arch="preact_resnet18", dataset=dataset, root=args.data, batch_size=128,
                            device="cuda", train_subset=None, precision=args.precision)

    started = time.time()
    results = overhead_ratios(["ipasd"], reps=args.reps, warmup=10, recipe_factory=factory)
    for name, r in results.items():
        print(f"{name:6s} step {r['median_s'] * 1e3:7.2f} ms  {r['images_per_second']:8.0f} img/s  "
              f"ratio to ce {r['ratio']:.4f}", flush=True)
    print(f"overhead ratio ipasd/ce: {results['ipasd']['ratio']:.4f}  ({time.time() - started:.0f} s)", flush=True)

    recipe = load_recipe("cifar10_resnet18_ipasd", {"data": {"name": dataset, "root": args.data, "train_subset": 10000},
                                                     "train": {"epochs": 2, "precision": args.precision},
                                                     "optim": {"warmup_epochs": 1}})
    with tempfile.TemporaryDirectory() as out:
        started = time.time()
        run_dir = train(recipe, out, progress=Progress(enabled=True))
        summary = json.loads((run_dir / "summary.json").read_text())
        print(f"2-epoch train: {time.time() - started:.0f} s, {summary['images_per_second']:.0f} img/s, "
              f"last top-1 {summary['last_top1']:.2f}%, precision {summary['precision']}", flush=True)


if __name__ == "__main__":
    main()
