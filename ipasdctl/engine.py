"""The training loop: device, precision, schedule, metrics, checkpoints and resume. Knows no method by name.

A run folder holds config.yaml, metrics.csv, summary.json and checkpoints/{last,best}.pt. Everything random
is a function of the seed, the epoch and the step, and the checkpoint carries the optimizer, the method's
state, the epoch's running sums and every RNG, so a resumed run continues exactly where it stopped: on CPU a
run killed mid-epoch and resumed ends with the same metrics and bitwise the same weights (tests/test_resume.py).
On CUDA the data order, RNG streams and state are just as exact, but cuDNN autotuning and atomic-add kernels
(index_add_, scatter, conv backward) may round differently from run to run, so metrics agree to float noise
unless `train.deterministic` is set.

Checkpoints: checkpoints/last.pt at every epoch end and, with checkpoint.every_steps=N, every N steps, so a
kill loses at most N steps. SIGINT/SIGTERM finish the current step, write last.pt and raise Interrupted
(the CLI prints how to resume and exits 130/143); a second signal aborts at once (the last checkpoint stays).
A run folder is locked (.lock, flock) while a process trains into it; the kernel drops the lock when that
process dies, even by SIGKILL, so a crashed run never leaves it locked. A new run that fails before its first
checkpoint removes its run folder: bad input never leaves half a run behind.

Several processes (torchrun, DistributedDataParallel; the choices are argued in distributed.py): the
recipe's batch size is the global batch, each rank trains on its share; rank 0 creates the run folder (its
name is broadcast), holds the lock and writes every file; a checkpoint holds full memories and global sums,
so any number of processes resumes it; the ranks agree on stopping (signals, non-finite loss) at the same
steps: every step on CPU, every FINITE_CHECK_STEPS steps on CUDA.

Test hook (tests/test_resume.py): IPASDCTL_TEST_SIGNAL_AT_STEP="N[:KILL|TERM|INT][@RANK]" makes the process
(rank RANK only, if given) send itself that signal (default SIGKILL) right after global step N's update,
before that step's checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import math
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, runtime
from .config import Recipe, deep_merge, dump_recipe, load_recipe, recipe_from_dict
from .data import RandomBatches, build_data
from .distributed import DistContext
from .errors import UserError
from .io import atomic_write_json, atomic_write_text, load_checkpoint, save_checkpoint
from .methods import Method, MethodContext, TrainingNet, build_method, resolved_method_config
from .models import build_model


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written. `code` is the exit status (130 / 143)."""

    def __init__(self, code: int, run_dir: Path):
        super().__init__(code)
        self.code = code
        self.run_dir = run_dir


TEST_SIGNAL_ENV = "IPASDCTL_TEST_SIGNAL_AT_STEP"
FINITE_CHECK_STEPS = 20  # how often (steps) the loop reads the device to stop early on a non-finite loss


# ------------------------------------------------------------------------------------------------ schedule


def lr_at(step: int, steps_per_epoch: int, recipe: Recipe) -> float:
    """Linear warm-up per step, then multi-step decay (milestones counted after warm-up) or cosine."""
    optim, epochs = recipe.optim, recipe.train.epochs
    warmup_steps = int(round(optim.warmup_epochs * steps_per_epoch))
    if step < warmup_steps:
        return optim.lr * (step + 1) / warmup_steps
    after = (step - warmup_steps) / steps_per_epoch  # epochs since warm-up ended
    if optim.schedule == "multistep":
        return optim.lr * optim.gamma ** sum(after >= m for m in optim.milestones)
    if optim.schedule == "cosine":
        total = max(epochs - optim.warmup_epochs, 1e-9)
        return optim.lr * 0.5 * (1.0 + math.cos(math.pi * min(after / total, 1.0)))
    return optim.lr


def check_recipe(recipe: Recipe) -> None:
    """Value checks the types cannot express; also fills in the method's default parameters."""
    recipe.method = resolved_method_config(recipe.method)
    t, o = recipe.train, recipe.optim
    if t.epochs <= 0:
        raise UserError(f"epochs must be a positive integer, got {t.epochs}; use --epochs N with N >= 1")
    if t.batch_size <= 0:
        raise UserError(f"batch size must be a positive integer, got {t.batch_size}; use --batch-size N with N >= 1")
    if t.eval_batch_size <= 0:
        raise UserError(f"train.eval_batch_size must be positive, got {t.eval_batch_size}")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise UserError(f"learning rate must be a positive number, got {o.lr}; e.g. --lr 0.1")
    if not 0 <= t.seed < 2**63:
        raise UserError(f"seed must be an integer from 0 to 2^63-1, got {t.seed}")
    if recipe.checkpoint.every_steps < 0:
        raise UserError(f"checkpoint.every_steps must be 0 (epoch ends only) or positive, got {recipe.checkpoint.every_steps}")
    if o.schedule not in ("multistep", "cosine", "constant"):
        raise UserError(f"optim.schedule must be multistep, cosine or constant, got '{o.schedule}'")
    if o.warmup_epochs < 0 or o.weight_decay < 0 or o.momentum < 0:
        raise UserError("optim.warmup_epochs, weight_decay and momentum must not be negative")


def check_labels(data, name: str) -> None:
    """Every label must name a class: a label outside 0..K-1 means corrupt files or mismatched class names."""
    k = data.num_classes
    for split, labels in (("training", data.train_labels), ("test", data.test_labels)):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise UserError(f"data set '{name}' has {split} labels from {int(labels.min())} to {int(labels.max())} but "
                            f"{k} classes; its files are corrupt or do not belong together: download it again")


@contextlib.contextmanager
def _anomaly_detection(enabled: bool):
    """torch.autograd anomaly detection for the epoch (train.detect_anomaly), switched off however it ends."""
    if not enabled:
        yield
        return
    with torch.autograd.detect_anomaly(check_nan=True):
        yield


# ------------------------------------------------------------------------------------------------ metrics


def count_macs(model: nn.Module, image_shape, device) -> int:
    """Multiply-accumulates of one forward at batch 1 (FLOPs / 2, torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, *image_shape, device=device))
    model.train(was_training)
    return int(counter.get_total_flops() // 2)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def evaluate(model: nn.Module, data, device, dtype, batch_size: int, channels_last: bool = False,
             dist_ctx: Optional[DistContext] = None) -> dict:
    """Test loss, top-1 and top-5 (%) of the plain model; sums stay on the device until the end.

    With `dist_ctx` of several processes (every rank holding the same model), rank r evaluates the test
    batches i with i mod W = r and the sums are added over ranks: every rank returns the same figures."""
    model.eval()
    rank, world = (dist_ctx.rank, dist_ctx.world_size) if dist_ctx is not None and dist_ctx.enabled else (0, 1)
    k = min(5, data.num_classes)
    loss_sum = torch.zeros((), device=device)
    top1 = torch.zeros((), device=device)
    topk = torch.zeros((), device=device)
    for i, (x, y) in enumerate(data.test_batches(batch_size, device, channels_last)):
        if i % world != rank:
            continue
        with runtime.autocast(device, dtype):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        pred = logits.topk(k, dim=1).indices
        top1 += (pred[:, 0] == y).sum()
        topk += (pred == y[:, None]).any(1).sum()
    if world > 1:
        sums = torch.stack([loss_sum, top1, topk])
        distributed.all_reduce_sum(sums)
        loss_sum, top1, topk = sums.unbind()
    n = data.num_test
    model.train()
    return {"test_loss": (loss_sum / n).item(), "test_top1": (100.0 * top1 / n).item(),
            "test_top5": (100.0 * topk / n).item()}


class EpochMeter:
    """Running sums of the epoch's loss terms and accuracy, kept on the device (read at refresh and epoch end).

    The first step whose loss is not finite, and its loss terms, are recorded on the device too, so the loop
    can stop with a precise message without reading the device every step. Under several processes each rank
    sums its own steps; `read(over_ranks=True)` and the checkpoint (`state_dict`) add the ranks' sums up, and a
    rank restoring them keeps them only if it is rank 0, so the next sum over ranks counts them once.
    """

    def __init__(self, device, dist_ctx: Optional[DistContext] = None):
        self.device = device
        self.dist = dist_ctx or DistContext()
        self.sums: dict[str, torch.Tensor] = {}
        self.correct = torch.zeros((), device=device)
        self.count = torch.zeros((), device=device)
        self.first_nonfinite_step = torch.full((), -1, dtype=torch.long, device=device)
        self.nonfinite_terms: dict[str, torch.Tensor] = {}  # the terms of that step

    def update(self, result: dict, labels: torch.Tensor, step: int) -> None:
        n = labels.numel()
        first_bad = ~torch.isfinite(result["loss"].detach()) & (self.first_nonfinite_step < 0)
        for key, value in result.items():
            if key == "logits" or key == "labels":
                continue
            value = value.detach().float()
            if key not in self.sums:
                self.sums[key] = torch.zeros((), device=self.device)
                self.nonfinite_terms[key] = torch.zeros((), device=self.device)
            self.sums[key] += value * n
            self.nonfinite_terms[key] = torch.where(first_bad, value, self.nonfinite_terms[key])
        logits = result["logits"].detach()
        self.correct += (logits.argmax(1) == labels).sum()
        self.count += n
        self.first_nonfinite_step = torch.where(first_bad, torch.full_like(self.first_nonfinite_step, step),
                                                self.first_nonfinite_step)

    def totals(self) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """(sums, correct, count) over every rank: copies, one collective (this rank's own stay as they are).
        Every rank runs the same method, so every rank has the same terms in the same order."""
        if not self.dist.enabled:
            return self.sums, self.correct, self.count
        keys = list(self.sums)
        packed = torch.stack([self.sums[k] for k in keys] + [self.correct.float(), self.count.float()])
        distributed.all_reduce_sum(packed)
        return dict(zip(keys, packed[:-2].unbind())), packed[-2], packed[-1]

    def read(self, over_ranks: bool = False) -> dict:
        sums, correct, count = self.totals() if over_ranks else (self.sums, self.correct, self.count)
        count = max(count.item(), 1.0)
        values = {("train_loss" if k == "loss" else k): (v / count).item() for k, v in sums.items()}
        values["train_top1"] = 100.0 * correct.item() / count
        return values

    def nonfinite_step(self) -> int:
        return int(self.first_nonfinite_step.item())

    def nonfinite_report(self) -> str:
        """'loss=nan, loss_ce=2.3, ...': the loss terms of the first non-finite step."""
        return ", ".join(f"{k}={v.item():.4g}" for k, v in self.nonfinite_terms.items())

    def state_dict(self) -> dict:
        sums, correct, count = self.totals()
        return {"sums": dict(sums), "correct": correct, "count": count}

    def load_state_dict(self, state: dict) -> None:
        def restored(value: torch.Tensor) -> torch.Tensor:
            value = value.to(self.device)
            return value if self.dist.is_main else torch.zeros_like(value)

        self.sums = {k: restored(v) for k, v in state["sums"].items()}
        self.nonfinite_terms = {k: torch.zeros((), device=self.device) for k in self.sums}
        self.correct = restored(state["correct"])
        self.count = restored(state["count"])


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------------ run folder


def default_run_name(recipe: Recipe) -> str:
    return f"{recipe.data.name}-{recipe.model.arch}-{recipe.method['name']}-s{recipe.train.seed}"


def check_out_folder(out: Path) -> None:
    """--out must be a writable folder, or creatable below its nearest existing parent folder."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        if existing == out:
            raise UserError(f"--out {out} is a file, not a folder; choose a folder for the run folders")
        raise UserError(f"cannot create output folder {out}: {existing} is a file, not a folder; "
                        "choose a writable --out")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        what = "output folder" if existing == out else f"output folder {out} cannot be created: its parent"
        raise UserError(f"{what} {existing} is not writable; choose another --out")


def create_run_dir(out: Path, name: str) -> Path:
    """out/name, or out/name-2, -3, ... if taken; created atomically (two runs never share one)."""
    n = 1
    while True:
        candidate = out / (name if n == 1 else f"{name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
        except OSError as exc:
            raise UserError(f"cannot create run folder {candidate}: {exc.strerror}; choose a writable --out") from None


try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: fall back to the owner's pid
    fcntl = None


class RunLock:
    """run_dir/.lock: held (flock) by the one process that trains into the folder; holds its pid and host.

    The kernel releases a flock when its process ends, however it ends, so the lock file of a crashed or
    SIGKILLed run is free at once and the next `--resume` takes it over; nothing is ever stale for good.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UserError(f"cannot lock run folder {self.path.parent}: {exc.strerror}; "
                                "make it writable or choose another folder") from None
            if not self._lock(fd):
                owner = _read_owner(fd)
                os.close(fd)
                raise UserError(f"run folder {self.path.parent} is in use by {owner}; wait for that run to "
                                "finish or stop it first (its lock goes away when it ends)")
            try:  # a releasing owner unlinks the file: make sure we locked the file that is at the path now
                current = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if not current:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            self._fd = fd
            return

    def _lock(self, fd: int) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return False
                # no flock on this file system: fall through to the pid check
        pid = _owner_fields(fd)[0]
        return not (pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)))

    def release(self) -> None:
        if self._fd is not None:
            try:
                self.path.unlink()  # while still locked, so a waiter that opened it retries (see acquire)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None


def _owner_fields(fd: int) -> list[str]:
    """[pid, host] as the lock's holder wrote them ('' where missing)."""
    try:
        fields = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        fields = []
    return (fields + ["", ""])[:2]


def _read_owner(fd: int) -> str:
    pid, host = _owner_fields(fd)
    return f"process {pid} on {host}" if pid and host else f"process {pid}" if pid else "another process"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------------ trainer


@dataclass
class Progress:
    """How the trainer reports: a tqdm bar on a terminal, one line per epoch elsewhere."""

    enabled: bool = True
    refresh_steps: int = 20
    stream: object = field(default_factory=lambda: sys.stderr)


class Trainer:
    def __init__(self, recipe: Recipe, run_dir: Optional[Path] = None, progress: Optional[Progress] = None):
        check_recipe(recipe)
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

        self.data = build_data(recipe.data)
        check_labels(self.data, recipe.data.name)
        if t.batch_size > self.data.num_train:
            raise UserError(f"batch size {t.batch_size} is larger than the training set ({self.data.num_train} images); "
                            "lower --batch-size or use more data")
        self.model = build_model(recipe.model.arch, self.data.num_classes).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ctx = MethodContext(
            num_classes=self.data.num_classes, num_train=self.data.num_train,
            train_labels=self.data.train_labels.to(self.device), embed_dim=self.model.embed_dim,
            stage_channels=list(self.model.stage_channels), epochs=t.epochs, batch_size=t.batch_size,
            seed=t.seed, device=self.device, run_dir=str(run_dir) if run_dir else None,
            channels_last=self.channels_last,
        )
        self.method: Method = build_method(recipe.method, self.ctx)
        extra = self.method.extra_module()
        if extra is not None:
            extra = extra.to(self.device)
            if self.channels_last:
                extra = extra.to(memory_format=torch.channels_last)
        self.net = TrainingNet(self.model, extra)
        if t.sync_bn and self.dist.enabled:  # in place: self.model's BatchNorm layers are replaced too
            self.net = nn.SyncBatchNorm.convert_sync_batchnorm(self.net)
        # the recipe's batch size is the global batch: each rank trains on its share of every batch
        plan = self.method.batch_plan(self.data.train_labels, t.batch_size, t.seed) or \
            RandomBatches(self.data.train_labels, t.batch_size, t.seed)
        self.batches = distributed.shard_batches(plan, self.dist)
        self.loader = self.data.train_loader(self.batches, distributed.rank_seed(t.seed, self.dist), self.device,
                                             self.channels_last, recipe.data.augment)
        self.steps_per_epoch = self.loader.steps(0)
        # per-sample memories, prototypes, stored logits: their collectives (a no-op on one process)
        self.row_gatherer = distributed.RowGatherer()
        distributed.attach_method_hooks(self.method, self.dist, self.row_gatherer)
        # how often (steps) the ranks agree on stopping: every step costs nothing on CPU, but on CUDA each
        # agreement is a host read, so it waits for FINITE_CHECK_STEPS as the non-finite check does
        self.agree_every = FINITE_CHECK_STEPS if self.device.type == "cuda" else 1
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=recipe.optim.lr, momentum=recipe.optim.momentum,
                                         nesterov=recipe.optim.nesterov and recipe.optim.momentum > 0,
                                         weight_decay=recipe.optim.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.train_step_fn = self.net
        if self.dist.enabled:  # broadcasts rank 0's weights and buffers; averages gradients in backward
            from torch.nn.parallel import DistributedDataParallel

            self.train_step_fn = DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if t.compile:
            self.train_step_fn = torch.compile(self.train_step_fn)
        self.params = count_params(self.model)
        self.macs = count_macs(self.model, self.data.image_shape, self.device)

        # progress of the run (all of it restored on resume)
        self.epoch = 0  # the epoch in progress (or next to start)
        self.step_in_epoch = 0  # steps of that epoch already done
        self.global_step = 0
        self.rows: list[dict] = []
        self.best_top1 = -1.0
        self.best_epoch = -1
        self.best_top5 = 0.0
        self.train_seconds = 0.0  # training steps only, all epochs
        self.epoch_seconds = 0.0  # training steps of the epoch in progress
        self.wall_seconds = 0.0  # earlier sessions of this run (before the last resume)
        self.meter = EpochMeter(self.device, self.dist)
        self.run_dir = run_dir
        self._signal: Optional[int] = None  # a SIGINT/SIGTERM this process received
        self._agreed_signal: Optional[int] = None  # the stop every rank agreed on (several processes)
        self._test_signal: Optional[tuple[int, int, Optional[int]]] = None
        self._session_started: Optional[float] = None

    # -------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        wall = self.wall_seconds + (time.time() - self._session_started if self._session_started else 0.0)
        return {
            "format": "ipasdctl-checkpoint-1",
            "config": self.recipe.to_dict(),
            "model": self.model.state_dict(),
            "extra": self.net.extra.state_dict() if self.net.extra is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": self.method.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "meter": self.meter.state_dict(),
            "rows": self.rows,
            "best": {"top1": self.best_top1, "epoch": self.best_epoch, "top5": self.best_top5},
            "train_seconds": self.train_seconds,
            "epoch_seconds": self.epoch_seconds,
            "wall_seconds": wall,
            "rng": runtime.rng_state(),
            "num_classes": self.data.num_classes,
            "class_names": list(self.data.class_names),
            "arch": self.recipe.model.arch,
            "world_size": self.dist.world_size,  # for the record: any number of processes can resume it
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_classes") != self.data.num_classes:
            raise UserError(f"the checkpoint has {state.get('num_classes')} classes but data set "
                            f"'{self.recipe.data.name}' has {self.data.num_classes}; point --data at the data the run "
                            "was trained on")
        self.model.load_state_dict(state["model"])
        if self.net.extra is not None:
            self.net.extra.load_state_dict(state["extra"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.meter = EpochMeter(self.device, self.dist)
        self.meter.load_state_dict(state["meter"])
        self.rows = list(state["rows"])
        self.best_top1 = float(state["best"]["top1"])
        self.best_epoch = int(state["best"]["epoch"])
        self.best_top5 = float(state["best"]["top5"])
        self.train_seconds = float(state["train_seconds"])
        self.epoch_seconds = float(state.get("epoch_seconds", 0.0))
        self.wall_seconds = float(state.get("wall_seconds", 0.0))
        runtime.set_rng_state(state["rng"])

    def save(self, best: bool = False) -> None:
        """Every rank builds the state (it gathers the method's and the meter's over ranks); rank 0 writes it."""
        state = self.state_dict()
        if not self.dist.is_main:
            return
        save_checkpoint(self.run_dir / "checkpoints" / "last.pt", state)
        if best:
            save_checkpoint(self.run_dir / "checkpoints" / "best.pt", state)

    # -------------------------------------------------------------------------------- loop
    def _on_signal(self, signum, _frame) -> None:
        if self._signal is not None:  # a second signal: stop now (the last checkpoint stays as it is)
            raise KeyboardInterrupt
        self._signal = signum

    @property
    def _stop_signal(self) -> Optional[int]:
        """The signal the loop acts on: this process's own, or under several processes the one all ranks
        agreed on at the last agreement point (so every rank checkpoints and stops at the same step)."""
        return self._agreed_signal if self.dist.enabled else self._signal

    def run(self) -> dict:
        """Train to the last epoch (from wherever the state says), writing the run folder as it goes."""
        assert self.run_dir is not None
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        self._session_started = time.time()
        self._test_signal = _test_signal_at_step()
        try:
            if self.rows and self.dist.is_main:  # resumed: metrics.csv may lag behind (or run ahead of) the state
                write_metrics_csv(self.run_dir / "metrics.csv", self.rows)
            while self.epoch < self.recipe.train.epochs:
                self._train_epoch()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return self._write_summary(self.wall_seconds + time.time() - self._session_started)

    def train_step(self, batch, lr: float) -> None:
        """One optimisation step on a batch; everything stays on the device (no host synchronisation)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with runtime.autocast(self.device, self.dtype):
            result = self.method.loss(self.train_step_fn, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(result["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.meter.update(result, result.get("labels", batch.labels), batch.step)

    def _train_epoch(self) -> None:
        epoch, recipe = self.epoch, self.recipe
        if self.step_in_epoch == 0:
            self.meter = EpochMeter(self.device, self.dist)
            self.epoch_seconds = 0.0
            self.method.on_epoch_start(epoch)
        if self.dist.enabled:  # the memories' gathers pad to the epoch's largest rank batch (one host read)
            largest = max((batch.numel() for batch in self.batches(epoch)), default=0)
            self.row_gatherer.capacity = int(distributed.all_reduce_max(
                torch.tensor(largest, device=self.device)).item())
        self.net.train()
        bar = self._bar(epoch)
        every = recipe.checkpoint.every_steps
        check_every = self.agree_every if self.dist.enabled else FINITE_CHECK_STEPS
        started = time.perf_counter()
        with _anomaly_detection(recipe.train.detect_anomaly):
            for batch in self.loader.epoch(epoch, self.step_in_epoch):
                self.train_step(batch, lr_at(self.global_step, self.steps_per_epoch, recipe))
                self.step_in_epoch = batch.step + 1
                self.global_step += 1
                if self._test_signal is not None and self.global_step == self._test_signal[0] \
                        and self._test_signal[2] in (None, self.dist.rank):
                    os.kill(os.getpid(), self._test_signal[1])
                if self.global_step % check_every == 0:
                    self._check_finite(epoch)  # several processes: also where they agree on a stop
                if bar is not None and (self.step_in_epoch % self.progress.refresh_steps == 0):
                    self._refresh(bar, self.step_in_epoch)
                if self._stop_signal is not None or (every and self.global_step % every == 0):
                    self._check_finite(epoch)  # never checkpoint weights a non-finite step has updated
                    started = self._count_time(started)
                    self.save()
                    if self._stop_signal is not None:
                        self._stop_for_signal(bar)
        self._count_time(started)
        self._check_finite(epoch)
        self.method.on_epoch_end(epoch)
        train_stats = self.meter.read(over_ranks=True)
        images = self.meter.totals()[2].item()
        # every rank evaluates (its share of) the model rank 0 checkpoints: rank 0's BatchNorm statistics
        distributed.broadcast_buffers(self.net, self.dist)
        test_stats = evaluate(self.model, self.data, self.device, self.dtype, recipe.train.eval_batch_size,
                              self.channels_last, self.dist)
        seconds = self.epoch_seconds
        row = {"epoch": epoch + 1, "lr": lr_at(max(self.global_step - 1, 0), self.steps_per_epoch, recipe)}
        row.update({"train_loss": train_stats.pop("train_loss")})
        row.update({k: v for k, v in train_stats.items() if k != "train_top1"})
        row["train_top1"] = train_stats["train_top1"]
        row.update(test_stats)
        row["epoch_seconds"] = seconds
        row["images_per_second"] = images / seconds if seconds > 0 else float("nan")
        self.rows.append(row)
        is_best = test_stats["test_top1"] > self.best_top1
        if is_best:
            self.best_top1, self.best_epoch, self.best_top5 = test_stats["test_top1"], epoch + 1, test_stats["test_top5"]
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_seconds = 0.0
        self.save(best=is_best)  # the checkpoint first: it is what a resume trusts (and rewrites metrics.csv from)
        if self.dist.is_main:
            write_metrics_csv(self.run_dir / "metrics.csv", self.rows)
        self._epoch_line(bar, row)
        if self.dist.enabled:
            self._agree_on_stop()  # a signal that came during the evaluation
        if self._stop_signal is not None:
            self._stop_for_signal(None)

    def _count_time(self, started: float) -> float:
        """Add the training time since `started` to the epoch's and the run's; returns now."""
        now = time.perf_counter()
        self.epoch_seconds += now - started
        self.train_seconds += now - started
        return now

    def _agree_on_stop(self) -> bool:
        """Several processes: one all-reduce (max) of (signal received, non-finite loss seen) over ranks; sets
        the agreed stop signal and returns whether any rank saw a non-finite loss. Every rank calls it at the
        same steps (the loop's agreement points are functions of the global step and of earlier agreements)."""
        flags = torch.stack([torch.tensor(self._signal or 0, device=self.device),
                             (self.meter.first_nonfinite_step >= 0).long()])
        signal_code, nonfinite = distributed.all_reduce_max(flags).tolist()
        if signal_code and self._agreed_signal is None:
            self._agreed_signal = int(signal_code)
        return bool(nonfinite)

    def _check_finite(self, epoch: int) -> None:
        if self.dist.enabled:
            if not self._agree_on_stop():
                return
            # the first bad step over ranks (another collective, only on the way out)
            local = self.meter.first_nonfinite_step
            first = torch.where(local >= 0, local, torch.full_like(local, 2**62))
            distributed.all_reduce_max(first.neg_())
            bad_step = int(-first.item())
            report = self.meter.nonfinite_report() if self.meter.nonfinite_step() == bad_step else "on another process"
        else:
            bad_step = self.meter.nonfinite_step()
            if bad_step < 0:
                return
            report = self.meter.nonfinite_report()
        last = self.run_dir / "checkpoints" / "last.pt" if self.run_dir is not None else None
        kept = (f"the last good checkpoint is kept in {last}" if last is not None and last.is_file()
                else "no checkpoint had been written yet")
        raise UserError(f"non-finite loss at epoch {epoch + 1}, step {bad_step + 1} ({report}); "
                        f"{kept}; lower the lr, or set train.detect_anomaly=true to find the operation")

    def _stop_for_signal(self, bar) -> None:
        if bar is not None:
            bar.close()
        distributed.barrier(self.dist)  # no rank ends before rank 0 has written the checkpoint
        code = 130 if self._stop_signal == signal.SIGINT else 143
        raise Interrupted(code, self.run_dir)

    # -------------------------------------------------------------------------------- progress
    def _bar(self, epoch: int):
        if not self.progress.enabled:
            return None
        stream = self.progress.stream
        if not (hasattr(stream, "isatty") and stream.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, file=stream, leave=False,
                    desc=f"epoch {epoch + 1}/{self.recipe.train.epochs}", dynamic_ncols=True, mininterval=0.5)

    def _refresh(self, bar, step: int) -> None:
        stats = self.meter.read()
        bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in stats.items()
                         if k.startswith("loss") or k == "train_loss"} | {"acc": f"{stats['train_top1']:.1f}"},
                        refresh=False)
        bar.n = step
        bar.refresh()

    def _epoch_line(self, bar, row: dict) -> None:
        if bar is not None:
            bar.close()
        if not self.progress.enabled:
            return
        terms = " ".join(f"{k.replace('loss_', '')}={row[k]:.3f}" for k in row if k.startswith("loss_"))
        print(f"epoch {row['epoch']}/{self.recipe.train.epochs}  loss={row['train_loss']:.3f} {terms}  "
              f"train={row['train_top1']:.1f}%  test={row['test_top1']:.2f}%  "
              f"{row['images_per_second']:.0f} img/s", file=self.progress.stream, flush=True)

    # -------------------------------------------------------------------------------- summary
    def _write_summary(self, wall_seconds: float) -> dict:
        """summary.json; wall_seconds adds up every session of the run (it is kept in the checkpoint)."""
        last = self.rows[-1]
        summary = {
            "name": self.run_dir.name,
            "method": self.recipe.method["name"],
            "arch": self.recipe.model.arch,
            "dataset": self.recipe.data.name,
            "num_classes": self.data.num_classes,
            "train_images": self.data.num_train,
            "epochs": self.recipe.train.epochs,
            "seed": self.recipe.train.seed,
            "best_top1": self.best_top1,
            "best_top5": self.best_top5,
            "best_epoch": self.best_epoch,
            "last_top1": last["test_top1"],
            "last_top5": last["test_top5"],
            "params": self.params,
            "macs": self.macs,
            "train_seconds": self.train_seconds,
            "wall_seconds": wall_seconds,
            "images_per_second": sum(r["images_per_second"] for r in self.rows) / len(self.rows),
            "device": runtime.device_description(self.device),
            "precision": str(self.dtype).replace("torch.", ""),
            "torch": torch.__version__,
            "git_commit": runtime.git_commit(),
            "finished": True,
            "processes": self.dist.world_size,  # of the last session
        }
        if self.dist.is_main:
            atomic_write_json(self.run_dir / "summary.json", summary)
        return summary


# ------------------------------------------------------------------------------------------------ entry points


def train(recipe: Recipe, out: Path, name: Optional[str] = None, progress: Optional[Progress] = None) -> Path:
    """A new run: validate and build everything first, then create the run folder and train. Under torchrun
    every rank calls this; rank 0 creates the run folder and the others learn its name from it."""
    out = Path(out)
    with distributed.session(clean_exits=(Interrupted,)):
        check_out_folder(out)  # before the (slow) data loading: fail fast
        trainer = Trainer(recipe, None, progress)

        def create() -> Path:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot create output folder {out}: {exc.strerror}; choose a writable --out") from None
            check_out_folder(out)
            return create_run_dir(out, name or default_run_name(recipe))

        run_dir = distributed.on_main(trainer.dist, create)
        return _train_new(trainer, run_dir, created=True)


def train_into(recipe: Recipe, run_dir: Path, progress: Optional[Progress] = None) -> Path:
    """A new run in exactly `run_dir` (which must not hold a run yet); used by `compare`."""
    run_dir = Path(run_dir)
    with distributed.session(clean_exits=(Interrupted,)):
        trainer = Trainer(recipe, None, progress)

        def create() -> bool:
            if (run_dir / "config.yaml").exists():
                raise UserError(f"{run_dir} already holds a run; resume it with --resume or choose another folder")
            created = not run_dir.exists()
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot create run folder {run_dir}: {exc.strerror}; choose a writable --out") from None
            return created

        created = distributed.on_main(trainer.dist, create)
        return _train_new(trainer, run_dir, created)


def resume(run_dir: Path, recipe: Optional[Recipe] = None, progress: Optional[Progress] = None) -> Path:
    """Continue `run_dir` from checkpoints/last.pt; the recipe, if given, must be the run's own. Any number of
    processes can resume a checkpoint of any number (each reads the checkpoint; rank 0 holds the lock)."""
    run_dir = Path(run_dir)
    with distributed.session(clean_exits=(Interrupted,)) as ctx:
        if not run_dir.is_dir():
            raise UserError(f"--resume {run_dir}: no such run folder; give the folder that `ipasdctl train` printed")
        lock = RunLock(run_dir)
        distributed.on_main(ctx, lock.acquire)
        try:
            last = run_dir / "checkpoints" / "last.pt"
            if not last.is_file():
                raise UserError(f"--resume {run_dir}: it has no checkpoints/last.pt (the run stopped before its first "
                                "checkpoint); start a new run instead")
            state = load_checkpoint(last)
            saved = recipe_from_dict(state["config"])
            if recipe is not None:
                check_recipe(recipe)
                check_recipe(saved)
                if recipe.to_dict() != saved.to_dict():
                    diff = sorted(_diff_keys(saved.to_dict(), recipe.to_dict()))
                    raise UserError(f"--resume {run_dir}: the given recipe differs from the run's ({', '.join(diff)}); "
                                    "resume without recipe options, or start a new run")
            trainer = Trainer(saved, run_dir, progress)
            trainer.load_state_dict(state)
            del state
            trainer.run_dir = run_dir
            trainer.run()
        finally:
            lock.release()
    return run_dir


def resume_recipe(run_dir: Path, recipe: Optional[str], overrides: Optional[dict]) -> Optional[Recipe]:
    """The recipe a `train --resume` command line asks for, to compare with the run's own: the named recipe
    (with the options over it), or, without --recipe, the run's saved recipe with the options over it; None
    when the command line gives neither (then the run's recipe is used as it is)."""
    if recipe:
        return load_recipe(recipe, overrides)
    if not overrides:
        return None
    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        return None  # resume() reports the missing run folder / checkpoint
    import yaml

    try:
        saved = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    merged = deep_merge(saved, overrides)
    saved_method, new_method = (saved.get("method") or {}).get("name"), overrides.get("method")
    if isinstance(new_method, dict) and new_method.get("name", saved_method) != saved_method:
        merged["method"] = new_method  # another method: the saved one's parameters do not apply to it
    return recipe_from_dict(merged)


def _train_new(trainer: Trainer, run_dir: Path, created: bool) -> Path:
    """Train a new run into `run_dir`; if it fails before its first checkpoint, leave no run behind.
    Under several processes rank 0 alone locks and writes the folder."""
    main = trainer.dist.is_main
    trainer.run_dir = run_dir
    trainer.ctx.run_dir = str(run_dir)
    lock = RunLock(run_dir)
    try:
        distributed.on_main(trainer.dist, lock.acquire)
    except UserError:
        if created and main:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    try:
        if main:
            atomic_write_text(run_dir / "config.yaml", dump_recipe(trainer.recipe))
        trainer.run()
    except BaseException as exc:
        if main and not isinstance(exc, Interrupted) and not (run_dir / "checkpoints" / "last.pt").exists():
            lock.release()
            _remove_partial_run(run_dir, created)
        raise
    finally:
        lock.release()
    return run_dir


def _remove_partial_run(run_dir: Path, created: bool) -> None:
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for name in ("config.yaml", "metrics.csv", "summary.json"):
        try:
            (run_dir / name).unlink()
        except OSError:
            pass
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def _test_signal_at_step() -> Optional[tuple[int, int, Optional[int]]]:
    """(global step, signal, rank or None for every rank) from IPASDCTL_TEST_SIGNAL_AT_STEP=
    'N[:KILL|TERM|INT][@RANK]'; tests only."""
    value = os.environ.get(TEST_SIGNAL_ENV)
    if not value:
        return None
    value, _, rank = value.partition("@")
    step, _, name = value.partition(":")
    return (int(step), int(getattr(signal, "SIG" + (name or "KILL").upper().removeprefix("SIG"))),
            int(rank) if rank else None)


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in set(a) | set(b):
        full = f"{prefix}{key}"
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            keys += _diff_keys(a[key], b[key], full + ".")
        elif a.get(key) != b.get(key):
            keys.append(full)
    return keys


def load_run_model(run_dir: Path, checkpoint: str = "best", device: str = "cpu"):
    """(model in eval mode, checkpoint state, recipe) of a run folder, weights loaded weights-only."""
    run_dir = Path(run_dir)
    if checkpoint not in ("best", "last"):
        raise UserError(f"--checkpoint must be best or last, got '{checkpoint}'")
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not path.is_file():
        raise UserError(f"{run_dir} has no checkpoints/{checkpoint}.pt; is it a run folder of a finished "
                        "`ipasdctl train`?")
    state = load_checkpoint(path)
    recipe = recipe_from_dict(state["config"])
    model = build_model(state.get("arch", recipe.model.arch), int(state["num_classes"]))
    model.load_state_dict(state["model"])
    model.to(runtime.resolve_device(device)).eval()
    return model, state, recipe
