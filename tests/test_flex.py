"""The compiled FlexAttention path against the reference, on CPU in fp32."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from attention import ALL_GUIDANCE_RULE, Layout, MaskRule, Plan, attend
from attention.dispatch import flex_parts
from tests.strategies import plans

D = 16  # one head size keeps the number of compiled kernels small
SHAPES = st.sampled_from([(1, 1), (2, 3)])  # (batch, heads)


def qkv(b, h, n, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, D, generator=g).to(device, dtype) for _ in range(3)]


PACKED = st.sampled_from([None, False])  # None: packed unless the rule shifts windows


@given(plans(max_tokens=300), SHAPES, PACKED, st.integers(0, 2**31 - 1))
@settings(max_examples=60)
def test_flex_equals_reference(plan, shape, packed, seed):
    """Packed and layout-order flex against the fp32 reference."""
    layout, rule, shifted = plan
    q, k, v = qkv(*shape, layout.n, seed)
    ref = attend(q, k, v, Plan(layout, rule, backend="reference", shifted=shifted))
    out = attend(q, k, v, Plan(layout, rule, shifted=shifted, packed=packed))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)  # fp32


@given(plans(max_tokens=300), SHAPES, PACKED, st.integers(20, 150), st.integers(0, 2**31 - 1))
@settings(max_examples=30)
def test_chunked_equals_unchunked(plan, shape, packed, max_q, seed):
    layout, rule, shifted = plan
    assume(not (rule.text_sees_detail and layout.n_text))  # runs unchunked only (see below)
    max_q = max(max_q, int(layout.detail_windows.volume.max()))
    q, k, v = qkv(*shape, layout.n, seed)
    whole = attend(q, k, v, Plan(layout, rule, shifted=shifted, packed=packed))
    chunked_plan = Plan(layout, rule, shifted=shifted, chunk_tokens=max_q, packed=packed)
    chunked = attend(q, k, v, chunked_plan)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)  # fp32, sums reordered


def test_text_sees_detail_is_not_chunked():
    """Text rows that see every key cannot be split by windows: a clear error."""
    lay = Layout(grid=(40, 40), window=(8, 8), text=5, ratio=2)
    rule = MaskRule(text_sees_detail=True)
    q = torch.randn(1, 1, lay.n, 8)
    with pytest.raises(ValueError, match="text_sees_detail needs every key in one call"):
        attend(q, q, q, Plan(lay, rule, chunk_tokens=64))


def test_chunking_kicks_in_at_the_index_budget():
    lay = Layout(grid=(40, 40), window=(8, 8), text=5, ratio=2)
    plan = Plan(lay, ALL_GUIDANCE_RULE, index_budget=16 * 4 * 4, packed=False)  # <= 4x4 blocks
    parts = flex_parts(plan, "cpu", 1)
    assert len(parts) > 2
    for _, _, bm in parts:
        assert bm.kv_indices.shape[-1] * bm.kv_indices.shape[-2] <= 16
    q, k, v = qkv(2, 3, lay.n, 0)
    ref = attend(q, k, v, Plan(lay, ALL_GUIDANCE_RULE, backend="reference"))
    torch.testing.assert_close(attend(q, k, v, plan), ref, atol=1e-5, rtol=0)


def test_packed_chunking_kicks_in_at_the_index_budget():
    from attention.dispatch import packed_calls

    lay = Layout(grid=(40, 40), window=(8, 8), text=5, ratio=2)
    plan = Plan(lay, ALL_GUIDANCE_RULE, block=(16, 16), index_budget=16 * 40 * 40)
    calls, dst = packed_calls(plan, "cpu", 1)
    assert len(calls) > 2 and dst is not None
    for c in calls:
        assert c.block_mask.kv_indices.shape[-1] * c.block_mask.kv_indices.shape[-2] <= 1600
    q, k, v = qkv(2, 3, lay.n, 0)
    ref = attend(q, k, v, Plan(lay, ALL_GUIDANCE_RULE, backend="reference"))
    torch.testing.assert_close(attend(q, k, v, plan), ref, atol=1e-5, rtol=0)


def test_chunking_kicks_in_at_int32_offsets():
    from attention.blockmask import padded
    from attention.chunks import plan_chunks

    lay = Layout(grid=(64, 64), window=(16, 16), text=8, ratio=4)
    n = padded(lay.n)  # flex sees whole blocks
    assert len(plan_chunks(lay, ALL_GUIDANCE_RULE, False, 2**31 // n - 1, 1 << 40)) == 1
    bhd = 2**31 // n + 1
    chunks = plan_chunks(lay, ALL_GUIDANCE_RULE, False, bhd, 1 << 40)
    assert len(chunks) > 1
    for c in chunks:
        assert bhd * padded(max(c.q_end - c.q_start, len(c.kv_index))) < 2**31


def test_dense_backend_ignores_the_mask_and_none_is_sdpa():
    lay = Layout(grid=(6, 6), window=(3, 3), text=2, ratio=3)
    q, k, v = qkv(1, 2, lay.n, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.equal(attend(q, k, v, None), sdpa)
    assert torch.equal(attend(q, k, v, Plan(lay, backend="dense")), sdpa)
    masked = attend(q, k, v, Plan(lay))
    assert (masked - sdpa).abs().max() > 1e-3  # the mask does change the result


def test_shift_plan_alternates_layers():
    from attention import MaskRule

    lay = Layout(grid=(8, 8), window=(4, 4))
    plan = Plan(lay, MaskRule(neighbours="shift"))
    assert not plan.for_layer(0).shifted and plan.for_layer(1).shifted
    assert not Plan(lay).for_layer(1).shifted
    with pytest.raises(ValueError, match="shift"):
        Plan(lay, shifted=True)


def test_wrong_length_is_a_clear_error():
    lay = Layout(grid=(6, 6), window=(3, 3))
    q, k, v = qkv(1, 1, lay.n + 1, 0)
    with pytest.raises(ValueError, match="plan is for 36 tokens"):
        attend(q, k, v, Plan(lay))
