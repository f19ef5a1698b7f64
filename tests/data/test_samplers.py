"""The batch plans of CS-KD (class pairs) and DLB (overlapping batches): their guarantees, on tiny label sets."""

from __future__ import annotations

from collections import Counter

import torch

from ipasdctl.data.base import Augment, RandomBatches, TensorLoader
from ipasdctl.data.samplers import ClassPairBatches, OverlapBatches

# 23 samples: class 0 x 8, class 1 x 10, class 2 x 4, class 3 x 1 (a class with a single sample), shuffled
_ORDER = torch.randperm(23, generator=torch.Generator().manual_seed(5))
LABELS = torch.tensor([0] * 8 + [1] * 10 + [2] * 4 + [3] * 1)[_ORDER]
SINGLETON = int(torch.nonzero(LABELS == 3).item())


def halves(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[: batch.numel() // 2], batch[batch.numel() // 2:]


# ----------------------------------------------------------------------------------------------- class pairs


def test_class_pairs_every_sample_is_an_anchor_exactly_once_per_epoch():
    plan = ClassPairBatches(LABELS, batch_size=4, seed=1)
    for epoch in range(3):
        batches = plan(epoch)
        assert [b.numel() for b in batches] == [8, 8, 8, 8, 8, 6]  # 23 = 5 x 4 + 3 anchors, each with a partner
        anchors = torch.cat([halves(b)[0] for b in batches])
        assert sorted(anchors.tolist()) == list(range(23))


def test_class_pair_anchors_follow_the_default_order():
    plan = ClassPairBatches(LABELS, batch_size=4, seed=1)
    default = RandomBatches(LABELS, 4, 1)
    for epoch in range(2):
        assert [halves(b)[0].tolist() for b in plan(epoch)] == [b.tolist() for b in default(epoch)]


def test_every_partner_has_its_anchors_class_and_is_another_sample():
    plan = ClassPairBatches(LABELS, batch_size=5, seed=2)
    for epoch in range(20):
        for batch in plan(epoch):
            anchors, partners = halves(batch)
            assert torch.equal(LABELS[anchors], LABELS[partners])
            for anchor, partner in zip(anchors.tolist(), partners.tolist()):
                if anchor == SINGLETON:  # the only sample of its class is its own partner
                    assert partner == anchor
                else:
                    assert partner != anchor


def test_partners_are_drawn_among_all_other_samples_of_the_class():
    plan = ClassPairBatches(LABELS, batch_size=23, seed=0)
    class_two = torch.nonzero(LABELS == 2).flatten().tolist()  # 4 samples
    seen: dict[int, Counter] = {i: Counter() for i in class_two}
    for epoch in range(60):
        anchors, partners = halves(plan(epoch)[0])
        for anchor, partner in zip(anchors.tolist(), partners.tolist()):
            if anchor in seen:
                seen[anchor][partner] += 1
    for anchor, counts in seen.items():
        assert set(counts) == set(class_two) - {anchor}  # every other member, never itself
        assert min(counts.values()) >= 8  # roughly uniform: 60 draws over 3 choices


def test_class_pairs_are_deterministic_in_seed_and_epoch():
    a = ClassPairBatches(LABELS, 4, seed=7)
    b = ClassPairBatches(LABELS, 4, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a(3), b(3)))
    assert all(torch.equal(x, y) for x, y in zip(a(3), a(3)))  # asked twice (the engine does)
    assert not torch.equal(torch.cat(a(3)), torch.cat(a(4)))
    assert not torch.equal(torch.cat(a(3)), torch.cat(ClassPairBatches(LABELS, 4, seed=8)(3)))
    # b asked for epoch 4 first, then 3: the same batches as a's
    b(4)
    assert all(torch.equal(x, y) for x, y in zip(a(3), b(3)))


# ----------------------------------------------------------------------------------------------- overlap


def test_consecutive_overlap_batches_share_exactly_half():
    plan = OverlapBatches(LABELS, batch_size=4, seed=3)
    for epoch in range(3):
        batches = plan(epoch)
        new_sizes = [c.numel() for c in plan.new_chunks(epoch)]
        for t in range(1, len(batches)):
            previous, current = batches[t - 1], batches[t]
            previous_new = previous[-new_sizes[t - 1]:]
            assert torch.equal(current[:previous_new.numel()], previous_new)  # repeated half first
            if t >= 2:  # (batch 0 repeats last epoch's samples, which this epoch may bring again later)
                shared = set(previous.tolist()) & set(current.tolist())
                assert shared == set(previous_new.tolist())
                if previous.numel() == current.numel() == 8:
                    assert len(shared) == 4  # exactly half of each
    assert [b.numel() for b in plan(0)] == [4, 8, 8, 8, 8, 4 + 3]  # the first step of training repeats nothing
    assert [b.numel() for b in plan(1)] == [3 + 4, 8, 8, 8, 8, 4 + 3]  # epoch 0 ended with 3 new samples


def test_overlap_new_halves_partition_the_data_and_carry_across_epochs():
    plan = OverlapBatches(LABELS, batch_size=4, seed=3)
    for epoch in range(3):
        batches = plan(epoch)
        chunks = plan.new_chunks(epoch)
        new = torch.cat([b[-c.numel():] for b, c in zip(batches, chunks)])
        assert sorted(new.tolist()) == list(range(23))  # every sample new exactly once per epoch
        assert torch.equal(new, torch.cat(RandomBatches(LABELS, 4, 3)(epoch)))  # in the default order
        if epoch > 0:  # the first batch repeats the last new samples of the epoch before
            tail = plan(epoch - 1)[-1][-plan.new_chunks(epoch - 1)[-1].numel():]
            assert torch.equal(batches[0][:tail.numel()], tail)
            assert batches[0].numel() == tail.numel() + chunks[0].numel()


def test_overlap_batches_are_deterministic_in_seed_and_epoch():
    a, b = OverlapBatches(LABELS, 4, 11), OverlapBatches(LABELS, 4, 11)
    b(5)
    assert all(torch.equal(x, y) for x, y in zip(a(2), b(2)))
    assert not torch.equal(torch.cat(a(2)), torch.cat(a(3)))
    assert not torch.equal(torch.cat(a(2)), torch.cat(OverlapBatches(LABELS, 4, 12)(2)))


def test_loader_serves_the_plan_and_augments_repeated_samples_afresh():
    images = torch.randint(0, 256, (23, 3, 8, 8), dtype=torch.uint8)
    plan = OverlapBatches(LABELS, 4, 0)
    aug = Augment((0.5,) * 3, (0.25,) * 3, pad=2, hflip=True, device=torch.device("cpu"))
    loader = TensorLoader(images, LABELS, aug, plan, seed=0, device=torch.device("cpu"))
    served = list(loader.epoch(1))
    assert [b.indices.tolist() for b in served] == [b.tolist() for b in plan(1)]
    assert all(torch.equal(b.labels, LABELS[b.indices]) for b in served)
    # the repeated half of step 2 is step 1's new half, under a different random crop/flip
    assert not torch.equal(served[2].images[:4], served[1].images[-4:])


# ----------------------------------------------------------------------------------------------- several ranks


def test_class_pairs_sharded_keep_each_rank_its_own_pairs():
    plan = ClassPairBatches(LABELS, batch_size=5, seed=4)  # chunks 5,5,5,5,3
    full = plan(1)
    for world in (2, 3):
        shards = [plan.sharded(1, rank, world) for rank in range(world)]
        assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps
        for step, batch in enumerate(full):
            anchors, partners = halves(batch)
            pair_of = dict(zip(anchors.tolist(), partners.tolist()))
            got = []
            for shard in shards:
                mine, their_partners = halves(shard[step])
                assert mine.numel() == their_partners.numel() >= 1
                assert [pair_of[a] for a in mine.tolist()] == their_partners.tolist()
                got += mine.tolist()
            assert got == anchors.tolist()  # the ranks' anchors are the global batch's, each once
    assert all(torch.equal(a, b) for a, b in zip(plan.sharded(1, 0, 1), full))
    # 4 ranks: the final chunk of 3 anchors cannot give each rank one, so that step is left out
    assert [len(plan.sharded(1, rank, 4)) for rank in range(4)] == [4] * 4


def test_overlap_sharded_repeats_what_the_same_rank_trained_one_step_before():
    plan = OverlapBatches(LABELS, batch_size=6, seed=4)  # 23 = 6+6+6+5
    world = 2
    for rank in range(world):
        previous_new = None
        for epoch in range(3):
            sizes = [(r.tensor_split(world)[rank].numel(), n.tensor_split(world)[rank].numel())
                     for r, n in plan.parts(epoch, world)]
            for batch, (repeated, new) in zip(plan.sharded(epoch, rank, world), sizes):
                assert batch.numel() == repeated + new and new >= 1
                if previous_new is not None:
                    assert batch[:repeated].tolist() == previous_new
                previous_new = batch[repeated:].tolist()
    # the ranks' new samples of an epoch cover the data set once
    covered = sorted(i for rank in range(world) for (r, n) in plan.parts(2, world)
                     for i in n.tensor_split(world)[rank].tolist())
    assert covered == list(range(23))
