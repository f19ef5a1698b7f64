"""The fuzz driver of test_fuzz.py: mutated recipes (nasty values, deep nesting, duplicate keys),
checkpoints (nasty values, damaged bytes, zip records that inflate far beyond the file), ONNX metadata, CIFAR
pickles, and CSV tables with formula cells, fed to the loaders (and the CSV writer) under an address-space
and CPU-time limit. Run as a script (a process of its own, so the limits bind only it):
`python fuzz_loaders.py SEED CASES_PER_KIND WORKDIR`; prints one JSON line per failure (an exception other
than UserError, a message of several lines, a formula cell written, or a case slower than CASE_SECONDS),
then a JSON summary line.
"""

from __future__ import annotations

import json
import pickle
import random
import resource
import sys
import time
import traceback
import zipfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ipasdctl.config import Recipe, load_recipe
from ipasdctl.data.cifar import load_cifar10
from ipasdctl.deploy.onnx_files import read_metadata
from ipasdctl.errors import UserError
from ipasdctl.models import build_model
from ipasdctl.runs import load_model
from ipasdctl.safe_io import save_checkpoint
from ipasdctl.training.checks import check_labels
from ipasdctl.training.resolve import resolve_recipe

MEMORY_HEADROOM = 2 << 30  # bytes of address space beyond what the imports took
CPU_SECONDS = 120
CASE_SECONDS = 5.0

NASTY_SCALARS = [".nan", ".inf", "-.inf", "2e400", str(2**70), str(-2**70), "-1", "0", "1.5", "~", "true", "''",
                 "[1, [2, [3]]]", "{a: 1}", "'x'", "[]", "{}", "0x7fffffffffffffffff", "1e-320", "!!binary aGVsbG8=",
                 "&a [*a]", "[&b [x, x, x], [*b, *b, *b], [*b, *b, *b]]"]
NASTY_VALUES = [None, "x", 1.5, -1, 0, 2**70, -2**70, True, [], {}, [1, [2]], float("nan"), float("inf"),
                torch.zeros(1), torch.full((3,), float("nan")), "\x00", b"bytes", (1, 2)]


def limit_resources() -> None:
    with open("/proc/self/status") as status:
        vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY_HEADROOM, vm + MEMORY_HEADROOM))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))


# ------------------------------------------------------------------------------------------------ recipes


BASE_RECIPE = """name: fuzz
data: {name: cifar10, root: /nowhere, train_subset: 32, augment: true, num_workers: 2, image_size: 32, val_fraction: 0.2}
model: {arch: resnet8}
method: {name: ipasd, w_div: 0.8, w_con: 0.01, tau: 0.3}
optim: {lr: 0.1, momentum: 0.9, weight_decay: 0.0005, milestones: [100, 150], gamma: 0.1, schedule: cosine}
train: {epochs: 3, batch_size: 16, seed: 1, device: cpu, precision: fp32}
checkpoint: {every_steps: 2}
"""


def nested(rng: random.Random) -> str:
    """Lists or mappings nested from a few levels to far beyond the YAML reader's bound."""
    depth = rng.choice([3, 20, 40, 1000, 50_000])
    return "[" * depth + "]" * depth if rng.random() < 0.5 else "{a: " * depth + "1" + "}" * depth


def mutated_recipe(rng: random.Random) -> bytes:
    lines = BASE_RECIPE.splitlines()
    kind = rng.randrange(9)
    if kind == 7:  # nesting: a value replaced by deeply nested lists or mappings
        i = rng.randrange(len(lines))
        return "\n".join(lines[:i] + [f"{lines[i].partition(': ')[0]}: {nested(rng)}"] + lines[i + 1:]).encode()
    if kind == 8:  # a duplicate key: a section given twice, or a key twice inside a section
        i = rng.randrange(len(lines))
        head, _, rest = lines[i].partition(": ")
        if rest.startswith("{") and rng.random() < 0.5:
            first = rest.strip("{}").split(", ")[0]
            lines[i] = f"{head}: {{{first}, {rest[1:]}"
            return "\n".join(lines).encode()
        return "\n".join(lines + [lines[i]]).encode()
    if kind <= 3:  # a value replaced by a nasty one
        i = rng.randrange(len(lines))
        head, _, rest = lines[i].partition(": ")
        entries = rest.strip("{}").split(", ") if rest.startswith("{") else [rest]
        j = rng.randrange(len(entries))
        key = entries[j].split(": ")[0]
        entries[j] = f"{key}: {rng.choice(NASTY_SCALARS)}" if ": " in entries[j] else rng.choice(NASTY_SCALARS)
        lines[i] = f"{head}: {{{', '.join(entries)}}}" if rest.startswith("{") else f"{head}: {entries[0]}"
        return "\n".join(lines).encode()
    text = "\n".join(lines).encode()
    if kind == 4:  # random bytes written over the text
        data = bytearray(text)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 5:  # cut short, or a line doubled
        return text[:rng.randrange(len(text))] if rng.random() < 0.5 else text + b"\n" + rng.choice(lines).encode()
    section = rng.choice(["data", "model", "method", "optim", "train", "checkpoint", "name"])  # a whole section
    lines = [f"{section}: {rng.choice(NASTY_SCALARS)}" if line.startswith(f"{section}:") else line for line in lines]
    return "\n".join(lines).encode()  # replaced in place: given again, it would be a duplicate key (kind 8)


def recipe_case(rng: random.Random, work: Path):
    path = work / "recipe.yaml"
    path.write_bytes(mutated_recipe(rng))
    return lambda: resolve_recipe(load_recipe(str(path)))


# ------------------------------------------------------------------------------------------------ checkpoints


def base_state() -> dict:
    recipe = Recipe()
    recipe.model.arch = "resnet8"
    recipe = resolve_recipe(recipe)
    return {"format": "ipasdctl-checkpoint-1", "config": recipe.to_dict(),
            "model": build_model("resnet8", 10).state_dict(), "epoch": 1, "num_classes": 10,
            "class_names": [f"c{i}" for i in range(10)], "arch": "resnet8", "best": {"top1": 1.0, "epoch": 1}}


def mutate(value, rng: random.Random):
    """The nested value with one entry (at a random depth) replaced by a nasty value or removed."""
    if isinstance(value, dict) and value and rng.random() < 0.7:
        key = rng.choice(list(value))
        value = dict(value)
        if rng.random() < 0.2:
            del value[key]
        else:
            value[key] = mutate(value[key], rng)
        return value
    if isinstance(value, torch.Tensor) and rng.random() < 0.5:
        return rng.choice([torch.zeros(value.numel() + 1), torch.full_like(value, float("nan")) if
                           value.is_floating_point() else value.double(), value.reshape(-1)])
    return rng.choice(NASTY_VALUES)


def inflate_record(path: Path, extra_bytes: int) -> None:
    """Rewrite the checkpoint at `path` with its largest record deflated and `extra_bytes` zeros added to it:
    a file of a few kB per MB of zeros that torch would inflate whole before noticing the size is wrong."""
    with zipfile.ZipFile(path) as source:
        records = [(info.filename, source.read(info.filename)) for info in source.infolist()]
    largest = max(range(len(records)), key=lambda i: len(records[i][1]))
    with zipfile.ZipFile(path, "w") as out:
        for i, (name, data) in enumerate(records):
            if i != largest:
                out.writestr(name, data)
                continue
            entry = zipfile.ZipInfo(name)
            entry.compress_type = zipfile.ZIP_DEFLATED
            with out.open(entry, "w", force_zip64=True) as handle:
                handle.write(data)
                zeros = bytes(1 << 20)
                for _ in range(extra_bytes >> 20):
                    handle.write(zeros)


def checkpoint_case(rng: random.Random, work: Path, state: dict):
    run = work / "run"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text("name: fuzz\n")
    path = run / "checkpoints" / "best.pt"
    save_checkpoint(path, mutate(state, rng))
    if rng.random() < 0.15:  # a zip bomb: a record that inflates far beyond the file's size
        inflate_record(path, rng.choice([1 << 20, 4 << 20, 16 << 20]))
    elif rng.random() < 0.25:  # the file's bytes damaged too
        data = bytearray(path.read_bytes())
        if rng.random() < 0.5:
            del data[rng.randrange(len(data)):]
        else:
            for _ in range(rng.randint(1, 16)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
    return lambda: load_model(run, "best")


# ------------------------------------------------------------------------------------------------ ONNX metadata


def tiny_onnx_model():
    """A small valid ONNX model: the global average pool of 3 x 8 x 8 images, no metadata yet."""
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def onnx_case(rng: random.Random, work: Path):
    model = tiny_onnx_model()
    keys = ["input_size", "data_image_size", "num_classes", "class_names", "mean", "std", "dataset", "checkpoint",
            "test_top1", "epoch", "precision", "source_run"]
    values = ["[3, 8, 8]", "[3, 100000, 100000]", "[3, 1e5, 1e5]", "[3, 8]", "[true, 8, 8]", "[3, -8, 8]", "nan",
              "NaN", "Infinity", "1e999", str(2**70), "[[[[[[[]]]]]]]", "{\"a\": 1}", "null", "\"str\"", "x" * 5000,
              "32", "-1", "[\"a\", 1]", "[0.5, 0.5, 0.5]", "digits", "[" * 5000 + "]" * 5000]
    for key in rng.sample(keys, rng.randint(1, 4)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, rng.choice(values)
    path = work / "m.onnx"
    onnx.save(model, str(path))
    return lambda: read_metadata(path)


# ------------------------------------------------------------------------------------------------ CIFAR pickles


def cifar_case(rng: random.Random, root: Path, originals: dict):
    folder = root / "cifar-10-batches-py"
    for name, data in originals.items():  # the previous case's damage undone
        (folder / name).write_bytes(data)
    name = rng.choice(sorted(originals))
    batch = pickle.loads(originals[name], encoding="latin1")
    kind = rng.randrange(3)
    if kind == 0:
        key = rng.choice(list(batch))
        batch[key] = rng.choice([None, "text", 3, -5, [2**70] * 8, [1.5] * 8, [[1, 2]] * 8, [-1] * 8, [10**6] * 8,
                                 np.zeros((8, 3072), np.float32), np.zeros((8, 100), np.uint8),
                                 np.zeros((2, 2, 2), np.uint8), ["a"] * 10, {b"x": 1}, b"\xff" * 10])
        raw = pickle.dumps(batch, protocol=2)
    elif kind == 1:
        raw = bytearray(originals[name])
        for _ in range(rng.randint(1, 32)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        raw = bytes(raw)
    else:
        raw = originals[name][:rng.randrange(len(originals[name]))]
    (folder / name).write_bytes(raw)

    def load():
        data = load_cifar10(str(root))
        check_labels(data, "cifar10")
    return load


# ------------------------------------------------------------------------------------------------ CSV cells


FORMULA_CELLS = ["=cmd|' /C calc'!A0", "@SUM(1+1)", "=1+2", "+1", "-x", "\tx", "\rx", "=HYPERLINK(\"http://x\")",
                 "-2+3", "+=", "@", "=", "'=ok", "a=b", "-1", "-0.5", "\u2212x"]
CSV_VALUES = FORMULA_CELLS + [None, "", "x", 1.5, -1.5, 0, -7, float("nan"), float("-inf"), True, "a,b", 'q"q', "\n"]


def formula_cells(path: Path) -> list[str]:
    """The cells of a written CSV that a spreadsheet would run as a formula (text, not a plain number)."""
    import csv

    def number(cell: str) -> bool:
        try:
            float(cell)
            return True
        except ValueError:
            return False

    with open(path, newline="") as handle:
        return [cell for row in csv.reader(handle) for cell in row
                if cell.startswith(("=", "+", "-", "@", "\t", "\r")) and not number(cell)]


def csv_case(rng: random.Random, work: Path):
    """A latency table with formula cells (and nasty values) written by the writer every CSV goes through,
    then read back by bench's reader: no formula cell may survive the writing; a table lacking columns is a
    one-line refusal of the reader."""
    import pandas as pd

    from ipasdctl.deploy.bench import read_latency_csv
    from ipasdctl.safe_io import csv_text
    from ipasdctl.runs import write_metrics_csv

    columns = rng.sample(["model", "backend", "provider", "batch_size", "p50_ms", "=x", "@y", "z"], rng.randint(1, 8))
    rows = [{c: rng.choice(CSV_VALUES) for c in columns} for _ in range(rng.randint(1, 6))]
    path = work / "latency.csv"
    if rng.random() < 0.5:
        path.write_text(csv_text(pd.DataFrame(rows, columns=columns)))
    else:
        write_metrics_csv(path, rows)

    def load():
        left = formula_cells(path)
        if left:
            raise AssertionError(f"formula cells written: {left[:3]}")
        read_latency_csv(path)
    return load


# ------------------------------------------------------------------------------------------------ the run


def write_cifar(root: Path, rng: np.random.Generator) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    files = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, 8).tolist()
        batch = {b"labels": labels, b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                 b"batch_label": name.encode(), b"filenames": [b"f%d.png" % i for i in range(8)]}
        files[name] = pickle.dumps(batch, protocol=2)
    files["batches.meta"] = pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}, protocol=2)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def run(seed: int, per_kind: int, work: Path) -> dict:
    rng = random.Random(seed)
    state = base_state()
    originals = write_cifar(work / "cifar", np.random.default_rng(seed))
    limit_resources()
    makers = {"recipe": lambda: recipe_case(rng, work),
              "checkpoint": lambda: checkpoint_case(rng, work, state),
              "onnx": lambda: onnx_case(rng, work),
              "cifar": lambda: cifar_case(rng, work / "cifar", originals),
              "csv": lambda: csv_case(rng, work)}
    counts = {kind: {"ok": 0, "user_error": 0, "failed": 0} for kind in makers}
    for kind, make in makers.items():
        for case in range(per_kind):
            load = make()
            started = time.monotonic()
            outcome, detail = "ok", ""
            try:
                load()
            except UserError as exc:
                outcome = "user_error"
                if "\n" in str(exc) or len(str(exc)) > 2000:
                    outcome, detail = "failed", f"UserError of {len(str(exc))} characters over several lines"
            except BaseException as exc:  # anything else is the bug this test looks for (MemoryError too)
                outcome, detail = "failed", "".join(traceback.format_exception_only(type(exc), exc)).strip()[-500:]
            seconds = time.monotonic() - started
            if seconds > CASE_SECONDS:
                outcome, detail = "failed", f"took {seconds:.1f} s"
            counts[kind][outcome] += 1
            if outcome == "failed":
                print(json.dumps({"kind": kind, "case": case, "detail": detail}), flush=True)
    return counts


if __name__ == "__main__":
    seed, per_kind, workdir = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    print(json.dumps({"summary": run(seed, per_kind, workdir)}), flush=True)
