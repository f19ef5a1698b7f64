"""Structured pruning of one network with torch-pruning (Fang, Ma, Song, Mi, Wang, "DepGraph: Towards Any
Structural Pruning", CVPR 2023): whole channels removed from every layer that shares them (a residual
stream, a convolution and its BatchNorm, the classifier's input), so the smaller network is smaller in
every runtime. Which channels go is torch-pruning's importance, per layer:

    magnitude   the L2 norm of a channel's weights over its group          (MagnitudeImportance, p=2)
    taylor      |w * dL/dw| summed over the group, the gradients of the    (TaylorImportance; Molchanov et al.,
                cross-entropy on TAYLOR_BATCHES training batches            CVPR 2019)
    bn-scale    |gamma| of the BatchNorm layers in the group                (BNScaleImportance; Liu et al.,
                                                                             "Network Slimming", ICCV 2017)

Channels are ranked across the whole network (torch-pruning's global pruning: each group's importance
divided by its mean, so layers compare) and the given ratio of all of them goes, no layer losing more than
MAX_RATIO of its own; the classifier keeps its classes. Global ranking reaches a MACs target within a
channel's worth where one ratio for every layer moves in steps of a sixteenth of a 16-channel layer (13 %
off at a quarter of resnet8's MACs). Both searches raise the ratio in RATIO_STEP steps until the target is
met, then narrow the last step down: `prune_to_macs` bisects it on the MACs (models.count_macs, as
summary.json counts them), `prune_to_latency` halves it a few times, measuring the batch-1 latency of each
candidate.

`round_to` keeps every pruned layer's channel count a multiple of N (torch-pruning's round_to). It decides
whether pruning is faster at all: onnxruntime's CPU convolutions work on channels in blocks (8 floats with
AVX2, 16 with AVX-512), so a layer of 7 or 10 channels costs a whole block, and uneven counts add layout
conversions between layers. Measured on trained resnet20 and wrn16_2 at half their MACs (docs/performance.md,
section 7): with exact counts they ran 0.83x and 0.95x as fast as unpruned at batch 64, rounded to 8 1.21x
and 1.82x.
Each candidate is pruned afresh from the same network (deterministic for magnitude and bn-scale; taylor's
gradients are taken once, before), so the result is one-shot pruning at the ratio found.

What cannot be pruned safely is refused in one line naming the layer: a layer holding parameters of a type
whose channels torch-pruning would have to guess (check_prunable), an operation torch-pruning fails on, or
a pruned layer the recorded shapes do not rebuild exactly (compress/prune.py checks the rebuilt network).
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ..errors import UserError, one_line
from ..models import count_macs
from ..models.structure import SHAPE_ATTRIBUTES

IMPORTANCES = ("magnitude", "taylor", "bn-scale")
MAX_RATIO = 0.9  # the largest share of the channels removed, of each layer's too: each keeps at least a tenth
BISECTION_STEPS = 12  # ratio to 0.9 / 2^12: finer than one channel of any layer below 4,000 channels
RATIO_STEP = 0.05  # the latency search raises the ratio by this much between measurements...
LATENCY_REFINEMENTS = 3  # ...then halves the last interval this many times
TAYLOR_BATCHES = 4  # training batches whose gradients rank the channels for taylor


def importance_of(name: str):
    import torch_pruning as tp

    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.TaylorImportance()
    if name == "bn-scale":
        return tp.importance.BNScaleImportance()
    raise UserError(f"--importance must be one of {', '.join(IMPORTANCES)}, got '{name}'")


def check_prunable(model: nn.Module, arch: str) -> None:
    """Every layer holding parameters or buffers is one whose channels torch-pruning follows and whose shapes
    a recipe can record (models/structure.py); else a UserError naming the first other one."""
    for name, module in model.named_modules():
        own = [key for key, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]]
        if own and not isinstance(module, tuple(SHAPE_ATTRIBUTES)):
            where = f"{name}.{own[0]}" if name else own[0]
            raise UserError(f"{arch} cannot be pruned safely: layer '{where}' ({type(module).__name__}) holds "
                            "tensors whose channels torch-pruning would have to guess; structured pruning takes "
                            f"networks of {', '.join(k.__name__ for k in SHAPE_ATTRIBUTES)} layers only")


def accumulate_taylor_gradients(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The cross-entropy's gradients on `batches` (images, labels), summed into the parameters' .grad, in eval
    mode (the BatchNorm statistics stay those the network was trained to)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    for images, labels in batches:
        nn.functional.cross_entropy(model(images), labels).backward()


def pruned_copy(model: nn.Module, ratio: float, importance: str, image_shape, arch: str,
                round_to: int = 1) -> nn.Module:
    """A copy of `model` with `ratio` of its channels removed, the least important across the network (the
    classifier keeps its classes); with `round_to` > 1 every pruned layer keeps a multiple of that many
    channels (torch-pruning's round_to: more are removed, down to the multiple; a layer that would keep none
    keeps all)."""
    import torch_pruning as tp

    copied = copy.deepcopy(model).eval()
    gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    for name, param in copied.named_parameters():  # taylor's: a Parameter's deepcopy leaves its .grad behind
        if name in gradients:
            param.grad = gradients[name].clone()
    if ratio <= 0:
        return copied
    example = torch.zeros(1, *image_shape)
    try:
        pruner = tp.pruner.MetaPruner(copied, example, importance_of(importance), pruning_ratio=ratio,
                                      global_pruning=True, max_pruning_ratio=MAX_RATIO,
                                      ignored_layers=[copied.classifier], round_to=round_to if round_to > 1 else None)
        pruner.step()
        copied(example)  # the pruned network must still run
    except UserError:
        raise
    except Exception as exc:  # torch-pruning's own errors name no layer: find the one next to the failing op
        layer = failing_layer(exc, copied)
        where = f" at layer '{layer}'" if layer else ""
        raise UserError(f"torch-pruning cannot prune {arch} safely{where} ({one_line(exc, 120, named=True)}); "
                        "this architecture cannot be pruned (an operation on its channels it does not follow)") \
            from None
    return copied


def failing_layer(exc: BaseException, model: nn.Module) -> Optional[str]:
    """The name of the layer of `model` nearest to where torch-pruning failed: its dependency graph's nodes
    (objects with .module and .inputs) in the failing frames, followed back to the first one that is a layer."""
    names = {id(module): name for name, module in model.named_modules() if name}
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):  # innermost first
        for value in frame.f_locals.values():
            seen, queue = set(), [value]
            while queue:
                node = queue.pop(0)
                if id(node) in seen or not hasattr(node, "inputs") or not hasattr(node, "module"):
                    continue
                seen.add(id(node))
                if id(node.module) in names:
                    return names[id(node.module)]
                queue += list(node.inputs)
    return None


def _first_fit(model: nn.Module, fits: Callable[[nn.Module], tuple[bool, float]], refinements: int, importance: str,
               image_shape, arch: str, round_to: int, note=None) -> tuple[Optional[tuple], float]:
    """((the copy of `model` pruned at the smallest ratio found for which `fits` holds, the ratio, its measure),
    the least measure seen): ratios 0, RATIO_STEP, ... up to MAX_RATIO in turn, then the last step halved
    `refinements` times; (None, least) when no ratio fits. A scan, not a bisection over the whole range: with
    `round_to`, a layer whose rounded count would be zero keeps all of its channels, so the MACs are not
    monotone in the ratio at the high end."""
    ratios = [round(RATIO_STEP * i, 6) for i in range(int(MAX_RATIO / RATIO_STEP) + 1)]
    previous, found, least = None, None, float("inf")
    for ratio in ratios:
        candidate = pruned_copy(model, ratio, importance, image_shape, arch, round_to)
        ok, value = fits(candidate)
        least = min(least, value)
        if note is not None:
            note(ratio, candidate, value)
        if ok:
            found = (candidate, ratio, value)
            break
        previous = ratio
    if found is None or previous is None:
        return found, least
    low, high = previous, found[1]
    for _ in range(refinements):
        middle = (low + high) / 2
        candidate = pruned_copy(model, middle, importance, image_shape, arch, round_to)
        ok, value = fits(candidate)
        if ok:
            high, found = middle, (candidate, middle, value)
        else:
            low = middle
    return found, least


def _rounded(round_to: int) -> str:
    return f" (kept in multiples of {round_to} channels)" if round_to > 1 else ""


def prune_to_macs(model: nn.Module, target_macs: int, importance: str, image_shape, arch: str,
                  round_to: int = 1) -> tuple[nn.Module, float]:
    """(the copy of `model` pruned at the smallest ratio found whose MACs are at most `target_macs`, that ratio):
    the first RATIO_STEP that reaches it, bisected BISECTION_STEPS times; a UserError when no ratio up to
    MAX_RATIO does."""
    def fits(candidate: nn.Module) -> tuple[bool, float]:
        macs = count_macs(candidate, image_shape, "cpu")
        return macs <= target_macs, macs

    found, least = _first_fit(model, fits, BISECTION_STEPS, importance, image_shape, arch, round_to)
    if found is None:
        raise UserError(f"the MACs target is unreachable: removing {MAX_RATIO:.0%} of the channels{_rounded(round_to)} "
                        f"leaves {int(least):,} MACs, above the {target_macs:,} aimed at; give a larger --target-macs"
                        + (" or a smaller --round-to" if round_to > 1 else ""))
    return found[0], found[1]


def prune_to_latency(model: nn.Module, target_ms: float, importance: str, image_shape, arch: str,
                     measure: Callable[[nn.Module], float], note=None, round_to: int = 1) -> tuple[nn.Module, float, float]:
    """(the copy of `model` pruned at the smallest ratio found whose measured latency is at most `target_ms`,
    the ratio, its latency): ratios 0, RATIO_STEP, ... up to MAX_RATIO, each measured, then the last step
    halved LATENCY_REFINEMENTS times. A UserError when MAX_RATIO is still slower."""
    def fits(candidate: nn.Module) -> tuple[bool, float]:
        latency = measure(candidate)
        return latency <= target_ms, latency

    def said(ratio: float, candidate: nn.Module, latency: float) -> None:
        if note is not None:
            note(f"prune: ratio {ratio:.2f}: {count_macs(candidate, image_shape, 'cpu'):,} MACs, {latency:.3f} ms")

    found, least = _first_fit(model, fits, LATENCY_REFINEMENTS, importance, image_shape, arch, round_to, said)
    if found is None:
        raise UserError(f"the latency target is unreachable: removing {MAX_RATIO:.0%} of the channels"
                        f"{_rounded(round_to)} still takes {least:.3f} ms at batch 1 on this CPU, above "
                        f"--target-latency-ms {target_ms:g}; give a larger target")
    return found
