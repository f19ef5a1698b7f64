"""`ipasdctl prune RUN`: from a finished run folder to a smaller one (`<run>-pruned-50`, beside it).

    1. check the settings and the source (finished, prunable), plan the steps: the MACs each reaches, the
       first step's pruning done at once; an unreachable target is one line and nothing is written
    2. create the pruned run folder, pruning.json (the settings a rerun compares; each step's outcome)
    3. each step k of K: prune the previous network (the source's checkpoint, then step k-1's) to its share
       of the MACs (linear: 1 - (1 - F) k / K of the source's) or, at the last step of a latency target, to
       the latency by measuring; check the recorded shapes rebuild it exactly; write pruned.safetensors; train
       the recovery (compress/recovery.py) into steps/<k>/, the last step into the pruned folder itself
    4. pruning.json says finished

The pruned folder is an ordinary run folder: eval, calibrate, export, bench, predict and report read it as
any other, and `train --resume` resumes its recovery. A rerun with the same settings (`reuse`, what a chain
does) returns a finished pruned run; an unfinished one is always taken up where it stopped: a step that has a
checkpoint resumes exactly, a step without one is pruned again. A new run that fails before its first
checkpoint leaves no folder behind.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from .. import training
from ..data import RandomBatches, build_data
from ..errors import Interrupted, UserError
from ..models import build_model, count_macs, count_params
from ..models.structure import describe_structure
from ..models.weights import write_safetensors
from ..runs import RunFolder, check_out_folder, check_run_name, create_run_dir, load_model, pruned_suffix, read_json
from ..safe_io import atomic_write_json, sha256_of
from .latency import batch1_latency_ms
from .pruning import TAYLOR_BATCHES, accumulate_taylor_gradients, check_prunable, prune_to_latency, prune_to_macs
from .recovery import PruneSettings, recovery_recipe

PRUNING_FORMAT = "ipasdctl-pruning-1"


class Source:
    """The run being pruned: its network (CPU, eval mode), checkpoint state, recipe and what they say."""

    def __init__(self, run_dir: Path, settings: PruneSettings):
        folder = RunFolder(run_dir).check()
        summary = folder.read_summary()
        if summary is None or not summary.finished:
            raise UserError(f"{folder.path} is not a finished run (no finished summary.json); let it finish "
                            f"(ipasdctl train --resume {folder.path}) before pruning it")
        self.path = folder.path.resolve()
        self.model, self.state, self.recipe = load_model(self.path, settings.checkpoint, "cpu")
        self.arch = self.state.get("arch") or self.recipe.model.arch
        self.num_classes = int(self.state["num_classes"])
        stats = self.state.get("data_stats") or {}
        self.image_shape = tuple(int(v) for v in stats.get("image_shape") or (3, 32, 32))
        self.preprocessing = {"mean": stats.get("mean"), "std": stats.get("std"), "input_size": self.image_shape[-1]}
        self.sha256 = sha256_of(folder.checkpoint(settings.checkpoint))
        self.macs = count_macs(self.model, self.image_shape, "cpu")
        self.taylor_batches: Optional[list] = None  # the training batches of taylor's gradients, read once
        check_prunable(self.model, self.arch)

    def measure(self, model: torch.nn.Module) -> float:
        """The batch-1 latency (ms) of `model` on an image of the source's shape (compress/latency.py)."""
        return batch1_latency_ms(model, self.image_shape)

    def default_name(self, settings: PruneSettings) -> str:
        return self.path.name + pruned_suffix(settings.pruning_record(self.path, 1))


def prune_run(run_dir: Path, settings: PruneSettings, out: Optional[Path] = None, name: Optional[str] = None,
              reuse: bool = False, progress: Optional[training.Progress] = None) -> Path:
    """Prune a finished run and recover it (see the module docstring); returns the pruned run folder."""
    progress = progress or training.Progress(enabled=False)
    settings.check()
    source = Source(Path(run_dir), settings)
    name = check_run_name(name) if name is not None else source.default_name(settings)
    out = Path(out) if out is not None else source.path.parent
    record = {"format": PRUNING_FORMAT, "source": str(source.path), "source_sha256": source.sha256,
              "settings": settings.to_dict()}
    # every recipe check before anything is pruned or written (an unknown --set key, a method's parameter)
    recovery_recipe(source.recipe, source.path, settings, None, RunFolder(out / name).pruned_weights, 1)
    found = _same_prune(RunFolder(out / name), record)
    if found is not None and found.get("finished") and reuse:
        progress.note(f"{out / name}: pruned with these settings, reused")
        return out / name
    created = found is None or found.get("finished")
    if created:
        check_out_folder(out)  # before the (slow) pruning: fail fast
        plan, first = _plan(source, settings, progress)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create output folder {out}: {exc.strerror}; choose a writable --out") from None
        folder = RunFolder(create_run_dir(out, name))
        record.update(plan, steps=[], finished=False)
        atomic_write_json(folder.pruning, record)
    else:
        folder, first = RunFolder(out / name), None
        record = found
        progress.note(f"{folder.path}: pruned with these settings but unfinished; continuing it")
    lock = folder.prune_lock()
    lock.acquire()
    try:
        _run_steps(source, settings, folder, record, first, progress)
        record["finished"] = True
        atomic_write_json(folder.pruning, record)
    except BaseException as exc:
        if created and not isinstance(exc, Interrupted) and not _has_checkpoint(folder, settings.steps):
            lock.release()
            shutil.rmtree(folder.path, ignore_errors=True)  # nothing of it is worth keeping
        raise
    finally:
        lock.release()
    return folder.path


def _same_prune(folder: RunFolder, record: dict) -> Optional[dict]:
    """The folder's pruning.json when it records these settings of this source (and its checkpoint), else None."""
    written = read_json(folder.pruning)
    if isinstance(written, dict) and isinstance(written.get("settings"), dict):  # settings added since: defaults
        written = {**written, "settings": {"round_to": 1, **written["settings"]}}
    if written is None or any(written.get(key) != value for key, value in record.items()):
        return None
    return written


def _has_checkpoint(folder: RunFolder, steps: int) -> bool:
    steps_folders = [folder.prune_step(k) for k in range(1, steps)] + [folder]
    return any(step.last.is_file() for step in steps_folders)


def _plan(source: Source, settings: PruneSettings, progress) -> tuple[dict, Optional[tuple]]:
    """({"source_macs", "source_latency_ms", "macs_fractions"}: each step's share of the source's MACs, None for
    a last step that prunes to the latency; the first step's pruning when it is already done, else None).
    An unreachable target is a UserError here, before anything is written."""
    k = settings.steps
    gradients(source.model, source, settings)
    if settings.target_macs is not None:
        fractions = [1 - (1 - settings.target_macs) * step / k for step in range(1, k + 1)]
        if k == 1:
            model, ratio = prune_to_macs(source.model, int(fractions[0] * source.macs), settings.importance,
                                         source.image_shape, source.arch, settings.round_to)
            return {"source_macs": source.macs, "source_latency_ms": None, "macs_fractions": fractions}, (model, ratio, None)
        # the last step's target must be reachable from the source (a UserError here, before anything is written)
        prune_to_macs(source.model, int(settings.target_macs * source.macs), settings.importance, source.image_shape,
                      source.arch, settings.round_to)
        return {"source_macs": source.macs, "source_latency_ms": None, "macs_fractions": fractions}, None
    target = settings.target_latency_ms
    measured = source.measure(source.model)
    if measured <= target:
        raise UserError(f"{source.path} already runs in {measured:.3f} ms at batch 1 on this CPU, within "
                        f"--target-latency-ms {target:g}: nothing to prune; give a lower target")
    model, ratio, latency = prune_to_latency(source.model, target, settings.importance, source.image_shape,
                                             source.arch, source.measure, progress.note, settings.round_to)
    reached = count_macs(model, source.image_shape, "cpu") / source.macs
    fractions = [1 - (1 - reached) * step / k for step in range(1, k)] + [None]
    plan = {"source_macs": source.macs, "source_latency_ms": measured, "macs_fractions": fractions}
    return plan, ((model, ratio, latency) if k == 1 else None)


def gradients(model: torch.nn.Module, source: Source, settings: PruneSettings) -> None:
    """taylor: the cross-entropy's gradients on TAYLOR_BATCHES training batches (normalised as the source was
    trained, not augmented) summed into `model`'s .grad; nothing for the other importances."""
    if settings.importance != "taylor":
        return
    if source.taylor_batches is None:
        source.taylor_batches = _training_batches(source, settings)
    accumulate_taylor_gradients(model, source.taylor_batches)


def _training_batches(source: Source, settings: PruneSettings) -> list[tuple[torch.Tensor, torch.Tensor]]:
    config = source.recipe.data
    data = build_data(replace(config, root=str(settings.data)) if settings.data is not None else config)
    stats = source.state.get("data_stats") or {}
    if stats.get("mean") and stats.get("std") and len(stats["mean"]) == data.image_shape[0]:
        data = replace(data, mean=list(stats["mean"]), std=list(stats["std"]))
    seed = source.recipe.train.seed
    plan = RandomBatches(data.train_labels, min(source.recipe.train.batch_size, data.num_train), seed)
    loader = data.train_loader(plan, seed, torch.device("cpu"), False, False)
    batches = []
    for batch in loader.epoch(0):
        batches.append((batch.images.float(), batch.labels))
        if len(batches) == TAYLOR_BATCHES:
            break
    return batches


def _run_steps(source: Source, settings: PruneSettings, folder: RunFolder, record: dict, first, progress) -> None:
    previous = source.model
    for step in range(1, settings.steps + 1):
        here = folder if step == settings.steps else folder.prune_step(step)
        state = here.state()
        if state == "resumable":
            training.resume(here.path, None, progress)
        elif state != "finished":
            if here.config.exists() or here.pruned_weights.exists():  # a step killed before its first checkpoint
                here.remove_partial(created=False)
                here.pruned_weights.unlink(missing_ok=True)
            pruned, outcome = _prune_step(source, settings, previous, record, step, first if step == 1 else None,
                                          progress)
            structure = rebuilt_structure(pruned, source)
            here.path.mkdir(parents=True, exist_ok=True)
            write_safetensors(here.pruned_weights, pruned.state_dict(), source.preprocessing)
            record["steps"] = [s for s in record.get("steps", []) if s.get("step") != step] + [
                {**outcome, "run_dir": str(here.path)}]
            atomic_write_json(folder.pruning, record)
            recipe = recovery_recipe(source.recipe, source.path, settings, structure, here.pruned_weights.resolve(),
                                     step)
            training.train_into(recipe, here.path, progress)
        if step < settings.steps:
            previous = load_model(here.path, settings.checkpoint, "cpu")[0]


def _prune_step(source: Source, settings: PruneSettings, model: torch.nn.Module, record: dict, step: int, done,
                progress) -> tuple[torch.nn.Module, dict]:
    """(the network of step `step` pruned, what it reached): `done` when the plan pruned it already."""
    fraction = record["macs_fractions"][step - 1]
    if done is not None:
        pruned, ratio, latency = done
    else:
        gradients(model, source, settings)
        if fraction is None:
            pruned, ratio, latency = prune_to_latency(model, settings.target_latency_ms, settings.importance,
                                                      source.image_shape, source.arch, source.measure, progress.note,
                                                      settings.round_to)
        else:
            pruned, ratio = prune_to_macs(model, int(fraction * source.macs), settings.importance, source.image_shape,
                                          source.arch, settings.round_to)
            latency = None
    pruned.zero_grad(set_to_none=True)
    macs = count_macs(pruned, source.image_shape, "cpu")
    outcome = {"step": step, "ratio": ratio, "macs": macs, "macs_fraction": macs / source.macs,
               "target_macs_fraction": fraction, "params": count_params(pruned), "latency_ms": latency}
    progress.note(f"prune step {step}/{settings.steps}: {ratio:.1%} of the channels removed, "
                  f"{macs:,} MACs ({macs / source.macs:.1%} of {source.macs:,}), {count_params(pruned):,} parameters"
                  + (f", {latency:.3f} ms at batch 1" if latency is not None else ""))
    return pruned, outcome


def rebuilt_structure(pruned: torch.nn.Module, source: Source) -> dict:
    """The pruned shapes as data, once the architecture built from them (with the pruned weights) computes what
    the pruned network does, layer by layer; a UserError naming the first layer that differs."""
    structure = describe_structure(pruned, build_model(source.arch, source.num_classes))
    rebuilt = build_model(source.arch, source.num_classes, structure)
    rebuilt.load_state_dict(pruned.state_dict())
    rebuilt.eval()
    images = torch.randn(2, *source.image_shape, generator=torch.Generator().manual_seed(0))
    outputs = []
    for network in (pruned, rebuilt):
        seen: list[tuple[str, torch.Tensor]] = []
        hooks = [module.register_forward_hook(lambda m, i, o, name=name: seen.append((name, o)))
                 for name, module in network.named_modules() if name]
        try:
            with torch.no_grad():
                network(images)
        finally:
            for hook in hooks:
                hook.remove()
        outputs.append(seen)
    for (name, mine), (_, theirs) in zip(*outputs):
        if isinstance(mine, torch.Tensor) and (mine.shape != theirs.shape or not torch.allclose(mine, theirs, atol=1e-5)):
            raise UserError(f"{source.arch} cannot be pruned safely: layer '{name}' of the network rebuilt from the "
                            "pruned shapes computes something else than the pruned network (it keeps a channel "
                            "count of its own); this architecture cannot be pruned")
    return structure
