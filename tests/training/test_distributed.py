"""Several processes: `ipasdctl train --nproc 2` (torchrun, DistributedDataParallel, gloo on CPU), for real.

The exact comparison (test_two_processes_hold_what_one_process_holds). A 2-process run and a 1-process run
must end with the same per-sample memories and prototypes when they see the same samples with the same
weights. Made exact like this:
- the same weights: optim.lr = 1e-12 with momentum 0, weight decay 0, no warm-up, a constant schedule
  (--lr must be positive): an update moves a weight by ~1e-12, below float32 resolution for every weight but
  the zero-initialised BatchNorm biases, whose 1e-12 moves are invisible in the outputs;
- the same sub-batches: DDP's BatchNorm normalises each rank's share of a batch, so the 1-process reference
  trains on exactly those shares, in order. The 2-process run has global batch 16: rank r takes the r-th
  contiguous half of each batch of the seeded permutation. The 1-process run has batch 8 over the same
  permutation (its seed does not depend on the batch size), so its batches are r0 s0, r1 s0, r0 s1, r1 s1,
  ...: the ranks' sub-batches, in order (64 images: no short last batch). IPASD's blend counts are per rank
  batch, i.e. per 8 images in both runs, so the loss terms agree too;
- no augmentation (data.augment=false: each rank draws augmentations of its own), float32 memory tables.
What differs is only the order of float sums (the prototypes sum per rank, then over ranks), hence the
tolerance 1e-5 (measured: memories within 7e-8, prototypes within 1.2e-7). Two epochs, so the second epoch uses the
first epoch's all-reduced prototypes and both memories are written; the memories compared are rank 0's
checkpoint, which holds every rank's rows only if the rows reached rank 0. The test figures (loss, accuracy)
are not compared: each rank's BatchNorm running statistics come from its own shares.

The other runs are stopped by SIGTERM to rank 1 alone (test hook IPASDCTL_TEST_SIGNAL_AT_STEP="2:TERM@1"):
both ranks agree on the step, rank 0 checkpoints mid-epoch with every rank's state, and 1 process resumes.
One thread per process (OMP_NUM_THREADS=1); the five 2-process runs start together.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ipasdctl.cli import main
from ipasdctl.data.base import RandomBatches
from ipasdctl.data.samplers import ClassPairBatches, OverlapBatches
from ipasdctl.methods import Collectives
from ipasdctl.safe_io import load_checkpoint
from ipasdctl.training.distributed import DistContext, shard_batches
from ipasdctl.methods.ipasd import Prototypes
from tests.helpers import start_cli as start

pytestmark = pytest.mark.slow  # real processes (torchrun, kills and resumes): tens of seconds

TINY = ["--dataset", "digits", "--arch", "resnet8", "--epochs", "2", "--device", "cpu", "--quiet",
        "--set", "data.train_subset=64"]
FROZEN = ["--method", "ipasd", "--lr", "1e-12", "--set", "optim.momentum=0", "--set", "optim.weight_decay=0",
          "--set", "optim.warmup_epochs=0", "--set", "optim.schedule=constant", "--set", "data.augment=false",
          "--set", "method.memory_dtype=float32"]
TRAIN_TERMS = ("train_loss", "loss_soft", "loss_con", "w_s", "alpha", "train_top1")


def run_in_process(args: list[str], capsys) -> tuple[int, str, str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the subprocesses (and no oversubscription of the 2 cores)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """The five `--nproc 2` runs, side by side: the frozen comparison run, ipasd and dlb stopped by a
    SIGTERM to rank 1 after global step 2 of 4 (batch 16 over 64 images), one whose workers find no data and
    one whose rank 1 is killed."""
    out = tmp_path_factory.mktemp("distributed")
    processes = {
        "frozen": start(["train", "--nproc", "2", *TINY, *FROZEN, "--batch-size", "16", "--out", str(out / "frozen")]),
        "ipasd": start(["train", "--nproc", "2", *TINY, "--method", "ipasd", "--batch-size", "16",
                        "--out", str(out), "--name", "ipasd-stopped"], "2:TERM@1"),
        "dlb": start(["train", "--nproc", "2", *TINY, "--method", "dlb", "--batch-size", "16",
                      "--out", str(out), "--name", "dlb-stopped"], "2:TERM@1"),
        # an error only the workers meet (the launcher does not read data)
        "no-data": start(["train", "--nproc", "2", "--dataset", "cifar10", "--data", str(out / "missing"),
                          "--epochs", "1", "--device", "cpu", "--quiet", "--out", str(out / "no-data")]),
        # rank 1 dies (SIGKILL, as the out-of-memory killer does); rank 0's broken collective is not reported
        "killed": start(["train", "--nproc", "2", *TINY, "--batch-size", "16", "--out", str(out / "killed")],
                        "2:KILL@1"),
    }
    log = {}
    for key, process in processes.items():
        stdout, stderr = process.communicate(timeout=240)  # a deadlock would end here
        log[key] = (process.returncode, stdout, stderr)
    return out, log


def test_two_processes_hold_what_one_process_holds(two_process_runs, tmp_path, capsys):
    out, log = two_process_runs
    code, stdout, stderr = log["frozen"]
    assert code == 0, stderr
    # one run folder, printed once (by rank 0) as the only stdout line
    folders = list((out / "frozen").iterdir())
    assert len(folders) == 1 and stdout.splitlines() == [str(folders[0])]
    two = folders[0]
    assert json.loads((two / "summary.json").read_text())["processes"] == 2

    code, stdout, stderr = run_in_process(["train", *TINY, *FROZEN, "--batch-size", "8", "--out", str(tmp_path),
                                           "--name", "one"], capsys)
    assert code == 0, stderr
    one = tmp_path / "one"
    a = load_checkpoint(two / "checkpoints" / "last.pt")["method"]
    b = load_checkpoint(one / "checkpoints" / "last.pt")["method"]
    for memory in ("last_softmax", "last_proto"):
        table_two, table_one = a[memory]["table"], b[memory]["table"]
        assert table_two.dtype == torch.float32
        torch.testing.assert_close(table_two, table_one, atol=1e-5, rtol=0)
    onehot = F.one_hot(torch.as_tensor(_digits_subset_labels()), 10).float()
    # both memories were written for every sample (epoch 0 wrote softmaxes, epoch 1 prototype predictions)
    assert (a["last_softmax"]["table"] - onehot).abs().amax(1).min() > 0.1
    assert (a["last_proto"]["table"] - onehot).abs().amax(1).min() > 0.1
    for key in ("sums", "counts", "current"):
        torch.testing.assert_close(a["prototypes"][key], b["prototypes"][key], atol=1e-5, rtol=0)
    assert a["prototypes"]["counts"].sum().item() == 64  # both ranks' samples
    # the per-epoch training terms (summed over ranks) and IPASD's blend (per rank batch) agree
    rows_two, rows_one = read_metrics(two), read_metrics(one)
    assert len(rows_two) == len(rows_one) == 2
    for row_two, row_one in zip(rows_two, rows_one):
        for term in TRAIN_TERMS:
            assert float(row_two[term]) == pytest.approx(float(row_one[term]), rel=2e-5, abs=1e-6), term
    assert float(rows_two[1]["loss_con"]) > 0 and float(rows_two[1]["w_s"]) != 0.5


def _digits_subset_labels() -> torch.Tensor:
    from ipasdctl.config import DataConfig
    from ipasdctl.data import build_data

    return build_data(DataConfig(name="digits", train_subset=64)).train_labels


def _stopped(two_process_runs, name: str) -> tuple[Path, dict]:
    out, log = two_process_runs
    code, stdout, stderr = log[name]
    run_dir = out / f"{name}-stopped"
    # torchrun reports the workers' status 143 as its own failure (1); nothing was printed on stdout
    assert code in (1, 143) and stdout == "", stderr
    assert stderr.count(f"resume with: ipasdctl train --resume {run_dir}") <= 1  # rank 0's line only
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    # both ranks stopped after the same step, and rank 0's checkpoint holds both ranks' running sums
    assert (state["epoch"], state["step_in_epoch"], state["global_step"], state["world_size"]) == (0, 2, 2, 2)
    assert state["meter"]["count"].item() == 32
    assert not (run_dir / ".lock").exists() and not (run_dir / "summary.json").exists()
    return run_dir, state


def _resume_in_one_process(run_dir: Path, capsys) -> None:
    code, stdout, stderr = run_in_process(["train", "--resume", str(run_dir), "--quiet"], capsys)
    assert code == 0, stderr
    assert stdout.splitlines() == [str(run_dir)]
    assert [row["epoch"] for row in read_metrics(run_dir)] == ["1", "2"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["processes"] == 1


def test_sigterm_to_one_rank_stops_both_and_one_process_resumes_ipasd(two_process_runs, capsys):
    run_dir, state = _stopped(two_process_runs, "ipasd")
    method = state["method"]
    # the two global batches done so far: 32 samples, half of them trained on by each rank
    seen = torch.cat(RandomBatches(torch.zeros(64), 16, 0)(0)[:2])
    assert method["prototypes"]["counts"].sum().item() == 32  # summed over ranks into the checkpoint
    labels = _digits_subset_labels()
    assert torch.equal(method["prototypes"]["counts"], torch.bincount(labels[seen], minlength=10).float())
    written = (method["last_softmax"]["table"].float() - F.one_hot(labels, 10).float()).abs().amax(1) > 1e-3
    assert torch.equal(written.nonzero().flatten(), seen.sort().values)  # every seen row, from both ranks
    _resume_in_one_process(run_dir, capsys)
    final = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert final["method"]["prototypes"]["counts"].sum().item() == 64 and final["world_size"] == 1


def test_sigterm_to_one_rank_stops_both_and_one_process_resumes_dlb(two_process_runs, capsys):
    run_dir, state = _stopped(two_process_runs, "dlb")
    # the stored logits of both ranks, in rank order: the whole new chunk of global step 2
    _repeated, new = OverlapBatches(torch.zeros(64, dtype=torch.long), 16, 0).parts(0, 2)[1]
    assert torch.equal(state["method"]["stored_indices"], new)
    assert state["method"]["stored_logits"].shape == (16, 10)
    # the resumed process repeats that chunk as its step 3's first half (checked against the plan there)
    _resume_in_one_process(run_dir, capsys)


# ------------------------------------------------------------------------------------------------ bad input


def test_a_worker_error_is_one_line_with_its_status_not_torchruns_traceback(two_process_runs):
    out, log = two_process_runs
    code, stdout, stderr = log["no-data"]
    assert code == 2 and stdout == "", stderr
    assert stderr.splitlines() == [stderr.strip()] and stderr.startswith("error: ") and \
        "does not exist" in stderr, stderr
    assert not (out / "no-data").exists() or list((out / "no-data").iterdir()) == []


def test_a_killed_worker_is_one_line_with_the_signal_status(two_process_runs):
    out, log = two_process_runs
    code, stdout, stderr = log["killed"]
    assert code == 128 + 9, stderr
    assert stderr.splitlines() == [stderr.strip()] and \
        stderr.startswith("error: the training process of rank 1 was killed by SIGKILL"), stderr


def test_sync_bn_on_cpu_and_a_batch_smaller_than_the_processes_are_one_line_errors(tmp_path, capsys):
    for args, message in (
        (["--sync-bn"], "--sync-bn (train.sync_bn) needs CUDA"),
        (["--sync-bn", "--nproc", "2"], "--sync-bn (train.sync_bn) needs CUDA"),
        (["--nproc", "2", "--batch-size", "1"], "batch size 1 is smaller than --nproc 2"),
        (["--nproc", "0"], "--nproc must be 1 or more"),
    ):
        code, stdout, stderr = run_in_process(["train", *TINY, "--out", str(tmp_path), *args], capsys)
        assert code == 2 and stdout == "", (args, stderr)
        assert len(stderr.strip().splitlines()) == 1 and message in stderr, (args, stderr)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ pieces


def test_default_sharding_splits_each_global_batch_into_contiguous_shares():
    plan = RandomBatches(torch.zeros(21), 8, seed=3)  # batches of 8, 8, 5
    shares = [shard_batches(plan, DistContext(rank, 3, rank))(0) for rank in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]
    for step, batch in enumerate(plan(0)):
        assert torch.equal(torch.cat([shares[rank][step] for rank in range(3)]), batch)
    assert [b.numel() for b in shares[0]] == [3, 3, 2] and [b.numel() for b in shares[2]] == [2, 2, 1]
    # a last global batch too small to give every rank a sample is left out; one process: the plan itself
    six = [shard_batches(plan, DistContext(rank, 6, rank))(0) for rank in range(6)]
    assert {len(s) for s in six} == {2}
    assert shard_batches(plan, DistContext()) is plan
    # a plan made of parts shards itself (class pairs: each rank's partners are its own anchors')
    pairs = ClassPairBatches(torch.arange(24) % 4, 8, seed=0)
    mine = shard_batches(pairs, DistContext(1, 2, 1))(0)
    assert all(torch.equal(a, b) for a, b in zip(mine, pairs.sharded(0, 1, 2)))


def _rank_of(rank: int, world_size: int) -> Collectives:
    """The collectives a method's state sees on one rank of several (the calls stay local)."""
    collectives = Collectives()
    collectives.rank, collectives.world_size = rank, world_size
    return collectives


def test_restored_prototype_sums_are_counted_once_over_ranks():
    saved = Prototypes(3, 2, "cpu")
    saved.accumulate(torch.tensor([[3.0, 4.0], [0.0, 2.0]]), torch.tensor([0, 2]))
    state = saved.state_dict()
    for rank, expected_counts in ((0, [1.0, 0.0, 1.0]), (1, [0.0, 0.0, 0.0])):
        restored = Prototypes(3, 2, "cpu", _rank_of(rank, 2))
        restored.load_state_dict(state)
        assert restored.counts.tolist() == expected_counts
        assert torch.equal(restored.sums, state["sums"] if rank == 0 else torch.zeros(3, 2))


def test_dlb_stored_logits_are_shared_out_on_resume_and_checked_against_the_plan():
    from ipasdctl.errors import UserError
    from ipasdctl.methods.dlb import LastStepLogits

    logits, indices = torch.arange(12.0).view(6, 2), torch.tensor([7, 3, 5, 0, 9, 2])
    state = {"stored_logits": logits, "stored_indices": indices}  # a 1- or 2-process checkpoint alike
    for rank, share in ((0, slice(0, 3)), (1, slice(3, 6))):
        restored = LastStepLogits(2, "cpu", _rank_of(rank, 2))
        restored.load_state_dict(state, "cpu")
        # the share OverlapBatches.sharded repeats on this rank: part `rank` of tensor_split(2)
        assert torch.equal(restored.logits, logits[share]) and torch.equal(restored.indices, indices[share])
        restored.verify(indices[share])  # the plan repeats those samples: accepted (checked once)
        assert not restored.check_against_plan
    restored = LastStepLogits(2, "cpu")
    restored.load_state_dict(state, "cpu")
    with pytest.raises(UserError, match="number of processes it was checkpointed with"):
        restored.verify(indices.flip(0))


def test_report_failure_prints_the_first_failing_ranks_error_once(tmp_path, capsys):
    from ipasdctl.training.launcher import report_failure

    (tmp_path / "rank000000.traceback").write_text("Traceback ...\nRuntimeError: Connection closed by peer\n")
    (tmp_path / "rank000001.error").write_text("2\nno data here; point --data at it")
    (tmp_path / "rank000002.error").write_text("2\nanother line")
    assert report_failure(str(tmp_path), 1, 2) == 2  # rank 1 failed first: its line, not rank 0's traceback
    assert capsys.readouterr().err == "error: no data here; point --data at it\n"
    assert report_failure(str(tmp_path), 0, 1) == 1  # a bug: its traceback as it was
    assert capsys.readouterr().err == "Traceback ...\nRuntimeError: Connection closed by peer\n"
    assert report_failure(str(tmp_path), 3, -15) == 143  # killed: nothing left, one line says so
    assert capsys.readouterr().err.startswith("error: the training process of rank 3 was killed by SIGTERM;")
    assert report_failure(str(tmp_path), None, 0) == 0  # a stop by signal: the lowest rank's line, if any
    assert capsys.readouterr().err == "error: no data here; point --data at it\n"
