"""FlexAttention on the GPU, forward and backward, against the fp32 reference.

Run with the device tool: `pytest -m cuda`. The kernels are compiled once for every
rule (Plan(uniform_kernel=True)) so that many layouts cost few Triton compilations;
the specialised kernels the benchmarks use are checked on the three presets' rules."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention import ALL_GUIDANCE_RULE, VIDEO_RULE, Layout, MaskRule, Plan, attend
from tests.strategies import plans

pytestmark = pytest.mark.cuda
B, H, D = 2, 3, 64  # batch > 1, heads > 1


def inputs(n, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(B, H, n, D, generator=g).to("cuda", dtype).requires_grad_() for _ in range(3)
    ]


def forward_backward(q, k, v, plan):
    out = attend(q, k, v, plan)
    grad = torch.randn_like(out, dtype=torch.float32).to(out.dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    return out, dq, dk, dv, grad


def reference(q, k, v, plan, grad):
    """fp32 reference on the same (possibly bf16-rounded) inputs and output gradient."""
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref_plan = Plan(plan.layout, plan.rule, backend="reference", shifted=plan.shifted)
    out = attend(q32, k32, v32, ref_plan)
    return (out, *torch.autograd.grad(out, (q32, k32, v32), grad.float()))


def close_bf16(a, b):
    """Norm-wise: |a - b| <= BF16_REL |b| + BF16_ABS sqrt(numel) (the absolute part covers
    references that are exactly zero, such as dq for a query with one key)."""
    err = (a.float() - b).norm()
    return bool(err <= BF16_REL * b.norm() + BF16_ABS * b.numel() ** 0.5)


PACKED = st.sampled_from([None, False])  # None: packed unless the rule shifts windows


@given(plans(max_tokens=600), PACKED, st.integers(0, 2**31 - 1))
@settings(max_examples=40)
def test_flex_fp32_forward_backward(plan, packed, seed):
    layout, rule, shifted = plan
    p = Plan(layout, rule, shifted=shifted, uniform_kernel=True, packed=packed)
    q, k, v = inputs(layout.n, seed, torch.float32)
    out, dq, dk, dv, grad = forward_backward(q, k, v, p)
    ref = reference(q, k, v, p, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=name)


# bf16 tolerance: norm-relative error <= 2e-2 plus an RMS floor of 1e-3 (bf16 keeps 8
# significant bits, 3.9e-3; P and the output are rounded to bf16; a wrong mask gives
# errors of order 1)
BF16_REL, BF16_ABS = 2e-2, 1e-3


@given(plans(max_tokens=600), PACKED, st.integers(0, 2**31 - 1))
@settings(max_examples=40)
def test_flex_bf16_forward_backward(plan, packed, seed):
    layout, rule, shifted = plan
    p = Plan(layout, rule, shifted=shifted, uniform_kernel=True, packed=packed)
    q, k, v = inputs(layout.n, seed, torch.bfloat16)
    out, dq, dk, dv, grad = forward_backward(q, k, v, p)
    ref = reference(q, k, v, p, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref):
        assert close_bf16(a, b), name


@pytest.mark.parametrize(
    "layout, rule",
    [
        (Layout(grid=(40, 56), window=(16, 16), text=77, ratio=4), ALL_GUIDANCE_RULE),
        (Layout(grid=(5, 27, 30), window=(4, 8, 8), ratio=(4, 4)), VIDEO_RULE),
        (Layout(grid=(40, 56), window=(16, 16), text=77, ratio=4), MaskRule(neighbours="shift")),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [None, False])
def test_specialised_kernels(layout, rule, dtype, packed):
    if packed is None and rule.neighbours == "shift":
        pytest.skip("shifted windows run unpacked (packed=None is packed=False)")
    for layer in (0, 1):
        p = Plan(layout, rule, packed=packed).for_layer(layer)
        q, k, v = inputs(layout.n, layer, dtype)
        out, dq, dk, dv, grad = forward_backward(q, k, v, p)
        ref = reference(q, k, v, p, grad)
        for a, b in zip((out, dq, dk, dv), ref):
            if dtype == torch.float32:
                torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
            else:
                assert close_bf16(a, b)


@pytest.mark.parametrize("packed", [None, False])
def test_chunked_on_gpu(packed):
    layout = Layout(grid=(48, 64), window=(16, 16), text=77, ratio=4)
    q, k, v = inputs(layout.n, 3, torch.float32)
    whole = attend(q, k, v, Plan(layout, packed=packed))
    chunked = attend(q, k, v, Plan(layout, chunk_tokens=1024, packed=packed))
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [8, 24, 72, 200, 1000, 1100])
def test_compiled_flex_at_ragged_lengths_without_padding(n):
    """Decides whether CUDA needs flex.py's padding to whole blocks: the compiled kernel
    called directly at lengths that are not multiples of 128."""
    from attention.blockmask import analytic_block_mask
    from attention.flex import flex
    from attention.rules import fused, tokens

    layout, rule = Layout(grid=(n,), window=(16,)), MaskRule(halo=2)
    tok = tokens(layout, device="cuda")
    bm = analytic_block_mask(layout, rule, fused(rule, layout, tok, tok), device="cuda")
    assert bm.seq_lengths == (n, n)
    q, k, v = inputs(n, n, torch.float32)
    out = flex(q, k, v, bm)  # no padding: the BlockMask has the ragged lengths
    grad = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    ref = reference(q, k, v, Plan(layout, rule), grad)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
