"""Safe loading and atomic files.

- Checkpoints load weights-only: a checkpoint carrying pickled code is refused with one line, and its payload
  (which would create a file) never runs, whichever command reads it.
- CIFAR "python version" files are read by a restricted unpickler: what the official files hold (written by
  Python 2 with NumPy 1.x) and re-exports (Python 3, protocols 2-5) load; any other global is refused unrun.
- Writes are atomic: a failure or a kill before the rename leaves the previous file and no temporary file.
- The RNG snapshot in a checkpoint survives the weights-only round trip and restores every generator.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import struct

import numpy as np
import pytest
import torch

from ipasdctl import runtime
from ipasdctl.cli import main
from ipasdctl.data.cifar import load_cifar10, read_pickle
from ipasdctl.runs import load_model as load_run_model
from ipasdctl.errors import UserError
from ipasdctl.files import atomic_write_text, load_checkpoint, save_checkpoint


class Payload:
    """Unpickling this runs open(path, 'w'): the file appearing means the payload ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class SystemPayload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("payload_class", [Payload, SystemPayload])
def test_checkpoint_with_pickled_code_is_refused_and_never_runs(tmp_path, payload_class):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": payload_class(marker)}, path)
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "not a weights-only checkpoint;" in message and "\n" not in message
    assert ("open" in message) if payload_class is Payload else ("system" in message)
    assert not marker.exists()


def test_every_command_path_refuses_the_planted_checkpoint(tmp_path, capsys):
    """`train --resume` and load_run_model (eval/export/bench) read checkpoints through load_checkpoint."""
    marker = tmp_path / "payload-ran"
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for name in ("last.pt", "best.pt"):
        torch.save({"model": {}, "config": {}, "x": Payload(marker)}, run_dir / "checkpoints" / name)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", str(run_dir)])
    assert exit_info.value.code == 2
    assert "not a weights-only checkpoint;" in one_line(capsys.readouterr().err)
    with pytest.raises(UserError, match="not a weights-only checkpoint;"):
        load_run_model(run_dir, "best")
    assert not marker.exists()
    assert not (run_dir / ".lock").exists()


def test_a_real_checkpoint_round_trips_weights_only(tmp_path):
    state = {"model": {"w": torch.randn(3, 3)}, "rows": [{"epoch": 1, "lr": 0.1}], "rng": runtime.rng_state(),
             "best": {"top1": 12.5}, "names": ["a", "b"]}
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["rows"] == state["rows"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_torn_or_foreign_checkpoint_is_one_line(tmp_path, damage):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {"w": torch.randn(64, 64)}})
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00junk" * 50, "empty": b""}[damage])
    with pytest.raises(UserError, match="is not a readable checkpoint") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_rng_snapshot_restores_python_numpy_and_torch(tmp_path):
    runtime.seed_everything(123)
    random.random(), np.random.rand(3), torch.rand(3)  # move every generator off its seed
    save_checkpoint(tmp_path / "rng.pt", {"model": {}, "rng": runtime.rng_state()})
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn())
    runtime.seed_everything(999)
    runtime.set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn()) == expected


# ------------------------------------------------------------------------------------------ CIFAR pickles


def test_the_shared_tiny_cifar_fixtures_load(tiny_cifar, tiny_cifar100):
    from ipasdctl.data.cifar import load_cifar100

    ten, hundred = load_cifar10(str(tiny_cifar)), load_cifar100(str(tiny_cifar100))
    assert (ten.num_train, ten.num_test, ten.num_classes, ten.image_shape) == (200, 50, 10, (3, 32, 32))
    assert (hundred.num_train, hundred.num_test, hundred.num_classes) == (200, 100, 100)
    assert ten.class_names[3] == "class3" and hundred.class_names[42] == "fine42"
    assert torch.bincount(ten.train_labels, minlength=10).tolist() == [20] * 10


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING opcodes), the way the official CIFAR files were written."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_style_pickle(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    # NumPy 1.x named its reconstructor numpy.core.multiarray (GLOBAL opcodes are text lines)
    return buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def test_restricted_unpickler_reads_official_style_and_re_exported_files(tmp_path):
    images = np.arange(4 * 3072, dtype=np.uint8).reshape(4, 3072)
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 1, 4, 1], b"data": images,
             b"filenames": [b"a.png", b"b.png", b"c.png", b"d.png"]}
    official = py2_style_pickle(batch)
    assert b"numpy.core.multiarray" in official and b"_codecs" not in official
    blobs = {"official": official, **{f"protocol{p}": pickle.dumps(batch, protocol=p) for p in (2, 3, 4, 5)}}
    for name, blob in blobs.items():
        (tmp_path / name).write_bytes(blob)
        loaded = read_pickle(tmp_path / name)
        assert loaded["labels"] == [3, 1, 4, 1], name
        assert loaded["data"].dtype == np.uint8 and np.array_equal(loaded["data"], images), name
        assert loaded["batch_label"] in ("training batch 1 of 5", b"training batch 1 of 5"), name


@pytest.mark.parametrize("payload", ["open", "system", "eval", "codecs_other", "numpy_load"])
def test_restricted_unpickler_refuses_anything_else_unrun(tmp_path, make_tiny_cifar, payload):
    marker = tmp_path / "payload-ran"

    class Eval:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w')",))

    class NumpyLoad:
        def __reduce__(self):
            return (np.load, (str(marker),))

    class OtherCodec:  # _codecs.encode is allowed only as the latin-1 bytes trick
        def __reduce__(self):
            import _codecs

            return (_codecs.encode, ("x", "rot13"))

    objects = {"open": Payload(marker), "system": SystemPayload(marker), "eval": Eval(), "numpy_load": NumpyLoad(),
               "codecs_other": OtherCodec()}
    folder = make_tiny_cifar(tmp_path, train=20, test=10) / "cifar-10-batches-py"
    batch = {b"labels": [0], b"data": np.zeros((1, 3072), np.uint8), b"extra": objects[payload]}
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(UserError, match="is not a plain CIFAR file") as info:
        load_cifar10(str(tmp_path))
    assert "refusing to load it" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_cli_refuses_a_planted_cifar_file_without_a_run_folder(tmp_path, make_tiny_cifar, capsys):
    marker = tmp_path / "payload-ran"
    root = make_tiny_cifar(tmp_path / "data", train=20, test=10)
    batch = {b"labels": [0], b"data": np.zeros((1, 3072), np.uint8), b"x": SystemPayload(marker)}
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dataset", "cifar10", "--data", str(root), "--out", str(out), "--epochs", "1"])
    assert exit_info.value.code == 2
    assert "test_batch is not a plain CIFAR file" in one_line(capsys.readouterr().err)
    assert not marker.exists() and not out.exists()


# ------------------------------------------------------------------------------------------ atomic writes


def test_write_failure_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    atomic_write_text(path, "epoch\n1\n")
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~runtime_umask())

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("ipasdctl.files.os.fsync", no_space)
    with pytest.raises(UserError) as info:
        atomic_write_text(path, "epoch\n1\n2\n")
    assert str(info.value) == (f"cannot write {path}: No space left on device (the previous file is kept); "
                               "free disk space or choose another --out")
    assert path.read_text() == "epoch\n1\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_a_kill_before_the_rename_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}})

    def killed(src, dst):  # the process dies between the fsync and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr("ipasdctl.files.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_atomic_write_never_exposes_a_partial_file(tmp_path, monkeypatch):
    """While the new content is being written the path still holds the old file, whole."""
    import ipasdctl.files as io_module

    path = tmp_path / "summary.json"
    atomic_write_text(path, '{"old": true}\n')
    seen = []
    real_fsync = os.fsync

    def fsync_and_look(fd):
        seen.append(path.read_text())  # what a reader (or a crash) sees at this instant
        real_fsync(fd)

    monkeypatch.setattr(io_module.os, "fsync", fsync_and_look)
    atomic_write_text(path, '{"new": true}\n')
    assert seen[0] == '{"old": true}\n' and path.read_text() == '{"new": true}\n'


def runtime_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
