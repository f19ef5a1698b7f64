"""ls, tf-kd-reg, tf-kd-self, ps-kd, zipf-ls and uskd against their formulas (hand-made tensors, the expected
values computed independently with plain Python loops and math), plus their wiring into the training."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn

from ipasdctl.data.base import Batch
from ipasdctl.models import count_params
from ipasdctl.runs import load_model as load_run_model
from ipasdctl.safe_io import load_checkpoint
from ipasdctl.training import Progress, Trainer, resolve_recipe, train
from ipasdctl.errors import UserError
from ipasdctl.methods import MethodContext, TrainingNet, build_method
from ipasdctl.methods.memory import SampleMemory
from ipasdctl.methods.ps_kd import pskd_alpha
from ipasdctl.methods.zipf_ls import dense_votes, min_ranks
from ipasdctl.models import build_model
from tests.helpers import tiny_recipe

# ----------------------------------------------------------------------------------------------- helpers


def softmax(values):
    m = max(values)
    exps = [math.exp(v - m) for v in values]
    return [e / sum(exps) for e in exps]


def log_softmax(values):
    return [math.log(p) for p in softmax(values)]


def cross_entropy(logits, labels):
    return -sum(log_softmax(row)[y] for row, y in zip(logits, labels)) / len(labels)


class FixedNet(nn.Module):
    """Stands in for TrainingNet: returns hand-made outputs whatever the images."""

    def __init__(self, **outputs):
        super().__init__()
        self.outputs = outputs
        self.model = nn.Module()

    def forward(self, x):
        return dict(self.outputs)


def make_ctx(num_classes=4, num_train=6, epochs=10, stage_channels=(16, 32, 64), labels=None):
    labels = torch.arange(num_train) % num_classes if labels is None else labels
    return MethodContext(num_classes=num_classes, num_train=num_train, train_labels=labels,
                         embed_dim=stage_channels[-1], stage_channels=list(stage_channels), epochs=epochs,
                         batch_size=4, seed=0, device=torch.device("cpu"))


def make_batch(labels, indices=None, epoch=0, images=None):
    labels = torch.as_tensor(labels)
    indices = torch.arange(labels.numel()) if indices is None else torch.as_tensor(indices)
    images = torch.zeros(labels.numel(), 3, 8, 8) if images is None else images
    return Batch(images=images, labels=labels, indices=indices, raw=None, epoch=epoch, step=0)


def leaf(values):
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


LOGITS = [[2.0, 0.5, -1.0, 0.3], [0.1, 1.5, 0.3, -0.2], [-1.0, 0.0, 1.0, 2.5]]
LABELS = [0, 2, 3]


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------------------------- ls


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothing_spreads_eps_over_the_other_classes(eps):
    params = {} if eps == 0.1 else {"eps": eps}  # 0.1 is the default
    method = build_method({"name": "ls", **params}, make_ctx())
    logits = leaf(LOGITS)
    result = method.loss(FixedNet(logits=logits), make_batch(LABELS))
    expected = 0.0
    for row, y in zip(LOGITS, LABELS):
        target = [1 - eps if c == y else eps / 3 for c in range(4)]
        expected -= sum(t * lp for t, lp in zip(target, log_softmax(row))) / 3
    assert result.loss.item() == pytest.approx(expected, rel=1e-6)
    assert result.loss.requires_grad and result.logits is logits
    # eps / K on every class (torch's label_smoothing=) is a different loss
    torch_smoothed = F.cross_entropy(logits, torch.tensor(LABELS), label_smoothing=eps).item()
    assert torch_smoothed != pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------------------------- tf-kd-reg


@pytest.mark.parametrize("soften_student", [False, True])
def test_tf_kd_reg_matches_the_release_formula(soften_student):
    method = build_method({"name": "tf-kd-reg", "soften_student": soften_student}, make_ctx())
    assert (method.params.alpha, method.params.temperature, method.params.multiplier) == (0.1, 20.0, 100.0)
    result = method.loss(FixedNet(logits=leaf(LOGITS)), make_batch(LABELS))
    a, T, m, K, N = 0.1, 20.0, 100.0, 4, 3
    kl_sum = 0.0
    for row, y in zip(LOGITS, LABELS):
        u = [0.99 if c == y else 0.01 / (K - 1) for c in range(K)]
        q = softmax([v / T for v in u])
        log_p = log_softmax([v / T for v in row] if soften_student else row)
        kl_sum += sum(qc * (math.log(qc) - lp) for qc, lp in zip(q, log_p))
    kd = m * kl_sum / (N * K)  # nn.KLDivLoss()'s default: mean over every element
    ce = cross_entropy(LOGITS, LABELS)
    assert result.terms["loss_kd"].item() == pytest.approx(kd, rel=1e-5)
    assert result.terms["loss_ce"].item() == pytest.approx(ce, rel=1e-6)
    assert result.loss.item() == pytest.approx((1 - a) * ce + a * kd, rel=1e-5)


def test_tf_kd_reg_overrides_reach_the_loss():
    method = build_method({"name": "tf-kd-reg", "alpha": 0.5, "temperature": 2.0, "multiplier": 4.0}, make_ctx())
    result = method.loss(FixedNet(logits=leaf(LOGITS)), make_batch(LABELS))
    kl_sum = 0.0
    for row, y in zip(LOGITS, LABELS):
        q = softmax([(0.99 if c == y else 0.01 / 3) / 2.0 for c in range(4)])
        kl_sum += sum(qc * (math.log(qc) - lp) for qc, lp in zip(q, log_softmax(row)))
    expected = 0.5 * cross_entropy(LOGITS, LABELS) + 0.5 * 4.0 * kl_sum / 12
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------- tf-kd-self


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny finished ce run (resnet8, 64 digits, 1 epoch) to serve as the teacher."""
    out = tmp_path_factory.mktemp("teacher")
    return train(tiny_recipe({"name": "ce"}), out, name="teacher", progress=Progress(enabled=False))


def test_tf_kd_self_needs_a_teacher(tmp_path):
    for params, words in [({}, "method.teacher="), ({"teacher": str(tmp_path / "nope")}, "no such run folder"),
                          ({"teacher": str(tmp_path)}, "best.pt")]:
        with pytest.raises(UserError) as info:
            build_method({"name": "tf-kd-self", **params}, make_ctx(num_classes=10))
        assert words in str(info.value) and "\n" not in str(info.value)


def test_tf_kd_self_rejects_a_teacher_with_other_classes(teacher_run):
    with pytest.raises(UserError, match="has 10 classes but this data set has 5"):
        build_method({"name": "tf-kd-self", "teacher": str(teacher_run)}, make_ctx(num_classes=5))


def test_tf_kd_self_teacher_follows_the_batches_layout(teacher_run):
    ctx = make_ctx(num_classes=10)
    ctx.channels_last = True
    teacher = build_method({"name": "tf-kd-self", "teacher": str(teacher_run)}, ctx).teacher
    convs = [m.weight for m in teacher.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


def test_tf_kd_self_distils_a_frozen_teacher(teacher_run):
    method = build_method({"name": "tf-kd-self", "teacher": str(teacher_run)}, make_ctx(num_classes=10))
    teacher = method.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    torch.manual_seed(0)
    images = torch.randn(3, 3, 16, 16)
    labels = [1, 7, 4]
    student = [[0.3 * ((c * (i + 2)) % 7) - 0.5 for c in range(10)] for i in range(3)]
    logits = leaf(student)
    result = method.loss(FixedNet(logits=logits), make_batch(labels, images=images))

    reference, _, _ = load_run_model(teacher_run, "best", "cpu")
    with torch.no_grad():
        teacher_logits = reference(images).tolist()
    a, T, m, K, N = 0.95, 6.0, 50.0, 10, 3
    kl_sum = 0.0
    for s_row, t_row in zip(student, teacher_logits):
        t = softmax([v / T for v in t_row])
        log_s = log_softmax([v / T for v in s_row])
        kl_sum += sum(tc * (math.log(tc) - ls) for tc, ls in zip(t, log_s))
    kd = T * T * m * kl_sum / (N * K)
    ce = cross_entropy(student, labels)
    assert result.terms["loss_kd"].item() == pytest.approx(kd, rel=1e-4)
    assert result.loss.item() == pytest.approx((1 - a) * ce + a * kd, rel=1e-4)
    result.loss.backward()
    assert logits.grad is not None and all(p.grad is None for p in teacher.parameters())


def test_tf_kd_self_trains_without_touching_the_teacher(teacher_run, tmp_path):
    recipe = tiny_recipe({"name": "tf-kd-self", "teacher": str(teacher_run)})
    trainer = Trainer(resolve_recipe(recipe), None, Progress(enabled=False))
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not trained & {id(p) for p in trainer.method.teacher.parameters()}
    assert not any(t is trainer.method.teacher for t in trainer.net.modules())

    before = load_checkpoint(teacher_run / "checkpoints" / "best.pt")["model"]
    run = train(tiny_recipe({"name": "tf-kd-self", "teacher": str(teacher_run)}), tmp_path,
                progress=Progress(enabled=False))
    rows = read_metrics(run)
    assert math.isfinite(float(rows[-1]["train_loss"])) and "loss_kd" in rows[-1]
    after = load_checkpoint(teacher_run / "checkpoints" / "best.pt")["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------------------------- ps-kd


@pytest.mark.parametrize("epoch,epochs,expected", [(0, 200, 0.004), (99, 200, 0.4), (179, 200, 0.72),
                                                   (199, 200, 0.8), (2, 3, 0.8)])
def test_pskd_alpha_grows_linearly_to_alpha_T_without_a_cap(epoch, epochs, expected):
    assert pskd_alpha(epoch, epochs, 0.8) == pytest.approx(expected)


def test_pskd_epoch_zero_is_one_hot_and_fills_the_memory():
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    method = build_method({"name": "ps-kd"}, make_ctx(labels=labels))
    assert isinstance(method.last_softmax, SampleMemory) and method.last_softmax.bytes_per_entry == 2
    assert torch.equal(method.last_softmax.read(torch.arange(6)), F.one_hot(labels, 4).float())
    # junk in the memory must not matter in epoch 0
    method.last_softmax.write(torch.tensor([1, 3, 4]), torch.full((3, 4), 0.25))
    idx = [4, 1, 3]
    batch_labels = labels[idx].tolist()
    logits = leaf(LOGITS)
    result = method.loss(FixedNet(logits=logits), make_batch(batch_labels, idx, epoch=0))
    assert result.loss.item() == pytest.approx(cross_entropy(LOGITS, batch_labels), rel=1e-6)
    rows = method.last_softmax.read(torch.tensor(idx))
    for row, expected in zip(rows.tolist(), LOGITS):
        assert row == pytest.approx(softmax(expected), abs=1e-3)  # float16 storage
    untouched = torch.tensor([0, 2, 5])
    assert torch.equal(method.last_softmax.read(untouched), F.one_hot(labels[untouched], 4).float())


def test_pskd_later_epoch_mixes_the_previous_softmax():
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    method = build_method({"name": "ps-kd", "memory_dtype": "float32"}, make_ctx(labels=labels, epochs=10))
    assert method.last_softmax.bytes_per_entry == 4
    idx = [4, 2, 3]
    previous = [[0.5, 0.2, 0.2, 0.1], [0.1, 0.1, 0.7, 0.1], [0.25, 0.25, 0.25, 0.25]]
    method.last_softmax.write(torch.tensor(idx), torch.tensor(previous))
    batch_labels = labels[idx].tolist()  # [0, 2, 3]
    result = method.loss(FixedNet(logits=leaf(LOGITS)), make_batch(batch_labels, idx, epoch=3))
    alpha = 0.8 * 4 / 10
    expected = 0.0
    for row, y, prev in zip(LOGITS, batch_labels, previous):
        target = [(1 - alpha) * (c == y) + alpha * prev[c] for c in range(4)]
        expected -= sum(t * lp for t, lp in zip(target, log_softmax(row))) / 3
    assert result.loss.item() == pytest.approx(expected, rel=1e-6)
    assert result.terms["alpha"].item() == pytest.approx(alpha)
    # the rows now hold this epoch's softmax, for the next epoch
    assert method.last_softmax.read(torch.tensor([2]))[0].tolist() == pytest.approx(softmax(LOGITS[1]), rel=1e-5)


def test_pskd_state_dict_round_trip():
    method = build_method({"name": "ps-kd"}, make_ctx())
    method.loss(FixedNet(logits=leaf(LOGITS)), make_batch(LABELS, [5, 0, 2], epoch=0))
    fresh = build_method({"name": "ps-kd"}, make_ctx())
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.last_softmax.table, method.last_softmax.table)
    assert not torch.equal(fresh.last_softmax.table, build_method({"name": "ps-kd"}, make_ctx()).last_softmax.table)


# ----------------------------------------------------------------------------------------------- zipf-ls


def test_min_ranks_match_scipy_rankdata_min():
    generator = torch.Generator().manual_seed(0)
    votes = torch.randint(0, 4, (8, 9), generator=generator).float()
    expected = rankdata(-votes.numpy(), axis=1, method="min")
    assert min_ranks(votes).tolist() == expected.tolist()


def dense_by_hand(feature_map, weight, bias):
    """Per-location logits and their argmax votes, with loops."""
    channels, height, width = len(feature_map), len(feature_map[0]), len(feature_map[0][0])
    votes = [0] * len(weight)
    for h in range(height):
        for w in range(width):
            dense = [sum(weight[c][k] * feature_map[k][h][w] for k in range(channels)) + bias[c]
                     for c in range(len(weight))]
            votes[max(range(len(dense)), key=lambda c: dense[c])] += 1
    return votes


def test_zipf_ls_loss_by_hand():
    # 2 channels, a 2x2 map, 4 classes (votes worked out by hand below the loops, and asserted)
    weight = [[1.0, -1.0], [0.5, 0.0], [0.0, 0.5], [-1.0, 1.0]]
    bias = [0.0, 0.1, 0.0, -0.2]
    maps = [
        [[[3.0, 2.0], [0.0, 0.1]], [[0.0, 0.5], [0.0, 3.0]]],
        [[[0.0, 0.0], [0.0, 0.0]], [[4.0, 4.0], [4.0, 0.3]]],
    ]
    labels = [0, 2]
    logits = [[2.0, 0.5, -1.0, 0.3], [0.1, 1.5, 0.3, -0.2]]
    net = FixedNet(logits=leaf(logits), stages=[torch.zeros(2, 1, 1, 1), torch.tensor(maps)])
    net.model.classifier = nn.Linear(2, 4)
    with torch.no_grad():
        net.model.classifier.weight.copy_(torch.tensor(weight))
        net.model.classifier.bias.copy_(torch.tensor(bias))
    method = build_method({"name": "zipf-ls", "upsample": "none"}, make_ctx())
    result = method.loss(net, make_batch(labels))

    kl_total = 0.0
    all_votes = []
    for fmap, y, row in zip(maps, labels, logits):
        votes = dense_by_hand(fmap, weight, bias)
        all_votes.append(votes)
        ranks = [1 + sum(v > votes[c] for v in votes) for c in range(4)]  # ties: the smallest rank
        others = [c for c in range(4) if c != y]
        zipf = [1.0 / ranks[c] for c in others]
        zipf = [z / sum(zipf) for z in zipf]
        log_q = log_softmax([row[c] for c in others])
        kl_total += sum(z * (math.log(z) - lq) for z, lq in zip(zipf, log_q))
    assert all_votes == [[2, 1, 0, 1], [0, 0, 1, 3]]  # the example exercises ties and zero counts
    expected = cross_entropy(logits, labels) + 0.1 * kl_total / 2
    assert result.terms["loss_zipf"].item() == pytest.approx(kl_total / 2, rel=1e-5)
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)

    method = build_method({"name": "zipf-ls", "upsample": "none", "loss_lambda": 1.0, "power": 2.0}, make_ctx())
    result = method.loss(net, make_batch(labels))
    kl_total = 0.0
    for votes, y, row in zip(all_votes, labels, logits):
        ranks = [1 + sum(v > votes[c] for v in votes) for c in range(4)]
        others = [c for c in range(4) if c != y]
        zipf = [ranks[c] ** -2.0 for c in others]
        zipf = [z / sum(zipf) for z in zipf]
        log_q = log_softmax([row[c] for c in others])
        kl_total += sum(z * (math.log(z) - lq) for z, lq in zip(zipf, log_q))
    assert result.loss.item() == pytest.approx(cross_entropy(logits, labels) + kl_total / 2, rel=1e-5)


def test_zipf_votes_on_the_upsampled_map_equal_voting_on_upsampled_features():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(3, 8, 4, 4, generator=generator)
    classifier = nn.Linear(8, 5)
    for mode in ("bilinear", "bicubic"):
        big = F.interpolate(features, scale_factor=2.0, mode=mode, align_corners=False)
        expected = [dense_by_hand(f.tolist(), classifier.weight.tolist(), classifier.bias.tolist()) for f in big]
        assert dense_votes(features, classifier, mode).tolist() == expected
        assert sum(expected[0]) == 64
    assert dense_votes(features, classifier, "none").sum(1).tolist() == [16.0] * 3


def test_zipf_ls_rejects_an_unknown_upsample_mode():
    with pytest.raises(UserError, match="method.upsample"):
        build_method({"name": "zipf-ls", "upsample": "nearest"}, make_ctx())


# ----------------------------------------------------------------------------------------------- uskd


USKD_LOGITS = [[4.0, 0.0, -3.0, 1.0], [0.2, 2.0, 0.1, -4.0], [0.5, -1.0, 3.0, 0.0]]
USKD_WEAK = [[1.0, -2.0, 2.5, 0.0], [0.0, 0.5, 0.3, 3.0], [2.0, 1.0, 0.2, -1.0]]
USKD_LABELS = [0, 1, 2]


def uskd_by_hand(logits, weak, labels, alpha, beta, mu, release_rank):
    N, K = len(labels), len(logits[0])
    p = [softmax(row) for row in logits]
    pt_sq = [p[i][labels[i]] ** 2 for i in range(N)]
    soft = [pt_sq[i] + 1 - sum(pt_sq) / N for i in range(N)]
    l_target = -sum(soft[i] * math.log(p[i][labels[i]]) for i in range(N)) / N
    l_weak, l_non, orders = 0.0, 0.0, []
    for i in range(N):
        y = labels[i]
        w = softmax(weak[i])
        v = [0.9 * (c == y) + 0.1 / K for c in range(K)]
        l_weak -= sum(v[c] * math.log(w[c]) for c in range(K)) / N
        x = [math.log(pc) for pc in p[i]] if release_rank else p[i]
        score = [w[c] / (1 - w[y] + 1e-6) + x[c] / (1 - x[y] + 1e-6) for c in range(K)]
        order = sorted(range(K), key=lambda c: -score[c])
        orders.append(order)
        zipf = {c: 1.0 / (order.index(c) + 1) for c in range(K)}
        others = [c for c in range(K) if c != y]
        total = sum(zipf[c] for c in others)
        log_q = log_softmax([logits[i][c] for c in others])
        l_non -= sum(zipf[c] / total * lq for c, lq in zip(others, log_q)) / N
    ce = cross_entropy(logits, labels)
    return ce + alpha * l_target + beta * l_non + mu * l_weak, l_target, l_non, l_weak, orders


@pytest.mark.parametrize("release_rank", [True, False])
def test_uskd_loss_by_hand(release_rank):
    method = build_method({"name": "uskd", "release_rank": release_rank}, make_ctx())
    net = FixedNet(logits=leaf(USKD_LOGITS), weak_logits=leaf(USKD_WEAK))
    result = method.loss(net, make_batch(USKD_LABELS))
    loss, l_target, l_non, l_weak, _ = uskd_by_hand(USKD_LOGITS, USKD_WEAK, USKD_LABELS, 0.1, 0.1, 0.1, release_rank)
    assert result.terms["loss_target"].item() == pytest.approx(l_target, rel=1e-5)
    assert result.terms["loss_non_target"].item() == pytest.approx(l_non, rel=1e-5)
    assert result.terms["loss_weak"].item() == pytest.approx(l_weak, rel=1e-5)
    assert result.loss.item() == pytest.approx(loss, rel=1e-5)


def test_uskd_example_separates_the_two_rank_readings_and_the_weights():
    release = uskd_by_hand(USKD_LOGITS, USKD_WEAK, USKD_LABELS, 0.1, 0.1, 0.1, True)
    paper = uskd_by_hand(USKD_LOGITS, USKD_WEAK, USKD_LABELS, 0.1, 0.1, 0.1, False)
    assert release[4] != paper[4] and release[2] != pytest.approx(paper[2], rel=1e-3)
    method = build_method({"name": "uskd", "alpha": 1.0, "beta": 0.5, "mu": 0.005}, make_ctx())
    net = FixedNet(logits=leaf(USKD_LOGITS), weak_logits=leaf(USKD_WEAK))
    expected = uskd_by_hand(USKD_LOGITS, USKD_WEAK, USKD_LABELS, 1.0, 0.5, 0.005, True)[0]
    assert method.loss(net, make_batch(USKD_LABELS)).loss.item() == pytest.approx(expected, rel=1e-5)


def test_uskd_weak_head_is_training_only():
    torch.manual_seed(0)
    model = build_model("resnet8", 10)
    method = build_method({"name": "uskd"}, make_ctx(num_classes=10, stage_channels=model.stage_channels))
    extra = method.extra_module()
    assert extra.fc.in_features == 32  # resnet8's second-to-last stage (16/32/64)
    net = TrainingNet(model, extra)
    assert not {id(p) for p in extra.parameters()} & {id(p) for p in net.model.parameters()}
    assert count_params(net.model) == count_params(build_model("resnet8", 10))
    labels = torch.tensor([0, 3, 9, 1])
    result = method.loss(net, make_batch(labels, images=torch.randn(4, 3, 16, 16)))
    result.loss.backward()
    assert extra.fc.weight.grad is not None and extra.fc.weight.grad.abs().sum() > 0
    assert model.stages[1][0].conv1.weight.grad.abs().sum() > 0

    with pytest.raises(UserError, match="weak_stage"):
        build_method({"name": "uskd", "weak_stage": 3}, make_ctx(stage_channels=(16, 32, 64)))


def test_uskd_run_trains_and_exports_the_plain_model(tmp_path):
    run = train(tiny_recipe({"name": "uskd"}), tmp_path, progress=Progress(enabled=False))
    row = read_metrics(run)[-1]
    assert all(math.isfinite(float(row[k])) for k in ("train_loss", "loss_non_target", "loss_weak"))
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert set(state["model"]) == set(build_model("resnet8", 10).state_dict())
    assert state["extra"]["fc.weight"].shape == (10, 32)
    model, _, _ = load_run_model(run, "best", "cpu")
    assert count_params(model) == count_params(build_model("resnet8", 10))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


# ----------------------------------------------------------------------------------------------- engine runs
# (tf-kd-self and uskd have theirs above)


@pytest.mark.parametrize("method,epochs,term", [("ls", 1, "loss_ls"), ("tf-kd-reg", 1, "loss_kd"),
                                                ("ps-kd", 2, "loss_pskd"), ("zipf-ls", 1, "loss_zipf")])
def test_engine_runs_each_method(method, epochs, term, tmp_path):
    run = train(tiny_recipe({"name": method}, epochs=epochs), tmp_path, progress=Progress(enabled=False))
    rows = read_metrics(run)
    assert len(rows) == epochs
    assert all(math.isfinite(float(row["train_loss"])) and math.isfinite(float(row[term])) for row in rows)
