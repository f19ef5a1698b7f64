"""CS-KD, DLB, DDGSD, BYOT and DKS: losses against their formulas (plain Python math on hand-made numbers),
the wiring each needs (partners without gradient, one forward of two views, stored logits, auxiliary heads
that never reach the evaluated model), and a short engine run of each."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ipasdctl import runs, training
from ipasdctl.training import stopping
from ipasdctl.data.base import Batch
from ipasdctl.data.samplers import ClassPairBatches, OverlapBatches
from ipasdctl.errors import UserError
from ipasdctl.methods import MethodContext, TrainingNet, build_method
from ipasdctl.methods.aux_heads import AuxiliaryHeads, resolve_aux_stages
from ipasdctl.methods.byot import BYOTParams, byot_loss
from ipasdctl.methods.cs_kd import class_wise_loss
from ipasdctl.methods.ddgsd import DDGSDParams, ddgsd_loss
from ipasdctl.methods.dks import dks_loss
from ipasdctl.methods.dlb import dlb_loss
from ipasdctl.methods.losses import distill_kl
from ipasdctl.models import build_model
from tests.helpers import tiny_recipe

# ----------------------------------------------------------------------------------------------- plain math


def softmax(values, t=1.0):
    scaled = [v / t for v in values]
    m = max(scaled)
    exps = [math.exp(v - m) for v in scaled]
    return [e / sum(exps) for e in exps]


def ce(row, label):
    return -math.log(softmax(row)[label])


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def kd(student_rows, teacher_rows, t):
    """T^2 * mean over rows of KL(p_T(teacher) || p_T(student))."""
    terms = [kl(softmax(te, t), softmax(st, t)) for st, te in zip(student_rows, teacher_rows)]
    return t * t * sum(terms) / len(terms)


def mean_ce(rows, labels):
    return sum(ce(r, y) for r, y in zip(rows, labels)) / len(rows)


def tensor(rows):
    return torch.tensor(rows, dtype=torch.float32)


def ctx_for(num_classes=3, num_train=12, stage_channels=(4, 8, 16), labels=None):
    labels = labels if labels is not None else torch.arange(num_train) % num_classes
    return MethodContext(num_classes=num_classes, num_train=num_train, train_labels=labels,
                         embed_dim=stage_channels[-1], stage_channels=list(stage_channels), epochs=4, batch_size=4,
                         seed=0, device=torch.device("cpu"))


class RecordingNet(nn.Module):
    """A linear classifier on flattened images that records each call's batch size and grad mode."""

    def __init__(self, in_features=12, num_classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(in_features, num_classes)
        self.calls: list[tuple[int, bool]] = []

    def forward(self, x):
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        flat = x.flatten(1)
        return {"logits": self.linear(flat), "embedding": flat}


def make_batch(indices, labels, images, epoch=0, step=0, view=None):
    indices = torch.as_tensor(indices)
    return Batch(images=images[indices], labels=labels[indices], indices=indices, raw=images[indices],
                 epoch=epoch, step=step, view=view)


A = [[1.0, -0.5, 0.25], [0.2, 0.9, -1.1], [-0.3, 0.4, 1.5]]
B = [[0.1, 0.3, -0.7], [1.2, -0.4, 0.0], [0.5, 0.5, -0.2]]
C = [[-1.0, 0.6, 0.3], [0.0, 2.0, -0.5], [0.9, -0.9, 0.1]]
Y = [0, 1, 2]


# ----------------------------------------------------------------------------------------------- the KD term


def test_distill_kl_is_t_squared_kl_of_teacher_over_student():
    assert distill_kl(tensor(A), tensor(B), 4.0).item() == pytest.approx(kd(A, B, 4.0), rel=1e-5)
    assert distill_kl(tensor(A), tensor(B), 4.0).item() != pytest.approx(kd(B, A, 4.0), rel=1e-3)  # direction


def test_distill_kl_gives_no_gradient_to_the_teacher():
    student, teacher = tensor(A).requires_grad_(), tensor(B).requires_grad_()
    distill_kl(student, teacher, 2.0).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- cs-kd


def test_class_wise_loss_matches_formula():
    out = class_wise_loss(tensor(A), tensor(B), torch.tensor(Y), temperature=4.0, kd_weight=3.0)
    expected_kd = kd(A, B, 4.0)
    assert out["loss_kd"].item() == pytest.approx(expected_kd, rel=1e-5)
    assert out["loss_ce"].item() == pytest.approx(mean_ce(A, Y), rel=1e-5)
    assert out["loss"].item() == pytest.approx(mean_ce(A, Y) + 3.0 * expected_kd, rel=1e-5)


def test_cs_kd_forwards_partners_without_gradient_and_reports_anchors():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    images = torch.randn(8, 3, 2, 2)
    method = build_method({"name": "cs-kd", "T": 2.0}, ctx_for(num_train=8, labels=labels))
    plan = method.batch_plan(labels, 3, seed=0)
    assert isinstance(plan, ClassPairBatches)
    batch = make_batch(plan(0)[0], labels, images)
    net = RecordingNet()
    out = method.loss(net, batch)
    assert net.calls == [(3, True), (3, False)]  # anchors with gradient, then partners without
    assert torch.equal(out.labels, batch.labels[:3]) and out.logits.shape == (3, 3)
    with torch.no_grad():
        anchor_logits, partner_logits = net.linear(batch.images[:3].flatten(1)), net.linear(batch.images[3:].flatten(1))
    expected = class_wise_loss(anchor_logits, partner_logits, batch.labels[:3], 2.0, 1.0)["loss"]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    out.loss.backward()
    assert net.linear.weight.grad is not None


# ----------------------------------------------------------------------------------------------- dlb


def test_dlb_loss_matches_formula():
    new, repeated, stored = A[:2], B[:2], C[:2]
    out = dlb_loss(tensor(new), torch.tensor([0, 1]), tensor(repeated), torch.tensor([2, 1]), tensor(stored),
                   temperature=3.0, kd_weight=0.5)
    expected_ce = mean_ce(repeated + new, [2, 1, 0, 1])  # CE over the whole batch, both halves
    expected_kd = kd(repeated, stored, 3.0)  # KL(stored_T || repeated-now_T)
    assert out["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-5)
    assert out["loss_kd"].item() == pytest.approx(expected_kd, rel=1e-5)
    assert out["loss"].item() == pytest.approx(expected_ce + 0.5 * expected_kd, rel=1e-5)


def test_dlb_loss_without_a_repeated_half_is_cross_entropy():
    out = dlb_loss(tensor(A), torch.tensor(Y), None, None, None, temperature=3.0, kd_weight=1.0)
    assert out["loss"].item() == pytest.approx(mean_ce(A, Y), rel=1e-6) and out["loss_kd"].item() == 0.0


@pytest.mark.parametrize("joint", [False, True])
def test_dlb_distils_each_repeated_half_from_the_logits_stored_one_step_before(joint):
    labels = torch.arange(10) % 3
    images = torch.randn(10, 3, 2, 2)
    method = build_method({"name": "dlb", "T": 2.0, "kd_weight": 0.7, "joint_forward": joint},
                          ctx_for(num_train=10, labels=labels))
    plan = method.batch_plan(labels, 4, seed=0)
    assert isinstance(plan, OverlapBatches)
    net = RecordingNet()
    batches = plan(0)
    first = method.loss(net, make_batch(batches[0], labels, images))
    assert net.calls == [(4, True)] and first.terms["loss_kd"].item() == 0.0
    stored = method.stored_logits.clone()
    assert torch.equal(method.stored_indices, batches[0])
    net.calls.clear()
    # a second, differently augmented view of the same images (the loader re-augments the repeated half)
    second_images = images + 0.1
    out = method.loss(net, make_batch(batches[1], labels, second_images, step=1))
    assert net.calls == ([(8, True)] if joint else [(4, True), (4, True)])
    assert torch.equal(out.labels, labels[batches[1][4:]]) and out.logits.shape == (4, 3)
    with torch.no_grad():
        logits = net.linear(second_images[batches[1]].flatten(1))
    expected = dlb_loss(logits[4:], labels[batches[1][4:]], logits[:4], labels[batches[1][:4]], stored, 2.0, 0.7)
    assert out.loss.item() == pytest.approx(expected["loss"].item(), rel=1e-6)
    assert out.terms["loss_kd"].item() > 0
    assert torch.allclose(method.stored_logits, logits[4:])


def test_dlb_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    labels = torch.arange(10) % 3
    images = torch.randn(10, 3, 2, 2)
    ctx = ctx_for(num_train=10, labels=labels)
    method = build_method({"name": "dlb"}, ctx)
    plan = method.batch_plan(labels, 4, seed=0)
    net = RecordingNet()
    method.loss(net, make_batch(plan(0)[0], labels, images))
    torch.save(method.state_dict(), tmp_path / "state.pt")
    restored = build_method({"name": "dlb"}, ctx)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    batch = make_batch(plan(0)[1], labels, images, step=1)
    assert method.loss(net, batch).loss.item() == restored.loss(net, batch).loss.item()
    with pytest.raises(UserError):
        restored.load_state_dict({})


# ----------------------------------------------------------------------------------------------- ddgsd


@pytest.mark.parametrize("mmd", ["scalar", "vector"])
def test_ddgsd_loss_matches_formula(mmd):
    f1 = [[0.5, 1.0, 0.0, 2.0], [1.5, 0.0, 0.5, 1.0], [0.0, 0.2, 0.3, 0.1]]
    f2 = [[0.1, 0.4, 0.9, 1.0], [0.3, 0.3, 0.0, 0.5], [1.0, 0.0, 0.0, 0.2]]
    params = DDGSDParams(T=4.0, ce_weight=0.5, kd_weight=2.0, mmd_weight=0.3, mmd=mmd)
    out = ddgsd_loss(tensor(A), tensor(B), tensor(f1), tensor(f2), torch.tensor(Y), params)
    expected_ce = (mean_ce(A, Y) + mean_ce(B, Y)) / 2
    expected_kd = kd(A, B, 4.0) + kd(B, A, 4.0)
    if mmd == "scalar":  # Self-KD-Lib: squared difference of the two global means
        expected_mmd = (sum(map(sum, f1)) / 12 - sum(map(sum, f2)) / 12) ** 2
    else:  # squared norm of the difference of the mean feature vectors
        expected_mmd = sum((sum(r[d] for r in f1) / 3 - sum(r[d] for r in f2) / 3) ** 2 for d in range(4))
    assert out["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-5)
    assert out["loss_kd"].item() == pytest.approx(expected_kd, rel=1e-5)
    assert out["loss_mmd"].item() == pytest.approx(expected_mmd, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.5 * expected_ce + 2.0 * expected_kd + 0.3 * expected_mmd, rel=1e-5)


def test_ddgsd_forwards_both_views_in_one_batch():
    labels = torch.tensor([0, 1, 2, 1])
    images = torch.randn(4, 3, 2, 2)
    views = []

    def second_view(raw, stream):
        views.append(stream)
        return raw * -1.0

    method = build_method({"name": "ddgsd", "mmd_weight": 0.0}, ctx_for(num_train=4, labels=labels))
    net = RecordingNet()
    batch = make_batch([0, 1, 2, 3], labels, images, view=second_view)
    out = method.loss(net, batch)
    assert net.calls == [(8, True)] and views == [0]  # one forward of 2B rows: BatchNorm sees both views
    with torch.no_grad():
        l1, l2 = net.linear(images.flatten(1)), net.linear(-images.flatten(1))
    expected = ddgsd_loss(l1, l2, images.flatten(1), -images.flatten(1), labels, DDGSDParams(mmd_weight=0.0))
    assert out.loss.item() == pytest.approx(expected["loss"].item(), rel=1e-6)
    assert torch.allclose(out.logits, l1)


# ----------------------------------------------------------------------------------------------- byot, dks


def test_byot_loss_matches_formula_with_feature_maps():
    main, aux = A, [B, C]
    f0 = [[1.0, 0.0], [0.5, 2.0], [0.0, 0.3]]
    fa = [[[0.5, 0.5], [0.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [0.5, 0.5], [0.2, 0.1]]]
    params = BYOTParams(T=4.0, ce_weight=1.5, kd_weight=0.7, feat_weight=0.05, feat_loss="map_mse")
    out = byot_loss(tensor(main), [tensor(a) for a in aux], tensor(f0), [tensor(f) for f in fa],
                    torch.tensor(Y), params)
    expected_ce = mean_ce(main, Y) + mean_ce(B, Y) + mean_ce(C, Y)
    expected_kd = kd(B, main, 4.0) + kd(C, main, 4.0)  # the deepest head teaches each shallow one
    expected_feat = sum(sum((x - y) ** 2 for rf, r0 in zip(f, f0) for x, y in zip(rf, r0)) / 6 for f in fa)
    assert out["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-5)
    assert out["loss_kd"].item() == pytest.approx(expected_kd, rel=1e-5)
    assert out["loss_feat"].item() == pytest.approx(expected_feat, rel=1e-5)
    assert out["loss"].item() == pytest.approx(1.5 * expected_ce + 0.7 * expected_kd + 0.05 * expected_feat, rel=1e-5)


def test_byot_original_feature_term_is_a_masked_sum_on_pooled_features():
    f0 = [[1.0, 0.0, 0.0], [0.5, 2.0, 0.0]]
    fa = [[0.5, 0.0, -0.4], [0.0, 1.0, 0.0]]
    params = BYOTParams(T=3.0, ce_weight=0.9, kd_weight=0.1, feat_weight=1e-6, feat_loss="pooled_masked_sum")
    out = byot_loss(tensor(A[:2]), [tensor(B[:2])], tensor(f0), [tensor(fa)], torch.tensor([0, 1]), params)
    # (x - y)^2 where x > 0 or y > 0: the -0.4 against 0 is masked out
    expected_feat = (0.5 ** 2) + (0.5 ** 2) + (1.0 ** 2)
    assert out["loss_feat"].item() == pytest.approx(expected_feat, rel=1e-6)
    expected_ce = mean_ce(A[:2], [0, 1]) + mean_ce(B[:2], [0, 1])
    expected = 0.9 * expected_ce + 0.1 * kd(B[:2], A[:2], 3.0) + 1e-6 * expected_feat
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_byot_teacher_side_gets_only_cross_entropy_gradient():
    main = tensor(A).requires_grad_()
    f0 = torch.rand(3, 2, requires_grad=True)
    params = BYOTParams()
    byot_loss(main, [tensor(B)], f0, [torch.rand(3, 2)], torch.tensor(Y), params)["loss"].backward()
    ce_only = tensor(A).requires_grad_()
    torch.nn.functional.cross_entropy(ce_only, torch.tensor(Y)).backward()
    assert torch.allclose(main.grad, ce_only.grad) and f0.grad is None


def test_dks_loss_matches_formula_over_every_ordered_pair():
    out = dks_loss([tensor(A), tensor(B), tensor(C)], torch.tensor(Y), temperature=4.0, ce_weight=0.5, kd_weight=2.0)
    heads = [A, B, C]
    expected_ce = sum(mean_ce(h, Y) for h in heads)
    expected_kd = sum(kd(s, t, 4.0) for i, s in enumerate(heads) for j, t in enumerate(heads) if i != j)
    assert out["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-5)
    assert out["loss_kd"].item() == pytest.approx(expected_kd, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.5 * expected_ce + 2.0 * expected_kd, rel=1e-5)


def test_dks_teachers_are_detached():
    heads = [tensor(A).requires_grad_(), tensor(B).requires_grad_()]
    dks_loss(heads, torch.tensor(Y), 4.0, ce_weight=0.0, kd_weight=1.0)["loss"].backward()
    # each head's gradient is that of its own student term only
    for i, head in enumerate(heads):
        alone = tensor([A, B][i]).requires_grad_()
        distill_kl(alone, tensor([A, B][1 - i]), 4.0).backward()
        assert torch.allclose(head.grad, alone.grad)


# ----------------------------------------------------------------------------------------------- aux heads


def test_default_aux_stages_and_bad_choices():
    assert resolve_aux_stages([16, 32, 64], None) == [0, 1]
    assert resolve_aux_stages([64, 128, 256, 512], None) == [1, 2]  # Self-KD-Lib's 3 classifiers
    assert resolve_aux_stages([64, 128, 256, 512], [2, 0]) == [0, 2]
    for bad in ([3], [2, 2], [-1], []):
        with pytest.raises(UserError):
            resolve_aux_stages([64, 128, 256, 512], bad)
    with pytest.raises(UserError):
        resolve_aux_stages([64], None)


def test_heads_give_maps_shaped_like_the_last_stage():
    model = build_model("resnet8", 10)
    heads = AuxiliaryHeads(model.stage_channels, 10, [0, 1])
    net = TrainingNet(model, heads)
    out = net(torch.randn(2, 3, 16, 16))
    last = out["stages"][-1]
    assert [f.shape for f in out["aux_features"]] == [last.shape, last.shape]
    assert [e.shape for e in out["aux_embeddings"]] == [(2, 64), (2, 64)]
    assert [z.shape for z in out["aux_logits"]] == [(2, 10), (2, 10)]
    # a stage map that is not 2x per stage larger is pooled to the size the head expects
    odd = {"stages": [torch.randn(2, 16, 12, 12), torch.randn(2, 32, 6, 6), torch.randn(2, 64, 5, 5)]}
    assert [f.shape for f in heads(odd)["aux_features"]] == [(2, 64, 5, 5), (2, 64, 5, 5)]


def test_auxiliary_heads_are_not_part_of_the_evaluated_model():
    model = build_model("resnet8", 10)
    method = build_method({"name": "byot"}, ctx_for(num_classes=10, stage_channels=model.stage_channels))
    net = TrainingNet(model, method.extra_module())
    head_keys = {f"extra.{k}" for k in method.extra_module().state_dict()}
    assert head_keys and head_keys <= set(net.state_dict())
    assert not any(k.startswith("extra") or "heads" in k for k in net.model.state_dict())
    assert sum(p.numel() for p in net.parameters()) == \
        sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in method.extra_module().parameters())
    logits = net.model(torch.randn(2, 3, 16, 16))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 10)


# ----------------------------------------------------------------------------------------------- engine runs


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """method -> run folder of a 1-epoch run on 64 digits (trained once, on first use)."""
    runs: dict[str, Path] = {}

    def run(method: str) -> Path:
        if method not in runs:
            out = tmp_path_factory.mktemp(method)
            runs[method] = training.train(tiny_recipe(method, batch_size=16), out, progress=training.Progress(enabled=False))
        return runs[method]

    return run


@pytest.mark.parametrize("method", ["cs-kd", "dlb", "ddgsd", "byot", "dks"])
def test_one_epoch_engine_run_finishes_with_finite_metrics(method, trained_runs):
    run_dir = trained_runs(method)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == method and summary["finished"]
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header, values = rows[0].split(","), rows[1].split(",")
    assert "loss_kd" in header
    for name in ("train_loss", "loss_ce", "loss_kd", "train_top1", "test_loss", "test_top1"):
        assert math.isfinite(float(values[header.index(name)])), name
    if method in ("cs-kd", "dlb"):  # the anchors / new samples are counted once each: 64 per epoch
        images_per_second = float(values[header.index("images_per_second")])
        seconds = float(values[header.index("epoch_seconds")])
        assert images_per_second * seconds == pytest.approx(64, rel=1e-3)


def test_byot_run_loads_as_a_plain_model(trained_runs):
    model, state, recipe = runs.load_model(trained_runs("byot"))
    assert state["extra"] and not any("heads" in k for k in state["model"])
    logits = model(torch.randn(3, 3, 16, 16))
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 10) and torch.isfinite(logits).all()


def test_dlb_mid_epoch_resume_continues_exactly(tmp_path, trained_runs, monkeypatch):
    """The stored logits of the last step are in the checkpoint: the resumed run is the uninterrupted one."""
    method = "dlb"
    straight = trained_runs(method)  # 1 epoch of 4 steps, uninterrupted
    run_dir = tmp_path / "interrupted"
    monkeypatch.setenv(stopping.TEST_SIGNAL_ENV, "2:TERM")  # SIGTERM after step 2 of 4: checkpoint and stop
    with pytest.raises(training.Interrupted):
        training.train_into(tiny_recipe(method, batch_size=16), run_dir, progress=training.Progress(enabled=False))
    interrupted = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert (interrupted["epoch"], interrupted["step_in_epoch"]) == (0, 2)
    assert interrupted["method"]["stored_logits"].shape == (16, 10)  # step 2's new half, for step 3
    monkeypatch.delenv(stopping.TEST_SIGNAL_ENV)
    training.resume(run_dir, progress=training.Progress(enabled=False))
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["rows"][0]["train_loss"] == pytest.approx(b["rows"][0]["train_loss"], rel=1e-6)
