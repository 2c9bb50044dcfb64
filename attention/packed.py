"""Packed execution of a rule: query and key sequences rebuilt so that every tile is
either free of masking or needs one cheap test.

Flex skips empty blocks and runs full ones without evaluating the mask; a partial block
costs the mask evaluated element by element, which on an H100 costs about as much as the
block's matrix products. In layout order most tiles of a window rule are partial: windows
straddle block edges after a border window, halo tiles between neighbouring windows hold
a few allowed pairs each, and aligned guidance windows are scattered through the
guidance segment. Packing removes all three. For one attention call:

    queries  [ text | guidance | window w0 | window w1 | ... ]
    keys     [ text | guidance | window w0 | window w1 | ... | extras(j0) | extras(j1) | ... ]

every piece padded to whole blocks, where extras(j) are copies of the keys that detail
query block j may see outside its own window and the shared text/guidance prefix:

    aligned guidance   guidance windows within `margin` windows (scope aligned)
    halo ring          detail keys of other windows within `halo` tokens of one of
                       the block's queries (neighbours halo)

each padded to whole blocks. A tile is then one kind of query block against one kind of
key block, and within it every real key is allowed, except in ring tiles, where a key is
allowed iff it is within `halo` of the query along every axis. The kernel's mask is
therefore `plain[k] | near(q, k)` (`mask_mod`), evaluated only on partial tiles: ring
tiles and tiles holding padding keys. `exact_mask_mod` states the whole rule on the
packed sequences (segment, window and block ownership) for create_block_mask and tests.

Keys are copied with index_select, so their gradients are summed back over the copies;
padding query rows are computed and dropped. Shifted windows (neighbours "shift") are
not packed: their aligned guidance differs inside one shifted cell (see dispatch.Plan).
"""

import functools
from dataclasses import dataclass

import torch

from .blockmask import Blocks, _expand, raster_boxes, windows_in_ranges
from .chunks import INT32
from .layout import DETAIL, GUIDANCE, TEXT, Layout
from .rules import FAR, MaskRule, _named, capacity

# kinds of packed keys (queries use the segment ids TEXT, GUIDANCE, DETAIL)
K_TEXT, K_GUIDANCE, K_OWN, K_ALIGNED, K_RING, K_PAD = 0, 1, 2, 3, 4, -1


@functools.lru_cache(maxsize=8)
def _table(layout: Layout, name: str, device: str) -> torch.Tensor:
    """A per-token table of the layout (coords, inv_perm) on a device, copied once."""
    return getattr(layout, name).to(device)


def _ceil(x, b):
    return (x + b - 1) // b * b


@dataclass(eq=False)
class Extras:
    """The extra keys of every detail query block of a layout. Detail query blocks are
    numbered globally: windows in order, then the blocks of each window."""

    window: torch.Tensor  # (nb,) window of each detail query block
    first: torch.Tensor  # (nw,) first detail query block of each window
    q_lo: torch.Tensor  # (nb, 3) per-axis min of the block's query coordinates
    q_hi: torch.Tensor  # (nb, 3) per-axis max
    q_full: torch.Tensor  # (nb,) the block has no padding rows
    a_count: torch.Tensor  # (nw,) aligned guidance keys of each window
    a_src: torch.Tensor  # their layout positions, windows in order
    r_count: torch.Tensor  # (nb,) halo ring keys of each block
    r_src: torch.Tensor  # their layout positions, blocks in order, keys in raster order
    r_start: torch.Tensor  # (nb,) first slot of each block's ring in its window's region
    r_size: torch.Tensor  # (nw,) slots of each window's ring region (whole key blocks)


def detail_query_blocks(layout: Layout, bq: int, dev):
    """Detail query blocks: window (nb,), local raster range [a, e) in the window."""
    vol = layout.detail_windows.volume.to(dev)
    window, rank = _expand(-(-vol // bq))
    a = rank * bq
    e = torch.minimum(a + bq, vol[window])
    first = torch.cumsum(-(-vol // bq), 0) - (-(-vol // bq))
    return window, first, a, e


def _query_boxes(layout: Layout, window, a, e, dev):
    dw = layout.detail_windows
    lo, hi, ok = raster_boxes(dw.size.to(dev)[window], a, e)
    origin = dw.origin.to(dev)[window][:, None]
    return lo + origin, hi + origin, ok


def _aligned_sources(layout: Layout, rule: MaskRule, dev):
    """Per window: the guidance tokens of the windows within `margin` (counts (nw,),
    layout positions in window order)."""
    dw, gw = layout.detail_windows, layout.guidance_windows
    wc = dw.coords.to(dev)
    top = torch.tensor(layout.window_grid, device=dev) - 1
    w0 = (wc - rule.margin).clamp(min=0)
    w1 = torch.minimum(wc + rule.margin, top)
    owner, wid = windows_in_ranges(layout, w0, w1)  # grouped by owner, ascending ids
    vol = gw.volume.to(dev)[wid]
    item, rank = _expand(vol)
    src = layout.guidance_start + gw.start.to(dev)[wid][item] + rank
    counts = torch.zeros(layout.n_windows, dtype=torch.long, device=dev)
    counts.index_add_(0, owner, vol)
    return counts, src


def _ring_sources(layout: Layout, radius: int, window, lo, hi, ok, b_lo, b_hi, dev, step=1 << 24):
    """Per detail query block: the detail keys outside its window within `radius` of one
    of its queries (the query boxes lo..hi, ok; their bounding box b_lo..b_hi). Returns
    counts (nb,), layout positions of the keys, blocks in order, keys in raster order."""
    grid = torch.tensor(layout.grid, device=dev)
    dw = layout.detail_windows
    w_lo = dw.origin.to(dev)[window]
    w_hi = w_lo + dw.size.to(dev)[window] - 1
    c_lo = (b_lo - radius).clamp(min=0)  # candidate box: the blocks' box grown by radius
    c_hi = torch.minimum(b_hi + radius, grid - 1)
    ext = c_hi - c_lo + 1
    m = ext.amax(0).tolist() if len(ext) else [0, 0, 0]
    axes = [torch.arange(x, device=dev) for x in m]
    offs = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    inv = _table(layout, "inv_perm", str(dev))
    counts, srcs = [], []
    rows = max(1, step // max(1, len(offs)))
    for i in range(0, len(window), rows):
        s = slice(i, i + rows)
        cand = c_lo[s, None] + offs[None]  # (r, C, 3)
        keep = (offs[None] < ext[s, None]).all(-1)
        inside = ((cand >= w_lo[s, None]) & (cand <= w_hi[s, None])).all(-1)
        keep &= ~inside
        near = torch.zeros_like(keep)
        for j in range(lo.shape[1]):  # a key near some box of the block
            gap = torch.maximum(lo[s, None, j] - cand, cand - hi[s, None, j]).clamp(min=0)
            near |= ok[s, None, j] & (gap <= radius).all(-1)
        keep &= near
        counts.append(keep.sum(1))
        pts = cand[keep]  # (k, 3), blocks in order, candidates in raster order
        raster = (pts[:, 0] * grid[1] + pts[:, 1]) * grid[2] + pts[:, 2]
        srcs.append(inv[layout.detail_start + raster])
    if not counts:
        z = torch.zeros(0, dtype=torch.long, device=dev)
        return z, z
    return torch.cat(counts), torch.cat(srcs)


def layout_extras(layout: Layout, rule: MaskRule, block, device) -> Extras:
    """The extras of every detail query block (see the module docstring), for (query,
    key) block sizes `block`."""
    dev = torch.device(device)
    bq, bk = block
    window, first, a, e = detail_query_blocks(layout, bq, dev)
    lo, hi, ok = _query_boxes(layout, window, a, e, dev)
    big = torch.iinfo(torch.long).max
    q_lo = torch.where(ok[..., None], lo, big).amin(1)
    q_hi = torch.where(ok[..., None], hi, -big).amax(1)
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    a_count = torch.zeros(layout.n_windows, dtype=torch.long, device=dev)
    r_count, a_src, r_src = torch.zeros_like(window), empty, empty
    if rule.scope == "aligned" and layout.has_guidance:
        a_count, a_src = _aligned_sources(layout, rule, dev)
    if rule.neighbours == "halo":
        r_count, r_src = _ring_sources(layout, rule.halo, window, lo, hi, ok, q_lo, q_hi, dev)
    r_start, r_size = pack_rings(r_count, window, first, layout.n_windows, bk)
    q_full = e - a == bq
    return Extras(
        window, first, q_lo, q_hi, q_full, a_count, a_src, r_count, r_src, r_start, r_size
    )


def pack_rings(count, window, first, n_windows: int, bk: int):
    """Lay out the rings of each window's query blocks one after another in key blocks
    of bk slots, starting a ring at the next block edge only when it would otherwise
    straddle one. Small rings then share a key block (flux-4k: both rings of a window in
    one block) and each ring lies in as few key blocks as it can. Returns each ring's
    first slot in its window's region (nb,) and each region's size (nw,)."""
    dev = count.device
    start = torch.zeros_like(count)
    fill = torch.zeros(n_windows, dtype=torch.long, device=dev)
    rank = torch.arange(len(count), device=dev) - first[window]
    for r in range(int(rank.max()) + 1 if len(rank) else 0):
        g = torch.nonzero(rank == r).squeeze(1)  # the r-th block of every window
        w, c = window[g], count[g]
        f = fill[w]
        used = f % bk
        straddle = (used > 0) & (used + c > bk)
        s = torch.where(straddle, f - used + bk, f)
        start[g] = s
        fill[w] = s + c
    return start, -(-fill // bk) * bk


@dataclass(eq=False)
class Seq:
    """One packed side: pieces of tokens, each padded to whole blocks."""

    src: torch.Tensor  # (L,) layout position of each slot (padding slots: 0)
    real: torch.Tensor  # (L,) bool: not padding
    kind: torch.Tensor  # (L,) kind of the slot's piece
    owner: torch.Tensor  # (L,) owner of the slot's piece (window or query block; else -1)
    first: torch.Tensor  # (pieces,) first block of each piece
    blocks: torch.Tensor  # (pieces,) blocks of each piece
    block_real: torch.Tensor  # (L / block,) real slots per block
    head: int  # leading slots that are the identity (src[i] == i): no copy needed


def _seq(count, offset, kind, owner, pool, block) -> Seq:
    """Pieces of `count` tokens whose layout positions are pool[offset : offset + count],
    each padded to whole blocks. count, offset, kind, owner: (pieces,)."""
    nblk = -(-count // block)
    piece, rank = _expand(nblk * block)
    real = rank < count[piece]
    src = torch.where(real, pool[(offset[piece] + rank).clamp(max=len(pool) - 1)], 0)
    ident = src == torch.arange(len(src), device=src.device)
    head = int(ident.long().cumprod(0).sum()) if len(src) else 0
    first = torch.cumsum(nblk, 0) - nblk
    block_real = real.view(-1, block).sum(1)
    return Seq(src, real, kind[piece], owner[piece], first, nblk, block_real, head)


@dataclass(eq=False)
class Part:
    """One packed flex call: queries of some windows (and perhaps the text/guidance
    prefix) against every key they may see."""

    q: Seq
    kv: Seq
    q_kind: torch.Tensor  # (Lq,) TEXT / GUIDANCE / DETAIL
    q_win: torch.Tensor  # (Lq,) window of detail rows, else -1
    blocks: Blocks
    shared_rings: bool = False  # some key block holds the rings of several query blocks


def part_sizes(layout: Layout, rule: MaskRule, ex: Extras, block, prefix_q: bool, w0, w1):
    """(query slots, key slots, detail queries) of the part for windows [w0, w1),
    without building it."""
    bq, bk = block
    vol = layout.detail_windows.volume[w0:w1]
    nt, ng = layout.n_text, layout.n_guidance
    lq = int((-(-vol // bq)).sum()) * bq
    lk = int((-(-vol // bk)).sum() + (-(-ex.a_count[w0:w1] // bk)).sum()) * bk
    lk += int(ex.r_size[w0:w1].sum())
    has_d = w1 > w0
    if prefix_q:
        lq += _ceil(nt, bq) + _ceil(ng, bq)
    if nt and (prefix_q or (has_d and rule.detail_sees_text)):
        lk += _ceil(nt, bk)
    if ng and (prefix_q or (has_d and rule.scope == "all")):
        lk += _ceil(ng, bk)
    return lq, lk, int(vol.sum())


def _block_range(ex: Extras, w0: int, w1: int):
    nb = len(ex.window)
    g0 = int(ex.first[w0]) if w0 < len(ex.first) else nb
    g1 = int(ex.first[w1]) if w1 < len(ex.first) else nb
    return g0, g1


def _ring_region(ex: Extras, w0: int, w1: int, g0: int, g1: int, owner_of_g, bk: int, dev):
    """The halo rings of windows [w0, w1), each window's region as `pack_rings` laid it
    out: (src, real, owner) per slot, and the first and last slot of each query block's
    ring (relative to the region)."""
    size = ex.r_size[w0:w1]
    base = torch.cumsum(size, 0) - size  # each window's region in the part's region
    gs = torch.arange(g0, g1, device=dev)
    count = ex.r_count[gs]
    start = base[ex.window[gs] - w0] + ex.r_start[gs]
    r_off = torch.cumsum(ex.r_count, 0) - ex.r_count
    item, rank = _expand(count)
    slot = start[item] + rank
    total = int(size.sum())
    src = torch.zeros(total, dtype=torch.long, device=dev)
    real = torch.zeros(total, dtype=torch.bool, device=dev)
    owner = torch.full((total,), -1, dtype=torch.long, device=dev)
    src[slot] = ex.r_src[r_off[gs][item] + rank]
    real[slot] = True
    owner[slot] = owner_of_g[item]
    return src, real, owner, start, start + count - 1, count


def build_part(
    layout: Layout, rule: MaskRule, ex: Extras, block, prefix_q: bool, w0: int, w1: int, device
) -> Part:
    """The packed sequences and exact block structure for the queries of windows
    [w0, w1) (plus text and guidance queries if prefix_q)."""
    dev = torch.device(device)
    bq, bk = block
    nt, ng, n = layout.n_text, layout.n_guidance, layout.n
    dw = layout.detail_windows
    wins = torch.arange(w0, w1, device=dev)
    nw = len(wins)
    vol = dw.volume.to(dev)[wins]
    w_off = layout.detail_start + dw.start.to(dev)[wins]
    g0, g1 = _block_range(ex, w0, w1)
    ngb = g1 - g0
    pool = torch.cat([torch.arange(n, device=dev), ex.a_src])
    a_off = n + torch.cumsum(ex.a_count, 0) - ex.a_count

    def t(*xs):
        return torch.tensor(xs, dtype=torch.long, device=dev).reshape(-1)

    # ---- queries: [text | guidance] (prefix_q) then the windows --------------------
    pre = [(c, o, k) for c, o, k in ((nt, 0, TEXT), (ng, nt, GUIDANCE)) if prefix_q and c]
    qs = _seq(
        torch.cat([t(*(c for c, _, _ in pre)), vol]),
        torch.cat([t(*(o for _, o, _ in pre)), w_off]),
        torch.cat([t(*(k for _, _, k in pre)), torch.full_like(vol, DETAIL)]),
        torch.cat([torch.full((len(pre),), -1, device=dev), wins]),
        pool,
        bq,
    )
    n_pre_qb = sum(-(-c // bq) for c, _, _ in pre)
    # the packed query block of each detail query block of the part
    q_blk_of_g = n_pre_qb + torch.arange(ngb, device=dev)
    # ---- keys: [text | guidance] as needed, own windows, aligned guidance per window,
    # then the halo rings -----------------------------------------------------------
    has_d = w1 > w0
    want_t = nt and (prefix_q or (has_d and rule.detail_sees_text))
    want_g = ng and (prefix_q or (has_d and rule.scope == "all"))
    kpre = [(nt, 0, K_TEXT)] if want_t else []
    kpre += [(ng, nt, K_GUIDANCE)] if want_g else []
    kvs = _seq(
        torch.cat([t(*(c for c, _, _ in kpre)), vol, ex.a_count[w0:w1]]),
        torch.cat([t(*(o for _, o, _ in kpre)), w_off, a_off[w0:w1]]),
        torch.cat(
            [
                t(*(k for _, _, k in kpre)),
                torch.full_like(vol, K_OWN),
                torch.full_like(vol, K_ALIGNED),
            ]
        ),
        torch.cat([torch.full((len(kpre),), -1, device=dev), wins, wins]),
        pool,
        bk,
    )
    ring_base = len(kvs.src)
    r_src, r_real, r_owner, r_first, r_last, r_count = _ring_region(
        ex, w0, w1, g0, g1, q_blk_of_g, bk, dev
    )
    kvs.src = torch.cat([kvs.src, r_src])
    kvs.real = torch.cat([kvs.real, r_real])
    kvs.kind = torch.cat([kvs.kind, torch.full_like(r_src, K_RING)])
    kvs.owner = torch.cat([kvs.owner, r_owner])
    kvs.block_real = kvs.real.view(-1, bk).sum(1)
    kvs.kind = torch.where(kvs.real, kvs.kind, K_PAD)
    # ---- block pairs: (query blocks, first key block, key block count) -------------
    nkp = len(kpre)
    kp_text = next((i for i, (_, _, k) in enumerate(kpre) if k == K_TEXT), None)
    kp_guid = next((i for i, (_, _, k) in enumerate(kpre) if k == K_GUIDANCE), None)
    links = []

    def link(q_blocks, piece):  # every block of a key piece
        if piece is not None and len(q_blocks):
            piece = piece if torch.is_tensor(piece) else torch.full_like(q_blocks, piece)
            links.append((q_blocks, kvs.first[piece], kvs.blocks[piece]))

    qb = 0
    for c, _, k in pre:  # text and guidance query blocks
        blocks = torch.arange(qb, qb + -(-c // bq), device=dev)
        qb += len(blocks)
        link(blocks, kp_text if (k == TEXT or rule.guidance_sees_text) else None)
        link(blocks, kp_guid)
    if ngb:
        local_w = ex.window[g0:g1] - w0
        if rule.detail_sees_text:
            link(q_blk_of_g, kp_text)
        if rule.scope == "all":
            link(q_blk_of_g, kp_guid)
        link(q_blk_of_g, nkp + local_w)  # own window
        link(q_blk_of_g, nkp + nw + local_w)  # aligned guidance of the window
        has = r_count > 0  # the key blocks the block's ring spans
        first = (ring_base + r_first[has]) // bk
        links.append((q_blk_of_g[has], first, (ring_base + r_last[has]) // bk - first + 1))
    pq = torch.cat([x[0] for x in links])
    pf = torch.cat([x[1] for x in links])
    pc = torch.cat([x[2] for x in links])
    item, rank = _expand(pc)
    q_blk, k_blk = pq[item], pf[item] + rank
    # ---- full or partial ----------------------------------------------------------
    n_qb, n_kb = len(qs.src) // bq, len(kvs.src) // bk
    k_kind_blk = kvs.kind.view(n_kb, bk).amax(1)  # kind of the block's piece
    full = (kvs.block_real[k_blk] == bk) & (k_kind_blk[k_blk] != K_RING)
    ring = k_kind_blk[k_blk] == K_RING
    if bool(ring.any()):
        coords = _table(layout, "coords", str(dev))
        kc = coords[kvs.src].view(n_kb, bk, 3)
        kr = kvs.real.view(n_kb, bk, 1)
        big = torch.iinfo(torch.long).max
        k_lo = torch.where(kr, kc, big).amin(1)
        k_hi = torch.where(kr, kc, -big).amax(1)
        own = kvs.owner.view(n_kb, bk)
        one_owner = own.amin(1) == own.amax(1)  # a full ring block: no padding, one owner
        g = q_blk[ring] - n_pre_qb + g0  # global detail query block
        kb = k_blk[ring]
        span = torch.maximum(ex.q_hi[g] - k_lo[kb], k_hi[kb] - ex.q_lo[g])
        all_near = (span <= rule.halo).all(-1)
        full[ring] = all_near & ex.q_full[g] & (kvs.block_real[kb] == bk) & one_owner[kb]
    shared = False  # does a ring key block hold keys of two query blocks?
    if len(r_owner):
        ring_own = r_owner.view(-1, bk)  # -1 on padding slots
        hi = ring_own.amax(1, keepdim=True)
        shared = bool((torch.where(ring_own < 0, hi, ring_own) != hi).any())
    order = torch.argsort(q_blk * n_kb + k_blk)
    q_kind = qs.kind
    q_win = torch.where(q_kind == DETAIL, qs.owner, -1)
    b = Blocks(
        q_blk[order],
        k_blk[order],
        full[order],
        (len(qs.src), len(kvs.src)),
        (bq, bk),
        (n_qb, n_kb),
        ("near",) if bool(ring.any()) else (),
    )
    return Part(qs, kvs, q_kind, q_win, b, shared)


def plan_parts(layout, rule, ex: Extras, block, bhd: int, budget: int, max_q=None):
    """[(prefix_q, w0, w1)]: one part if everything fits, else a part for the text and
    guidance queries and parts of consecutive windows, each within int32 offsets
    (B*H*L*D < 2^31), the BlockMask index budget and max_q detail queries."""
    bq, bk = block

    def fits(lq, lk, n_detail, cap=True):
        index = 16 * (lq // bq) * (lk // bk)
        small = not cap or max_q is None or n_detail <= max_q
        return bhd * max(lq, lk) < INT32 and index <= budget and small

    nw = layout.n_windows
    if fits(*part_sizes(layout, rule, ex, block, True, 0, nw)):
        return [(True, 0, nw)]
    parts = []
    if layout.detail_start:
        if not fits(*part_sizes(layout, rule, ex, block, True, 0, 0), cap=False):
            raise ValueError(
                f"text + guidance ({layout.detail_start} tokens) alone exceed the limits "
                f"(B*H*D = {bhd}, index budget {budget} bytes)"
            )
        parts.append((True, 0, 0))
    w0 = 0
    while w0 < nw:
        w1 = w0 + 1
        if not fits(*part_sizes(layout, rule, ex, block, False, w0, w1)):
            raise ValueError(
                "a single window exceeds the limits (int32 offsets, index budget or the "
                "chunk size cap)"
            )
        step = 1  # grow by doubling, then back off by bisection
        while w1 < nw and fits(*part_sizes(layout, rule, ex, block, False, w0, min(nw, w1 + step))):
            w1 = min(nw, w1 + step)
            step *= 2
        while step > 1:
            step //= 2
            if w1 + step <= nw and fits(*part_sizes(layout, rule, ex, block, False, w0, w1 + step)):
                w1 += step
        parts.append((False, w0, w1))
        w0 = w1
    return parts


# ---- masks ------------------------------------------------------------------------
def _static(x: torch.Tensor, fill: int, device) -> torch.Tensor:
    """A lookup table padded to rules.capacity and marked static (see there)."""
    out = torch.full((capacity(len(x)),), fill, dtype=torch.int32, device=device)
    out[: len(x)] = x.to(device=device, dtype=torch.int32)
    torch._dynamo.mark_static(out, 0)
    return out


def _axes(layout: Layout):
    return tuple(a for a in range(3) if layout.grid[a] > 1) or (2,)


def mask_mod(layout: Layout, rule: MaskRule, part: Part, device, uniform: bool = False):
    """The kernel's mask on the packed sequences: `plain[k] | near(q, k)`, and where a
    key block holds the rings of several query blocks, near only for the query's own
    ring. Exact on the tiles of `part.blocks` (every tile holds one kind of query
    against one kind of key of the right owner); `exact_mask_mod` is the rule
    everywhere. uniform=True: one
    compiled kernel for every rule and layout (the radius is a tensor, -1 without halo,
    and all three axes are compared)."""
    coords = _table(layout, "coords", str(part.q.src.device))
    qd = part.q.real & (part.q_kind == DETAIL)
    kr = part.kv.kind == K_RING
    plain = _static(part.kv.real & ~kr, 0, device)
    axes = (0, 1, 2) if uniform else _axes(layout)
    if rule.neighbours != "halo" and not uniform:

        def mod(b, h, qi, ki):
            return plain[ki] != 0

        return _named(mod, "packed[plain]")
    q_pos = [_static(torch.where(qd, coords[part.q.src, a], FAR), FAR, device) for a in axes]
    k_pos = [_static(torch.where(kr, coords[part.kv.src, a], -FAR), -FAR, device) for a in axes]
    r = rule.halo if rule.neighbours == "halo" else -1
    if uniform:
        r = torch.tensor(r, device=device)

    bq = part.blocks.block[0]
    owner = _static(torch.where(kr, part.kv.owner, -1), -1, device)
    check_owner = part.shared_rings or uniform

    def mod(b, h, qi, ki):
        near = None
        for qp, kp in zip(q_pos, k_pos):
            x = (qp[qi] - kp[ki]).abs() <= r
            near = x if near is None else near & x
        if check_owner:  # a key block holds the rings of several query blocks
            near = near & (owner[ki] == qi // bq)
        return (plain[ki] != 0) | near

    name = "+owner" if check_owner else ""
    return _named(mod, f"packed[plain+near({r}){name}]")


def exact_mask_mod(layout: Layout, rule: MaskRule, part: Part, device):
    """The rule on the packed sequences, for every pair: keys of the shared prefix by
    segment, own-window and aligned guidance keys by window, ring keys by query block
    and distance. Padding keys are never allowed."""
    bq = part.blocks.block[0]
    coords = _table(layout, "coords", str(part.q.src.device))
    qd = part.q.real & (part.q_kind == DETAIL)
    sees_text = torch.tensor([1, int(rule.guidance_sees_text), int(rule.detail_sees_text)])
    sees_guid = torch.tensor([1, 1, int(rule.scope == "all")])
    q_kind = _static(part.q_kind, 0, device)
    q_win = _static(part.q_win, -1, device)
    k_kind = _static(part.kv.kind, K_PAD, device)
    k_owner = _static(part.kv.owner, -2, device)
    s_text, s_guid = sees_text.to(device), sees_guid.to(device)
    q_pos = [_static(torch.where(qd, coords[part.q.src, a], FAR), FAR, device) for a in range(3)]
    k_pos = [_static(coords[part.kv.src, a], 0, device) for a in range(3)]
    r = rule.halo if rule.neighbours == "halo" else -1

    def mod(b, h, qi, ki):
        kk, qk = k_kind[ki], q_kind[qi]
        near = None
        for qp, kp in zip(q_pos, k_pos):
            x = (qp[qi] - kp[ki]).abs() <= r
            near = x if near is None else near & x
        return (
            ((kk == K_TEXT) & (s_text[qk] != 0))
            | ((kk == K_GUIDANCE) & (s_guid[qk] != 0))
            | ((kk == K_OWN) & (k_owner[ki] == q_win[qi]))
            | ((kk == K_ALIGNED) & (k_owner[ki] == q_win[qi]))
            | ((kk == K_RING) & (k_owner[ki] == qi // bq) & near)
        )

    return _named(mod, f"packed_exact[{rule.name}]")


# ---- copying rows ---------------------------------------------------------------------
def _copy_rows(x: torch.Tensor, head: int, tail: torch.Tensor) -> torch.Tensor:
    """x[:, :, :head] followed by x[:, :, tail] along dim 2, copied as 8-byte words when
    rows allow it (index_select moves one element per thread: 4x fewer for bf16)."""
    words = x.stride(-1) == 1 and (x.shape[-1] * x.element_size()) % 8 == 0
    y = x.view(torch.int64) if words and x.element_size() < 8 else x
    out = y.index_select(2, tail)
    if head:
        out = torch.cat([y[:, :, :head], out], dim=2)
    return out.view(x.dtype) if y is not x else out


class _Rows(torch.autograd.Function):
    """rows(x, head, tail) with its gradient: summed back over the copies of a row."""

    @staticmethod
    def forward(ctx, x, head, tail):
        ctx.head, ctx.shape = head, x.shape
        ctx.save_for_backward(tail)
        return _copy_rows(x, head, tail)

    @staticmethod
    def backward(ctx, g):
        (tail,) = ctx.saved_tensors
        acc = torch.float32 if g.element_size() < 4 else g.dtype  # sum copies, round once
        grad = g.new_zeros(ctx.shape, dtype=acc)
        grad[:, :, : ctx.head] = g[:, :, : ctx.head]
        grad.index_add_(2, tail, g[:, :, ctx.head :].to(acc))
        return grad.to(g.dtype), None, None


def rows(x: torch.Tensor, head: int, tail: torch.Tensor) -> torch.Tensor:
    """The packed rows of a (B, H, L, D) tensor: its first `head` rows, then the rows
    `tail` (layout positions), along dim 2."""
    if len(tail) == 0:
        return x if head == x.shape[2] else x[:, :, :head]
    if x.requires_grad:
        return _Rows.apply(x, head, tail)
    return _copy_rows(x, head, tail)
