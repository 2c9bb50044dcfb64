"""Chunking for scale: attention over groups of consecutive detail windows.

FlexAttention offsets are int32 (B*H*L*D must stay below 2^31) and a BlockMask holds
four (N/128)^2 int32 index tensors. Past either limit, queries are split into chunks of
consecutive windows; a chunk's keys are text, guidance, and the windows its rule can
reach (own windows, neighbours). Text and guidance queries form one more chunk whose
keys are text and guidance. Every query keeps exactly its allowed keys, so the result
equals the unchunked one (up to the order of floating-point sums)."""

import math
from dataclasses import dataclass

import torch

from .blockmask import BLOCK, Side, reach, windows_in_ranges
from .layout import Layout
from .rules import MaskRule

INT32 = 2**31


@dataclass(eq=False)
class Chunk:
    q: Side
    kv: Side
    q_start: int  # queries are the layout positions [q_start, q_end)
    q_end: int
    kv_index: torch.Tensor | None  # global key positions; None = the whole sequence


def index_bytes(n_q: int, n_kv: int, block=(BLOCK, BLOCK)) -> int:
    """Bytes of a BlockMask's four int32 index tensors (kv, full kv, q, full q)."""
    nqb, nkb = -(-n_q // block[0]), -(-n_kv // block[1])
    return 4 * 4 * nqb * nkb


def _fits(n_q, n_kv, bhd, budget, max_q=None, block=(BLOCK, BLOCK)):
    small = max_q is None or n_q <= max_q
    unit = math.lcm(*block)
    pq, pk = -(-n_q // unit) * unit, -(-n_kv // unit) * unit  # padded to whole blocks
    return small and bhd * max(pq, pk) < INT32 and index_bytes(n_q, n_kv, block) <= budget


def reach_windows(layout: Layout, rule: MaskRule, shifted: bool, windows: torch.Tensor):
    """Ascending ids of the detail windows whose keys `windows`' queries may see."""
    dw = layout.detail_windows
    lo, hi = dw.origin[windows], dw.origin[windows] + dw.size[windows] - 1
    _, wid = windows_in_ranges(layout, *reach(layout, rule, shifted, lo, hi))
    return torch.unique(wid)


def plan_chunks(
    layout: Layout,
    rule: MaskRule,
    shifted: bool,
    bhd: int,
    budget: int,
    max_q: int | None = None,
    block=(BLOCK, BLOCK),
) -> list[Chunk]:
    """One chunk (the whole sequence) if it fits, else the fewest chunks that do.
    max_q, if given, also caps the query tokens of a chunk of windows."""
    n, head = layout.n, layout.detail_start
    if _fits(n, n, bhd, budget, max_q, block):
        return [Chunk(Side.whole(layout), Side.whole(layout), 0, n, None)]
    if rule.text_sees_detail and layout.n_text:
        raise ValueError(
            f"text_sees_detail needs every key in one call, and {n} tokens exceed the limits "
            f"(B*H*D = {bhd}, index budget {budget} bytes, query cap {max_q})"
        )
    chunks = []
    if head:
        if not _fits(head, head, bhd, budget, None, block):
            raise ValueError(
                f"text + guidance ({head} tokens) alone exceed the limits "
                f"(B*H*D = {bhd}, index budget {budget} bytes)"
            )
        tg = Side(True, True, torch.zeros(0, dtype=torch.long))
        chunks.append(Chunk(tg, tg, 0, head, torch.arange(head)))
    dw = layout.detail_windows
    n_groups = 2
    while True:
        groups = torch.tensor_split(torch.arange(layout.n_windows), n_groups)
        out = []
        for g in groups:
            if len(g) == 0:
                continue
            q = Side(False, False, g)
            kv = Side(True, True, reach_windows(layout, rule, shifted, g))
            n_q, n_kv = q.size(layout), kv.size(layout)
            if not _fits(n_q, n_kv, bhd, budget, max_q, block):
                break
            start = head + int(dw.start[g[0]])
            out.append(Chunk(q, kv, start, start + n_q, kv.index(layout)))
        else:
            return chunks + out
        if n_groups >= layout.n_windows:
            raise ValueError(
                "a single window exceeds the limits (int32 offsets, index budget "
                "or the chunk size cap)"
            )
        n_groups = min(2 * n_groups, layout.n_windows)
