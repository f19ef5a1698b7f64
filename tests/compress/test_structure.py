"""Pruned shapes as data (models/structure.py) and what torch-pruning is allowed to prune (compress/pruning.py),
on networks built in the test: no training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ipasdctl.compress.pruning import check_prunable, pruned_copy, prune_to_macs
from ipasdctl.errors import UserError
from ipasdctl.models import build_model, count_macs
from ipasdctl.models.structure import apply_structure, describe_structure
from ipasdctl.models.weights import read_preprocessing, write_safetensors

SHAPE = (3, 16, 16)


def channels(model: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("importance", ["magnitude", "bn-scale"])
def test_a_pruned_network_rebuilds_from_its_recorded_shapes_and_computes_the_same(importance, one_thread):
    torch.manual_seed(0)
    model = build_model("resnet8", 10).eval()
    for module in model.modules():  # as after training: the BatchNorm scales differ (at init they are all 1)
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.1, 1.0)
    pruned = pruned_copy(model, 0.5, importance, SHAPE, "resnet8")
    structure = describe_structure(pruned, build_model("resnet8", 10))
    before, after = channels(model), channels(pruned)
    assert 0.4 < sum(after.values()) / sum(before.values()) < 0.6  # about half of the channels gone
    assert all(0 < after[name] <= before[name] for name in before)  # no layer emptied
    # the data says what each changed layer is: its channels, and those of the layers that share them
    assert structure["conv1"] == {"type": "Conv2d", "in_channels": 3, "out_channels": after["conv1"], "groups": 1}
    assert structure["bn1"] == {"type": "BatchNorm2d", "num_features": after["conv1"]}
    last = after["stages.2.0.conv2"]
    assert structure["classifier"] == {"type": "Linear", "in_features": last, "out_features": 10}  # still 10 classes
    assert set(structure) == {name for name, m in pruned.named_modules()
                              if hasattr(m, "weight") and m.weight.shape != dict(model.named_modules())[name].weight.shape}
    rebuilt = build_model("resnet8", 10, structure)
    rebuilt.load_state_dict(pruned.state_dict())  # every tensor of the shape the data says
    rebuilt.eval()
    x = torch.randn(4, *SHAPE)
    assert torch.equal(rebuilt(x), pruned(x))
    stages = [after[f"stages.{i}.0.conv2"] for i in range(3)]
    assert rebuilt.embed_dim == last and rebuilt.stage_channels == stages  # the contract, derived
    assert channels(rebuilt) == channels(pruned)


def test_the_bisection_reaches_the_macs_target_from_below(one_thread):
    model = build_model("resnet8", 10).eval()
    full = count_macs(model, SHAPE, "cpu")
    pruned, ratio = prune_to_macs(model, int(0.3 * full), "magnitude", SHAPE, "resnet8")
    reached = count_macs(pruned, SHAPE, "cpu") / full
    assert 0.3 * 0.95 <= reached <= 0.3 and 0 < ratio < 0.9
    assert count_macs(model, SHAPE, "cpu") == full  # the network given is left as it was


@pytest.mark.parametrize("arch, round_to", [("resnet8", 8), ("wrn16_2", 16)])  # stages of 16/32/64, 32/64/128
def test_round_to_keeps_every_pruned_layer_a_multiple_of_its_channels_and_meets_the_target(arch, round_to, one_thread):
    torch.manual_seed(0)
    model = build_model(arch, 10).eval()
    full = count_macs(model, SHAPE, "cpu")
    pruned, ratio = prune_to_macs(model, int(0.5 * full), "magnitude", SHAPE, arch, round_to)
    reached = count_macs(pruned, SHAPE, "cpu") / full
    assert reached <= 0.5 and 0 < ratio < 0.9
    before, after = channels(model), channels(pruned)
    changed = {name for name in after if after[name] != before[name]}
    assert changed and all(after[name] % round_to == 0 for name in changed), after
    exact, _ = prune_to_macs(model, int(0.5 * full), "magnitude", SHAPE, arch)
    assert any(count % 8 for count in channels(exact).values())  # without it the counts are uneven
    rebuilt = build_model(arch, 10, describe_structure(pruned, model))
    rebuilt.load_state_dict(pruned.state_dict())  # a rounded network is recorded and rebuilt as any other


def test_an_unreachable_macs_target_is_one_line():
    model = build_model("resnet8", 10).eval()
    with pytest.raises(UserError, match="unreachable: removing 90% of the channels leaves"):
        prune_to_macs(model, 10, "magnitude", SHAPE, "resnet8")


class Scaled(nn.Module):
    """A layer torch-pruning cannot follow: a per-channel scale held as a bare parameter."""

    def __init__(self, channels: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x):
        return x * self.gain


def test_a_layer_of_an_unknown_kind_holding_parameters_is_refused_by_name():
    model = build_model("resnet8", 10)
    model.stages[0][0].bn1 = nn.Sequential(model.stages[0][0].bn1, Scaled(16))
    with pytest.raises(UserError) as error:
        check_prunable(model, "resnet8")
    assert "layer 'stages.0.0.bn1.1.gain' (Scaled)" in str(error.value) and "\n" not in str(error.value)


def test_an_operation_torch_pruning_cannot_follow_is_refused_naming_a_layer_next_to_it():
    model = build_model("shufflenetv2", 10).eval()  # its channel shuffle is a reshape of the channels
    with pytest.raises(UserError) as error:
        pruned_copy(model, 0.5, "magnitude", (3, 32, 32), "shufflenetv2")
    message = str(error.value)
    assert message.startswith("torch-pruning cannot prune shufflenetv2 safely at layer 'stages.")
    assert "\n" not in message


@pytest.mark.parametrize("structure, says", [
    ({"conv9": {"type": "Conv2d", "in_channels": 3, "out_channels": 8, "groups": 1}}, "resnet8 has no layer 'conv9'"),
    ({"conv1": {"type": "Linear", "in_features": 3, "out_features": 8}}, "records a 'Linear', but the layer"),
    ({"conv1": {"type": "Conv2d", "in_channels": 3, "out_channels": 0, "groups": 1}}, "out_channels must be a whole"),
    ({"conv1": {"type": "Conv2d", "in_channels": 3, "out_channels": 8}}, "lacks groups"),
    ({"bn1": {"type": "BatchNorm2d", "num_features": 8}}, "its layers do not fit together"),
    ([1, 2], "must be a mapping of layer names to shapes"),
])
def test_a_structure_that_does_not_fit_the_architecture_is_one_line(structure, says):
    with pytest.raises(UserError) as error:
        apply_structure(build_model("resnet8", 10), structure, "resnet8")
    assert says in str(error.value) and "\n" not in str(error.value)


def test_safetensors_carry_the_preprocessing_the_network_was_trained_with(tmp_path):
    from ipasdctl.runs.weights import read_source

    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"w": torch.ones(2)}, {"mean": [0.1, 0.2, 0.3], "std": [1, 2, 3], "input_size": 16})
    assert read_preprocessing(path) == {"mean": [0.1, 0.2, 0.3], "std": [1.0, 2.0, 3.0], "input_size": 16}
    source = read_source(str(path), "resnet8")
    assert (source.mean, source.std, source.input_size) == ([0.1, 0.2, 0.3], [1.0, 2.0, 3.0], 16)
    plain = tmp_path / "plain.safetensors"
    write_safetensors(plain, {"w": torch.ones(2)})
    assert read_preprocessing(plain) == {} and read_source(str(plain), "resnet8").mean is None


def test_the_latency_search_takes_the_first_ratio_within_the_target_then_narrows_it(one_thread):
    """A stand-in clock (latency = MACs / 1e6 ms) makes the search's choices checkable."""
    from ipasdctl.compress.pruning import prune_to_latency

    model = build_model("resnet8", 10).eval()
    clock = lambda m: count_macs(m, SHAPE, "cpu") / 1e6  # noqa: E731
    full = clock(model)
    pruned, ratio, latency = prune_to_latency(model, 0.5 * full, "magnitude", SHAPE, "resnet8", clock)
    assert latency == clock(pruned) <= 0.5 * full
    assert 0.2 < ratio < 0.35  # half the MACs: between the 5 % steps 0.25 and 0.3, narrowed down
    # narrowed to an eighth of a step: the ratio an eighth of a step lower is over the target
    assert clock(pruned_copy(model, ratio - 0.05 / 8, "magnitude", SHAPE, "resnet8")) > 0.5 * full
    with pytest.raises(UserError, match="the latency target is unreachable: removing 90% of the channels still takes"):
        prune_to_latency(model, 1e-9, "magnitude", SHAPE, "resnet8", clock)
