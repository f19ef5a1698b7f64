"""IPASD against the spec's formulas, on hand-made tensors computed independently with plain Python math."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ipasdctl.data.base import Batch
from ipasdctl.methods import MethodContext, TrainingNet, build_method
from ipasdctl.methods.ipasd import blend_weights, ipasd_loss, progressive_alpha
from ipasdctl.methods.memory import SampleMemory
from ipasdctl.models import build_model


def softmax(values):
    m = max(values)
    exps = [math.exp(v - m) for v in values]
    return [e / sum(exps) for e in exps]


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# ----------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("epoch,epochs,expected", [
    (0, 200, 0.8 * 1 / 200),      # 0.004, the start
    (99, 200, 0.8 * 100 / 200),   # linear
    (159, 200, 0.8 * 160 / 200),  # last epoch before the cap: 0.64
    (160, 200, 0.64),             # the cap
    (199, 200, 0.64),
    (3, 10, 0.8 * 4 / 10),
    (8, 10, 0.64),
])
def test_alpha_schedule_before_and_after_cap(epoch, epochs, expected):
    assert progressive_alpha(epoch, epochs, 0.8) == pytest.approx(expected)


def test_alpha_uses_w_div():
    assert progressive_alpha(0, 10, 0.5) == pytest.approx(0.05)
    assert progressive_alpha(9, 10, 0.5) == pytest.approx(0.4)


# ----------------------------------------------------------------------------------------------- blend


def test_blend_counts_correct_argmax_of_each_memory():
    labels = torch.tensor([0, 1, 2, 1])
    s_rows = torch.tensor([[.9, .1, 0], [.1, .8, .1], [.5, .4, .1], [.6, .3, .1]])  # right: 0, 1 -> a_S = 2
    l_rows = torch.tensor([[.9, .1, 0], [.2, .7, .1], [.1, .1, .8], [.6, .3, .1]])  # right: 0, 1, 2 -> a_L = 3
    w_s, w_l = blend_weights(labels, s_rows, l_rows)
    assert w_s.item() == pytest.approx(2 / 5)
    assert w_l.item() == pytest.approx(3 / 5)


def test_blend_zero_over_zero_gives_half_not_nan():
    labels = torch.tensor([0, 0])
    wrong = torch.tensor([[0.1, 0.9], [0.2, 0.8]])
    w_s, w_l = blend_weights(labels, wrong, wrong)
    assert w_s.item() == 0.5 and w_l.item() == 0.5
    loss = ipasd_loss(torch.randn(2, 2), torch.randn(2, 4), labels, wrong, wrong, torch.randn(2, 4),
                      alpha=0.5, w_con=0.01, tau=0.3)["loss"]
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------- loss


def test_epoch_zero_is_plain_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    onehot = F.one_hot(labels, 4).float()
    out = ipasd_loss(logits, torch.randn(6, 8), labels, onehot, onehot, None, alpha=0.004, w_con=0.01, tau=0.3)
    assert out["loss"].item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert out["loss_con"].item() == 0.0
    assert out["new_s"] is None


def test_later_epoch_loss_matches_formula_by_hand():
    logits = [[2.0, 0.5, -1.0], [0.1, 1.5, 0.3]]
    embeddings = [[1.0, 2.0], [-0.5, 1.0]]
    labels = [0, 2]
    s_mem = [[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]]  # argmax right: sample 0 only -> a_S = 1
    l_mem = [[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]]  # argmax right: both -> a_L = 2
    prototypes = [[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]]  # not normalised on purpose
    alpha, w_con, tau = 0.3, 0.01, 0.3

    # by hand
    w_s, w_l = 1 / 3, 2 / 3
    soft = 0.0
    con = 0.0
    for i in range(2):
        teacher = [w_s * s + w_l * l for s, l in zip(s_mem[i], l_mem[i])]
        target = [(1 - alpha) * (1.0 if c == labels[i] else 0.0) + alpha * teacher[c] for c in range(3)]
        p = softmax(logits[i])
        soft -= sum(t * math.log(pc) for t, pc in zip(target, p)) / 2
        cos = [cosine(embeddings[i], proto) / tau for proto in prototypes]
        con -= math.log(softmax(cos)[labels[i]]) / 2
    expected = soft + w_con * con

    out = ipasd_loss(torch.tensor(logits), torch.tensor(embeddings), torch.tensor(labels), torch.tensor(s_mem),
                     torch.tensor(l_mem), torch.tensor(prototypes), alpha, w_con, tau)
    assert out["loss_soft"].item() == pytest.approx(soft, rel=1e-5)
    assert out["loss_con"].item() == pytest.approx(con, rel=1e-5)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    # the new memory rows: softmax of the logits, and softmax of cos / tau
    assert out["new_l"][1].tolist() == pytest.approx(softmax(logits[1]), rel=1e-5)
    cos1 = [cosine(embeddings[1], proto) / tau for proto in prototypes]
    assert out["new_s"][1].tolist() == pytest.approx(softmax(cos1), rel=1e-5)


# ----------------------------------------------------------------------------------------------- the method


def make_method(num_train=8, num_classes=3, epochs=10, **params):
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes)
    labels = torch.arange(num_train) % num_classes
    ctx = MethodContext(num_classes=num_classes, num_train=num_train, train_labels=labels, embed_dim=model.embed_dim,
                        stage_channels=model.stage_channels, epochs=epochs, batch_size=4, seed=0,
                        device=torch.device("cpu"))
    method = build_method({"name": "ipasd", **params}, ctx)
    return method, TrainingNet(model), labels


def make_batch(labels, indices, epoch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(len(indices), 3, 16, 16, generator=generator)
    return Batch(images=images, labels=labels[indices], indices=indices, raw=None, epoch=epoch, step=0)


def test_memory_and_prototype_updates_follow_the_release_timing():
    method, net, labels = make_method()
    onehot = F.one_hot(labels, 3).float()
    idx = torch.tensor([1, 4, 6])
    batch = make_batch(labels, idx, epoch=0)

    method.on_epoch_start(0)
    result = method.loss(net, batch)
    with torch.no_grad():
        g0 = F.normalize(net(batch.images)["embedding"], dim=1)  # train mode: the same batch statistics
    # epoch 0: L written, S untouched (still one-hot), prototypes accumulate normalised embeddings
    assert torch.allclose(method.last_softmax.read(idx), F.softmax(result.logits.detach(), 1), atol=2e-3)
    assert torch.equal(method.last_proto.read(idx), onehot[idx])
    untouched = torch.tensor([0, 2])
    assert torch.equal(method.last_softmax.read(untouched), onehot[untouched])
    expected_counts = torch.bincount(labels[idx], minlength=3).float()
    assert torch.equal(method.prototypes.counts, expected_counts)
    method.on_epoch_end(0)
    assert method.prototypes.ready
    p0 = torch.zeros(3, g0.shape[1]).index_add_(0, labels[idx], g0) / expected_counts.clamp_min(1).unsqueeze(1)  # unseen class: 0
    assert torch.allclose(method.prototypes.current, p0, atol=1e-5)  # mean of normalised vectors

    # epoch 1: S is written with softmax(cos(g, P(0)) / tau)
    method.on_epoch_start(1)
    assert method.prototypes.counts.sum() == 0
    prototypes_in_use = method.prototypes.current.clone()
    batch = make_batch(labels, idx, epoch=1, seed=1)
    result = method.loss(net, batch)
    out = net(batch.images)  # train-mode forward: same batch statistics as inside loss
    g = F.normalize(out["embedding"].detach(), dim=1)
    expected_s = F.softmax(g @ F.normalize(prototypes_in_use, dim=1).t() / 0.3, dim=1)
    assert torch.allclose(method.last_proto.read(idx), expected_s, atol=2e-3)
    sums = torch.zeros(3, g.shape[1]).index_add_(0, labels[idx], g)
    assert torch.allclose(method.prototypes.sums, sums, atol=1e-5)
    assert result.terms["loss_con"].item() > 0


def backbone_grad_from_contrastive(con_grad: bool) -> float:
    """|grad| on the first conv from the compactness term alone (w_con huge, alpha and soft term neutralised)."""
    method, net, labels = make_method(con_grad=con_grad)
    idx = torch.arange(6)
    method.on_epoch_start(0)
    method.loss(net, make_batch(labels, idx, 0))
    method.on_epoch_end(0)
    batch = make_batch(labels, idx, 1, seed=3)
    out = net(batch.images)
    res = ipasd_loss(out["logits"].detach(), out["embedding"], batch.labels, method.last_proto.read(idx),
                     method.last_softmax.read(idx), method.prototypes.current, alpha=0.5, w_con=1.0, tau=0.3,
                     con_grad=con_grad)
    if not res["loss"].requires_grad:  # detached features and logits: nothing can reach the network
        return 0.0
    net.zero_grad()
    res["loss"].backward()
    grad = net.model.conv1.weight.grad
    return 0.0 if grad is None else grad.abs().sum().item()


def test_contrastive_term_trains_the_backbone_only_with_con_grad():
    assert backbone_grad_from_contrastive(True) > 0
    assert backbone_grad_from_contrastive(False) == 0.0


def test_state_dict_round_trip_restores_memories_and_prototypes():
    method, net, labels = make_method()
    method.on_epoch_start(0)
    method.loss(net, make_batch(labels, torch.tensor([0, 3]), 0))
    method.on_epoch_end(0)
    state = method.state_dict()
    fresh, _, _ = make_method()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.last_softmax.table, method.last_softmax.table)
    assert torch.equal(fresh.prototypes.current, method.prototypes.current)
    assert fresh.prototypes.ready


@pytest.mark.parametrize("dtype,bytes_per,atol", [("float32", 4, 0), ("float16", 2, 1e-3), ("uint8", 1, 3e-3)])
def test_memory_dtypes(dtype, bytes_per, atol):
    memory = SampleMemory(5, 4, dtype, "cpu")
    rows = F.softmax(torch.randn(2, 4), 1)
    memory.write(torch.tensor([1, 3]), rows)
    assert memory.bytes_per_entry == bytes_per
    assert torch.allclose(memory.read(torch.tensor([1, 3])), rows, atol=atol)


def test_prototype_similarity_is_float32_under_bf16_autocast():
    """cos(g, P) / tau feeds the memories and the blend weights: under bf16 autocast it must still be the fp32
    product (a bf16 matmul flips argmaxes of near-equal cosines)."""
    from ipasdctl.methods.ipasd import prototype_logits

    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(64, 32, generator=generator)
    prototypes = torch.randn(100, 32, generator=generator)
    expected = F.normalize(embedding, dim=1) @ F.normalize(prototypes, dim=1).t() / 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = prototype_logits(embedding, prototypes, 0.3)
        bf16_product = F.normalize(embedding, dim=1) @ F.normalize(prototypes, dim=1).t() / 0.3
    assert bf16_product.dtype == torch.bfloat16  # autocast is on: a plain product would be bf16
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("key, value", [("tau", 0), ("w_con", -1), ("memory_dtype", "int4")])
def test_bad_parameter_values_are_refused_when_parsed(key, value):
    from ipasdctl.errors import UserError
    from ipasdctl.methods import resolved_method_config

    with pytest.raises(UserError, match=f"method.{key}|memory dtype"):
        resolved_method_config({"name": "ipasd", key: value})
