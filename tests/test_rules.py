"""The mask rules against the dense reference built from raster geometry."""

import pytest
import torch
from hypothesis import given, settings

from attention import DETAIL, GUIDANCE, Layout, MaskRule, Plan
from attention.dispatch import reference_mask
from attention.rules import compose, fused, tokens
from attention.stats import allowed_pairs
from tests.strategies import plans


def evaluate(mask_mod, n_q, n_k):
    z = torch.zeros((), dtype=torch.long)
    return mask_mod(z, z, torch.arange(n_q)[:, None], torch.arange(n_k)[None, :])


@given(plans())
@settings(max_examples=120)
def test_reference_mask_permuted_equals_layout_mask(plan):
    layout, rule, shifted = plan
    ref = reference_mask(Plan(layout, rule, shifted=shifted))
    t = tokens(layout, shifted=shifted)
    assert torch.equal(evaluate(compose(rule, t, t), layout.n, layout.n), ref)
    assert torch.equal(evaluate(fused(rule, layout, t, t), layout.n, layout.n), ref)
    uniform = fused(rule, layout, t, t, uniform=True)
    assert torch.equal(evaluate(uniform, layout.n, layout.n), ref)


@given(plans())
@settings(max_examples=80)
def test_guidance_is_one_way_and_every_query_sees_something(plan):
    layout, rule, shifted = plan
    m = reference_mask(Plan(layout, rule, shifted=shifted))
    seg = layout.segment
    assert not m[seg == GUIDANCE][:, seg == DETAIL].any()
    assert m.any(1).all()


@given(plans())
@settings(max_examples=80)
def test_allowed_pair_count(plan):
    layout, rule, shifted = plan
    m = reference_mask(Plan(layout, rule, shifted=shifted))
    assert allowed_pairs(layout, rule, shifted) == int(m.sum())


def test_rules_are_named_with_their_parameters():
    lay = Layout(grid=(8, 8), window=(4, 4), text=2, ratio=2)
    t = tokens(lay)
    mod = compose(MaskRule(scope="aligned", margin=2, halo=3), t, t)
    assert "halo(3)" in mod.__name__ and "guidance_scope_aligned(2)" in mod.__name__
    assert "guidance_one_way" in mod.__name__
    assert MaskRule(neighbours="none").name == (
        "guidance all, neighbours none, guidance_sees_text, detail_sees_text"
    )


def test_halo_reaches_exactly_k_tokens_across_a_window_edge():
    lay = Layout(grid=(1, 12), window=(1, 4))
    for k in (0, 1, 2):
        m = reference_mask(Plan(lay, MaskRule(halo=k)))
        # raster = layout order here (one row); token 3 is the last of window 0
        assert m[3, 4:].sum() == k and m[3, :4].all()


@pytest.mark.parametrize("bad", [dict(scope="some"), dict(neighbours="ring"), dict(halo=-1)])
def test_bad_rules(bad):
    with pytest.raises(ValueError):
        MaskRule(**bad)
