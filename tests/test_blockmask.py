"""The analytic BlockMask against torch's create_block_mask."""

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

from attention import Plan
from attention.blockmask import Side, analytic_block_mask
from attention.chunks import plan_chunks
from attention.rules import fused, tokens
from tests.strategies import plans


def dense(num, idx):
    """(rows, cols) bool from a BlockMask (num_blocks, indices) pair."""
    num, idx = num[0, 0], idx[0, 0]
    out = torch.zeros(idx.shape, dtype=torch.bool)
    for r in range(idx.shape[0]):
        out[r, idx[r, : num[r]].long()] = True
    return out


def assert_same(ours, ref):
    assert ours.seq_lengths == ref.seq_lengths
    assert torch.equal(ours.to_dense(), ref.to_dense())
    for num, idx in (
        ("kv_num_blocks", "kv_indices"),
        ("full_kv_num_blocks", "full_kv_indices"),
        ("q_num_blocks", "q_indices"),
        ("full_q_num_blocks", "full_q_indices"),
    ):
        a = dense(getattr(ours, num), getattr(ours, idx))
        b = dense(getattr(ref, num), getattr(ref, idx))
        assert torch.equal(a, b), f"{num} differs"


BLOCKS = st.sampled_from([(128, 128), (128, 64), (32, 16), (16, 32), (8, 8)])


@given(plans(max_tokens=600), BLOCKS)
@settings(max_examples=100)
def test_analytic_equals_create_block_mask(plan, block):
    """Small blocks put many windows and segment edges inside one block."""
    layout, rule, shifted = plan
    t = tokens(layout, shifted=shifted)
    mod = fused(rule, layout, t, t)
    ref = create_block_mask(mod, None, None, layout.n, layout.n, device="cpu", BLOCK_SIZE=block)
    ours = analytic_block_mask(layout, rule, mod, shifted=shifted, block=block)
    assert_same(ours, ref)


@given(plans(max_tokens=600), BLOCKS)
@settings(max_examples=80)
def test_reduced_mask_is_exact_on_partial_blocks(plan, block):
    """The kernel evaluates the mask on partial blocks only, so it may drop the terms
    that are false on all of them (Blocks.terms): it must still be exact there."""
    from attention.blockmask import block_structure
    from attention.dispatch import reference_mask

    layout, rule, shifted = plan
    b = block_structure(layout, rule, shifted=shifted, block=block)
    t = tokens(layout, shifted=shifted)
    reduced = fused(rule, layout, t, t, terms=b.terms)
    ref = reference_mask(Plan(layout, rule, shifted=shifted))
    bq, bk = block
    z = torch.zeros((), dtype=torch.long)
    for qb, kb in zip(b.q_blk[~b.full].tolist(), b.k_blk[~b.full].tolist()):
        qi = torch.arange(qb * bq, min((qb + 1) * bq, layout.n))
        ki = torch.arange(kb * bk, min((kb + 1) * bk, layout.n))
        got = reduced(z, z, qi[:, None], ki[None, :])
        assert torch.equal(got, ref[qi][:, ki])


@given(plans(max_tokens=600), st.integers(20, 200))
@settings(max_examples=60)
def test_analytic_equals_create_block_mask_on_chunks(plan, max_q):
    layout, rule, shifted = plan
    assume(not (rule.text_sees_detail and layout.n_text))  # never chunked
    max_q = max(max_q, int(layout.detail_windows.volume.max()))
    for c in plan_chunks(layout, rule, shifted, 1, 1 << 40, max_q):
        qi, ki = c.q.index(layout), c.kv.index(layout)
        mod = fused(rule, layout, tokens(layout, qi, shifted), tokens(layout, ki, shifted))
        ref = create_block_mask(mod, None, None, len(qi), len(ki), device="cpu", BLOCK_SIZE=16)
        ours = analytic_block_mask(layout, rule, mod, shifted=shifted, q=c.q, kv=c.kv, block=16)
        assert_same(ours, ref)


@given(plans())
@settings(max_examples=40)
def test_chunks_cover_every_query_once_and_keep_its_keys(plan):
    layout, rule, shifted = plan
    assume(not (rule.text_sees_detail and layout.n_text))  # never chunked
    from attention.dispatch import reference_mask

    m = reference_mask(Plan(layout, rule, shifted=shifted))
    max_q = int(layout.detail_windows.volume.max())
    chunks = plan_chunks(layout, rule, shifted, 1, 1 << 40, max_q)
    seen = torch.zeros(layout.n, dtype=torch.long)
    for c in chunks:
        seen[c.q_start : c.q_end] += 1
        assert torch.equal(c.q.index(layout), torch.arange(c.q_start, c.q_end))
        keys = torch.zeros(layout.n, dtype=torch.bool)
        keys[c.kv_index] = True
        # every allowed key of every query of the chunk is among the chunk's keys
        assert not (m[c.q_start : c.q_end] & ~keys).any()
    assert torch.all(seen == 1)


def test_side_whole_is_the_sequence():
    from attention import Layout

    lay = Layout(grid=(5, 9), window=(2, 4), text=3, ratio=2)
    assert torch.equal(Side.whole(lay).index(lay), torch.arange(lay.n))


def test_create_block_mask_in_row_slices_equals_whole():
    """Large create_block_mask calls run over slices of query rows (bench: 700K tokens)."""
    from attention import VIDEO_RULE, Layout
    from attention.blockmask import mask_block_mask

    lay = Layout(grid=(5, 27, 30), window=(4, 8, 8), ratio=(4, 4))
    t = tokens(lay)
    mod = fused(VIDEO_RULE, lay, t, t)
    whole = mask_block_mask(mod, lay.n, lay.n)
    sliced = mask_block_mask(mod, lay.n, lay.n, max_elements=lay.n * 300)
    assert_same(sliced, whole)
    assert_same(analytic_block_mask(lay, VIDEO_RULE, mod), whole)
