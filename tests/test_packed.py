"""The packed sequences (attention/packed.py): the rule they state, their analytic
BlockMask and the kernel's reduced mask."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

from attention import IMAGE_RULE, VIDEO_RULE, Layout, MaskRule, Plan
from attention.blockmask import to_block_mask
from attention.dispatch import reference_mask
from attention.packed import (
    K_RING,
    build_part,
    exact_mask_mod,
    layout_extras,
    mask_mod,
    part_sizes,
    plan_parts,
)
from tests.strategies import layouts, rules
from tests.test_blockmask import assert_same

BLOCKS = st.sampled_from([(128, 128), (128, 64), (32, 16), (16, 32), (8, 8)])


@st.composite
def packed_plans(draw, max_tokens=420):
    """(layout, rule, block, max_q): rules without shifted windows, which do not pack."""
    layout = draw(layouts(max_tokens=max_tokens))
    rule = draw(rules().filter(lambda r: r.neighbours != "shift" and not r.text_sees_detail))
    block = draw(BLOCKS)
    max_q = draw(st.sampled_from([None, 1, 40, 200]))
    if max_q is not None:  # a chunk holds at least one window
        max_q = max(max_q, int(layout.detail_windows.volume.max()))
    return layout, rule, block, max_q


def parts_of(layout, rule, block, max_q):
    ex = layout_extras(layout, rule, block, "cpu")
    specs = plan_parts(layout, rule, ex, block, 1, 1 << 40, max_q)
    return [build_part(layout, rule, ex, block, *s, "cpu") for s in specs], specs, ex


def evaluate(mod, n_q, n_kv):
    z = torch.zeros((), dtype=torch.long)
    return mod(z, z, torch.arange(n_q)[:, None], torch.arange(n_kv)[None, :])


@given(packed_plans())
@settings(max_examples=80)
def test_packed_parts_state_the_rule_exactly_once(plan):
    """Mapped back to layout positions, the packed calls allow exactly the reference's
    pairs, each once (a key copied twice for one query would count twice in softmax),
    and every query is computed in exactly one call."""
    layout, rule, block, max_q = plan
    parts, _, _ = parts_of(layout, rule, block, max_q)
    ref = reference_mask(Plan(layout, rule))
    pairs = torch.zeros(layout.n, layout.n, dtype=torch.long)
    rows = torch.zeros(layout.n, dtype=torch.long)
    for p in parts:
        m = evaluate(exact_mask_mod(layout, rule, p, "cpu"), len(p.q.src), len(p.kv.src))
        m &= p.q.real[:, None]
        qi, ki = torch.nonzero(m, as_tuple=True)
        pairs.index_put_((p.q.src[qi], p.kv.src[ki]), torch.tensor(1), accumulate=True)
        rows.index_add_(0, p.q.src[p.q.real], torch.ones(int(p.q.real.sum()), dtype=torch.long))
        assert not (m & ~p.kv.real[None]).any()  # padding keys never allowed
    assert torch.equal(rows, torch.ones_like(rows))
    assert pairs.max() <= 1
    assert torch.equal(pairs.bool(), ref)


@given(packed_plans())
@settings(max_examples=80)
def test_packed_analytic_equals_create_block_mask(plan):
    layout, rule, block, max_q = plan
    parts, _, _ = parts_of(layout, rule, block, max_q)
    for p in parts:
        mod = exact_mask_mod(layout, rule, p, "cpu")
        n_q, n_kv = len(p.q.src), len(p.kv.src)
        ref = create_block_mask(mod, None, None, n_q, n_kv, device="cpu", BLOCK_SIZE=block)
        assert_same(to_block_mask(p.blocks, mod), ref)


@given(packed_plans())
@settings(max_examples=80)
def test_kernel_mask_is_exact_on_partial_tiles(plan):
    """The kernel evaluates `plain[k] | near(q, k)` on partial tiles only."""
    layout, rule, block, max_q = plan
    parts, _, _ = parts_of(layout, rule, block, max_q)
    bq, bk = block
    for p in parts:
        n_q, n_kv = len(p.q.src), len(p.kv.src)
        exact = evaluate(exact_mask_mod(layout, rule, p, "cpu"), n_q, n_kv)
        for uniform in (False, True):
            mod = mask_mod(layout, rule, p, "cpu", uniform)
            kernel = evaluate(mod, n_q, n_kv).expand(n_q, n_kv)
            b = p.blocks
            for qb, kb in zip(b.q_blk[~b.full].tolist(), b.k_blk[~b.full].tolist()):
                tile = (slice(qb * bq, (qb + 1) * bq), slice(kb * bk, (kb + 1) * bk))
                assert torch.equal(kernel[tile], exact[tile])


@given(packed_plans(), st.integers(64, 4096), st.integers(16, 4096))
@settings(max_examples=60)
def test_parts_respect_the_limits(plan, max_len, budget):
    """Every part keeps B*H*L*D below 2^31 (here B*H*D = 2^31 / max_len), its BlockMask
    indices within the budget and its detail queries within the cap; or planning says
    clearly that it cannot."""
    layout, rule, block, max_q = plan
    ex = layout_extras(layout, rule, block, "cpu")
    bhd = 2**31 // max_len
    try:
        specs = plan_parts(layout, rule, ex, block, bhd, budget, max_q)
    except ValueError as e:
        assert "exceed" in str(e)
        return
    covered = []
    for prefix_q, w0, w1 in specs:
        lq, lk, nd = part_sizes(layout, rule, ex, block, prefix_q, w0, w1)
        assert bhd * max(lq, lk) < 2**31
        assert 16 * (lq // block[0]) * (lk // block[1]) <= budget
        assert max_q is None or w0 == w1 or nd <= max_q
        covered += list(range(w0, w1))
    assert covered == list(range(layout.n_windows))


def test_flux_4k_packs_without_copies_of_queries():
    """At the flux-4k preset every segment fills whole blocks: queries are the layout
    itself, the keys are the layout plus one 128-key block per window holding the rings
    of both its query blocks (36 keys each)."""
    from attention.presets import PRESETS

    layout, rule, _, _ = PRESETS["flux-4k"]
    ex = layout_extras(layout, rule, (128, 128), "cpu")
    p = build_part(layout, rule, ex, (128, 128), True, 0, layout.n_windows, "cpu")
    assert p.q.head == len(p.q.src) == layout.n
    assert p.kv.head == layout.n
    assert len(p.kv.src) == layout.n + 128 * layout.n_windows
    g = int(ex.first[17])  # window (1, 1): interior
    assert ex.r_count[g : g + 2].tolist() == [36, 36] and p.shared_rings
    ring = p.blocks.full == 0
    assert int(ring.sum()) == layout.n_detail // 128  # one partial tile per query block
    assert bool((p.kv.kind[p.blocks.k_blk[ring] * 128] == K_RING).all())


def test_video_ring_of_a_cube():
    """A (2, 4, 4) query block in the middle of a (4, 4, 4) cube of a 12^3 grid with
    halo 1: the ring is the block's box grown by one, minus the cube."""
    layout = Layout(grid=(12, 12, 12), window=(4, 4, 4))
    rule = MaskRule(neighbours="halo", halo=1)
    ex = layout_extras(layout, rule, (32, 32), "cpu")
    centre = 13  # window (1, 1, 1)
    g = int(ex.first[centre])  # its first query block: frames 4-5 of the cube
    grown = 4 * 6 * 6  # frames 3..6, rows and columns 3..8
    inside = 3 * 4 * 4  # frames 4..6 of the cube
    assert int(ex.r_count[g]) == grown - inside


def test_packed_needs_unshifted_windows():
    lay = Layout(grid=(8, 8), window=(4, 4))
    with pytest.raises(ValueError, match="packed=True cannot run shifted"):
        Plan(lay, MaskRule(neighbours="shift"), packed=True)
    assert not Plan(lay, MaskRule(neighbours="shift")).is_packed
    assert Plan(lay, VIDEO_RULE).is_packed and not Plan(lay, IMAGE_RULE, packed=False).is_packed
    plain = MaskRule(text_sees_detail=True)
    assert not Plan(lay, plain).is_packed
    with pytest.raises(ValueError, match="packed=True cannot run text_sees_detail"):
        Plan(lay, plain, packed=True)


@pytest.mark.parametrize(
    "dtype, d", [(torch.bfloat16, 16), (torch.float32, 16), (torch.float32, 3)]
)
def test_rows_copy_and_gradient(dtype, d):
    """rows() copies 8-byte words where it can; values equal plain indexing, and
    gradients (summed over repeated rows in fp32, rounded once) equal plain indexing's
    computed in fp32, to one bf16 rounding."""
    from attention.packed import rows

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, d, generator=g).to(dtype)
    tail = torch.tensor([4, 9, 4, 0, 7])
    for head in (0, 6):
        want = torch.cat([x[:, :, :head], x[:, :, tail]], 2)
        assert torch.equal(rows(x, head, tail), want)
        a = x.clone().requires_grad_()
        b = x.clone().float().requires_grad_()
        up = torch.randn(want.shape, generator=g).to(dtype)
        rows(a, head, tail).backward(up)
        torch.cat([b[:, :, :head], b[:, :, tail]], 2).backward(up.float())
        rtol = 2**-8 if dtype == torch.bfloat16 else 1e-6  # one rounding of the sum
        torch.testing.assert_close(a.grad.float(), b.grad, atol=1e-6, rtol=rtol)
    assert rows(x, 10, tail[:0]) is x
