"""MixSKD against its formula (plain Python on hand-made numbers) and against a transcription of the authors'
loss (winycg/Self-KD-Lib main_mixskd_cifar.py L169-201, models/resnet_mixskd.py L205-246, methods/adversarial.py,
utils.py DistillKL, ede3062), in the release's mode and in the fixed ones; plus its training-only parts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ipasdctl.data.base import Batch
from ipasdctl.errors import UserError
from ipasdctl.safe_io import load_checkpoint
from ipasdctl.methods import MethodContext, TrainingNet, build_method, method_class
from ipasdctl.methods.losses import mixup_draw
from ipasdctl.methods.mixskd import MixSKDParams, SelfTeacher, discriminator, mixskd_loss
from ipasdctl.models import build_model, count_params
from ipasdctl.runs import load_model as load_run_model
from ipasdctl.training import Progress, train
from ipasdctl.config import load_recipe

# ----------------------------------------------------------------------------------------------- the authors'
# Transcribed line by line (their names and reductions); the random draws are handed in.


def reference_distill_kl(y_s, y_t, T):  # utils.py L108-112
    p_s = F.log_softmax(y_s / T, dim=1)
    p_t = F.softmax(y_t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="batchmean") * (T ** 2)


def reference_mixup_criterion(criterion, pred, y_a, y_b, lam):  # main_mixskd_cifar.py L129-130
    return lam * criterion(pred, y_a) + (1 - lam) * criterion(pred, y_b)


def reference_self_teacher(x, conv_weight, fc_weight, fc_bias):  # resnet_mixskd.py L212-219
    out = F.conv2d(torch.cat(list(x), dim=1), conv_weight)
    out = F.adaptive_avg_pool2d(out, (1, 1)).view(out.size(0), -1)
    return F.linear(out, fc_weight, fc_bias)


class ReverseGrad(torch.autograd.Function):  # not the authors': the fixed mode's gradient reversal
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def reference_discriminator_loss(features1, features2, disc_params, reverse_grad=False):  # adversarial.py L29-42
    loss = nn.BCEWithLogitsLoss()
    gan_loss = 0
    for i in range(len(disc_params)):
        inputs = torch.cat((features1[i], features2[i]), 0)
        inputs = F.adaptive_avg_pool2d(inputs, (1, 1)).view(inputs.size(0), -1)
        if reverse_grad:
            inputs = ReverseGrad.apply(inputs)
        batch_size = inputs.size(0)
        target = torch.tensor([[1, 0] for _ in range(batch_size // 2)] + [[0, 1] for _ in range(batch_size // 2)],
                              dtype=inputs.dtype)
        w1, b1, w2, b2 = disc_params[i]
        outputs = F.linear(F.relu(F.linear(inputs, w1, b1)), w2, b2)
        gan_loss = gan_loss + loss(outputs, target)
    return gan_loss


def reference_mixskd_loss(logits, features, targets, lam, index, teacher_params, disc_params, T, add_mixup_ce,
                          reverse_disc_grad):
    """main_mixskd_cifar.py L169-201 (add_mixup_ce: main_mixskd_imagenet.py L269-272, 288)."""
    bs = targets.size(0)
    ensemble_features = [lam * (fea[:bs]) + (1 - lam) * (fea[index]) for fea in features]
    ensemle_logits = reference_self_teacher(ensemble_features, *teacher_params)
    ensemble_mixup_logits = reference_self_teacher([fea[bs:] for fea in features], *teacher_params)
    targets_a, targets_b = targets, targets[index]
    criterion_cls = nn.CrossEntropyLoss()
    mix_logits = [lam * logit[:bs] + (1 - lam) * logit[index] for logit in logits]
    mixup_logits = [logit[bs:] for logit in logits]
    mixup_features = [fea[bs:] for fea in features]
    loss_cls = sum(criterion_cls(logit[:bs], targets) for logit in logits)
    loss_mixcls = sum(reference_mixup_criterion(criterion_cls, z, targets_a, targets_b, lam) for z in mixup_logits)
    loss_mixcls = loss_mixcls + reference_mixup_criterion(criterion_cls, ensemle_logits, targets_a, targets_b, lam)
    loss_mixcls = loss_mixcls + reference_mixup_criterion(criterion_cls, ensemble_mixup_logits, targets_a, targets_b, lam)
    loss_div = reference_distill_kl(mix_logits[-1], ensemble_mixup_logits.detach(), T)
    loss_div = loss_div + reference_distill_kl(mixup_logits[-1], ensemle_logits.detach(), T)
    for i in range(len(mix_logits) - 1):
        loss_div = loss_div + reference_distill_kl(mix_logits[i], mixup_logits[i].detach(), T)
        loss_div = loss_div + reference_distill_kl(mixup_logits[i], mix_logits[i].detach(), T)
    loss_fea = sum(F.mse_loss(ensemble_features[fi], mixup_features[fi]) for fi in range(len(features)))
    loss_gan = reference_discriminator_loss(ensemble_features, mixup_features, disc_params, reverse_disc_grad)
    loss = loss_cls + loss_div + loss_fea + loss_gan + (loss_mixcls if add_mixup_ce else 0)
    return {"loss": loss, "loss_cls": loss_cls, "loss_mixcls": loss_mixcls, "loss_div": loss_div,
            "loss_fea": loss_fea, "loss_gan": loss_gan}


# ----------------------------------------------------------------------------------------------- parity


def project_parts(num_maps, channels, num_classes, params):
    torch.manual_seed(0)
    teacher = SelfTeacher(num_maps, channels, num_classes)
    discs = nn.ModuleList(discriminator(channels, params.disc_hidden) for _ in range(num_maps))
    if not params.mixup_ce:
        teacher.requires_grad_(False)
    if params.adversary == "frozen":
        discs.requires_grad_(False)
    return teacher, discs


@pytest.mark.parametrize("mixup_ce,adversary", [(False, "frozen"), (True, "joint"), (True, "reverse")])
def test_mixskd_matches_the_authors_loss_and_gradients(mixup_ce, adversary):
    B, K, C, H, S = 6, 5, 8, 2, 4
    generator = torch.Generator().manual_seed(1)
    logits = [torch.randn(2 * B, K, generator=generator, requires_grad=True) for _ in range(S)]
    maps = [torch.randn(2 * B, C, H, H, generator=generator, requires_grad=True) for _ in range(S)]
    labels = torch.randint(0, K, (B,), generator=generator)
    lam, index = 0.63, torch.randperm(B, generator=generator)
    params = MixSKDParams(mixup_ce=mixup_ce, adversary=adversary, disc_hidden=16)
    teacher, discs = project_parts(S, C, K, params)
    ours = mixskd_loss(logits, maps, labels, lam, index, teacher, discs, params)
    teacher_params = [teacher.conv.weight, teacher.fc.weight, teacher.fc.bias]
    disc_params = [(d[0].weight, d[0].bias, d[2].weight, d[2].bias) for d in discs]
    theirs = reference_mixskd_loss(logits, maps, labels, lam, index, teacher_params, disc_params, 3.0,
                                   add_mixup_ce=mixup_ce, reverse_disc_grad=adversary == "reverse")
    for mine, their in [("loss", "loss"), ("loss_ce", "loss_cls"), ("loss_mixce", "loss_mixcls"),
                        ("loss_kd", "loss_div"), ("loss_feat", "loss_fea"), ("loss_adv", "loss_gan")]:
        assert ours[mine].item() == pytest.approx(theirs[their].item(), abs=1e-5), mine
    trainable = [p for p in [*teacher.parameters(), *discs.parameters()] if p.requires_grad]
    inputs = [*logits, *maps, *trainable]
    grads_ours = torch.autograd.grad(ours["loss"], inputs)
    grads_theirs = torch.autograd.grad(theirs["loss"], inputs)
    for mine, their in zip(grads_ours, grads_theirs):
        assert torch.allclose(mine, their, atol=1e-5)
    if mixup_ce:  # the fix: the self-teacher trains
        assert all(g.abs().sum() > 0 for g in grads_ours[2 * S:2 * S + 3])
    else:  # the release: the self-teacher gets no gradient, so it is frozen
        assert not any(p.requires_grad for p in teacher.parameters())
        reference_teacher = [p.detach().clone().requires_grad_() for p in teacher_params]
        again = reference_mixskd_loss(logits, maps, labels, lam, index, reference_teacher, disc_params, 3.0,
                                      add_mixup_ce=False, reverse_disc_grad=False)
        assert all(g is None for g in torch.autograd.grad(again["loss"], reference_teacher, allow_unused=True))


def test_mixskd_reverse_flips_only_the_networks_side_of_the_adversarial_gradient():
    B, K, C, S = 4, 3, 6, 3
    generator = torch.Generator().manual_seed(2)
    logits = [torch.randn(2 * B, K, generator=generator) for _ in range(S)]
    maps = [torch.randn(2 * B, C, 2, 2, generator=generator, requires_grad=True) for _ in range(S)]
    labels, index = torch.randint(0, K, (B,), generator=generator), torch.randperm(B, generator=generator)
    grads = {}
    for adversary in ("joint", "reverse"):
        params = MixSKDParams(adversary=adversary)
        teacher, discs = project_parts(S, C, K, params)
        loss_adv = mixskd_loss(logits, maps, labels, 0.4, index, teacher, discs, params)["loss_adv"]
        grads[adversary] = (loss_adv.item(), torch.autograd.grad(loss_adv, [*maps, *discs.parameters()]))
    assert grads["joint"][0] == pytest.approx(grads["reverse"][0])
    for joint, reverse in zip(grads["joint"][1][:S], grads["reverse"][1][:S]):
        assert torch.allclose(joint, -reverse) and joint.abs().sum() > 0
    for joint, reverse in zip(grads["joint"][1][S:], grads["reverse"][1][S:]):
        assert torch.allclose(joint, reverse)  # the discriminators descend their loss either way


# ----------------------------------------------------------------------------------------------- by hand


def softmax(row):
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def ce(row, y):
    return -math.log(softmax(row)[y])


def kl_t(student, teacher, T):
    p_s, p_t = softmax([v / T for v in student]), softmax([v / T for v in teacher])
    return T * T * sum(t * math.log(t / s) for t, s in zip(p_t, p_s))


def bce(logit, target):
    return -(target * math.log(1 / (1 + math.exp(-logit))) + (1 - target) * math.log(1 - 1 / (1 + math.exp(-logit))))


def test_mixskd_loss_by_hand():
    """Two heads (one auxiliary, the backbone's), B = 2, K = 2, one-channel 1x1 maps, a 1-unit discriminator."""
    lam, index, labels, T = 0.7, [1, 0], [0, 1], 3.0
    z = [[[1.0, -0.5], [0.2, 0.8], [0.5, 0.1], [-0.3, 0.4]], [[2.0, 0.0], [-1.0, 1.0], [0.7, 0.2], [0.1, 0.9]]]
    f = [[0.5, 1.5, 0.9, 1.1], [1.0, -0.5, 0.4, 0.2]]
    conv_w, fc_w, fc_b = [0.6, -0.4], [1.2, -0.8], [0.1, -0.1]
    discs = [(0.9, 0.2, [1.0, -1.0], [0.0, 0.1]), (-0.7, 0.3, [0.5, 0.4], [0.05, -0.05])]

    def interp(rows, i):
        return [lam * a + (1 - lam) * b for a, b in zip(rows[i], rows[index[i]])] if isinstance(rows[i], list) \
            else lam * rows[i] + (1 - lam) * rows[index[i]]

    def teacher(values):
        fused = conv_w[0] * values[0] + conv_w[1] * values[1]
        return [fc_w[k] * fused + fc_b[k] for k in range(2)]

    def mix_ce(row, i):
        return lam * ce(row, labels[i]) + (1 - lam) * ce(row, labels[index[i]])

    loss_ce = sum(ce(z[h][i], labels[i]) for h in range(2) for i in range(2)) / 2
    t_interp = [teacher([interp(f[0], i), interp(f[1], i)]) for i in range(2)]
    t_mixed = [teacher([f[0][2 + i], f[1][2 + i]]) for i in range(2)]
    loss_mixce = sum(mix_ce(z[h][2 + i], i) + 0 for h in range(2) for i in range(2)) / 2
    loss_mixce += sum(mix_ce(t_interp[i], i) + mix_ce(t_mixed[i], i) for i in range(2)) / 2
    loss_kd = sum(kl_t(interp(z[0], i), z[0][2 + i], T) + kl_t(z[0][2 + i], interp(z[0], i), T)
                  + kl_t(interp(z[1], i), t_mixed[i], T) + kl_t(z[1][2 + i], t_interp[i], T) for i in range(2)) / 2
    loss_feat = sum((interp(f[h], i) - f[h][2 + i]) ** 2 for h in range(2) for i in range(2)) / 2
    loss_adv = 0.0
    for h, (w1, b1, w2, b2) in enumerate(discs):
        rows = [(interp(f[h], i), (1, 0)) for i in range(2)] + [(f[h][2 + i], (0, 1)) for i in range(2)]
        for value, target in rows:
            hidden = max(0.0, w1 * value + b1)
            loss_adv += sum(bce(w2[k] * hidden + b2[k], target[k]) for k in range(2)) / 8

    params = MixSKDParams(disc_hidden=1)
    teacher_module = SelfTeacher(2, 1, 2)
    disc_modules = nn.ModuleList(discriminator(1, 1) for _ in range(2))
    with torch.no_grad():
        teacher_module.conv.weight.copy_(torch.tensor(conv_w).view(1, 2, 1, 1))
        teacher_module.fc.weight.copy_(torch.tensor(fc_w).view(2, 1))
        teacher_module.fc.bias.copy_(torch.tensor(fc_b))
        for module, (w1, b1, w2, b2) in zip(disc_modules, discs):
            module[0].weight.fill_(w1), module[0].bias.fill_(b1)
            module[2].weight.copy_(torch.tensor(w2).view(2, 1)), module[2].bias.copy_(torch.tensor(b2))
    result = mixskd_loss([torch.tensor(rows) for rows in z], [torch.tensor(v).view(4, 1, 1, 1) for v in f],
                         torch.tensor(labels), lam, torch.tensor(index), teacher_module, disc_modules, params)
    expected = {"loss_ce": loss_ce, "loss_mixce": loss_mixce, "loss_kd": loss_kd, "loss_feat": loss_feat,
                "loss_adv": loss_adv}
    for key, value in expected.items():
        assert result[key].item() == pytest.approx(value, rel=1e-5), key
    assert result["loss"].item() == pytest.approx(sum(expected.values()), rel=1e-5)
    release = mixskd_loss([torch.tensor(rows) for rows in z], [torch.tensor(v).view(4, 1, 1, 1) for v in f],
                          torch.tensor(labels), lam, torch.tensor(index), teacher_module, disc_modules,
                          MixSKDParams(disc_hidden=1, mixup_ce=False))
    assert release["loss"].item() == pytest.approx(sum(expected.values()) - loss_mixce, rel=1e-5)


# ----------------------------------------------------------------------------------------------- the method


def make_ctx(model, num_classes=10):
    return MethodContext(num_classes=num_classes, num_train=8, train_labels=torch.arange(8) % num_classes,
                         embed_dim=model.stage_channels[-1], stage_channels=list(model.stage_channels), epochs=2,
                         batch_size=4, seed=0, device=torch.device("cpu"))


def test_mixskd_step_trains_every_part_and_keeps_them_out_of_the_model():
    torch.manual_seed(0)
    model = build_model("resnet8", 10)
    method = build_method({"name": "mixskd"}, make_ctx(model))
    parts = method.extra_module()
    assert parts.heads.stages == [0, 1] and len(parts.discriminators) == 3  # a head after every intermediate stage
    assert parts.teacher.conv.in_channels == 3 * 64
    net = TrainingNet(model, parts)
    assert not {id(p) for p in parts.parameters()} & {id(p) for p in net.model.parameters()}
    labels = torch.tensor([0, 3, 9, 1])
    images = torch.randn(4, 3, 16, 16)
    batch = Batch(images=images, labels=labels, indices=torch.arange(4), raw=None, epoch=0, step=3)
    result = method.loss(net, batch)
    assert result.logits.shape == (4, 10) and torch.equal(result.labels, labels)
    lam = mixup_draw(0, 0, 3, 0, 4, 0.4, torch.device("cpu"))[0]
    assert result.terms["lam"].item() == pytest.approx(lam)
    result.loss.backward()
    for module in (parts.heads, parts.teacher, parts.discriminators, model):
        assert all(p.grad is not None for p in module.parameters())
    assert method_class("mixskd").changes_images and method_class("ddgsd").changes_images
    assert not method_class("maxsup").changes_images


def test_mixskd_release_mode_freezes_the_self_teacher_and_the_discriminators():
    model = build_model("resnet8", 10)
    parts = build_method({"name": "mixskd", "mixup_ce": False, "adversary": "frozen"}, make_ctx(model)).extra_module()
    assert not any(p.requires_grad for p in [*parts.teacher.parameters(), *parts.discriminators.parameters()])
    assert all(p.requires_grad for p in parts.heads.parameters())


def test_mixskd_refuses_bad_parameters():
    model = build_model("resnet8", 10)
    with pytest.raises(UserError, match="adversary"):
        build_method({"name": "mixskd", "adversary": "gan"}, make_ctx(model))
    with pytest.raises(UserError, match="aux_stages"):
        build_method({"name": "mixskd", "aux_stages": [2]}, make_ctx(model))


def test_mixskd_run_trains_and_exports_the_plain_model(tmp_path):
    recipe = load_recipe("demo", {"method": {"name": "mixskd"}, "data": {"train_subset": 64},
                                  "model": {"arch": "resnet8"}, "train": {"epochs": 1, "batch_size": 32}})
    run = train(recipe, tmp_path, progress=Progress(enabled=False))
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert set(state["model"]) == set(build_model("resnet8", 10).state_dict())
    assert state["extra"]["teacher.conv.weight"].shape == (64, 3 * 64, 1, 1)
    assert any(key.startswith("discriminators.") for key in state["extra"])
    model, _, _ = load_run_model(run, "best", "cpu")
    assert count_params(model) == count_params(build_model("resnet8", 10))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.slow
@pytest.mark.parametrize("release", [False, True])
def test_mixskd_trains_under_two_processes(release, tmp_path):
    """The self-teacher and the discriminators run outside the network's forward (the loss knows lam and pi):
    DDP must still reduce their gradients, and skip the frozen ones of the release's mode."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    env.pop("IPASDCTL_DEBUG", None)
    release_args = ["--set", "method.mixup_ce=false", "--set", "method.adversary=frozen"] if release else []
    done = subprocess.run([sys.executable, "-m", "ipasdctl", "train", "--nproc", "2", "--dataset", "digits",
                           "--arch", "resnet8", "--epochs", "1", "--device", "cpu", "--quiet", "--method", "mixskd",
                           "--batch-size", "16", "--set", "data.train_subset=64", *release_args,
                           "--out", str(tmp_path), "--name", "run"],
                          env=env, cwd=repo, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["processes"] == 2 and summary["changes_images"] is True
    assert "discriminators.0.0.weight" in load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["extra"]
