"""BlockMasks for FlexAttention, two ways.

`mask_block_mask` asks torch's `create_block_mask` to evaluate the mask_mod on every
(query, key) pair: simple, but O(N^2) work (about a minute at 700K tokens).

`analytic_block_mask` reads the blocks straight off the window structure. Each
128-token block of a side is cut into boxes: a text run, runs of guidance windows
(boxes on the window grid) and runs of one detail window (boxes of tokens; a raster
range of a box splits into at most 5 boxes). Every rule is decided exactly on a pair of
boxes: segment rules and same-window are constant on it, and "within r along every
axis" holds for some pair of tokens iff the boxes' per-axis gap is <= r, for all pairs
iff their per-axis span is <= r. A block pair is non-empty iff some box pair allows
something, full iff every box pair allows everything (and neither block is the ragged
last one, which create_block_mask always treats as partial). Only block pairs that can
be non-empty are visited: text and guidance blocks, and the blocks of windows within
reach of each query box. Cost: O(non-empty blocks x boxes per block^2); no N x N work.

A `Side` says which tokens of the layout the queries or the keys are: the whole
sequence, or for a chunk, some detail windows (keys: plus text and guidance).
"""

import math
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from .layout import DETAIL, GUIDANCE, TEXT, Layout
from .rules import MaskRule

BLOCK = 128


@dataclass(eq=False)
class Side:
    """Tokens of one side, in order: text (all or none), guidance (all or none), then
    the detail windows `windows` (ascending window ids)."""

    text: bool
    guidance: bool
    windows: torch.Tensor

    @staticmethod
    def whole(layout: Layout) -> "Side":
        return Side(True, True, torch.arange(layout.n_windows))

    def lengths(self, layout: Layout) -> tuple[int, int, torch.Tensor]:
        nt = layout.n_text if self.text else 0
        ng = layout.n_guidance if self.guidance else 0
        return nt, ng, layout.detail_windows.volume[self.windows]

    def size(self, layout: Layout) -> int:
        nt, ng, vol = self.lengths(layout)
        return nt + ng + int(vol.sum())

    def index(self, layout: Layout) -> torch.Tensor:
        """(L,) global layout positions of this side's tokens, in order."""
        nt, ng, vol = self.lengths(layout)
        parts = [torch.arange(nt), layout.guidance_start + torch.arange(ng)]
        starts = layout.detail_start + layout.detail_windows.start[self.windows]
        owner, rank = _expand(vol)
        parts.append(starts[owner] + rank)
        return torch.cat(parts)

    def window_starts(self, layout: Layout) -> torch.Tensor:
        """(n_windows,) local start of each detail window on this side, -1 if absent."""
        nt, ng, vol = self.lengths(layout)
        out = torch.full((layout.n_windows,), -1, dtype=torch.long)
        out[self.windows] = nt + ng + torch.cumsum(vol, 0) - vol
        return out


def _expand(counts: torch.Tensor):
    """For groups of the given sizes: the group and the rank inside it of each item."""
    counts = counts.long()
    owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(owner), device=counts.device) - first[owner]
    return owner, rank


def raster_boxes(dims: torch.Tensor, a: torch.Tensor, e: torch.Tensor):
    """Cut raster ranges [a, e) (non-empty) of boxes of extent dims (n, 3) into at most
    5 boxes each: head row, head rows, whole planes, tail rows, tail row.
    Returns lo, hi (n, 5, 3) inclusive corners and ok (n, 5)."""
    H, R = dims[:, 1], dims[:, 2]
    row_a, row_z = a // R, (e - 1) // R
    one_row = row_a == row_z
    r0, r1 = (a + R - 1) // R, e // R  # whole rows [r0, r1)
    rows = ~one_row & (r0 < r1)
    one_plane = r0 // H == (r1 - 1) // H
    p0, p1 = (r0 + H - 1) // H, r1 // H  # whole planes [p0, p1)

    def box(t0, t1, h0, h1, w0, w1):
        return torch.stack([t0, h0, w0], -1), torch.stack([t1, h1, w1], -1)

    zero, last_h, last_w = torch.zeros_like(a), H - 1, R - 1
    boxes = [
        box(
            row_a // H,
            row_a // H,
            row_a % H,
            row_a % H,
            a % R,
            torch.where(one_row, (e - 1) % R, last_w),
        ),
        box(r0 // H, r0 // H, r0 % H, torch.where(one_plane, (r1 - 1) % H, last_h), zero, last_w),
        box(p0, p1 - 1, zero, last_h, zero, last_w),
        box((r1 - 1) // H, (r1 - 1) // H, zero, (r1 - 1) % H, zero, last_w),
        box(row_z // H, row_z // H, row_z % H, row_z % H, zero, (e - 1) % R),
    ]
    ok = [
        one_row | (a % R != 0),
        rows & (one_plane | (r0 % H != 0)),
        rows & ~one_plane & (p0 < p1),
        rows & ~one_plane & (r1 % H != 0),
        ~one_row & (e % R != 0),
    ]
    lo = torch.stack([b[0] for b in boxes], 1)
    hi = torch.stack([b[1] for b in boxes], 1)
    return lo, hi, torch.stack(ok, 1)


@dataclass
class Boxes:
    """The boxes of every block of one side, padded to the same count per block."""

    seg: torch.Tensor  # (nb, K) segment, -1 = padding
    lo: torch.Tensor  # (nb, K, 3) detail: token box; guidance: window-grid box
    hi: torch.Tensor  # (nb, K, 3)
    win: torch.Tensor  # (nb, K, 3) detail boxes: window-grid coords of their window
    length: int

    @property
    def n_blocks(self) -> int:
        return self.seg.shape[0]


def block_boxes(layout: Layout, side: Side, block: int = BLOCK, device="cpu") -> Boxes:
    """Cut every block of a side into boxes (see the module docstring)."""
    nt, ng, vol = side.lengths(layout)
    dev = torch.device(device)
    wins, vol = side.windows.to(dev), vol.to(dev)
    # pieces: text, guidance, then one per detail window, each a local range
    kinds = [TEXT] * (nt > 0) + [GUIDANCE] * (ng > 0)
    head = torch.tensor([n for n in (nt, ng) if n > 0], dtype=torch.long, device=dev)
    p_kind = torch.cat(
        [
            torch.tensor(kinds, dtype=torch.long, device=dev),
            torch.full((len(wins),), DETAIL, device=dev),
        ]
    )
    p_len = torch.cat([head, vol])
    p_start = torch.cumsum(p_len, 0) - p_len
    p_ref = torch.cat([torch.full((len(kinds),), -1, device=dev), wins])
    length = nt + ng + int(side.lengths(layout)[2].sum())
    # split pieces at block edges: one sub-range [a, e) per (piece, block)
    first, last = p_start // block, (p_start + p_len - 1) // block
    owner, rank = _expand(last - first + 1)
    blk = first[owner] + rank
    a = torch.maximum(p_start[owner], blk * block) - p_start[owner]
    e = torch.minimum(p_start[owner] + p_len[owner], (blk + 1) * block) - p_start[owner]
    kind, ref = p_kind[owner], p_ref[owner]
    n = len(blk)
    lo = torch.zeros(n, 5, 3, dtype=torch.long, device=dev)
    hi, win = torch.zeros_like(lo), torch.zeros_like(lo)
    ok = torch.zeros(n, 5, dtype=torch.bool, device=dev)
    ok[:, 0] = kind == TEXT
    if ng:  # guidance: the run of guidance windows covered, on the window grid
        g = kind == GUIDANCE
        gstart = layout.guidance_windows.start.to(dev)
        w0 = torch.searchsorted(gstart, a[g], right=True) - 1
        w1 = torch.searchsorted(gstart, e[g] - 1, right=True) - 1
        dims = torch.tensor(layout.window_grid, device=dev).expand(len(w0), 3)
        lo[g], hi[g], ok[g] = raster_boxes(dims, w0, w1 + 1)
    if len(wins):  # detail: token boxes inside one window
        d = kind == DETAIL
        dw = layout.detail_windows
        w = ref[d]
        blo, bhi, bok = raster_boxes(dw.size.to(dev)[w], a[d], e[d])
        origin = dw.origin.to(dev)[w][:, None]
        lo[d], hi[d], ok[d] = blo + origin, bhi + origin, bok
        win[d] = dw.coords.to(dev)[w][:, None].expand(-1, 5, -1)
    seg = kind[:, None].expand(-1, 5)
    # gather the valid boxes per block (blk is ascending), padded with segment -1
    blk = blk[:, None].expand(-1, 5)[ok]
    seg, lo, hi, win = seg[ok], lo[ok], hi[ok], win[ok]
    n_blocks = (length + block - 1) // block
    counts = torch.bincount(blk, minlength=n_blocks)
    _, slot = _expand(counts)
    K = int(counts.max()) if len(counts) else 1
    out_seg = torch.full((n_blocks, K), -1, dtype=torch.long, device=dev)
    out_lo = torch.zeros(n_blocks, K, 3, dtype=torch.long, device=dev)
    out_hi, out_win = torch.zeros_like(out_lo), torch.zeros_like(out_lo)
    out_seg[blk, slot], out_lo[blk, slot], out_hi[blk, slot] = seg, lo, hi
    out_win[blk, slot] = win
    return Boxes(out_seg, out_lo, out_hi, out_win, length)


def reach(layout: Layout, rule: MaskRule, shifted: bool, lo, hi):
    """Window-index ranges (inclusive, per axis) that detail keys seen by the detail
    token boxes [lo, hi] can lie in."""
    dev = lo.device
    grid, window = torch.tensor(layout.grid, device=dev), torch.tensor(layout.window, device=dev)
    if shifted:
        s = torch.tensor(layout.shift, device=dev)
        t0 = (lo + s) // window * window - s
        t1 = ((hi + s) // window + 1) * window - s - 1
    else:
        r = rule.halo if rule.neighbours == "halo" else 0
        t0, t1 = lo - r, hi + r
    t0 = t0.clamp(min=0)
    t1 = torch.minimum(t1, grid - 1)
    return t0 // window, t1 // window


def windows_in_ranges(layout: Layout, w0, w1):
    """Every window inside the per-axis inclusive window-index ranges w0..w1 (m, 3):
    (owner (k,) index of the range, window id (k,))."""
    dev = w0.device
    span = w1 - w0 + 1  # (m, 3)
    grid_w = torch.tensor(layout.window_grid, device=dev)
    m = span.amax(0).tolist() if len(span) else [0, 0, 0]
    axes = [torch.arange(x, device=dev) for x in m]
    offs = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    wc = w0[:, None] + offs[None]  # (m, o, 3) candidate windows
    ok = (offs[None] < span[:, None]).all(-1)
    wid = ((wc[..., 0] * grid_w[1] + wc[..., 1]) * grid_w[2] + wc[..., 2])[ok]
    owner = torch.arange(len(span), device=dev)[:, None].expand_as(ok)[ok]
    return owner, wid


def _window_blocks(layout, q_block, w0, w1, starts, volume, n_kv_blocks, block):
    """Pair each query block with the key blocks of the windows w0..w1 (per-axis
    inclusive window ranges, one per query box) that are present on the key side
    (`starts` >= 0)."""
    owner, wid = windows_in_ranges(layout, w0, w1)
    qblk, start = q_block[owner], starts[wid]
    keep = start >= 0
    qblk, start, vol = qblk[keep], start[keep], volume[wid[keep]]
    first, last = start // block, (start + vol - 1) // block
    owner, rank = _expand(last - first + 1)
    return qblk[owner] * n_kv_blocks + first[owner] + rank


def candidate_pairs(layout, rule, shifted, qb: Boxes, kv: Side, n_kv_blocks, block=BLOCK):
    """(q_block, kv_block) pairs that may be non-empty, unique and sorted."""
    dev = qb.seg.device
    nt, ng, _ = kv.lengths(layout)
    n_blocks = torch.arange(qb.n_blocks, device=dev)
    pairs = []

    def every(q_blocks, k_lo, k_hi):  # each of q_blocks with key blocks [k_lo, k_hi)
        kk = torch.arange(k_lo, k_hi, device=dev)
        pairs.append((q_blocks[:, None] * n_kv_blocks + kk[None]).flatten())

    if nt:  # text keys: small, visible to most queries
        every(n_blocks, 0, (nt + block - 1) // block)
    if rule.text_sees_detail and nt:  # text queries: every key (unchunked only)
        every(n_blocks[(qb.seg == TEXT).any(1)], 0, n_kv_blocks)
    is_d = qb.seg == DETAIL
    if ng:
        g_lo, g_hi = nt // block, (nt + ng + block - 1) // block
        if rule.scope == "all":
            every(n_blocks, g_lo, g_hi)
        else:  # text and guidance queries see all guidance; detail the aligned windows
            every(n_blocks[((qb.seg == TEXT) | (qb.seg == GUIDANCE)).any(1)], g_lo, g_hi)
            if is_d.any():
                owner = n_blocks[:, None].expand_as(qb.seg)[is_d]
                wc = qb.win[is_d]
                top = torch.tensor(layout.window_grid, device=dev) - 1
                w0 = (wc - rule.margin).clamp(min=0)
                w1 = torch.minimum(wc + rule.margin, top)
                gw = layout.guidance_windows
                starts = nt + gw.start.to(dev)
                pairs.append(
                    _window_blocks(
                        layout, owner, w0, w1, starts, gw.volume.to(dev), n_kv_blocks, block
                    )
                )
    if is_d.any():
        owner = n_blocks[:, None].expand_as(qb.seg)[is_d]
        w0, w1 = reach(layout, rule, shifted, qb.lo[is_d], qb.hi[is_d])
        starts = kv.window_starts(layout).to(dev)
        volume = layout.detail_windows.volume.to(dev)
        pairs.append(_window_blocks(layout, owner, w0, w1, starts, volume, n_kv_blocks, block))
    if not pairs:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return empty, empty
    key = torch.unique(torch.cat(pairs))
    return key // n_kv_blocks, key % n_kv_blocks


def _within_all(lo_a, hi_a, lo_b, hi_b, r):
    """(some pair within r on every axis, every pair within r on every axis)."""
    gap = torch.maximum(lo_b - hi_a, lo_a - hi_b).clamp(min=0)
    span = torch.maximum(hi_a - lo_b, hi_b - lo_a)
    return (gap <= r).all(-1), (span <= r).all(-1)


TERMS = ("bits", "cell", "near", "aligned")  # the parts of rules.fused, see there


def classify(layout, rule, shifted, qb: Boxes, kb: Boxes, q_blk, k_blk, chunk=1 << 22):
    """Exact flags of the block pairs (q_blk[i], k_blk[i]): non-empty (p,), full (p,),
    and for each of TERMS whether it is true for some element of the pair (p, 4)."""
    dev = qb.seg.device
    sees = torch.zeros(3, 3, dtype=torch.bool)  # segment-level rules [q seg, k seg]
    sees[TEXT, TEXT] = sees[TEXT, GUIDANCE] = sees[GUIDANCE, GUIDANCE] = True
    sees[GUIDANCE, TEXT] = rule.guidance_sees_text
    sees[DETAIL, TEXT] = rule.detail_sees_text
    sees[TEXT, DETAIL] = rule.text_sees_detail
    sees[DETAIL, GUIDANCE] = rule.scope == "all"
    sees = sees.to(dev)
    window = torch.tensor(layout.window, device=dev)
    shift = torch.tensor(layout.shift if shifted else (0, 0, 0), device=dev)
    Kq, Kk = qb.seg.shape[1], kb.seg.shape[1]
    step = max(1, chunk // (Kq * Kk))
    anys, fulls, terms = [], [], []
    for i in range(0, len(q_blk), step):
        qi, ki = q_blk[i : i + step], k_blk[i : i + step]
        qs, ks = qb.seg[qi][:, :, None], kb.seg[ki][:, None, :]  # (p, Kq, 1), (p, 1, Kk)
        valid = (qs >= 0) & (ks >= 0)
        seg_ok = valid & sees[qs.clamp(min=0), ks.clamp(min=0)]
        q_lo, q_hi = qb.lo[qi][:, :, None], qb.hi[qi][:, :, None]  # (p, Kq, 1, 3)
        k_lo, k_hi = kb.lo[ki][:, None], kb.hi[ki][:, None]  # (p, 1, Kk, 3)
        dd = (qs == DETAIL) & (ks == DETAIL)
        # own window: the (shifted) cells the boxes touch
        cq0, cq1 = (q_lo + shift) // window, (q_hi + shift) // window
        ck0, ck1 = (k_lo + shift) // window, (k_hi + shift) // window
        own_any = dd & ((cq0 <= ck1) & (ck0 <= cq1)).all(-1)
        own_all = dd & ((cq0 == cq1) & (ck0 == ck1) & (cq0 == ck0)).all(-1)
        near_any = torch.zeros_like(dd)
        al_any = torch.zeros_like(dd)
        any_, all_ = seg_ok | own_any, seg_ok | own_all
        if rule.neighbours == "halo":
            h_any, h_all = _within_all(q_lo, q_hi, k_lo, k_hi, rule.halo)
            near_any = dd & h_any
            any_, all_ = any_ | near_any, all_ | (dd & h_all)
        if rule.scope == "aligned":
            dg = (qs == DETAIL) & (ks == GUIDANCE)
            qw = qb.win[qi][:, :, None]
            a_any, a_all = _within_all(qw, qw, k_lo, k_hi, rule.margin)
            al_any = dg & a_any
            any_, all_ = any_ | al_any, all_ | (dg & a_all)
        anys.append((valid & any_).flatten(1).any(1))
        fulls.append((~valid | all_).flatten(1).all(1))
        t = torch.stack([seg_ok, own_any, near_any, al_any], -1)  # (p, Kq, Kk, 4)
        terms.append(t.flatten(1, 2).any(1))
    if not anys:
        return (torch.zeros(0, dtype=torch.bool, device=dev),) * 2 + (
            torch.zeros(0, 4, dtype=torch.bool, device=dev),
        )
    return torch.cat(anys), torch.cat(fulls), torch.cat(terms)


def _ordered(rows, cols, n_rows, n_cols):
    """Sorted (row, col) pairs -> BlockMask (num_blocks (1,1,R), indices (1,1,R,C))."""
    counts = torch.bincount(rows, minlength=n_rows)
    _, slot = _expand(counts)
    idx = torch.zeros(n_rows, n_cols, dtype=torch.int32, device=rows.device)
    idx[rows, slot] = cols.to(torch.int32)
    return counts.to(torch.int32)[None, None], idx[None, None]


def _transposed(rows, cols, n_rows, n_cols):
    order = torch.argsort(cols * n_rows + rows)
    return _ordered(cols[order], rows[order], n_cols, n_rows)


def padded(n: int, block=BLOCK) -> int:
    """n rounded up to whole blocks (of both sizes, for a (query, key) pair)."""
    unit = math.lcm(*_sizes(block))
    return -(-n // unit) * unit


def _sizes(block) -> tuple[int, int]:
    return (block, block) if isinstance(block, int) else tuple(block)


@dataclass
class Blocks:
    """The exact block structure of a rule between two sides."""

    q_blk: torch.Tensor  # (p,) query block of each non-empty pair
    k_blk: torch.Tensor  # (p,) key block
    full: torch.Tensor  # (p,) bool: every element allowed (else partial)
    lengths: tuple[int, int]  # tokens on each side
    block: tuple[int, int]  # (query block, key block) sizes
    n_blocks: tuple[int, int]
    terms: tuple[str, ...]  # the TERMS true somewhere inside a partial block


def block_structure(
    layout: Layout,
    rule: MaskRule,
    *,
    shifted=False,
    q: Side | None = None,
    kv: Side | None = None,
    block=BLOCK,
    device="cpu",
) -> Blocks:
    """Non-empty block pairs of `rule` between sides q and kv (default: the whole
    sequence) and which are full, without evaluating any pair of tokens."""
    bq, bk = _sizes(block)
    same = q is None and kv is None and bq == bk  # one sequence: cut it once
    q = Side.whole(layout) if q is None else q
    kv = Side.whole(layout) if kv is None else kv
    qb = block_boxes(layout, q, bq, device)
    kb = qb if same else block_boxes(layout, kv, bk, device)
    nq, nk = qb.n_blocks, kb.n_blocks
    q_blk, k_blk = candidate_pairs(layout, rule, shifted, qb, kv, nk, bk)
    any_, full, terms = classify(layout, rule, shifted, qb, kb, q_blk, k_blk)
    # the ragged last block is padded by create_block_mask, so never full
    if qb.length % bq:
        full &= q_blk != nq - 1
    if kb.length % bk:
        full &= k_blk != nk - 1
    used = terms[any_ & ~full].any(0).tolist() if len(terms) else [False] * 4
    return Blocks(
        q_blk[any_],
        k_blk[any_],
        full[any_],
        (qb.length, kb.length),
        (bq, bk),
        (nq, nk),
        tuple(t for t, u in zip(TERMS, used) if u),
    )


def to_block_mask(b: Blocks, mask_mod, pad=False) -> BlockMask:
    """A flex BlockMask of the structure b. pad: sequence lengths rounded up to whole
    blocks (the mask_mod must reject the padding, as the `rules` tables do)."""
    (nq, nk), part, lengths = b.n_blocks, ~b.full, b.lengths
    if pad:  # padding adds empty blocks
        lengths = (padded(lengths[0], b.block), padded(lengths[1], b.block))
        nq, nk = lengths[0] // b.block[0], lengths[1] // b.block[1]
    kv_num, kv_idx = _ordered(b.q_blk[part], b.k_blk[part], nq, nk)
    fkv_num, fkv_idx = _ordered(b.q_blk[b.full], b.k_blk[b.full], nq, nk)
    bm = BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        fkv_num,
        fkv_idx,
        BLOCK_SIZE=b.block,
        mask_mod=mask_mod,
        seq_lengths=lengths,
        compute_q_blocks=False,
    )
    bm.q_num_blocks, bm.q_indices = _transposed(b.q_blk[part], b.k_blk[part], nq, nk)
    bm.full_q_num_blocks, bm.full_q_indices = _transposed(b.q_blk[b.full], b.k_blk[b.full], nq, nk)
    return bm


def analytic_block_mask(
    layout: Layout,
    rule: MaskRule,
    mask_mod,
    *,
    shifted=False,
    q: Side | None = None,
    kv: Side | None = None,
    block=BLOCK,
    device="cpu",
    pad=False,
) -> BlockMask:
    """The BlockMask of `rule` between sides q and kv (default: the whole sequence),
    equal to create_block_mask(mask_mod, ...) without evaluating any pair of tokens."""
    b = block_structure(layout, rule, shifted=shifted, q=q, kv=kv, block=block, device=device)
    return to_block_mask(b, mask_mod, pad)


def mask_block_mask(
    mask_mod, n_q: int, n_kv: int, device="cpu", block=BLOCK, max_elements=1 << 32
) -> BlockMask:
    """torch's create_block_mask: the mask_mod evaluated on every (query, key) pair.
    Compiled for large inputs, and run over slices of query rows when the dense mask
    would exceed max_elements (it is materialised slice by slice)."""
    bq, bk = _sizes(block)
    big = n_q * n_kv > (1 << 26)
    rows = max(bq, max_elements // max(n_kv, 1) // bq * bq)
    if n_q <= rows:
        return create_block_mask(
            mask_mod, None, None, n_q, n_kv, device=device, BLOCK_SIZE=(bq, bk), _compile=big
        )
    offset = torch.zeros((), dtype=torch.long, device=device)

    def shifted(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + offset, kv_idx)

    parts = []
    for q0 in range(0, n_q, rows):
        offset.fill_(q0)
        m = create_block_mask(
            shifted,
            None,
            None,
            min(rows, n_q - q0),
            n_kv,
            device=device,
            BLOCK_SIZE=(bq, bk),
            _compile=big,
        )
        parts.append((m.kv_num_blocks, m.kv_indices, m.full_kv_num_blocks, m.full_kv_indices))
    kv_num, kv_idx, full_num, full_idx = (torch.cat(x, dim=2) for x in zip(*parts))
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(bq, bk),
        mask_mod=mask_mod,
        seq_lengths=(n_q, n_kv),
    )
