"""Show a layout's attention: token counts, block density, FLOPs, what the packed
path runs, and a picture.

    python -m attention.show --preset flux-4k
    python -m attention.show --grid 64,64 --window 16,16 --text 512 --ratio 4 --halo 1

The picture has one pixel per 128x128 block of the attention matrix (rows: queries,
columns: keys, in layout order [text | guidance | detail]): white = full block (no
masking needed), grey = partial block (mask evaluated per element), black = skipped.
Large masks are shrunk so the longer side is at most --max-px; a shrunk pixel is white
or black only when all its blocks are, grey otherwise.
"""

import argparse
import sys
import time

import numpy as np
import torch

from .blockmask import analytic_block_mask
from .layout import Layout
from .packed import build_part, layout_extras, plan_parts
from .png import write_png
from .presets import PRESETS
from .rules import IMAGE_RULE, MaskRule, fused, tokens
from .stats import allowed_pairs, block_stats


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(","))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m attention.show",
        description="Token counts, block density, attention FLOPs and a picture of the "
        "block mask of a hierarchical attention layout.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named layout and rule")
    g = p.add_argument_group("free-form layout (overrides the preset's values)")
    g.add_argument("--grid", type=_ints, help="detail token grid: W | H,W | T,H,W")
    g.add_argument("--window", type=_ints, help="window (cube) size, same rank as --grid")
    g.add_argument("--text", type=int, help="text tokens (default 0)")
    g.add_argument("--ratio", type=_ints, help="guidance ratio: rs | rt,rs (omit: no guidance)")
    g.add_argument("--no-guidance", action="store_true", help="drop the guidance segment")
    r = p.add_argument_group("mask rule (overrides the preset's values)")
    r.add_argument("--scope", choices=["all", "aligned"], help="guidance seen by detail")
    r.add_argument("--margin", type=int, help="aligned(m): neighbour windows of guidance")
    r.add_argument("--neighbours", choices=["none", "halo", "shift"])
    r.add_argument("--halo", type=int, help="halo(k) radius in tokens")
    r.add_argument("--guidance-sees-text", choices=["yes", "no"])
    r.add_argument("--detail-sees-text", choices=["yes", "no"])
    r.add_argument("--text-sees-detail", choices=["yes", "no"], help="plain FLUX's text rows")
    r.add_argument("--shifted", action="store_true", help="show an odd (shifted) layer")
    p.add_argument("--heads", type=int, help="heads, for FLOPs (preset value or 24)")
    p.add_argument("--head-dim", type=int, help="head dimension, for FLOPs (default 128)")
    p.add_argument("--png", help="picture path (default blockmask-<preset or custom>.png)")
    p.add_argument("--no-png", action="store_true", help="write no picture")
    p.add_argument("--max-px", type=int, default=2048, help="longest picture side")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to build the BlockMask (default: cuda when available)",
    )
    args = p.parse_args(argv)
    if args.preset is None and (args.grid is None or args.window is None):
        p.error("give --preset, or --grid and --window")
    return args


def resolve(args):
    """(name, layout, rule, heads, head_dim) from a preset and overrides."""
    if args.preset:
        layout, rule, heads, head_dim = PRESETS[args.preset]
        name = args.preset
    else:
        layout, rule, heads, head_dim = None, IMAGE_RULE, 24, 128
        name = "custom"
    free = (args.grid, args.window, args.text, args.ratio)
    if layout is None or any(x is not None for x in free) or args.no_guidance:
        if layout is not None:
            name += "-custom"
        ratio = (
            args.ratio
            if args.ratio is not None
            else (
                None
                if layout is None
                else (layout.ratio[0], max(layout.ratio[1:]))
                if layout.ratio
                else None
            )
        )
        if ratio is not None and len(ratio) == 1:
            ratio = ratio[0]
        layout = Layout(
            grid=args.grid or layout.grid,
            window=args.window or layout.window,
            text=args.text if args.text is not None else (layout.text if layout else 0),
            ratio=None if args.no_guidance else ratio,
        )
    yes = {"yes": True, "no": False}
    overrides = {
        k: v
        for k, v in dict(
            scope=args.scope,
            margin=args.margin,
            neighbours=args.neighbours,
            halo=args.halo,
            guidance_sees_text=yes.get(args.guidance_sees_text),
            detail_sees_text=yes.get(args.detail_sees_text),
            text_sees_detail=yes.get(args.text_sees_detail),
        ).items()
        if v is not None
    }
    if overrides:
        rule = MaskRule(**{**rule.__dict__, **overrides})
    return name, layout, rule, args.heads or heads, args.head_dim or head_dim


def _flop(x: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} FLOP"


def picture(bm, max_px: int) -> np.ndarray:
    """(rows, cols) uint8: 255 full, 128 partial, 0 empty (shrunk to max_px)."""
    nq, nk = bm.kv_indices.shape[-2:]
    state = np.zeros((nq, nk), dtype=np.uint8)

    def mark(num, idx, value):
        num, idx = num[0, 0].cpu(), idx[0, 0].cpu()
        rows = torch.repeat_interleave(torch.arange(nq), num.long())
        cols = torch.cat([idx[r, : int(n)] for r, n in enumerate(num)]) if len(rows) else rows
        state[rows.numpy(), cols.long().numpy()] = value

    mark(bm.kv_num_blocks, bm.kv_indices, 128)
    if bm.full_kv_num_blocks is not None:
        mark(bm.full_kv_num_blocks, bm.full_kv_indices, 255)
    f = max(1, -(-max(nq, nk) // max_px))
    if f == 1:  # small masks are magnified to be visible
        m = max(1, 256 // max(nq, nk))
        return state.repeat(m, 0).repeat(m, 1)
    h, w = -(-nq // f), -(-nk // f)
    padded = np.zeros((h * f, w * f), dtype=np.uint8)
    padded[:nq, :nk] = state
    tiles = padded.reshape(h, f, w, f).transpose(0, 2, 1, 3).reshape(h, w, f * f)
    out = np.full((h, w), 128, dtype=np.uint8)
    out[(tiles == 255).all(-1)] = 255
    out[(tiles == 0).all(-1)] = 0
    return out


def packed_line(layout, rule, heads, head_dim, unit, dense, device):
    """What `attend` runs: the packed calls (attention/packed.py) for batch 1."""
    block = (128, 128)
    ex = layout_extras(layout, rule, block, device)
    specs = plan_parts(layout, rule, ex, block, heads * head_dim, 1 << 30)
    n_q = n_kv = full = partial = 0
    for spec in specs:
        b = build_part(layout, rule, ex, block, *spec, device).blocks
        n_q, n_kv = n_q + b.lengths[0], n_kv + b.lengths[1]
        full, partial = full + int(b.full.sum()), partial + int((~b.full).sum())
    computed = unit * (full + partial) * block[0] * block[1]
    versus = (
        f"{dense / computed:.1f}x less than dense"
        if computed <= dense
        else "more than dense: small windows padded to whole blocks"
    )
    print(
        f"packed    what attend runs: {len(specs)} call(s), {n_q:,} query / {n_kv:,} key "
        f"slots; tiles full {full:,}, partial {partial:,}; {_flop(computed)} ({versus})"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    name, layout, rule, heads, head_dim = resolve(args)
    if args.shifted and rule.neighbours != "shift":
        print("--shifted needs --neighbours shift", file=sys.stderr)
        return 2
    n = layout.n
    print(f"layout    {layout.describe()}")
    print(f"rule      {rule.name}{'  [shifted layer]' if args.shifted else ''}")
    print(
        f"tokens    text {layout.n_text:,} | guidance {layout.n_guidance:,} | "
        f"detail {layout.n_detail:,} | total {n:,}"
    )
    tok = tokens(layout, shifted=args.shifted)
    mod = fused(rule, layout, tok, tok)
    t0 = time.perf_counter()
    bm = analytic_block_mask(layout, rule, mod, shifted=args.shifted, device=args.device)
    if args.device != "cpu":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    s = block_stats(bm)
    pairs = allowed_pairs(layout, rule, args.shifted)
    print(
        f"blocks    {s.n_q_blocks:,} x {s.n_kv_blocks:,} of 128x128: non-empty {s.nonempty:,} "
        f"= {100 * s.density:.2f}% (full {s.full:,}, partial {s.partial:,}); "
        f"built analytically in {ms:.0f} ms on {args.device}"
    )
    print(f"pairs     allowed {pairs:,} of {n * n:,} = {100 * pairs / n**2:.2f}% (element density)")
    unit = 4 * head_dim * heads  # FLOPs per (query, key) pair: QK^T and PV, 2 each
    dense, computed, useful = unit * n * n, unit * s.nonempty * 128 * 128, unit * pairs
    print(
        f"FLOPs     one attention call, {heads} heads x {head_dim}: dense {_flop(dense)}; "
        f"block-sparse {_flop(computed)} ({dense / computed:.1f}x less); "
        f"allowed pairs alone {_flop(useful)}"
    )
    if rule.neighbours != "shift":
        packed_line(layout, rule, heads, head_dim, unit, dense, args.device)
    if not args.no_png:
        path = args.png or f"blockmask-{name}.png"
        img = picture(bm, args.max_px)
        write_png(path, img)
        ratio = img.shape[0] / s.n_q_blocks
        scale = (
            f"{ratio:.0f}x{ratio:.0f} px per block"
            if ratio >= 1
            else f"1 px per {1 / ratio:.0f}x{1 / ratio:.0f} blocks"
        )
        print(
            f"picture   {path}: {img.shape[1]}x{img.shape[0]} px, {scale}; "
            "white full, grey partial, black skipped"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
