"""The training loop: device, precision, schedule, metrics, checkpoints and resume. Knows no method by name.

Everything random is a function of the seed, the epoch and the step, and the checkpoint carries the optimizer,
the method's state, the epoch's running sums and every RNG, so a resumed run continues exactly where it
stopped: on CPU a run killed mid-epoch and resumed ends with the same metrics and bitwise the same weights
(tests/training/test_resume.py). On CUDA the data order, RNG streams and state are just as exact, but cuDNN autotuning
and atomic-add kernels (index_add_, scatter, conv backward) may round differently from run to run, so metrics
agree to float noise unless `train.deterministic` is set.

Checkpoints (runs/ names the files): last.pt at every epoch end and, with checkpoint.every_steps=N, every N
steps, so a kill loses at most N steps; best.pt at the epoch with the best top-1 on the validation split when
the recipe holds one out (data.val_split), else on the test set (optimistic; summary.json says which). The
test top-1 stays the reported number either way. Stops (signals, non-finite loss) are in stopping.py.

Several processes (torchrun, DistributedDataParallel; the choices are argued in distributed.py): the
recipe's batch size is the global batch, each rank trains on its share; rank 0 creates the run folder (its
name is broadcast), holds the lock and writes every file; a checkpoint holds full memories and global sums,
so any number of processes resumes it; the ranks agree on stopping (signals, non-finite loss) at the same
steps: every step on CPU, every FINITE_CHECK_STEPS steps on CUDA.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import runtime
from ..bounds import whole
from ..config import ResolvedRecipe
from ..data import RandomBatches, build_data, describe_splits
from ..errors import UserError, one_line
from ..methods import Method, MethodContext, TrainingNet, build_method
from ..models import build_model, count_macs, count_params
from ..runs import CHECKPOINT_FORMAT, BestEpoch, Checkpoint, DataStats, RunFolder, RunSummary
from . import distributed, finetune
from .summary import run_summary
from .checks import check_folder_still_there, check_labels
from .meters import EpochMeter, test_metrics
from .progress import Progress
from .schedule import lr_at
from .stopping import FINITE_CHECK_STEPS, StopControl, anomaly_detection
from .tracking import NoTracker, open_tracker


class Trainer:
    def __init__(self, recipe: ResolvedRecipe, run_dir: Optional[Path] = None, progress: Optional[Progress] = None):
        if not isinstance(recipe, ResolvedRecipe):  # a plain Recipe would train on unchecked values
            raise TypeError("Trainer takes a ResolvedRecipe: pass training.resolve_recipe(recipe)")
        self.recipe = recipe
        self.progress = progress or Progress()
        t = recipe.train
        distributed.init_process_group(distributed.context_from_env())  # a no-op unless under torchrun
        self.dist = distributed.current()
        if self.dist.enabled and t.batch_size < self.dist.world_size:
            raise UserError(f"batch size {t.batch_size} is smaller than the number of processes "
                            f"({self.dist.world_size}): it is the global batch, shared out among them; "
                            f"use --batch-size {self.dist.world_size} or more")
        if not self.dist.is_main:
            self.progress = Progress(enabled=False)  # rank 0 reports for all
        self.device = distributed.device_for_rank(runtime.resolve_device(t.device), self.dist)
        if t.sync_bn and self.device.type != "cuda":
            raise UserError(distributed.SYNC_BN_NEEDS_CUDA)
        self.dtype = runtime.resolve_precision(t.precision, self.device)
        self.channels_last = bool(t.channels_last)  # CPU too: oneDNN trains every model here 1.02-1.58x faster in NHWC
        runtime.seed_everything(t.seed)
        runtime.configure_determinism(self.device, bool(t.deterministic))
        finetune.check_freezing(recipe, self.dist.enabled)
        weights = finetune.read_initial_weights(recipe)  # first: their preprocessing is the data's default
        self.data = finetune.with_weights_preprocessing(build_data(finetune.data_config_for(recipe.data, weights)),
                                                        weights)
        check_labels(self.data, recipe.data.name)
        if t.batch_size > self.data.num_train:
            raise UserError(f"batch size {t.batch_size} is larger than the training set ({self.data.num_train} images); "
                            "lower --batch-size or use more data")
        model = build_model(recipe.model.arch, self.data.num_classes, recipe.model.structure)  # pruned: its shapes
        self.weights = finetune.fit_initial_weights(model, weights, recipe.model.arch, self.progress.note)
        self.model = self._on_device(model)
        # per-sample memories, prototypes, stored logits reach the other ranks through these (identity on one)
        self.collectives = distributed.collectives_for(self.dist)
        self.method: Method = build_method(recipe.method, self._method_context())
        extra = self.method.extra_module()
        self.net = TrainingNet(self.model, self._on_device(extra) if extra is not None else None)
        if t.sync_bn and self.dist.enabled:  # in place: self.model's BatchNorm layers are replaced too
            self.net = nn.SyncBatchNorm.convert_sync_batchnorm(self.net)
        self._build_batches()
        # how often (steps) the ranks agree on stopping: every step costs nothing on CPU, but on CUDA each
        # agreement is a host read, so it waits for FINITE_CHECK_STEPS as the non-finite check does
        self.agree_every = FINITE_CHECK_STEPS if self.device.type == "cuda" else 1
        self._build_optimizer()
        self.params = count_params(self.model)
        self.macs = count_macs(self.model, self.data.image_shape, self.device)
        self.stops = StopControl(self.dist, self.device)
        self.folder: Optional[RunFolder] = RunFolder(run_dir) if run_dir is not None else None

        # progress of the run (all of it restored on resume)
        self.epoch = 0  # the epoch in progress (or next to start)
        self.step_in_epoch = 0  # steps of that epoch already done
        self.global_step = 0
        self.rows: list[dict] = []
        self.best_top1 = -1.0  # test top-1 of the best epoch
        self.best_score = -1.0  # what chose it: validation top-1 with a validation split, else test top-1
        self.best_epoch = -1
        self.best_top5 = 0.0
        self.train_seconds = 0.0  # training steps only, all epochs
        self.epoch_seconds = 0.0  # training steps of the epoch in progress
        self.wall_seconds = 0.0  # earlier sessions of this run (before the last resume)
        self.meter = EpochMeter(self.device, self.dist)
        self._session_started: Optional[float] = None
        self.tracker = NoTracker()  # run() opens the recipe's (train.track)

    # -------------------------------------------------------------------------------- construction
    def _on_device(self, module: nn.Module) -> nn.Module:
        """A module on the training device, in the batches' memory layout."""
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def _method_context(self) -> MethodContext:
        t = self.recipe.train
        return MethodContext(
            num_classes=self.data.num_classes, num_train=self.data.num_train,
            train_labels=self.data.train_labels.to(self.device), embed_dim=self.model.embed_dim,
            stage_channels=list(self.model.stage_channels), epochs=t.epochs, batch_size=t.batch_size,
            seed=t.seed, device=self.device, channels_last=self.channels_last, collectives=self.collectives,
            image_shape=tuple(self.data.image_shape),
        )

    def _build_batches(self) -> None:
        """The method's sampler (or the default order), this rank's share of it, and the device loader.
        The recipe's batch size is the global batch: each rank trains on its share of every batch."""
        t = self.recipe.train
        plan = self.method.batch_plan(self.data.train_labels, t.batch_size, t.seed) or \
            RandomBatches(self.data.train_labels, t.batch_size, t.seed)
        self.batches = distributed.shard_batches(plan, self.dist)
        self.loader = self.data.train_loader(self.batches, distributed.rank_seed(t.seed, self.dist), self.device,
                                             self.channels_last, self.recipe.data.augment)
        self.steps_per_epoch = self.loader.steps(0)

    def _build_optimizer(self) -> None:
        optim, t = self.recipe.optim, self.recipe.train
        groups = finetune.optimizer_groups(self.net, self.model, self.net.extra, optim.backbone_lr_scale)
        self.optimizer = torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum,
                                         nesterov=optim.nesterov and optim.momentum > 0,
                                         weight_decay=optim.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.train_step_fn = self.net
        if self.dist.enabled:  # broadcasts rank 0's weights and buffers; averages gradients in backward
            from torch.nn.parallel import DistributedDataParallel

            self.train_step_fn = DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if t.compile:
            self.train_step_fn = torch.compile(self.train_step_fn)

    # -------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> Checkpoint:
        """The checkpoint (runs.Checkpoint says what each field is)."""
        wall = self.wall_seconds + (time.time() - self._session_started if self._session_started else 0.0)
        return Checkpoint(
            format=CHECKPOINT_FORMAT,
            config=self.recipe.to_dict(),
            model=self.model.state_dict(),
            extra=self.net.extra.state_dict() if self.net.extra is not None else {},
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(),
            method=self.method.state_dict(),
            epoch=self.epoch,
            step_in_epoch=self.step_in_epoch,
            global_step=self.global_step,
            meter=self.meter.state_dict(),
            rows=self.rows,
            best=BestEpoch(top1=self.best_top1, epoch=self.best_epoch, top5=self.best_top5, score=self.best_score,
                           chosen_on=self.chosen_on),
            train_seconds=self.train_seconds,
            epoch_seconds=self.epoch_seconds,
            wall_seconds=wall,
            rng=runtime.rng_state(),
            num_classes=self.data.num_classes,
            class_names=list(self.data.class_names),
            data_stats=DataStats(mean=[float(v) for v in self.data.mean], std=[float(v) for v in self.data.std],
                                 image_shape=list(self.data.image_shape)),
            arch=self.recipe.model.arch,
            world_size=self.dist.world_size,
        )

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_classes") != self.data.num_classes:
            raise UserError(f"the checkpoint has {state.get('num_classes')} classes but data set "
                            f"'{self.recipe.data.name}' has {self.data.num_classes}; point --data at the data the run "
                            "was trained on")
        try:
            self._load_state(state)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
            # a hand-made or foreign checkpoint: a key missing, a tensor of another shape, a value of another type
            where = self.folder.last if self.folder is not None else "the checkpoint"
            raise UserError(f"{where} is not a complete training checkpoint of this recipe "
                            f"({one_line(exc, 160, named=True)}); it cannot be resumed: use a checkpoint written by "
                            "`ipasdctl train`, or start a new run") from None

    def _load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.net.extra is not None:
            self.net.extra.load_state_dict(state["extra"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        self.epoch = _checked_count(state["epoch"], "epoch", 0, self.recipe.train.epochs)
        # a sampler's epochs may differ in length: step_in_epoch is bounded by the global count only
        self.step_in_epoch = _checked_count(state["step_in_epoch"], "step_in_epoch", 0, 2**62)
        self.global_step = _checked_count(state["global_step"], "global_step", 0, 2**62)
        self.meter = EpochMeter(self.device, self.dist)
        self.meter.load_state_dict(state["meter"])
        self.rows = [dict(row) for row in state["rows"]]
        if len(self.rows) != self.epoch:
            raise ValueError(f"{len(self.rows)} metrics rows for {self.epoch} finished epochs")
        self.best_top1 = float(state["best"]["top1"])
        self.best_score = float(state["best"].get("score", self.best_top1))
        self.best_epoch = _checked_count(state["best"]["epoch"], "best epoch", -1, self.epoch)
        self.best_top5 = float(state["best"]["top5"])
        self.train_seconds = float(state["train_seconds"])
        self.epoch_seconds = float(state.get("epoch_seconds", 0.0))
        self.wall_seconds = float(state.get("wall_seconds", 0.0))
        runtime.set_rng_state(state["rng"])

    def save(self, best: bool = False) -> None:
        """Every rank builds the state (it gathers the method's and the meter's over ranks); rank 0 writes it.
        Weights or BatchNorm statistics that are no longer finite are never written: the last good checkpoint
        stays the last good one."""
        where = (f"at epoch {self.epoch + 1}, step {self.step_in_epoch}" if self.step_in_epoch
                 else f"at the end of epoch {self.epoch}")
        self.stops.check_weights(self.net, where, self.folder.last if self.folder is not None else None)
        state = self.state_dict()
        if self.dist.is_main:
            check_folder_still_there(self.folder)
            self.folder.save_checkpoint(state, best)

    @property
    def chosen_on(self) -> str:
        """The split that chooses the best epoch: 'val' with a validation split, else 'test'."""
        return "val" if self.data.num_val else "test"

    def _record_splits(self) -> None:
        """splits.json: how the splits were derived (validation and test indices, the label noise applied;
        rewritten, identical, on resume); what they are is printed too."""
        if self.dist.is_main and self.data.origin:
            self.folder.write_splits(self.data.origin)
        for line in describe_splits(self.data):
            self.progress.note(line)

    # -------------------------------------------------------------------------------- loop
    def run(self) -> RunSummary:
        """Train to the last epoch (from wherever the state says), writing the run folder as it goes."""
        assert self.folder is not None
        self._session_started = time.time()
        self._record_splits()
        self.tracker = open_tracker(self.recipe, self.folder, self.rows, self.dist.is_main)
        failed = True
        try:
            with self.stops.handling_signals():
                if self.rows and self.dist.is_main:  # resumed: metrics.csv may lag behind (or run ahead of) the state
                    self.folder.write_metrics(self.rows)
                while self.epoch < self.recipe.train.epochs:
                    self._train_epoch()
                self._ensure_best()
            summary = self._write_summary(self.wall_seconds + time.time() - self._session_started)
            self.tracker.finish(summary.to_dict())
            failed = False
        finally:
            self.tracker.close(failed)
        return summary

    def train_step(self, batch, lr: float) -> None:
        """One optimisation step on a batch; everything stays on the device (no host synchronisation)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        with runtime.autocast(self.device, self.dtype):
            result = self.method.loss(self.train_step_fn, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(result.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.meter.update(result, batch.step)

    def _check_finite(self, epoch: int) -> None:
        self.stops.check_finite(self.meter, epoch, self.folder.last if self.folder is not None else None)

    def _train_epoch(self) -> None:
        epoch, recipe = self.epoch, self.recipe
        if self.step_in_epoch == 0:
            self.meter = EpochMeter(self.device, self.dist)
            self.epoch_seconds = 0.0
            self.method.on_epoch_start(epoch)
        if self.dist.enabled:  # the memories' gathers pad to the epoch's largest rank batch (one host read)
            largest = max((batch.numel() for batch in self.batches(epoch)), default=0)
            self.collectives.capacity = int(distributed.all_reduce_max(
                torch.tensor(largest, device=self.device)).item())
        self.net.train()
        finetune.freeze_backbone(self.model, epoch < recipe.model.freeze_epochs)
        bar = self.progress.bar(epoch, recipe.train.epochs, self.steps_per_epoch, self.step_in_epoch)
        every = recipe.checkpoint.every_steps
        check_every = self.agree_every if self.dist.enabled else FINITE_CHECK_STEPS
        started = time.perf_counter()
        with anomaly_detection(recipe.train.detect_anomaly):
            for batch in self.loader.epoch(epoch, self.step_in_epoch):
                self.train_step(batch, lr_at(self.global_step, self.steps_per_epoch, recipe))
                self.step_in_epoch = batch.step + 1
                self.global_step += 1
                self.stops.after_step(self.global_step)
                if self.global_step % check_every == 0:
                    self._check_finite(epoch)  # several processes: also where they agree on a stop
                self.progress.advance(bar, self.step_in_epoch, self.meter.read)
                if self.stops.requested is not None or (every and self.global_step % every == 0):
                    self._check_finite(epoch)  # never checkpoint weights a non-finite step has updated
                    started = self._count_time(started)
                    self.save()
                    if self.stops.requested is not None:
                        self.stops.stop(bar, self.folder.path)
        self._count_time(started)
        self._check_finite(epoch)
        self._end_epoch(epoch, bar)

    def _end_epoch(self, epoch: int, bar) -> None:
        """Evaluate, record the epoch's row, checkpoint (last, and best if it is), write metrics.csv."""
        recipe = self.recipe
        train_stats = self.meter.read(over_ranks=True)
        images = self.meter.totals()[2].item()
        # every rank holds (and evaluates) the model rank 0 checkpoints: rank 0's BatchNorm statistics
        distributed.broadcast_buffers(self.net, self.dist)
        held_out = self._evaluate(bar) if self.evaluates(epoch) else \
            {f"{split}_{m}": None for split in self._held_out_splits() for m in ("loss", "top1", "top5")}
        self.method.on_epoch_end(epoch)  # after the evaluation, so a checkpoint written during it resumes exactly
        seconds = self.epoch_seconds
        row = {"epoch": epoch + 1, "lr": lr_at(max(self.global_step - 1, 0), self.steps_per_epoch, recipe)}
        row.update({"train_loss": train_stats.pop("train_loss")})
        row.update({k: v for k, v in train_stats.items() if k != "train_top1"})
        row["train_top1"] = train_stats["train_top1"]
        row.update(held_out)
        row["epoch_seconds"] = seconds
        row["images_per_second"] = images / seconds if seconds > 0 else float("nan")
        self.rows.append(row)
        score = held_out[f"{self.chosen_on}_top1"]  # None in an epoch without evaluation: it cannot be the best
        is_best = score is not None and score > self.best_score
        if is_best:
            self.best_top1, self.best_epoch, self.best_top5 = held_out["test_top1"], epoch + 1, held_out["test_top5"]
            self.best_score = score
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_seconds = 0.0
        self.save(best=is_best)  # the checkpoint first: it is what a resume trusts (and rewrites metrics.csv from)
        if self.dist.is_main:
            self.folder.write_metrics(self.rows)
        self.tracker.log_epoch(row)
        self.progress.epoch_line(bar, row, recipe.train.epochs)
        self.progress.epoch_finished(row)  # after the checkpoint: a watcher (tune's pruner) may stop the run here
        if self.dist.enabled:
            self.stops.agree(self.meter)  # a signal that came during the evaluation
        if self.stops.requested is not None:
            self.stops.stop(None, self.folder.path)

    def evaluates(self, epoch: int) -> bool:
        """Whether `epoch` (from 0) ends with the test (and validation) pass: every train.eval_every epochs, and
        the last. The others get empty test columns in metrics.csv, log nothing and cannot be the best epoch."""
        t = self.recipe.train
        return (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs

    def _held_out_splits(self) -> tuple[str, ...]:
        return ("test", "val") if self.data.num_val else ("test",)

    def _evaluate(self, bar) -> dict:
        """Test (and validation) metrics, each rank its share; a signal during them checkpoints the epoch's steps
        and stops (resume evaluates)."""
        stop = lambda: self.stops.requested is not None  # noqa: E731
        held_out = {}
        for split in self._held_out_splits():
            metrics = test_metrics(self.model, self.data, self.device, self.dtype, self.recipe.train.eval_batch_size,
                                   self.channels_last, self.dist, stop=stop, progress=self.progress, split=split)
            if metrics is None:
                self.save()
                self.stops.stop(bar, self.folder.path)
            held_out.update(metrics)
        return held_out

    def _ensure_best(self) -> None:
        """A finished run has its best.pt. One missing at the end (removed, or lost by a version that wrote
        last.pt first) is the state itself when the last epoch was the best; otherwise the best epoch's
        weights are gone, and the last epoch becomes the best on record (said in a warning)."""
        if self.folder is None or distributed.on_main(self.dist, self.folder.best.is_file):
            return  # (rank 0 looks: every rank must then take part in the save, or none)
        if self.best_epoch != self.epoch and self.rows:
            last = self.rows[-1]
            if self.dist.is_main:
                print(f"warning: {self.folder.best} was missing and epoch {self.best_epoch}'s weights are gone; "
                      f"best.pt now holds the last epoch ({self.epoch}, test top-1 {last['test_top1']:.2f}%)",
                      file=sys.stderr)
            self.best_top1, self.best_epoch, self.best_top5 = last["test_top1"], self.epoch, last["test_top5"]
            self.best_score = last[f"{self.chosen_on}_top1"]
        self.save(best=True)

    def _count_time(self, started: float) -> float:
        """Add the training time since `started` to the epoch's and the run's; returns now."""
        now = time.perf_counter()
        self.epoch_seconds += now - started
        self.train_seconds += now - started
        return now

    # -------------------------------------------------------------------------------- summary
    def _write_summary(self, wall_seconds: float) -> RunSummary:
        """summary.json; wall_seconds adds up every session of the run (it is kept in the checkpoint)."""
        summary = run_summary(self, wall_seconds)
        if self.dist.is_main:
            check_folder_still_there(self.folder)
            self.folder.write_summary(summary)
        return summary


def _checked_count(value, what: str, low: int, high: int) -> int:
    """An integer field of a checkpoint, within [low, high]; a ValueError (resume's one line) otherwise."""
    if not whole(value, low, high):
        raise ValueError(f"'{what}' is {value!r}, not an integer from {low} to {high}")
    return value
