"""Attention benchmark (GPU): dense SDPA against FlexAttention with the hierarchical mask.

    python bench/attention.py                       # flux-4k, flux-8k, wan-4k-81f
    python bench/attention.py --presets flux-4k --variants

For each preset (bf16, head_dim 128, batch 1, the preset's heads and the
default rule of its method) it measures one forward attention call:
  dense_ms       SDPA, default backend (cuDNN / flash / efficient, torch's choice)
  flash_ms       SDPA, FlashAttention-2 backend
  flex_ms        `attend(q, k, v, Plan(layout, rule))`: flex on packed sequences
                 (attention/packed.py), including the copies of q, k, v and the output
  flex_layout_ms compiled flex_attention on the layout order with the analytic BlockMask
                 (Plan(packed=False))
  flex_full_ms   compiled flex_attention with every block full (no mask, no skipping)
  struct_ms      the layout-order BlockMask's blocks, all marked full: skipping without
                 per-element masking (shows what mask evaluation costs)
  build_ms_analytic / build_ms_create_block_mask   layout-order BlockMask construction,
                 both ways; the two BlockMasks are compared block for block.
  build_ms_packed  the packed calls (extras, sequences, BlockMasks), from scratch
density = non-empty 128x128 blocks of the layout order / all blocks; efficiency =
flex_full_ms * density / flex_ms (how well the sparsity turns into time);
element efficiency = the same with the allowed-pair density; speedup = dense_ms / flex_ms.
Times are medians over repeated calls after warm-up, with CUDA events.
Writes bench/results/attention.json and attention.md.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from attention import (
    Plan,  # noqa: E402
    attend,  # noqa: E402
)
from attention.blockmask import block_structure, mask_block_mask, padded, to_block_mask  # noqa: E402
from attention.dispatch import clear_cache, flex_parts, packed_calls  # noqa: E402
from attention.flex import flex  # noqa: E402
from attention.presets import PRESETS  # noqa: E402
from attention.rules import MaskRule, compose, fused, tokens  # noqa: E402
from attention.stats import allowed_pairs, block_stats  # noqa: E402


def timed(fn, min_reps=3, budget_s=2.0):
    """Median milliseconds of fn() over repeated calls, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < 50):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def host_timed(fn, reps=5):
    """Median wall milliseconds (synchronised) of a host-driven function."""
    out, times = None, []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], out


def full_blocks(dense, block, lengths):
    """BlockMask whose non-empty blocks (dense (rows, cols) bool) are all full."""
    num = dense.sum(-1, dtype=torch.int32)[None, None]
    idx = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True)
    idx = idx.to(torch.int32)[None, None].contiguous()
    zero = torch.zeros_like(num)
    return BlockMask.from_kv_blocks(
        zero, torch.zeros_like(idx), num, idx, BLOCK_SIZE=block, seq_lengths=lengths
    )


def all_full(bm):
    """Every block full: flex with no masking and no skipping."""
    dense = torch.ones(bm.kv_indices.shape[-2:], dtype=torch.bool, device=bm.kv_indices.device)
    return full_blocks(dense, bm.BLOCK_SIZE, bm.seq_lengths)


def structure_only(bm):
    """The same non-empty blocks, all marked full."""
    return full_blocks(bm.to_dense()[0, 0].bool(), bm.BLOCK_SIZE, bm.seq_lengths)


def same_blocks(a, b) -> bool:
    if not torch.equal(a.to_dense(), b.to_dense()):
        return False
    fa = BlockMask.from_kv_blocks(a.full_kv_num_blocks, a.full_kv_indices).to_dense()
    fb = BlockMask.from_kv_blocks(b.full_kv_num_blocks, b.full_kv_indices).to_dense()
    return torch.equal(fa, fb)


def bench_preset(name, args, dev):
    layout, rule, heads, head_dim = PRESETS[name]
    n = layout.n
    print(
        f"\n== {name}: {layout.describe()}\n   rule: {rule.name}; {heads} heads x {head_dim}",
        flush=True,
    )
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (
        torch.randn(1, heads, n, head_dim, device=dev, dtype=torch.bfloat16, generator=g)
        for _ in range(3)
    )
    dense_flop = 4 * n * n * head_dim * heads
    row = dict(preset=name, tokens=n, heads=heads, head_dim=head_dim, rule=rule.name)

    row["dense_ms"] = timed(lambda: F.scaled_dot_product_attention(q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        row["flash_ms"] = timed(lambda: F.scaled_dot_product_attention(q, k, v))
    print(f"   dense SDPA {row['dense_ms']:.2f} ms, flash {row['flash_ms']:.2f} ms", flush=True)

    block = args.block or Plan(layout, rule).blocks  # what attend() uses
    tokens(layout, device=dev)  # first call: host tables and imports
    row["tables_ms"], tok = host_timed(lambda: tokens(layout, device=dev), reps=3)

    def build():  # what attend() does for an unchunked plan (see dispatch.build_part)
        b = block_structure(layout, rule, block=block, device=dev)
        return to_block_mask(b, fused(rule, layout, tok, tok, terms=b.terms), pad=True), b

    build()  # first call: layout tables on the host are cached
    row["build_ms_analytic"], (bm, structure) = host_timed(build)
    s = block_stats(bm)
    row["block"] = list(block)
    row["density"] = s.density
    row["element_density"] = allowed_pairs(layout, rule) / (n * n)
    row["blocks_full"], row["blocks_partial"] = s.full, s.partial
    row["mask_terms"] = list(structure.terms)
    print(
        f"   analytic BlockMask {row['build_ms_analytic']:.1f} ms (+ lookup tables "
        f"{row['tables_ms']:.0f} ms): blocks {block}, density {s.density:.4f} "
        f"(full {s.full}, partial {s.partial}), mask terms {structure.terms}",
        flush=True,
    )

    row["flex_layout_ms"] = timed(lambda: flex(q, k, v, bm))
    plan = Plan(layout, rule, block=block)
    bhd = heads * head_dim

    def build_packed():
        clear_cache()
        return packed_calls(plan, dev, bhd)

    build_packed()  # first call: host tables
    row["build_ms_packed"], (calls, _) = host_timed(build_packed)
    stats = [block_stats(c.block_mask) for c in calls]
    row["packed_calls"] = len(calls)
    row["packed_q"] = sum(c.n_q for c in calls)
    row["packed_kv"] = sum(c.n_kv for c in calls)
    row["packed_tiles_full"] = sum(x.full for x in stats)
    row["packed_tiles_partial"] = sum(x.partial for x in stats)
    row["flex_ms"] = timed(lambda: attend(q, k, v, plan))
    print(
        f"   packed: {len(calls)} call(s), {row['packed_q']:,} query / {row['packed_kv']:,} "
        f"key slots, tiles full {row['packed_tiles_full']}, partial "
        f"{row['packed_tiles_partial']}; built in {row['build_ms_packed']:.1f} ms",
        flush=True,
    )
    if n < 300_000 and not args.skip_create_block_mask:  # packed BlockMasks both ways
        ref_calls, _ = packed_calls(
            Plan(layout, rule, block=block, builder="create_block_mask"), dev, bhd
        )
        row["packed_blockmasks_equal"] = all(
            same_blocks(a.block_mask, b.block_mask) for a, b in zip(calls, ref_calls)
        )
        print(
            f"   packed BlockMasks equal to create_block_mask's: {row['packed_blockmasks_equal']}",
            flush=True,
        )
    out, ref_out = attend(q, k, v, plan), flex(q, k, v, bm)
    row["packed_vs_layout_max_abs"] = (out.float() - ref_out.float()).abs().max().item()
    full = all_full(bm)
    row["flex_full_ms"] = timed(lambda: flex(q, k, v, full), budget_s=4.0)
    struct = structure_only(bm)
    row["struct_ms"] = timed(lambda: flex(q, k, v, struct))
    print(
        f"   flex packed {row['flex_ms']:.2f} ms, layout order {row['flex_layout_ms']:.2f} ms, "
        f"all-full {row['flex_full_ms']:.2f} ms, structure-only {row['struct_ms']:.2f} ms; "
        f"packed vs layout order max |diff| {row['packed_vs_layout_max_abs']:.2e}",
        flush=True,
    )

    if not args.skip_create_block_mask:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        mod = fused(rule, layout, tok, tok)
        ref = mask_block_mask(mod, padded(n, block), padded(n, block), dev, block)
        torch.cuda.synchronize()
        row["build_ms_create_block_mask"] = (time.perf_counter() - t0) * 1e3
        row["blockmasks_equal"] = same_blocks(bm, ref)
        print(
            f"   create_block_mask {row['build_ms_create_block_mask']:.0f} ms; "
            f"equal to analytic: {row['blockmasks_equal']}",
            flush=True,
        )
    else:
        row["build_ms_create_block_mask"] = None

    row["speedup"] = row["dense_ms"] / row["flex_ms"]
    row["speedup_vs_flash"] = row["flash_ms"] / row["flex_ms"]
    row["speedup_layout"] = row["dense_ms"] / row["flex_layout_ms"]
    row["efficiency"] = row["flex_full_ms"] * row["density"] / row["flex_ms"]
    row["efficiency_layout"] = row["flex_full_ms"] * row["density"] / row["flex_layout_ms"]
    row["efficiency_element"] = row["flex_full_ms"] * row["element_density"] / row["flex_ms"]
    row["efficiency_structure"] = row["flex_full_ms"] * row["density"] / row["struct_ms"]
    row["dense_tflops"] = dense_flop / row["dense_ms"] / 1e9
    row["flash_tflops"] = dense_flop / row["flash_ms"] / 1e9
    row["flex_full_tflops"] = dense_flop / row["flex_full_ms"] / 1e9
    block_flop = 4 * s.nonempty * block[0] * block[1] * head_dim * heads
    row["flex_block_tflops"] = block_flop / row["flex_layout_ms"] / 1e9
    row["device"] = torch.cuda.get_device_name()
    print(
        f"   speedup {row['speedup']:.1f}x, efficiency {row['efficiency']:.3f} "
        f"(element {row['efficiency_element']:.3f}; layout order {row['speedup_layout']:.1f}x, "
        f"{row['efficiency_layout']:.3f}; structure only {row['efficiency_structure']:.3f})",
        flush=True,
    )

    variants = []
    if args.variants:

        def variant(label, r=rule, blk=block, make="fused", opts=None):
            if make == "compose":
                b = block_structure(layout, r, block=blk, device=dev)
                m = to_block_mask(b, compose(r, tok, tok), pad=True)
            else:
                p = Plan(layout, r, block=blk, uniform_kernel=make == "uniform", packed=False)
                ((_, _, m),) = flex_parts(p, dev, heads * head_dim)
            ms = timed(lambda: flex(q, k, v, m, kernel_options=opts))
            st = block_stats(m)
            full_ms = row["flex_full_ms"]
            variants.append(
                dict(
                    preset=name,
                    variant=label,
                    block=list(blk),
                    flex_ms=ms,
                    density=st.density,
                    efficiency=full_ms * st.density / ms,
                    speedup=row["dense_ms"] / ms,
                )
            )
            print(f"   variant {label}: {ms:.2f} ms, density {st.density:.4f}", flush=True)

        if "blocks" in args.variants:
            for other in ((128, 128), (128, 64)):  # the other one
                if other != tuple(block):
                    variant(f"blocks {other}", blk=other)
        if "composed" in args.variants:
            variant("composed mask_mod", make="compose")
        if "uniform" in args.variants:
            variant("uniform fused kernel", make="uniform")
        if "none" in args.variants and rule.neighbours == "halo":
            variant("neighbours none", r=MaskRule(**{**rule.__dict__, "neighbours": "none"}))
        for opts in args.kernel_options:
            variant(f"kernel_options {opts}", opts=opts)
    return row, variants


def write_results(rows, variants, args, out_dir):
    meta = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        date=datetime.date.today().isoformat(),
        command=" ".join(["python"] + sys.argv),
        python=platform.python_version(),
    )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "attention.json"), "w") as f:
        json.dump([{**r, **{k: meta[k] for k in ("torch", "date")}} for r in rows], f, indent=1)
    if variants:
        with open(os.path.join(out_dir, "attention-variants.json"), "w") as f:
            json.dump(variants, f, indent=1)
    lines = [
        "# Attention benchmark",
        "",
        f"- device: {meta['device']}",
        f"- torch: {meta['torch']}",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        "",
        "One forward attention call, bf16, batch 1, head_dim 128. Times are medians (CUDA "
        "events). flex = `attend` (packed, copies included); layout = flex on the layout "
        "order. density = non-empty 128x128 blocks of the layout order / all blocks; "
        "efficiency = flex_full_ms x density / flex_ms; element eff. uses the allowed-pair "
        "density instead; speedup = dense_ms / flex_ms.",
        "",
        "| preset | tokens | dense ms (TFLOP/s) | flash ms (TFLOP/s) | flex ms | speedup | "
        "density | efficiency | element density | element eff. | flex all-full ms (TFLOP/s) | "
        "layout ms (speedup, eff.) | structure-only ms (eff.) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['tokens']:,} | {r['dense_ms']:.2f} ({r['dense_tflops']:.0f}) | "
            f"{r['flash_ms']:.2f} ({r['flash_tflops']:.0f}) | {r['flex_ms']:.2f} | "
            f"{r['speedup']:.1f}x | {r['density']:.4f} | {r['efficiency']:.3f} | "
            f"{r['element_density']:.5f} | {r['efficiency_element']:.3f} | "
            f"{r['flex_full_ms']:.2f} ({r['flex_full_tflops']:.0f}) | "
            f"{r['flex_layout_ms']:.2f} ({r['speedup_layout']:.1f}x, "
            f"{r['efficiency_layout']:.3f}) | "
            f"{r['struct_ms']:.2f} ({r['efficiency_structure']:.3f}) |"
        )
    lines += [
        "",
        "| preset | packed calls | query / key slots | tiles full / partial | build packed ms | "
        "build analytic ms (layout) | build create_block_mask ms | equal (layout, packed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cbm = r.get("build_ms_create_block_mask")
        lines.append(
            f"| {r['preset']} | {r['packed_calls']} | {r['packed_q']:,} / {r['packed_kv']:,} | "
            f"{r['packed_tiles_full']} / {r['packed_tiles_partial']} | "
            f"{r['build_ms_packed']:.1f} | {r['build_ms_analytic']:.1f} | "
            f"{'-' if cbm is None else f'{cbm:.0f}'} | {r.get('blockmasks_equal', '-')}, "
            f"{r.get('packed_blockmasks_equal', '-')} |"
        )
    if variants:
        lines += [
            "",
            "Variants (same inputs):",
            "",
            "| preset | variant | flex ms | density | efficiency | speedup |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {v['preset']} | {v['variant']} | {v['flex_ms']:.2f} | {v['density']:.4f} "
            f"| {v['efficiency']:.3f} | {v['speedup']:.1f}x |"
            for v in variants
        ]
    with open(os.path.join(out_dir, "attention.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="flux-4k,flux-8k,wan-4k-81f")
    p.add_argument(
        "--variants",
        default="",
        help="also time variants, comma-separated: blocks, composed, uniform, none",
    )
    p.add_argument(
        "--kernel-options",
        default="[]",
        help='JSON list of flex kernel_options dicts to time as variants, e.g. [{"num_stages": 2}]',
    )
    p.add_argument(
        "--block", default=None, help="BlockMask (query,key) block sizes (default: Plan's)"
    )
    p.add_argument(
        "--skip-create-block-mask",
        action="store_true",
        help="skip the slow create_block_mask build (about a minute at wan-4k)",
    )
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    args.block = tuple(int(x) for x in args.block.split(",")) if args.block else None
    args.kernel_options = json.loads(args.kernel_options)
    args.variants = args.variants.split(",") if args.variants or args.kernel_options else []
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py needs a CUDA GPU")
    rows, variants = [], []
    for name in args.presets.split(","):
        r, v = bench_preset(name, args, "cuda")
        rows.append(r)
        variants += v
        torch.cuda.empty_cache()
    write_results(rows, variants, args, args.out)


if __name__ == "__main__":
    main()
