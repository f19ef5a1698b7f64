"""Fine-tuning knobs: optim.backbone_lr_scale, model.freeze_epochs, data.classes; the weights' preprocessing."""

from __future__ import annotations

import copy

import pytest
import torch

from ipasdctl.config import DataConfig, load_recipe
from ipasdctl.data import build_data
from ipasdctl.errors import UserError
from ipasdctl.runs import RunFolder
from ipasdctl.runs.weights import WeightsSource
from ipasdctl.training import resolve_recipe
from ipasdctl.training.finetune import with_weights_preprocessing
from ipasdctl.training.trainer import Trainer


def trainer_for(**sets) -> Trainer:
    overrides = {"train": {"epochs": 2, "batch_size": 32}, "data": {"train_subset": 64}}
    for key, value in sets.items():
        section, name = key.split("__")
        overrides.setdefault(section, {})[name] = value
    return Trainer(resolve_recipe(load_recipe("demo", overrides)))


def backbone(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier.")
            and v.is_floating_point() and "running" not in k}


def first_batch(trainer):
    return next(iter(trainer.loader.epoch(0, 0)))


def test_backbone_lr_scale_scales_the_backbone_groups_lr_only():
    trainer = trainer_for(optim__backbone_lr_scale=0.1)
    groups = trainer.optimizer.param_groups
    head = {id(p) for p in trainer.model.classifier.parameters()}
    assert [g["lr_scale"] for g in groups] == [0.1, 1.0]
    assert {id(p) for p in groups[1]["params"]} == head and not head & {id(p) for p in groups[0]["params"]}
    trainer.train_step(first_batch(trainer), 0.05)
    assert [g["lr"] for g in groups] == pytest.approx([0.005, 0.05])

    frozen = trainer_for(optim__backbone_lr_scale=0.0)  # lr 0 for the backbone: only the head moves
    before, head_before = backbone(frozen.model), frozen.model.classifier.weight.detach().clone()
    frozen.train_step(first_batch(frozen), 0.05)
    after = backbone(frozen.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, frozen.model.classifier.weight)


def test_freeze_epochs_train_the_head_alone_first(tmp_path):
    trainer = trainer_for(model__freeze_epochs=1)
    trainer.folder = RunFolder(tmp_path / "run")
    trainer.folder.checkpoints.mkdir(parents=True)
    trainer.folder.config.write_text("{}\n")  # what the trainer checks is still there before it writes
    trainer.folder.lock().path.touch()
    before, head_before = backbone(trainer.model), trainer.model.classifier.weight.detach().clone()
    trainer._train_epoch()  # epoch 1 of 2: frozen
    after = backbone(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, trainer.model.classifier.weight)
    trainer._train_epoch()  # epoch 2: everything trains
    assert not all(torch.equal(after[k], v) for k, v in backbone(trainer.model).items())


def test_data_classes_by_name_and_index_in_the_given_order():
    full = build_data(DataConfig(name="digits"))
    chosen = build_data(DataConfig(name="digits", classes=["7", 2]))
    assert chosen.class_names == ["7", "2"]
    assert chosen.num_train == int(((full.train_labels == 7) | (full.train_labels == 2)).sum())
    assert torch.equal(chosen.train_images[chosen.train_labels == 0], full.train_images[full.train_labels == 7])
    assert torch.equal(chosen.test_images[chosen.test_labels == 1], full.test_images[full.test_labels == 2])
    with pytest.raises(UserError, match="no class 'seven'"):
        build_data(DataConfig(name="digits", classes=["seven", 1]))
    with pytest.raises(UserError, match="index 12 is out of range"):
        build_data(DataConfig(name="digits", classes=[12, 1]))
    with pytest.raises(UserError, match="twice"):
        build_data(DataConfig(name="digits", classes=["1", 1]))
    with pytest.raises(UserError, match="data.classes"):
        resolve_recipe(load_recipe("demo", {"data": {"classes": "1,2"}}))


def test_the_weights_mean_and_std_become_the_data_sets():
    data = build_data(DataConfig(name="digits"))
    source = WeightsSource("torchvision", {}, None, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    moved = with_weights_preprocessing(copy.copy(data), source)
    assert list(moved.mean) == [0.485, 0.456, 0.406] and list(moved.std) == [0.229, 0.224, 0.225]
    assert with_weights_preprocessing(data, None) is data


def test_fine_tuning_values_out_of_range_are_refused():
    with pytest.raises(UserError, match="model.freeze_epochs"):
        resolve_recipe(load_recipe("demo", {"train": {"epochs": 2}, "model": {"freeze_epochs": 2}}))
    with pytest.raises(UserError, match="optim.backbone_lr_scale"):
        resolve_recipe(load_recipe("demo", {"optim": {"backbone_lr_scale": -1}}))
