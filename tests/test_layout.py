import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention import DETAIL, GUIDANCE, TEXT, Layout
from tests.strategies import layouts


@given(layouts(), st.integers(1, 3), st.integers(1, 4))
@settings(max_examples=60)
def test_permute_round_trip(layout, batch, channels):
    x = torch.randn(batch, layout.n, channels)
    y = layout.permute(x)
    assert torch.equal(layout.unpermute(y), x)
    assert torch.equal(layout.permute(layout.unpermute(x)), x)
    # a permutation: every raster position appears exactly once
    assert torch.equal(torch.sort(layout.perm).values, torch.arange(layout.n))


@given(layouts())
@settings(max_examples=60)
def test_window_first_order(layout):
    """Windows are contiguous, in raster order over the window grid, tokens inside a
    window in raster order, and guidance window i is aligned with detail window i."""
    seg, wid, xyz = layout.segment, layout.window_id, layout.coords
    for s, grid in ((GUIDANCE, layout.guidance_grid), (DETAIL, layout.grid)):
        sel = seg == s
        if not sel.any():
            continue
        w, c = wid[sel], xyz[sel]
        assert torch.all(w[1:] >= w[:-1])  # contiguous, ascending window ids
        raster = (c[:, 0] * grid[1] + c[:, 1]) * grid[2] + c[:, 2]
        same = w[1:] == w[:-1]
        assert torch.all(raster[1:][same] > raster[:-1][same])  # raster inside a window
        assert len(torch.unique(raster)) == len(raster)
    g, d = seg == GUIDANCE, seg == DETAIL
    if g.any():
        ratio = torch.tensor(layout.ratio)
        # a guidance token lies inside the region of its aligned detail window
        dw = layout.detail_windows
        pos = layout.positions()[g]
        origin, size = dw.origin[wid[g]], dw.size[wid[g]]
        coarse = xyz[g] * ratio
        assert torch.all(coarse >= origin) and torch.all(coarse < origin + size + ratio)
        offset = (ratio - 1) / 2 if layout.centre else 0
        assert torch.allclose(pos, coarse.double() + offset)
    assert torch.equal(layout.positions()[d], xyz[d].double())
    assert torch.all(layout.positions()[seg == TEXT] == 0)


def test_border_windows_are_smaller():
    layout = Layout(grid=(5, 7), window=(2, 4))
    sizes = layout.detail_windows.size[:, 1:].tolist()
    assert sizes == [[2, 4], [2, 3], [2, 4], [2, 3], [1, 4], [1, 3]]
    assert layout.n_windows == 6 and layout.n == 35


def test_counts_and_ratio():
    lay = Layout(grid=(21, 135, 240), window=(4, 8, 8), ratio=(4, 4))
    assert lay.guidance_grid == (6, 34, 60) and lay.guidance_window == (1, 2, 2)
    assert lay.n == 21 * 135 * 240 + 6 * 34 * 60
    img = Layout(grid=(256, 256), window=(16, 16), text=512, ratio=4)
    assert img.ratio == (1, 4, 4) and img.n == 512 + 64 * 64 + 256 * 256
    assert math.prod(img.window_grid) == 256


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(grid=(8, 8), window=(3, 3), ratio=2), "not divisible"),
        (dict(grid=(8, 0), window=(4, 4)), "positive"),
        (dict(grid=(8, 8), window=(4, 4), text=-1), "text"),
        (dict(grid=(1, 2, 3, 4), window=(1, 1, 1, 1)), "1 to 3"),
    ],
)
def test_bad_layouts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Layout(**kwargs)
