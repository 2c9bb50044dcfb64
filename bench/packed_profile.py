"""Where the time of one packed attention call goes (GPU): the copies of q, k, v, each
flex call and the output gather, timed separately.

    python bench/packed_profile.py --preset wan-4k-81f [--block 128,64]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from attention import Plan  # noqa: E402
from attention.dispatch import packed_calls
from attention.flex import flex  # noqa: E402
from attention.packed import rows as _rows  # noqa: E402
from attention.presets import PRESETS  # noqa: E402
from attention.stats import block_stats  # noqa: E402
from bench.attention import structure_only, timed  # noqa: E402


def profile_call(i, c, q, k, v):
    qc = _rows(q, c.q_head, c.q_tail)
    kc = _rows(k, c.kv_head, c.kv_tail)
    vc = _rows(v, c.kv_head, c.kv_tail)
    copy_ms = timed(lambda: (_rows(q, c.q_head, c.q_tail), _rows(k, c.kv_head, c.kv_tail)))
    flex_ms = timed(lambda: flex(qc, kc, vc, c.block_mask))
    struct = structure_only(c.block_mask)
    struct_ms = timed(lambda: flex(qc, kc, vc, struct))
    s = block_stats(c.block_mask)
    tiles = s.full + s.partial
    print(
        f"call {i}: q {c.n_q:,} kv {c.n_kv:,}; tiles full {s.full} partial {s.partial}; "
        f"copy q+k {copy_ms:.2f} ms (v the same again); flex {flex_ms:.2f} ms = "
        f"{flex_ms * 1e3 / max(tiles, 1):.3f} us per tile (all heads); all tiles marked "
        f"full {struct_ms:.2f} ms",
        flush=True,
    )
    return 2 * copy_ms + flex_ms, flex(qc, kc, vc, c.block_mask)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="wan-4k-81f")
    p.add_argument("--block", default="128,128")
    args = p.parse_args()
    layout, rule, heads, head_dim = PRESETS[args.preset]
    block = tuple(int(x) for x in args.block.split(","))
    plan = Plan(layout, rule, block=block)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, heads, layout.n, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(3)
    )
    calls, dst = packed_calls(plan, "cuda", heads * head_dim)
    total = 0.0
    outs = []
    for i, c in enumerate(calls):
        ms, out = profile_call(i, c, q, k, v)
        total += ms
        outs.append(out)
    out = torch.cat(outs, 2)
    if dst is not None:
        total += timed(lambda: out.index_select(2, dst))
    print(f"sum of parts about {total:.2f} ms (the q copy is counted twice)")


if __name__ == "__main__":
    main()
