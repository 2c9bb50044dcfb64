"""One entry point for attention: `attend(q, k, v, plan)`.

plan None          -> dense SDPA (plain FLUX / Wan).
Plan(backend=...)  -> "flex": FlexAttention with the plan's BlockMask (default);
                      "reference": refimpl's dense masked softmax (small N only);
                      "dense": plain SDPA, mask ignored (the baseline benchmarks
                      compare to; it changes results, so it is never chosen silently).

The flex backend runs packed (attention/packed.py: queries and keys rebuilt so that
nearly every tile is full) unless the rule shifts windows or `packed=False`, which runs
it on the layout order with the analytic BlockMask of attention/blockmask.py. Both give
the reference's result; packing only changes how much masked work the kernel does.
"""

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

import refimpl

from .blockmask import BLOCK, block_structure, mask_block_mask, padded, to_block_mask
from .chunks import plan_chunks
from .flex import flex
from .layout import Layout
from .packed import build_part as build_packed
from .packed import exact_mask_mod, layout_extras, mask_mod, plan_parts, rows
from .rules import IMAGE_RULE, MaskRule, fused, tokens

BACKENDS = ("flex", "reference", "dense")
BUILDERS = ("analytic", "create_block_mask")


@dataclass(frozen=True)
class Plan:
    """A hierarchical attention plan: which tokens attend to which, and how to run it.

    Blocks call `plan.for_layer(i)`: with neighbours="shift", odd layers get the
    shifted windows."""

    layout: Layout
    rule: MaskRule = IMAGE_RULE
    backend: str = "flex"
    builder: str = "analytic"  # how the flex path gets its BlockMask
    shifted: bool = False
    block: tuple | None = None  # BlockMask (query, key) block sizes; None: see blocks
    index_budget: int = 1 << 30  # bytes of BlockMask indices before chunking
    chunk_tokens: int | None = None  # cap on the queries of a chunk (None: as needed)
    kernel_options: tuple = ()  # flex kernel options, as sorted (key, value) pairs
    uniform_kernel: bool = False  # one compiled mask for every rule (see rules.fused)
    packed: bool | None = None  # flex on packed sequences; None: when the rule allows

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.builder not in BUILDERS:
            raise ValueError(f"builder must be one of {BUILDERS}, got {self.builder!r}")
        if self.shifted and self.rule.neighbours != "shift":
            raise ValueError("shifted windows need neighbours='shift'")
        if self.packed and self.rule.neighbours == "shift":
            raise ValueError("packed=True cannot run shifted windows: use packed=False")
        if self.packed and self.rule.text_sees_detail:
            raise ValueError("packed=True cannot run text_sees_detail: use packed=False")

    @property
    def is_packed(self) -> bool:
        """None packs every rule the packed path runs: not shifted windows, not
        text_sees_detail (text would need every window's keys)."""
        if self.packed is None:
            return self.rule.neighbours != "shift" and not self.rule.text_sees_detail
        return self.packed

    @property
    def blocks(self) -> tuple[int, int]:
        """Block sizes, (128, 128) unless given. (128, 64) halves the masked work of
        video rules (most of their blocks are partial) and ran wan-4k-81f 22% faster
        forward (bench/results/attention.md), but torch's H100 backward kernel for bf16
        head_dim 128 needs key blocks of 128: use it for inference only."""
        return (BLOCK, BLOCK) if self.block is None else tuple(self.block)

    def for_layer(self, i: int) -> "Plan":
        return replace(self, shifted=self.rule.neighbours == "shift" and i % 2 == 1)


def reference_mask(plan: Plan) -> torch.Tensor:
    """refimpl's raster-order mask, permuted into layout order: (N, N) bool; the last
    few are kept, since a model calls it once per layer."""
    return _reference_mask(plan.layout, plan.rule, plan.shifted)


@functools.lru_cache(maxsize=4)
def _reference_mask(lay: Layout, r: MaskRule, shifted: bool) -> torch.Tensor:
    ratio = None if lay.ratio is None else (lay.ratio[0], max(lay.ratio[1:]))
    m = refimpl.raster_mask(
        lay.text,
        lay.grid,
        lay.window,
        ratio,
        scope=r.scope,
        margin=r.margin,
        neighbours=r.neighbours,
        halo=r.halo,
        guidance_sees_text=r.guidance_sees_text,
        detail_sees_text=r.detail_sees_text,
        text_sees_detail=r.text_sees_detail,
        shifted=shifted,
    )
    return m[lay.perm][:, lay.perm]


def build_part(plan: Plan, chunk, device):
    """(kv_index on device or None, BlockMask) for one chunk of a plan."""
    lay = plan.layout
    q_index = chunk.q.index(lay) if chunk.kv_index is not None else None
    qt = tokens(lay, q_index, plan.shifted, device)
    kt = tokens(lay, chunk.kv_index, plan.shifted, device)
    if plan.builder == "analytic":
        b = block_structure(
            lay,
            plan.rule,
            shifted=plan.shifted,
            q=chunk.q,
            kv=chunk.kv,
            block=plan.blocks,
            device=device,
        )
        mod = fused(plan.rule, lay, qt, kt, plan.uniform_kernel, b.terms)
        bm = to_block_mask(b, mod, pad=True)
    else:
        mod = fused(plan.rule, lay, qt, kt, plan.uniform_kernel)
        n_q, n_kv = padded(qt.n, plan.blocks), padded(kt.n, plan.blocks)
        bm = mask_block_mask(mod, n_q, n_kv, device, plan.blocks)
    kv_index = None if chunk.kv_index is None else chunk.kv_index.to(device)
    return kv_index, bm


_parts_cache: dict = {}


def flex_parts(plan: Plan, device, bhd: int):
    """[(chunk, kv_index, BlockMask)] for this plan on this device, cached per layout
    signature (layout, rule, layer parity, builder, blocks, device, chunking)."""
    chunks = plan_chunks(
        plan.layout, plan.rule, plan.shifted, bhd, plan.index_budget, plan.chunk_tokens, plan.blocks
    )
    key = (
        plan.layout,
        plan.rule,
        plan.shifted,
        plan.builder,
        plan.uniform_kernel,
        plan.blocks,
        str(device),
        tuple((c.q_start, c.q_end) for c in chunks),
    )
    if key not in _parts_cache:
        if len(_parts_cache) >= 16:
            _parts_cache.pop(next(iter(_parts_cache)))
        _parts_cache[key] = [(c, *build_part(plan, c, device)) for c in chunks]
    return _parts_cache[key]


def clear_cache():
    _parts_cache.clear()


@dataclass(eq=False)
class PackedCall:
    """One packed flex call, ready to run: which rows of q and k/v to copy (the first
    `head` slots are the identity and are sliced instead of copied)."""

    q_head: int
    q_tail: torch.Tensor  # layout positions of the packed queries after q_head
    kv_head: int
    kv_tail: torch.Tensor
    block_mask: object
    n_q: int
    n_kv: int


def packed_calls(plan: Plan, device, bhd: int):
    """([PackedCall], dst): the calls of a packed plan, and for each layout token its
    row in the concatenated outputs (None when that is the identity). Cached like
    flex_parts."""
    lay, rule, blocks = plan.layout, plan.rule, plan.blocks
    key = (
        "packed",
        lay,
        rule,
        plan.builder,
        plan.uniform_kernel,
        blocks,
        str(device),
        bhd,
        plan.index_budget,
        plan.chunk_tokens,
    )
    if key in _parts_cache:
        return _parts_cache[key]
    ex = layout_extras(lay, rule, blocks, device)
    calls, dst, offset = [], torch.empty(lay.n, dtype=torch.long, device=device), 0
    for prefix_q, w0, w1 in plan_parts(
        lay, rule, ex, blocks, bhd, plan.index_budget, plan.chunk_tokens
    ):
        p = build_packed(lay, rule, ex, blocks, prefix_q, w0, w1, device)
        n_q, n_kv = len(p.q.src), len(p.kv.src)
        if plan.builder == "analytic":
            bm = to_block_mask(p.blocks, mask_mod(lay, rule, p, device, plan.uniform_kernel))
        else:
            bm = mask_block_mask(exact_mask_mod(lay, rule, p, device), n_q, n_kv, device, blocks)
        calls.append(
            PackedCall(
                p.q.head, p.q.src[p.q.head :], p.kv.head, p.kv.src[p.kv.head :], bm, n_q, n_kv
            )
        )
        real = torch.nonzero(p.q.real).squeeze(1)
        dst[p.q.src[real]] = offset + real
        offset += n_q
    if offset == lay.n and bool((dst == torch.arange(lay.n, device=device)).all()):
        dst = None
    if len(_parts_cache) >= 16:
        _parts_cache.pop(next(iter(_parts_cache)))
    _parts_cache[key] = (calls, dst)
    return calls, dst


def attend(q, k, v, plan: Plan | None = None, scale: float | None = None):
    """Attention over (B, H, L, D) tensors in layout order."""
    if plan is None or plan.backend == "dense":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    n = plan.layout.n
    if q.shape[2] != n or k.shape[2] != n or v.shape[2] != n:
        raise ValueError(f"plan is for {n} tokens, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if plan.backend == "reference":
        return refimpl.attention(q, k, v, reference_mask(plan), scale).to(q.dtype)
    B, H, _, D = q.shape
    opts = dict(plan.kernel_options) or None
    if plan.is_packed:
        calls, dst = packed_calls(plan, q.device, B * H * D)
        outs = [
            flex(
                rows(q, c.q_head, c.q_tail),
                rows(k, c.kv_head, c.kv_tail),
                rows(v, c.kv_head, c.kv_tail),
                c.block_mask,
                scale,
                opts,
            )
            for c in calls
        ]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out if dst is None else rows(out, 0, dst)
    outs = []
    for c, kv_index, bm in flex_parts(plan, q.device, B * H * D):
        qc = q[:, :, c.q_start : c.q_end]
        kc = k if kv_index is None else k.index_select(2, kv_index)
        vc = v if kv_index is None else v.index_select(2, kv_index)
        outs.append(flex(qc, kc, vc, bm, scale, opts))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
