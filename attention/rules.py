"""Mask rules: which query token may attend to which key token.

| query \\ key | text              | guidance                 | detail                     |
|-------------|-------------------|--------------------------|----------------------------|
| text        | yes               | yes                      | text_sees_detail (no)      |
| guidance    | guidance_sees_text| yes                      | never (one-way guidance)   |
| detail      | detail_sees_text  | scope all / aligned(m)   | own window + neighbours    |

text_sees_detail (off by default, UltraGen's rule) lets text see every detail token, as
in plain FLUX: with one window and no guidance the rule is then dense attention. It runs
in layout order and unchunked (see dispatch.Plan).

Neighbours: `none`; `halo(k)`: also detail keys within k tokens of the query along every
axis; `shift`: odd layers use windows shifted by half a window (Swin).

Every rule is a mask_mod factory `rule(q, k, ...) -> mask_mod(b, h, q_idx, kv_idx)` over
per-token lookup tables (`Tokens`), one table for the queries and one for the keys, so
the same rules serve a whole sequence or one chunk of it. `compose` ORs the rules of a
`MaskRule` together and ANDs in the one-way constraint. `fused` is the same rule written
with role-specific sentinels so that a partial block costs a handful of integer ops per
element; property tests prove it equal to `compose` and to the dense reference.
"""

from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import and_masks, or_masks

from .layout import DETAIL, GUIDANCE, TEXT, Layout

NEIGHBOURS = ("none", "halo", "shift")
SCOPES = ("all", "aligned")
FAR = 1 << 20  # sentinel coordinate: further than any halo or margin


@dataclass(frozen=True)
class MaskRule:
    """The parameters of one mask rule (see the table in the module docstring)."""

    scope: str = "all"  # guidance seen by detail queries: "all" or "aligned"
    margin: int = 1  # aligned(m): the aligned guidance window and neighbours within m windows
    neighbours: str = "halo"  # "none", "halo" or "shift"
    halo: int = 1  # halo(k): keys within k tokens along every axis
    guidance_sees_text: bool = True
    detail_sees_text: bool = True
    text_sees_detail: bool = False  # plain FLUX's text -> image attention

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.neighbours not in NEIGHBOURS:
            raise ValueError(f"neighbours must be one of {NEIGHBOURS}, got {self.neighbours!r}")
        if self.margin < 0 or self.halo < 0:
            raise ValueError("margin and halo must be >= 0")

    @property
    def name(self) -> str:
        scope = "all" if self.scope == "all" else f"aligned({self.margin})"
        neigh = f"halo({self.halo})" if self.neighbours == "halo" else self.neighbours
        text = "".join(
            [
                ", guidance_sees_text" if self.guidance_sees_text else "",
                ", detail_sees_text" if self.detail_sees_text else "",
                ", text_sees_detail" if self.text_sees_detail else "",
            ]
        )
        return f"guidance {scope}, neighbours {neigh}{text}"


# Images use the aligned scope too, not `all` (an earlier default, one reading of the
# UltraGen paper): with `all` each detail query
# also sees every guidance token (16,384 at 8K), so attention per token grows with the
# image and its cost with the square of the pixels. At 8K that guidance term alone is
# ~3e15 FLOPs per FLUX step: 3 s even at an H100's peak bf16 rate, 7 s measured, against
# UltraGen's near-linear claim (bench/results/flux-step.md). `all` stays an option.
IMAGE_RULE = MaskRule(scope="aligned", margin=1, neighbours="halo", halo=1)
ALL_GUIDANCE_RULE = MaskRule(scope="all", neighbours="halo", halo=1)
VIDEO_RULE = MaskRule(scope="aligned", margin=1, neighbours="halo", halo=1)


def capacity(n: int) -> int:
    """Lookup tables are padded to a power of two (at least 1024) and marked static, so
    compiled kernels are reused across sequence lengths (torch.compile's CPU flex
    template cannot index a table whose length is symbolic)."""
    return max(1024, 1 << (max(n, 1) - 1).bit_length())


def _padded(x: torch.Tensor, cap: int, fill: int, device=None) -> torch.Tensor:
    out = torch.full((cap,), fill, dtype=torch.int32)
    out[: len(x)] = x.to(torch.int32)
    out = out.to(device)
    torch._dynamo.mark_static(out, 0)
    return out


@dataclass
class Tokens:
    """Per-token lookup tables for one side (queries or keys) of an attention call.
    Entries past `n` are padding: segment -1, which every rule rejects."""

    n: int
    seg: torch.Tensor  # (cap,) TEXT / GUIDANCE / DETAIL
    cell: torch.Tensor  # (cap,) own-window cell: window id, or shifted cell id
    pos: tuple  # 3 x (cap,) detail-grid token coordinates (detail tokens)
    wpos: tuple  # 3 x (cap,) window-grid coordinates (guidance and detail tokens)


def tokens(
    layout: Layout, index: torch.Tensor | None = None, shifted: bool = False, device=None
) -> Tokens:
    """Lookup tables for the layout tokens `index` (global positions; None = all)."""
    seg, cell = layout.segment, layout.window_id
    if shifted:
        cell = torch.where(seg == DETAIL, layout.shifted_cell, cell)
    pos, wpos = layout.coords, layout.window_coords
    if index is not None:
        index = index.cpu()
        seg, cell, pos, wpos = seg[index], cell[index], pos[index], wpos[index]
    n, cap = len(seg), capacity(len(seg))

    def table(x, fill=-1):
        return _padded(x, cap, fill, device)

    return Tokens(
        n=n,
        seg=table(seg),
        cell=table(cell),
        pos=tuple(table(pos[:, a]) for a in range(3)),
        wpos=tuple(table(wpos[:, a]) for a in range(3)),
    )


def _named(fn, name: str):
    fn.__name__ = fn.__qualname__ = name
    return fn


# ---- one factory per rule ------------------------------------------------------------
def text_sees_text_and_guidance(q: Tokens, k: Tokens):
    def mod(b, h, qi, ki):
        return (q.seg[qi] == TEXT) & ((k.seg[ki] == TEXT) | (k.seg[ki] == GUIDANCE))

    return _named(mod, "text_sees_text_and_guidance")


def text_sees_detail(q: Tokens, k: Tokens):
    def mod(b, h, qi, ki):
        return (q.seg[qi] == TEXT) & (k.seg[ki] == DETAIL)

    return _named(mod, "text_sees_detail")


def guidance_sees_guidance(q: Tokens, k: Tokens):
    def mod(b, h, qi, ki):
        return (q.seg[qi] == GUIDANCE) & (k.seg[ki] == GUIDANCE)

    return _named(mod, "guidance_sees_guidance")


def guidance_sees_text(q: Tokens, k: Tokens):
    def mod(b, h, qi, ki):
        return (q.seg[qi] == GUIDANCE) & (k.seg[ki] == TEXT)

    return _named(mod, "guidance_sees_text")


def guidance_one_way(q: Tokens, k: Tokens):
    """A constraint (AND it in): guidance never attends to detail."""

    def mod(b, h, qi, ki):
        return ~((q.seg[qi] == GUIDANCE) & (k.seg[ki] == DETAIL))

    return _named(mod, "guidance_one_way")


def detail_sees_text(q: Tokens, k: Tokens):
    def mod(b, h, qi, ki):
        return (q.seg[qi] == DETAIL) & (k.seg[ki] == TEXT)

    return _named(mod, "detail_sees_text")


def detail_own_window(q: Tokens, k: Tokens):
    """Same window (or, with tables built `shifted=True`, same shifted window)."""

    def mod(b, h, qi, ki):
        both = (q.seg[qi] == DETAIL) & (k.seg[ki] == DETAIL)
        return both & (q.cell[qi] == k.cell[ki])

    return _named(mod, "detail_own_window")


def _within(qp, kp, qi, ki, r):
    """|q - k| <= r on every axis."""
    out = None
    for a in range(3):
        near = (qp[a][qi] - kp[a][ki]).abs() <= r
        out = near if out is None else out & near
    return out


def halo(q: Tokens, k: Tokens, radius: int):
    def mod(b, h, qi, ki):
        both = (q.seg[qi] == DETAIL) & (k.seg[ki] == DETAIL)
        return both & _within(q.pos, k.pos, qi, ki, radius)

    return _named(mod, f"halo({radius})")


def guidance_scope_all(q: Tokens, k: Tokens):
    def mod(b, h, qi, ki):
        return (q.seg[qi] == DETAIL) & (k.seg[ki] == GUIDANCE)

    return _named(mod, "guidance_scope_all")


def guidance_scope_aligned(q: Tokens, k: Tokens, margin: int):
    def mod(b, h, qi, ki):
        pair = (q.seg[qi] == DETAIL) & (k.seg[ki] == GUIDANCE)
        return pair & _within(q.wpos, k.wpos, qi, ki, margin)

    return _named(mod, f"guidance_scope_aligned({margin})")


def compose(rule: MaskRule, q: Tokens, k: Tokens):
    """The rule as the union of its parts, intersected with one-way guidance.
    For `shift`, build the tables with `shifted=True` on odd layers."""
    allow = [
        text_sees_text_and_guidance(q, k),
        guidance_sees_guidance(q, k),
        detail_own_window(q, k),
    ]
    if rule.guidance_sees_text:
        allow.append(guidance_sees_text(q, k))
    if rule.detail_sees_text:
        allow.append(detail_sees_text(q, k))
    if rule.text_sees_detail:
        allow.append(text_sees_detail(q, k))
    if rule.scope == "all":
        allow.append(guidance_scope_all(q, k))
    else:
        allow.append(guidance_scope_aligned(q, k, rule.margin))
    if rule.neighbours == "halo":
        allow.append(halo(q, k, rule.halo))
    names = ", ".join(f.__name__ for f in allow)
    mod = and_masks(or_masks(*allow), guidance_one_way(q, k))
    return _named(mod, f"and(or({names}), guidance_one_way)")


# ---- the same rule, fused ----------------------------------------------------------
@dataclass
class Fused:
    """Role-specific tables for `fused`: one entry per query (q_*) or key (k_*)."""

    q_sees: torch.Tensor  # bit s set: the query sees every key of segment s
    k_bit: torch.Tensor  # 1 << segment
    q_cell: torch.Tensor  # own-window cell; -1 for non-detail queries
    k_cell: torch.Tensor  # own-window cell; -2 for non-detail keys
    q_pos: tuple  # detail coords; +FAR for non-detail queries
    k_pos: tuple  # detail coords; -FAR for non-detail keys
    q_wpos: tuple  # window coords of detail queries (aligned scope only); else +FAR
    k_wpos: tuple  # window coords of guidance keys; else -FAR
    axes: tuple  # the axes along which coordinates can differ


def fused_tables(rule: MaskRule, layout: Layout, q: Tokens, k: Tokens) -> Fused:
    def sees(seg):
        bits = torch.zeros_like(seg)
        t = (1 << TEXT) | (1 << GUIDANCE) | ((1 << DETAIL) if rule.text_sees_detail else 0)
        bits = torch.where(seg == TEXT, t, bits)
        g = (1 << GUIDANCE) | ((1 << TEXT) if rule.guidance_sees_text else 0)
        bits = torch.where(seg == GUIDANCE, g, bits)
        d = ((1 << TEXT) if rule.detail_sees_text else 0) | (
            (1 << GUIDANCE) if rule.scope == "all" else 0
        )
        return torch.where(seg == DETAIL, d, bits)

    def static(x):
        torch._dynamo.mark_static(x, 0)
        return x

    qd, kd = q.seg == DETAIL, k.seg == DETAIL
    kg = k.seg == GUIDANCE
    qa = qd if rule.scope == "aligned" else torch.zeros_like(qd)
    axes = tuple(a for a in range(3) if layout.grid[a] > 1) or (2,)
    return Fused(
        q_sees=static(sees(q.seg)),
        k_bit=static(torch.where(k.seg >= 0, 1 << k.seg.clamp(min=0), 0).to(torch.int32)),
        q_cell=static(torch.where(qd, q.cell, -1)),
        k_cell=static(torch.where(kd, k.cell, -2)),
        q_pos=tuple(static(torch.where(qd, p, FAR)) for p in q.pos),
        k_pos=tuple(static(torch.where(kd, p, -FAR)) for p in k.pos),
        q_wpos=tuple(static(torch.where(qa, p, FAR)) for p in q.wpos),
        k_wpos=tuple(static(torch.where(kg, p, -FAR)) for p in k.wpos),
        axes=axes,
    )


def fused(rule: MaskRule, layout: Layout, q: Tokens, k: Tokens, uniform: bool = False, terms=None):
    """`compose(rule, q, k)` in few integer ops per element: the OR of four terms,
      bits     (q_sees & k_bit) != 0       text / guidance / scope-all rules
      cell     q_cell == k_cell            own (or shifted) window
      near     |q_pos - k_pos| <= halo     on every axis
      aligned  |q_wpos - k_wpos| <= margin on every axis
    each false wherever its rule does not apply (role-specific sentinels).

    terms: keep only these (a BlockMask's partial blocks may need fewer: see
    blockmask.Blocks.terms; the kernel evaluates the mask on partial blocks only).
    By default terms whose rule is off are left out of the code, so each kind of rule
    compiles to the smallest kernel. uniform=True keeps every term (an unused halo or
    margin becomes -1, which nothing is within) on all three axes, so one compiled
    kernel serves every rule and layout."""
    t = fused_tables(rule, layout, q, k)
    radius = rule.halo if rule.neighbours == "halo" else None
    margin = rule.margin if rule.scope == "aligned" else None
    keep = {"bits", "cell", "near", "aligned"} if terms is None or uniform else set(terms)
    if uniform:
        dev = q.seg.device
        radius = torch.tensor(-1 if radius is None else radius, device=dev)
        margin = torch.tensor(-1 if margin is None else margin, device=dev)
        t.axes = (0, 1, 2)
    if "near" not in keep:
        radius = None
    if "aligned" not in keep:
        margin = None
    use_bits = "bits" in keep
    use_cell = "cell" in keep or not keep  # an all-false mask still needs one term

    def within(qp, kp, qi, ki, r):
        out = None
        for a in t.axes:
            near = (qp[a][qi] - kp[a][ki]).abs() <= r
            out = near if out is None else out & near
        return out

    def mod(b, h, qi, ki):
        out = None
        if use_bits:
            out = (t.q_sees[qi] & t.k_bit[ki]) != 0
        if use_cell:
            cell = t.q_cell[qi] == t.k_cell[ki]
            out = cell if out is None else out | cell
        if radius is not None:
            near = within(t.q_pos, t.k_pos, qi, ki, radius)
            out = near if out is None else out | near
        if margin is not None:
            al = within(t.q_wpos, t.k_wpos, qi, ki, margin)
            out = al if out is None else out | al
        return out

    name = "+".join(
        n
        for n, on in (
            ("bits", use_bits),
            ("cell", use_cell),
            ("near", radius is not None),
            ("aligned", margin is not None),
        )
        if on
    )
    return _named(mod, f"fused[{rule.name}; {name}]")
