"""Batch plans of the methods that need their own order: class pairs (CS-KD) and overlapping batches (DLB).

A batch plan is a callable `epoch -> list of LongTensor index batches` (dataset indices, on the CPU), a pure
function of (seed, epoch): a run resumed at any step sees the batches the uninterrupted run saw. Both plans
keep the default order's anchors: the new samples of an epoch are the seeded permutation of `RandomBatches`
split into chunks of `batch_size`, so every sample is an anchor exactly once per epoch and the anchors of a
step are those the plain cross-entropy run trains on at that step.

- `ClassPairBatches` (CS-KD, Yun et al., CVPR 2020): batch = [B anchors, B partners], partner i a uniformly
  drawn *other* sample of anchor i's class. A class with a single sample has no other sample: its anchor
  is its own partner (the two rows still get independent augmentations). The authors' sampler draws the
  partner from the whole class, the anchor included; we exclude the anchor whenever the class allows.
- `OverlapBatches` (DLB, Shen et al., CVPR 2022): batch t = [new_{t-1}, new_t], so consecutive batches share
  half their samples (the repeated half first). The first batch of epoch e > 0 repeats the last new chunk
  of epoch e - 1 (the authors carry `pre_data` across epochs); the first batch of epoch 0 has no repeated
  half.

Several processes: a contiguous split of [anchors, partners] would give one rank the anchors and another
the partners. Both plans therefore offer `sharded(epoch, rank, world)`: each part of every batch (anchors
and partners; repeated and new) is split into `world` contiguous shares and rank r gets share r of each, so
a rank's partners are its own anchors' partners and a rank's repeated samples are exactly the new samples
it trained on one step before. A final chunk of new samples smaller than `world` (it cannot give every rank
a sample) is left out of that epoch, as the default order's sharding does.
"""

from __future__ import annotations

import torch

from .base import RandomBatches, step_seed

PARTNER_STREAM = 1  # the anchors' permutation uses stream 0, as RandomBatches does


class _PartsPlan:
    """A plan whose batches are concatenations of parts; remembers the last epoch asked for (the engine asks
    for an epoch's plan more than once: its step count, then its batches)."""

    def __init__(self, labels: torch.Tensor, batch_size: int, seed: int):
        self.chunks = RandomBatches(labels.detach().cpu(), batch_size, seed)
        self._cached: tuple = (None, None, [])

    def new_chunks(self, epoch: int, world: int = 1) -> list[torch.Tensor]:
        """The samples each batch of `epoch` brings for the first time (anchors / new samples): a seeded
        permutation split into batch_size chunks (without a final chunk too small to shard)."""
        return [chunk for chunk in self.chunks(epoch) if chunk.numel() >= world]

    def parts(self, epoch: int, world: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def sharded(self, epoch: int, rank: int, world: int) -> list[torch.Tensor]:
        """Rank `rank`'s share of every batch: share `rank` of each part (see the module docstring)."""
        if self._cached[:2] != (epoch, (rank, world)):
            parts = self.parts(epoch, world)
            batches = [torch.cat([part.tensor_split(world)[rank] for part in batch]) for batch in parts]
            self._cached = (epoch, (rank, world), batches)
        return list(self._cached[2])

    def __call__(self, epoch: int) -> list[torch.Tensor]:
        return self.sharded(epoch, 0, 1)


class ClassPairBatches(_PartsPlan):
    """Each batch: B anchors (a seeded permutation, split) followed by B same-class partners."""

    def __init__(self, labels: torch.Tensor, batch_size: int, seed: int):
        super().__init__(labels, batch_size, seed)
        labels = labels.detach().cpu().long()
        self.labels = labels
        self.seed = seed
        num_classes = int(labels.max().item()) + 1 if labels.numel() else 0
        # samples grouped by class: class c holds by_class[starts[c] : starts[c] + counts[c]]
        self.by_class = torch.argsort(labels, stable=True)
        self.counts = torch.bincount(labels, minlength=num_classes)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.rank_in_class = torch.empty_like(labels)
        self.rank_in_class[self.by_class] = torch.arange(labels.numel()) - self.starts[labels[self.by_class]]

    def partners(self, anchors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One uniformly drawn other sample of each anchor's class (the anchor itself if it is alone)."""
        classes = self.labels[anchors]
        count = self.counts[classes]
        others = (count - 1).clamp_min(1)
        # a shift of 1 .. count-1 places along the class ring never lands on the anchor itself
        shift = 1 + (torch.rand(anchors.numel(), generator=generator, dtype=torch.float64) * others).long()
        shift = torch.minimum(shift, others)
        rank = (self.rank_in_class[anchors] + shift) % count
        rank = torch.where(count > 1, rank, self.rank_in_class[anchors])
        return self.by_class[self.starts[classes] + rank]

    def parts(self, epoch: int, world: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(anchors, partners) of every batch of `epoch`."""
        chunks = self.new_chunks(epoch, world)
        generator = torch.Generator().manual_seed(step_seed(self.seed, epoch, 0, PARTNER_STREAM))
        partners = self.partners(torch.cat(chunks), generator).split([c.numel() for c in chunks])
        return list(zip(chunks, partners))


class OverlapBatches(_PartsPlan):
    """Batch t = [the new samples of batch t-1, B new samples]: consecutive batches overlap by half."""

    def parts(self, epoch: int, world: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(repeated, new) of every batch of `epoch`; the very first batch of training repeats nothing."""
        chunks = self.new_chunks(epoch, world)
        previous = self.new_chunks(epoch - 1, world)[-1] if epoch > 0 else chunks[0][:0]
        out = []
        for chunk in chunks:
            out.append((previous, chunk))
            previous = chunk
        return out
