"""A recipe resolved once (training/resolve.py) and the data sets' own parameters."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from ipasdctl.config import DEFAULT_METHOD, DataConfig, Recipe, ResolvedRecipe, load_recipe, recipe_from_dict
from ipasdctl.data import dataset_params
from ipasdctl.errors import UserError
from ipasdctl.methods import METHODS
from ipasdctl.training import Trainer, resolve_recipe


# ------------------------------------------------------------------------------------------------ resolution


def test_resolving_fills_in_defaults_and_leaves_its_argument_as_it_was():
    recipe = load_recipe("demo", {"method": {"name": "cs-kd", "T": 2}, "data": {"name": "imagefolder"}})
    before = copy.deepcopy(recipe.to_dict())
    resolved = resolve_recipe(recipe)
    assert recipe.to_dict() == before and type(recipe) is Recipe  # no side effect
    assert isinstance(resolved, ResolvedRecipe)
    assert resolved.method == {"name": "cs-kd", "T": 2.0, "kd_weight": 1.0}
    assert resolved.data.params == {"image_size": None, "num_workers": 2, "val_fraction": 0.2}
    assert resolve_recipe(resolved).to_dict() == resolved.to_dict()  # resolving again changes nothing


def test_the_default_method_is_stated_once_and_given_to_a_section_without_a_name():
    assert Recipe().method == {"name": DEFAULT_METHOD}
    assert recipe_from_dict({"method": {"w_div": 0.5}}).method == {"name": DEFAULT_METHOD, "w_div": 0.5}
    assert load_recipe(None, {"method": {"tau": 0.2}}).method["name"] == DEFAULT_METHOD
    assert resolve_recipe(Recipe()).method["name"] == DEFAULT_METHOD == METHODS.get(DEFAULT_METHOD).name


def test_the_trainer_takes_only_a_resolved_recipe():
    with pytest.raises(TypeError, match="resolve_recipe"):
        Trainer(load_recipe("demo"))


def test_a_bad_value_is_found_by_resolution_and_the_recipe_is_not_half_filled():
    recipe = load_recipe("demo", {"method": {"name": "ls", "eps": 1.0}})
    with pytest.raises(UserError, match=r"method.eps must be in \[0, 1\), got 1.0"):
        resolve_recipe(recipe)
    assert recipe.method == {"name": "ls", "eps": 1.0}


# ------------------------------------------------------------------------------------------------ data sets' own keys


def test_a_data_set_declares_its_own_keys_and_config_yaml_holds_them_flat():
    shared = {f.name for f in dataclasses.fields(DataConfig)} - {"params"}
    assert not shared & {"image_size", "num_workers", "val_fraction"}  # not global any more
    digits = resolve_recipe(load_recipe("demo")).to_dict()["data"]
    assert not {"image_size", "num_workers", "val_fraction", "params"} & set(digits)
    folder = resolve_recipe(load_recipe("demo", {"data": {"name": "imagefolder", "image_size": 32}}))
    flat = folder.to_dict()["data"]
    assert (flat["image_size"], flat["num_workers"], flat["val_fraction"]) == (32, 2, 0.2) and "params" not in flat
    assert recipe_from_dict(folder.to_dict()).to_dict() == folder.to_dict()  # config.yaml reads back the same


def test_a_key_no_data_set_takes_is_refused_with_the_data_sets_keys():
    recipe = load_recipe("demo", {"data": {"name": "imagenet", "image_sise": 64}})
    with pytest.raises(UserError) as info:
        resolve_recipe(recipe)
    message = str(info.value)
    assert message.startswith("unknown recipe key 'data.image_sise' (did you mean 'image_size'?); known keys of data:")
    assert "data set 'imagenet' adds image_size, num_workers" in message and "\n" not in message
    with pytest.raises(UserError, match="data.num_workers must be an integer"):
        dataset_params(DataConfig(name="imagenet", params={"num_workers": "many"}))


def test_the_keys_every_data_section_held_before_are_dropped_where_a_data_set_does_not_take_them():
    """config.yaml of a digits run written before the keys moved holds all three: it still reads, to the same
    resolved recipe, so its runs are reused and resumed."""
    old = resolve_recipe(load_recipe("demo")).to_dict()
    old["data"].update({"num_workers": 2, "image_size": None, "val_fraction": 0.2})
    assert resolve_recipe(recipe_from_dict(old)).to_dict() == resolve_recipe(load_recipe("demo")).to_dict()
    kept = dataset_params(DataConfig(name="imagefolder", params={"num_workers": 0, "val_fraction": 0.5}))
    assert (kept.num_workers, kept.val_fraction) == (0, 0.5)  # a data set that takes them keeps them
