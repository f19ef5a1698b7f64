"""Per-sample memories: one row of K class probabilities per training sample, indexed by dataset index.

Shared by every method that remembers past predictions (IPASD, PS-KD). Rows are read and written with
one index op on the training device. Storage is float16 by default (2 bytes per sample and class, a
quarter of the float32 tables of the authors' release); `uint8` stores probabilities quantised to 1/255
(1 byte) and renormalises rows on read.

Several processes (training/distributed.py): every rank holds the whole table; the context's
`collectives.gather_rows` brings every rank's written (indices, rows) to every rank, so the tables stay what
one process would hold.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .base import Collectives

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "uint8": torch.uint8}


def check_memory_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UserError(f"memory dtype '{dtype}' is not one of {', '.join(DTYPES)}")


class SampleMemory:
    def __init__(self, num_samples: int, num_classes: int, dtype: str, device, init: torch.Tensor | None = None,
                 collectives: Collectives | None = None):
        check_memory_dtype(dtype)
        self.dtype_name = dtype
        self.table = torch.zeros(num_samples, num_classes, dtype=DTYPES[dtype], device=device)
        self.collectives = collectives or Collectives()
        if init is not None:  # every rank starts from the same rows: no gather
            self.table.index_copy_(0, torch.arange(num_samples, device=device), self._stored(init))

    @property
    def bytes_per_entry(self) -> int:
        return self.table.element_size()

    def read(self, indices: torch.Tensor) -> torch.Tensor:
        rows = self.table.index_select(0, indices)
        if self.table.dtype == torch.uint8:
            rows = rows.float()
            return rows / rows.sum(1, keepdim=True).clamp_min(1.0)
        return rows.float()

    def _stored(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows in the table's storage type (probabilities quantised to 1/255 for uint8)."""
        rows = rows.detach()
        if self.table.dtype == torch.uint8:
            rows = (rows.float() * 255.0).round_().clamp_(0, 255)
        return rows.to(self.table.dtype)

    def write(self, indices: torch.Tensor, rows: torch.Tensor) -> None:
        rows = self._stored(rows)  # before any gather: the stored precision is what travels
        if self.collectives.enabled:
            indices, rows = self.collectives.gather_rows(indices, rows)
        self.table.index_copy_(0, indices, rows)

    def state_dict(self) -> dict:
        return {"table": self.table, "dtype": self.dtype_name}

    def load_state_dict(self, state: dict) -> None:
        table = state["table"]
        if table.shape != self.table.shape:
            raise UserError(f"checkpoint memory has shape {tuple(table.shape)}, this run needs {tuple(self.table.shape)}: "
                            "the data set or subset differs from the checkpoint's")
        self.table.copy_(table.to(self.table.device, self.table.dtype))
