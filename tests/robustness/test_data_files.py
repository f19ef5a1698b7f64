"""Hostile data files: damaged or planted CIFAR pickles (a restricted unpickler), absurd or nested
contents, empty splits, image folders with symlink loops or empty classes, decompression bombs, images past
Pillow's pixel bound, and a FIFO or a device given as an image.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ipasdctl import training
from ipasdctl.cli import main
from ipasdctl.data.cifar import load_cifar10, read_pickle
from ipasdctl.data.decode import load_rgb
from ipasdctl.data.imagefolder import load_image_folder
from ipasdctl.errors import UserError
from ipasdctl.training import train
from tests.helpers import assert_no_run_folder, cli_error, DIGITS, only_line, Payload, picture, SystemPayload, tiny_cifar_args, tiny_onnx


def damaged_copy(make_tiny_cifar, tmp_path, damage: str):
    root = make_tiny_cifar(tmp_path / "data", train=40, test=10)
    folder = root / "cifar-10-batches-py"
    target = folder / "data_batch_3"
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:1500])
    elif damage == "garbage":
        target.write_bytes(b"\x00not a pickle" * 200)
    elif damage == "missing-file":
        target.unlink()
    elif damage == "wrong-shape":
        target.write_bytes(pickle.dumps({b"labels": [1, 2], b"data": b"\x00" * 100}, protocol=2))
    elif damage == "labels-out-of-range":  # in the test split (the training subset could leave the row out)
        target = folder / "test_batch"
        batch = pickle.loads(target.read_bytes(), encoding="latin1")
        batch[b"labels"][0] = 12
        target.write_bytes(pickle.dumps(batch, protocol=2))
    return root


@pytest.mark.parametrize("damage,expected", [
    ("truncated", "data_batch_3 is truncated or corrupt (UnpicklingError); download the data set again"),
    ("garbage", "data_batch_3 is truncated or corrupt"),
    ("missing-file", "lacks data_batch_3; expected the full 'python version' layout"),
    ("wrong-shape", "data_batch_3 is corrupt: expected uint8 N x 3072 images and N labels"),
    ("labels-out-of-range", "to 12 but 10 classes; its files are corrupt or do not belong together"),
])
def test_damaged_data_file_is_one_line(damage, expected, tmp_path, make_tiny_cifar, capsys):
    root = damaged_copy(make_tiny_cifar, tmp_path, damage)
    out = tmp_path / "runs"
    line = cli_error(tiny_cifar_args(root, out, "--epochs", "1"), capsys)
    assert expected in line, line
    assert_no_run_folder(out)


def test_an_empty_cifar_test_split_is_refused_before_training(make_tiny_cifar, tmp_path, capsys):
    root = make_tiny_cifar(tmp_path / "data", train=40, test=0)
    out = tmp_path / "runs"
    line = cli_error(tiny_cifar_args(root, out, "--epochs", "1"), capsys)
    assert "data set 'cifar10' has no test images (its test split is empty" in line
    assert_no_run_folder(out)


def test_an_image_folder_with_empty_val_classes_is_refused(tmp_path, capsys):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        (tmp_path / "data" / "val" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "data" / "train" / cls / f"{i}.png")
    out = tmp_path / "runs"
    line = cli_error(["train", "--dataset", "imagefolder", "--data", str(tmp_path / "data"), "--arch", "resnet8",
                    "--method", "ce", "--batch-size", "4", "--device", "cpu", "--quiet", "--out", str(out),
                    "--epochs", "1", "--set", "data.image_size=8", "--set", "data.num_workers=0"], capsys)
    assert "data set 'imagefolder' has no test images" in line
    assert_no_run_folder(out)


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
    assert "test_batch is not a plain CIFAR file" in only_line(capsys.readouterr().err)
    assert not marker.exists() and not out.exists()


def test_a_symlink_loop_in_an_image_folder_is_one_line(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "data" / cls / f"{i}.png")
    (tmp_path / "data" / "b" / "loop").symlink_to(tmp_path / "data")
    with pytest.raises(UserError, match="is a symlink back to .* the image folder loops; remove the link"):
        load_image_folder(str(tmp_path / "data"), image_size=8, num_workers=0)


def test_a_decompression_bomb_image_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 pixels is then a bomb, as 10^10 is by default
    with pytest.raises(UserError, match=r"cannot decode image .*bomb.png: it is too large \(4,096 pixels, beyond the "
                                         r"bound of 100 pixels against decompression bombs\)"):
        load_rgb(str(path))


def cifar_with(make_tiny_cifar, tmp_path, **entries):
    root = make_tiny_cifar(tmp_path / "data", train=40, test=10)
    path = root / "cifar-10-batches-py" / ("batches.meta" if "label_names" in entries else "test_batch")
    batch = pickle.loads(path.read_bytes(), encoding="latin1")
    batch.update({k.encode(): v for k, v in entries.items()})
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return root


@pytest.mark.parametrize("entries,expected", [
    ({"labels": [2**70] * 10}, "its 'labels' are not a list of integers"),
    ({"labels": 3}, "its 'labels' are not a list of integers"),
    ({"label_names": 5}, "its class names are not a list of names"),
    ({"data": "text"}, "expected uint8 N x 3072 images and N labels, found a str"),
])
def test_absurd_cifar_contents_are_one_line(entries, expected, make_tiny_cifar, tmp_path):
    root = cifar_with(make_tiny_cifar, tmp_path, **entries)
    with pytest.raises(UserError, match=expected.replace("(", r"\(")):
        load_cifar10(str(root))


def test_pathologically_nested_cifar_labels_are_one_line(make_tiny_cifar, tmp_path):
    root = make_tiny_cifar(tmp_path / "data", train=40, test=10)
    depth = 100_000  # nested lists: [[[[...]]]], written opcode by opcode (pickle.dumps would recurse)
    nested = b"]" * depth + b"a" * (depth - 1)
    raw = b"\x80\x02}(X\x06\x00\x00\x00labels" + nested + b"X\x04\x00\x00\x00data]u."
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(raw)
    with pytest.raises(UserError, match="test_batch is corrupt: its 'labels' are not a list of integers"):
        load_cifar10(str(root))


def test_an_image_past_pillows_pixel_bound_is_one_line_not_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = picture(tmp_path / "big.png", 40)  # 1,600 pixels: past the bound, below the 2x where Pillow raises
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match=r"big.png: it is too large \(1,600 pixels, beyond the bound of 1,000 "):
            load_rgb(str(path))
    assert caught == []
    model = tiny_onnx(tmp_path / "m.onnx", {**DIGITS, "input_size": "[3, 8, 8]"})
    line = cli_error(["predict", model, str(path)], capsys)  # one stderr line: no warning lines beside it
    assert "big.png: it is too large (1,600 pixels" in line


def test_predict_on_a_fifo_or_a_device_says_what_it_is(tmp_path, capsys):
    model = tiny_onnx(tmp_path / "m.onnx", {**DIGITS, "input_size": "[3, 8, 8]"})
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    device = tmp_path / "zero.png"
    device.symlink_to("/dev/zero")
    dangling = tmp_path / "gone.png"
    dangling.symlink_to(tmp_path / "nowhere.png")
    assert f"{fifo} is a FIFO (named pipe), not an image file" in cli_error(["predict", model, str(fifo)], capsys)
    assert f"{device} is a symlink to /dev/zero, which is a character device, not an image file" in cli_error(
        ["predict", model, str(device)], capsys)
    assert f"{dangling} is a symlink to {tmp_path / 'nowhere.png'}, which does not exist" in cli_error(
        ["predict", model, str(dangling)], capsys)
