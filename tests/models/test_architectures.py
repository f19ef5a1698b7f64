"""Every registered architecture against the model contract (models/base.py), the torchvision wrappers against
torchvision itself, parameter counts against published ones, and ONNX export against PyTorch."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision

from ipasdctl.models import build_model
from ipasdctl.models import torchvision_models as tvm
from ipasdctl.cli.listing import format_table
from ipasdctl.models.catalog import model_row, model_table
from ipasdctl.models import MODELS

NUM_CLASSES = 7


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


ALL_MODELS = MODELS.names()
# The heaviest forward/backward passes (> 1 GMAC per image even on the small test inputs).
SLOW_TRAIN = {"preact_resnet50", "tv_resnet50", "wrn28_10"}
# ONNX export (torch.export tracing + translation) costs about 1 s plus 3-4 ms per graph node of CPU time
# (2-9 s per model here, over half of this module's time when every model was exported). The exporter
# translates module by module, and a module class's forward is one piece of code: a model built of exactly
# the module classes of another (resnet110 of resnet8's, wrn28_10 of wrn16_2's: deeper or wider, the same
# blocks) exports the same operators again. So the export test takes one model of each set of module
# classes, the smallest (fewest modules); a newly registered model with a module class of its own is exported
# the day it is registered. The exported models outside the edit loop's block families are marked `slow`.
FAST_EXPORT = {"resnet8", "preact_resnet18", "wrn16_2", "mobilenetv2", "shufflenetv2", "tv_resnet18",
               "tv_mobilenet_v3_small", "tv_efficientnet_b0"}


def export_cases(names) -> dict[str, list[str]]:
    """{exported model: the models made of exactly its module classes}, the exported one the smallest. The
    models are built on the meta device (shapes only: no memory, no initialisation)."""
    families: dict[frozenset, list[tuple[int, str]]] = {}
    for name in names:
        with torch.device("meta"):
            modules = list(build_model(name, NUM_CLASSES).modules())
        classes = frozenset(f"{type(m).__module__}.{type(m).__qualname__}" for m in modules)
        families.setdefault(classes, []).append((len(modules), name))
    return {min(members)[1]: sorted(n for _, n in members) for members in families.values()}


EXPORT_CASES = export_cases(ALL_MODELS)
SLOW_EXPORT = set(EXPORT_CASES) - FAST_EXPORT


def input_for(model, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Small but valid inputs: 16x16 for the CIFAR-style models (the last map is 2x2 or 4x4), 64x64 for the
    ImageNet ones (stride 32: 2x2)."""
    size = 64 if model.default_input_size >= 224 else 16
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _marked(names, slow):
    return [pytest.param(n, marks=[pytest.mark.slow] if n in slow else [], id=n) for n in names]


@pytest.mark.parametrize("name", _marked(ALL_MODELS, SLOW_TRAIN))
def test_contract_forward_backward_and_features(name):
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES)
    assert model.default_input_size in (32, 224)
    assert model.num_classes == NUM_CLASSES
    assert isinstance(model.classifier, torch.nn.Linear)
    assert model.classifier.in_features == model.embed_dim and model.classifier.out_features == NUM_CLASSES
    x = input_for(model)
    model.train()
    logits, embedding, stages = model(x, with_features=True)
    assert logits.shape == (2, NUM_CLASSES)
    assert embedding.shape == (2, model.embed_dim)
    assert [s.shape[1] for s in stages] == list(model.stage_channels)
    assert all(s.dim() == 4 and s.shape[0] == 2 for s in stages)
    sizes = [s.shape[-1] for s in stages]
    assert sizes == sorted(sizes, reverse=True), f"stage maps should not grow: {sizes}"
    # the contract: stages[-1] is exactly the map pooled into the embedding, the classifier's input
    torch.testing.assert_close(F.adaptive_avg_pool2d(stages[-1], 1).flatten(1), embedding)
    (logits.square().mean() + embedding.mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without a gradient: {missing[:5]}"
    model.eval()
    with torch.no_grad():
        plain = model(x)
        again, embedding_eval, _ = model(x, with_features=True)
    torch.testing.assert_close(plain, again)
    torch.testing.assert_close(plain, model.classifier(embedding_eval))  # eval: logits = linear(embedding)


def _wrapped(name: str, net):
    """The registry's wrapper around an existing torchvision network (so both share the weights)."""
    if name.startswith("tv_resnet"):
        return tvm.TorchvisionResNet(net, NUM_CLASSES)
    if name == "tv_shufflenet_v2_x1_0":
        return tvm.TorchvisionShuffleNet(net, NUM_CLASSES)
    ends = {"tv_mobilenet_v2": [3, 6, 13, 18], "tv_efficientnet_b0": [2, 3, 5, 8],
            "tv_mobilenet_v3_small": [1, 3, 8, 12], "tv_mobilenet_v3_large": [3, 6, 12, 16]}[name]
    if name.startswith("tv_mobilenet_v3"):
        return tvm._mobilenet_v3(net, ends, NUM_CLASSES)
    return tvm._sequential_model(net, ends, NUM_CLASSES)


TORCHVISION = {
    # name: (torchvision builder, parameters at 1000 classes as torchvision documents them)
    "tv_resnet18": (torchvision.models.resnet18, 11_689_512),
    "tv_resnet34": (torchvision.models.resnet34, 21_797_672),
    "tv_resnet50": (torchvision.models.resnet50, 25_557_032),
    "tv_mobilenet_v2": (torchvision.models.mobilenet_v2, 3_504_872),
    "tv_mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, 2_542_856),
    "tv_mobilenet_v3_large": (torchvision.models.mobilenet_v3_large, 5_483_032),
    "tv_shufflenet_v2_x1_0": (torchvision.models.shufflenet_v2_x1_0, 2_278_604),
    "tv_efficientnet_b0": (torchvision.models.efficientnet_b0, 5_288_548),
}


def test_every_torchvision_model_is_registered_and_prefixed():
    assert sorted(n for n in ALL_MODELS if n.startswith("tv_")) == sorted(TORCHVISION)


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_wrapper_computes_what_torchvision_computes(name):
    builder, published_params = TORCHVISION[name]
    torch.manual_seed(0)
    net = builder(weights=None, num_classes=NUM_CLASSES).eval()
    wrapper = _wrapped(name, net).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), net(x))
    assert sum(p.numel() for p in wrapper.parameters()) == sum(p.numel() for p in net.parameters())
    registered = build_model(name, 1000)
    assert sum(p.numel() for p in registered.parameters()) == published_params
    assert registered.default_input_size == 224


@pytest.mark.parametrize("name,strides", [
    ("tv_resnet18", [4, 8, 16, 32]), ("tv_mobilenet_v2", [4, 8, 16, 32]), ("tv_efficientnet_b0", [4, 8, 16, 32]),
    ("tv_shufflenet_v2_x1_0", [4, 8, 16, 32]), ("tv_mobilenet_v3_small", [4, 8, 16, 32, 64]),
    ("tv_mobilenet_v3_large", [4, 8, 16, 32, 64]),
])
def test_torchvision_stages_are_cut_at_each_resolution(name, strides):
    model = build_model(name, NUM_CLASSES).eval()
    with torch.no_grad():
        _, _, stages = model(torch.randn(1, 3, 64, 64), with_features=True)
    # 64 / stride, and the MobileNetV3 hidden vector as a final 1x1 "stage"
    assert [s.shape[-1] for s in stages] == [max(64 // st, 1) for st in strides]


def test_mobilenet_v3_embedding_is_the_hidden_layer_of_its_head():
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(weights=None, num_classes=NUM_CLASSES).eval()
    model = _wrapped("tv_mobilenet_v3_small", net).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, embedding, _ = model(x, with_features=True)
        pooled = F.adaptive_avg_pool2d(net.features(x), 1).flatten(1)
        hidden = F.hardswish(F.linear(pooled, net.classifier[0].weight, net.classifier[0].bias))
    torch.testing.assert_close(embedding, hidden)


def test_dropout_before_classifier_acts_in_training_only():
    model = build_model("tv_mobilenet_v2", NUM_CLASSES)
    assert model.dropout.p == pytest.approx(0.2)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    torch.manual_seed(1)
    logits, embedding, _ = model(x, with_features=True)
    assert not torch.allclose(logits, model.classifier(embedding))  # dropped units
    torch.manual_seed(1)
    dropped = F.dropout(embedding, 0.2, training=True)
    torch.testing.assert_close(logits, model.classifier(dropped))


@pytest.mark.parametrize("name,num_classes,params", [
    ("wrn28_10", 10, 36_479_194),        # WRN-28-10, "36.5M" (Zagoruyko & Komodakis, Table 3)
    ("wrn16_2", 100, 703_284),           # WRN-16-2 on CIFAR-100, "0.70M" (the CRD benchmark tables)
    ("densenet_bc100", 10, 769_162),     # DenseNet-BC (k=12) depth 100, "0.8M" (Huang et al., Table 2)
])
def test_parameter_counts_match_published_architectures(name, num_classes, params):
    assert sum(p.numel() for p in build_model(name, num_classes).parameters()) == params


@pytest.mark.parametrize("name,reference", [
    ("mobilenetv2", torchvision.models.mobilenet_v2), ("shufflenetv2", torchvision.models.shufflenet_v2_x1_0)])
def test_cifar_variants_have_exactly_the_imagenet_networks_weights(name, reference):
    """The CIFAR variants change strides only (stem, no max-pool): the same layers, the same parameters."""
    ours = build_model(name, 100)
    theirs = reference(weights=None, num_classes=100)
    assert sorted(p.numel() for p in ours.parameters()) == sorted(p.numel() for p in theirs.parameters())


def test_cifar_families_have_the_published_shapes():
    shapes = {}
    for name in ("preact_resnet18", "preact_resnet34", "preact_resnet50", "wrn16_2", "wrn28_10", "mobilenetv2",
                 "shufflenetv2", "densenet_bc100"):
        model = build_model(name, 10).eval()
        with torch.no_grad():
            _, _, stages = model(torch.randn(1, 3, 32, 32), with_features=True)
        shapes[name] = [tuple(s.shape[1:]) for s in stages]
    assert shapes["preact_resnet34"] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    assert shapes["preact_resnet50"] == [(256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)]
    assert shapes["wrn28_10"] == [(160, 32, 32), (320, 16, 16), (640, 8, 8)]
    assert shapes["wrn16_2"] == [(32, 32, 32), (64, 16, 16), (128, 8, 8)]
    assert shapes["mobilenetv2"] == [(24, 32, 32), (32, 16, 16), (96, 8, 8), (1280, 4, 4)]
    assert shapes["shufflenetv2"] == [(116, 16, 16), (232, 8, 8), (1024, 4, 4)]
    assert shapes["densenet_bc100"] == [(216, 32, 32), (300, 16, 16), (342, 8, 8)]
    # block counts: 3-4-6-3 for both deeper PreAct ResNets, (28 - 4) / 6 = 4 blocks per WRN-28 group
    assert [len(s) for s in build_model("preact_resnet34", 10).stages] == [3, 4, 6, 3]
    assert [len(s) for s in build_model("preact_resnet50", 10).stages] == [3, 4, 6, 3]
    assert [len(s) for s in build_model("wrn28_10", 10).stages] == [4, 4, 4]
    assert [len(b) for b in build_model("densenet_bc100", 10).blocks] == [16, 16, 16]


def test_preact_resnet18_keeps_its_parameter_names():
    """Extending the PreAct family must not rename the paper's model (checkpoints load by name)."""
    keys = set(build_model("preact_resnet18", 10).state_dict())
    assert {"conv1.weight", "stages.0.0.bn1.weight", "stages.1.0.shortcut.weight", "bn.weight",
            "classifier.weight"} <= keys
    assert not any("bn3" in k for k in keys)


def test_model_table_counts_params_and_macs_at_default_sizes():
    rows = {r["name"]: r for r in model_table(["tv_resnet18", "resnet8", "tv_mobilenet_v3_small"])}
    assert list(rows) == ["tv_resnet18", "resnet8", "tv_mobilenet_v3_small"]
    r18 = rows["tv_resnet18"]
    assert (r18["input_size"], r18["num_classes"], r18["params"]) == (224, 1000, 11_689_512)
    assert r18["macs"] == pytest.approx(1.814e9, rel=0.01)  # torchvision documents 1.81 G(MAC)
    assert rows["tv_mobilenet_v3_small"]["macs"] == pytest.approx(0.057e9, rel=0.05)  # 0.06 documented
    assert (rows["resnet8"]["input_size"], rows["resnet8"]["num_classes"]) == (32, 100)
    assert rows["resnet8"]["stage_channels"] == [16, 32, 64]
    row = model_row("resnet8", num_classes=10, input_size=16)
    assert row["macs"] < rows["resnet8"]["macs"] / 3  # a quarter of the pixels (conv MACs scale with area)
    # the table's shape-only (meta device) counts are exactly those of a real CPU run
    for name in ("tv_mobilenet_v3_small", "resnet8"):
        assert model_row(name, device="cpu")["macs"] == rows[name]["macs"]
        assert model_row(name, device="cpu")["params"] == rows[name]["params"]
    text = format_table(list(rows.values()))
    assert text.splitlines()[0].split() == ["model", "input", "classes", "params", "MACs", "embed", "stages"]
    assert "224x224" in text and "1.81G" in text


def test_every_model_shares_its_module_classes_with_an_exported_one():
    """Every registered model is in one family; depth and width do not make a family, a block class does."""
    assert sorted(member for members in EXPORT_CASES.values() for member in members) == sorted(ALL_MODELS)
    assert EXPORT_CASES["resnet8"] == ["resnet110", "resnet20", "resnet32", "resnet56", "resnet8", "resnet8x4"]
    assert "preact_resnet50" in EXPORT_CASES and "tv_resnet50" in EXPORT_CASES  # bottleneck blocks: own classes


@pytest.mark.parametrize("name", _marked(sorted(EXPORT_CASES), SLOW_EXPORT))
def test_onnx_export_agrees_with_pytorch(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES).eval()
    x = input_for(model)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    # randomly initialised deep nets in eval mode (BN statistics 0 / 1) can have very large logits: the
    # tolerance is relative to their scale
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-3, atol=1e-4 * scale)
