"""BlockPlan: which key blocks each query block computes exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pasa.layout import TokenLayout


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """Compact block-sparse plan.

    Attributes:
        kv_indices: ``(B, H, Nq, Kmax)`` int32 key-block indices per query block; the first
            ``kv_counts`` entries of a row are the selected blocks, sorted ascending; the rest
            repeat the last selected index (always a valid index, never read by kernels).
        kv_counts: ``(B, H, Nq)`` int32, number of selected key blocks per row (>= 1).
        layout: the token layout the block indices refer to.
    """

    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    layout: TokenLayout

    @property
    def num_kv_blocks(self) -> int:
        return self.layout.num_blocks

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.kv_indices.shape)  # type: ignore[return-value]

    def density(self) -> float:
        """Computed blocks / all blocks, over batch, heads and rows."""
        batch, heads, rows, _ = self.kv_indices.shape
        return float(self.kv_counts.sum()) / (batch * heads * rows * self.num_kv_blocks)

    def row_valid(self) -> torch.Tensor:
        """``(B, H, Nq, Kmax)`` bool: which entries of ``kv_indices`` are selected blocks."""
        slots = torch.arange(self.kv_indices.shape[-1], device=self.kv_indices.device)
        return slots < self.kv_counts.unsqueeze(-1)

    def to_dense_mask(self) -> torch.Tensor:
        """``(B, H, Nq, Nk)`` bool block mask."""
        batch, heads, rows, _ = self.kv_indices.shape
        num_k = self.num_kv_blocks
        # Padding slots are sent to an extra column that is cut off afterwards.
        target = torch.where(self.row_valid(), self.kv_indices.long(), num_k)
        mask = torch.zeros(batch, heads, rows, num_k + 1, dtype=torch.bool, device=target.device)
        mask.scatter_(-1, target, True)
        return mask[..., :num_k]

    def trimmed(self) -> BlockPlan:
        """The same plan with ``Kmax`` cut to the largest count (one host sync)."""
        kmax = int(self.kv_counts.max())
        return BlockPlan(self.kv_indices[..., :kmax].contiguous(), self.kv_counts, self.layout)

    @classmethod
    def full(
        cls, layout: TokenLayout, batch: int, heads: int, device: torch.device | str
    ) -> BlockPlan:
        """Every key block for every row (dense attention).

        The index tensor is materialised, not a stride-0 expand: kernels read it with their own
        stride assumptions (an expanded one crashed compiled FlexAttention at 75,600 tokens).
        """
        n = layout.num_blocks
        indices = torch.arange(n, dtype=torch.int32, device=device).expand(batch, heads, n, n)
        counts = torch.full((batch, heads, n), n, dtype=torch.int32, device=device)
        return cls(indices.contiguous(), counts, layout)

    @classmethod
    def from_dense_mask(cls, mask: torch.Tensor, layout: TokenLayout) -> BlockPlan:
        """Plan from a ``(B, H, Nq, Nk)`` bool mask; every row must select at least one block."""
        if mask.dim() != 4 or mask.shape[-1] != layout.num_blocks:
            raise ValueError(
                f"mask must be (B, H, Nq, {layout.num_blocks}) for this layout, got {tuple(mask.shape)}"
            )
        counts = mask.sum(-1)
        if bool((counts == 0).any()):
            raise ValueError("every query block must select at least one key block")
        return cls(*compact_selection(mask), layout)


def compact_selection(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, H, Nq, Nk)`` bool -> ascending ``kv_indices (B, H, Nq, Nk)`` and ``kv_counts``.

    No host synchronisation: ``Kmax`` is ``Nk``; :meth:`BlockPlan.trimmed` cuts it.
    """
    num_k = mask.shape[-1]
    counts = mask.sum(-1, dtype=torch.int32)  # (B, H, Nq)
    ar = torch.arange(num_k, device=mask.device, dtype=torch.int32)
    # Selected blocks keep their index, the rest sort after them.
    keyed = torch.where(mask, ar, ar + num_k)
    ordered = keyed.sort(-1).values  # (B, H, Nq, Nk), selected first, ascending
    last = (counts.long() - 1).clamp(min=0).unsqueeze(-1)  # (B, H, Nq, 1)
    slots = torch.minimum(ar.long().expand_as(ordered), last)
    indices = ordered.gather(-1, slots).to(torch.int32)
    return indices, counts
