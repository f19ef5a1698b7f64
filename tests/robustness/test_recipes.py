"""Hostile recipes and YAML: alias bombs, deep nesting, duplicate keys, text that is not UTF-8, and a run's
config.yaml (or a comparison's comparison.yaml) damaged or edited by hand. Each is one line, exit 2, before
anything is made.
"""

from __future__ import annotations

import time

import pytest
import yaml

from ipasdctl import training
from ipasdctl.config import load_recipe, parse_set
from ipasdctl.errors import UserError
from ipasdctl.safe_io import load_checkpoint
from ipasdctl.runs import RunFolder
from ipasdctl.training import train
from ipasdctl.yaml_files import load_yaml, MAX_DEPTH
from tests.helpers import cli_error, copy_run, snapshot


def test_resume_with_a_corrupt_config_yaml_is_one_line_and_keeps_the_run(finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    (run_dir / "config.yaml").write_text("train: [unclosed\n")
    before = snapshot(run_dir)
    for extra in ([], ["--set", "optim.lr=0.2"]):
        line = cli_error(["train", "--resume", str(run_dir), *extra], capsys)
        assert "its config.yaml is not readable YAML" in line and "remove config.yaml" in line
    assert snapshot(run_dir) == before
    # the options are compared with the checkpoint's recipe, not swallowed with the unreadable config.yaml
    given = training.resume_recipe(run_dir, None, parse_set(["optim.lr=0.2"]))
    assert given is not None and given.optim.lr == 0.2
    (run_dir / "config.yaml").unlink()  # as the line says: resume writes it again from the checkpoint
    training.resume(run_dir, None, training.Progress(enabled=False))
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == load_checkpoint(run_dir / "checkpoints" / "last.pt")["config"]


def test_resume_with_a_hand_edited_config_yaml_names_the_keys(finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["optim"]["lr"] = 0.2
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    before = snapshot(run_dir)
    line = cli_error(["train", "--resume", str(run_dir)], capsys)
    assert "config.yaml disagrees with the recipe in checkpoints/last.pt (optim.lr)" in line
    assert snapshot(run_dir) == before


def test_a_yaml_alias_bomb_is_one_line_at_once(tmp_path, capsys):
    levels = ["&a [x, x, x, x, x, x, x, x, x]"] + [
        f"&{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]  # 9^9 leaves if expanded
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(f"name: [{', '.join(levels)}]\n")
    started = time.monotonic()
    line = cli_error(["train", "--recipe", str(recipe), "--out", str(tmp_path / "runs")], capsys)
    assert time.monotonic() - started < 10
    assert "name must be a string, got [" in line and len(line) < 300


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("name: café\n".encode("latin-1"))
    assert f"recipe {recipe} is not UTF-8 text (byte 9)" in cli_error(["train", "--recipe", str(recipe)], capsys)


def test_a_deeply_nested_recipe_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("name: " + "[" * 50_000 + "]" * 50_000 + "\n")  # 100 kB, under the 1 MB recipe bound
    line = cli_error(["train", "--recipe", str(recipe), "--out", str(tmp_path / "runs")], capsys)
    assert f"recipe {recipe} nests deeper than {MAX_DEPTH} levels (at line 1, column {6 + MAX_DEPTH})" in line
    assert not (tmp_path / "runs").exists()


def test_deep_nesting_is_refused_in_set_values_config_yaml_and_comparison_yaml(demo_run, tmp_path, capsys):
    deep = "{a: " * 5000 + "1" + "}" * 5000
    assert f"--set name nests deeper than {MAX_DEPTH} levels" in cli_error(
        ["train", "--set", f"name={deep}", "--out", str(tmp_path / "runs")], capsys)
    run_dir = copy_run(demo_run, tmp_path / "run")
    (run_dir / "config.yaml").write_text(f"name: {deep}\n")
    with pytest.raises(UserError, match=f"config.yaml nests deeper than {MAX_DEPTH} levels .*; is .* a run folder"):
        RunFolder(run_dir).read_config()
    comparison = tmp_path / "cmp"
    copy_run(demo_run, comparison / "ce-s0")  # a trained run: compare reads the folder's comparison.yaml
    (comparison / "comparison.yaml").write_text(f"recipe: {deep}\n")
    line = cli_error(["compare", "--recipe", "demo", "--method", "ce", "--seeds", "0", "--epochs",
                    "1", "--out", str(comparison), "-q"], capsys)
    assert f"comparison.yaml nests deeper than {MAX_DEPTH} levels" in line and "choose another --out" in line


@pytest.mark.parametrize("text,key,lines", [
    ("name: dup\ntrain:\n  epochs: 1\nmodel: {arch: resnet8}\ntrain:\n  batch_size: 64\n", "train", "at lines 2 and 5"),
    ("train:\n  epochs: 1\n  seed: 3\n  epochs: 2\n", "epochs", "at lines 2 and 4"),
    ("optim: {lr: 0.1, momentum: 0.9, lr: 0.2}\n", "lr", "twice on line 1"),
])
def test_a_duplicate_key_is_one_line_naming_the_key_and_both_lines(text, key, lines, tmp_path):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text(text)  # (before: the second train: block alone, so 200 epochs, the default, and no word)
    with pytest.raises(UserError) as refused:
        load_recipe(str(recipe))
    assert f"recipe {recipe} gives the key '{key}' twice in one mapping ({lines}); keep one of them" in str(refused.value)


def test_train_refuses_a_recipe_with_a_duplicate_section_before_anything_is_made(tmp_path, capsys):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("train:\n  epochs: 1\nmethod: ce\ntrain:\n  batch_size: 64\n")
    out = tmp_path / "runs"
    with pytest.raises(UserError):  # here first: before the fix this trained 200 epochs
        load_recipe(str(recipe))
    line = cli_error(["train", "--recipe", str(recipe), "--out", str(out)], capsys)
    assert "gives the key 'train' twice in one mapping (at lines 1 and 4)" in line and not out.exists()


def test_keys_merged_in_with_yaml_merge_keys_may_still_be_overridden():
    text = "a: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 9\n"
    assert load_yaml(text, "t") == {"a": {"x": 1, "y": 2}, "c": {"x": 9, "y": 2}}


def test_a_duplicate_key_in_config_yaml_is_one_line(demo_run, tmp_path):
    run_dir = copy_run(demo_run, tmp_path / "run")
    (run_dir / "config.yaml").write_text((run_dir / "config.yaml").read_text() + "train: {epochs: 9}\n")
    with pytest.raises(UserError, match=r"config.yaml gives the key 'train' twice in one mapping \(at lines \d+ and "):
        RunFolder(run_dir).read_config()
