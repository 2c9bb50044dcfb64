"""Counts for a layout and rule: allowed (query, key) pairs, exactly, from per-axis sums
(every rule is a product over axes), and block counts of a BlockMask."""

import math
from dataclasses import dataclass

import torch

from .layout import Layout
from .rules import MaskRule


def _sizes(extent: int, window: int, shift: int = 0) -> torch.Tensor:
    """Lengths of the cells cutting [0, extent) at multiples of `window` minus `shift`."""
    return torch.bincount((torch.arange(extent) + shift) // window)


def _near(n: torch.Tensor, r: int) -> torch.Tensor:
    """Ordered pairs (x, y) in an interval of length n with |x - y| <= r."""
    d = torch.arange(1, r + 1)
    return n + 2 * (n[..., None] - d).clamp(min=0).sum(-1)


def allowed_pairs(layout: Layout, rule: MaskRule, shifted: bool = False) -> int:
    """Number of (query, key) pairs the rule allows."""
    nt, ng, nd = layout.n_text, layout.n_guidance, layout.n_detail
    total = nt * (nt + ng)  # text queries
    total += ng * (ng + (nt if rule.guidance_sees_text else 0))  # guidance queries
    total += nd * nt if rule.detail_sees_text else 0
    total += nt * nd if rule.text_sees_detail else 0
    axes = list(zip(layout.grid, layout.window, layout.shift))
    if ng:
        if rule.scope == "all":
            total += nd * ng
        else:  # sum over detail windows i of |i| * sum of guidance windows within margin
            gg, gw = layout.guidance_grid, layout.guidance_window
            prod = 1
            for a, (g, w, _) in enumerate(axes):
                wd, wg = _sizes(g, w), _sizes(gg[a], gw[a])
                idx = torch.arange(len(wd))
                close = (idx[:, None] - idx[None, :]).abs() <= rule.margin
                prod *= int((wd[:, None] * wg[None, :] * close).sum())
            total += prod
    shift = shifted and rule.neighbours == "shift"
    total += math.prod(int((_sizes(g, w, s if shift else 0) ** 2).sum()) for g, w, s in axes)
    if rule.neighbours == "halo":  # pairs within the halo, minus those in one window
        k = rule.halo
        every = math.prod(int(_near(torch.tensor(g), k)) for g, _, _ in axes)
        same = math.prod(int(_near(_sizes(g, w), k).sum()) for g, w, _ in axes)
        total += every - same
    return total


@dataclass
class BlockStats:
    n_q_blocks: int
    n_kv_blocks: int
    full: int
    partial: int

    @property
    def total(self) -> int:
        return self.n_q_blocks * self.n_kv_blocks

    @property
    def nonempty(self) -> int:
        return self.full + self.partial

    @property
    def density(self) -> float:
        return self.nonempty / self.total


def block_stats(block_mask) -> BlockStats:
    full = block_mask.full_kv_num_blocks
    return BlockStats(
        n_q_blocks=block_mask.kv_indices.shape[-2],
        n_kv_blocks=block_mask.kv_indices.shape[-1],
        full=int(full.sum()) if full is not None else 0,
        partial=int(block_mask.kv_num_blocks.sum()),
    )
